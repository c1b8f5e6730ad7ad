//! The nftables ruleset that captures a pod's TCP into the data plane, rendered as text for
//! `nft -f -` inside the pod's network namespace.
//!
//! Outbound TCP goes to 15001 and inbound TCP to 15006, except HBONE (15008), loopback, and
//! packets carrying the data plane's mark (its own sockets, which would otherwise loop).

use crate::{ports, DATAPLANE_MARK};

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
    meta l4proto tcp redirect to :{outbound}
  }}
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    iifname \"lo\" return
    tcp dport {hbone} return
    meta l4proto tcp redirect to :{inbound}
  }}
}}
",
        mark = DATAPLANE_MARK,
        outbound = ports::OUTBOUND,
        hbone = ports::HBONE,
        inbound = ports::INBOUND_PLAINTEXT,
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
\t\tmeta l4proto tcp redirect to :15001
\t}

\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname \"lo\" return
\t\ttcp dport 15008 return
\t\tmeta l4proto tcp redirect to :15006
\t}
}";

    #[test]
    fn the_listing_of_installed_rules_is_recognised_and_a_partial_one_is_not() {
        assert!(ruleset_is_complete(LISTED));
        let without_mark = LISTED.replace("meta mark 0x00000539 return", "");
        assert!(!ruleset_is_complete(&without_mark));
        let without_inbound = LISTED.replace("redirect to :15006", "");
        assert!(!ruleset_is_complete(&without_inbound));
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
}
