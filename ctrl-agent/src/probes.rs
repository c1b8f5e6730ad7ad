//! The node side of kubelet health probes to captured pods, as Istio ambient does it: the
//! node's own TCP connections to a captured pod's address are SNATed to
//! [`PROBE_SOURCE_V4`] / [`PROBE_SOURCE_V6`], which each pod's capture rules let through to the
//! application (`mesh_core::redirect`). Without this a probe reaches the data plane as a
//! plaintext peer with no identity, and STRICT mTLS or an ALLOW policy refuses it: the pod
//! never becomes ready.
//!
//! The rules live in an nftables table of our own in the node's network namespace (the
//! agent's own, or the one `--host-netns` names when the agent runs in a pod of its own), with
//! one set per address family holding this node's captured pods, rewritten after every
//! enrollment change.
//!
//! Only packets that carry a local socket are SNATed (`meta skuid`, matched over every uid):
//! nft evaluates `skuid` only for a packet with a full socket owned by a process and does not
//! match otherwise, which is what Istio's `-m owner --socket-exists` matches. Forwarded traffic
//! (another pod, another node, a NodePort client) carries no local socket and keeps its
//! source, so it still meets the mesh. `fib saddr type local` would be looser: it looks only
//! at the source address, which forwarded or masqueraded traffic can also carry.

use std::io;
use std::net::IpAddr;

use mesh_core::redirect::{PROBE_SOURCE_V4, PROBE_SOURCE_V6};
use mesh_io::netns::NetNs;

use crate::agent::{lock, SharedState};
use crate::uninstall::Departure;

/// Our host table; distinct from Istio's (`istio-*`) so both can live on one node.
pub const TABLE: &str = "mesh-host-probes";
/// The set of this node's captured pods' IPv4 addresses.
pub const SET_V4: &str = "captured-pods-v4";
/// The set of this node's captured pods' IPv6 addresses.
pub const SET_V6: &str = "captured-pods-v6";

/// Just before the usual source-NAT priority: a CNI's masquerade at `srcnat` must not give a
/// probe the node's address first (the first NAT binding of a connection wins).
const PRIORITY: &str = "srcnat - 5";

#[derive(Debug, thiserror::Error)]
pub enum ProbeRulesError {
    #[error("installing the host probe table inet {TABLE}: {0}")]
    Install(#[source] io::Error),
    #[error("updating the captured-pod sets of inet {TABLE}: {0}")]
    Update(#[source] io::Error),
    #[error("removing the host probe table inet {TABLE}: {0}")]
    Remove(#[source] io::Error),
}

/// The whole table with `pods` in its sets, for `nft -f -`. Idempotent: it deletes a table
/// left by an earlier agent before recreating it, in the same transaction.
pub fn host_ruleset(pods: &[IpAddr]) -> String {
    format!(
        "table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  set {SET_V4} {{ type ipv4_addr; }}
  set {SET_V6} {{ type ipv6_addr; }}
  chain postrouting {{
    type nat hook postrouting priority {PRIORITY}; policy accept;
    meta l4proto tcp ip daddr @{SET_V4} meta skuid 0-4294967295 snat ip to {PROBE_SOURCE_V4}
    meta l4proto tcp ip6 daddr @{SET_V6} meta skuid 0-4294967295 snat ip6 to {PROBE_SOURCE_V6}
  }}
}}
{elements}",
        elements = set_elements(pods)
    )
}

/// Replaces the sets' contents with `pods` in one transaction (probes never see them empty).
pub fn set_update(pods: &[IpAddr]) -> String {
    format!(
        "flush set inet {TABLE} {SET_V4}\nflush set inet {TABLE} {SET_V6}\n{}",
        set_elements(pods)
    )
}

/// Removes the table; harmless if it is not there.
pub fn host_ruleset_removal() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

fn set_elements(pods: &[IpAddr]) -> String {
    let join = |ips: Vec<String>| ips.join(", ");
    let v4: Vec<String> = pods
        .iter()
        .filter(|ip| ip.is_ipv4())
        .map(IpAddr::to_string)
        .collect();
    let v6: Vec<String> = pods
        .iter()
        .filter(|ip| ip.is_ipv6())
        .map(IpAddr::to_string)
        .collect();
    let mut out = String::new();
    // nft refuses an empty element list.
    if !v4.is_empty() {
        out.push_str(&format!(
            "add element inet {TABLE} {SET_V4} {{ {} }}\n",
            join(v4)
        ));
    }
    if !v6.is_empty() {
        out.push_str(&format!(
            "add element inet {TABLE} {SET_V6} {{ {} }}\n",
            join(v6)
        ));
    }
    out
}

/// The installed host table, and the addresses last written to its sets.
#[derive(Debug)]
pub struct HostProbeRules {
    pods: Vec<IpAddr>,
    /// The node's namespace when it is not the agent's own.
    host: Option<NetNs>,
}

impl HostProbeRules {
    /// Installs the table in `host` (else the current network namespace) with `pods` in its
    /// sets, replacing a stale one.
    pub fn install(
        pods: &[IpAddr],
        host: Option<NetNs>,
    ) -> Result<HostProbeRules, ProbeRulesError> {
        let rules = HostProbeRules {
            pods: normalized(pods),
            host,
        };
        rules
            .nft(&host_ruleset(&rules.pods))
            .map_err(ProbeRulesError::Install)?;
        Ok(rules)
    }

