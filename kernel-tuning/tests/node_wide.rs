//! Node-wide settings (sysctls outside `net.*`, module parameters) seen from a network
//! namespace other than the host's: a pod's or a lab's namespace can write
//! `kernel.io_uring_disabled`, but that changes the whole node, so `apply` leaves such settings
//! alone there unless given `--node-wide`. On scratch trees (`--root`): the host's
//! `/proc/sys/net/core` has `netdev_max_backlog`, any other namespace's lacks it.

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
