//! `ctrl-agent`: parse flags, set up the certificate authority (the local CA, or a client of
//! Istio's CA) and the source (the local file, or the Kubernetes API), run until SIGTERM.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ctrl_agent::agent::{Agent, AgentOptions};
use ctrl_agent::authority::CertificateAuthority;
use ctrl_agent::ca::LocalCa;
use ctrl_agent::config::DEFAULT_TRUST_DOMAIN;
use ctrl_agent::istio_ca::{IstioCaClient, IstioCaConfig, DEFAULT_CLUSTER_ID, DEFAULT_TOKEN_FILE};
use ctrl_agent::kube_source::model::ModelOptions;
use ctrl_agent::kube_source::KubeOptions;
use ctrl_agent::source::SourceOptions;
use ctrl_agent::uninstall::{Departure, NodeRules};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SourceKind {
    /// The local YAML file of --config.
    File,
    /// The Kubernetes API server (in-cluster service account, or KUBECONFIG / ~/.kube/config).
    Kube,
}

/// Publishes workload, policy and certificate snapshots for the data plane on this node.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Where workloads, services and policies come from.
    #[arg(long, value_enum, env = "CTRL_AGENT_SOURCE", default_value = "file")]
    source: SourceKind,
    /// The local config file (YAML) listing workloads, services and policies (--source file).
    #[arg(long, env = "CTRL_AGENT_CONFIG", required_if_eq("source", "file"))]
    config: Option<PathBuf>,
    /// --source kube: Istio's root namespace (policies there without a selector apply
    /// mesh-wide).
    #[arg(long, default_value = mesh_core::authz::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// This node's name: workloads with this node get certificates and in-pod listeners.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Where to publish the snapshot region (a file on tmpfs).
    #[arg(long, env = "DATAPLANE_SNAPSHOT", default_value = "/run/mesh/snapshot")]
    snapshot: PathBuf,
    /// Local CA only: directory holding ca-cert.pem and ca-key.pem; generated there if absent.
    #[arg(long, env = "CTRL_AGENT_CA_DIR", default_value = "/var/lib/mesh/ca")]
    ca_dir: PathBuf,
    /// Local CA: trust domain for a newly generated CA. --source kube: the mesh's trust
    /// domain, in workload identities.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Istio's CA to get workload certificates from, e.g.
    /// `https://istiod.istio-system.svc:15012` (https is assumed without a scheme). Without
    /// it, the local CA of --ca-dir issues them.
    #[arg(long, env = "CA_ADDRESS")]
    ca_address: Option<String>,
    /// With --ca-address: PEM file of istiod's root certificates (several during a root
    /// rotation). istiod's TLS certificate must chain to one of them, and all of them, with the
    /// roots that end the chains the CA returns, are published as mesh trust anchors. Re-read
    /// before every request.
    #[arg(
        long,
        env = "CA_ROOT_CERT",
        default_value = "/var/run/secrets/istio/root-cert.pem"
    )]
    ca_root_cert: PathBuf,
    /// With --ca-address: the agent's projected service-account token, sent as
    /// `authorization: Bearer`; re-read before every request because the kubelet rotates it.
    #[arg(long, default_value = DEFAULT_TOKEN_FILE)]
    ca_token_file: PathBuf,
    /// With --ca-address: this cluster's Istio cluster ID, sent as the `clusterid` header.
    #[arg(long, env = "CLUSTER_ID", default_value = DEFAULT_CLUSTER_ID)]
    cluster_id: String,
    /// With --ca-address: the name istiod's TLS certificate must carry, when it is not the
    /// host of the address (e.g. when connecting by IP).
    #[arg(long)]
    ca_tls_server_name: Option<String>,
    /// User and group of the data plane: the region (which holds keys) is theirs alone.
    #[arg(long)]
    dataplane_uid: Option<u32>,
    #[arg(long)]
    dataplane_gid: Option<u32>,
    /// Lifetime of workload certificates; they are renewed at half of it.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
    /// How often to look at the config file and the certificates.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Extra trust anchors (PEM files) to publish with the CA's root, e.g. during rotation.
    #[arg(long)]
    extra_root: Vec<PathBuf>,
    /// Socket where the mesh-cni plugin enrolls pods (CNI integration is off without it).
    #[arg(long, env = "CTRL_AGENT_CNI_SOCKET")]
    cni_socket: Option<PathBuf>,
    /// Socket where data planes receive enrolled pods' network namespaces.
    #[arg(
        long,
        env = "CTRL_AGENT_NETNS_SOCKET",
        default_value = "/var/run/mesh/netns.sock"
    )]
    netns_socket: PathBuf,
    /// CNI GC releases the sandboxes the runtime no longer lists, except those enrolled less
    /// than this long ago (their ADD may have been under way when the runtime listed).
    #[arg(long, env = "CTRL_AGENT_CNI_GC_GRACE", default_value = "60s",
        value_parser = humantime::parse_duration)]
    cni_gc_grace: Duration,
    /// After handing the node over to a new agent (a rolling update's next pod), how long to
    /// wait for it to serve the CNI socket, or for it to answer there again once it stopped,
    /// before this agent takes the node back (a failed upgrade, a rollback).
    #[arg(long, env = "CTRL_AGENT_CNI_SUCCESSOR_WAIT", default_value = "30s",
        value_parser = humantime::parse_duration)]
    cni_successor_wait: Duration,
    /// Where enrollments are remembered across restarts.
    #[arg(
        long,
        env = "CTRL_AGENT_STATE_DIR",
        default_value = "/var/lib/mesh/state"
    )]
    state_dir: PathBuf,
    /// With --cni-socket: SNAT the node's own TCP connections to captured pods (the kubelet's
    /// probes) to 169.254.7.127 / fd16:9254:7127:1337:ffff:ffff:ffff:ffff, which the pods'
    /// capture rules let through to the application, as Istio ambient does; the nftables table
    /// `inet mesh-host-probes`. `false` for nodes that handle probes otherwise.
    #[arg(
        long,
        env = "CTRL_AGENT_HOST_PROBE_SNAT",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    host_probe_snat: bool,
    /// The node's network namespace, for the probe SNAT table, when the agent runs in a pod
    /// of its own (e.g. `/host/proc/1/ns/net`, the node's /proc mounted at /host/proc).
    /// Default: the agent's own namespace.
    #[arg(long, env = "CTRL_AGENT_HOST_NETNS")]
    host_netns: Option<PathBuf>,
    /// Where to serve the agent's own metrics (`/metrics`, Prometheus text: publications,
    /// the cluster's watches, certificates, CNI requests, the process) and its readiness
    /// (`/healthz/ready`: a snapshot was published), and `/logging` to change the log filter
    /// (from the loopback only). Off unless given; the chart serves them on 15014.
    #[arg(long, env = "CTRL_AGENT_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// This agent's pod (the downward API's metadata.name and metadata.namespace, as the
    /// chart sets them). At a clean shutdown the agent reads the DaemonSet that runs the pod
    /// (`ctrl_agent::uninstall`): a restart or an upgrade that keeps the host probe table
    /// leaves it to the next agent; anything else (an uninstall, the feature turned off, an
    /// API that cannot answer) removes it. Without them a shutdown is taken as a restart.
    #[arg(long, env = "CTRL_AGENT_POD_NAME", requires = "pod_namespace")]
    pod_name: Option<String>,
    #[arg(long, env = "CTRL_AGENT_POD_NAMESPACE", requires = "pod_name")]
    pod_namespace: Option<String>,
    #[arg(long)]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let log_level = mesh_io::logs::init(args.log_json);
    let ca: CertificateAuthority = match &args.ca_address {
        None => {
            tracing::info!(ca_dir = %args.ca_dir.display(), "certificates from the local CA");
            LocalCa::load_or_generate(&args.ca_dir, &args.trust_domain)
                .with_context(|| format!("local CA in {}", args.ca_dir.display()))?
                .into()
        }
        Some(address) => {
            let mut config = IstioCaConfig::new(address, &args.ca_root_cert);
            config.token_file = args.ca_token_file.clone();
            config.cluster_id = args.cluster_id.clone();
            config.tls_server_name = args.ca_tls_server_name.clone();
            tracing::info!(address, root_cert = %args.ca_root_cert.display(),
                token_file = %args.ca_token_file.display(), cluster_id = %args.cluster_id,
                tls_server_name = ?args.ca_tls_server_name, "certificates from Istio's CA");
            IstioCaClient::new(config)
                .context("Istio CA client")?
                .into()
        }
    };
    let mut extra_roots = Vec::new();
    for path in &args.extra_root {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let der = ctrl_agent::ca::pem_certificates(&pem)
            .with_context(|| format!("{}: no certificate", path.display()))?;
        extra_roots.extend(der);
    }
    let owner = match (args.dataplane_uid, args.dataplane_gid) {
        (Some(uid), gid) => Some((uid, gid.unwrap_or(uid))),
        (None, Some(_)) => anyhow::bail!("--dataplane-gid needs --dataplane-uid"),
        (None, None) => None,
    };
    if let Some(dir) = args.snapshot.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let source = match (args.source, args.config) {
        (SourceKind::File, Some(path)) => {
            tracing::info!(config = %path.display(), "source: the local file");
            SourceOptions::File(path)
        }
        // clap requires --config with --source file.
        (SourceKind::File, None) => anyhow::bail!("--source file needs --config"),
        (SourceKind::Kube, _) => {
            let client = kube_config().context("Kubernetes client configuration")?;
            tracing::info!(cluster = %client.cluster_url, "source: the Kubernetes API");
            SourceOptions::Kube(Box::new(KubeOptions::new(
                client,
                ModelOptions {
                    node: args.node.clone(),
                    trust_domain: args.trust_domain.clone(),
                    root_namespace: args.root_namespace.clone(),
                },
            )))
        }
    };
    tracing::info!(node = %args.node, snapshot = %args.snapshot.display(),
        cert_ttl = ?args.cert_ttl, "starting ctrl-agent");
    // Before anything changes (the region, the node's CNI socket): a port in use stops here.
    let metrics_listener = args
        .metrics_addr
        .map(|addr| {
            std::net::TcpListener::bind(addr).with_context(|| format!("--metrics-addr {addr}"))
        })
        .transpose()?;
    // Before the state file is read: the previous pod's agent stops changing it.
    let handed_over_by_predecessor = args
        .cni_socket
        .as_deref()
        .and_then(ctrl_agent::cni_server::take_over);
    let agent = Agent::new(
        AgentOptions {
            source,
            node: args.node,
            snapshot_path: args.snapshot,
            owner,
            cert_ttl: args.cert_ttl,
            extra_roots,
            state_dir: args.state_dir,
        },
        ca,
    )?;
    let (shared, _) = agent.handles();
    let host_probes = args.cni_socket.is_some() && args.host_probe_snat;
    if host_probes {
        let host = match &args.host_netns {
            Some(path) => Some(
                mesh_io::netns::NetNs::open(path)
                    .with_context(|| format!("--host-netns {}", path.display()))?,
            ),
            None => None,
        };
        ctrl_agent::probes::start(&shared, host);
    } else if args.cni_socket.is_some() {
        tracing::info!("host probe SNAT turned off: kubelet probes to captured pods meet the mesh");
    }
    // Before the CNI socket serves: a SIGTERM from then on must reach the shutdown below
    // (which may hand the node back) rather than end the process where it stands.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    if let Some(listener) = metrics_listener {
        let endpoint = ctrl_agent::metrics::Endpoint {
            metrics: agent.metrics(),
            shared: Some(shared.clone()),
            kube: agent.watches_a_cluster(),
            log_level: Some(log_level),
        };
        let bound = ctrl_agent::metrics::serve(listener, endpoint, stop.clone())
            .context("serving the metrics")?;
        tracing::info!(%bound, "metrics on /metrics, readiness on /healthz/ready");
    }
    let mut cni_server = None;
    if let Some(cni_socket) = &args.cni_socket {
        let (shared, wake) = agent.handles();
        let server = ctrl_agent::cni_server::start(
            shared,
            wake,
            cni_socket,
            &args.netns_socket,
            ctrl_agent::cni_server::CniSettings {
                gc_grace: args.cni_gc_grace,
                successor_wait: args.cni_successor_wait,
            },
            handed_over_by_predecessor,
        )
        .with_context(|| {
            format!(
                "CNI sockets {} and {}",
                cni_socket.display(),
                args.netns_socket.display()
            )
        })?;
        tracing::info!(cni = %cni_socket.display(), netns = %args.netns_socket.display(),
            "CNI enrollment enabled");
        cni_server = Some(server);
    }
    agent.run(args.poll_interval, stop);
    if let Some(server) = &cni_server {
        server.hand_back();
    }
    if host_probes {
        let pod = args.pod_namespace.as_deref().zip(args.pod_name.as_deref());
        ctrl_agent::probes::stop(&shared, departure(pod));
    }
    tracing::info!("ctrl-agent stopped; the data plane keeps serving the last snapshot");
    Ok(())
}

/// Whether this shutdown leaves the host probe table to a successor (see
/// `ctrl_agent::uninstall`), given the agent's pod as (namespace, name).
fn departure(pod: Option<(&str, &str)>) -> Departure {
    let Some((namespace, name)) = pod else {
        tracing::info!("no --pod-name/--pod-namespace: the shutdown is taken as a restart");
        return Departure::Restart;
    };
    let (departure, why) =
        ctrl_agent::uninstall::at_shutdown(namespace, name, NodeRules::HostProbeTable);
    match departure {
        Departure::Restart => tracing::info!("{why}"),
        Departure::Uninstall => tracing::warn!("{why}"),
    }
    departure
}

/// kube's standard search: KUBECONFIG or ~/.kube/config, else the pod's service account.
fn kube_config() -> anyhow::Result<kube::Config> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(kube::Config::infer())?)
}