    fn nft(&self, ruleset: &str) -> io::Result<String> {
        match &self.host {
            Some(netns) => mesh_io::redirect::nft_in(netns, &["-f", "-"], ruleset),
            None => mesh_io::redirect::nft(&["-f", "-"], ruleset),
        }
    }

    /// Makes the sets hold exactly `pods`; nothing to do if they already do. If the table
    /// went away (someone flushed the ruleset), it is installed again.
    pub fn sync(&mut self, pods: &[IpAddr]) -> Result<(), ProbeRulesError> {
        let pods = normalized(pods);
        if pods == self.pods {
            return Ok(());
        }
        if let Err(update) = self.nft(&set_update(&pods)) {
            tracing::warn!(error = %update, "host probe sets could not be updated; reinstalling the table");
            self.nft(&host_ruleset(&pods))
                .map_err(ProbeRulesError::Update)?;
        }
        self.pods = pods;
        Ok(())
    }

    /// Removes the table (on a clean shutdown: no pod is served any more).
    pub fn remove(self) -> Result<(), ProbeRulesError> {
        self.nft(&host_ruleset_removal())
            .map(drop)
            .map_err(ProbeRulesError::Remove)
    }
}

/// At agent start: installs the table covering the pods already captured (from the persisted
/// enrollments) and keeps it following them. A failure is logged and the agent carries on.
/// `host`: the node's network namespace, if the agent does not run in it.
pub fn start(shared: &SharedState, host: Option<NetNs>) {
    let mut state = lock(shared);
    let pods = state.enrollments.captured_ips();
    match HostProbeRules::install(&pods, host) {
        Ok(rules) => {
            tracing::info!(table = %format!("inet {TABLE}"), addresses = pods.len(),
                snat_v4 = %PROBE_SOURCE_V4, snat_v6 = %PROBE_SOURCE_V6,
                "kubelet probes to captured pods bypass the mesh");
            state.enrollments.keep_host_probes(rules);
        }
        Err(error) => tracing::error!(%error, "no host probe SNAT: kubelet probes to captured \
            pods will be refused under STRICT mTLS or an ALLOW policy"),
    }
}

/// On a clean shutdown: an uninstall removes the table; a restart leaves it, since the pods
/// stay captured and served by the data plane, so that their probes keep passing until the
/// next agent replaces it.
pub fn stop(shared: &SharedState, departure: Departure) {
    let rules = lock(shared).enrollments.take_host_probes();
    let Some(rules) = rules else { return };
    match departure {
        Departure::Restart => tracing::info!(table = %format!("inet {TABLE}"),
            "host probe SNAT left for the next agent"),
        Departure::Uninstall => match rules.remove() {
            Ok(()) => tracing::info!(table = %format!("inet {TABLE}"), "host probe SNAT removed"),
            Err(error) => tracing::warn!(%error, "host probe SNAT left in place"),
        },
    }
}

/// Sorted and without duplicates (two sandboxes of one pod may share an address), so that
/// "unchanged" is a plain comparison.
fn normalized(pods: &[IpAddr]) -> Vec<IpAddr> {
    let mut pods = pods.to_vec();
    pods.sort_unstable();
    pods.dedup();
    pods
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().expect("ip")).collect()
    }

    #[test]
    fn only_locally_generated_tcp_to_captured_pods_is_snatted_to_the_probe_sources() {
        let rules = host_ruleset(&[]);
        let chain = rules.split("chain postrouting").nth(1).expect("chain");
        assert!(chain.contains("type nat hook postrouting"));
        assert!(chain.contains(
            "meta l4proto tcp ip daddr @captured-pods-v4 meta skuid 0-4294967295 snat ip to 169.254.7.127"
        ));
        assert!(chain.contains(
            "meta l4proto tcp ip6 daddr @captured-pods-v6 meta skuid 0-4294967295 \
             snat ip6 to fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
        ));
        assert!(
            !rules.contains("add element"),
            "nft refuses empty element lists"
        );
    }

    #[test]
    fn pods_go_to_the_set_of_their_family() {
        let pods = ips(&["10.0.0.2", "fd00::2", "10.0.0.1"]);
        let rules = host_ruleset(&pods);
        assert!(rules
            .contains("add element inet mesh-host-probes captured-pods-v4 { 10.0.0.2, 10.0.0.1 }"));
        assert!(rules.contains("add element inet mesh-host-probes captured-pods-v6 { fd00::2 }"));
        let update = set_update(&pods[..1]);
        assert!(update.starts_with(
            "flush set inet mesh-host-probes captured-pods-v4\nflush set inet mesh-host-probes captured-pods-v6\n"
        ));
        assert!(update.contains("captured-pods-v4 { 10.0.0.2 }"));
        assert!(!update.contains("captured-pods-v6 {"));
    }

    #[test]
    fn the_table_replaces_a_stale_one_and_its_removal_is_harmless_when_absent() {
        assert!(host_ruleset(&[]).starts_with(
            "table inet mesh-host-probes\ndelete table inet mesh-host-probes\ntable inet mesh-host-probes {"
        ));
        assert_eq!(
            host_ruleset_removal(),
            "table inet mesh-host-probes\ndelete table inet mesh-host-probes\n"
        );
    }
}
