//! The lab topology and its processes.
//!
//! ```text
//!  pod a (198.18.1.2, enrolled)   pod b (198.18.1.3, not in mesh)     ... same on node 2 ...
//!        eth0 | veth                     eth0 | veth
//!  node-1 netns (ctrl-agent publishes; dataplane runs here) ==veth== node-2 netns
//!       198.18.0.1/30                                          198.18.0.2/30
//! ```
//!
//! Pods are attached the way a kubelet attaches them: through a CNI chain of Debian's `bridge`
//! and `host-local` plugins followed by our `mesh-cni`, which captures the pods the catalog
//! labels ambient (pods `a`) and leaves the others alone (pods `b`, labelled out), giving every
//! run a no-mesh baseline over the same hops. Everything the lab creates carries its prefix and
//! is removed on drop, on error, and on Ctrl-C.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mesh_io::netns::NetNs;

use serde_json::{json, Value};

use crate::bins::Binaries;
use crate::cni::{Runtime, Sandbox};
use crate::sys;

pub const NODE_NAMES: [&str; 2] = ["node-1", "node-2"];
/// Service VIP that the default config maps to pod a of node 2, port 80 -> 7000.
pub const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const ECHO_PORT: u16 = 7000;
pub const SINK_PORT: u16 = 7001;
/// The plain TLS sink of the crypto reference.
pub const TLS_SINK_PORT: u16 = 7002;
/// glibc's setting for a data plane heap backed by transparent huge pages, as the chart
/// sets it (`dataplane.hugePageHeap`).
pub const HUGE_PAGE_HEAP: &str = "glibc.malloc.hugetlb=1";

#[derive(Clone, Debug)]
pub struct Pod {
    /// Workload uid, e.g. "n1-a".
    pub uid: String,
    /// 0 or 1.
    pub node: usize,
    pub ip: Ipv4Addr,
    /// Network namespace name (under /run/netns).
    pub netns: String,
    pub enrolled: bool,
    pub namespace: String,
    pub service_account: String,
}

impl Pod {
    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }
}

#[derive(Clone, Debug)]
pub struct LabOptions {
    pub workers: usize,
    /// auto, io-uring or epoll.
    pub driver: String,
    /// Extra flags for both data planes.
    pub dataplane_args: Vec<String>,
    /// Extra flags for both agents.
    pub agent_args: Vec<String>,
    /// Pin data-plane workers to cores. Off by default: both simulated nodes share this
    /// machine's cores, and pinning both nodes' worker 0 to core 0 would make them fight.
    pub pin: bool,
    /// Node 1's agent issues from a CA of its own (a rogue client CA) while still trusting
    /// the mesh root; node 2 trusts only the mesh root.
    pub rogue_client_ca: bool,
    pub cert_ttl: String,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            driver: "auto".into(),
            dataplane_args: Vec::new(),
            agent_args: Vec::new(),
            pin: false,
            rogue_client_ca: false,
            cert_ttl: "24h".into(),
        }
    }
}

impl LabOptions {
    fn driver_flag(&self) -> Option<[&str; 2]> {
        driver_flag(&self.driver, &self.dataplane_args)
    }
}

/// The lab's `--driver` for a data plane, unless its extra flags choose one: an A/B of the
/// two drivers (`meshlab ab --variant-arg=--driver=epoll`) sets it for one side only.
pub fn driver_flag<'a>(driver: &'a str, dataplane_args: &[String]) -> Option<[&'a str; 2]> {
    let chosen = dataplane_args
        .iter()
        .any(|a| a == "--driver" || a.starts_with("--driver="));
    (!chosen).then_some(["--driver", driver])
}

/// What a tuning profile changed in a lab, or what a revert restored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TuningChanges {
    /// Values changed inside the lab's namespaces, summed over them.
    pub in_namespaces: usize,
    /// The files of node-wide settings changed on this machine.
    pub node_wide: Vec<PathBuf>,
}

impl std::fmt::Display for TuningChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} value(s) in the lab's namespaces, {} node-wide",
            self.in_namespaces,
            self.node_wide.len()
        )?;
        if !self.node_wide.is_empty() {
            let files: Vec<String> = self
                .node_wide
                .iter()
                .map(|p| format!("/{}", p.display()))
                .collect();
            write!(f, " ({})", files.join(", "))?;
        }
        Ok(())
    }
}

/// What to undo; shared with the Ctrl-C handler.
#[derive(Default)]
struct Cleanup {
    netns: Mutex<Vec<String>>,
    pids: Mutex<Vec<u32>>,
    /// The saved state of node-wide settings a tuning profile changed: namespaces take their
    /// own settings with them, these outlive the lab unless reverted.
    node_tuning: Mutex<Option<PathBuf>>,
}

impl Cleanup {
    fn run(&self) {
        if let Ok(mut state) = self.node_tuning.lock() {
            if let Some(state) = state.take() {
                if let Err(error) =
                    kernel_tuning::state::revert(&kernel_tuning::sysfs::Root::default(), &state)
                {
                    eprintln!("reverting the node-wide tuning of a lab: {error}");
                }
            }
        }
        if let Ok(mut pids) = self.pids.lock() {
            for pid in pids.drain(..) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        if let Ok(mut names) = self.netns.lock() {
            // Pods first, then nodes: deleting a namespace removes its veths.
            for name in names.drain(..).rev() {
                let _ = Command::new("ip")
                    .args(["netns", "del", &name])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

fn registry() -> &'static Mutex<Vec<Arc<Cleanup>>> {
    static REGISTRY: OnceLock<Mutex<Vec<Arc<Cleanup>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Vec::new()))
}

/// On SIGINT or SIGTERM, tear down every lab of this process and exit with 130.
pub fn install_interrupt_cleanup() -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            eprintln!("\ninterrupted: tearing the lab down");
            if let Ok(labs) = registry().lock() {
                for lab in labs.iter() {
                    lab.run();
                }
            }
            std::process::exit(130);
        }
    });
    Ok(())
}

