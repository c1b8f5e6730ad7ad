//! Wiring of the data-plane process: workers, the snapshot watcher, admin threads, signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};

use crate::admin::{self, AdminState};
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
        socks5 = config.worker.socks5,
        "starting data plane"
    );

    let registry = Arc::new(NetnsRegistry::default());
    let mut senders = Vec::new();
    let mut stats = Vec::new();
    let mut threads = Vec::new();
    for id in 0..config.workers {
        let (tx, rx) = flume::unbounded::<Control>();
        let worker_stats = Arc::new(WorkerStats::default());
        worker_stats
            .driver_io_uring
            .set(u64::from(driver == runtime::Driver::IoUring));
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
                    match Worker::new(id, thread_stats, settings, thread_registry) {
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
        stats.push(worker_stats);
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

    admin::start(
        Arc::new(AdminState {
            workers: stats,
            watch: status,
            driver,
        }),
        config.readiness_addr,
        config.admin_addr,
    )
    .map_err(AppError::Admin)?;

    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(AppError::Signals)?;
    if let Some(signal) = signals.forever().next() {
        tracing::info!(signal, "shutting down");
    }
    stop.store(true, Ordering::Release);
    for tx in &senders {
        let _ = tx.send(Control::Shutdown);
    }
    for t in threads {
        let _ = t.join();
    }
    let _ = watcher.join();
    Ok(())
}
