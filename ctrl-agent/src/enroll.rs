//! Pods enrolled through CNI on this node: which are captured, their addresses, and a handle on
//! each one's network namespace. The list is persisted (with each namespace's device and inode)
//! so that a restarted agent serves the same pods again without any CNI call, and never
//! mistakes a reused namespace path for the pod that used to own it.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mesh_io::netns::NetNs;
use serde::{Deserialize, Serialize};

use crate::cni_api::{PodRef, DATAPLANE_MODE_LABEL};
use crate::config::{FileConfig, WorkloadSpec};
use crate::probes::HostProbeRules;

/// Whether a pod should be captured, by Istio's labels: a pod labelled `ambient` is; one
/// labelled `none` is not; otherwise its namespace's label decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capture {
    Yes,
    No(&'static str),
    /// It should be, but the agent does not know the pod (no identity to give it) yet.
    NotYet(String),
}

/// Istio's enrollment rule, given the `istio.io/dataplane-mode` of the pod and of its
/// namespace and whether the pod runs Istio's sidecar: `none` on the pod opts out, a pod with
/// a sidecar is the sidecar's to capture (as Istio's CNI plugin decides), and otherwise
/// `ambient` on either enrolls. Every source decides with it (the file source here, the
/// Kubernetes source for a workload's protocol).
pub fn ambient(
    pod_mode: Option<&str>,
    namespace_mode: Option<&str>,
    sidecar: bool,
) -> Result<(), &'static str> {
    match (pod_mode, namespace_mode) {
        (Some("none"), _) => Err("the pod opts out (dataplane-mode=none)"),
        _ if sidecar => Err("the pod runs Istio's sidecar, which captures its traffic"),
        (Some("ambient"), _) | (_, Some("ambient")) => Ok(()),
        _ => Err("neither the pod nor its namespace is ambient"),
    }
}

pub fn decide(config: &FileConfig, node: &str, namespace: &str, name: &str) -> Capture {
    let pod = config
        .workloads
        .iter()
        .find(|w| w.namespace == namespace && w.name == name);
    let pod_mode = pod.and_then(|w| w.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str));
    let namespace_mode = config
        .namespaces
        .iter()
        .find(|n| n.name == namespace)
        .and_then(|n| n.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str));
    if let Err(why) = ambient(pod_mode, namespace_mode, pod.is_some_and(|w| w.sidecar)) {
        return Capture::No(why);
    }
    match pod {
        None => Capture::NotYet(format!(
            "pod {namespace}/{name} is not known to the agent yet"
        )),
        Some(w) if w.node != node => Capture::NotYet(format!(
            "pod {namespace}/{name} is listed on node {:?}, not {node:?}",
            w.node
        )),
        Some(_) => Capture::Yes,
    }
}

/// One sandbox CNI told us about.
pub struct Enrolled {
    pub pod: PodRef,
    pub ips: Vec<IpAddr>,
    pub netns_path: String,
    pub netns: NetNs,
    pub captured: bool,
    /// The CNI network it is attached to (empty: enrolled by a plugin that did not say).
    pub network: String,
    /// When its ADD came (for sandboxes from before the agent started: when it started):
    /// GC spares sandboxes younger than its grace, whose ADD the runtime's list may not have
    /// caught. Monotonic: a clock stepped at boot must not age a fresh sandbox.
    pub enrolled_at: Instant,
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    pod: PodRef,
    ips: Vec<IpAddr>,
    netns_path: String,
    netns_dev: u64,
    netns_ino: u64,
    captured: bool,
    #[serde(default)]
    network: String,
}

pub struct Enrollments {
    state_path: PathBuf,
    /// By container (sandbox) id.
    pods: BTreeMap<String, Enrolled>,
    /// The node's probe SNAT table, kept covering the captured pods (None when turned off or
    /// not installed).
    host_probes: Option<HostProbeRules>,
}

