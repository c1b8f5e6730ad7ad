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
use crate::upgrade::{self, HandedListener, Inherited};
use crate::watch::{self, WatchStatus};
use crate::worker::{Control, Shared, Worker, WorkerSettings};

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
    /// Where a newer process asks this one for its sockets (and where this one asks a
    /// running one at start): upgrades without resets.
    pub upgrade_socket: Option<PathBuf>,
    /// How long a new process may take to get ready on inherited sockets before it gives up
    /// (and, when this one hands over, the window it tells the new process).
    pub upgrade_ready_within: Duration,
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
    #[error("taking over from the running data plane: {0}")]
    Takeover(std::io::Error),
    #[error("gave up taking over; the running data plane keeps serving: {0}")]
    TakeoverAborted(String),
    #[error(
        "the data plane this one handed over to (in another pod) has not answered on the \
         upgrade socket for {0:?}: exiting, so that a restart serves the node again"
    )]
    SuccessorGone(Duration),
    #[error(
        "the data plane this one handed over to (in another pod) is leaving, its pod deleted: \
         exiting, so that a restart takes the node back from it"
    )]
    SuccessorLeaving,
}

/// Runs the data plane until SIGTERM or SIGINT.
pub fn run(mut config: Config) -> Result<(), AppError> {
    if config.worker.original_source {
        if let Err(error) = crate::sockets::may_connect_transparently() {
            tracing::warn!(%error,
                "cannot connect from clients' addresses (IP_TRANSPARENT needs CAP_NET_ADMIN): applications see connections from their own address");
            config.worker.original_source = false;
        }
    }
    if config.worker.migrate_queued && !crate::sockets::kernel_migrates_queued_connections() {
        tracing::warn!(
            "this kernel has no net.ipv4.tcp_migrate_req (Linux 5.14): connections queued on \
             pods' listeners when the old process's listeners close at the end of an upgrade \
             are reset"
        );
        config.worker.migrate_queued = false;
    }
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
    // Everything that is not a worker (snapshot watcher, admin, metrics and readiness
    // servers, access logger, signals, upgrades) runs on the allowed cores no worker is
    // pinned to, so a scrape or a config dump never takes time from a data-plane core.
    // Threads inherit this from the main thread; workers pin themselves afterwards.
    if config.pin && !cores.is_empty() {
        let worker_cores: Vec<usize> = (0..config.workers)
            .map(|i| cores[i % cores.len()])
            .collect();
        let spare: Vec<usize> = allowed
            .iter()
            .copied()
            .filter(|c| !worker_cores.contains(c))
            .collect();
        if spare.is_empty() {
            tracing::warn!(cores = ?worker_cores,
                "every allowed core runs a worker: admin, metrics and the snapshot watcher share them");
        } else {
            match runtime::restrict_current_thread(&spare) {
                Ok(()) => {
                    tracing::info!(cores = ?spare, "housekeeping threads on the cores no worker uses")
                }
                Err(error) => {
                    tracing::warn!(%error, "could not move housekeeping threads off the worker cores")
                }
            }
        }
    }
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
        original_source = config.worker.original_source,
        "starting data plane"
    );

    // A running data plane on the upgrade socket hands its listening sockets over.
    let (predecessor, inherited, ready_within) = match &config.upgrade_socket {
        Some(path) => match upgrade::request(path).map_err(AppError::Takeover)? {
            Some(takeover) => {
                let ready_within = takeover.ready_within(config.upgrade_ready_within);
                tracing::info!(?ready_within, old_waits = ?takeover.old_waits,
                    "taking over the listening sockets of the running data plane");
                (Some(takeover.channel), takeover.inherited, ready_within)
            }
            None => (None, Inherited::default(), config.upgrade_ready_within),
        },
        None => (None, Inherited::default(), config.upgrade_ready_within),
    };
    let inherited = Arc::new(inherited);
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
        let shared = Shared {
            registry: registry.clone(),
            inherited: inherited.clone(),
            workers: config.workers,
        };
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
                        shared,
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
    let endpoints = admin::Endpoints::open(
        &inherited,
        config.readiness_addr,
        config.admin_addr,
        config.metrics_addr,
    )
    .map_err(AppError::Admin)?;
    let endpoint_copies = endpoints.duplicate().map_err(AppError::Admin)?;
    let admin_stop = Arc::new(AtomicBool::new(false));

    let (events, next_event) = flume::unbounded::<Event>();
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(AppError::Signals)?;
    {
        let events = events.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if events.send(Event::Signal(signal)).is_err() {
                        return;
                    }
                }
            })
            .map_err(AppError::Signals)?;
    }
    // Taking over: the admin endpoints and the upgrade socket stay the old process's until
    // this one is ready, so probes and scrapes never reach a process that may still give up.
    let takeover = match &predecessor {
        Some(_) => await_ready(&state, &next_event, ready_within),
        None => Ok(()),
    };
    let outcome = match takeover {
        Ok(()) => {
            admin::start(state.clone(), endpoints, admin_stop.clone()).map_err(AppError::Admin)?;
            let ready = inherited.ready_message();
            // Across pods the old process drains, then waits for its pod's SIGTERM. Heard from
            // now, so that a SIGTERM before its first question (a second away) still hands the
            // node back.
            let across_pods = predecessor.is_some() && ready == upgrade::Message::ReadyOwnEndpoints;
            let waiting_predecessor = Arc::new(upgrade::WaitingPredecessor::heard_at(
                across_pods.then(Instant::now),
            ));
            if let Some(channel) = predecessor {
                if let Err(error) = channel.send_json(&ready, &[]) {
                    tracing::error!(%error, "could not tell the old data plane it can drain");
                }
                let unclaimed = inherited.close_unclaimed();
                tracing::info!(
                    unclaimed,
                    "took over from the old data plane; it drains now"
                );
            }
            if let Some(path) = config.upgrade_socket.clone() {
                let upgrades = Upgrades {
                    path,
                    workers: senders.clone(),
                    endpoints: endpoint_copies,
                    events: events.clone(),
                    predecessor: waiting_predecessor.clone(),
                    ready_within: config.upgrade_ready_within,
                };
                std::thread::Builder::new()
                    .name("upgrade".into())
                    .spawn(move || upgrades.serve())
                    .map_err(AppError::Signals)?;
            }
            match next_event.recv() {
                Ok(Event::Signal(signal)) if waiting_predecessor.waits() => {
                    tracing::info!(signal, within = ?HAND_BACK_WITHIN,
                        "the pod's SIGTERM while the data plane this one took over from waits in its pod: handing the node back to it, accepting until it has taken over");
                    state.draining.store(true, Ordering::Release);
                    waiting_predecessor.leave();
                    if let Some(succeeded) = await_hand_back(&next_event) {
                        if succeeded.shares_endpoints {
                            admin_stop.store(true, Ordering::Release);
                        }
                    }
                    Ok(Afterwards::Exit)
                }
                Ok(Event::Signal(signal)) => {
                    tracing::info!(signal, grace = ?config.drain_grace,
                        "draining: readiness now fails, listeners close");
                    // A predecessor still in its pod asks once a second: it should not wait for
                    // a SIGTERM then, but restart and serve.
                    waiting_predecessor.leave();
                    Ok(Afterwards::Exit)
                }
                Ok(Event::HandedOver(succeeded)) => {
                    tracing::info!(grace = ?config.drain_grace,
                        shares_endpoints = succeeded.shares_endpoints,
                        "the new data plane serves: no longer accepting, draining");
                    if succeeded.shares_endpoints {
                        // Its own threads answer on the shared endpoint sockets from now on.
                        admin_stop.store(true, Ordering::Release);
                        Ok(Afterwards::Exit)
                    } else {
                        Ok(Afterwards::AwaitSignal)
                    }
                }
                Err(_) => Ok(Afterwards::Exit),
            }
        }
        Err(reason) => {
            // The old process keeps everything: tell it, then close every copy this one holds
            // (workers' listeners on drain, the endpoints and unclaimed sockets here) and
            // leave, letting whatever it accepted meanwhile finish.
            if let Some(channel) = predecessor {
                let abort = upgrade::Message::Abort {
                    reason: reason.clone(),
                };
                if let Err(error) = channel.send_json(&abort, &[]) {
                    tracing::error!(%error, "could not tell the old data plane the takeover is off");
                }
            }
            tracing::error!(%reason, "could not take over; leaving the old data plane in charge");
            drop((endpoints, endpoint_copies));
            inherited.close_unclaimed();
            Err(AppError::TakeoverAborted(reason))
        }
    };
    let await_signal = matches!(outcome, Ok(Afterwards::AwaitSignal));
    // Handed over to a process in another pod: watch it from now on, while draining too, so
    // that it can tell this one to take the node back (see `SuccessorWatch`).
    let mut successor = config
        .upgrade_socket
        .as_deref()
        .filter(|_| await_signal)
        .map(SuccessorWatch::new);
    let signalled = drain(
        &state,
        &senders,
        config.drain_grace,
        &next_event,
        successor.as_mut(),
    );
    // A process whose own pod was stopped meanwhile (both pods deleted, an uninstall) ends
    // as stopped, whatever became of its successor: nothing will restart it.
    let verdict = successor
        .as_ref()
        .and_then(SuccessorWatch::verdict)
        .filter(|_| !signalled);
    let outcome = if let Some(verdict) = verdict {
        Err(verdict)
    } else if await_signal && !signalled {
        // Handed over to a process in another pod: exiting would have this container
        // restarted, and its new process would take the sockets back. Its pod's own SIGTERM
        // ends it; meanwhile its endpoints say it drains.
        tracing::info!("handed over to another pod's data plane: waiting for this pod's SIGTERM");
        await_own_sigterm(&next_event, successor.as_mut()).map(|()| Afterwards::Exit)
    } else {
        outcome
    };
    stop.store(true, Ordering::Release);
    admin_stop.store(true, Ordering::Release);
    for tx in &senders {
        let _ = tx.send(Control::Shutdown);
    }
    for t in threads {
        let _ = t.join();
    }
    let _ = watcher.join();
    logger_stop.store(true, Ordering::Release);
    let _ = logger.join();
    outcome.map(|_| ())
}

