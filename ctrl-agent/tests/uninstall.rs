//! Telling an uninstall from a restart at shutdown, against the kube-apiserver double
//! (`fake_apiserver`: no real API server can be installed on this machine), which serves the
//! agent's pod, its DaemonSet and its node as `GET` of one object.

mod fake_apiserver;

use ctrl_agent::uninstall::{departure, Departure};
use fake_apiserver::{objects, FakeApiServer, DAEMON_SETS, NODES, PODS};
use serde_json::json;

const NAMESPACE: &str = objects::MESH_NAMESPACE;
const POD: &str = objects::MESH_POD;

fn ask(server: &FakeApiServer) -> Result<Departure, kube::Error> {
    ask_at(&server.url())
}

/// A kube client is made inside its runtime (it spawns onto it).
fn ask_at(url: &str) -> Result<Departure, kube::Error> {
    let config = kube::Config::new(url.parse().expect("url"));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let client = kube::Client::try_from(config)?;
            departure(client, NAMESPACE, POD).await
        })
}

#[test]
fn only_a_daemon_set_deleted_or_being_deleted_means_an_uninstall() {
    let server = FakeApiServer::start();
    server.apply(PODS, objects::mesh_pod(true));
    server.apply(DAEMON_SETS, objects::mesh_daemon_set(false));
    let node = |pool: &str| objects::node(objects::MESH_NODE, json!({"pool": pool}));
    server.apply(NODES, node("mesh"));
    assert_eq!(
        ask(&server).expect("answer"),
        Departure::Restart,
        "rolling update"
    );
    // The node leaves the DaemonSet's node selector: its pod goes, and no other follows.
    server.apply(NODES, node("batch"));
    assert_eq!(
        ask(&server).expect("answer"),
        Departure::Uninstall,
        "no longer placed on this node"
    );
    server.apply(NODES, node("mesh"));
    server.apply(DAEMON_SETS, objects::mesh_daemon_set(true));
    assert_eq!(
        ask(&server).expect("answer"),
        Departure::Uninstall,
        "helm uninstall: the DaemonSet is being deleted (foreground)"
    );
    server.delete(DAEMON_SETS, &format!("{NAMESPACE}/mesh-dataplane"));
    assert_eq!(
        ask(&server).expect("answer"),
        Departure::Uninstall,
        "the DaemonSet is gone"
    );
    // The agent read its own pod, then the DaemonSet named by the pod's controller.
    assert!(server.requests(&format!("/api/v1/namespaces/{NAMESPACE}/pods/{POD}")) >= 3);
    assert!(
        server.requests(&format!(
            "/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/mesh-dataplane"
        )) >= 3
    );
}

#[test]
fn a_pod_no_daemon_set_controls_or_that_is_gone_is_a_restart() {
    let server = FakeApiServer::start();
    server.apply(PODS, objects::mesh_pod(false));
    assert_eq!(
        ask(&server).expect("answer"),
        Departure::Restart,
        "run by hand"
    );
    server.delete(PODS, &format!("{NAMESPACE}/{POD}"));
    assert_eq!(ask(&server).expect("answer"), Departure::Restart, "no pod");
}

#[test]
fn an_api_that_refuses_is_an_error_not_an_answer() {
    let server = FakeApiServer::start();
    let url = server.url();
    drop(server);
    let answer = ask_at(&url);
    assert!(answer.is_err(), "{answer:?}");
}
