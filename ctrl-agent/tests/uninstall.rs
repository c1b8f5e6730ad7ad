//! Telling an uninstall from a restart at shutdown, against the kube-apiserver double
//! (`fake_apiserver`: no real API server can be installed on this machine), which serves the
//! agent's pod, its DaemonSet and its node as `GET` of one object.

mod fake_apiserver;

use ctrl_agent::uninstall::{departure, Departure, NodeRules, NODE_RULES_ANNOTATION};
use fake_apiserver::{objects, FakeApiServer, DAEMON_SETS, NODES, PODS};
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

const NAMESPACE: &str = objects::MESH_NAMESPACE;
const POD: &str = objects::MESH_POD;

fn ask(server: &FakeApiServer, rules: NodeRules) -> Result<Departure, kube::Error> {
    ask_at(&server.url(), rules)
}

/// A kube client is made inside its runtime (it spawns onto it).
fn ask_at(url: &str, rules: NodeRules) -> Result<Departure, kube::Error> {
    let config = kube::Config::new(url.parse().expect("url"));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let client = kube::Client::try_from(config)?;
            departure(client, NAMESPACE, POD, rules).await
        })
}

/// A running node: the pod, its DaemonSet, and the node it places pods on.
fn running() -> FakeApiServer {
    let server = FakeApiServer::start();
    server.apply(PODS, objects::mesh_pod(true));
    server.apply(DAEMON_SETS, objects::mesh_daemon_set(false));
    server.apply(NODES, node("mesh"));
    server
}

fn node(pool: &str) -> serde_json::Value {
    objects::node(objects::MESH_NODE, json!({"pool": pool}))
}

const BOTH: [NodeRules; 2] = [NodeRules::CniChain, NodeRules::HostProbeTable];

#[test]
fn a_daemon_set_that_stays_is_a_restart_and_one_deleted_an_uninstall() {
    let server = running();
    for rules in BOTH {
        assert_eq!(
            ask(&server, rules).expect("answer"),
            Departure::Restart,
            "{rules:?}"
        );
    }
    // As a foreground deletion leaves it while its pods go.
    server.apply(DAEMON_SETS, objects::mesh_daemon_set(true));
    for rules in BOTH {
        assert_eq!(
            ask(&server, rules).expect("answer"),
            Departure::Uninstall,
            "{rules:?}"
        );
    }
    // As `helm uninstall` leaves it (background deletion): gone.
    server.delete(DAEMON_SETS, &format!("{NAMESPACE}/mesh-dataplane"));
    for rules in BOTH {
        assert_eq!(
            ask(&server, rules).expect("answer"),
            Departure::Uninstall,
            "{rules:?}"
        );
    }
    // The agent read its own pod, then the DaemonSet named by the pod's controller.
    assert!(server.requests(&format!("/api/v1/namespaces/{NAMESPACE}/pods/{POD}")) >= 6);
    assert!(
        server.requests(&format!(
            "/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/mesh-dataplane"
        )) >= 6
    );
}

