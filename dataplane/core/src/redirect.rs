//! The nftables ruleset that captures a pod's TCP into the data plane, rendered as text for
//! `nft -f -` inside the pod's network namespace.
//!
//! Outbound TCP goes to 15001 and inbound TCP to 15006, except HBONE (15008), loopback,
//! packets carrying the data plane's mark (its own sockets, which would otherwise loop), and
//! the kubelet's health probes: the node SNATs those to [`PROBE_SOURCE_V4`] /
//! [`PROBE_SOURCE_V6`] (the agent's host table), so they reach the application directly, as in
//! Istio ambient. A probe has no mesh identity and STRICT mTLS would refuse it otherwise.
//!
//! The data plane connects to a pod's application from the client's own address (as
//! ztunnel does), so the application sees who called it. The address is not the pod's, so the
//! application's replies would be routed out of the pod: connections the data plane opens to
//! the pod itself (its mark, seen arriving over loopback) get connection mark
//! [`ORIGINAL_SOURCE_MARK`], the application's packets on them carry it back as their packet
//! mark, and a policy routing rule (`fwmark` [`ORIGINAL_SOURCE_MARK`]/[`MARK_MASK`], table
//! [`ORIGINAL_SOURCE_TABLE`], where every address is local) hands them back to the data plane.
//! The values are Istio's, so a node's runbooks read the same.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{ports, DATAPLANE_MARK};

/// Source the node gives the kubelet's probes to captured pods (Istio's address, so rules and
/// runbooks written for Istio ambient still hold).
pub const PROBE_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// IPv6 counterpart of [`PROBE_SOURCE_V4`] (Istio's as well).
pub const PROBE_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);

/// Connection mark (and, on the application's replies, packet mark) of the data plane's
/// connections to the pod's own application.
pub const ORIGINAL_SOURCE_MARK: u32 = 0x111;
/// The bits of the packet and connection marks the rules own; the rest are left to others.
pub const MARK_MASK: u32 = 0xfff;
/// Routing table in the pod's namespace where every address is local (`local default dev lo`).
pub const ORIGINAL_SOURCE_TABLE: u8 = 100;
/// Priority of the rule sending [`ORIGINAL_SOURCE_MARK`] to that table: after the local table
/// (0), before the main one (32766).
pub const ORIGINAL_SOURCE_RULE_PRIORITY: u32 = 32764;

/// Name of the nftables table the rules live in; deleting it removes every rule we added.
pub const TABLE: &str = "meshdp";

/// The complete ruleset for one pod. Idempotent: it deletes its table before recreating it.
pub fn pod_ruleset() -> String {
    format!(
        "table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark {mark:#x} return
    oifname \"lo\" return
    ip daddr 127.0.0.0/8 return
    ip6 daddr ::1 return
    ip daddr {probe_v4} return
    ip6 daddr {probe_v6} return
    meta l4proto tcp redirect to :{outbound}
  }}
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    iifname \"lo\" return
    ip saddr {probe_v4} return
    ip6 saddr {probe_v6} return
    tcp dport {hbone} return
    meta l4proto tcp redirect to :{inbound}
  }}
  chain mark-own-connections {{
    type filter hook prerouting priority mangle; policy accept;
    ct state new meta mark & {mask:#x} == {mark:#x} ct mark set ct mark & {keep:#x} | {original:#x}
  }}
  chain route-replies-home {{
    type route hook output priority mangle; policy accept;
    ct mark & {mask:#x} == {original:#x} meta mark set meta mark & {keep:#x} | {original:#x}
  }}
}}
",
        mark = DATAPLANE_MARK,
        outbound = ports::OUTBOUND,
        hbone = ports::HBONE,
        inbound = ports::INBOUND_PLAINTEXT,
        probe_v4 = PROBE_SOURCE_V4,
        probe_v6 = PROBE_SOURCE_V6,
        mask = MARK_MASK,
        keep = !MARK_MASK,
        original = ORIGINAL_SOURCE_MARK,
    )
}

