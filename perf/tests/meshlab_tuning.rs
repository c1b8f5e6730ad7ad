//! A kernel-tuning profile in the lab: `meshlab tuning latency` (the profile against none,
//! rounds alternating) and `meshlab --tuning latency` (a whole run tuned). The latency profile
//! has node-wide settings (module parameters such as guest halt polling, sysctls a network
//! namespace cannot set); the lab applies those on this machine, so each run must leave every
//! one of them as it found it: through its revert, and through its teardown when it never
//! reverts. Needs root, as CI is; fails without it. Its own test binary, with one lab in it,
//! so no other lab changes the same settings meanwhile.

mod common;

use std::path::PathBuf;
use std::process::Command;

use kernel_tuning::profile::{self, Status};
use kernel_tuning::sysfs::{is_node_wide_file, setting_file, Root};

/// Every setting of the profile as this machine has it now: (file, contents).
fn node_settings(profile: &str) -> Vec<(PathBuf, Option<String>)> {
    let profile = profile::find(profile).expect("profile");
    let root = Root::default();
    profile
        .settings
        .iter()
        .map(|s| (setting_file(s.key), root.read_setting(s.key)))
        .collect()
}

/// The node-wide settings of the profile this machine has and would change.
fn would_change_here(profile: &str) -> Vec<String> {
    let profile = profile::find(profile).expect("profile");
    profile::compare(&profile, &Root::default())
        .into_iter()
        .filter(|c| is_node_wide_file(c.key) && c.status == Status::Change)
        .map(|c| c.key.to_owned())
        .collect()
}

/// The line of `output` that starts with `start`, which must name every one of `changed`.
fn line_naming<'a>(output: &'a str, start: &str, changed: &[String]) -> &'a str {
    let line = output
        .lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("no line {start:?}:\n{output}"));
    for key in changed {
        assert!(
            line.contains(key.as_str()),
            "{key} not reported changed: {line}"
        );
    }
    line
}

/// `meshlab` with whitespace-separated `args`; its stdout and stderr, after it succeeded.
fn meshlab(args: &str) -> (String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_meshlab"))
        .args(args.split_whitespace())
        .output()
        .expect("run meshlab");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "meshlab {args:?} failed\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

#[test]
fn a_tuned_lab_changes_node_wide_settings_only_while_it_runs() {
    assert!(perf::sys::is_root(), "meshlab needs root (CI runs as root)");
    let before = node_settings("latency");
    // The module parameters this machine has (guest halt polling on a KVM guest) and does
    // not already set as the profile wants: the lab must report each as changed.
    let expected = would_change_here("latency");

    let out = std::env::temp_dir().join(format!("meshlab-tuning-{}", std::process::id()));
    let (stdout, _) = meshlab(&format!(
        "tuning latency --workers 1 --rounds 1 --seconds 0.5 --rr-seconds 0.5 \
         --conn-seconds 0.5 --hold 0 --out {}",
        out.display()
    ));
    line_naming(
        &stdout,
        "meshlab A/B: kernel-tuning profile latency",
        &expected,
    );
    assert!(
        stdout.contains("1 KiB at 10000/s on 8, p50 us"),
        "no loaded round trip row:\n{stdout}"
    );
    let (_, saved) = common::saved_result(&out);
    for side in ["baseline", "variant"] {
        let p50 = saved[side]["latency_loaded"]["p50_us"].as_f64();
        assert!(p50.is_some_and(|p| p > 0.0), "{side}: {p50:?}");
    }
    let _ = std::fs::remove_dir_all(&out);
    assert_eq!(
        node_settings("latency"),
        before,
        "meshlab tuning left the node changed"
    );

    // A whole run tuned never reverts by itself: its teardown does.
    let (_, stderr) = meshlab(
        "--tuning latency --workers 1 --rounds 1 --seconds 0.5 --rr-seconds 0.5 \
         --conn-seconds 0 --hold 0 --sweep false --no-save",
    );
    line_naming(&stderr, "tuning profile latency: changed", &expected);
    assert_eq!(
        node_settings("latency"),
        before,
        "meshlab --tuning left the node changed"
    );
}

/// A lab killed with SIGKILL never tears down: `meshlab clean` restores what its saved
/// node-wide state says was there. The state here names a scratch file, not a kernel
/// setting, so the test changes nothing on the machine.
#[test]
fn clean_restores_the_node_wide_tuning_a_killed_lab_left() {
    assert!(
        perf::sys::is_root(),
        "meshlab clean needs root (CI runs as root)"
    );
    // A pid above pid_max: no live process has it.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("a number");
    let lab_dir = std::env::temp_dir().join(format!("meshlab-ml{}x0", pid_max + 1));
    let setting = std::env::temp_dir().join(format!("meshlab-clean-{}", std::process::id()));
    std::fs::create_dir_all(&lab_dir).expect("lab dir");
    std::fs::write(&setting, "tuned\n").expect("write");
    let relative = setting.strip_prefix("/").expect("absolute temp dir");
    let state = serde_json::json!({
        "what": "latency",
        "entries": [{ "path": relative, "previous": "as found", "value": "tuned" }],
    });
    std::fs::write(lab_dir.join("tuning-node.json"), state.to_string()).expect("state");

    let (stdout, _) = meshlab("clean");
    assert!(
        stdout.contains("restored the node-wide tuning of"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(&setting).expect("read"),
        "as found\n"
    );
    assert!(
        !lab_dir.join("tuning-node.json").exists(),
        "the state stays after its revert"
    );
    let _ = std::fs::remove_dir_all(&lab_dir);
    let _ = std::fs::remove_file(&setting);
}