#[test]
fn a_daemon_set_that_no_longer_places_pods_here_or_keeps_the_rules_is_an_uninstall() {
    let server = running();
    // The node leaves the DaemonSet's node selector: its pod goes, and no other follows.
    server.apply(NODES, node("batch"));
    for rules in BOTH {
        assert_eq!(
            ask(&server, rules).expect("answer"),
            Departure::Uninstall,
            "{rules:?}"
        );
    }
    server.apply(NODES, node("mesh"));
    // An upgrade that turns the host probe SNAT off: the new pods keep only the chain.
    let mut cni_only = objects::mesh_daemon_set(false);
    cni_only["metadata"]["annotations"][NODE_RULES_ANNOTATION] = "cni-chain".into();
    server.apply(DAEMON_SETS, cni_only.clone());
    assert_eq!(
        ask(&server, NodeRules::CniChain).expect("answer"),
        Departure::Restart
    );
    assert_eq!(
        ask(&server, NodeRules::HostProbeTable).expect("answer"),
        Departure::Uninstall
    );
    // A DaemonSet from before the annotation keeps nothing of ours.
    cni_only["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("annotations");
    server.apply(DAEMON_SETS, cni_only);
    for rules in BOTH {
        assert_eq!(
            ask(&server, rules).expect("answer"),
            Departure::Uninstall,
            "{rules:?}"
        );
    }
}

#[test]
fn a_pod_no_daemon_set_controls_or_that_is_gone_is_an_uninstall() {
    let server = running();
    // Orphaned (a delete with --cascade=orphan, then the pod's own deletion).
    server.apply(PODS, objects::mesh_pod(false));
    assert_eq!(
        ask(&server, NodeRules::CniChain).expect("answer"),
        Departure::Uninstall
    );
    // Force-deleted while its containers still stop.
    server.delete(PODS, &format!("{NAMESPACE}/{POD}"));
    assert_eq!(
        ask(&server, NodeRules::CniChain).expect("answer"),
        Departure::Uninstall
    );
}

#[test]
fn an_api_that_refuses_is_an_error_not_an_answer() {
    let server = FakeApiServer::start();
    let url = server.url();
    drop(server);
    let answer = ask_at(&url, NodeRules::CniChain);
    assert!(answer.is_err(), "{answer:?}");
}

/// The `ctrl-agent` process at a clean shutdown: whether the host probe table it installed in
/// a network namespace of its own (standing for the node's) is still there after SIGTERM,
/// given its pod and the API server double. Needs root, `ip` and `nft`, as CI has them.
fn table_left_after_sigterm(server: &FakeApiServer) -> bool {
    let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
    let node_netns = format!("mesh-uninstall-{}", std::process::id());
    let ip = |args: &[&str]| {
        let status = Command::new("ip").args(args).status().expect("ip");
        assert!(status.success(), "ip {args:?}: {status}");
    };
    let _ = Command::new("ip")
        .args(["netns", "del", &node_netns])
        .status();
    ip(&["netns", "add", &node_netns]);
    let table_exists = || {
        Command::new("ip")
            .args(["netns", "exec", &node_netns])
            .args(["nft", "list", "table", "inet", ctrl_agent::probes::TABLE])
            .output()
            .expect("nft")
            .status
            .success()
    };
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig()).expect("kubeconfig");
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "workloads: []\n").expect("config");
    let log = std::fs::File::create(dir.path().join("agent.log")).expect("log file");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_ctrl-agent"))
        .args(["--source", "file", "--node", objects::MESH_NODE])
        .arg("--config")
        .arg(&config)
        .arg("--snapshot")
        .arg(dir.path().join("snapshot"))
        .arg("--ca-dir")
        .arg(dir.path().join("ca"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--cni-socket")
        .arg(dir.path().join("cni.sock"))
        .arg("--netns-socket")
        .arg(dir.path().join("netns.sock"))
        .arg("--host-netns")
        .arg(format!("/run/netns/{node_netns}"))
        .args(["--pod-name", POD, "--pod-namespace", NAMESPACE])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("NO_PROXY", "127.0.0.1")
        .stderr(log)
        .spawn()
        .expect("spawn ctrl-agent");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !table_exists() {
        assert!(
            Instant::now() < deadline,
            "the agent never installed its table: {}",
            std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = agent.wait().expect("agent exits");
    assert!(exit.success(), "agent exited with {exit}");
    let left = table_exists();
    ip(&["netns", "del", &node_netns]);
    left
}

#[test]
fn the_agent_leaves_its_probe_table_to_a_restart_and_removes_it_at_an_uninstall() {
    let server = running();
    assert!(
        table_left_after_sigterm(&server),
        "a rolling update: the captured pods' probes must keep passing"
    );
    server.delete(DAEMON_SETS, &format!("{NAMESPACE}/mesh-dataplane"));
    assert!(!table_left_after_sigterm(&server), "helm uninstall");
}
