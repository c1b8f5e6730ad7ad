//! `ctrl-agent`: parse flags, load or create the CA, run the file source until SIGTERM.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ctrl_agent::agent::{Agent, AgentOptions};
use ctrl_agent::ca::LocalCa;
use ctrl_agent::config::DEFAULT_TRUST_DOMAIN;

/// Publishes workload, policy and certificate snapshots for the data plane on this node.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The local config file (YAML) listing workloads, services and policies.
    #[arg(long, env = "CTRL_AGENT_CONFIG")]
    config: PathBuf,
    /// This node's name: workloads with this node get certificates and in-pod listeners.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Where to publish the snapshot region (a file on tmpfs).
    #[arg(long, env = "DATAPLANE_SNAPSHOT", default_value = "/run/mesh/snapshot")]
    snapshot: PathBuf,
    /// Directory holding ca-cert.pem and ca-key.pem; generated there if absent.
    #[arg(long, env = "CTRL_AGENT_CA_DIR", default_value = "/var/lib/mesh/ca")]
    ca_dir: PathBuf,
    /// Trust domain for a newly generated CA.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
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
    /// Where enrollments are remembered across restarts.
    #[arg(
        long,
        env = "CTRL_AGENT_STATE_DIR",
        default_value = "/var/lib/mesh/state"
    )]
    state_dir: PathBuf,
    #[arg(long)]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    mesh_io::logs::init(args.log_json);
    let ca = LocalCa::load_or_generate(&args.ca_dir, &args.trust_domain)
        .with_context(|| format!("local CA in {}", args.ca_dir.display()))?;
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
    tracing::info!(config = %args.config.display(), node = %args.node,
        snapshot = %args.snapshot.display(), ca_dir = %args.ca_dir.display(),
        cert_ttl = ?args.cert_ttl, "starting ctrl-agent");
    let agent = Agent::new(
        AgentOptions {
            config_path: args.config,
            node: args.node,
            snapshot_path: args.snapshot,
            owner,
            cert_ttl: args.cert_ttl,
            extra_roots,
            state_dir: args.state_dir,
        },
        ca,
    )?;
    if let Some(cni_socket) = &args.cni_socket {
        let (shared, wake) = agent.handles();
        ctrl_agent::cni_server::start(shared, wake, cni_socket, &args.netns_socket).with_context(
            || {
                format!(
                    "CNI sockets {} and {}",
                    cni_socket.display(),
                    args.netns_socket.display()
                )
            },
        )?;
        tracing::info!(cni = %cni_socket.display(), netns = %args.netns_socket.display(),
            "CNI enrollment enabled");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    agent.run(args.poll_interval, stop);
    tracing::info!("ctrl-agent stopped; the data plane keeps serving the last snapshot");
    Ok(())
}
