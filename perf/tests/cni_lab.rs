//! CNI enrollment end to end: the lab's pods are attached by Debian's reference `bridge` and
//! `host-local` plugins with `mesh-cni` chained after them, driven exactly as a runtime drives
//! them (environment plus stdin JSON) on real network namespaces; each scenario on io_uring and
//! on epoll. Root required, as in CI.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use perf::cni::Sandbox;
use perf::lab::{Lab, LabOptions};
use serde_json::json;

/// Whether the capture table is present in a pod's namespace.
fn captured(lab: &Lab, pod: &str) -> bool {
    let ns = lab.pod(pod).netns.clone();
    std::process::Command::new("ip")
        .args([
            "netns", "exec", &ns, "nft", "list", "table", "inet", "meshdp",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

lab_test!(
    unmodified_programs_talk_through_the_mesh_and_the_wire_is_tls,
    LabOptions::default(),
    |mut lab| {
        assert!(captured(&lab, "n1-a") && captured(&lab, "n2-a"));
        assert!(
            !captured(&lab, "n1-b"),
            "the opted-out pod has no capture rules"
        );

        // A small HTTP server and client: Python's http.server and curl.
        let site = lab.dir.join("site");
        std::fs::create_dir_all(&site).expect("site dir");
        let marker = "MESH-CNI-HTTP-MARKER-5f1c";
        std::fs::write(site.join("index.html"), marker.repeat(2000)).expect("page");
        let http = lab
            .spawn_in(
                "n2-a",
                Path::new("python3"),
                &[
                    "-m",
                    "http.server",
                    "8080",
                    "--bind",
                    "0.0.0.0",
                    "--directory",
                    &site.display().to_string(),
                ],
            )
            .expect("http server");
        lab.keep(http);
        let url = format!("http://{}:8080/index.html", lab.pod("n2-a").ip);
        let mut body = String::new();
        let wire = capture_between_nodes(&lab, marker.len() * 2000, || {
            for _ in 0..50 {
                if let Ok(mut child) = lab.spawn_in("n1-a", Path::new("curl"), &["-sf", &url]) {
                    let mut out = String::new();
                    if let Some(mut stdout) = child.stdout.take() {
                        let _ = stdout.read_to_string(&mut out);
                    }
                    if child.wait().is_ok_and(|s| s.success()) {
                        body = out;
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        assert_eq!(
            body,
            marker.repeat(2000),
            "curl got the page through the mesh"
        );
        assert!(
            wire.bytes.len() > 10_000,
            "the exchange was captured: {} bytes (tcpdump: {})",
            wire.bytes.len(),
            wire.summary
        );
        let wire = wire.bytes;
        assert!(
            !contains(&wire, marker.as_bytes()),
            "the page crossed between nodes in the clear"
        );
        assert!(contains(&wire, &[0x17, 0x03, 0x03]), "as TLS records");
        // iperf3, as shipped by Debian.
        let server = lab
            .spawn_in("n2-a", Path::new("iperf3"), &["-s", "-1", "-p", "5201"])
            .expect("iperf3 server");
        lab.keep(server);
        assert!(
            eventually(Duration::from_secs(10), || {
                !run_in(&lab, "n2-a", "ss", &["-Hltn", "sport = :5201"])
                    .trim()
                    .is_empty()
            }),
            "the iperf3 server listens"
        );
        let report = run_in(
            &lab,
            "n1-a",
            "iperf3",
            &[
                "-c",
                &lab.pod("n2-a").ip.to_string(),
                "-p",
                "5201",
                "-t",
                "1",
                "-J",
            ],
        );
        let report: serde_json::Value = serde_json::from_str(&report).expect("iperf3 JSON");
        let received = report["end"]["sum_received"]["bytes"]
            .as_f64()
            .unwrap_or(0.0);
        assert!(received > 1e6, "iperf3 moved {received} bytes");
        assert!(
            lab.total(1, "hbone_streams_accepted").expect("stats") >= 2,
            "iperf3's control and data connections both went through HBONE"
        );
    }
);

lab_test!(
    add_twice_check_and_del_behave_as_the_spec_asks,
    LabOptions::default(),
    |lab| {
        let pod = lab.pod("n1-a").clone();
        let sandbox = lab.sandbox(&pod);
        let cni = lab.cni(0);
        let mesh_cni = cni.plugin("mesh-cni").expect("mesh-cni in the chain");
        let prev = cni
            .result(&sandbox.container_id)
            .expect("cached ADD result");
        // Our plugin's ADD again (the chain's primary plugin would refuse a duplicate
        // interface; runtimes DEL before re-adding): harmless.
        let again = cni
            .invoke("ADD", &mesh_cni, &sandbox, Some(&prev))
            .expect("second ADD")
            .expect("a result");
        assert_eq!(again["ips"], prev["ips"], "prevResult passed through");
        cni.check(&sandbox).expect("CHECK after ADD");
        // Someone removes the rules: CHECK notices.
        let ns = pod.netns.clone();
        std::process::Command::new("ip")
            .args([
                "netns", "exec", &ns, "nft", "delete", "table", "inet", "meshdp",
            ])
            .status()
            .expect("nft");
        let err = cni
            .check(&sandbox)
            .expect_err("CHECK must fail without rules");
        assert_eq!((err.plugin.as_str(), err.code), ("mesh-cni", 100), "{err}");
        cni.invoke("ADD", &mesh_cni, &sandbox, Some(&prev))
            .expect("ADD repairs");
        assert!(captured(&lab, "n1-a"));
        // DEL: rules gone, pod released, data plane stops listening in it.
        cni.del(&sandbox).expect("DEL");
        assert!(!captured(&lab, "n1-a"));
        assert!(
            eventually(Duration::from_secs(5), || lab
                .total(0, "listeners")
                .expect("stats")
                == 0),
            "node 1's data plane closed the pod's listeners"
        );
        // DEL again, and DEL of a sandbox nobody ever saw: both succeed.
        cni.del(&sandbox).expect("second DEL");
        let stranger = Sandbox {
            container_id: "never-added".into(),
            ..sandbox.clone()
        };
        cni.del(&stranger).expect("DEL of an unknown sandbox");
    }
);

lab_test!(
    gc_releases_the_sandboxes_the_runtime_lost_and_nothing_else,
    LabOptions {
        agent_args: vec!["--cni-gc-grace".into(), "10s".into()],
        ..LabOptions::default()
    },
    |mut lab| {
        echo_server(&lab, "n2-a");
        let listeners = |lab: &Lab| lab.total(1, "listeners").expect("stats");
        let one_pod = listeners(&lab);
        assert!(one_pod > 0);
        let added = std::time::Instant::now();
        let lost = lab.add_pod(1, "c", true, "default").expect("pod");
        assert!(captured(&lab, "n2-c"));
        assert!(eventually(Duration::from_secs(5), || listeners(&lab) == 2 * one_pod));
        // The runtime loses the sandbox without DEL (a crash, say): the agent would keep its
        // namespace open, captured and served, for good.
        lab.cni(1).forget(&lab.sandbox(&lost));

        // GC right away: the sandbox is too young to go, its ADD may have been under way
        // when the runtime listed what it knows.
        lab.cni(1).gc(None).expect("GC");
        assert!(captured(&lab, "n2-c"), "spared within the grace");
        assert!(listeners(&lab) == 2 * one_pod, "and still served");
        std::thread::sleep(
            (added + Duration::from_secs(11)).saturating_duration_since(std::time::Instant::now()),
        );
        // GC of another network releases nothing of this one's.
        lab.cni(1)
            .gc(Some("another-network"))
            .expect("GC of another network");
        assert!(captured(&lab, "n2-c"), "not another network's to collect");

        lab.cni(1).gc(None).expect("GC");
        assert!(
            eventually(Duration::from_secs(5), || listeners(&lab) == one_pod),
            "the data plane closed its listeners"
        );
        // Its rules stay (a namespace that is really gone takes them along): were the
        // runtime's list wrong, the pod's traffic would be refused, not let around the mesh.
        assert!(captured(&lab, "n2-c"));
        let state = std::fs::read_to_string(lab.dir.join("state-node-2/enrollments.json"))
            .expect("the agent's enrollments");
        assert!(!state.contains(&lab.sandbox(&lost).container_id));
        // The sandboxes the runtime still lists are untouched.
        assert!(state.contains(&lab.sandbox(lab.pod("n2-a")).container_id));
        assert!(captured(&lab, "n2-a"));
        assert!(echoes(&lab, "n1-a", lab.addr("n2-a", ECHO)));
        assert!(lab.total(1, "hbone_streams_accepted").expect("stats") >= 1);
    }
);

lab_test!(
    bad_invocations_get_cni_error_json_and_leave_no_rules,
    LabOptions::default(),
    |mut lab| {
        let cni = lab.cni(0);
        let pod = lab.pod("n1-b").clone();
        let config = json!({"cniVersion": "1.0.0", "name": "t", "type": "mesh-cni",
            "agentSocket": lab.cni_socket(0),
            "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": format!("{}/24", pod.ip)}]}});
        let stdin = serde_json::to_vec(&config).expect("json");
        let env = |command: &str, netns: &str| {
            vec![
                ("CNI_COMMAND", command.to_owned()),
                ("CNI_CONTAINERID", "probe".to_owned()),
                ("CNI_NETNS", netns.to_owned()),
                ("CNI_IFNAME", "eth0".to_owned()),
                (
                    "CNI_ARGS",
                    format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={}", pod.uid),
                ),
            ]
        };
        let netns = pod.netns_path();
        let version = cni
            .exec("mesh-cni", "VERSION", &env("VERSION", ""), b"{}")
            .expect("VERSION")
            .expect("output");
        assert!(version["supportedVersions"]
            .as_array()
            .expect("list")
            .contains(&json!("1.0.0")));
        // what, environment, stdin, expected error code
        type Case<'a> = (&'a str, Vec<(&'a str, String)>, Vec<u8>, u64);
        let cases: Vec<Case<'_>> = vec![
            (
                "malformed stdin",
                env("ADD", &netns),
                b"{not json".to_vec(),
                6,
            ),
            ("missing CNI_NETNS", env("ADD", ""), stdin.clone(), 4),
            ("unknown command", env("RESTART", &netns), stdin.clone(), 4),
        ];
        for (what, env, input, code) in cases {
            let err = cni.exec("mesh-cni", "ADD", &env, &input).expect_err(what);
            assert_eq!(err.code, code, "{what}: {err}");
            assert!(!err.msg.is_empty(), "{what}: the error says what is wrong");
        }
        // The agent is not running: a retryable error after a bounded wait, nothing installed.
        lab.kill_agent(0).expect("kill agent");
        let _ = std::fs::remove_file(lab.cni_socket(0));
        let mut quick = config.clone();
        quick["agentWaitSeconds"] = json!(1);
        let err = lab
            .cni(0)
            .exec(
                "mesh-cni",
                "ADD",
                &env("ADD", &netns),
                &serde_json::to_vec(&quick).expect("json"),
            )
            .expect_err("no agent");
        assert_eq!(err.code, 11, "{err}");
        assert!(!captured(&lab, "n1-b"), "no rules left half-installed");
    }
);

lab_test!(
    relabelled_pods_are_captured_and_released_without_a_restart,
    LabOptions::default(),
    |mut lab| {
        echo_server(&lab, "n2-a");
        let through_mesh = |lab: &Lab| lab.total(0, "hbone_streams_opened").expect("stats");
        let mut plain = lab
            .connect_from("n1-b", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut plain, b"plain").expect("echo"), b"plain");
        assert_eq!(through_mesh(&lab), 0, "n1-b is outside the mesh");

        lab.set_enrolled("n1-b", true).expect("label ambient");
        assert!(captured(&lab, "n1-b"), "rules installed in the running pod");
        let mut meshed = lab
            .connect_from("n1-b", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut meshed, b"meshed").expect("echo"), b"meshed");
        assert_eq!(
            through_mesh(&lab),
            1,
            "n1-b's new connection went through HBONE"
        );

        lab.set_enrolled("n1-b", false).expect("label none");
        assert!(!captured(&lab, "n1-b"), "rules removed");
        let mut again = lab
            .connect_from("n1-b", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(
            roundtrip(&mut again, b"plain again").expect("echo"),
            b"plain again"
        );
        assert_eq!(through_mesh(&lab), 1, "and plain TCP once released");
    }
);

lab_test!(
    restarts_serve_enrolled_pods_again_without_cni,
    LabOptions::default(),
    |mut lab| {
        echo_server(&lab, "n2-a");
        let mut before = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut before, b"one").expect("echo"), b"one");

        // The agent restarts: it reloads its enrollments; the data planes keep serving.
        for node in 0..2 {
            lab.restart_agent(node).expect("agent restart");
        }
        assert_eq!(roundtrip(&mut before, b"two").expect("still open"), b"two");
        // Each data plane took the restarted agent's complete snapshot (a new epoch) in by
        // comparing it with the index it held, not by building the world again.
        for node in 0..2 {
            let compared = || lab.stats(node).expect("stats")["snapshot"]["compared"].as_u64();
            assert!(
                eventually(Duration::from_secs(10), || compared() >= Some(1)),
                "node {node}: {:?}",
                lab.stats(node).expect("stats")["snapshot"]
            );
            assert!(lab
                .process_log("dataplane", node)
                .contains("compared_changed_workloads="));
        }
        let log = std::fs::read_to_string(lab.dir.join("ctrl-agent-node-1.log")).expect("log");
        assert!(
            !log.contains("forgetting an enrollment"),
            "every pod survived the restart"
        );

        // The data planes restart (no CNI call anywhere): they get the namespaces from the agents.
        for node in 0..2 {
            lab.restart_dataplane(node).expect("data plane restart");
            lab.wait_serving(node, Duration::from_secs(20))
                .expect("serving again");
        }
        let mut after = lab
            .connect_from("n1-a", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut after, b"three").expect("echo"), b"three");
        assert!(
            lab.total(1, "hbone_streams_accepted").expect("stats") >= 1,
            "through the mesh"
        );
    }
);

lab_test!(
    a_pod_captured_without_policy_routing_is_served_and_gets_it_when_the_agent_restarts,
    LabOptions::default(),
    |mut lab| {
        const WHO: u16 = 9100;
        address_reporter(&lab, "n2-a", WHO);
        let client = lab.pod("n1-a").ip.to_string();
        let server = lab.pod("n2-a").ip.to_string();
        let seen = |lab: &Lab| seen_by_app(lab, "n1-a", lab.addr("n2-a", WHO));
        assert_eq!(seen(&lab), client);

        // What an agent from before original-source preservation left in a pod: the capture
        // rules without the policy routing. A data plane that finds the pod so connects from
        // the pod's own address, and the connection still works.
        let ns = lab.pod("n2-a").netns.clone();
        for family in ["-4", "-6"] {
            perf::sys::run("ip", &["-n", &ns, family, "rule", "del", "pref", "32764"])
                .expect("rule removed");
        }
        lab.restart_dataplane(1).expect("data plane restart");
        lab.wait_serving(1, Duration::from_secs(20))
            .expect("serving again");
        assert_eq!(seen(&lab), server);
        assert!(lab
            .process_log("dataplane", 1)
            .contains("no policy routing for original sources in this pod"));

        // The agent restarts (an upgrade): it installs its rules again in every captured pod,
        // and the data plane, handed the namespaces again, takes the client's address.
        lab.restart_agent(1).expect("agent restart");
        assert!(
            eventually(Duration::from_secs(10), || seen(&lab) == client),
            "the application sees its client again"
        );
        assert!(lab.total(1, "hbone_streams_accepted").expect("stats") >= 2);
    }
);

lab_test!(
    a_recreated_sandbox_is_served_in_its_new_namespace,
    LabOptions::default(),
    |lab| {
        echo_server(&lab, "n2-a");
        let pod = lab.pod("n1-a").clone();
        // The data plane is paused while the runtime recreates the sandbox, so that it learns
        // of the removal and the return in one read: the pod, its address and its source of
        // namespace are unchanged, only the namespace is new.
        lab.signal_dataplane(0, "STOP").expect("SIGSTOP");
        // ADD answers once the data plane listens in the new namespace: it resumes while the
        // ADD waits, after both changes reached it.
        let recreated = std::thread::scope(|scope| {
            let recreate = scope.spawn(|| lab.recreate_sandbox(&pod));
            std::thread::sleep(Duration::from_secs(1));
            lab.signal_dataplane(0, "CONT").expect("SIGCONT");
            recreate.join().expect("recreate thread")
        });
        let netns = recreated.expect("sandbox recreated");
        assert!(
            eventually(Duration::from_secs(10), || {
                lab.connect_in(&netns, lab.addr("n2-a", ECHO))
                    .is_ok_and(|mut s| {
                        roundtrip(&mut s, b"new home").is_ok_and(|e| e == b"new home")
                    })
            }),
            "the pod's new namespace is not served"
        );
        assert!(
            lab.total(1, "hbone_streams_accepted").expect("stats") >= 1,
            "through the mesh"
        );
    }
);

lab_test!(
    a_pod_added_while_the_agent_is_down_fails_retryably_then_succeeds,
    LabOptions::default(),
    |mut lab| {
        lab.kill_agent(0).expect("kill agent");
        let _ = std::fs::remove_file(lab.cni_socket(0));
        // A faster give-up than the lab's 10 s, for the test's sake.
        let pod = lab.pod("n1-a").clone();
        let sandbox = Sandbox {
            container_id: "early-bird".into(),
            ..lab.sandbox(&pod)
        };
        let config = json!({"cniVersion": "1.0.0", "name": "t", "type": "mesh-cni",
            "agentSocket": lab.cni_socket(0), "agentWaitSeconds": 1,
            "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": format!("{}/24", pod.ip)}]}});
        // Remove the pod's rules so the outcome is visible.
        std::process::Command::new("ip")
            .args([
                "netns", "exec", &pod.netns, "nft", "delete", "table", "inet", "meshdp",
            ])
            .status()
            .expect("nft");
        let err = lab
            .cni(0)
            .invoke("ADD", &config, &sandbox, config.get("prevResult"))
            .expect_err("the agent is down");
        assert_eq!(err.code, 11, "try again later: {err}");
        assert!(
            !captured(&lab, "n1-a"),
            "the pod does not start captured-by-nobody"
        );
        lab.restart_agent(0).expect("agent back");
        lab.cni(0)
            .invoke("ADD", &config, &sandbox, config.get("prevResult"))
            .expect("the retry succeeds");
        assert!(captured(&lab, "n1-a"));
    }
);