/// What a data plane logs once it serves on sockets taken over from another.
const TOOK_OVER: &str = "took over from the old data plane";

pub struct Lab {
    runtimes: Vec<Runtime>,
    pub prefix: String,
    /// Logs, configs, CA and snapshot regions of this run.
    pub dir: PathBuf,
    pub bins: Binaries,
    pub options: LabOptions,
    pub pods: Vec<Pod>,
    agents: [Option<Child>; 2],
    dataplanes: [Option<Child>; 2],
    /// Per node, how many DaemonSet pods replaced the first one (`rolling_update`): each has
    /// its own snapshot region and namespace socket, and its data plane its own namespace.
    pod_generations: [u32; 2],
    others: Vec<Child>,
    cleanup: Arc<Cleanup>,
    home: NetNs,
}

fn unique_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("ml{}x{n}", std::process::id())
}

/// Whether `name` (a namespace `ml<pid>x<n>-...`, or a lab directory `meshlab-ml<pid>x<n>`)
/// belongs to a lab whose process is gone.
pub fn of_a_gone_lab(name: &str) -> bool {
    name.trim_start_matches("meshlab-")
        .strip_prefix("ml")
        .and_then(|rest| rest.split('x').next())
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// The saved node-wide tuning in a lab's directory, while applied.
const NODE_TUNING_STATE: &str = "tuning-node.json";

/// Reverts the node-wide settings that labs killed before their teardown (SIGKILL) left
/// applied; returns how many labs had some.
pub fn restore_leftover_node_tuning() -> anyhow::Result<usize> {
    let mut restored = 0;
    for entry in std::fs::read_dir(std::env::temp_dir())?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let state = entry.path().join(NODE_TUNING_STATE);
        if name.starts_with("meshlab-") && of_a_gone_lab(&name) && state.exists() {
            kernel_tuning::state::revert(&kernel_tuning::sysfs::Root::default(), &state)
                .with_context(|| format!("restoring {}", state.display()))?;
            restored += 1;
        }
    }
    Ok(restored)
}

impl Lab {
    /// Builds the topology, starts agents and data planes, and waits until both are ready.
    pub fn up(bins: Binaries, options: LabOptions) -> anyhow::Result<Lab> {
        if !sys::is_root() {
            bail!("the lab creates network namespaces and nftables rules: run it as root");
        }
        for tool in ["ip", "nft"] {
            sys::run("sh", &["-c", &format!("command -v {tool}")]).with_context(|| {
                format!("{tool} is not installed (apt-get install iproute2 nftables)")
            })?;
        }
        let prefix = unique_prefix();
        let dir = std::env::temp_dir().join(format!("meshlab-{prefix}"));
        std::fs::create_dir_all(&dir)?;
        let cleanup = Arc::new(Cleanup::default());
        if let Ok(mut labs) = registry().lock() {
            labs.push(cleanup.clone());
        }
        let plugin_dirs = vec![
            bins.mesh_cni
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            PathBuf::from(crate::cni::DEBIAN_PLUGIN_DIR),
        ];
        let mut lab = Lab {
            runtimes: Vec::new(),
            prefix,
            dir,
            bins,
            options,
            pods: Vec::new(),
            agents: [None, None],
            dataplanes: [None, None],
            pod_generations: [0, 0],
            others: Vec::new(),
            cleanup,
            home: NetNs::current()?,
        };
        lab.runtimes = (0..2)
            .map(|node| {
                Runtime::new(
                    lab.cni_conflist(node),
                    plugin_dirs.clone(),
                    &lab.node_netns(node),
                )
            })
            .collect();
        lab.build_nodes()?;
        let mut pods = Vec::new();
        for (node, name, enrolled) in [
            (0, "a", true),
            (0, "b", false),
            (1, "a", true),
            (1, "b", false),
        ] {
            pods.push(lab.create_pod(node, name, enrolled, "default", "default")?);
        }
        lab.setup_ca()?;
        let config = lab.default_config();
        for node in 0..2 {
            lab.write_config(node, &config)?;
            lab.start_agent(node)?;
            lab.start_dataplane(node)?;
        }
        for node in 0..2 {
            lab.wait_ready(node, Duration::from_secs(30))?;
        }
        for pod in &pods {
            lab.attach(pod)?;
        }
        Ok(lab)
    }

    pub fn node_netns(&self, node: usize) -> String {
        format!("{}-n{}", self.prefix, node + 1)
    }

