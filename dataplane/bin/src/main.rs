//! `dataplane`: parse flags, validate, log the effective config, run.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mesh_io::accesslog::AccessLogSettings;
use mesh_io::app::{self, Config};
use mesh_io::pool::PoolSettings;
use mesh_io::runtime::DriverChoice;
use mesh_io::worker::WorkerSettings;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Thread-per-core HBONE/mTLS data plane. Reads workloads, policies and certificates from the
/// snapshot region that ctrl-agent publishes.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Snapshot region published by ctrl-agent.
    #[arg(long, env = "DATAPLANE_SNAPSHOT", default_value = "/run/mesh/snapshot")]
    snapshot: PathBuf,
    /// Worker threads (default: one per core this process may run on).
    #[arg(long, env = "DATAPLANE_WORKERS")]
    workers: Option<usize>,
    /// Cores to pin workers to, e.g. "2,3" or "0-3" (default: the allowed cores in order).
    #[arg(long, env = "DATAPLANE_CORES", value_parser = parse_cores)]
    cores: Option<Vec<usize>>,
    /// Leave workers unpinned (for hosts where other busy processes share the cores, such as a
    /// lab running two simulated nodes on one machine).
    #[arg(long, env = "DATAPLANE_NO_PIN", conflicts_with = "cores")]
    no_pin: bool,
    /// I/O driver: auto (io_uring, else epoll), io-uring, or epoll.
    #[arg(long, env = "DATAPLANE_DRIVER", default_value = "auto")]
    driver: DriverChoice,
    /// Open a SOCKS5 listener on localhost:15080 in every pod (labs and tests).
    #[arg(long, env = "DATAPLANE_SOCKS5")]
    socks5: bool,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Prometheus metrics (/stats/prometheus), Istio's names and labels.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// On SIGTERM: readiness fails, listeners close, and open connections get this long to
    /// finish before they are closed.
    #[arg(long, env = "DATAPLANE_DRAIN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_grace: Duration,
    /// Turn the per-connection access log off (it can be turned on again at runtime:
    /// POST /access_log?enabled=true on the admin port).
    #[arg(long)]
    no_access_log: bool,
    /// Fraction of successful connections written to the access log; failures are always
    /// written.
    #[arg(long, default_value_t = 1.0, value_parser = parse_fraction)]
    access_log_sample: f64,
    /// Streams one pooled HBONE connection carries before the pool dials another (1 to 100,
    /// what the peer allows). With `--pool-idle-timeout 0s`, 1 gives every connection a fresh
    /// mTLS handshake (the perf lab's fresh-handshake scenario).
    #[arg(long, default_value_t = mesh_core::hbone::settings::MAX_STREAMS,
          value_parser = clap::value_parser!(u32).range(1..=mesh_core::hbone::settings::MAX_STREAMS as i64))]
    pool_max_streams: u32,
    /// Close pooled HBONE connections idle this long. `0s` closes each one as soon as its last
    /// stream ends instead of keeping it for the next.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pool_idle_timeout: Duration,
    /// PING pooled connections this often; drop them if no PONG within --ping-timeout.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    ping_interval: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ping_timeout: Duration,
    /// Give up on a TCP connect, TLS handshake or tunnel dial after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Connect to applications from the data plane's address in the pod rather than from
    /// their clients' (the default needs CAP_NET_ADMIN and the agent's policy routing in
    /// each pod; without either, this is what happens anyway).
    #[arg(long, env = "DATAPLANE_NO_ORIGINAL_SOURCE")]
    no_original_source: bool,
    /// ctrl-agent's socket handing over the network namespaces of pods enrolled through CNI.
    #[arg(long, env = "DATAPLANE_NETNS_SOCKET")]
    netns_socket: Option<PathBuf>,
    /// Upgrades without resets: a new process started with the same socket takes this one's
    /// listening sockets over, and this one drains (see the README).
    #[arg(long, env = "DATAPLANE_UPGRADE_SOCKET")]
    upgrade_socket: Option<PathBuf>,
    /// How long a new process may take to get ready on the sockets it took over (its pods'
    /// namespaces and snapshot in hand) before it gives up and leaves the running one in
    /// charge, 1s to 1h. The running process tells it its own, and the shorter one holds.
    #[arg(long, env = "DATAPLANE_UPGRADE_READY_WITHIN", default_value = "60s",
          value_parser = parse_ready_window)]
    upgrade_ready_within: Duration,
    /// Log lines as JSON instead of text.
    #[arg(long)]
    log_json: bool,
    /// Freed memory glibc malloc keeps for reuse instead of returning it to the kernel, in
    /// MiB (0: glibc's defaults). Returning it makes every new TLS and HTTP/2 read buffer
    /// fault its pages in again; keeping it is worth about a third more stream throughput
    /// for 2 MB more idle RSS (bench-results/README.md). Ignored with the mimalloc feature.
    #[arg(long, env = "DATAPLANE_MALLOC_RETAIN_MIB",
        default_value_t = mesh_io::runtime::DEFAULT_MALLOC_RETAIN_MIB)]
    malloc_retain_mib: usize,
    /// Keep glibc's fastbins (small freed blocks parked unmerged). Off by default: a complete
    /// snapshot build then does not merge the blocks of the index it replaces first
    /// (bench-results/README.md). Ignored with the mimalloc feature.
    #[arg(long, env = "DATAPLANE_MALLOC_FASTBINS")]
    malloc_fastbins: bool,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|f| (0.0..=1.0).contains(f))
        .ok_or_else(|| format!("{s:?} is not a number from 0 to 1"))
}

