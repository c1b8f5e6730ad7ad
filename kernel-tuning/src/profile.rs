//! Profiles: the kernel settings (sysctls, and a module parameter) a node running the data
//! plane wants, each with the reason, so an SRE can read what a profile changes before applying
//! it.

use serde::Serialize;

use crate::sysfs::{normalize, Root};

#[derive(Debug, Clone, Serialize)]
pub struct Setting {
    /// A dotted sysctl name, or the absolute path of a module parameter (see `sysfs`).
    pub key: &'static str,
    pub value: &'static str,
    /// Limits and sizes: a node that already has more keeps it (compared field by field).
    pub at_least: bool,
    pub why: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub name: &'static str,
    pub summary: &'static str,
    pub settings: Vec<Setting>,
}

const THROUGHPUT: &[Setting] = &[
    Setting {
        key: "net.core.somaxconn",
        value: "8192",
        at_least: true,
        why: "caps every listen() backlog: bursts of new connections to 15001/15006/15008 queue here instead of being dropped",
    },
    Setting {
        key: "net.ipv4.tcp_max_syn_backlog",
        value: "8192",
        at_least: true,
        why: "half-open connections each listener may hold during a burst",
    },
    Setting {
        key: "net.ipv4.ip_local_port_range",
        value: "1024 65535",
        at_least: false,
        why: "the data plane dials one upstream per proxied connection from the pod's address; a wide range postpones port exhaustion at high connection rates",
    },
    Setting {
        key: "net.ipv4.tcp_tw_reuse",
        value: "1",
        at_least: false,
        why: "new outbound connections may reuse ports in TIME_WAIT (safe with TCP timestamps), which connection churn otherwise exhausts",
    },
    Setting {
        key: "net.core.rmem_max",
        value: "16777216",
        at_least: true,
        why: "lets receive buffers autotune up to 16 MiB, enough for one multi-gigabit stream through a tunnel",
    },
    Setting {
        key: "net.core.wmem_max",
        value: "16777216",
        at_least: true,
        why: "the same for send buffers",
    },
    Setting {
        key: "net.ipv4.tcp_rmem",
        value: "4096 131072 16777216",
        at_least: true,
        why: "autotuning range for receive buffers (min, default, max)",
    },
    Setting {
        key: "net.ipv4.tcp_wmem",
        value: "4096 65536 16777216",
        at_least: true,
        why: "autotuning range for send buffers",
    },
    Setting {
        key: "net.ipv4.tcp_slow_start_after_idle",
        value: "0",
        at_least: false,
        why: "pooled HBONE tunnels idle between bursts; restarting slow start on every burst throttles them",
    },
    Setting {
        key: "net.netfilter.nf_conntrack_max",
        value: "1048576",
        at_least: true,
        why: "every captured connection (REDIRECT to 15001/15006) has a conntrack entry; a full table drops new SYNs",
    },
    Setting {
        key: "kernel.io_uring_disabled",
        value: "0",
        at_least: false,
        why: "the data plane's io_uring driver; 1 or 2 puts it on the slower epoll fallback",
    },
];

/// How long an idle vCPU of a KVM guest with the haltpoll idle driver polls before it halts.
pub const GUEST_HALT_POLL: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";

/// What the latency profile sets it to, in nanoseconds.
pub const GUEST_HALT_POLL_NS: &str = "1000000";

const LATENCY_EXTRA: &[Setting] = &[
    Setting {
        key: "net.core.busy_poll",
        value: "50",
        at_least: false,
        why: "poll()/epoll spin up to 50 us on the device queue before sleeping: fewer wakeups, more CPU",
    },
    Setting {
        key: "net.core.busy_read",
        value: "50",
        at_least: false,
        why: "the same for blocking reads",
    },
    Setting {
        key: GUEST_HALT_POLL,
        value: GUEST_HALT_POLL_NS,
        at_least: true,
        why: "KVM guests with the cpuidle-haltpoll driver (many cloud nodes): an idle vCPU polls up to 1 ms before it halts, so a thread woken soon after (a worker, an app) runs without a trip through the host. A proxied request wakes more threads than a direct one, and 1 ms covers the gap between requests at 1000/s: in the lab, 1 KiB at 1000/s p50 x0.58-0.60 and new connections/s x1.3-1.5 (bench-results/README.md). The window adapts: a vCPU that stays idle longer than 1 ms polls less and less, so an idle node halts as before. The polling is host CPU, not the node's processes",
    },
];

/// Every built-in profile.
pub fn all() -> Vec<Profile> {
    vec![
        Profile {
            name: "throughput",
            summary: "bulk streams and high connection rates: backlogs, port range, buffers, conntrack, io_uring",
            settings: THROUGHPUT.to_vec(),
        },
        Profile {
            name: "latency",
            summary: "the throughput profile plus busy polling and, on virtual machines, guest halt polling: lower wakeup latency for more CPU",
            settings: THROUGHPUT.iter().chain(LATENCY_EXTRA).cloned().collect(),
        },
    ]
}

pub fn find(name: &str) -> Option<Profile> {
    all().into_iter().find(|p| p.name == name)
}

