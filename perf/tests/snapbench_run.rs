//! `snapbench` on a small cluster: the real publisher, region, the data plane's watcher, index
//! and per-worker views on workers carrying traffic, and a result file a reader can check.

mod common;

use std::process::Command;

#[test]
fn snapbench_measures_every_size_and_saves_the_result() {
    let out = std::env::temp_dir().join(format!("snapbench-run-{}", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_snapbench"))
        .args(["--sizes", "300,3000", "--changes", "5", "--dir"])
        .arg(std::env::temp_dir())
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run snapbench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (json, r) = common::saved_result(&out);
    let sizes = r["sizes"].as_array().expect("sizes");
    assert_eq!(sizes.len(), 2);
    for (s, workloads) in sizes.iter().zip([300u64, 3000]) {
        let n = |k: &str| s[k].as_f64().unwrap_or_else(|| panic!("{k} missing"));
        assert_eq!(s["workloads"].as_u64(), Some(workloads));
        assert_eq!(s["services"].as_u64(), Some(workloads / 10));
        assert_eq!(s["policies"].as_u64(), Some(workloads / 100));
        // Steady state: one slot holds the base, as is at these sizes (the other's pages
        // were released), and the header and a record or two; a compaction briefly holds
        // both.
        assert_eq!(s["base_stored"].as_str(), Some("as is"), "{s}");
        assert!(n("region_bytes") >= n("encoded_bytes"), "{s}");
        assert!(n("region_bytes") < n("encoded_bytes") + 16384.0, "{s}");
        assert!(n("region_peak_bytes") > n("region_bytes"), "{s}");
        // Both ways of storing a base, written, read, and read and indexed.
        for stored in ["", "_as_is"] {
            for part in ["base_write", "base_read", "base_read_build"] {
                assert!(
                    n(&format!("{part}{stored}_ms")) > 0.0,
                    "{part}{stored}: {s}"
                );
            }
        }
        assert!(n("adopt_full_ms") > 0.0, "{s}");
        // A first adopt builds its index in memory the data plane had not touched before,
        // and the report says what a page fault costs here, to weigh those faults by.
        assert!(n("adopt_full_page_faults") > 0.0, "{s}");
        assert!(n("page_fault_us") > 0.0, "{s}");
        assert_eq!(
            s["adopt_replace_page_faults"].as_array().map(Vec::len),
            s["adopt_replace_samples_ms"].as_array().map(Vec::len),
            "{s}"
        );
        // A resync of the world held is compared with the index, every one of them; a world
        // in which every pod changed, as many times, is built, except where all its pods are
        // fewer than a comparison takes (1,024).
        let resyncs = s["adopt_replace_samples_ms"].as_array().map_or(0, Vec::len);
        assert!(resyncs >= 1, "{s}");
        assert_eq!(
            s["adopt_replace_compared"].as_u64(),
            Some(resyncs as u64),
            "{s}"
        );
        assert_eq!(
            s["adopt_rebuild_samples_ms"].as_array().map(Vec::len),
            Some(resyncs),
            "{s}"
        );
        assert_eq!(
            s["adopt_rebuild_page_faults"].as_array().map(Vec::len),
            Some(resyncs),
            "{s}"
        );
        assert!(n("adopt_rebuild_ms") > 0.0, "{s}");
        let compared_rebuilds = if workloads <= 1024 { resyncs } else { 0 };
        assert_eq!(
            s["adopt_rebuild_compared"].as_u64(),
            Some(compared_rebuilds as u64),
            "{s}"
        );
        assert_eq!(s["one_pod_change_samples"].as_u64(), Some(5));
        assert!(n("one_pod_publish_p50_us") > 0.0);
        assert!(n("one_pod_change_p50_ms") > 0.0);
        assert!(n("one_pod_change_p50_ms") <= n("one_pod_change_p99_ms"));
        // The first worker holds a change no later than the last.
        assert!(n("one_pod_change_first_worker_p50_ms") > 0.0, "{s}");
        assert!(
            n("one_pod_change_first_worker_p50_ms") <= n("one_pod_change_p50_ms"),
            "{s}"
        );
        assert!(
            n("one_pod_change_first_worker_p99_ms") <= n("one_pod_change_p99_ms"),
            "{s}"
        );
        assert!(n("change_after_compaction_ms") > 0.0);
        assert!(n("changes_after_replace_max_ms") > 0.0, "{s}");
        assert!(n("compact_ms") > 0.0 && n("file_source_diff_ms") > 0.0);
        assert!(
            n("route_by_ip_ns") > 0.0 && n("route_by_vip_ns") > 0.0,
            "{s}"
        );
        assert!(n("hashmap_lookup_ns") > 0.0, "{s}");
        // The workers carried traffic while they adopted.
        assert!(n("worker_round_trips") > 0.0, "{s}");
    }
    assert!(json.with_extension("svg").is_file());
    assert!(stdout.contains("workloads"), "{stdout}");
    let _ = std::fs::remove_dir_all(&out);
}
