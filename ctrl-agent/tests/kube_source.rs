//! Whole-process tests of `ctrl-agent --source kube`: the binary runs against a double of
//! kube-apiserver on loopback (`fake_apiserver`, because no real API server can be installed
//! on this machine) and the published region is read back as the data plane reads it
//! (`Subscriber`, then `delta::replay` of the base and the log).

mod fake_apiserver;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fake_apiserver::{objects, FakeApiServer};
use fake_apiserver::{
    AUTHORIZATION_POLICIES, ENDPOINT_SLICES, GATEWAYS, GATEWAY_CLASSES, ISTIO_SECURITY_GROUP,
    NAMESPACES, PEER_AUTHENTICATIONS, PODS, SERVICES,
};
use mesh_snapshot::delta::{self, State};
use mesh_snapshot::schema::{Protocol, Snapshot};
use mesh_snapshot::test_support::ScratchDir;
use mesh_snapshot::{ReadOutcome, Subscriber};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(20);

/// The cluster every test starts from: an ambient namespace with a pod on this node (node-1)
/// and one on another, one opted out, a service, a policy and a peer authentication.
fn baseline(server: &FakeApiServer) {
    server.apply(
        NAMESPACES,
        objects::namespace("shop", json!({"istio.io/dataplane-mode": "ambient"})),
    );
    server.apply(NAMESPACES, objects::namespace("legacy", json!({})));
    server.apply(PODS, cart(json!({})));
    server.apply(
        PODS,
        objects::pod("shop", "web", "uid-web", "node-2", &["10.0.0.2"], json!({})),
    );
    server.apply(
        PODS,
        objects::pod(
            "shop",
            "batch",
            "uid-batch",
            "node-1",
            &["10.0.0.3"],
            json!({"istio.io/dataplane-mode": "none"}),
        ),
    );
    server.apply(
        PODS,
        objects::pod(
            "legacy",
            "old",
            "uid-old",
            "node-1",
            &["10.0.0.4"],
            json!({}),
        ),
    );
    server.apply_cart_service();
    server.apply(
        AUTHORIZATION_POLICIES,
        objects::authorization_policy(
            "shop",
            "deny-evil",
            json!({
                "action": "DENY",
                "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}],
            }),
        ),
    );
    server.apply(
        PEER_AUTHENTICATIONS,
        objects::peer_authentication(
            "istio-system",
            "default",
            json!({"mtls": {"mode": "STRICT"}}),
        ),
    );
}

/// The baseline's pod on this node (in namespace shop, captured there), with `labels`.
fn cart(labels: Value) -> Value {
    objects::pod("shop", "cart", "uid-cart", "node-1", &["10.0.0.1"], labels)
}

/// The agent process, killed when dropped; its log is kept for failure messages.
struct Agent {
    child: Child,
    dir: ScratchDir,
    reader: Reader,
}

impl Agent {
    fn start(server: &FakeApiServer) -> Agent {
        Agent::launch(server, false, ScratchDir::new().expect("scratch dir"))
    }

    /// With its CNI sockets in its scratch directory (and no probe SNAT table: the test runs
    /// in the machine's own namespace).
    fn start_with_cni(server: &FakeApiServer) -> Agent {
        Agent::launch(server, true, ScratchDir::new().expect("scratch dir"))
    }

    fn cni_socket(&self) -> std::path::PathBuf {
        self.dir.path().join("cni.sock")
    }