/// `nft` with `args` in a node's namespace, where the agent keeps its host probe table.
fn nft_on_node(lab: &Lab, node: usize, args: &[&str]) -> std::process::Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", &lab.node_netns(node), "nft"])
        .args(args)
        .output()
        .expect("nft")
}

/// The IPv4 addresses in a node's host probe SNAT set, as nft lists them.
fn host_probe_set(lab: &Lab, node: usize) -> String {
    let out = nft_on_node(
        lab,
        node,
        &[
            "list",
            "set",
            "inet",
            "mesh-host-probes",
            "captured-pods-v4",
        ],
    );
    assert!(
        out.status.success(),
        "the agent's host probe table is missing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn host_probe_table_exists(lab: &Lab, node: usize) -> bool {
    nft_on_node(lab, node, &["list", "table", "inet", "mesh-host-probes"])
        .status
        .success()
}

/// The peer of the next connection `listener` accepts within `timeout`, if any.
fn accepted_peer(listener: &std::net::TcpListener, timeout: Duration) -> Option<SocketAddr> {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((_, peer)) => return Some(peer),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A kubelet-like probe: a plain TCP connection from the node's own namespace to the pod
/// (whether it got through is for the pod's application to tell).
fn probe_from_node(lab: &Lab, pod: &str) -> Option<TcpStream> {
    let mut stream = lab
        .connect_in(&lab.node_netns(0), lab.addr(pod, ECHO))
        .ok()?;
    stream.write_all(b"GET /healthz").ok()?;
    Some(stream)
}

lab_test!(
    kubelet_probes_reach_a_strict_pod_from_its_node_and_plaintext_pods_still_do_not,
    LabOptions::default(),
    |mut lab| {
        lab.apply(
            "peerAuthentications:
  - name: strict
    namespace: default
    mtls: {mode: STRICT}
",
        )
        .expect("STRICT");
        let app = lab.listen_in("n1-a", ECHO).expect("listen");
        let _probe = probe_from_node(&lab, "n1-a");
        let peer = accepted_peer(&app, Duration::from_secs(5));
        assert_eq!(
            peer.map(|p| p.ip()),
            Some("169.254.7.127".parse().expect("ip")),
            "the probe reaches the application itself, from the probe address"
        );
        let (a, b) = (
            lab.pod("n1-a").ip.to_string(),
            lab.pod("n1-b").ip.to_string(),
        );
        let set = host_probe_set(&lab, 0);
        assert!(set.contains(&a), "the captured pod is in the set: {set}");
        assert!(!set.contains(&b), "the opted-out pod is not: {set}");

        // A pod outside the mesh, on the same node, is still refused by STRICT.
        let refused_before = lab.total(0, "plaintext_refused_strict").expect("stats");
        if let Ok(mut plain) = lab.connect_from("n1-b", lab.addr("n1-a", ECHO)) {
            assert!(
                roundtrip(&mut plain, b"knock").is_err(),
                "STRICT refuses plaintext"
            );
        }
        assert_eq!(
            accepted_peer(&app, Duration::from_secs(1)),
            None,
            "the plaintext pod never reaches the application"
        );
        assert!(lab.total(0, "plaintext_refused_strict").expect("stats") > refused_before);

        // A restarted agent installs the table again, from the pods it remembers.
        let deleted = nft_on_node(&lab, 0, &["delete", "table", "inet", "mesh-host-probes"]);
        assert!(deleted.status.success(), "{deleted:?}");
        lab.restart_agent(0).expect("agent back");
        assert!(
            eventually(Duration::from_secs(5), || host_probe_table_exists(&lab, 0)),
            "the restarted agent installs the table"
        );
        assert!(host_probe_set(&lab, 0).contains(&a));
        let _probe = probe_from_node(&lab, "n1-a");
        assert!(accepted_peer(&app, Duration::from_secs(5)).is_some());

        // A clean shutdown that is no uninstall (the lab's agent has no DaemonSet: taken as
        // a restart) leaves the table: the pods stay captured and served, so probes keep
        // passing while the agent is down, until the next agent replaces the table.
        lab.stop_agent(0).expect("agent stops");
        assert!(
            host_probe_set(&lab, 0).contains(&a),
            "the stopped agent left its table for the next one"
        );
        let _probe = probe_from_node(&lab, "n1-a");
        assert_eq!(
            accepted_peer(&app, Duration::from_secs(5)).map(|p| p.ip()),
            Some("169.254.7.127".parse().expect("ip")),
            "a probe while the agent is down"
        );
        lab.restart_agent(0).expect("agent back");

        // The pod goes away: its address leaves the set.
        lab.detach(&lab.pod("n1-a").clone()).expect("CNI DEL");
        let set = host_probe_set(&lab, 0);
        assert!(!set.contains(&a), "the removed pod left the set: {set}");
    }
);

lab_test!(
    add_answers_once_the_data_plane_listens_in_the_pod,
    LabOptions::default(),
    |mut lab| {
        echo_server(&lab, "n2-a");
        let pod = lab
            .add_pod_unattached(0, "late", true, "default", "default")
            .expect("pod");
        let sandbox = lab.sandbox(&pod);
        // With node 1's data plane paused, nothing can serve the pod: ADD must not answer.
        lab.signal_dataplane(0, "STOP").expect("SIGSTOP");
        let (answered_early, added) = std::thread::scope(|scope| {
            let add = scope.spawn(|| lab.cni(0).add(&sandbox));
            std::thread::sleep(Duration::from_secs(2));
            let early = add.is_finished();
            lab.signal_dataplane(0, "CONT").expect("SIGCONT");
            (early, add.join().expect("ADD thread"))
        });
        assert!(
            !answered_early,
            "ADD answered before the data plane listened in the pod"
        );
        added.expect("ADD succeeds once the data plane listens");
        // So the pod's very first connection, made the moment ADD answered, is served.
        let before = lab.total(1, "hbone_streams_accepted").expect("stats");
        let mut first = lab
            .connect_from("n1-late", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut first, b"first").expect("echo"), b"first");
        assert_eq!(
            lab.total(1, "hbone_streams_accepted").expect("stats"),
            before + 1,
            "through the mesh"
        );

        // A data plane that does not come back in time: ADD gives up, retryably, saying why.
        let other = lab
            .add_pod_unattached(0, "later", true, "default", "default")
            .expect("pod");
        lab.signal_dataplane(0, "STOP").expect("SIGSTOP");
        let refused = lab.cni(0).add(&lab.sandbox(&other));
        lab.signal_dataplane(0, "CONT").expect("SIGCONT");
        let error = refused.expect_err("ADD without a data plane serving the pod");
        assert_eq!(error.code, 11, "try again later: {error}");
        assert!(
            error.details.contains("did not listen in the pod"),
            "{error}"
        );
        // As a runtime does after a failed ADD: DEL, then ADD again.
        lab.cni(0).del(&lab.sandbox(&other)).expect("DEL");
        lab.attach(&other).expect("ADD again");
        let mut later = lab
            .connect_from("n1-later", lab.addr("n2-a", ECHO))
            .expect("connect");
        assert_eq!(roundtrip(&mut later, b"later").expect("echo"), b"later");
    }
);