    fn ns_add(&self, name: &str) -> anyhow::Result<()> {
        sys::run("ip", &["netns", "add", name])?;
        if let Ok(mut names) = self.cleanup.netns.lock() {
            names.push(name.to_owned());
        }
        sys::run("ip", &["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn build_nodes(&self) -> anyhow::Result<()> {
        let (n1, n2) = (self.node_netns(0), self.node_netns(1));
        self.ns_add(&n1)?;
        self.ns_add(&n2)?;
        sys::run(
            "ip",
            &[
                "link", "add", "peer", "netns", &n1, "type", "veth", "peer", "name", "peer",
                "netns", &n2,
            ],
        )?;
        for (ns, addr, remote_pods, via) in [
            (&n1, "198.18.0.1/30", "198.18.2.0/24", "198.18.0.2"),
            (&n2, "198.18.0.2/30", "198.18.1.0/24", "198.18.0.1"),
        ] {
            sys::run("ip", &["-n", ns, "addr", "add", addr, "dev", "peer"])?;
            sys::run("ip", &["-n", ns, "link", "set", "peer", "up"])?;
            sys::run("ip", &["-n", ns, "route", "add", remote_pods, "via", via])?;
            sys::run(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ],
            )?;
        }
        Ok(())
    }

    /// Adds a pod namespace on `node` (0 or 1) with a veth to the node; enrolled pods get the
    /// redirect rules. The pod is not in any config until the config says so.
    pub fn add_pod(
        &mut self,
        node: usize,
        name: &str,
        enrolled: bool,
        service_account: &str,
    ) -> anyhow::Result<Pod> {
        self.add_pod_in(node, name, enrolled, "default", service_account)
    }

    /// Like [`Lab::add_pod`], in a given Kubernetes namespace.
    pub fn add_pod_in(
        &mut self,
        node: usize,
        name: &str,
        enrolled: bool,
        namespace: &str,
        service_account: &str,
    ) -> anyhow::Result<Pod> {
        // The agents must know the pod (it is in the catalog) before CNI asks about it.
        let pod = self.add_pod_unattached(node, name, enrolled, namespace, service_account)?;
        self.attach(&pod)?;
        Ok(pod)
    }

    /// A pod the agents know (it is in the config) but no runtime has attached yet: what a
    /// pod is between its scheduling and its CNI ADD.
    pub fn add_pod_unattached(
        &mut self,
        node: usize,
        name: &str,
        enrolled: bool,
        namespace: &str,
        service_account: &str,
    ) -> anyhow::Result<Pod> {
        let pod = self.create_pod(node, name, enrolled, namespace, service_account)?;
        self.apply("")?;
        Ok(pod)
    }

    /// A pod's namespace, before any network: what the runtime creates for a sandbox.
    fn create_pod(
        &mut self,
        node: usize,
        name: &str,
        enrolled: bool,
        namespace: &str,
        service_account: &str,
    ) -> anyhow::Result<Pod> {
        let index = self.pods.iter().filter(|p| p.node == node).count();
        // host-local is asked for this address (CNI_ARGS IP=), so the catalog can list it.
        let ip = Ipv4Addr::new(198, 18, node as u8 + 1, index as u8 + 2);
        let netns = format!("{}-n{}-{name}", self.prefix, node + 1);
        self.ns_add(&netns)?;
        // Connection-rate runs open and close many sockets; let them reuse TIME_WAIT ports.
        sys::run(
            "ip",
            &[
                "netns",
                "exec",
                &netns,
                "sysctl",
                "-qw",
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=10000 65000",
            ],
        )?;
        let pod = Pod {
            uid: format!("n{}-{name}", node + 1),
            node,
            ip,
            netns,
            enrolled,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// The sandbox a runtime would describe to CNI for `pod`.
    pub fn sandbox(&self, pod: &Pod) -> Sandbox {
        Sandbox {
            container_id: format!("{}-{}", self.prefix, pod.uid),
            netns_path: pod.netns_path(),
            namespace: pod.namespace.clone(),
            name: pod.uid.clone(),
            args: vec![("IP".into(), pod.ip.to_string())],
        }
    }

    /// The node's CNI runtime (its network config list: bridge, host-local, mesh-cni).
    pub fn cni(&self, node: usize) -> &Runtime {
        &self.runtimes[node]
    }

    /// CNI ADD for a pod, then (for a captured pod) wait until its node's data plane listens in it.
    pub fn attach(&self, pod: &Pod) -> anyhow::Result<()> {
        self.runtimes[pod.node]
            .add(&self.sandbox(pod))
            .with_context(|| format!("CNI ADD of {}", pod.uid))?;
        self.wait_serving(pod.node, Duration::from_secs(20))
    }

    /// CNI DEL for a pod (its namespace stays; the lab removes it at the end).
    pub fn detach(&self, pod: &Pod) -> anyhow::Result<()> {
        self.runtimes[pod.node]
            .del(&self.sandbox(pod))
            .with_context(|| format!("CNI DEL of {}", pod.uid))
    }

    /// What a runtime does when it recreates a pod's sandbox: CNI DEL of the old one, a new
    /// namespace, CNI ADD of a new sandbox for the same pod and address. Returns the new
    /// namespace's name; the pod's own entry keeps the old one.
    pub fn recreate_sandbox(&self, pod: &Pod) -> anyhow::Result<String> {
        self.detach(pod)?;
        let netns = format!("{}-recreated", pod.netns);
        self.ns_add(&netns)?;
        let sandbox = Sandbox {
            container_id: format!("{}-recreated", self.sandbox(pod).container_id),
            netns_path: format!("/run/netns/{netns}"),
            ..self.sandbox(pod)
        };
        self.runtimes[pod.node]
            .add(&sandbox)
            .with_context(|| format!("CNI ADD of {}'s new sandbox", pod.uid))?;
        Ok(netns)
    }

    fn cni_conflist(&self, node: usize) -> Value {
        let n = node + 1;
        json!({
            "cniVersion": "1.0.0",
            "name": format!("{}-n{n}", self.prefix),
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": format!("198.18.{n}.0/24"), "gateway": format!("198.18.{n}.1")}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": self.dir.join(format!("ipam-n{n}")),
                    }
                },
                {
                    "type": "mesh-cni",
                    "agentSocket": self.cni_socket(node),
                    "agentWaitSeconds": 10,
                }
            ]
        })
    }

    pub fn cni_socket(&self, node: usize) -> PathBuf {
        self.dir.join(format!("{}.cni.sock", NODE_NAMES[node]))
    }

    fn netns_socket(&self, node: usize) -> PathBuf {
        self.dir.join(format!(
            "{}{}.netns.sock",
            NODE_NAMES[node],
            self.pod_suffix(node)
        ))
    }