/// How one setting of a profile compares with the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Status {
    /// Already what the profile wants.
    Same,
    /// Differs: applying changes it.
    Change,
    /// Not present here (kernel without it, a module not loaded, or not namespaced and read in
    /// a netns): skipped.
    Missing,
    /// Present but read-only here (a host-wide setting seen from a network namespace):
    /// skipped; apply it on the host.
    ReadOnly,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub key: &'static str,
    pub current: Option<String>,
    pub wanted: &'static str,
    /// What applying writes: the wanted value, or for `at_least` settings the larger of
    /// current and wanted in each field.
    pub target: String,
    pub why: &'static str,
    pub status: Status,
}

/// The profile against the node under `root`.
pub fn compare(profile: &Profile, root: &Root) -> Vec<Comparison> {
    profile
        .settings
        .iter()
        .map(|s| {
            let current = root.read_setting(s.key);
            let target = match &current {
                Some(c) if s.at_least => field_max(c, s.value),
                _ => normalize(s.value),
            };
            let writable = std::fs::metadata(root.setting_path(s.key)).is_ok_and(|m| {
                std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o200 != 0
            });
            let status = match &current {
                None => Status::Missing,
                Some(c) if *c == target => Status::Same,
                Some(_) if !writable => Status::ReadOnly,
                Some(_) => Status::Change,
            };
            Comparison {
                key: s.key,
                current,
                wanted: s.value,
                target,
                why: s.why,
                status,
            }
        })
        .collect()
}

/// The larger of two whitespace-separated numeric values, field by field; `wanted` if they do
/// not line up.
fn field_max(current: &str, wanted: &str) -> String {
    let c: Vec<Option<u64>> = current.split_whitespace().map(|f| f.parse().ok()).collect();
    let w: Vec<Option<u64>> = wanted.split_whitespace().map(|f| f.parse().ok()).collect();
    if c.len() != w.len() || c.iter().chain(&w).any(Option::is_none) {
        return normalize(wanted);
    }
    c.iter()
        .zip(&w)
        .map(|(a, b)| a.unwrap_or(0).max(b.unwrap_or(0)).to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_raised_never_lowered() {
        assert_eq!(
            field_max("4096 131072 33554432", "4096 131072 16777216"),
            "4096 131072 33554432"
        );
        assert_eq!(
            field_max("4096 16384 4194304", "4096 65536 16777216"),
            "4096 65536 16777216"
        );
        let dir = std::env::temp_dir().join(format!("meshtune-profile-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("proc/sys/net/ipv4")).expect("dir");
        std::fs::create_dir_all(dir.join("proc/sys/net/core")).expect("dir");
        std::fs::write(
            dir.join("proc/sys/net/ipv4/tcp_rmem"),
            "4096\t131072\t33554432\n",
        )
        .expect("w");
        std::fs::write(dir.join("proc/sys/net/core/somaxconn"), "4096\n").expect("w");
        let compared = compare(&find("throughput").expect("profile"), &Root::new(&dir));
        let get = |key: &str| compared.iter().find(|c| c.key == key).expect("key").clone();
        assert_eq!(get("net.ipv4.tcp_rmem").status, Status::Same);
        assert_eq!(get("net.core.somaxconn").status, Status::Change);
        assert_eq!(get("net.core.somaxconn").target, "8192");
        // Not on this (scratch) node: skipped, not failed.
        assert_eq!(get("net.ipv4.tcp_tw_reuse").status, Status::Missing);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_module_parameter_is_compared_and_applied_like_a_sysctl() {
        let dir = std::env::temp_dir().join(format!("meshtune-module-{}", std::process::id()));
        let file = dir.join(GUEST_HALT_POLL.trim_start_matches('/'));
        std::fs::create_dir_all(file.parent().expect("parent")).expect("dir");
        let root = Root::new(&dir);
        let latency = find("latency").expect("profile");
        let halt_poll = |root: &Root| {
            compare(&latency, root)
                .into_iter()
                .find(|c| c.key == GUEST_HALT_POLL)
                .expect("the latency profile sets guest halt polling")
        };
        // Not a KVM guest with the haltpoll driver: nothing to set.
        assert_eq!(halt_poll(&root).status, Status::Missing);
        std::fs::write(&file, "0\n").expect("w");
        let wanted = halt_poll(&root);
        assert_eq!(
            (wanted.status, wanted.target.as_str()),
            (Status::Change, GUEST_HALT_POLL_NS)
        );
        // A node that already polls longer keeps it.
        std::fs::write(&file, "2000000\n").expect("w");
        assert_eq!(halt_poll(&root).status, Status::Same);
        // Applied and reverted through the same path as sysctls.
        std::fs::write(&file, "0\n").expect("w");
        let writes = [crate::state::Write {
            path: crate::sysfs::setting_file(GUEST_HALT_POLL),
            value: wanted.target,
        }];
        let state = dir.join("state.json");
        crate::state::apply(&root, "latency", &writes, &state).expect("apply");
        assert_eq!(
            root.read_setting(GUEST_HALT_POLL).as_deref(),
            Some(GUEST_HALT_POLL_NS)
        );
        crate::state::revert(&root, &state).expect("revert");
        assert_eq!(std::fs::read_to_string(&file).expect("r"), "0\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
