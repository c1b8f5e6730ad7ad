//! Node-wide settings (sysctls outside `net.*`, module parameters, IRQ affinity) seen from a
//! network namespace other than the host's: a pod's or a lab's namespace can write
//! `kernel.io_uring_disabled` or `/proc/irq/N/smp_affinity_list`, but that changes the whole
//! node, so `apply` and `plan --apply` leave them alone there unless given `--node-wide`. On
//! scratch trees (`--root`): the host's `/proc/sys/net/core` has `netdev_max_backlog`, any
//! other namespace's lacks it; `/proc/net/dev` lists the namespace's own devices.

use std::path::Path;
use std::process::Output;

fn meshtune(root: &Path, args: &[&str]) -> Output {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_meshtune"))
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run meshtune");
    assert!(
        output.status.success(),
        "meshtune {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn line<'a>(output: &'a Output, key: &str) -> &'a str {
    std::str::from_utf8(&output.stdout)
        .expect("utf-8")
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(key))
        .unwrap_or_else(|| panic!("no line for {key}"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("read")
}

#[test]
fn node_wide_settings_are_skipped_outside_the_host_namespace_unless_asked_for() {
    let dir = std::env::temp_dir().join(format!("meshtune-node-wide-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("proc/sys/net/core")).expect("dir");
    std::fs::create_dir_all(dir.join("proc/sys/kernel")).expect("dir");
    let io_uring = dir.join("proc/sys/kernel/io_uring_disabled");
    let somaxconn = dir.join("proc/sys/net/core/somaxconn");
    std::fs::write(&io_uring, "2\n").expect("w");
    std::fs::write(&somaxconn, "4096\n").expect("w");
    let state = dir.join("tuning.json");
    let state = state.to_str().expect("utf-8 path");
    let apply = |extra: &[&str]| {
        let mut args = vec![
            "apply",
            "--profile",
            "throughput",
            "--yes",
            "--state",
            state,
        ];
        args.extend(extra);
        meshtune(&dir, &args)
    };
    let revert = || meshtune(&dir, &["revert", "--yes", "--state", state]);

    // A namespace (no netdev_max_backlog): the namespace's own somaxconn changes, the node's
    // io_uring setting does not, and the output says why.
    let applied = apply(&[]);
    let skipped = line(&applied, "kernel.io_uring_disabled");
    assert!(
        skipped.starts_with("skip") && skipped.contains("node-wide"),
        "{skipped}"
    );
    assert_eq!(read(&io_uring), "2\n");
    assert_eq!(read(&somaxconn), "8192\n");
    revert();
    assert_eq!(read(&somaxconn), "4096\n");

    // Asked for: set, and reverted exactly.
    apply(&["--node-wide"]);
    assert_eq!(read(&io_uring), "0\n");
    revert();
    assert_eq!(read(&io_uring), "2\n");

    // The host's namespace: node-wide settings are what it is for.
    std::fs::write(dir.join("proc/sys/net/core/netdev_max_backlog"), "1000\n").expect("w");
    let applied = apply(&[]);
    assert!(
        line(&applied, "kernel.io_uring_disabled").starts_with("set"),
        "{}",
        line(&applied, "kernel.io_uring_disabled")
    );
    assert_eq!(read(&io_uring), "0\n");
    revert();
    assert_eq!(read(&io_uring), "2\n");
    let _ = std::fs::remove_dir_all(&dir);
}

fn write(path: &Path, contents: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
    std::fs::write(path, contents).expect("write");
}

/// `/proc/net/dev` listing `devices`.
fn net_dev(dir: &Path, devices: &[&str]) {
    let mut listed = String::from("Inter-|   Receive\n face |bytes    packets\n");
    for d in devices {
        listed.push_str(&format!("{d:>6}: 0 0\n"));
    }
    write(&dir.join("proc/net/dev"), &listed);
}

/// Four cores and a NIC, eth0, with two queues each way and MSI interrupt 41, seen from a
/// network namespace that has eth0 (its /proc/net/dev lists it).
fn machine(dir: &Path) {
    write(&dir.join("sys/devices/system/cpu/online"), "0-3\n");
    for id in 0..4 {
        let cpu = dir.join(format!("sys/devices/system/cpu/cpu{id}"));
        write(&cpu.join("topology/core_id"), &format!("{id}\n"));
        write(&cpu.join("topology/physical_package_id"), "0\n");
        std::fs::create_dir_all(cpu.join("node0")).expect("dir");
    }
    std::fs::create_dir_all(dir.join("sys/class/net/lo")).expect("dir");
    let eth0 = dir.join("sys/class/net/eth0");
    write(&eth0.join("device/numa_node"), "-1\n");
    write(&eth0.join("device/msi_irqs/41"), "msix\n");
    for q in 0..2 {
        write(&eth0.join(format!("queues/rx-{q}/rps_cpus")), "0\n");
        write(&eth0.join(format!("queues/tx-{q}/xps_cpus")), "0\n");
    }
    write(&dir.join("proc/irq/41/smp_affinity_list"), "0-3\n");
    std::fs::create_dir_all(dir.join("proc/sys/net/core")).expect("dir");
    net_dev(dir, &["lo", "eth0"]);
}

#[test]
fn plan_leaves_irq_affinity_alone_outside_the_host_namespace_unless_asked_for() {
    let dir = std::env::temp_dir().join(format!("meshtune-plan-netns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    machine(&dir);
    let irq = dir.join("proc/irq/41/smp_affinity_list");
    let rps = dir.join("sys/class/net/eth0/queues/rx-0/rps_cpus");
    let xps = dir.join("sys/class/net/eth0/queues/tx-1/xps_cpus");
    let state = dir.join("plan.json");
    let state = state.to_str().expect("utf-8 path");
    let plan = |extra: &[&str]| {
        let mut args = vec!["plan", "--apply", "--yes", "--state", state];
        args.extend(extra);
        meshtune(&dir, &args)
    };
    let revert = || meshtune(&dir, &["revert", "--yes", "--state", state]);
    let irq_line = "proc/irq/41/smp_affinity_list";
    let rps_line = "sys/class/net/eth0/queues/rx-0/rps_cpus";

    // A namespace with eth0 of its own: its queues are set, the node's interrupt is not, and
    // the output says why.
    let applied = plan(&[]);
    let skipped = line(&applied, irq_line);
    assert!(
        skipped.starts_with("skip:") && skipped.contains("node-wide"),
        "{skipped}"
    );
    assert!(line(&applied, rps_line).starts_with("write:"));
    assert_eq!(read(&irq), "0-3\n");
    assert_eq!(read(&rps), "e\n");
    assert_eq!(read(&xps), "4\n");
    assert!(!read(Path::new(state)).contains("proc/irq"));
    revert();
    assert_eq!((read(&rps), read(&xps)), ("0\n".into(), "0\n".into()));

    // `--json` names the skipped write too.
    let json = meshtune(&dir, &["plan", "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(shown["skipped"][0]["path"], irq_line, "{shown}");
    assert_eq!(shown["skipped"][0]["reach"], "Node", "{shown}");

    // Asked for: the interrupt is routed to the housekeeping core, and reverted exactly.
    let applied = plan(&["--node-wide"]);
    assert!(line(&applied, irq_line).starts_with("write:"));
    assert_eq!(read(&irq), "0\n");
    revert();
    assert_eq!(read(&irq), "0-3\n");

    // /sys shows devices this namespace does not have (another namespace's /sys): eth0 is
    // not this namespace's, so its queues are left alone too.
    net_dev(&dir, &["lo"]);
    let applied = plan(&[]);
    let skipped = line(&applied, rps_line);
    assert!(
        skipped.starts_with("skip:") && skipped.contains("another network namespace"),
        "{skipped}"
    );
    assert_eq!((read(&irq), read(&rps)), ("0-3\n".into(), "0\n".into()));
    revert();
    plan(&["--node-wide"]);
    assert_eq!((read(&irq), read(&rps)), ("0\n".into(), "e\n".into()));
    revert();
    assert_eq!((read(&irq), read(&rps)), ("0-3\n".into(), "0\n".into()));

    // The host's namespace: routing the node's interrupts is what it is for.
    write(&dir.join("proc/sys/net/core/netdev_max_backlog"), "1000\n");
    let applied = plan(&[]);
    assert!(line(&applied, irq_line).starts_with("write:"));
    assert_eq!((read(&irq), read(&rps)), ("0\n".into(), "e\n".into()));
    revert();
    assert_eq!((read(&irq), read(&rps)), ("0-3\n".into(), "0\n".into()));
    let _ = std::fs::remove_dir_all(&dir);
}