    fn launch(server: &FakeApiServer, cni: bool, dir: ScratchDir) -> Agent {
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig()).expect("kubeconfig");
        let log = std::fs::File::create(dir.path().join("agent.log")).expect("log file");
        let snapshot = dir.path().join("snapshot");
        let child = Command::new(env!("CARGO_BIN_EXE_ctrl-agent"))
            .args([
                "--source",
                "kube",
                "--node",
                "node-1",
                "--poll-interval",
                "100ms",
            ])
            .arg("--snapshot")
            .arg(&snapshot)
            .arg("--ca-dir")
            .arg(dir.path().join("ca"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(if cni {
                vec![
                    "--cni-socket".into(),
                    dir.path().join("cni.sock").into_os_string(),
                    "--netns-socket".into(),
                    dir.path().join("netns.sock").into_os_string(),
                    "--host-probe-snat=false".into(),
                ]
            } else {
                Vec::new()
            })
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("CTRL_AGENT_CONFIG")
            .env("NO_PROXY", "127.0.0.1")
            .env("RUST_LOG", "info,ctrl_agent=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("ctrl-agent runs");
        Agent {
            child,
            dir,
            reader: Reader {
                subscriber: Subscriber::new(&snapshot),
                held: None,
                bases: 0,
            },
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// `GET path` on the agent's metrics endpoint (its port is in the log): status and body.
    fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path)
    }

    /// A bodiless request on the agent's metrics endpoint: status and body.
    fn request(&self, method: &str, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let end = Instant::now() + TIMEOUT;
        let addr = loop {
            let log = self.log();
            let bound = log
                .lines()
                .filter(|l| l.contains("metrics on /metrics"))
                .find_map(|l| l.split("bound=").nth(1)?.split_whitespace().next())
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok());
            match bound {
                Some(addr) => break addr,
                None if Instant::now() > end => panic!("no metrics endpoint in the log:\n{log}"),
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut conn = std::net::TcpStream::connect(addr).expect("connect");
        write!(conn, "{method} {path} HTTP/1.1\r\nhost: agent\r\n\r\n").expect("send");
        let mut answer = String::new();
        conn.read_to_string(&mut answer).expect("answer");
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not HTTP: {answer}"));
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (status, body.to_owned())
    }

    /// The value of `series` (name and labels as written) on the agent's `/metrics`.
    fn metric(&self, series: &str) -> f64 {
        let (status, text) = self.get("/metrics");
        assert_eq!(status, 200, "{text}");
        mesh_io::stats::series_value(&text, series)
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    /// The log's ERROR lines that contain `text`.
    fn errors(&self, text: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(" ERROR ") && l.contains(text))
            .map(str::to_owned)
            .collect()
    }

    /// Checks for `for_how_long` that nothing (`published`: nothing more than `published`)
    /// is published.
    fn holds(&mut self, for_how_long: Duration, published: Option<&Snapshot>, why: &str) {
        let until = Instant::now() + for_how_long;
        while Instant::now() < until {
            let latest = self.reader.latest();
            assert!(latest.as_ref() == published, "{why}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The first published state that satisfies `f`.
    fn until(&mut self, what: &str, f: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let end = Instant::now() + TIMEOUT;
        loop {
            if let Some(snap) = self.reader.latest() {
                if f(&snap) {
                    return snap;
                }
            }
            if Instant::now() > end {
                panic!(
                    "timed out waiting for {what}; last state: {:#?}\nagent log:\n{}",
                    self.reader.latest_held(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the region as the data plane does: a base, then deltas applied to what it holds.
struct Reader {
    subscriber: Subscriber,
    held: Option<State>,
    /// How many complete snapshots (rather than deltas on what was held) were read.
    bases: usize,
}

impl Reader {
    /// Whether anything was published at all yet.
    fn published(&mut self) -> bool {
        self.latest().is_some()
    }

    /// The state after everything published so far (`None` before the first publication).
    fn latest(&mut self) -> Option<Snapshot> {
        match self.subscriber.read() {
            Ok(ReadOutcome::New { base, deltas, .. }) => {
                self.bases += usize::from(base.is_some());
                self.held = delta::replay(self.held.take(), base.as_ref(), &deltas)
                    .expect("published records decode");
            }
            Ok(ReadOutcome::Unchanged) => {}
            // Not created or not published yet.
            Err(_) => return None,
        }
        self.latest_held()
    }

    fn latest_held(&self) -> Option<Snapshot> {
        self.held.as_ref().map(State::snapshot)
    }
}

fn workload_names(snap: &Snapshot) -> Vec<&str> {
    let mut names: Vec<&str> = snap.workloads.iter().map(|w| w.name.as_str()).collect();
    names.sort_unstable();
    names
}

fn identities(snap: &Snapshot) -> Vec<&str> {
    let mut ids: Vec<&str> = snap
        .identities
        .iter()
        .map(|i| i.spiffe_id.as_str())
        .collect();
    ids.sort_unstable();
    ids
}

fn protocol(snap: &Snapshot, name: &str) -> Option<Protocol> {
    snap.workloads
        .iter()
        .find(|w| w.name == name)
        .map(|w| Protocol::try_from(w.protocol).unwrap_or(Protocol::Tcp))
}

#[test]
fn nothing_is_published_until_every_initial_list_is_done() {
    let server = FakeApiServer::start();
    baseline(&server);
    server.set_list_delay(AUTHORIZATION_POLICIES, Duration::from_millis(2500));
    let mut agent = Agent::start(&server);
    // Every other kind is listed (and watched) while the policies' list is still pending.
    server.wait_for("the other kinds' watches", TIMEOUT, |s| {
        [
            NAMESPACES,
            PODS,
            SERVICES,
            ENDPOINT_SLICES,
            PEER_AUTHENTICATIONS,
        ]
        .iter()
        .all(|p| !s.watch_versions(p).is_empty())
            && s.lists(AUTHORIZATION_POLICIES) > 0
    });
    let pending_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < pending_until {
        assert!(
            !agent.reader.published(),
            "published before the policies were listed:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Not ready, and it says what it waits for.
    let (status, why) = agent.get("/healthz/ready");
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("listing authorizationpolicies"), "{why}");
    assert!(!why.contains("pods"), "{why}");
    assert_eq!(
        agent.metric("meshagent_kube_listed{kind=\"authorizationpolicies\"}"),
        0.0
    );
    assert_eq!(agent.metric("meshagent_kube_listed{kind=\"pods\"}"), 1.0);
    let first = agent.until("the first publication", |_| true);
    let (status, ready) = agent.get("/healthz/ready");
    assert_eq!((status, ready.as_str()), (200, "ready\n"));
    // The log filter changes at runtime (the test connects from the loopback), and the
    // agent logs at the new level.
    assert_eq!(
        agent.get("/logging"),
        (200, "info,ctrl_agent=debug\n".into())
    );
    assert_eq!(
        agent.request("POST", "/logging?level=info,ctrl_agent=trace"),
        (200, "info,ctrl_agent=trace\n".into())
    );
    assert_eq!(
        agent.get("/logging"),
        (200, "info,ctrl_agent=trace\n".into())
    );
    assert!(
        agent.log().contains("log filter changed"),
        "{}",
        agent.log()
    );
    assert_eq!(
        agent.metric("meshagent_kube_listed{kind=\"authorizationpolicies\"}"),
        1.0
    );
    assert_eq!(workload_names(&first), ["batch", "cart", "old", "web"]);
    assert_eq!(first.services.len(), 1);
    assert_eq!(
        first.policies.len(),
        1,
        "the slow kind is in the first publication"
    );
    assert_eq!(first.peer_authentications.len(), 1);
    assert!(
        first.source.starts_with("kube:http://127.0.0.1:"),
        "{}",
        first.source
    );
}

#[test]
fn namespace_labels_enroll_none_opts_out_and_only_this_nodes_identities_get_certificates() {
    let server = FakeApiServer::start();
    baseline(&server);
    let mut agent = Agent::start(&server);
    let snap = agent.until("the first publication with a certificate", |s| {
        !s.identities.is_empty()
    });
    assert_eq!(
        protocol(&snap, "cart"),
        Some(Protocol::Hbone),
        "namespace label"
    );
    assert_eq!(protocol(&snap, "web"), Some(Protocol::Hbone));
    assert_eq!(
        protocol(&snap, "batch"),
        Some(Protocol::Tcp),
        "pod opts out"
    );
    assert_eq!(
        protocol(&snap, "old"),
        Some(Protocol::Tcp),
        "namespace not ambient"
    );
    // cart is the only enrolled pod on node-1: web is on node-2, batch and old are not in
    // the mesh.
    assert_eq!(
        identities(&snap),
        ["spiffe://cluster.local/ns/shop/sa/cart-sa"]
    );
    let cart = snap
        .workloads
        .iter()
        .find(|w| w.name == "cart")
        .expect("cart");
    assert_eq!(cart.uid, "uid-cart");
    assert_eq!(cart.node, "node-1");
    assert_eq!(cart.ips, [vec![10, 0, 0, 1]]);
    assert_eq!(snap.services[0].endpoints, ["uid-cart"]);

    // Labelling the legacy namespace brings its pod in, with a certificate.
    server.apply(
        NAMESPACES,
        objects::namespace("legacy", json!({"istio.io/dataplane-mode": "ambient"})),
    );
    let snap = agent.until("old enrolled", |s| {
        protocol(s, "old") == Some(Protocol::Hbone) && s.identities.len() == 2
    });
    assert_eq!(
        identities(&snap),
        [
            "spiffe://cluster.local/ns/legacy/sa/old-sa",
            "spiffe://cluster.local/ns/shop/sa/cart-sa"
        ]
    );
}

#[test]
fn pods_added_modified_and_deleted_through_the_watch_show_up() {
    let server = FakeApiServer::start();
    baseline(&server);
    let mut agent = Agent::start(&server);
    agent.until("the first publication", |_| true);
    server.apply(
        PODS,
        objects::pod("shop", "new", "uid-new", "node-1", &["10.0.0.9"], json!({})),
    );
    let snap = agent.until("new added", |s| workload_names(s).contains(&"new"));
    assert_eq!(protocol(&snap, "new"), Some(Protocol::Hbone));
    assert_eq!(agent.reader.bases, 1, "a pod's arrival is a delta record");
    agent.until("new's certificate", |s| {
        identities(s).contains(&"spiffe://cluster.local/ns/shop/sa/new-sa")
    });
    // Opting the pod out is a modification.
    server.apply(
        PODS,
        objects::pod(
            "shop",
            "new",
            "uid-new",
            "node-1",
            &["10.0.0.9"],
            json!({"istio.io/dataplane-mode": "none"}),
        ),
    );
    let snap = agent.until("new opted out", |s| {
        protocol(s, "new") == Some(Protocol::Tcp)
    });
    assert!(!identities(&snap).contains(&"spiffe://cluster.local/ns/shop/sa/new-sa"));
    server.delete(PODS, "shop/new");
    agent.until("new deleted", |s| !workload_names(s).contains(&"new"));
    // An endpoint going unready leaves the service's endpoints.
    server.apply(
        ENDPOINT_SLICES,
        objects::endpoint_slice(
            "shop",
            "cart",
            &[("uid-cart", "10.0.0.1", false)],
            &[("http", 8080)],
        ),
    );
    agent.until("cart unready", |s| s.services[0].endpoints.is_empty());
}

#[test]
fn a_410_during_the_watch_relists_and_what_was_deleted_in_the_gap_is_gone() {
    let server = FakeApiServer::start();
    baseline(&server);
    let mut agent = Agent::start(&server);
    agent.until("the first publication", |s| {
        workload_names(s).contains(&"web")
    });
    server.wait_for("a pod watch", TIMEOUT, |s| {
        !s.watch_versions(PODS).is_empty()
    });
    // web goes with no event the watch could deliver, and the history is compacted: the
    // open watch ends with ERROR 410 Expired.
    server.delete_in_gap(PODS, "shop/web");
    // The relist takes a while: meanwhile the agent says the pods are not listed, and stays
    // ready (the data plane serves what was published).
    server.set_list_delay(PODS, Duration::from_millis(1500));
    server.expire_watches(PODS);
    let end = Instant::now() + TIMEOUT;
    while agent.metric("meshagent_kube_listed{kind=\"pods\"}") != 0.0 {
        assert!(Instant::now() < end, "never relisting:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(agent.get("/healthz/ready").0, 200);
    let snap = agent.until("web gone", |s| !workload_names(s).contains(&"web"));
    assert_eq!(workload_names(&snap), ["batch", "cart", "old"]);
    assert_eq!(server.lists(PODS), 2, "one relist");
    // The agent's own figures say the same: two lists of pods, both complete, no failure.
    assert_eq!(
        agent.metric("meshagent_kube_lists_total{kind=\"pods\"}"),
        2.0
    );
    assert_eq!(agent.metric("meshagent_kube_listed{kind=\"pods\"}"), 1.0);
    assert_eq!(
        agent.metric("meshagent_kube_watch_errors_total{kind=\"pods\"}"),
        0.0
    );
    // cart is this node's one pod in the mesh: one certificate, and when it runs out.
    let snap = agent.until("cart's certificate", |s| !s.identities.is_empty());
    assert_eq!(agent.metric("meshagent_identities_wanted"), 1.0);
    assert_eq!(agent.metric("meshagent_certificates"), 1.0);
    assert_eq!(
        agent.metric("meshagent_certificate_earliest_expiry_timestamp_seconds"),
        snap.identities[0].not_after_unix as f64
    );
    for reason in ["unreachable", "refused", "bad_answer", "local"] {
        let series = format!("meshagent_certificate_failures_total{{reason=\"{reason}\"}}");
        assert_eq!(agent.metric(&series), 0.0, "{series}");
    }
    assert!(agent.metric("meshagent_snapshot_publications_total{kind=\"change\"}") >= 1.0);
    assert_eq!(
        agent.metric("meshagent_snapshot_publications_total{kind=\"complete\"}"),
        1.0,
        "the relist changed one pod: a change, not a new complete snapshot"
    );
    // And the relisted store keeps following the watch.
    server.apply(
        PODS,
        objects::pod(
            "shop",
            "after",
            "uid-after",
            "node-2",
            &["10.0.0.8"],
            json!({}),
        ),
    );
    agent.until("after added", |s| workload_names(s).contains(&"after"));
}

#[test]
fn a_dropped_watch_resumes_from_the_last_event_and_bookmarks_move_that_point() {
    let server = FakeApiServer::start();
    baseline(&server);
    let mut agent = Agent::start(&server);
    agent.until("the first publication", |_| true);
    server.wait_for("a pod watch", TIMEOUT, |s| {
        !s.watch_versions(PODS).is_empty()
    });
    let rv = server.apply(
        PODS,
        objects::pod("shop", "new", "uid-new", "node-2", &["10.0.0.9"], json!({})),
    );
    agent.until("new added", |s| workload_names(s).contains(&"new"));

    // The connection dies mid-stream: the watcher comes back from the last event it saw.
    let watches = server.watch_versions(PODS).len();
    server.cut_watches(PODS);
    server.wait_for("the pod watch to resume", TIMEOUT, |s| {
        s.watch_versions(PODS).len() > watches
    });
    assert_eq!(
        server.watch_versions(PODS).last(),
        Some(&rv.to_string()),
        "resumed from the last event's resourceVersion"
    );
    server.apply(
        PODS,
        objects::pod(
            "shop",
            "later",
            "uid-later",
            "node-2",
            &["10.0.0.10"],
            json!({}),
        ),
    );
    agent.until("later added after the reconnect", |s| {
        workload_names(s).contains(&"later")
    });

    // A bookmark moves the resume point past changes to other kinds.
    server.apply(
        SERVICES,
        objects::service("shop", "other", &["10.96.0.2"], &[("http", 80, json!(80))]),
    );
    let bookmark = server.bookmark(PODS);
    // Give the bookmark time to reach the watcher before cutting (it has no visible effect).
    std::thread::sleep(Duration::from_millis(500));
    let watches = server.watch_versions(PODS).len();
    server.cut_watches(PODS);
    server.wait_for("the pod watch to resume again", TIMEOUT, |s| {
        s.watch_versions(PODS).len() > watches
    });
    assert_eq!(
        server.watch_versions(PODS).last(),
        Some(&bookmark.to_string()),
        "resumed from the bookmark"
    );
    assert_eq!(server.lists(PODS), 1, "no relist was needed");
    let snap = agent.until("everything still there", |s| s.services.len() == 2);
    assert!(workload_names(&snap).contains(&"later"));
}

/// Istio before 1.22 serves its security kinds at v1beta1 only: an unreadable DENY policy
/// must not be published as no policy.
fn serve_istio_security_at(server: &FakeApiServer, version: Option<&str>) {
    server.set_served_at(AUTHORIZATION_POLICIES, version);
    server.set_served_at(PEER_AUTHENTICATIONS, version);
}

#[test]
fn policies_served_only_at_v1beta1_are_an_error_and_nothing_is_published_until_v1_is() {
    let server = FakeApiServer::start();
    baseline(&server);
    serve_istio_security_at(&server, Some("v1beta1"));
    let mut agent = Agent::start(&server);
    let deadline = Instant::now() + TIMEOUT;
    while agent.errors("v1beta1").len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no error for each kind:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for kind in ["authorizationpolicies", "peerauthentications"] {
        let errors = agent.errors(kind);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("cannot be read"), "{}", errors[0]);
    }
    agent.holds(
        Duration::from_millis(1500),
        None,
        "published without the policies",
    );
    // Retried with backoff, and logged once, not at every retry.
    server.wait_for("the policies' list retried", TIMEOUT, |s| {
        s.lists(AUTHORIZATION_POLICIES) >= 3
    });
    assert_eq!(agent.errors("authorizationpolicies").len(), 1);
    assert!(!agent.reader.published());

    // An Istio upgrade serves v1: its policies are read and everything is published.
    serve_istio_security_at(&server, None);
    let first = agent.until("the first publication", |_| true);
    assert_eq!(first.policies.len(), 1, "the DENY policy is in it");
    assert_eq!(first.peer_authentications.len(), 1, "STRICT is in it");
    assert_eq!(workload_names(&first), ["batch", "cart", "old", "web"]);
}

#[test]
fn a_relist_that_finds_policies_only_at_v1beta1_keeps_the_published_ones() {
    let server = FakeApiServer::start();
    baseline(&server);
    let mut agent = Agent::start(&server);
    // With its certificate, so that no later publication is expected.
    let published = agent.until("the first publication", |s| {
        s.policies.len() == 1 && !s.identities.is_empty()
    });
    server.wait_for("a policy watch", TIMEOUT, |s| {
        !s.watch_versions(AUTHORIZATION_POLICIES).is_empty()
    });
    // Istio is downgraded, and the policies' watch must relist.
    server.set_served_at(AUTHORIZATION_POLICIES, Some("v1beta1"));
    server.expire_watches(AUTHORIZATION_POLICIES);
    server.wait_for("the relist refused", TIMEOUT, |s| {
        s.lists(AUTHORIZATION_POLICIES) >= 2 && s.requests(ISTIO_SECURITY_GROUP) >= 1
    });
    let deadline = Instant::now() + TIMEOUT;
    while agent.errors("authorizationpolicies").is_empty() {
        assert!(Instant::now() < deadline, "no error:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Not even other changes: the world is not complete without its policies.
    server.apply(
        PODS,
        objects::pod("shop", "new", "uid-new", "node-2", &["10.0.0.9"], json!({})),
    );
    agent.holds(
        Duration::from_millis(1500),
        Some(&published),
        "the policies were dropped or a partial world was published",
    );

    server.set_served_at(AUTHORIZATION_POLICIES, None);
    let snap = agent.until("new added", |s| workload_names(s).contains(&"new"));
    assert_eq!(snap.policies.len(), 1);
}

#[test]
fn without_istio_security_crds_the_cluster_is_published_with_no_policies() {
    let server = FakeApiServer::start();
    baseline(&server);
    server.set_missing(AUTHORIZATION_POLICIES, true);
    server.set_missing(PEER_AUTHENTICATIONS, true);
    let mut agent = Agent::start(&server);
    let snap = agent.until("the first publication", |_| true);
    assert_eq!(workload_names(&snap), ["batch", "cart", "old", "web"]);
    assert!(snap.policies.is_empty());
    assert!(snap.peer_authentications.is_empty());
    assert!(
        server.requests(ISTIO_SECURITY_GROUP) > 0,
        "told apart by discovery"
    );
    assert!(agent.errors("").is_empty(), "{}", agent.log());

    // Retried: once the CRDs are installed, their objects arrive.
    server.set_missing(AUTHORIZATION_POLICIES, false);
    server.set_missing(PEER_AUTHENTICATIONS, false);
    agent.until("the policies", |s| {
        s.policies.len() == 1 && s.peer_authentications.len() == 1
    });
}

/// The waypoint the snapshot gives a workload (`ip:port`), empty for none.
fn waypoint_of<'s>(snap: &'s Snapshot, name: &str) -> Option<&'s str> {
    let workload = snap.workloads.iter().find(|w| w.name == name)?;
    Some(workload.waypoint.as_str())
}

/// Waypoints as istiod knows them: a cluster without the Gateway API is published with none;
/// once the CRDs are installed a Gateway is picked up, and it becomes the pods' waypoint
/// when Istio gives it an address, not before.
#[test]
fn waypoints_are_gateways_and_a_cluster_without_the_gateway_api_has_none() {
    let server = FakeApiServer::start();
    baseline(&server);
    server.apply(
        NAMESPACES,
        objects::namespace(
            "shop",
            json!({"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"}),
        ),
    );
    let mut waypoint_service = objects::service(
        "shop",
        "waypoint",
        &["10.96.0.77"],
        &[("mesh", 15008, json!(15008))],
    );
    waypoint_service["metadata"]["labels"] =
        json!({"gateway.istio.io/managed": "istio.io-mesh-controller"});
    server.apply(SERVICES, waypoint_service);
    server.set_missing(GATEWAYS, true);
    server.set_missing(GATEWAY_CLASSES, true);
    let mut agent = Agent::start(&server);
    // With its certificate, so that no later publication is expected.
    let snap = agent.until("the first publication", |s| !s.identities.is_empty());
    assert_eq!(workload_names(&snap), ["batch", "cart", "old", "web"]);
    assert_eq!(
        waypoint_of(&snap, "web"),
        Some(""),
        "no Gateway, no waypoint"
    );
    assert!(agent.errors("").is_empty(), "{}", agent.log());

    // The Gateway API is installed; the waypoint's Gateway exists but is not ready yet.
    let lists_before = server.lists(GATEWAYS);
    server.set_missing(GATEWAYS, false);
    server.set_missing(GATEWAY_CLASSES, false);
    server.apply(
        GATEWAY_CLASSES,
        objects::gateway_class("istio-waypoint", json!({})),
    );
    let gateway = |address| {
        objects::waypoint_gateway(
            "shop",
            "waypoint",
            json!({"istio.io/waypoint-for": "all"}),
            address,
        )
    };
    server.apply(GATEWAYS, gateway(None));
    server.wait_for("the Gateways listed", TIMEOUT, |s| {
        s.lists(GATEWAYS) > lists_before
    });
    agent.holds(
        Duration::from_millis(1500),
        Some(&snap),
        "a Gateway without an address changed the snapshot",
    );

    // Istio writes its address once the waypoint has a ready pod.
    server.apply(
        GATEWAYS,
        gateway(Some(objects::hostname_address("shop", "waypoint"))),
    );
    let snap = agent.until("the waypoint", |s| {
        waypoint_of(s, "web") == Some("10.96.0.77:15008")
    });
    assert_eq!(waypoint_of(&snap, "cart"), Some("10.96.0.77:15008"));
    assert_eq!(waypoint_of(&snap, "old"), Some(""), "legacy uses none");
}

/// A network namespace for a pod's sandbox (`ip netns add`: root, as CI runs), its loopback
/// up, removed when dropped.
struct PodNamespace {
    name: String,
}

impl PodNamespace {
    fn new() -> PodNamespace {
        let name = format!("ctrl-agent-test-{}", std::process::id());
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add (the test needs root and iproute2)");
        assert!(status.success(), "ip netns add {name}");
        // As the runtime leaves a sandbox before the chained plugins run (its loopback).
        let status = Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status()
            .expect("ip link set lo up");
        assert!(status.success(), "lo up in {name}");
        PodNamespace { name }
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for PodNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// The redirection annotation of a stored pod.
fn redirection(server: &FakeApiServer, key: &str) -> Option<String> {
    let pod = server.object(PODS, key)?;
    pod["metadata"]["annotations"]["ambient.istio.io/redirection"]
        .as_str()
        .map(str::to_owned)
}

/// As istio-cni does: a pod is annotated `ambient.istio.io/redirection: enabled` once its
/// ADD is answered (the data plane listens in it), and the annotation is removed when a
/// label change releases it in place. The data plane's listeners are opened by the test in
/// the pod's namespace, on the ports the data plane uses.
#[test]
fn a_captured_pod_is_annotated_as_istio_cni_does_and_unannotated_when_released() {
    use ctrl_agent::cni_api::{PodRef, Reply, Request};
    use mesh_io::ipc::Channel;
    use mesh_io::netns::NetNs;

    let server = FakeApiServer::start();
    baseline(&server);
    let mut agent = Agent::start_with_cni(&server);
    agent.until("the cluster", |s| workload_names(s).contains(&"cart"));
    let sandbox = PodNamespace::new();
    let netns = NetNs::open(sandbox.path()).expect("open the pod's namespace");
    let home = NetNs::current().expect("own namespace");
    let _listeners: Vec<std::net::TcpListener> = [15001, 15006, 15008]
        .into_iter()
        .map(|port| {
            netns
                .run_in(&home, || std::net::TcpListener::bind(("0.0.0.0", port)))
                .expect("enter")
                .expect("listen")
        })
        .collect();

    // The API server fails the first two patches (it is restarting, say): the agent tries
    // again until one is taken.
    server.fail_patches(2);
    let channel = Channel::connect(&agent.cni_socket()).expect("the agent's CNI socket");
    let add = Request::Add {
        pod: PodRef {
            container_id: "sandbox-1".into(),
            namespace: "shop".into(),
            name: "cart".into(),
        },
        ips: vec!["10.0.0.1".parse().expect("ip")],
        netns_path: sandbox.path(),
        captured: false,
        network: "k8s-pod-network".into(),
    };
    channel.send_json(&add, &[netns.fd()]).expect("send ADD");
    let (reply, _) = channel
        .recv_json::<Reply>()
        .expect("reply")
        .expect("an answer");
    assert_eq!(reply, Reply::Done, "{}", agent.log());
    // The agent counts the call and the pod it now captures.
    assert_eq!(
        agent.metric("meshagent_cni_requests_total{op=\"add\",reply=\"done\"}"),
        1.0
    );
    assert_eq!(
        agent.metric("meshagent_enrolled_pods{captured=\"true\"}"),
        1.0
    );
    server.wait_for("the annotation", TIMEOUT, |s| {
        redirection(s, "shop/cart").as_deref() == Some("enabled")
    });
    assert_eq!(
        redirection(&server, "shop/web"),
        None,
        "only the pod captured"
    );

    // An annotation lost (a patch that never made it, or someone removed it): the agent sees
    // the pod without it, and sets it again. (Once it has seen the annotation: a removal
    // within the same burst of events would change nothing it knows.)
    let models = |agent: &Agent| agent.log().matches("cluster changed workloads").count();
    let deadline = Instant::now() + TIMEOUT;
    while models(&agent) < 2 {
        assert!(
            Instant::now() < deadline,
            "the annotation never reached the agent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.apply(PODS, cart(json!({})));
    server.wait_for("the annotation set again", TIMEOUT, |s| {
        s.patches().len() == 4 && redirection(s, "shop/cart").as_deref() == Some("enabled")
    });

    // Opted out by a label: released in place, and the annotation goes (the API server
    // keeps other annotations across a label change, as the object here does).
    let mut opted_out = cart(json!({"istio.io/dataplane-mode": "none"}));
    opted_out["metadata"]["annotations"]["ambient.istio.io/redirection"] = json!("enabled");
    server.apply(PODS, opted_out);
    server.wait_for("the annotation's removal", TIMEOUT, |s| {
        redirection(s, "shop/cart").is_none()
    });
    let patches = server.patches();
    let values: Vec<(&Value, u16)> = patches
        .iter()
        .map(|(_, patch, code)| {
            let value = &patch["metadata"]["annotations"]["ambient.istio.io/redirection"];
            (value, *code)
        })
        .collect();
    let (enabled, removed) = (json!("enabled"), Value::Null);
    assert_eq!(
        values,
        [
            (&enabled, 500),
            (&enabled, 500),
            (&enabled, 200),
            (&enabled, 200),
            (&removed, 200)
        ],
        "merge patches: set (after two failures), set again, then removed with null"
    );
    assert!(
        patches
            .iter()
            .all(|(path, _, _)| path == "/api/v1/namespaces/shop/pods/cart/status"),
        "through the status subresource, as istio-cni writes it: {patches:?}"
    );
}
