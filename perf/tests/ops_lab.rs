//! Operability, end to end in the lab topology (real namespaces, processes, TLS): Istio's
//! metrics as Prometheus scrapes them, access logs, runtime admin changes, and the SIGTERM
//! drain. Root required (CI is root); every scenario runs on io_uring and on epoll.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use common::*;
use perf::lab::{Lab, LabOptions};

/// One request/response exchange of `size` bytes each way, then a clean close.
fn exchange(lab: &Lab, from: &str, to: &str, port: u16, size: usize) -> std::io::Result<()> {
    let stream = lab
        .connect_from(from, lab.addr(to, port))
        .map_err(std::io::Error::other)?;
    exchange_on(stream, size)
}

fn exchange_on(mut stream: std::net::TcpStream, size: usize) -> std::io::Result<()> {
    let reply = roundtrip(&mut stream, &vec![7u8; size])?;
    if reply.len() != size {
        return Err(std::io::Error::other(format!(
            "{} of {size} bytes came back",
            reply.len()
        )));
    }
    stream.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    Ok(())
}

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/default";

lab_test!(
    istio_metrics_and_access_logs_describe_each_connection,
    LabOptions::default(),
    |lab| {
        echo_server(&lab, "n2-a");
        exchange(&lab, "n1-a", "n2-a", ECHO, 1000).expect("exchange through the mesh");
        let source = [
            ("reporter", "source"),
            ("source_workload", "n1-a"),
            ("source_principal", CLIENT),
            ("destination_workload", "n2-a"),
            ("destination_canonical_service", "n2-a"),
            ("connection_security_policy", "mutual_tls"),
            ("request_protocol", "tcp"),
        ];
        let destination = [
            ("reporter", "destination"),
            ("source_workload", "n1-a"),
            ("source_principal", CLIENT),
            ("destination_workload", "n2-a"),
            ("destination_workload_namespace", "default"),
            ("connection_security_policy", "mutual_tls"),
        ];
        // Each node counts the connection once it is closed on its side.
        for (node, labels) in [(0, &source[..]), (1, &destination[..])] {
            assert!(
                eventually(Duration::from_secs(5), || {
                    series(
                        &scrape(&lab, node),
                        "istio_tcp_connections_closed_total",
                        labels,
                    ) == Some(1)
                }),
                "node {node} never counted the close:\n{}",
                scrape(&lab, node)
            );
            let text = scrape(&lab, node);
            let value = |family| series(&text, family, labels);
            assert_eq!(
                value("istio_tcp_connections_opened_total"),
                Some(1),
                "{text}"
            );
            // Istio's direction: received = client to server, sent = server to client.
            assert_eq!(
                value("istio_tcp_received_bytes_total"),
                Some(1000),
                "{text}"
            );
            assert_eq!(value("istio_tcp_sent_bytes_total"), Some(1000), "{text}");
        }
        // The data plane's own series ride along.
        let text = scrape(&lab, 1);
        for gauge in ["active_connections", "pipes_open", "pool_connections"] {
            assert!(
                text.contains(&format!("# TYPE meshdp_{gauge} gauge")),
                "{gauge}: {text}"
            );
        }
        assert!(series(
            &text,
            "meshdp_hbone_streams_accepted_total",
            &[("worker", "0")]
        )
        .is_some());
        assert!(text.contains("meshdp_snapshot_generation "), "{text}");
        // The data plane holds what the agent published last: the same epoch and generation
        // on both processes' endpoints (what an SRE compares to see a node caught up).
        let versions = |node: usize| {
            let agent = lab.agent_metrics(node).expect("the agent's metrics");
            let dataplane = scrape(&lab, node);
            let get = |text: &str, name: &str| mesh_io::stats::series_value(text, name);
            (
                get(&agent, "meshagent_snapshot_epoch"),
                get(&agent, "meshagent_snapshot_generation"),
                get(&dataplane, "meshdp_snapshot_epoch"),
                get(&dataplane, "meshdp_snapshot_generation"),
            )
        };
        let generation_before = versions(1).1;

        // A refused connection: counted as failed on both sides, and logged with the policy.
        lab.apply(
            "policies:
  - name: deny-9100
    namespace: default
    selector: {matchLabels: {app: n2-a}}
    action: DENY
    rules:
      - to: [{operation: {ports: ['9100']}}]
",
        )
        .expect("policy");
        let _listener = lab.listen_in("n2-a", 9100).expect("listen");
        assert!(exchange(&lab, "n1-a", "n2-a", 9100, 10).is_err(), "denied");
        for node in [0, 1] {
            assert!(
                eventually(Duration::from_secs(5), || {
                    let (agent_epoch, agent_generation, epoch, generation) = versions(node);
                    agent_epoch.is_some() && agent_epoch == epoch && agent_generation == generation
                }),
                "node {node}: the data plane is not at the agent's version: {:?}",
                versions(node)
            );
        }
        assert!(
            versions(1).1 > generation_before,
            "the policy was a new generation"
        );
        let agent = lab.agent_metrics(1).expect("the agent's metrics");
        assert!(
            mesh_io::stats::series_value(
                &agent,
                "meshagent_snapshot_publications_total{kind=\"change\"}"
            ) >= Some(1.0),
            "{agent}"
        );
        assert!(eventually(Duration::from_secs(5), || {
            let denied = [("response_flags", "DENY"), ("destination_workload", "n2-a")];
            series(
                &scrape(&lab, 0),
                "istio_tcp_connections_failed_total",
                &denied,
            ) == Some(1)
                && series(
                    &scrape(&lab, 1),
                    "istio_tcp_connections_failed_total",
                    &denied,
                ) == Some(1)
        }));

        // The access log (node 2, the destination) has one line per connection.
        assert!(eventually(Duration::from_secs(5), || {
            lab.process_log("dataplane", 1).contains("result=denied")
        }));
        let log = lab.process_log("dataplane", 1);
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(" access: ")).collect();
        let ok = lines
            .iter()
            .find(|l| l.contains("result=ok"))
            .unwrap_or_else(|| panic!("no successful connection in the access log:\n{log}"));
        for field in [
            "direction=\"inbound\"",
            "pod=n2-a",
            "bytes_to_server=1000",
            "bytes_to_client=1000",
            &format!("src.identity=\"{CLIENT}\""),
        ] {
            assert!(ok.contains(field), "{field} missing in {ok}");
        }
        let denied = lines
            .iter()
            .find(|l| l.contains("result=denied"))
            .unwrap_or_else(|| panic!("no denied connection in the access log:\n{log}"));
        assert!(denied.contains("denied by default/deny-9100"), "{denied}");
    }
);

