//! `meshtune apply` and `revert` on a real network namespace's sysctls (the namespaced ones:
//! backlogs, port range, buffers), the way an SRE runs them: the host's values must not move
//! (node-wide settings such as `kernel.io_uring_disabled` are skipped there), and revert must
//! leave the namespace exactly as it was. Needs root (CI is root).

use std::process::{Command, Output};

struct Netns(String);

impl Netns {
    fn new() -> Netns {
        assert!(
            running_as_root(),
            "this test creates a network namespace and must run as root"
        );
        let name = format!("meshtune-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add");
        assert!(status.success());
        Netns(name)
    }

    /// `meshtune <args>` inside the namespace.
    fn meshtune(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0, env!("CARGO_BIN_EXE_meshtune")])
            .args(args)
            .output()
            .expect("run meshtune")
    }

    fn sysctls(&self, keys: &[&str]) -> Vec<String> {
        keys.iter()
            .map(|k| {
                let out = Command::new("ip")
                    .args(["netns", "exec", &self.0, "cat"])
                    .arg(format!("/proc/sys/{}", k.replace('.', "/")))
                    .output()
                    .expect("cat");
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn host(keys: &[&str]) -> Vec<String> {
    keys.iter()
        .map(|k| {
            std::fs::read_to_string(format!("/proc/sys/{}", k.replace('.', "/")))
                .unwrap_or_default()
        })
        .collect()
}

const KEYS: &[&str] = &[
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_wmem",
    "net.ipv4.tcp_slow_start_after_idle",
];

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn apply_changes_only_the_namespace_and_revert_restores_it_exactly() {
    let ns = Netns::new();
    let dir = std::env::temp_dir().join(format!("meshtune-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state = dir.join("tuning.json");
    let state_arg = state.to_str().expect("utf-8 path");
    let host_before = host(KEYS);
    let ns_before = ns.sysctls(KEYS);

    // Dry run by default: nothing changes.
    let dry = ns.meshtune(&["apply", "--profile", "throughput", "--state", state_arg]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(text(&dry).contains("dry run"), "{}", text(&dry));
    // kernel.io_uring_disabled is writable from here but is the whole node's: left alone.
    let io_uring = String::from_utf8_lossy(&dry.stdout)
        .lines()
        .find(|l| l.contains("kernel.io_uring_disabled"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        io_uring.starts_with("skip") && io_uring.contains("node-wide"),
        "{}",
        text(&dry)
    );
    assert_eq!(ns.sysctls(KEYS), ns_before);
    assert!(!state.exists());

    let applied = ns.meshtune(&[
        "apply",
        "--profile",
        "throughput",
        "--yes",
        "--state",
        state_arg,
    ]);
    assert!(applied.status.success(), "{}", text(&applied));
    let recorded = std::fs::read_to_string(&state).expect("state file");
    assert!(
        !recorded.contains("proc/sys/kernel"),
        "nothing node-wide changed from the namespace: {recorded}"
    );
    let after = ns.sysctls(KEYS);
    assert_eq!(after[0].trim(), "8192", "somaxconn in the namespace");
    assert_eq!(
        after[2].split_whitespace().collect::<Vec<_>>(),
        ["1024", "65535"]
    );
    assert_eq!(after[5].trim(), "0");
    assert_eq!(
        host(KEYS),
        host_before,
        "the host's own values did not move"
    );

    // The doctor now finds the namespace as the profile wants it.
    let doctor = ns.meshtune(&["doctor", "--profile", "throughput", "--json"]);
    let checks: serde_json::Value = serde_json::from_slice(&doctor.stdout).expect("json");
    let somaxconn = checks
        .as_array()
        .expect("list")
        .iter()
        .find(|c| c["name"] == "net.core.somaxconn (throughput)")
        .expect("somaxconn check");
    assert_eq!(somaxconn["verdict"], "Ok");

    let reverted = ns.meshtune(&["revert", "--yes", "--state", state_arg]);
    assert!(reverted.status.success(), "{}", text(&reverted));
    assert_eq!(
        ns.sysctls(KEYS),
        ns_before,
        "revert restored every value exactly"
    );
    assert!(!state.exists());
    assert_eq!(host(KEYS), host_before);
    let _ = std::fs::remove_dir_all(&dir);
}