/// How long a data plane that handed over to another pod waits once nothing answers on the
/// upgrade socket any more (that pod deleted, by a rollback say) before it exits, so that its
/// container is restarted and serves the node again.
const SUCCESSOR_GONE_AFTER: Duration = Duration::from_secs(10);

/// Waits for a signal, or until the successor says it leaves or has been gone for
/// [`SUCCESSOR_GONE_AFTER`].
fn await_own_sigterm(
    events: &flume::Receiver<Event>,
    mut successor: Option<&mut SuccessorWatch<'_>>,
) -> Result<(), AppError> {
    loop {
        if let Some(verdict) = successor.as_deref_mut().and_then(SuccessorWatch::check) {
            return Err(verdict);
        }
        match events.recv_timeout(Duration::from_secs(1)) {
            Ok(Event::Signal(_)) | Err(flume::RecvTimeoutError::Disconnected) => return Ok(()),
            Ok(Event::HandedOver(_)) | Err(flume::RecvTimeoutError::Timeout) => {}
        }
    }
}

/// How a process that handed over to another pod's keeps asking, once a second, whether that
/// one still serves. Its answer `Leaving` (its pod deleted, a rollback say), or nothing on the
/// upgrade socket for [`SUCCESSOR_GONE_AFTER`], means this process should exit so that its
/// container restarts and takes the node back. Heard while draining, it is kept until the
/// drain ends: the connections this process still carries are not cut for it.
struct SuccessorWatch<'a> {
    path: &'a std::path::Path,
    asked: Option<Instant>,
    gone_since: Option<Instant>,
    verdict: Option<SuccessorVerdict>,
    older: upgrade::OlderSuccessor,
}