lab_test!(
    admin_changes_the_log_filter_and_access_log_at_runtime,
    LabOptions::default(),
    |lab| {
        echo_server(&lab, "n2-a");
        let access_lines = |lab: &Lab| {
            lab.process_log("dataplane", 1)
                .lines()
                .filter(|l| l.contains(" access: "))
                .count()
        };
        let post = |path: &str| lab.http_request(1, 15000, "POST", path).expect("admin");

        assert_eq!(
            post("/access_log?enabled=false"),
            (200, r#"{"enabled":false,"sample":1.0}"#.into())
        );
        exchange(&lab, "n1-a", "n2-a", ECHO, 100).expect("exchange");
        // The close is counted by then, so the access record would have been queued too.
        assert!(eventually(Duration::from_secs(5), || {
            series(
                &scrape(&lab, 1),
                "istio_tcp_connections_closed_total",
                &[("reporter", "destination")],
            ) == Some(1)
        }));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(access_lines(&lab), 0, "access log off");

        assert_eq!(post("/access_log?enabled=true").0, 200);
        exchange(&lab, "n1-a", "n2-a", ECHO, 100).expect("exchange");
        assert!(eventually(Duration::from_secs(5), || access_lines(&lab) == 1));

        // Half the successful connections, evenly.
        assert_eq!(post("/access_log?sample=0.5").0, 200);
        for _ in 0..4 {
            exchange(&lab, "n1-a", "n2-a", ECHO, 100).expect("exchange");
        }
        assert!(eventually(Duration::from_secs(5), || access_lines(&lab) == 3));
        assert_eq!(post("/access_log?sample=7").0, 400);

        // The log filter: debug lines appear only after the change.
        let (status, level) = lab.http_get(1, 15000, "/logging").expect("admin");
        assert_eq!((status, level.trim()), (200, "info"));
        assert!(!lab.process_log("dataplane", 1).contains("DEBUG"));
        assert_eq!(post("/logging?level=debug").0, 200);
        exchange(&lab, "n1-a", "n2-a", ECHO, 100).expect("exchange");
        assert!(eventually(Duration::from_secs(5), || {
            lab.process_log("dataplane", 1).contains("DEBUG")
        }));
        let (status, body) = post("/logging?level=no[such");
        assert_eq!(status, 400, "{body}");
        assert_eq!(
            lab.http_get(1, 15000, "/logging").expect("admin").1.trim(),
            "debug"
        );
    }
);

lab_test!(
    sigterm_fails_readiness_stops_accepting_and_lets_connections_finish,
    LabOptions::default(),
    |lab| {
        let mut lab = lab;
        echo_server(&lab, "n2-a");
        let mut open = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut open, b"before").expect("echo"), b"before");

        lab.signal_dataplane(1, "TERM").expect("SIGTERM");
        assert!(
            eventually(Duration::from_secs(5), || {
                let ready = lab.http_get(1, 15021, "/healthz/ready");
                matches!(ready, Ok((503, body)) if body.contains("draining"))
            }),
            "readiness did not fail"
        );
        // No new connections are accepted...
        assert!(eventually(Duration::from_secs(5), || {
            exchange(&lab, "n1-a", "n2-a", ECHO, 10).is_err()
        }));
        // ...but the open one keeps working, and the process waits for it.
        assert_eq!(
            roundtrip(&mut open, b"during").expect("echo while draining"),
            b"during"
        );
        assert!(lab
            .wait_dataplane_exit(1, Duration::from_millis(500))
            .expect("wait")
            .is_none());
        open.shutdown(Shutdown::Write).expect("close");
        let mut rest = Vec::new();
        let _ = open.read_to_end(&mut rest);
        // Well before the 30 s grace period: the last connection finished.
        let status = lab
            .wait_dataplane_exit(1, Duration::from_secs(10))
            .expect("wait")
            .expect("the data plane exits once its connections are done");
        assert!(status.success(), "{status}");
        assert!(lab
            .process_log("dataplane", 1)
            .contains("drained: no connections left"));
    }
);

