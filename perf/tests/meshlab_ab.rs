//! `meshlab ab`, the tool behind every same-run before/after ratio in bench-results: both
//! sides (here the same build, the variant with an extra flag) measured in alternating rounds
//! in real network namespaces, saved as JSON with the table a perf engineer reads. Needs root,
//! as CI is; fails without it. Its own test binary, so no other lab runs beside it.

mod common;

use std::process::Command;

use serde_json::Value;

fn number(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |cur, key| &cur[*key])
        .as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in the result"))
}

#[test]
fn an_ab_run_measures_both_sides_including_a_request_beside_a_bulk_stream() {
    assert!(perf::sys::is_root(), "meshlab needs root (CI runs as root)");
    let out = std::env::temp_dir().join(format!("meshlab-ab-{}", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_meshlab"))
        .args(["ab", "--variant-arg=--no-access-log", "--workers", "1"])
        .args(["--rounds", "1", "--seconds", "0.5", "--rr-seconds", "0.5"])
        .args(["--conn-seconds", "0.5", "--hold", "100", "--out"])
        .arg(&out)
        .output()
        .expect("run meshlab ab");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "meshlab ab failed\n{stdout}\n{stderr}"
    );
    for row in [
        "one stream, Gbit/s",
        "1 KiB at 1000/s, p99 us",
        "1 KiB at 10000/s on 8, p99 us",
        "data-plane sleeps per request at 1000/s",
        "same beside a bulk stream, p99 us",
        "that bulk stream, Gbit/s",
        "KiB per held connection",
    ] {
        assert!(stdout.contains(row), "no {row:?} row:\n{stdout}");
    }
    let variant = stdout
        .lines()
        .find(|l| l.starts_with("variant:"))
        .expect("variant line");
    assert!(variant.ends_with("dataplane --no-access-log"), "{variant}");

    let (_, r) = common::saved_result(&out);
    assert_eq!(number(&r, &["rounds"]), 1.0);
    assert_eq!(number(&r, &["workers_per_node"]), 1.0);
    for side in ["baseline", "variant"] {
        assert!(
            number(&r, &[side, "throughput", "gbit_per_s"]) > 0.0,
            "{side}"
        );
        assert!(
            number(&r, &[side, "bulk_beside_gbit_per_s"]) > 0.0,
            "{side}"
        );
        assert!(
            number(&r, &[side, "latency_loaded", "p50_us"]) > 0.0,
            "{side}"
        );
        // A millisecond apart, each request finds both data planes asleep at least once.
        let sleeps = number(&r, &[side, "sleeps_per_request"]);
        assert!(sleeps >= 1.0, "{side}: {sleeps} sleeps per request");
        let beside = |p: &str| number(&r, &[side, "latency_beside_bulk", p]);
        assert!(
            beside("p50_us") > 0.0 && beside("p50_us") <= beside("p99_us"),
            "{side}"
        );
        assert!(number(&r, &[side, "connections_per_s"]) > 0.0, "{side}");
        // 100 held connections move RSS by a few pages only: present, not necessarily > 0.
        assert!(
            number(&r, &[side, "kib_per_held_connection"]).is_finite(),
            "{side}"
        );
        assert!(number(&r, &[side, "idle_rss_mb"]) > 0.0, "{side}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