/// Removes the rules (for `nft -f -`); harmless if they are not there.
pub fn pod_ruleset_removal() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// Whether `nft list table` output shows every part of the capture (as nft prints it back:
/// marks zero-padded to 32 bits).
pub fn ruleset_is_complete(listing: &str) -> bool {
    let mark = format!("meta mark {DATAPLANE_MARK:#010x} return");
    [
        "hook output",
        "hook prerouting",
        mark.as_str(),
        &format!("tcp dport {} return", ports::HBONE),
        &format!("redirect to :{}", ports::OUTBOUND),
        &format!("redirect to :{}", ports::INBOUND_PLAINTEXT),
        &format!(
            "ct mark set ct mark & {:#010x} | {ORIGINAL_SOURCE_MARK:#010x}",
            !MARK_MASK | ORIGINAL_SOURCE_MARK
        ),
        &format!(
            "meta mark set meta mark & {:#010x} | {ORIGINAL_SOURCE_MARK:#010x}",
            !MARK_MASK | ORIGINAL_SOURCE_MARK
        ),
    ]
    .iter()
    .all(|needle| listing.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What nft 1.0.6 prints back for `pod_ruleset()`.
    const LISTED: &str = "table inet meshdp {
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta mark 0x00000539 return
\t\toifname \"lo\" return
\t\tip daddr 127.0.0.0/8 return
\t\tip6 daddr ::1 return
\t\tip daddr 169.254.7.127 return
\t\tip6 daddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff return
\t\tmeta l4proto tcp redirect to :15001
\t}

\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname \"lo\" return
\t\tip saddr 169.254.7.127 return
\t\tip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff return
\t\ttcp dport 15008 return
\t\tmeta l4proto tcp redirect to :15006
\t}

\tchain mark-own-connections {
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tct state new meta mark & 0x00000fff == 0x00000539 ct mark set ct mark & 0xfffff111 | 0x00000111
\t}

\tchain route-replies-home {
\t\ttype route hook output priority mangle; policy accept;
\t\tct mark & 0x00000fff == 0x00000111 meta mark set meta mark & 0xfffff111 | 0x00000111
\t}
}";

    #[test]
    fn the_listing_of_installed_rules_is_recognised_and_a_partial_one_is_not() {
        assert!(ruleset_is_complete(LISTED));
        let without_mark = LISTED.replace("meta mark 0x00000539 return", "");
        assert!(!ruleset_is_complete(&without_mark));
        let without_inbound = LISTED.replace("redirect to :15006", "");
        assert!(!ruleset_is_complete(&without_inbound));
        // What an agent from before original-source preservation installed.
        let before_original_source = LISTED
            .split("\tchain mark-own-connections")
            .next()
            .expect("listing");
        assert!(!ruleset_is_complete(before_original_source));
    }

    #[test]
    fn the_applications_replies_to_the_data_planes_own_connections_are_marked_home() {
        let rules = pod_ruleset();
        let marking = rules
            .split("chain mark-own-connections")
            .nth(1)
            .expect("connection marking chain");
        assert!(marking.contains("hook prerouting"));
        // Only a connection's first packet: a packet of ours that joined another connection
        // (a port clash with a client's redirected one) must not mark that connection.
        assert!(marking.contains(
            "ct state new meta mark & 0xfff == 0x539 ct mark set ct mark & 0xfffff000 | 0x111"
        ));
        let restoring = rules
            .split("chain route-replies-home")
            .nth(1)
            .expect("mark restoring chain");
        // A route chain: changing the mark there makes the kernel route the packet again.
        assert!(restoring.contains("type route hook output"));
        assert!(restoring
            .contains("ct mark & 0xfff == 0x111 meta mark set meta mark & 0xfffff000 | 0x111"));
        assert_eq!(DATAPLANE_MARK & MARK_MASK, DATAPLANE_MARK);
        assert_eq!(ORIGINAL_SOURCE_MARK & MARK_MASK, ORIGINAL_SOURCE_MARK);
    }

    #[test]
    fn ruleset_exempts_the_mark_and_hbone_and_captures_both_directions() {
        let rules = pod_ruleset();
        let output = rules.split("chain output").nth(1).expect("output chain");
        let mark_at = output
            .find("meta mark 0x539 return")
            .expect("mark exemption");
        let redirect_at = output.find("redirect to :15001").expect("outbound capture");
        assert!(mark_at < redirect_at, "exemption must come before capture");
        let prerouting = rules.split("chain prerouting").nth(1).expect("prerouting");
        let hbone_at = prerouting.find("tcp dport 15008 return").expect("hbone");
        let inbound_at = prerouting.find("redirect to :15006").expect("inbound");
        assert!(hbone_at < inbound_at);
    }

    #[test]
    fn kubelet_probes_and_their_replies_bypass_the_capture_in_both_families() {
        let rules = pod_ruleset();
        let prerouting = rules.split("chain prerouting").nth(1).expect("prerouting");
        let inbound_at = prerouting.find("redirect to :15006").expect("inbound");
        for exemption in [
            "ip saddr 169.254.7.127 return",
            "ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff return",
        ] {
            let at = prerouting.find(exemption).expect(exemption);
            assert!(at < inbound_at, "{exemption} must come before the capture");
        }
        let output = rules
            .split("chain output")
            .nth(1)
            .and_then(|o| o.split("chain prerouting").next())
            .expect("output chain");
        let outbound_at = output.find("redirect to :15001").expect("outbound");
        for exemption in [
            "ip daddr 169.254.7.127 return",
            "ip6 daddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff return",
        ] {
            let at = output.find(exemption).expect(exemption);
            assert!(at < outbound_at, "{exemption} must come before the capture");
        }
    }
}
