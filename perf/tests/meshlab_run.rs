//! The main job end to end: `meshlab` (short durations) brings the lab up in real network
//! namespaces with nftables redirects and both data planes, runs every scenario, and writes
//! what a perf engineer reads: the table, the JSON and a plot per scenario. `meshlab compare`
//! then reads the JSON back. Needs root, as CI is; fails without it.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn meshlab(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshlab"))
        .args(args)
        .output()
        .expect("run meshlab");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn f(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for key in path {
        cur = match key.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[*key],
        };
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in the result"))
}

#[test]
fn the_standard_suite_measures_every_scenario_beside_its_baseline() {
    assert!(perf::sys::is_root(), "meshlab needs root (CI runs as root)");
    let out = std::env::temp_dir().join(format!("meshlab-run-{}", std::process::id()));
    let out_s = out.to_string_lossy().into_owned();
    let (ok, stdout, stderr) = meshlab(&[
        "--rounds",
        "1",
        "--seconds",
        "0.5",
        "--rr-seconds",
        "0.5",
        "--conn-seconds",
        "0.5",
        "--hold",
        "300",
        "--out",
        &out_s,
    ]);
    assert!(ok, "meshlab failed\n{stdout}\n{stderr}");
    // The progress bar names every scenario as it runs.
    for step in [
        "one bulk stream",
        "open loop",
        "new connections",
        "a fresh mTLS handshake each",
        "holding 300 idle connections",
        "worker sweep",
    ] {
        assert!(stderr.contains(step), "no progress for {step:?}:\n{stderr}");
    }
    for row in [
        "one plain TLS 1.3 stream, Gbit/s",
        "sleeps/req, node-1 data plane",
        "new connections/s, fresh handshake each",
        "connect to reply p99, us (fresh)",
    ] {
        assert!(stdout.contains(row), "no {row:?} row:\n{stdout}");
    }

    let (json, r) = common::saved_result(&out);
    assert!(!r["commit"].as_str().unwrap_or("").is_empty());
    assert!(r["machine"]["cores"].as_u64().unwrap_or(0) >= 1);
    assert!(["io_uring", "epoll"].contains(&r["driver"].as_str().unwrap_or("")));

    for side in [
        "direct_throughput",
        "tls_throughput",
        "mesh_throughput",
        "passthrough_throughput",
        "relays_throughput",
    ] {
        assert!(f(&r, &[side, "gbit_per_s"]) > 0.0, "{side}");
    }
    // The floor's stream runs through both relays (their CPU stands in the data planes'
    // place), and the relays' section of the table puts every path side by side.
    for node in ["0", "1"] {
        assert!(f(&r, &["relays_throughput", "cpu", "dataplane_s", node]) > 0.0);
    }
    assert!(
        stdout.contains("two plain TCP relays") && stdout.contains("mesh vs relays"),
        "{stdout}"
    );
    // Passthrough is relayed by node 1's data plane.
    assert!(f(&r, &["passthrough_throughput", "cpu", "dataplane_s", "0"]) > 0.0);
    assert!(r["tls_cipher_suite"]
        .as_str()
        .is_some_and(|s| s.starts_with("TLS13_")));
    // The mesh stream goes through both data planes; the direct one through neither.
    let mesh_dp = f(&r, &["mesh_throughput", "cpu", "dataplane_s", "1"]);
    let direct_dp = f(&r, &["direct_throughput", "cpu", "dataplane_s", "1"]);
    assert!(mesh_dp > direct_dp, "mesh {mesh_dp} vs direct {direct_dp}");

    let rates = r["fixed_rates"].as_array().expect("fixed rates");
    assert_eq!(rates.len(), 3);
    // The third load runs beside a bulk stream between the same pods, on both sides.
    assert_eq!(f(&rates[2], &["beside_bulk"]), 1.0);
    for side in ["0", "1"] {
        assert!(f(&rates[2], &["bulk_gbit_per_s", side]) > 0.0, "{side}");
    }
    assert!(rates[0]["bulk_gbit_per_s"].is_null());
    assert!(
        stdout.contains("beside 1 bulk stream(s)") && stdout.contains("the bulk streams beside"),
        "{stdout}"
    );
    for rate in rates {
        let offered = f(rate, &["offered_rps"]);
        for side in ["direct", "mesh"] {
            assert_eq!(f(rate, &[side, "errors"]), 0.0, "{side} {offered}/s");
            let achieved = f(rate, &[side, "achieved_rps"]);
            assert!(
                (achieved - offered).abs() <= offered * 0.1,
                "{side}: {achieved}/s of {offered}/s"
            );
            let l = |p: &str| f(rate, &[side, "latency", p]);
            assert!(l("p50_us") > 0.0 && l("p50_us") <= l("p99_us") && l("p99_us") <= l("p999_us"));
        }
        // The mesh path runs through node 1's data plane and the direct path does not: it
        // spends CPU there and, between requests, blocks and is woken.
        for figure in ["dataplane_s", "dataplane_sleeps"] {
            let node_1 = |side| f(rate, &[side, "cpu_per_1000_requests", figure, "0"]);
            assert!(node_1("mesh") > node_1("direct"), "{figure} at {offered}/s");
        }
    }
    // The headline load also runs through the relays, which wake for each request as any
    // proxy does; the other loads do not.
    assert_eq!(f(&rates[0], &["relays", "errors"]), 0.0);
    assert!(f(&rates[0], &["relays", "latency", "p50_us"]) > 0.0);
    assert!(
        f(
            &rates[0],
            &["relays", "cpu_per_1000_requests", "dataplane_sleeps", "1"]
        ) > 0.0
    );
    assert!(rates[1]["relays"].is_null() && rates[2]["relays"].is_null());
    // The headline latency is the first fixed rate's.
    assert_eq!(
        f(&r, &["mesh_latency", "p99_us"]),
        f(&r, &["fixed_rates", "0", "mesh", "latency", "p99_us"])
    );

    let conns = r["connection_rates"].as_array().expect("connection rates");
    assert_eq!(conns.len(), 2);
    for c in conns {
        assert_eq!(f(c, &["failures"]), 0.0);
        assert!(f(c, &["mesh_per_s"]) > 0.0 && f(c, &["direct_per_s"]) > 0.0);
        assert!(f(c, &["relays_per_s"]) > 0.0);
    }
    // Every mesh connection of the fresh-handshake scenario dialled a tunnel of its own.
    let fresh = &r["fresh_handshake_rate"];
    assert_eq!(f(fresh, &["failures"]), 0.0);
    assert!(f(fresh, &["mesh_per_s"]) > 0.0 && f(fresh, &["direct_per_s"]) > 0.0);
    assert_eq!(f(fresh, &["handshakes_per_connection"]), 1.0);
    assert_eq!(f(&r, &["memory", "held_connections"]), 300.0);
    for node in 0..2 {
        let n = node.to_string();
        assert!(f(&r, &["memory", "nodes", &n, "idle_rss_bytes"]) > 0.0);
    }
    let sweep = r["worker_sweep"].as_array().expect("sweep");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(sweep.len(), cores);
    for (i, p) in sweep.iter().enumerate() {
        assert_eq!(f(p, &["workers"]), (i + 1) as f64);
        assert!(f(p, &["mesh_gbit_per_s"]) > 0.0 && f(p, &["mesh_conns_per_s"]) > 0.0);
    }

    let stem = json.with_extension("");
    let stem = stem.to_string_lossy();
    for plot in ["", "-throughput", "-latency", "-connections", "-memory"] {
        let svg = format!("{stem}{plot}.svg");
        let text = std::fs::read_to_string(&svg).unwrap_or_else(|_| panic!("no {svg}"));
        assert!(text.starts_with("<svg") && text.contains("<rect"), "{svg}");
    }

    // The same file against itself: every figure x1.000.
    let json_s = json.to_string_lossy().into_owned();
    let (ok, text, err) = meshlab(&["compare", &json_s, &json_s]);
    assert!(ok, "{err}");
    let line = text
        .lines()
        .find(|l| l.contains("one stream mesh / plain TLS"))
        .expect("TLS ratio row");
    assert!(line.trim_end().ends_with("x1.000"), "{line}");
    let line = text
        .lines()
        .find(|l| l.contains("new connections/s mesh, fresh handshake each"))
        .expect("the fresh-handshake rate");
    assert!(line.trim_end().ends_with("x1.000"), "{line}");
    let line = text
        .lines()
        .find(|l| l.contains("1000/s x1 beside 1 bulk: bulk mesh, Gbit/s"))
        .expect("the bulk beside the requests");
    assert!(line.trim_end().ends_with("x1.000"), "{line}");
    let _ = std::fs::remove_dir_all(Path::new(&out));
}