#[derive(Clone, Copy)]
enum SuccessorVerdict {
    Leaving,
    Gone,
}

impl From<SuccessorVerdict> for AppError {
    fn from(verdict: SuccessorVerdict) -> AppError {
        match verdict {
            SuccessorVerdict::Leaving => AppError::SuccessorLeaving,
            SuccessorVerdict::Gone => AppError::SuccessorGone(SUCCESSOR_GONE_AFTER),
        }
    }
}

impl<'a> SuccessorWatch<'a> {
    fn new(path: &'a std::path::Path) -> Self {
        SuccessorWatch {
            path,
            asked: None,
            gone_since: None,
            verdict: None,
            older: upgrade::OlderSuccessor::default(),
        }
    }

    /// Asks, at most once a second; the reason to exit, once there is one.
    fn check(&mut self) -> Option<AppError> {
        let asked_lately = self
            .asked
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1));
        if self.verdict.is_none() && !asked_lately {
            self.asked = Some(Instant::now());
            self.ask();
        }
        self.verdict()
    }

    fn ask(&mut self) {
        match crate::ipc::Channel::connect_if_listening(self.path) {
            Err(_) => self.gone_since = None,
            // Connected: it runs, and that is all an older one is asked.
            Ok(Some(_)) if self.older.is_at(self.path) => self.gone_since = None,
            Ok(Some(channel)) => {
                self.gone_since = None;
                match ask_successor(&channel) {
                    Some(upgrade::Message::Leaving) => {
                        tracing::info!("the data plane this one handed over to is leaving");
                        self.verdict = Some(SuccessorVerdict::Leaving);
                    }
                    Some(_) => {}
                    None => {
                        tracing::info!(
                            "the data plane this one handed over to is an older release: it \
                             cannot hand the node back, and is only checked for from now on"
                        );
                        self.older.found_at(self.path);
                    }
                }
            }
            Ok(None) => {
                let since = *self.gone_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= SUCCESSOR_GONE_AFTER {
                    self.verdict = Some(SuccessorVerdict::Gone);
                }
            }
        }
    }

    fn verdict(&self) -> Option<AppError> {
        self.verdict.map(AppError::from)
    }
}