    /// What sets the files of a node's current DaemonSet pod apart (its emptyDir, in a
    /// cluster): nothing for the first.
    fn pod_suffix(&self, node: usize) -> String {
        match self.pod_generations[node] {
            0 => String::new(),
            g => format!(".g{g}"),
        }
    }

    /// The namespace a node's data plane runs in: the node's own for the first DaemonSet pod
    /// (as with host networking), one of its own for each pod a rolling update brings.
    pub fn dataplane_netns(&self, node: usize) -> String {
        match self.pod_generations[node] {
            0 => self.node_netns(node),
            g => format!("{}-g{g}", self.node_netns(node)),
        }
    }

    /// Waits until `node`'s data plane is ready with listeners in every captured pod of the
    /// node (CNI enrollment reaches it through the agent, then the snapshot).
    pub fn wait_serving(&self, node: usize, timeout: Duration) -> anyhow::Result<()> {
        let captured = self
            .pods
            .iter()
            .filter(|p| p.node == node && p.enrolled)
            .count() as u64;
        let per_pod = 4 * self.options.workers as u64; // 15001, 15006, 15008, SOCKS5
        let deadline = Instant::now() + timeout;
        loop {
            let listeners = self.total(node, "listeners").unwrap_or(0);
            let ready = self
                .http_get(node, 15021, "/healthz/ready")
                .is_ok_and(|(s, _)| s == 200);
            if ready && listeners == captured * per_pod {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: {listeners} listeners for {captured} captured pods (want {}), ready: {ready}\nagent log:\n{}\ndataplane log:\n{}",
                    NODE_NAMES[node],
                    captured * per_pod,
                    self.log_tail(&format!("ctrl-agent-{}.log", NODE_NAMES[node])),
                    self.log_tail(&format!("dataplane-{}.log", NODE_NAMES[node]))
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pod(&self, uid: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.uid == uid)
            .unwrap_or_else(|| panic!("the lab has no pod {uid}"))
    }

    /// The mesh CA's directory (certificate and key).
    pub fn mesh_ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    fn ca_dir(&self, node: usize) -> PathBuf {
        if self.options.rogue_client_ca && node == 0 {
            self.dir.join("ca-rogue")
        } else {
            self.mesh_ca_dir()
        }
    }

    /// Generates the CA(s) up front so both agents share the mesh root.
    fn setup_ca(&self) -> anyhow::Result<()> {
        for node in 0..2 {
            let dir = self.ca_dir(node);
            ctrl_agent::ca::LocalCa::load_or_generate(&dir, "cluster.local")
                .with_context(|| format!("CA in {}", dir.display()))?;
        }
        Ok(())
    }

    /// The workloads and service of the lab as a ctrl-agent config file.
    pub fn default_config(&self) -> String {
        let mut namespaces: Vec<&str> = self.pods.iter().map(|p| p.namespace.as_str()).collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        let mut yaml = String::from("trustDomain: cluster.local\nnamespaces:\n");
        for ns in namespaces {
            yaml.push_str(&format!(
                "  - {{name: {ns}, labels: {{istio.io/dataplane-mode: ambient}}}}\n"
            ));
        }
        yaml.push_str("workloads:\n");
        for p in &self.pods {
            yaml.push_str(&self.workload_yaml(p));
        }
        yaml.push_str(&format!(
            "services:\n  - name: server\n    vips: [{SERVICE_VIP}]\n    ports: [{{port: 80, targetPort: {ECHO_PORT}}}]\n    endpoints: [n2-a]\n"
        ));
        yaml
    }

    /// One workload entry, labelled `app: <uid>`. Every namespace is ambient; pods outside
    /// the mesh opt out with `istio.io/dataplane-mode: none` and are listed as TCP (no
    /// certificate, no tunnel).
    pub fn workload_yaml(&self, p: &Pod) -> String {
        format!(
            "  - {{uid: {uid}, name: {uid}, namespace: {ns}, serviceAccount: {sa}, labels: {{app: {uid}{opt_out}}}, ips: [{ip}], node: {node}, protocol: {proto}}}\n",
            uid = p.uid,
            ns = p.namespace,
            sa = p.service_account,
            ip = p.ip,
            node = NODE_NAMES[p.node],
            proto = if p.enrolled { "HBONE" } else { "TCP" },
            opt_out = if p.enrolled { "" } else { ", istio.io/dataplane-mode: none" },
        )
    }

    /// Writes the default config plus `extra` (e.g. `policies:` and `peerAuthentications:`
    /// sections) to both nodes and waits until both data planes serve it.
    pub fn apply(&self, extra: &str) -> anyhow::Result<()> {
        let generations: Vec<u64> = (0..2)
            .map(|n| {
                self.stats(n)
                    .map(|s| s["snapshot"]["generation"].as_u64().unwrap_or(0))
            })
            .collect::<anyhow::Result<_>>()?;
        let config = format!("{}{extra}", self.default_config());
        let unchanged =
            (0..2).all(|n| std::fs::read_to_string(self.config_path(n)).is_ok_and(|c| c == config));
        if unchanged {
            // The agents publish only on change: there is nothing to wait for.
            return Ok(());
        }
        for node in 0..2 {
            self.write_config(node, &config)?;
        }
        for (node, generation) in generations.into_iter().enumerate() {
            self.wait_generation(node, generation + 1, Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Writes `yaml` as one node's config and waits until its data plane serves it.
    pub fn apply_to(&self, node: usize, yaml: &str) -> anyhow::Result<()> {
        let generation = self.stats(node)?["snapshot"]["generation"]
            .as_u64()
            .unwrap_or(0);
        self.write_config(node, yaml)?;
        self.wait_generation(node, generation + 1, Duration::from_secs(10))
    }

    pub fn config_path(&self, node: usize) -> PathBuf {
        self.dir.join(format!("{}.yaml", NODE_NAMES[node]))
    }

    /// Replaces a node's config file atomically (the agent never sees half a file).
    pub fn write_config(&self, node: usize, yaml: &str) -> anyhow::Result<()> {
        let path = self.config_path(node);
        let tmp = path.with_extension("yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    fn snapshot_path(&self, node: usize) -> PathBuf {
        self.dir.join(format!(
            "{}{}.snapshot",
            NODE_NAMES[node],
            self.pod_suffix(node)
        ))
    }

    fn log(&self, name: &str) -> anyhow::Result<std::fs::File> {
        Ok(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))?)
    }

    /// Starts one of a node's mesh processes with its output in `<what>-<node>.log`.
    fn spawn_logged(&self, cmd: &mut Command, what: &str, node: usize) -> anyhow::Result<Child> {
        let log = self.log(&format!("{what}-{}.log", NODE_NAMES[node]))?;
        let child = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        self.track(&child);
        Ok(child)
    }

    fn track(&self, child: &Child) {
        if let Ok(mut pids) = self.cleanup.pids.lock() {
            pids.push(child.id());
        }
    }

    pub fn start_agent(&mut self, node: usize) -> anyhow::Result<()> {
        let mut cmd = self.agent_command(node);
        self.agents[node] = Some(self.spawn_logged(&mut cmd, "ctrl-agent", node)?);
        Ok(())
    }

    /// The agent of a node's next DaemonSet pod, started beside the running one, whose data
    /// plane never comes: what a rolling update whose new pod never gets ready leaves. It
    /// takes the node's enrollments over like any new pod's agent. Its log goes with the
    /// node's agent's; the caller owns the process.
    pub fn surge_agent(&mut self, node: usize) -> anyhow::Result<Child> {
        self.pod_generations[node] += 1;
        let mut cmd = self.agent_command(node);
        self.pod_generations[node] -= 1;
        self.spawn_logged(&mut cmd, "ctrl-agent", node)
    }

    fn agent_command(&self, node: usize) -> Command {
        // Outside the node's namespace, as in the DaemonSet's pod: its host probe SNAT table
        // goes to the node's namespace, which it is given as the chart gives it the node's.
        let mut cmd = Command::new(&self.bins.ctrl_agent);
        cmd.arg("--host-netns")
            .arg(format!("/run/netns/{}", self.node_netns(node)))
            .arg("--config")
            .arg(self.config_path(node))
            .args(["--node", NODE_NAMES[node]])
            .arg("--snapshot")
            .arg(self.snapshot_path(node))
            .arg("--ca-dir")
            .arg(self.ca_dir(node))
            .args([
                "--poll-interval",
                "100ms",
                "--cert-ttl",
                &self.options.cert_ttl,
            ])
            .arg("--cni-socket")
            .arg(self.cni_socket(node))
            .arg("--netns-socket")
            .arg(self.netns_socket(node))
            .arg("--state-dir")
            .arg(self.dir.join(format!("state-{}", NODE_NAMES[node])))
            // Any free port: the agents share the host's namespace (`agent_metrics`).
            .args(["--metrics-addr", "127.0.0.1:0"]);
        if self.ca_dir(node) != self.mesh_ca_dir() {
            cmd.arg("--extra-root")
                .arg(self.mesh_ca_dir().join("ca-cert.pem"));
        }
        cmd.args(&self.options.agent_args);
        cmd
    }

    /// Kills a node's agent and starts it again (its enrollments come back from its state).
    pub fn restart_agent(&mut self, node: usize) -> anyhow::Result<()> {
        self.kill_agent(node)?;
        // A killed agent leaves its socket file; wait for the new one's.
        let _ = std::fs::remove_file(self.cni_socket(node));
        self.start_agent(node)?;
        // The agent answers CNI once its socket exists again.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.cni_socket(node).exists() {
            if Instant::now() > deadline {
                bail!("ctrl-agent on {} did not come back", NODE_NAMES[node]);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Moves a pod in or out of the mesh by its label (`istio.io/dataplane-mode: none` when
    /// out), the way an operator relabels a running pod; waits until its node serves it so.
    pub fn set_enrolled(&mut self, uid: &str, enrolled: bool) -> anyhow::Result<()> {
        let node = {
            let pod = self
                .pods
                .iter_mut()
                .find(|p| p.uid == uid)
                .ok_or_else(|| anyhow::anyhow!("no pod {uid}"))?;
            pod.enrolled = enrolled;
            pod.node
        };
        self.apply("")?;
        self.wait_serving(node, Duration::from_secs(20))
    }

    /// Stops a node's agent the way Kubernetes does (SIGTERM) and waits until it has exited.
    pub fn stop_agent(&mut self, node: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.agents[node].take() {
            sys::run("kill", &["-TERM", &child.id().to_string()])?;
            child.wait()?;
        }
        Ok(())
    }

    /// Kills a node's agent (SIGKILL: no chance to tidy up).
    pub fn kill_agent(&mut self, node: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.agents[node].take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Kills a node's data plane (SIGKILL) and starts a new one, as a crash and restart would.
    pub fn restart_dataplane(&mut self, node: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.dataplanes[node].take() {
            child.kill()?;
            child.wait()?;
        }
        self.start_dataplane(node)?;
        self.wait_ready(node, Duration::from_secs(30))
    }

    fn start_dataplane(&mut self, node: usize) -> anyhow::Result<()> {
        let ns = self.dataplane_netns(node);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns])
            .arg(&self.bins.dataplane)
            .arg("--snapshot")
            .arg(self.snapshot_path(node))
            .args(["--workers", &self.options.workers.to_string()])
            .args(self.options.driver_flag().into_iter().flatten())
            .arg("--socks5")
            .arg("--netns-socket")
            .arg(self.netns_socket(node))
            .arg("--upgrade-socket")
            .arg(self.dir.join(format!("{}.upgrade.sock", NODE_NAMES[node])))
            .args((!self.options.pin).then_some("--no-pin"))
            .args(&self.options.dataplane_args)
            .env(
                "RUST_LOG",
                std::env::var("MESHLAB_LOG").unwrap_or_else(|_| "info".into()),
            )
            // As the chart runs it (values `dataplane.hugePageHeap`).
            .env("GLIBC_TUNABLES", HUGE_PAGE_HEAP);
        self.dataplanes[node] = Some(self.spawn_logged(&mut cmd, "dataplane", node)?);
        Ok(())
    }

    /// Upgrades a node's data plane without resets: starts a new process that takes the
    /// running one's listening sockets over (`--upgrade-socket`), and returns once the new
    /// one serves. The old process, returned, drains its connections and exits by itself.
    pub fn upgrade_dataplane(&mut self, node: usize) -> anyhow::Result<Child> {
        let before = self.takeovers(node);
        let old = self.begin_upgrade(node)?;
        self.await_takeover(node, before)?;
        Ok(old)
    }

    /// Starts an upgrade of a node's data plane: starts the new process, which asks the
    /// running one for its sockets, and returns the old process at once, without waiting for
    /// the new one to take over or give up.
    pub fn begin_upgrade(&mut self, node: usize) -> anyhow::Result<Child> {
        let old = self.dataplanes[node]
            .take()
            .ok_or_else(|| anyhow::anyhow!("no data plane on {}", NODE_NAMES[node]))?;
        self.start_dataplane(node)?;
        Ok(old)
    }

    /// A DaemonSet's rolling update with `maxSurge` on one node: a new pod's agent and data
    /// plane start beside the running ones, with a snapshot region, a namespace socket and a
    /// network namespace of their own, and the node's CNI socket, state directory and upgrade
    /// socket in common. The new agent takes the node's enrollments over; the new data plane
    /// takes the listening sockets over. Returns once it serves, with the old pod's agent and
    /// data plane, which keep running until signalled, as an old pod does until deleted.
    pub fn rolling_update(&mut self, node: usize) -> anyhow::Result<(Child, Child)> {
        let before = self.takeovers(node);
        let old_agent = self.agents[node]
            .take()
            .ok_or_else(|| anyhow::anyhow!("no agent on {}", NODE_NAMES[node]))?;
        let old_dataplane = self.dataplanes[node]
            .take()
            .ok_or_else(|| anyhow::anyhow!("no data plane on {}", NODE_NAMES[node]))?;
        self.pod_generations[node] += 1;
        self.ns_add(&self.dataplane_netns(node))?;
        self.start_agent(node)?;
        self.start_dataplane(node)?;
        self.await_takeover(node, before)?;
        Ok((old_agent, old_dataplane))
    }

    /// A rollback on one node after [`Lab::rolling_update`], once its old data plane
    /// (`predecessor`) waits: the new pod is deleted and the old one stays. Sends the new data
    /// plane its pod's SIGTERM, waits for the predecessor to exit (as it does when told its
    /// successor leaves), and starts the old pod's data plane again in the old pod's namespace,
    /// as the kubelet restarts a container that exited. Returns once that process took over,
    /// with the new pod's data plane (draining by then) and the predecessor's exit status.
    /// The node's current agent stays the new pod's. Not followed by another rolling update
    /// in the lab (its generation's namespace exists already).
    pub fn roll_back_dataplane(
        &mut self,
        node: usize,
        predecessor: &mut Child,
    ) -> anyhow::Result<(Child, std::process::ExitStatus)> {
        let before = self.takeovers(node);
        let mut leaving = self.dataplanes[node]
            .take()
            .ok_or_else(|| anyhow::anyhow!("no data plane on {}", NODE_NAMES[node]))?;
        sys::run("kill", &["-TERM", &leaving.id().to_string()])?;
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = predecessor.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = leaving.kill();
                let _ = leaving.wait();
                bail!(
                    "the old data plane on {} did not exit when its successor left",
                    NODE_NAMES[node]
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.pod_generations[node] -= 1;
        self.start_dataplane(node)?;
        self.await_takeover(node, before)?;
        Ok((leaving, status))
    }

    /// How many takeovers a node's data planes have logged.
    fn takeovers(&self, node: usize) -> usize {
        self.process_log("dataplane", node)
            .matches(TOOK_OVER)
            .count()
    }

    /// Waits until a node's new data plane says it took over (the count was `before`).
    fn await_takeover(&mut self, node: usize, before: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.takeovers(node) == before {
            self.check_dataplane_running(node)?;
            if Instant::now() > deadline {
                bail!(
                    "the new data plane on {} did not take over:\n{}",
                    NODE_NAMES[node],
                    self.log_tail(&format!("dataplane-{}.log", NODE_NAMES[node]))
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Sends a signal (e.g. "STOP", "CONT") to a node's data plane.
    pub fn signal_dataplane(&self, node: usize, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .dataplane_pid(node)
            .ok_or_else(|| anyhow::anyhow!("no data plane on {}", NODE_NAMES[node]))?;
        sys::run("kill", &[&format!("-{signal}"), &pid.to_string()])?;
        Ok(())
    }

    /// Where a node's agent publishes its snapshot region.
    pub fn snapshot_region(&self, node: usize) -> PathBuf {
        self.snapshot_path(node)
    }

    /// Pid of a node's agent.
    pub fn agent_pid(&self, node: usize) -> Option<u32> {
        self.agents[node].as_ref().map(Child::id)
    }

    /// Pid of a node's data plane (`ip netns exec` execs it in place, so the child is it).
    pub fn dataplane_pid(&self, node: usize) -> Option<u32> {
        self.dataplanes[node].as_ref().map(Child::id)
    }

    /// A node's agent's `/metrics` (Prometheus text), at the address its latest start logged.
    pub fn agent_metrics(&self, node: usize) -> anyhow::Result<String> {
        let log = self.process_log("ctrl-agent", node);
        let addr: SocketAddr = log
            .lines()
            .rev()
            .filter(|l| l.contains("metrics on /metrics"))
            .find_map(|l| l.split("bound=").nth(1)?.split_whitespace().next())
            .ok_or_else(|| anyhow::anyhow!("no metrics address in the agent's log"))?
            .parse()?;
        let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        match http_exchange(stream, "GET", "/metrics")? {
            (200, body) => Ok(body),
            (status, body) => bail!("the agent's /metrics answered {status}: {body}"),
        }
    }

    /// Everything a node's process ("dataplane" or "ctrl-agent") has logged so far.
    pub fn process_log(&self, process: &str, node: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("{process}-{}.log", NODE_NAMES[node])))
            .unwrap_or_default()
    }

    /// Waits up to `timeout` for a node's data plane to exit (after a signal); its status.
    pub fn wait_dataplane_exit(
        &mut self,
        node: usize,
        timeout: Duration,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.dataplanes[node].as_mut() {
                if let Some(status) = child.try_wait()? {
                    return Ok(Some(status));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(None)
    }

    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// An error with the log's tail if the node's data plane has exited.
    fn check_dataplane_running(&mut self, node: usize) -> anyhow::Result<()> {
        if let Some(child) = self.dataplanes[node].as_mut() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "dataplane on {} exited ({status}):\n{}",
                    NODE_NAMES[node],
                    self.log_tail(&format!("dataplane-{}.log", NODE_NAMES[node]))
                );
            }
        }
        Ok(())
    }

    /// Waits for the node's readiness endpoint to answer 200.
    pub fn wait_ready(&mut self, node: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            self.check_dataplane_running(node)?;
            match self.http_get(node, 15021, "/healthz/ready") {
                Ok((200, _)) => return Ok(()),
                Ok((_, body)) => last = body,
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{} not ready after {timeout:?}: {last}\nagent log:\n{}\ndataplane log:\n{}",
            NODE_NAMES[node],
            self.log_tail(&format!("ctrl-agent-{}.log", NODE_NAMES[node])),
            self.log_tail(&format!("dataplane-{}.log", NODE_NAMES[node]))
        )
    }

    /// GET on a node's localhost port (admin 15000, metrics 15020, readiness 15021).
    pub fn http_get(&self, node: usize, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
        self.http_request(node, port, "GET", path)
    }

    /// A bodiless request to a node's localhost port; the status and the body.
    pub fn http_request(
        &self,
        node: usize,
        port: u16,
        method: &str,
        path: &str,
    ) -> anyhow::Result<(u16, String)> {
        let stream = self.connect_in(
            &self.dataplane_netns(node),
            SocketAddr::from(([127, 0, 0, 1], port)),
        )?;
        http_exchange(stream, method, path)
    }

    /// The data plane's /stats JSON.
    pub fn stats(&self, node: usize) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.http_get(node, 15000, "/stats")?;
        if status != 200 {
            bail!("/stats answered {status}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// A counter summed over the node's workers.
    pub fn total(&self, node: usize, counter: &str) -> anyhow::Result<u64> {
        let stats = self.stats(node)?;
        stats["totals"][counter]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no counter {counter} in /stats"))
    }

    /// Waits until every worker on `node` serves at least `generation`.
    pub fn wait_generation(
        &self,
        node: usize,
        generation: u64,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.stats(node)?;
            let done = stats["workers"].as_array().is_some_and(|ws| {
                ws.iter()
                    .all(|w| w["snapshot_generation"].as_u64() >= Some(generation))
            });
            if done {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not reach generation {generation}: {stats}",
                    NODE_NAMES[node]
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Applies a kernel-tuning profile to the lab: inside every namespace (nodes and pods)
    /// the settings a network namespace has of its own, then once on this machine the
    /// node-wide ones (module parameters, and sysctls a namespace cannot set: read-only or
    /// absent there), which are reverted with the lab even when it fails or is interrupted.
    /// `revert_tuning` puts everything back.
    pub fn apply_tuning(&self, profile: &str) -> anyhow::Result<TuningChanges> {
        use kernel_tuning::profile::{compare, Status};
        use kernel_tuning::sysfs::{is_node_wide_file, setting_file};
        let profile = kernel_tuning::profile::find(profile)
            .ok_or_else(|| anyhow::anyhow!("no tuning profile {profile:?}"))?;
        let root = kernel_tuning::sysfs::Root::default();
        let write = |c: kernel_tuning::profile::Comparison| kernel_tuning::state::Write {
            path: setting_file(c.key),
            value: c.target,
        };
        let mut changes = TuningChanges::default();
        let mut node_wide: HashSet<&str> = HashSet::new();
        for name in self.all_netns() {
            let netns = self.netns(&name)?;
            let state = self.dir.join(format!("tuning-{name}.json"));
            let saved = netns.run_in(&self.home, || -> anyhow::Result<_> {
                let mut writes = Vec::new();
                for c in compare(&profile, &root) {
                    if is_node_wide_file(c.key)
                        || matches!(c.status, Status::ReadOnly | Status::Missing)
                    {
                        node_wide.insert(c.key);
                    } else if c.status == Status::Change {
                        writes.push(write(c));
                    }
                }
                Ok(kernel_tuning::state::apply(
                    &root,
                    profile.name,
                    &writes,
                    &state,
                )?)
            })??;
            changes.in_namespaces += saved.entries.len();
        }
        let writes: Vec<_> = compare(&profile, &root)
            .into_iter()
            .filter(|c| node_wide.contains(c.key) && c.status == Status::Change)
            .map(write)
            .collect();
        let state = self.dir.join(NODE_TUNING_STATE);
        let saved = kernel_tuning::state::apply(&root, profile.name, &writes, &state)?;
        if let Ok(mut held) = self.cleanup.node_tuning.lock() {
            *held = Some(state);
        }
        changes.node_wide = saved.entries.into_iter().map(|e| e.path).collect();
        Ok(changes)
    }

    /// Puts back what `apply_tuning` changed: in every lab namespace, then on the node.
    pub fn revert_tuning(&self) -> anyhow::Result<TuningChanges> {
        let root = kernel_tuning::sysfs::Root::default();
        let mut restored = TuningChanges::default();
        for name in self.all_netns() {
            let state = self.dir.join(format!("tuning-{name}.json"));
            if !state.exists() {
                continue;
            }
            let netns = self.netns(&name)?;
            let saved =
                netns.run_in(&self.home, || kernel_tuning::state::revert(&root, &state))??;
            restored.in_namespaces += saved.entries.len();
        }
        let node_state = self
            .cleanup
            .node_tuning
            .lock()
            .ok()
            .and_then(|mut s| s.take());
        if let Some(state) = node_state {
            let saved = kernel_tuning::state::revert(&root, &state)?;
            restored.node_wide = saved.entries.into_iter().map(|e| e.path).collect();
        }
        Ok(restored)
    }

    /// Every namespace of the lab: both nodes, then the pods.
    fn all_netns(&self) -> Vec<String> {
        let mut names: Vec<String> = (0..2).map(|n| self.node_netns(n)).collect();
        names.extend(self.pods.iter().map(|p| p.netns.clone()));
        names
    }

    fn netns(&self, name: &str) -> anyhow::Result<NetNs> {
        NetNs::open(format!("/run/netns/{name}")).with_context(|| format!("namespace {name}"))
    }

    /// A TCP connection created inside namespace `ns` (a pod or a node).
    pub fn connect_in(&self, ns: &str, addr: SocketAddr) -> anyhow::Result<TcpStream> {
        let netns = self.netns(ns)?;
        let stream = netns
            .run_in(&self.home, || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            })?
            .with_context(|| format!("connecting from {ns} to {addr}"))?;
        Ok(stream)
    }

    /// Connects from a pod from local port `port`, as an application that binds its port.
    pub fn connect_from_port(
        &self,
        pod: &str,
        addr: SocketAddr,
        port: u16,
    ) -> anyhow::Result<TcpStream> {
        let netns = self.netns(&self.pod(pod).netns)?;
        let stream = netns
            .run_in(&self.home, || -> std::io::Result<TcpStream> {
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    None,
                )?;
                let any: SocketAddr = match addr {
                    SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, port).into(),
                    SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, port).into(),
                };
                socket.bind(&any.into())?;
                socket.connect_timeout(&addr.into(), Duration::from_secs(10))?;
                Ok(socket.into())
            })?
            .with_context(|| format!("connecting from {pod} port {port} to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Connects from a pod, as an application in it would (subject to its redirect rules).
    pub fn connect_from(&self, pod: &str, addr: SocketAddr) -> anyhow::Result<TcpStream> {
        let stream = self.connect_in(&self.pod(pod).netns, addr)?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// A listener inside a pod, as an application in it would open.
    pub fn listen_in(&self, pod: &str, port: u16) -> anyhow::Result<TcpListener> {
        let netns = self.netns(&self.pod(pod).netns)?;
        Ok(netns.run_in(&self.home, || TcpListener::bind(("0.0.0.0", port)))??)
    }

    /// Starts a program inside a pod (it is killed when the lab goes down).
    pub fn spawn_in(&self, pod: &str, program: &Path, args: &[&str]) -> anyhow::Result<Child> {
        let ns = self.pod(pod).netns.clone();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} in {ns}", program.display()))?;
        self.track(&child);
        Ok(child)
    }

    /// Keeps a background program alive until the lab goes down.
    pub fn keep(&mut self, child: Child) {
        self.others.push(child);
    }

    /// Address of a pod's port.
    pub fn addr(&self, pod: &str, port: u16) -> SocketAddr {
        SocketAddr::from((self.pod(pod).ip, port))
    }

    /// Tears everything down now (also done on drop).
    pub fn down(self) {}
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in self
            .agents
            .iter_mut()
            .chain(self.dataplanes.iter_mut())
            .flatten()
            .chain(self.others.iter_mut())
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.cleanup.run();
        if let Ok(mut labs) = registry().lock() {
            labs.retain(|c| !Arc::ptr_eq(c, &self.cleanup));
        }
    }
}

/// A bodiless HTTP/1.1 request on `stream`, read until the server closes: the status (0 if
/// the answer is not HTTP) and the body.
fn http_exchange(
    mut stream: std::net::TcpStream,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_among_the_data_planes_flags_replaces_the_labs_own() {
        let mut options = LabOptions::default();
        assert_eq!(options.driver_flag(), Some(["--driver", "auto"]));
        for given in [["--driver=epoll"].as_slice(), &["--driver", "io-uring"]] {
            options.dataplane_args = given.iter().map(|a| a.to_string()).collect();
            assert_eq!(options.driver_flag(), None, "{given:?}");
        }
        options.dataplane_args = vec!["--drivers-license".into()];
        assert_eq!(options.driver_flag(), Some(["--driver", "auto"]));
    }
}