fn parse_ready_window(s: &str) -> Result<Duration, String> {
    let within = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&within) {
        return Err(format!("{s:?} is not from 1s to 1h"));
    }
    Ok(within)
}

fn parse_cores(s: &str) -> Result<Vec<usize>, String> {
    let mut cores = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("{part:?} is not a core number or range");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                cores.extend(a..=b);
            }
            None => cores.push(part.parse().map_err(|_| bad())?),
        }
    }
    if cores.is_empty() {
        return Err("no cores given".into());
    }
    Ok(cores)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let log_level = mesh_io::logs::init(args.log_json);
    #[cfg(not(feature = "mimalloc"))]
    mesh_io::runtime::MallocPolicy {
        retain_bytes: args.malloc_retain_mib << 20,
        fastbins: args.malloc_fastbins,
    }
    .apply()?;
    let cores = args.cores.unwrap_or_default();
    let default_workers = if cores.is_empty() {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cores.len()
    };
    let workers = args.workers.unwrap_or(default_workers);
    if workers == 0 {
        anyhow::bail!("--workers must be at least 1");
    }
    app::run(Config {
        snapshot: args.snapshot,
        workers,
        cores,
        pin: !args.no_pin,
        driver: args.driver,
        readiness_addr: args.readiness_addr,
        admin_addr: args.admin_addr,
        metrics_addr: args.metrics_addr,
        drain_grace: args.drain_grace,
        access_log: AccessLogSettings {
            enabled: !args.no_access_log,
            sample: args.access_log_sample,
        },
        log_level: Some(log_level),
        upgrade_socket: args.upgrade_socket,
        upgrade_ready_within: args.upgrade_ready_within,
        netns_socket: args.netns_socket,
        worker: WorkerSettings {
            socks5: args.socks5,
            pool: PoolSettings {
                max_streams: args.pool_max_streams,
                idle_timeout: args.pool_idle_timeout,
                ping_interval: args.ping_interval,
                ping_timeout: args.ping_timeout,
                dial_timeout: args.connect_timeout,
            },
            handshake_timeout: args.connect_timeout,
            connect_timeout: args.connect_timeout,
            original_source: !args.no_original_source,
            // Checked against the kernel at start.
            migrate_queued: true,
        },
    })?;
    Ok(())
}
