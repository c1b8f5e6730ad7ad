//! `meshtune apply` and `revert` on a real network namespace's sysctls (the namespaced ones:
//! backlogs, port range, buffers), the way an SRE runs them: the host's values must not move
//! (node-wide settings such as `kernel.io_uring_disabled` are skipped there), and revert must
//! leave the namespace exactly as it was. And `plan --apply` from a real namespace: it must
//! leave IRQ affinity, which is the whole node's, alone unless given `--node-wide`. Needs root
//! (CI is root).

use std::path::Path;
use std::process::{Command, Output};

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        assert!(
            running_as_root(),
            "this test creates a network namespace and must run as root"
        );
        let name = format!("meshtune-{tag}-{}", std::process::id());
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
        self.run(env!("CARGO_BIN_EXE_meshtune"), args)
    }

    /// `<program> <args>` inside the namespace.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .output()
            .expect("ip netns exec")
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
    let ns = Netns::new("apply");
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

fn write(path: &Path, contents: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
    std::fs::write(path, contents).expect("write");
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn line<'a>(output: &'a Output, path: &str) -> &'a str {
    std::str::from_utf8(&output.stdout)
        .expect("utf-8")
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(path))
        .unwrap_or_else(|| panic!("no line for {path}: {}", text(output)))
}

#[test]
fn plan_in_a_network_namespace_leaves_irq_affinity_alone_unless_node_wide() {
    let ns = Netns::new("plan");
    // Which namespace meshtune runs in, and which devices it has, are real: the root's
    // /proc/sys, /proc/net and the /proc/<pid>/ns links are the kernel's, seen by meshtune.
    // What it would write is not: this VM's NIC has no interrupts to route, and the test must
    // not reroute a real one, so the NIC (named like a device of the namespace), its queues and
    // its interrupt are files in the scratch tree.
    let dir = std::env::temp_dir().join(format!("meshtune-plan-ns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("proc")).expect("dir");
    for link in ["sys", "net", "self", "1"] {
        std::os::unix::fs::symlink(Path::new("/proc").join(link), dir.join("proc").join(link))
            .expect("symlink");
    }
    let device = "mtplan0";
    let added = ns.run(
        "ip",
        &[
            "link", "add", device, "type", "veth", "peer", "name", "mtplan1",
        ],
    );
    assert!(added.status.success(), "{}", text(&added));
    write(&dir.join("sys/devices/system/cpu/online"), "0-3\n");
    for id in 0..4 {
        let cpu = dir.join(format!("sys/devices/system/cpu/cpu{id}"));
        write(&cpu.join("topology/core_id"), &format!("{id}\n"));
        write(&cpu.join("topology/physical_package_id"), "0\n");
    }
    std::fs::create_dir_all(dir.join("sys/class/net/lo")).expect("dir");
    let nic = dir.join("sys/class/net").join(device);
    write(&nic.join("device/msi_irqs/41"), "msix\n");
    write(&nic.join("queues/rx-0/rps_cpus"), "0\n");
    let irq = dir.join("proc/irq/41/smp_affinity_list");
    write(&irq, "0-3\n");
    let rps = nic.join("queues/rx-0/rps_cpus");
    let irq_line = "proc/irq/41/smp_affinity_list";
    let root = dir.to_str().expect("utf-8 path");
    let state = dir.join("plan.json");
    let state = state.to_str().expect("utf-8 path");
    let plan = |extra: &[&str]| {
        let mut args = vec!["--root", root, "plan", "--apply", "--yes", "--state", state];
        args.extend(extra);
        let out = ns.meshtune(&args);
        assert!(out.status.success(), "{}", text(&out));
        out
    };
    let revert = || {
        let out = ns.meshtune(&["--root", root, "revert", "--yes", "--state", state]);
        assert!(out.status.success(), "{}", text(&out));
    };

    let applied = plan(&[]);
    let skipped = line(&applied, irq_line);
    assert!(
        skipped.starts_with("skip:") && skipped.contains("node-wide"),
        "{skipped}"
    );
    assert_eq!(read(&irq), "0-3\n", "the interrupt was not rerouted");
    assert_eq!(
        read(&rps),
        "e\n",
        "the namespace's own device's queue was set"
    );
    revert();
    assert_eq!(read(&rps), "0\n");

    let applied = plan(&["--node-wide"]);
    assert!(line(&applied, irq_line).starts_with("write:"));
    assert_eq!(
        read(&irq),
        "0\n",
        "asked for, the interrupt goes to the housekeeping core"
    );
    revert();
    assert_eq!(read(&irq), "0-3\n");

    // The same plan from the host's namespace routes the interrupt without being asked.
    let host = Command::new(env!("CARGO_BIN_EXE_meshtune"))
        .args(["--root", root, "plan", "--apply", "--yes", "--state", state])
        .output()
        .expect("run meshtune");
    assert!(host.status.success(), "{}", text(&host));
    assert!(line(&host, irq_line).starts_with("write:"));
    assert_eq!(read(&irq), "0\n");
    revert();
    assert_eq!(read(&irq), "0-3\n");
    let _ = std::fs::remove_dir_all(&dir);
}