lab_test!(
    a_connection_still_open_when_the_grace_period_ends_is_closed,
    LabOptions {
        dataplane_args: vec!["--drain-grace".into(), "1s".into()],
        ..LabOptions::default()
    },
    |lab| {
        let mut lab = lab;
        echo_server(&lab, "n2-a");
        let mut held = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut held, b"hello").expect("echo"), b"hello");
        lab.signal_dataplane(1, "TERM").expect("SIGTERM");
        let status = lab
            .wait_dataplane_exit(1, Duration::from_secs(15))
            .expect("wait")
            .expect("the data plane exits after its grace period");
        assert!(status.success(), "{status}");
        assert!(lab
            .process_log("dataplane", 1)
            .contains("grace period over: closing the remaining connections"));
        // The client sees its connection end (FIN or reset), not a hang.
        held.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = held.write_all(b"after");
        let mut buf = [0u8; 16];
        match held.read(&mut buf) {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("connection still served after the drain: {n} bytes"),
        }
    }
);

/// Connections from n1-a to n2-a's echo server while `upgrade` runs on node 2 (its 15008
/// listeners), then on node 1 (its 15001): three threads open fresh ones (connect, 1 KiB each
/// way, close) and two long-lived ones, opened before, stay busy. Fails if any connection
/// failed, or too few were made. Returns what `upgrade` returned for node 2 and node 1, and
/// the long-lived connections, still open.
fn under_load<T: Send>(
    lab: &mut Lab,
    what: &str,
    mut upgrade: impl FnMut(&mut Lab, usize) -> T,
) -> (T, T, Vec<std::net::TcpStream>) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;
    let stop = AtomicBool::new(false);
    let made = AtomicU64::new(0);
    let failures = Mutex::new(Vec::<String>::new());
    let mut long_lived: Vec<_> = (0..2)
        .map(|_| {
            lab.connect_from("n1-a", lab.addr("n2-a", ECHO))
                .expect("connect")
        })
        .collect();
    // The load runs from pod n1-a's namespace on threads of its own, while the lab (which
    // the upgrades change) stays with this thread.
    let client_ns = mesh_io::netns::NetNs::open(lab.pod("n1-a").netns_path()).expect("netns");
    let home = mesh_io::netns::NetNs::current().expect("netns");
    let server = lab.addr("n2-a", ECHO);
    let one_exchange = || -> std::io::Result<()> {
        let connect = || std::net::TcpStream::connect_timeout(&server, Duration::from_secs(10));
        exchange_on(client_ns.run_in(&home, connect)??, 1024)
    };
    let (server_side, client_side) = std::thread::scope(|s| {
        let (stop, made, failures, one_exchange) = (&stop, &made, &failures, &one_exchange);
        for _ in 0..3 {
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match one_exchange() {
                        Ok(()) => {
                            made.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.lock().expect("lock").push(format!("new: {e}")),
                    }
                }
            });
        }
        for conn in long_lived.iter_mut() {
            s.spawn(move || {
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let message = format!("ping {n}");
                    match roundtrip(conn, message.as_bytes()) {
                        Ok(reply) if reply == message.as_bytes() => {}
                        Ok(reply) => failures
                            .lock()
                            .expect("lock")
                            .push(format!("long-lived: wrong reply {reply:?}")),
                        Err(e) => {
                            failures
                                .lock()
                                .expect("lock")
                                .push(format!("long-lived: {e}"));
                            return;
                        }
                    }
                    n += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        // Stops the load even if an upgrade fails, or the scope would wait for it forever.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop_on_drop = StopOnDrop(stop);
        std::thread::sleep(Duration::from_millis(700));
        let before = made.load(Ordering::Relaxed);
        let server_side = upgrade(lab, 1);
        std::thread::sleep(Duration::from_millis(700));
        let client_side = upgrade(lab, 0);
        std::thread::sleep(Duration::from_millis(700));
        stop.store(true, Ordering::Relaxed);
        assert!(
            made.load(Ordering::Relaxed) > before,
            "no connections were made during the {what}s"
        );
        (server_side, client_side)
    });
    let failures = failures.into_inner().expect("lock");
    assert!(
        failures.is_empty(),
        "{} of {} connection attempts failed: {:?}",
        failures.len(),
        made.load(Ordering::Relaxed) + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    assert!(
        made.load(Ordering::Relaxed) >= 20,
        "too little load to say anything"
    );
    eprintln!(
        "{} connections made during two {what}s, none refused or reset",
        made.load(Ordering::Relaxed)
    );
    (server_side, client_side, long_lived)
}

/// HBONE streams node 2's current data plane accepted (both workers).
fn streams_accepted(lab: &Lab) -> u64 {
    let text = scrape(lab, 1);
    ["0", "1"]
        .iter()
        .map(|w| {
            series(
                &text,
                "meshdp_hbone_streams_accepted_total",
                &[("worker", w)],
            )
            .unwrap_or(0)
        })
        .sum()
}

/// Waits up to `within` for a process this test holds to exit; its status.
fn exits_within(
    within: Duration,
    name: &str,
    child: &mut std::process::Child,
) -> std::process::ExitStatus {
    let mut status = None;
    let exited = eventually(within, || {
        status = child.try_wait().expect("wait");
        status.is_some()
    });
    assert!(exited, "the {name} did not exit");
    status.expect("exited")
}

/// Waits up to 15 s for a process this test holds to exit; its status.
fn exited(name: &str, child: &mut std::process::Child) -> std::process::ExitStatus {
    exits_within(Duration::from_secs(15), name, child)
}

lab_test!(
    an_upgrade_under_load_refuses_and_resets_nothing,
    LabOptions::default(),
    |lab| {
        let mut lab = lab;
        echo_server(&lab, "n2-a");
        // The old process's listeners that the new one did not inherit (a pod that came during
        // the handover) close at the end: the kernel moves their queued connections over.
        for pod in ["n1-a", "n2-a"] {
            let migrate = run_in(&lab, pod, "cat", &["/proc/sys/net/ipv4/tcp_migrate_req"]);
            assert_eq!(migrate.trim(), "1", "{pod}");
        }
        let (old_server_side, old_client_side, mut long_lived) =
            under_load(&mut lab, "upgrade", |lab, node| {
                lab.upgrade_dataplane(node)
                    .unwrap_or_else(|e| panic!("upgrade node {}: {e:#}", node + 1))
            });
        // New connections are the new processes' now.
        let before = streams_accepted(&lab);
        exchange(&lab, "n1-a", "n2-a", ECHO, 10).expect("after the upgrades");
        assert!(
            streams_accepted(&lab) > before,
            "the new node-2 process served it"
        );
        // The old processes still carry the long-lived connections, which still work...
        for conn in long_lived.iter_mut() {
            assert_eq!(roundtrip(conn, b"still here").expect("echo"), b"still here");
        }
        // ...and exit once those are closed.
        drop(long_lived);
        for (name, mut old) in [("node 2", old_server_side), ("node 1", old_client_side)] {
            let status = exited(&format!("old {name} data plane"), &mut old);
            assert!(status.success(), "old {name} data plane: {status}");
        }
        for node in [0, 1] {
            let log = lab.process_log("dataplane", node);
            assert!(
                log.contains("the new data plane serves: no longer accepting, draining"),
                "{log}"
            );
            assert!(log.contains("drained: no connections left"), "{log}");
        }
    }
);

lab_test!(
    a_rolling_update_across_pods_refuses_and_resets_nothing,
    LabOptions::default(),
    |lab| {
        let mut lab = lab;
        echo_server(&lab, "n2-a");
        // From a pod outside the mesh: only node 2's data plane carries it. Held open past the
        // old node-2 pod's SIGTERM.
        let mut held = lab
            .connect_from("n1-b", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut held, b"before").expect("echo"), b"before");
        // Each node's next DaemonSet pod starts beside the running one (maxSurge): its agent
        // takes the node's enrollments over, its data plane the listening sockets.
        let (old_server_side, old_client_side, mut long_lived) =
            under_load(&mut lab, "rolling update", |lab, node| {
                lab.rolling_update(node)
                    .unwrap_or_else(|e| panic!("rolling update of node {}: {e:#}", node + 1))
            });
        for node in [0, 1] {
            let agent_log = lab.process_log("ctrl-agent", node);
            assert!(
                agent_log.contains("the running agent handed the node's CNI enrollments over"),
                "{agent_log}"
            );
            // The new data plane answers on endpoints of its own, in its own pod's namespace.
            let log = lab.process_log("dataplane", node);
            assert!(log.contains("opening this process's own"), "{log}");
        }
        lab.wait_ready(1, Duration::from_secs(10))
            .expect("the new pod's readiness answers in its own namespace");
        let before = streams_accepted(&lab);
        exchange(&lab, "n1-a", "n2-a", ECHO, 10).expect("after the rolling update");
        assert!(
            streams_accepted(&lab) > before,
            "the new node-2 pod served it"
        );
        for conn in long_lived.iter_mut() {
            assert_eq!(roundtrip(conn, b"still here").expect("echo"), b"still here");
        }
        drop(long_lived);

        // A pod that comes while both pods run is the new agent's: the old one answers the
        // plugin `moved`, which asks again.
        let pod = lab
            .add_pod(1, "c", true, "default")
            .expect("a pod during the overlap");
        lab.wait_serving(1, Duration::from_secs(20))
            .expect("served by the new pod");
        echo_server(&lab, "n2-c");
        exchange(&lab, "n1-a", "n2-c", ECHO, 10).expect("to the pod that came meanwhile");
        // A relabel during the overlap is followed by the new agent alone: the old one, whose
        // enrollments lack n2-c, would otherwise rewrite the state file without it.
        let followed = |lab: &Lab| {
            lab.process_log("ctrl-agent", 1)
                .lines()
                .filter(|l| l.contains("labels changed: capture updated in place"))
                .count()
        };
        let before = followed(&lab);
        lab.set_enrolled("n2-a", false)
            .expect("n2-a out of the mesh");
        assert!(
            eventually(Duration::from_secs(10), || followed(&lab) > before),
            "the relabel was not followed"
        );
        // Both agents look at the labels every 100 ms.
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            followed(&lab),
            before + 1,
            "both agents followed the relabel"
        );
        lab.set_enrolled("n2-a", true)
            .expect("n2-a back in the mesh");

        // Node 1's old data plane drained, and waits for its pod's SIGTERM rather than exit
        // (a container that exits is restarted, and would take the sockets back).
        let (old_agent_2, mut old_dataplane_2) = old_server_side;
        let (old_agent_1, mut old_dataplane_1) = old_client_side;
        await_log(
            &lab,
            "dataplane",
            0,
            "handed over to another pod's data plane: waiting for this pod's SIGTERM",
        );
        assert!(
            running(old_dataplane_1.id()),
            "the old data plane exited by itself"
        );
        let terminate = |process: &std::process::Child| {
            perf::sys::run("kill", &["-TERM", &process.id().to_string()]).expect("kill");
        };
        terminate(&old_dataplane_1);
        let status = exited("old data plane of node 1", &mut old_dataplane_1);
        assert!(status.success(), "old data plane of node 1: {status}");
        // Node 2's still carries the held connection: its pod's SIGTERM, which comes soon
        // after the handover, leaves the drain its grace.
        terminate(&old_dataplane_2);
        await_log(&lab, "dataplane", 1, "the pod's SIGTERM: draining goes on");
        assert_eq!(
            roundtrip(&mut held, b"after the SIGTERM").expect("echo"),
            b"after the SIGTERM"
        );
        assert!(
            running(old_dataplane_2.id()),
            "the SIGTERM cut the drain short"
        );
        drop(held);
        let status = exited("old data plane of node 2", &mut old_dataplane_2);
        assert!(status.success(), "old data plane of node 2: {status}");
        for (node, mut agent) in [(1, old_agent_1), (2, old_agent_2)] {
            terminate(&agent);
            let status = exited(&format!("old agent of node {node}"), &mut agent);
            assert!(status.success(), "old agent of node {node}: {status}");
        }
        // The old agent left the state file as the new one wrote it: a restart of the new
        // agent serves the pod that came during the overlap.
        lab.restart_agent(1).expect("restart the new agent");
        lab.wait_serving(1, Duration::from_secs(20))
            .expect("serving");
        exchange(&lab, "n1-a", "n2-c", ECHO, 10).expect("after the old pods went");
        drop(pod);
    }
);

