//! The data plane started before its agent has published anything: the agent creates the
//! region first and then lists its sources, which on a large cluster (or an unreachable API
//! server) takes seconds to minutes. Meanwhile the data plane must wait asleep, not spin its
//! real-time snapshot thread on a core, and serve as soon as the first snapshot lands.
//! A real data plane process on the host's loopback; no namespaces needed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_io::procfs::Process;
use mesh_snapshot::region::PublishOptions;
use mesh_snapshot::{Publisher, Snapshot};

/// Ports of their own, apart from the lab's (which run in namespaces anyway), and below the
/// ephemeral range (32768-60999), where a connection of another test could hold one.
const READINESS: &str = "127.0.0.1:25021";
const METRICS: &str = "127.0.0.1:25020";
const ADMIN: &str = "127.0.0.1:25000";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The status code and body of `GET path` on `addr`, if it answers.
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let status = reply.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, reply))
}

fn readiness() -> Option<u16> {
    get(READINESS, "/healthz/ready").map(|(status, _)| status)
}

/// The value of a series, as Prometheus scrapes it.
fn value(name: &str) -> f64 {
    let (status, body) = get(METRICS, "/stats/prometheus").expect("metrics answer");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

fn counter(name: &str) -> u64 {
    value(name) as u64
}

#[test]
fn a_data_plane_waits_asleep_for_the_first_snapshot_and_then_serves() {
    let binaries = perf::bins::locate().expect("binaries");
    let dir = std::env::temp_dir().join(format!("first-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let region = dir.join("snapshot");
    let mut publisher = Publisher::create(&region, PublishOptions::default()).expect("region");

    let log_path = dir.join("dataplane.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let dataplane = Command::new(&binaries.dataplane)
        .args(["--snapshot", region.to_str().expect("path")])
        .args(["--workers", "1", "--no-pin"])
        .args(["--readiness-addr", READINESS])
        .args(["--admin-addr", ADMIN])
        .args(["--metrics-addr", METRICS])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log file"))
        .spawn()
        .expect("start the data plane");
    let dataplane = Killed(dataplane);
    let pid = dataplane.0.id();
    let started = std::time::SystemTime::now();

    let deadline = Instant::now() + Duration::from_secs(20);
    while readiness().is_none() {
        assert!(
            Instant::now() < deadline,
            "the readiness endpoint never answered; log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(readiness(), Some(503), "ready without a snapshot");
    let cpu = || {
        Process::Pid(pid)
            .cpu_seconds()
            .expect("the data plane's CPU time")
    };
    let before = cpu();
    std::thread::sleep(Duration::from_secs(2));
    let waiting = cpu() - before;
    // A thread that spins on the region burns the whole two seconds of a core.
    assert!(
        waiting < 0.5,
        "the data plane used {waiting:.2} s of CPU in 2 s while waiting for its first snapshot"
    );
    assert_eq!(readiness(), Some(503), "ready without a snapshot");
    // Waiting is not failing: nothing for an alert on read errors to fire on, and one line
    // in the log, not one per retry.
    assert_eq!(counter("meshdp_snapshot_read_errors_total"), 0);
    assert_eq!(counter("meshdp_snapshot_full_adopt_seconds_count"), 0);
    let said = log();
    assert_eq!(
        said.matches("waiting for the agent's first snapshot")
            .count(),
        1,
        "{said}"
    );

    publisher
        .publish(&mesh_snapshot::encode(&Snapshot {
            node: "node-1".into(),
            ..Snapshot::default()
        }))
        .expect("publish");
    let deadline = Instant::now() + Duration::from_secs(20);
    while readiness() != Some(200) {
        assert!(
            Instant::now() < deadline,
            "not ready 20 s after the first snapshot; log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The adopt is timed: one complete snapshot, in the histogram's last bucket as in all.
    assert_eq!(counter("meshdp_snapshot_full_adopt_seconds_count"), 1);
    assert_eq!(
        counter("meshdp_snapshot_full_adopt_seconds_bucket{le=\"+Inf\"}"),
        1
    );
    assert_eq!(counter("meshdp_snapshot_changes_adopt_seconds_count"), 0);

    // The process's own figures, as an SRE's dashboards read them from any Prometheus
    // client: they are this process's, as /proc shows it from outside.
    let rss = Process::Pid(pid)
        .status_bytes("VmRSS:")
        .expect("the data plane's RSS") as f64;
    let scraped = value("process_resident_memory_bytes");
    assert!(
        scraped > rss / 2.0 && scraped < rss * 2.0,
        "scraped RSS {scraped}, /proc {rss}"
    );
    let private = value("meshdp_memory_private_bytes");
    assert!(
        private > 0.0 && private <= scraped,
        "{private} of {scraped}"
    );
    let cpu_scraped = value("process_cpu_seconds_total");
    assert!(
        cpu_scraped <= cpu() + 0.01,
        "{cpu_scraped} s, /proc {} s",
        cpu()
    );
    let since_epoch = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64()
    };
    let start = value("process_start_time_seconds");
    assert!(
        (start - since_epoch(started)).abs() < 5.0,
        "started at {start}, spawned at {}",
        since_epoch(started)
    );
    assert!(
        value("process_threads") >= 3.0,
        "a worker, the watcher, the endpoints"
    );
    assert!(value("process_open_fds") >= 3.0, "listeners and the region");
    drop(dataplane);
    let _ = std::fs::remove_dir_all(&dir);
}
