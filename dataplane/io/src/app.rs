//! Wiring of the data-plane process: workers, the snapshot watcher, admin threads, signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};

use crate::accesslog::{AccessLogSettings, AccessLogger};
use crate::admin::{self, AdminState};
use crate::logs::LogLevel;
use crate::metrics::MetricsRegistry;
use crate::netns_sync::{self, NetnsRegistry};
use crate::runtime::{self, DriverChoice};
use crate::stats::WorkerStats;
use crate::watch::{self, WatchStatus};
use crate::worker::{Control, Worker, WorkerSettings};

/// The validated configuration of a data-plane process.
#[derive(Clone, Debug)]
pub struct Config {
    pub snapshot: PathBuf,
    pub workers: usize,
    /// Cores to pin workers to, in order; empty means one per allowed core, in order.
    pub cores: Vec<usize>,
    /// Pin each worker to its core (the production default).
    pub pin: bool,
    pub driver: DriverChoice,
    pub readiness_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// On SIGTERM: how long open connections may take to finish before they are closed.
    pub drain_grace: Duration,
    pub access_log: AccessLogSettings,
    /// The process's log filter, changed at runtime through the admin endpoint.
    pub log_level: Option<LogLevel>,
    /// ctrl-agent's socket for the namespaces of pods enrolled through CNI.
    pub netns_socket: Option<PathBuf>,
    pub worker: WorkerSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("driver: {0}")]
    Driver(String),
    #[error("admin endpoints: {0}")]
    Admin(std::io::Error),
    #[error("starting worker {0}: {1}")]
    Worker(usize, std::io::Error),
    #[error("signals: {0}")]
    Signals(std::io::Error),
}

/// Runs the data plane until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), AppError> {
    let driver = runtime::resolve(config.driver).map_err(AppError::Driver)?;
    match crate::sockets::raise_nofile_limit() {
        Ok(n) => tracing::debug!(open_files = n, "raised the open-files limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open-files limit"),
    }
    let allowed: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let cores = if config.cores.is_empty() {
        allowed.clone()
    } else {
        config.cores.clone()
    };
    tracing::info!(
        snapshot = %config.snapshot.display(),
        workers = config.workers,
        cores = ?cores,
        pinned = config.pin,
        driver = driver.name(),
        readiness = %config.readiness_addr,
        admin = %config.admin_addr,
        metrics = %config.metrics_addr,
        drain_grace = ?config.drain_grace,
        access_log = config.access_log.enabled,
        access_log_sample = config.access_log.sample,
        socks5 = config.worker.socks5,
        "starting data plane"
    );

    let registry = Arc::new(NetnsRegistry::default());
    let stats: Vec<Arc<WorkerStats>> = (0..config.workers)
        .map(|_| {
            let s = WorkerStats::default();
            s.driver_io_uring
                .set(u64::from(driver == runtime::Driver::IoUring));
            Arc::new(s)
        })
        .collect();
    let (metrics, worker_metrics) = MetricsRegistry::new(config.workers);
    let (access_logger, worker_logs) = AccessLogger::new(&stats, config.access_log);
    let mut senders = Vec::new();
    let mut threads = Vec::new();
    for (id, (thread_metrics, thread_log)) in
        worker_metrics.into_iter().zip(worker_logs).enumerate()
    {
        let (tx, rx) = flume::unbounded::<Control>();
        let worker_stats = stats[id].clone();
        let core = (config.pin && !cores.is_empty()).then(|| cores[id % cores.len()]);
        let settings = config.worker;
        let thread_stats = worker_stats.clone();
        let thread_registry = registry.clone();
        let handle = std::thread::Builder::new()
            .name(format!("worker-{id}"))
            .spawn(move || {
                if let Some(core) = core {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                        tracing::warn!(worker = id, core, "could not pin worker to its core");
                    }
                }
                let result = runtime::block_on(driver, || async move {
                    match Worker::new(
                        id,
                        thread_stats,
                        settings,
                        thread_registry,
                        thread_metrics,
                        thread_log,
                    ) {
                        Ok(worker) => {
                            tracing::info!(
                                worker = id,
                                ?core,
                                driver = driver.name(),
                                "worker running"
                            );
                            worker.run(rx).await;
                        }
                        Err(error) => {
                            tracing::error!(worker = id, %error, "worker failed to start")
                        }
                    }
                });
                if let Err(error) = result {
                    tracing::error!(worker = id, %error, "worker runtime failed");
                }
            })
            .map_err(|e| AppError::Worker(id, e))?;
        senders.push(tx);
        threads.push(handle);
    }

    let status = Arc::new(WatchStatus::default());
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (path, senders, status, stop) = (
            config.snapshot.clone(),
            senders.clone(),
            status.clone(),
            stop.clone(),
        );
        std::thread::Builder::new()
            .name("snapshot-watch".into())
            .spawn(move || watch::watch(path, senders, status, stop))
            .map_err(|e| AppError::Worker(usize::MAX, e))?
    };

    if let Some(socket) = config.netns_socket.clone() {
        let (registry, senders, stop) = (registry.clone(), senders.clone(), stop.clone());
        std::thread::Builder::new()
            .name("netns-sync".into())
            .spawn(move || netns_sync::follow(socket, registry, senders, stop))
            .map_err(|e| AppError::Worker(usize::MAX, e))?;
    }

    let logger_stop = Arc::new(AtomicBool::new(false));
    let logger = {
        let stop = logger_stop.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || access_logger.run(stop))
            .map_err(|e| AppError::Worker(usize::MAX, e))?
    };

    let state = Arc::new(AdminState {
        workers: stats,
        watch: status,
        driver,
        metrics,
        log_level: config.log_level.clone(),
        control: senders.clone(),
        access_log: Mutex::new(config.access_log),
        draining: AtomicBool::new(false),
    });
    admin::start(
        state.clone(),
        config.readiness_addr,
        config.admin_addr,
        config.metrics_addr,
    )
    .map_err(AppError::Admin)?;

    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(AppError::Signals)?;
    if let Some(signal) = signals.forever().next() {
        tracing::info!(signal, grace = ?config.drain_grace, "draining: readiness now fails, listeners close");
    }
    drain(&state, &senders, config.drain_grace, &mut signals);
    stop.store(true, Ordering::Release);
    for tx in &senders {
        let _ = tx.send(Control::Shutdown);
    }
    for t in threads {
        let _ = t.join();
    }
    let _ = watcher.join();
    logger_stop.store(true, Ordering::Release);
    let _ = logger.join();
    Ok(())
}

/// Readiness fails first, then every worker stops accepting and sends GOAWAY on its tunnels;
/// open connections get until `grace` to finish (a second signal cuts it short).
fn drain(
    state: &AdminState,
    workers: &[flume::Sender<Control>],
    grace: Duration,
    signals: &mut signal_hook::iterator::Signals,
) {
    state.draining.store(true, Ordering::Release);
    for tx in workers {
        let _ = tx.send(Control::Drain);
    }
    let started = Instant::now();
    loop {
        let open: u64 = state
            .workers
            .iter()
            .map(|w| w.active_connections.get())
            .sum();
        if open == 0 {
            tracing::info!(after = ?started.elapsed(), "drained: no connections left");
            return;
        }
        if started.elapsed() >= grace {
            tracing::warn!(
                open,
                ?grace,
                "grace period over: closing the remaining connections"
            );
            return;
        }
        if signals.pending().next().is_some() {
            tracing::warn!(open, "second signal: closing the remaining connections now");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