impl Enrollments {
    /// Loads the persisted list, reopening each pod's namespace and keeping only those whose
    /// namespace is still the same one (same device and inode). Returns what was dropped, why.
    pub fn load(state_path: &Path) -> (Enrollments, Vec<String>) {
        let mut out = Enrollments {
            state_path: state_path.to_owned(),
            pods: BTreeMap::new(),
            host_probes: None,
        };
        let mut dropped = Vec::new();
        let records: Vec<Persisted> = match std::fs::read(state_path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    dropped.push(format!(
                        "{}: unreadable, starting empty: {e}",
                        state_path.display()
                    ));
                    Vec::new()
                }
            },
            Err(_) => Vec::new(),
        };
        for r in records {
            match reopen(&r.netns_path, (r.netns_dev, r.netns_ino)) {
                Some(netns) => {
                    out.pods.insert(
                        r.pod.container_id.clone(),
                        Enrolled {
                            pod: r.pod,
                            ips: r.ips,
                            netns_path: r.netns_path,
                            netns,
                            captured: r.captured,
                            network: r.network,
                            enrolled_at: Instant::now(),
                        },
                    );
                }
                None => dropped.push(format!(
                    "{}/{}: its network namespace is gone",
                    r.pod.namespace, r.pod.name
                )),
            }
        }
        (out, dropped)
    }

    /// Reads the persisted list again (another agent changed it), keeping the host probe
    /// rules this one holds. Returns what was dropped, why.
    pub fn reload(&mut self) -> Vec<String> {
        let (mut fresh, dropped) = Enrollments::load(&self.state_path);
        fresh.host_probes = self.host_probes.take();
        *self = fresh;
        dropped
    }

    /// How many sandboxes are enrolled.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    pub fn save(&self) -> io::Result<()> {
        let records: Vec<Persisted> = self
            .pods
            .values()
            .map(|e| {
                let (netns_dev, netns_ino) = e.netns.identity().unwrap_or((0, 0));
                Persisted {
                    pod: e.pod.clone(),
                    ips: e.ips.clone(),
                    netns_path: e.netns_path.clone(),
                    netns_dev,
                    netns_ino,
                    captured: e.captured,
                    network: e.network.clone(),
                }
            })
            .collect();
        if let Some(dir) = self.state_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.state_path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&records).map_err(io::Error::other)?,
        )?;
        std::fs::rename(tmp, &self.state_path)
    }

    pub fn insert(&mut self, enrolled: Enrolled) -> Option<Enrolled> {
        self.pods
            .insert(enrolled.pod.container_id.clone(), enrolled)
    }

    pub fn remove(&mut self, container_id: &str) -> Option<Enrolled> {
        self.pods.remove(container_id)
    }

    pub fn get(&self, container_id: &str) -> Option<&Enrolled> {
        self.pods.get(container_id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Enrolled> {
        self.pods.values()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Enrolled> {
        self.pods.values_mut()
    }

    /// CNI GC: the sandboxes attached to `network` that the runtime no longer lists in
    /// `valid`, leaving out those enrolled less than `grace` before `now` (their ADD may have
    /// been under way when the runtime made its list). Sandboxes of other networks, or whose
    /// network is not known, are never stale.
    pub fn stale(
        &self,
        network: &str,
        valid: &HashSet<&str>,
        now: Instant,
        grace: Duration,
    ) -> Vec<String> {
        self.pods
            .values()
            .filter(|e| !network.is_empty() && e.network == network)
            .filter(|e| !valid.contains(e.pod.container_id.as_str()))
            .filter(|e| now.saturating_duration_since(e.enrolled_at) >= grace)
            .map(|e| e.pod.container_id.clone())
            .collect()
    }

    /// The captured sandbox of a pod, if any.
    pub fn captured(&self, namespace: &str, name: &str) -> Option<&Enrolled> {
        self.pods
            .values()
            .find(|e| e.captured && e.pod.namespace == namespace && e.pod.name == name)
    }

    /// Addresses of the captured pods: those whose kubelet probes the node must SNAT.
    pub fn captured_ips(&self) -> Vec<IpAddr> {
        self.pods
            .values()
            .filter(|e| e.captured)
            .flat_map(|e| e.ips.iter().copied())
            .collect()
    }

    /// From now on [`Enrollments::sync_host_probes`] keeps `rules` covering the captured pods.
    pub fn keep_host_probes(&mut self, rules: HostProbeRules) {
        self.host_probes = Some(rules);
    }

    /// Hands the host probe rules back (to remove them on shutdown); no more syncing.
    pub fn take_host_probes(&mut self) -> Option<HostProbeRules> {
        self.host_probes.take()
    }

    /// After a change: the host probe sets follow the captured pods. A failure is logged and
    /// leaves the sets as they were (the newly captured pods' probes then meet the mesh).
    pub fn sync_host_probes(&mut self) {
        let ips = self.captured_ips();
        if let Some(rules) = self.host_probes.as_mut() {
            if let Err(error) = rules.sync(&ips) {
                tracing::error!(%error, "the host probe SNAT does not follow the captured pods: \
                    kubelet probes to newly captured pods will be refused under STRICT mTLS or \
                    an ALLOW policy");
            }
        }
    }
}

/// Opens a namespace by path if it is still `identity`, else looks for it among processes.
fn reopen(path: &str, identity: (u64, u64)) -> Option<NetNs> {
    if let Ok(netns) = NetNs::open(path) {
        if netns.identity().ok() == Some(identity) {
            return Some(netns);
        }
    }
    let procs = std::fs::read_dir("/proc").ok()?;
    procs
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| (m.dev(), m.ino()) == identity)
                .unwrap_or(false)
        })
        .and_then(|p| NetNs::open(p).ok())
}