/// Asks the process this one handed over to whether it is leaving: its answer, `Serving` when
/// there is no telling (no answer in time), and `None` from one that closes the connection
/// without a word, as an older release does with a question it does not know.
fn ask_successor(channel: &crate::ipc::Channel) -> Option<upgrade::Message> {
    let _ = channel.set_timeout(Some(Duration::from_secs(1)));
    if channel.send_json(&upgrade::Message::Waiting, &[]).is_err() {
        return Some(upgrade::Message::Serving);
    }
    match channel.recv_json::<upgrade::Message>() {
        Ok(None) => None,
        Ok(Some((upgrade::Message::Leaving, _))) => Some(upgrade::Message::Leaving),
        _ => Some(upgrade::Message::Serving),
    }
}

/// How long a process whose pod is deleted keeps accepting while the predecessor it told to
/// take the node back restarts (its container's restart, then a takeover of some 300 ms).
/// With the default 30 s drain this fits the chart's 45 s termination grace.
const HAND_BACK_WITHIN: Duration = Duration::from_secs(10);

/// After the pod's SIGTERM, with a predecessor told to take the node back: waits for its
/// handover, at most [`HAND_BACK_WITHIN`], or until a second signal. The handover, if any.
fn await_hand_back(events: &flume::Receiver<Event>) -> Option<upgrade::Succeeded> {
    match events.recv_timeout(HAND_BACK_WITHIN) {
        Ok(Event::HandedOver(succeeded)) => {
            tracing::info!("the restarted predecessor took the node back: draining");
            Some(succeeded)
        }
        Ok(Event::Signal(signal)) => {
            tracing::warn!(
                signal,
                "second signal: draining without handing the node back"
            );
            None
        }
        Err(flume::RecvTimeoutError::Timeout) => {
            tracing::warn!(within = ?HAND_BACK_WITHIN,
                "no data plane took the node back: draining, listeners close");
            None
        }
        Err(flume::RecvTimeoutError::Disconnected) => None,
    }
}