lab_test!(
    a_drained_data_plane_exits_to_be_restarted_when_its_successor_pod_goes,
    LabOptions::default(),
    |lab| {
        let mut lab = lab;
        let (mut old_agent, mut old_dataplane) = lab.rolling_update(1).expect("rolling update");
        await_log(&lab, "dataplane", 1, "waiting for this pod's SIGTERM");
        // The new pod is deleted (a rollback) while the old one stays: its data plane goes
        // without a word. The drained one must not wait for a SIGTERM that will not come: it
        // exits with an error, which has its container restarted, and a fresh start serves.
        lab.signal_dataplane(1, "KILL")
            .expect("kill the new data plane");
        std::thread::sleep(Duration::from_secs(5));
        assert!(
            running(old_dataplane.id()),
            "gave up on its successor too soon"
        );
        let status = exits_within(
            Duration::from_secs(20),
            "old data plane, which waits for a SIGTERM with no successor,",
            &mut old_dataplane,
        );
        assert!(!status.success(), "exited as if all were well: {status}");
        assert!(lab
            .process_log("dataplane", 1)
            .contains("has not answered on the upgrade socket"));
        old_agent.kill().expect("kill");
        old_agent.wait().expect("reap");
    }
);

lab_test!(
    a_rollback_during_a_rolling_update_hands_the_node_back_without_refusing,
    LabOptions::default(),
    |lab| {
        let mut lab = lab;
        echo_server(&lab, "n2-a");
        // Both nodes mid-update: the new pods serve, the old data planes drained and wait for
        // their pods' SIGTERM.
        let mut predecessors = Vec::new();
        for node in 0..2 {
            let (agent, dataplane) = lab.rolling_update(node).expect("rolling update");
            await_log(&lab, "dataplane", node, "waiting for this pod's SIGTERM");
            predecessors.push((agent, dataplane));
        }
        // The update is rolled back: each new pod is deleted while the old one stays. The new
        // data plane keeps accepting and tells the waiting one, which exits; its restarted
        // container takes the sockets back before the new one stops accepting.
        let (server_side, client_side, held) = under_load(&mut lab, "rollback", |lab, node| {
            lab.roll_back_dataplane(node, &mut predecessors[node].1)
                .expect("rollback")
        });
        let mut leavers = Vec::new();
        for (node, (leaving, status)) in [(0, client_side), (1, server_side)] {
            assert!(
                !status.success(),
                "node {}: the old data plane exited as if all were well: {status}",
                node + 1
            );
            let log = lab.process_log("dataplane", node);
            for line in [
                "handing the node back to it",
                "is leaving, its pod deleted",
                "the restarted predecessor took the node back: draining",
            ] {
                assert!(
                    log.contains(line),
                    "node {}: no {line:?} in:\n{log}",
                    node + 1
                );
            }
            leavers.push((node, leaving));
        }
        // The connections opened before the rollback went through the leaving data planes,
        // which drain them rather than cut them; they exit once those are done.
        let mut held = held;
        for stream in held.iter_mut() {
            assert_eq!(
                roundtrip(stream, b"after the rollback").expect("echo"),
                b"after the rollback"
            );
        }
        for (node, leaving) in &leavers {
            assert!(
                running(leaving.id()),
                "node {}: the leaving data plane cut its connections",
                node + 1
            );
        }
        drop(held);
        for (node, mut leaving) in leavers {
            let status = exited(
                &format!("leaving data plane of node {}", node + 1),
                &mut leaving,
            );
            assert!(
                status.success(),
                "leaving data plane of node {}: {status}",
                node + 1
            );
        }
        exchange(&lab, "n1-a", "n2-a", ECHO, 10).expect("after the rollback");
        for (node, (mut agent, _)) in predecessors.into_iter().enumerate() {
            perf::sys::run("kill", &["-TERM", &agent.id().to_string()]).expect("kill");
            let status = exited(&format!("old agent of node {}", node + 1), &mut agent);
            assert!(status.success(), "old agent of node {}: {status}", node + 1);
        }
    }
);