/// The catalog entry of an enrolled pod.
pub fn workload_of<'a>(config: &'a FileConfig, pod: &PodRef) -> Option<&'a WorkloadSpec> {
    config
        .workloads
        .iter()
        .find(|w| w.namespace == pod.namespace && w.name == pod.name)
        .map(|w| &**w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> FileConfig {
        FileConfig::parse(yaml).expect("config")
    }

    const CATALOG: &str = r#"
namespaces:
  - {name: shop, labels: {istio.io/dataplane-mode: ambient}}
  - {name: legacy}
workloads:
  - {uid: c1, name: cart, namespace: shop, ips: [10.0.0.1], node: n1}
  - {uid: c2, name: batch, namespace: shop, ips: [10.0.0.2], node: n1, labels: {istio.io/dataplane-mode: none}}
  - {uid: c3, name: old, namespace: legacy, ips: [10.0.0.3], node: n1}
  - {uid: c4, name: opted-in, namespace: legacy, ips: [10.0.0.4], node: n1, labels: {istio.io/dataplane-mode: ambient}}
  - {uid: c5, name: elsewhere, namespace: shop, ips: [10.0.0.5], node: n2}
  - {uid: c6, name: injected, namespace: shop, ips: [10.0.0.6], node: n1, sidecar: true}
"#;

    #[test]
    fn capture_follows_istio_labels() {
        let cfg = config(CATALOG);
        let cases = [
            ("shop", "cart", Capture::Yes),
            (
                "shop",
                "batch",
                Capture::No("the pod opts out (dataplane-mode=none)"),
            ),
            (
                "legacy",
                "old",
                Capture::No("neither the pod nor its namespace is ambient"),
            ),
            ("legacy", "opted-in", Capture::Yes),
            (
                "shop",
                "injected",
                Capture::No("the pod runs Istio's sidecar, which captures its traffic"),
            ),
            (
                "other",
                "unknown",
                Capture::No("neither the pod nor its namespace is ambient"),
            ),
        ];
        for (ns, name, want) in cases {
            assert_eq!(decide(&cfg, "n1", ns, name), want, "{ns}/{name}");
        }
        assert!(matches!(
            decide(&cfg, "n1", "shop", "unknown"),
            Capture::NotYet(_)
        ));
        assert!(matches!(
            decide(&cfg, "n1", "shop", "elsewhere"),
            Capture::NotYet(_)
        ));
    }

    #[test]
    fn persisted_enrollments_survive_a_restart_and_dead_namespaces_are_dropped() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("dir");
        let state = dir.path().join("enrollments.json");
        let (mut e, _) = Enrollments::load(&state);
        // Our own namespace stands in for a pod's: it certainly exists.
        let live = "/proc/self/ns/net";
        e.insert(Enrolled {
            pod: PodRef {
                container_id: "alive".into(),
                namespace: "shop".into(),
                name: "cart".into(),
            },
            ips: vec!["10.0.0.1".parse().expect("ip")],
            netns_path: live.into(),
            netns: NetNs::open(live).expect("netns"),
            captured: true,
            network: "k8s-pod-network".into(),
            enrolled_at: Instant::now(),
        });
        e.save().expect("save");
        // Add a record whose namespace no longer exists.
        let mut records: Vec<serde_json::Value> =
            serde_json::from_slice(&std::fs::read(&state).expect("read")).expect("json");
        let mut gone = records[0].clone();
        gone["pod"]["container_id"] = "gone".into();
        gone["netns_path"] = "/run/netns/does-not-exist".into();
        gone["netns_ino"] = 1.into();
        records.push(gone);
        std::fs::write(&state, serde_json::to_vec(&records).expect("json")).expect("write");

        let (reloaded, dropped) = Enrollments::load(&state);
        assert!(reloaded
            .get("alive")
            .is_some_and(|p| p.captured && p.network == "k8s-pod-network"));
        assert!(reloaded.get("gone").is_none());
        assert_eq!(dropped.len(), 1, "{dropped:?}");
    }

    #[test]
    fn gc_releases_only_old_enough_sandboxes_of_its_network_missing_from_the_list() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("dir");
        let (mut e, _) = Enrollments::load(&dir.path().join("enrollments.json"));
        let grace = Duration::from_secs(60);
        let long_ago = Instant::now();
        let now = long_ago + Duration::from_secs(3600);
        for (id, network, at) in [
            ("listed", "pods", long_ago),
            ("lost-del", "pods", long_ago),
            ("just-added", "pods", now - Duration::from_secs(5)),
            ("other-network", "storage", long_ago),
            ("older-plugin", "", long_ago),
        ] {
            e.insert(Enrolled {
                pod: PodRef {
                    container_id: id.into(),
                    namespace: "shop".into(),
                    name: id.into(),
                },
                ips: Vec::new(),
                netns_path: "/proc/self/ns/net".into(),
                netns: NetNs::open("/proc/self/ns/net").expect("netns"),
                captured: true,
                network: network.into(),
                enrolled_at: at,
            });
        }
        let valid: HashSet<&str> = ["listed"].into();
        assert_eq!(e.stale("pods", &valid, now, grace), vec!["lost-del"]);
        // Once old enough, the sandbox whose ADD the list may have missed goes too.
        let later = now + grace;
        let mut stale = e.stale("pods", &valid, later, grace);
        stale.sort();
        assert_eq!(stale, vec!["just-added", "lost-del"]);
        // A network without a name collects nothing, not even sandboxes without one.
        assert!(e.stale("", &valid, later, grace).is_empty());
    }
}
