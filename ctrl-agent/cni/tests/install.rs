//! The chart's CNI installer (`mesh-cni install|uninstall`), run as the DaemonSet runs it, on
//! scratch copies of a node's CNI directories.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

// The kube-apiserver double (no real API server can be installed here), for the installer's
// question at SIGTERM: is its DaemonSet going away?
#[path = "../../tests/fake_apiserver/mod.rs"]
mod fake_apiserver;
use fake_apiserver::{objects, FakeApiServer, DAEMON_SETS, NODES, PODS};

const BRIDGE_LIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "k8s-pod-network",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#;

struct Node {
    root: PathBuf,
}

impl Node {
    fn new(name: &str) -> Node {
        let root =
            std::env::temp_dir().join(format!("mesh-cni-install-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("bin")).expect("bin dir");
        std::fs::create_dir_all(root.join("net.d")).expect("conf dir");
        Node { root }
    }
    fn bin(&self) -> PathBuf {
        self.root.join("bin")
    }
    fn conf(&self) -> PathBuf {
        self.root.join("net.d")
    }
    fn args(&self, mode: &str) -> Vec<String> {
        vec![
            mode.into(),
            "--bin-dir".into(),
            self.bin().display().to_string(),
            "--conf-dir".into(),
            self.conf().display().to_string(),
            "--agent-socket".into(),
            "/var/run/mesh/cni.sock".into(),
            "--mesh-namespace".into(),
            "mesh-system".into(),
        ]
    }
    fn run(&self, mode: &str, extra: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
            .args(self.args(mode))
            .args(extra)
            .env_remove("CNI_COMMAND")
            .output()
            .expect("run mesh-cni")
    }
    fn spawn(&self) -> Child {
        Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
            .args(self.args("install"))
            .args(["--interval-ms", "50"])
            .env_remove("CNI_COMMAND")
            .spawn()
            .expect("spawn mesh-cni install")
    }
    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.conf())
            .expect("conf dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Whether `list` ends with our plugin.
fn chained(list: &Path) -> bool {
    std::fs::read(list)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| plugin_types(&v).last().map(String::as_str) == Some("mesh-cni"))
}

/// SIGTERM, as the kubelet stops the container; the installer must exit cleanly.
fn stop(mut installer: Child) {
    let status = Command::new("kill")
        .args(["-TERM", &installer.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = installer.wait().expect("installer exits");
    assert!(exit.success(), "installer exited with {exit}");
}

fn wait_for(what: &str, done: &dyn Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read config")).expect("config is JSON")
}

fn plugin_types(list: &Value) -> Vec<String> {
    list["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .map(|p| p["type"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn ok(output: &Output) {
    assert!(
        output.status.success(),
        "mesh-cni failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn install_chains_last_once_and_uninstall_restores_the_file_byte_for_byte() {
    let node = Node::new("list");
    let list = node.conf().join("10-bridge.conflist");
    std::fs::write(&list, BRIDGE_LIST).expect("write");
    // Another network's file sorts later: the runtime does not use it, so it is left alone.
    std::fs::write(node.conf().join("99-other.conflist"), BRIDGE_LIST).expect("write");

    ok(&node.run("install", &["--once"]));
    let chained = read(&list);
    assert_eq!(plugin_types(&chained), ["bridge", "portmap", "mesh-cni"]);
    assert_eq!(
        chained["plugins"][2]["agentSocket"],
        json!("/var/run/mesh/cni.sock")
    );
    // The mesh's own pods and kube-system's start without the agent.
    assert_eq!(
        chained["plugins"][2]["exclude_namespaces"],
        json!(["mesh-system", "kube-system"])
    );
    assert_eq!(chained["name"], json!("k8s-pod-network"));
    let installed = node.bin().join("mesh-cni");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&installed)
            .expect("binary installed")
            .permissions(),
    );
    assert!(mode & 0o111 != 0, "installed plugin is not executable");
    assert_eq!(
        std::fs::read_to_string(node.conf().join("99-other.conflist")).expect("other"),
        BRIDGE_LIST
    );

    // A second install (pod restart) changes nothing.
    let before = std::fs::read(&list).expect("read");
    ok(&node.run("install", &["--once"]));
    assert_eq!(std::fs::read(&list).expect("read"), before);

    ok(&node.run("uninstall", &[]));
    assert_eq!(std::fs::read_to_string(&list).expect("read"), BRIDGE_LIST);
    assert_eq!(node.files(), ["10-bridge.conflist", "99-other.conflist"]);
}

#[test]
fn a_single_plugin_conf_becomes_a_list_and_comes_back() {
    let node = Node::new("conf");
    let conf = node.conf().join("10-flannel.conf");
    let original = r#"{"cniVersion": "0.4.0", "name": "cbr0", "type": "flannel", "delegate": {"isDefaultGateway": true}}"#;
    std::fs::write(&conf, original).expect("write");

    ok(&node.run("install", &["--once"]));
    assert_eq!(
        node.files(),
        ["10-flannel.conf.mesh-cni-backup", "10-flannel.conflist"]
    );
    let list = read(&node.conf().join("10-flannel.conflist"));
    assert_eq!(plugin_types(&list), ["flannel", "mesh-cni"]);
    assert_eq!(list["cniVersion"], json!("0.4.0"));
    assert_eq!(list["name"], json!("cbr0"));

    ok(&node.run("uninstall", &[]));
    assert_eq!(node.files(), ["10-flannel.conf"]);
    assert_eq!(std::fs::read_to_string(&conf).expect("read"), original);

    // The primary plugin writes a new .conf while we are chained: chained again, and the
    // uninstall restores the new one, not the first.
    ok(&node.run("install", &["--once"]));
    let rewritten = original.replace("cbr0", "cbr1");
    std::fs::write(&conf, &rewritten).expect("write");
    ok(&node.run("install", &["--once"]));
    let list = read(&node.conf().join("10-flannel.conflist"));
    assert_eq!(list["name"], json!("cbr1"));
    ok(&node.run("uninstall", &[]));
    assert_eq!(node.files(), ["10-flannel.conf"]);
    assert_eq!(std::fs::read_to_string(&conf).expect("read"), rewritten);
}

#[test]
fn the_running_installer_rechains_after_a_rewrite_and_unchains_on_sigterm() {
    let node = Node::new("watch");
    let list = node.conf().join("10-bridge.conflist");
    std::fs::write(&list, BRIDGE_LIST).expect("write");
    let installer = node.spawn();
    let chained = || chained(&list);
    wait_for("the plugin is chained", &chained);

    // The primary plugin restarts and writes its file again, with a new subnet.
    let rewritten = BRIDGE_LIST.replace("10.244.1.0/24", "10.244.7.0/24");
    std::fs::write(&list, &rewritten).expect("rewrite");
    wait_for("the plugin is chained again", &chained);
    assert_eq!(
        read(&list)["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
        json!("10.244.7.0/24")
    );

    stop(installer);
    // The primary's newer content stays; only our entry is gone.
    let after = read(&list);
    assert_eq!(plugin_types(&after), ["bridge", "portmap"]);
    assert_eq!(
        after,
        serde_json::from_str::<Value>(&rewritten).expect("json")
    );
    assert_eq!(node.files(), ["10-bridge.conflist"]);
}

/// The installer as the chart runs it, given its pod and the API at `kubeconfig`: stopped
/// with SIGTERM once chained; whether it left the plugin chained.
fn stopped_in_a_pod_leaves_it_chained(node: &Node, kubeconfig: &Path) -> bool {
    let list = node.conf().join("10-bridge.conflist");
    std::fs::write(&list, BRIDGE_LIST).expect("write");
    let installer = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
        .args(node.args("install"))
        .args(["--interval-ms", "50"])
        .args(["--pod-name", objects::MESH_POD])
        .args(["--pod-namespace", objects::MESH_NAMESPACE])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("CNI_COMMAND")
        .spawn()
        .expect("spawn mesh-cni install");
    wait_for("the plugin is chained", &|| chained(&list));
    stop(installer);
    chained(&list)
}

#[test]
fn given_its_pod_the_installer_unchains_only_when_its_daemon_set_goes_away() {
    let node = Node::new("departure");
    let server = FakeApiServer::start();
    let kubeconfig = node.root.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig()).expect("kubeconfig");
    server.apply(PODS, objects::mesh_pod(true));
    server.apply(DAEMON_SETS, objects::mesh_daemon_set(false));
    server.apply(
        NODES,
        objects::node(objects::MESH_NODE, json!({"pool": "mesh"})),
    );
    assert!(
        stopped_in_a_pod_leaves_it_chained(&node, &kubeconfig),
        "a rolling update: pods created meanwhile must wait for the agent, not start outside \
         the mesh"
    );
    server.apply(DAEMON_SETS, objects::mesh_daemon_set(true));
    assert!(
        !stopped_in_a_pod_leaves_it_chained(&node, &kubeconfig),
        "helm uninstall: the DaemonSet is being deleted"
    );
    assert_eq!(
        read(&node.conf().join("10-bridge.conflist")),
        read_str(BRIDGE_LIST)
    );
    // An API that cannot answer (uninstalled RBAC answers so): unchained, as Istio does,
    // rather than leaving every new pod on the node waiting for an agent that is gone.
    drop(server);
    assert!(!stopped_in_a_pod_leaves_it_chained(&node, &kubeconfig));
}

fn read_str(json: &str) -> Value {
    serde_json::from_str(json).expect("json")
}

#[test]
fn nothing_to_chain_is_a_clear_error() {
    let node = Node::new("empty");
    let output = node.run("install", &["--once"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no CNI configuration in"), "{stderr}");
    let output = node.run("install", &["--bogus"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown flag --bogus"));
}

#[test]
fn the_chart_s_arguments_chain_the_release_namespace_as_excluded() {
    let node = Node::new("chart");
    let list = node.conf().join("10-bridge.conflist");
    std::fs::write(&list, BRIDGE_LIST).expect("write");
    // As the DaemonSet passes them: `--flag=value`, the release namespace, the values' list.
    let output = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
        .args([
            "install".to_owned(),
            format!("--bin-dir={}", node.bin().display()),
            format!("--conf-dir={}", node.conf().display()),
            "--agent-socket=/var/run/mesh/cni.sock".to_owned(),
            "--mesh-namespace=istio-system".to_owned(),
            "--exclude-namespaces=kube-system,istio-system,monitoring".to_owned(),
            "--once".to_owned(),
        ])
        .env_remove("CNI_COMMAND")
        .output()
        .expect("run mesh-cni");
    ok(&output);
    let entry = &read(&list)["plugins"][2];
    assert_eq!(entry["type"], json!("mesh-cni"));
    assert_eq!(
        entry["exclude_namespaces"],
        json!(["istio-system", "kube-system", "monitoring"])
    );

    // An empty list leaves the mesh's own namespace, which is never left out.
    ok(&node.run("install", &["--exclude-namespaces=", "--once"]));
    assert_eq!(
        read(&list)["plugins"][2]["exclude_namespaces"],
        json!(["mesh-system"])
    );

    // Without it the installer refuses: the mesh's pod could never start on a rebooted node.
    let output = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
        .args(["install", "--once"])
        .arg(format!("--conf-dir={}", node.conf().display()))
        .env_remove("CNI_COMMAND")
        .output()
        .expect("run mesh-cni");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("install needs --mesh-namespace"),
        "{stderr}"
    );
}