/// What a process that served does once it has drained.
enum Afterwards {
    Exit,
    /// Wait for a signal first (see the handover across pods).
    AwaitSignal,
}

/// What wakes the main thread.
enum Event {
    Signal(i32),
    /// A new process took the listening sockets over and serves.
    HandedOver(upgrade::Succeeded),
}

/// The new process's half of an upgrade, once its workers run on the inherited sockets: waits
/// until it is ready. The reason to give up instead: not ready in time, or told to stop.
fn await_ready(
    state: &AdminState,
    events: &flume::Receiver<Event>,
    within: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        match state.readiness() {
            Ok(()) => return Ok(()),
            Err(why) if Instant::now() >= deadline => {
                return Err(format!("not ready within {within:?}: {why}"))
            }
            Err(_) => {}
        }
        // A SIGTERM now (the new pod deleted) must not leave the node without a data plane.
        if let Ok(Event::Signal(signal)) = events.recv_timeout(Duration::from_millis(20)) {
            return Err(format!("signal {signal} before it was ready"));
        }
    }
}

/// The old process's half: answers a handover on the upgrade socket.
struct Upgrades {
    path: PathBuf,
    workers: Vec<flume::Sender<Control>>,
    endpoints: Vec<(&'static str, SocketAddr, std::net::TcpListener)>,
    events: flume::Sender<Event>,
    predecessor: Arc<upgrade::WaitingPredecessor>,
    /// How long a new process may take to get ready (it is told so).
    ready_within: Duration,
}

impl Upgrades {
    fn serve(self) {
        let listener = match upgrade::listen(&self.path) {
            Ok(l) => l,
            Err(error) => {
                tracing::error!(path = %self.path.display(), %error,
                    "cannot listen for upgrades; this process cannot be upgraded without resets");
                return;
            }
        };
        tracing::info!(path = %self.path.display(), "listening for upgrades");
        loop {
            let channel = match listener.accept() {
                Ok(c) => c,
                Err(error) => {
                    tracing::warn!(%error, "upgrade socket accept failed");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            };
            let _ = channel.set_timeout(Some(Duration::from_secs(30)));
            match channel.recv_json::<upgrade::Message>() {
                Ok(Some((upgrade::Message::Handover, _))) => {}
                Ok(Some((upgrade::Message::Waiting, _))) => {
                    let answer = if self.predecessor.asked() {
                        upgrade::Message::Leaving
                    } else {
                        upgrade::Message::Serving
                    };
                    if let Err(error) = channel.send_json(&answer, &[]) {
                        tracing::debug!(%error, "could not answer the waiting predecessor");
                    }
                    continue;
                }
                // An older predecessor, checking that this process runs.
                Ok(None) => continue,
                other => {
                    tracing::warn!(?other, "not a handover request on the upgrade socket");
                    continue;
                }
            }
            let listeners = self.collect();
            tracing::info!(
                sockets = listeners.len(),
                "handing the listening sockets to a new data plane"
            );
            match upgrade::hand_over(&channel, &listeners, &self.endpoints, self.ready_within) {
                Ok(Some(succeeded)) => {
                    let _ = self.events.send(Event::HandedOver(succeeded));
                    return;
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "handover failed; serving on"),
            }
        }
    }

    /// Every worker's listening sockets, duplicated.
    fn collect(&self) -> Vec<HandedListener> {
        let mut all = Vec::new();
        for (i, worker) in self.workers.iter().enumerate() {
            let (reply, answer) = flume::bounded(1);
            if worker.send(Control::Handover(reply)).is_err() {
                continue;
            }
            match answer.recv_timeout(Duration::from_secs(5)) {
                Ok(listeners) => all.extend(listeners),
                Err(_) => tracing::error!(worker = i, "worker did not hand over its listeners"),
            }
        }
        all
    }
}

/// Readiness fails first, then every worker stops accepting and sends GOAWAY on its tunnels;
/// open connections get until `grace` to finish. A signal cuts it short, unless this process
/// handed over to another pod's (`successor`, which it keeps asking meanwhile): then the
/// first one is the pod's own SIGTERM, which comes after such a handover, and only a second
/// one does. Whether a signal came.
fn drain(
    state: &AdminState,
    workers: &[flume::Sender<Control>],
    grace: Duration,
    events: &flume::Receiver<Event>,
    mut successor: Option<&mut SuccessorWatch<'_>>,
) -> bool {
    let mut signalled = successor.is_none();
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
            return signalled;
        }
        if started.elapsed() >= grace {
            tracing::warn!(
                open,
                ?grace,
                "grace period over: closing the remaining connections"
            );
            return signalled;
        }
        if let Some(successor) = successor.as_deref_mut() {
            successor.check();
        }
        if matches!(events.try_recv(), Ok(Event::Signal(_))) {
            if signalled {
                tracing::warn!(open, "second signal: closing the remaining connections now");
                return true;
            }
            tracing::info!(
                open,
                "the pod's SIGTERM: draining goes on until the grace ends"
            );
            signalled = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A successor on a real unix socket that answers one question with `answer`, or closes
    /// the connection without a word when there is none (an older release).
    fn successor(
        path: &std::path::Path,
        answer: Option<upgrade::Message>,
    ) -> std::thread::JoinHandle<()> {
        let listener = upgrade::listen(path).expect("listen");
        std::thread::spawn(move || {
            let channel = listener.accept().expect("accept");
            let asked = channel.recv_json::<upgrade::Message>().expect("question");
            assert!(
                matches!(asked, Some((upgrade::Message::Waiting, _))),
                "{asked:?}"
            );
            if let Some(answer) = answer {
                channel.send_json(&answer, &[]).expect("answer");
            }
        })
    }

    /// An older successor on a real unix socket: it serves two connections, closing each
    /// without a word, and counts the questions it was sent on them.
    fn older_successor(path: &std::path::Path) -> std::thread::JoinHandle<usize> {
        let listener = upgrade::listen(path).expect("listen");
        std::thread::spawn(move || {
            (0..2)
                .filter(|_| {
                    let channel = listener.accept().expect("accept");
                    matches!(channel.recv_json::<upgrade::Message>(), Ok(Some(_)))
                })
                .count()
        })
    }

    #[test]
    fn the_waiting_process_exits_when_its_successor_says_it_leaves() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("dir");
        let path = dir.path().join("upgrade.sock");

        let serving = successor(&path, Some(upgrade::Message::Serving));
        let mut watch = SuccessorWatch::new(&path);
        assert!(watch.check().is_none(), "a serving successor");
        serving.join().expect("successor");

        // An older successor, which closes the connection without a word: asked once, then
        // only connected to (its accept loop sees the connection close, and logs nothing).
        let older = older_successor(&path);
        let mut watch = SuccessorWatch::new(&path);
        assert!(watch.check().is_none(), "an older successor serves");
        watch.asked = None;
        assert!(watch.check().is_none(), "an older successor serves");
        assert_eq!(older.join().expect("successor"), 1, "questions it got");

        let leaving = successor(&path, Some(upgrade::Message::Leaving));
        let mut watch = SuccessorWatch::new(&path);
        assert!(matches!(watch.check(), Some(AppError::SuccessorLeaving)));
        leaving.join().expect("successor");
        // The verdict stays: nothing more is asked.
        assert!(matches!(watch.check(), Some(AppError::SuccessorLeaving)));

        // Nobody listening: gone, but not yet for long enough to give up.
        std::fs::remove_file(&path).expect("remove");
        let mut watch = SuccessorWatch::new(&path);
        assert!(watch.check().is_none());
        assert!(watch.gone_since.is_some());
    }
}