/// Waits up to 20 s for `text` in the log of a node's `process` ("ctrl-agent", "dataplane").
fn await_log(lab: &Lab, process: &str, node: usize, text: &str) {
    assert!(
        eventually(Duration::from_secs(20), || lab
            .process_log(process, node)
            .contains(text)),
        "no {text:?} in the {process} log of node {}:\n{}",
        node + 1,
        lab.process_log(process, node)
    );
}

lab_test!(
    a_handed_over_agent_takes_the_node_back_when_no_successor_serves_it,
    LabOptions {
        agent_args: vec!["--cni-successor-wait".into(), "2s".into()],
        ..LabOptions::default()
    },
    |lab| {
        use ctrl_agent::cni_api::{Reply, Request};
        use mesh_io::ipc::Channel;
        let mut lab = lab;
        let socket = lab.cni_socket(1);
        let ask = |request: &Request| -> Reply {
            let channel = Channel::connect(&socket).expect("connect");
            channel
                .set_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            channel.send_json(request, &[]).expect("send");
            channel
                .recv_json::<Reply>()
                .expect("recv")
                .expect("a reply")
                .0
        };
        let status = Request::Status {
            container_id: "none".into(),
        };
        // A successor agent binds the socket: plugins are no longer told to ask again.
        let successor_binds = || {
            assert!(
                eventually(Duration::from_secs(20), || !matches!(
                    ask(&status),
                    Reply::Moved { .. }
                )),
                "the successor never bound the socket"
            )
        };
        // A successor that asks for the node and is never heard of again (it crashed before
        // binding the socket): meanwhile plugins are told to ask again...
        assert!(
            matches!(ask(&Request::HandOver), Reply::HandedOver { pods } if pods == 2),
            "the handover"
        );
        assert!(matches!(ask(&status), Reply::Moved { .. }), "not moved");
        // ...and a pod that comes meanwhile is served once the agent takes the node back:
        // its plugin keeps asking.
        let late = lab
            .add_pod(1, "c", true, "default")
            .expect("a pod while the node is handed over");
        await_log(
            &lab,
            "ctrl-agent",
            1,
            "the new agent never took the CNI socket over",
        );
        let log = lab.process_log("ctrl-agent", 1);
        assert!(
            log.lines()
                .any(|l| l.contains("answered `moved`") && l.contains("request=Add {")),
            "the late pod's ADD came after the agent took the node back: the test proved \
             nothing\n{log}"
        );
        lab.wait_serving(1, Duration::from_secs(20))
            .expect("served after the agent took the node back");
        echo_server(&lab, "n2-c");
        exchange(&lab, "n1-a", "n2-c", ECHO, 10).expect("to the late pod");

        // A successor that took the node and went (its pod deleted in a rollback before it
        // got ready): the agent takes the socket back once it stops answering there.
        let mut successor = lab.surge_agent(1).expect("the next pod's agent");
        await_log(
            &lab,
            "ctrl-agent",
            1,
            "the running agent handed the node's CNI enrollments over",
        );
        successor_binds();
        successor.kill().expect("kill the successor");
        successor.wait().expect("reap");
        await_log(&lab, "ctrl-agent", 1, "taking it back");
        let after = lab
            .add_pod(1, "d", true, "default")
            .expect("a pod after the rollback");
        lab.wait_serving(1, Duration::from_secs(20))
            .expect("served by the first agent again");
        echo_server(&lab, "n2-d");
        exchange(&lab, "n1-a", "n2-d", ECHO, 10).expect("to the pod after the rollback");
        // The socket bound before the successor took the path is closed, and its accept
        // thread gone with the call slot it held: one accept thread, on the socket bound now.
        let agent = lab.agent_pid(1).expect("agent");
        let accepting = thread_cpus(agent)
            .into_iter()
            .filter(|(name, _)| name == "cni-server")
            .count();
        assert_eq!(
            accepting, 1,
            "accept threads in the agent after taking the socket back"
        );

        // A successor whose pod gets SIGTERM while this agent still runs (a rollback after the
        // new pod got ready): it hands the node back at once, without the successor wait.
        let handovers = |lab: &Lab| {
            lab.process_log("ctrl-agent", 1)
                .matches("the running agent handed the node's CNI enrollments over")
                .count()
        };
        let handed_before = handovers(&lab);
        let mut successor = lab.surge_agent(1).expect("the next pod's agent");
        assert!(
            eventually(Duration::from_secs(20), || handovers(&lab) > handed_before),
            "the successor never asked for the node"
        );
        successor_binds();
        perf::sys::run("kill", &["-TERM", &successor.id().to_string()]).expect("kill");
        let status_of_successor = exited("successor agent", &mut successor);
        assert!(
            status_of_successor.success(),
            "successor agent: {status_of_successor}"
        );
        // The successor waited for the take-back before it exited, and the old agent took the
        // node back on its word, not after the successor wait (which would log that the
        // successor no longer answers, and only once it had exited).
        let log = lab.process_log("ctrl-agent", 1);
        for line in [
            "handing the node back to it",
            "the previous agent took the node back",
            "the agent that took the node over is leaving (its pod deleted): taking the node back",
        ] {
            assert!(log.contains(line), "no {line:?} in:\n{log}");
        }
        let last = lab
            .add_pod(1, "e", true, "default")
            .expect("a pod after the second rollback");
        lab.wait_serving(1, Duration::from_secs(20))
            .expect("served by the first agent again");
        echo_server(&lab, "n2-e");
        exchange(&lab, "n1-a", "n2-e", ECHO, 10).expect("to the pod after the second rollback");
        drop((late, after, last));
    }
);

/// Whether process `pid` still runs: a data plane this test started and the lab no longer
/// tracks stays a zombie once it exits, as nothing reaps it.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

lab_test!(
    an_upgrade_that_cannot_get_ready_leaves_the_old_data_plane_in_charge,
    LabOptions {
        dataplane_args: vec!["--upgrade-ready-within=8s".into()],
        ..LabOptions::default()
    },
    |lab| {
        let mut lab = lab;
        echo_server(&lab, "n2-a");
        exchange(&lab, "n1-a", "n2-a", ECHO, 10).expect("before the upgrade");
        let old = lab.dataplane_pid(1).expect("data plane");
        // With node 2's agent down, a new process cannot get the pods' namespaces (the running
        // one keeps those it has), so it never gets ready and gives up after its 8 s.
        lab.kill_agent(1).expect("kill agent");
        let mut old_process = lab.begin_upgrade(1).expect("start the new data plane");
        await_log(
            &lab,
            "dataplane",
            1,
            "taking over the listening sockets of the running data plane",
        );
        // Until it gives up, probes reach the old process only: always ready.
        for _ in 0..20 {
            let (status, body) = lab.http_get(1, 15021, "/healthz/ready").expect("readiness");
            assert_eq!(status, 200, "{body}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = lab
            .wait_dataplane_exit(1, Duration::from_secs(45))
            .expect("wait")
            .expect("the new data plane exits once it gives up");
        assert!(!status.success(), "{status}");
        let log = lab.process_log("dataplane", 1);
        assert!(
            log.contains("could not take over; leaving the old data plane in charge"),
            "{log}"
        );
        assert!(log.contains("not ready within 8s"), "{log}");
        assert!(
            log.contains("the new data plane gave up; serving on"),
            "{log}"
        );

        // The old process serves on, alone: ready, and carrying new connections.
        assert!(running(old), "the old data plane exited:\n{log}");
        for _ in 0..10 {
            let (status, body) = lab.http_get(1, 15021, "/healthz/ready").expect("readiness");
            assert_eq!(status, 200, "{body}");
            exchange(&lab, "n1-a", "n2-a", ECHO, 1000).expect("through the old data plane");
        }

        // And it can still be upgraded, once a new process can get ready.
        lab.restart_agent(1).expect("agent back");
        let mut gave_up = lab
            .upgrade_dataplane(1)
            .expect("a second upgrade takes over from the old data plane");
        // The lab hands back the process it tracked last: the one that gave up, long exited.
        let _ = gave_up.wait();
        assert!(
            eventually(Duration::from_secs(15), || !running(old)),
            "the old data plane did not drain and exit"
        );
        let _ = old_process.wait();
        lab.wait_ready(1, Duration::from_secs(10))
            .expect("ready after the upgrade");
        exchange(&lab, "n1-a", "n2-a", ECHO, 1000).expect("through the new data plane");
    }
);

lab_test!(
    a_sandbox_recreated_during_an_upgrade_is_served_in_its_new_namespace,
    LabOptions::default(),
    |lab| {
        let mut lab = lab;
        echo_server(&lab, "n2-a");
        let pod = lab.pod("n1-a").clone();
        let old = lab.dataplane_pid(0).expect("data plane");
        // Without its agent, node 1's new process holds the sockets the old one handed over
        // (the pod's, in its first sandbox) but cannot get the pods' namespaces, so it has
        // not used them yet: the upgrade stays open.
        lab.kill_agent(0).expect("kill agent");
        let mut old_process = lab.begin_upgrade(0).expect("start the new data plane");
        await_log(
            &lab,
            "dataplane",
            0,
            "taking over the listening sockets of the running data plane",
        );
        // The runtime recreates the pod's sandbox meanwhile; paused, the new process first
        // hears of the pod's namespace once it is the new one.
        lab.signal_dataplane(0, "STOP").expect("SIGSTOP");
        lab.restart_agent(0).expect("agent back");
        let recreated = lab.recreate_sandbox(&pod);
        lab.signal_dataplane(0, "CONT").expect("SIGCONT");
        let netns = recreated.expect("sandbox recreated");
        // The new process takes over; the old one drains and exits.
        assert!(
            eventually(Duration::from_secs(25), || !running(old)),
            "the old data plane did not hand over:\n{}",
            lab.process_log("dataplane", 0)
        );
        let _ = old_process.wait();
        lab.wait_ready(0, Duration::from_secs(10))
            .expect("ready after the upgrade");
        assert!(
            eventually(Duration::from_secs(10), || {
                lab.connect_in(&netns, lab.addr("n2-a", ECHO))
                    .is_ok_and(|mut s| {
                        roundtrip(&mut s, b"new home").is_ok_and(|e| e == b"new home")
                    })
            }),
            "the pod's new namespace is not served after the upgrade:\n{}",
            lab.process_log("dataplane", 0)
        );
        // The upgrade did run into the pod's former sockets (or the test proved nothing).
        let log = lab.process_log("dataplane", 0);
        assert!(log.contains("in the pod's former namespace"), "{log}");
    }
);

/// Each thread of process `pid` by name, with the CPUs it may run on.
fn thread_cpus(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let dir = task.expect("task").path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = mesh_io::procfs::Status::read(dir.join("status"));
        let cpus = status
            .as_ref()
            .and_then(|s| s.field("Cpus_allowed_list:"))
            .unwrap_or_default();
        out.push((name.trim().to_owned(), cpus.to_owned()));
    }
    out
}

lab_test!(
    scrapes_and_dumps_run_off_the_worker_cores,
    LabOptions {
        workers: 1,
        pin: true,
        ..LabOptions::default()
    },
    |lab| {
        // One worker, pinned to the first allowed core; everything else belongs on the rest.
        let own = mesh_io::procfs::Process::Current.status().expect("status");
        let allowed = kernel_tuning::planner::parse_list(
            own.field("Cpus_allowed_list:").expect("Cpus_allowed_list"),
        );
        assert!(allowed.len() >= 2, "needs two cores, has {allowed:?}");
        let (first, rest) = (
            allowed[0].to_string(),
            kernel_tuning::planner::format_list(&allowed[1..]),
        );
        let pid = lab.dataplane_pid(1).expect("data plane");
        let threads = thread_cpus(pid);
        let cpus_of = |name: &str| {
            threads
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, c)| c.clone())
                .unwrap_or_else(|| panic!("no thread {name} in {threads:?}"))
        };
        assert_eq!(cpus_of("worker-0"), first, "{threads:?}");
        for name in [
            "admin",
            "metrics",
            "readiness",
            "snapshot-watch",
            "snapshot-free",
            "access-log",
        ] {
            assert_eq!(cpus_of(name), rest, "{name}: {threads:?}");
        }
        assert!(lab
            .process_log("dataplane", 1)
            .contains("housekeeping threads on the cores no worker uses"));
        // And they serve from there.
        assert!(scrape(&lab, 1).contains("meshdp_driver_info"));
    }
);
