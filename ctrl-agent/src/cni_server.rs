//! The agent's two sockets for CNI enrollment:
//! - the CNI socket, where `mesh-cni` asks whether a pod is captured and reports sandboxes
//!   coming and going (with each pod's network namespace as a descriptor);
//! - the namespace socket, where data planes receive the namespaces of captured pods: all of
//!   them on connect, then each change.
//!
//! Both run on threads of their own and share state with the main loop under one lock.
//!
//! ADD of a captured pod is answered once the data plane listens in the pod (as istio-cni
//! waits for ztunnel's ack): an application that starts right after would otherwise have its
//! first connections redirected to ports no one listens on yet, and refused.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mesh_io::ipc::{Channel, Listener};
use mesh_io::netns::NetNs;
use mesh_io::upgrade::{OlderSuccessor, SocketFile, WaitingPredecessor};
use mesh_snapshot::enrollment::NetnsUpdate;

use crate::agent::{lock, Shared, SharedState};
use crate::cni_api::{PodRef, Reply, Request};
use crate::enroll::{self, Capture, Enrolled};
use crate::kube_source::redirection::{Redirection, RedirectionSender};

/// How the CNI server treats the plugin's requests.
#[derive(Clone, Copy, Debug)]
pub struct CniSettings {
    /// GC leaves alone sandboxes enrolled this recently: the runtime's list of valid
    /// attachments may predate an ADD that was still under way. Well above an ADD's length
    /// (the plugin gives up after 30 s).
    pub gc_grace: Duration,
    /// How long a handed-over agent waits for its successor to bind the CNI socket, or for a
    /// successor that stopped answering there to come back, before it serves the node again.
    pub successor_wait: Duration,
}

impl Default for CniSettings {
    fn default() -> Self {
        CniSettings {
            gc_grace: Duration::from_secs(60),
            successor_wait: Duration::from_secs(30),
        }
    }
}

/// The CNI server, for the agent's shutdown.
pub struct CniServer(Arc<Calls>);

/// How long a stopping agent waits for its predecessor to take the node back.
const HAND_BACK_WITHIN: Duration = Duration::from_secs(3);

impl CniServer {
    /// At this agent's shutdown: if the agent that handed the node over to it still runs (a
    /// rollback deletes the new pod and keeps the old one), hands the node back. Plugins are
    /// answered `moved` from now on; the predecessor, told `Leaving` at its next question,
    /// binds the socket and serves. Waits for it, at most [`HAND_BACK_WITHIN`]. Without this
    /// it would take the node back only after `--cni-successor-wait` without an answer.
    pub fn hand_back(&self) {
        let calls = &self.0;
        if !calls.predecessor.waits() || !calls.owns_path() {
            return;
        }
        lock(&calls.shared).handed_over = true;
        calls.predecessor.leave();
        tracing::info!(
            "stopping while the agent that handed the node over to this one still runs: \
             handing the node back to it, answering plugins `moved` meanwhile"
        );
        let deadline = Instant::now() + HAND_BACK_WITHIN;
        while calls.owns_path() {
            if Instant::now() >= deadline {
                tracing::warn!(waited = ?HAND_BACK_WITHIN,
                    "the previous agent did not take the node back; it will once this one no \
                     longer answers on the CNI socket");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::info!("the previous agent took the node back");
    }
}

/// Starts both servers on their own threads. `handed_over_by_predecessor`: what
/// [`take_over`] returned.
pub fn start(
    shared: SharedState,
    wake: mpsc::Sender<()>,
    cni_socket: &Path,
    netns_socket: &Path,
    settings: CniSettings,
    handed_over_by_predecessor: Option<Instant>,
) -> std::io::Result<CniServer> {
    let calls = Arc::new(Calls {
        shared: shared.clone(),
        wake,
        settings,
        slots: Arc::new(Slots::new(MAX_CNI_CALLS)),
        path: cni_socket.to_owned(),
        bound: Mutex::new(None),
        predecessor: WaitingPredecessor::heard_at(handed_over_by_predecessor),
        handed_over_at: Mutex::new(None),
    });
    calls.bind()?;
    let netns = Listener::bind(netns_socket)?;
    std::thread::Builder::new()
        .name("netns-server".into())
        .spawn(move || loop {
            match netns.accept() {
                Ok(channel) => subscribe(&shared, channel),
                Err(e) => tracing::warn!(error = %e, "namespace socket accept failed"),
            }
        })?;
    Ok(CniServer(calls))
}

/// A socket this agent bound at the CNI socket's path.
struct Bound {
    /// Its file there: another one at the path means another agent took the path.
    file: Option<SocketFile>,
    listener: Arc<Listener>,
}

/// The CNI socket's server: what every call needs.
struct Calls {
    shared: SharedState,
    wake: mpsc::Sender<()>,
    settings: CniSettings,
    slots: Arc<Slots>,
    path: PathBuf,
    /// The socket this agent last bound at `path`.
    bound: Mutex<Option<Bound>>,
    /// The agent that handed the node over to this one, while it asks whether this one is
    /// leaving (`Waiting`); told `Leaving` from this one's shutdown on.
    predecessor: WaitingPredecessor,
    /// When a new agent last asked for the node (`HandOver`).
    handed_over_at: Mutex<Option<Instant>>,
}

impl Calls {
    /// Binds the socket path (replacing whatever is there) and serves it on a thread.
    fn bind(self: &Arc<Self>) -> std::io::Result<()> {
        let listener = Arc::new(Listener::bind(&self.path)?);
        let bound = Bound {
            file: SocketFile::at(&self.path),
            listener: listener.clone(),
        };
        let replaced = self
            .bound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(bound);
        if let Some(replaced) = replaced {
            // Bound before another agent took the path, so nobody can reach it: its accept
            // thread wakes with an error and ends, giving its call slot back.
            if let Err(e) = replaced.listener.shut_down() {
                tracing::warn!(error = %e, "cannot close the CNI socket another agent replaced");
            }
        }
        let calls = self.clone();
        std::thread::Builder::new()
            .name("cni-server".into())
            .spawn(move || calls.accept_on(listener))?;
        Ok(())
    }

    fn accept_on(self: Arc<Self>, listener: Arc<Listener>) {
        loop {
            // At most MAX_CNI_CALLS at once: further plugins wait in the socket's backlog
            // (and, past it, retry), rather than each costing a thread.
            let slot = self.slots.acquire();
            match listener.accept() {
                // A plugin invocation per thread: an ADD waiting for the data plane holds up
                // no other pod.
                Ok(channel) => {
                    let calls = self.clone();
                    let spawned =
                        std::thread::Builder::new()
                            .name("cni-call".into())
                            .spawn(move || {
                                calls.serve(&channel);
                                drop(slot);
                            });
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "cannot start a thread for a CNI call");
                    }
                }
                Err(_) if !self.listens_on(&listener) => {
                    tracing::debug!("the replaced CNI socket's accept thread ends");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "CNI socket accept failed"),
            }
        }
    }

    /// Answers `Waiting`: notes that the predecessor still runs, and tells it whether to
    /// take the node back.
    fn answer_predecessor(&self) -> Reply {
        if self.predecessor.asked() {
            Reply::Leaving
        } else {
            Reply::Serving
        }
    }

    /// Whether `listener` is the socket this agent bound last.
    fn listens_on(&self, listener: &Arc<Listener>) -> bool {
        self.bound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|bound| Arc::ptr_eq(&bound.listener, listener))
    }

    /// Whether the socket path is still the one this agent bound.
    fn owns_path(&self) -> bool {
        let bound = self
            .bound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|bound| bound.file);
        bound.is_some() && SocketFile::at(&self.path) == bound
    }

    /// A new agent asks for the node (`Request::HandOver`): from now on this one changes
    /// nothing the node shares (enrollments and their file, capture rules, annotations, the
    /// host probe sets) and answers plugins `Moved`, which ask again at the path, bound next
    /// by the new agent. The state file is final once this returns: every change was saved
    /// under the lock taken here.
    fn hand_over(self: &Arc<Self>) -> Reply {
        let pods = {
            let mut state = lock(&self.shared);
            state.handed_over = true;
            state.enrollments.len()
        };
        // The successor's wait counts from its last request: one restarted by the kubelet
        // asks again.
        let first = self
            .handed_over_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(Instant::now())
            .is_none();
        tracing::info!(
            pods,
            "a new agent takes the node's CNI enrollments over: answering plugins `moved` \
             until it serves the socket; this agent's data plane keeps what it has"
        );
        if first {
            let calls = self.clone();
            let spawned = std::thread::Builder::new()
                .name("cni-successor".into())
                .spawn(move || calls.watch_successor());
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot watch the new agent; it keeps the node");
            }
        }
        Reply::HandedOver { pods }
    }

    /// After a first handover, for the agent's life: takes the node back if the successor
    /// never binds the socket path within `successor_wait` of the last `HandOver` (it failed
    /// to start), or stops answering there for as long (its pod was deleted: a rollback), so
    /// that a failed upgrade does not leave the node with no agent for CNI; and hands it over
    /// again whenever another agent answers at the path, so that two agents never both
    /// change the node for long.
    fn watch_successor(self: Arc<Self>) {
        let wait = self.settings.successor_wait;
        let mut unanswered_since: Option<Instant> = None;
        let mut older = OlderSuccessor::default();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let handed_over = lock(&self.shared).handed_over;
            if self.owns_path() {
                unanswered_since = None;
                let asked = *self
                    .handed_over_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if handed_over && asked.is_some_and(|at| at.elapsed() >= wait) {
                    tracing::warn!(waited = ?wait,
                        "the new agent never took the CNI socket over: serving the node again");
                    self.resume();
                }
                continue;
            }
            let successor = ask_successor(&self.path, &mut older);
            if successor == Some(Reply::Leaving) {
                unanswered_since = None;
                tracing::info!(
                    "the agent that took the node over is leaving (its pod deleted): taking \
                     the node back"
                );
                match self.bind() {
                    Ok(()) => self.resume(),
                    Err(e) => tracing::error!(error = %e, "cannot bind the CNI socket again"),
                }
                continue;
            }
            if successor.is_some() {
                unanswered_since = None;
                if !handed_over {
                    tracing::warn!(
                        "another agent serves the CNI socket: leaving the node to it again"
                    );
                    lock(&self.shared).handed_over = true;
                }
                continue;
            }
            let since = *unanswered_since.get_or_insert_with(Instant::now);
            if since.elapsed() < wait {
                continue;
            }
            unanswered_since = None;
            // Once more, right before the path is replaced: a successor may have just bound.
            if Channel::connect(&self.path).is_ok() {
                continue;
            }
            tracing::warn!(waited = ?wait,
                "the agent that took the node over no longer answers on the CNI socket: \
                 taking it back");
            match self.bind() {
                Ok(()) => self.resume(),
                Err(e) => tracing::error!(error = %e, "cannot bind the CNI socket again"),
            }
        }
    }

    /// Serves the node again, from the state file as the successor (if it ran) left it, with
    /// the labels as they are now (changes while handed over were not followed).
    fn resume(&self) {
        let mut state = lock(&self.shared);
        for why in state.enrollments.reload() {
            tracing::warn!(%why, "forgetting an enrollment");
        }
        state.handed_over = false;
        reconcile(&mut state);
        finish_change(&mut state);
        let _ = self.wake.send(());
    }
}

/// What the agent at the CNI socket says to `Waiting`; `None` when no one answers there. One
/// that answers nothing still listens: it serves. An older agent refuses the request (and logs
/// it as a bad one): it serves, and is only connected to from then on.
fn ask_successor(path: &Path, older: &mut OlderSuccessor) -> Option<Reply> {
    let channel = Channel::connect(path).ok()?;
    if older.is_at(path) {
        return Some(Reply::Serving);
    }
    let _ = channel.set_timeout(Some(Duration::from_secs(2)));
    let reply = channel
        .send_json(&Request::Waiting, &[])
        .and_then(|()| channel.recv_json::<Reply>());
    match reply {
        Ok(Some((Reply::Leaving, _))) => Some(Reply::Leaving),
        Ok(Some((Reply::Refused { .. }, _))) => {
            tracing::info!(
                "the agent that took the node over is an older release: it cannot hand the \
                 node back, and is only checked for from now on"
            );
            older.found_at(path);
            Some(Reply::Serving)
        }
        _ => Some(Reply::Serving),
    }
}

/// A new agent's first step, before it reads the state file: asks the agent serving
/// `cni_socket` (the previous pod of a rolling update) to hand the node over, so that the two
/// never change enrollments at once. Nothing listening there is a first start; an agent that
/// does not know the request (an older version) is taken over without its word.
///
/// Returns when the running agent handed the node over, if it did: it then waits, and asks
/// this one whether it is leaving (`CniServer::hand_back`).
pub fn take_over(cni_socket: &Path) -> Option<Instant> {
    let channel = match Channel::connect_if_listening(cni_socket) {
        Ok(Some(channel)) => channel,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(error = %e, socket = %cni_socket.display(),
                "cannot reach the CNI socket's current agent; taking it over without its word");
            return None;
        }
    };
    let answer = channel
        .set_timeout(Some(Duration::from_secs(30)))
        .and_then(|()| channel.send_json(&Request::HandOver, &[]))
        .and_then(|()| channel.recv_json::<Reply>());
    match answer {
        Ok(Some((Reply::HandedOver { pods }, _))) => {
            tracing::info!(
                pods,
                "the running agent handed the node's CNI enrollments over"
            );
            Some(Instant::now())
        }
        other => {
            tracing::warn!(answer = ?other,
                "the running agent did not hand the node over (an older version?): taking it \
                 over without its word");
            None
        }
    }
}

/// Plugin invocations served at once. A node starts pods a few at a time (the kubelet and
/// the runtime bound it); this bounds the agent's threads when something calls in a loop.
const MAX_CNI_CALLS: usize = 64;

/// A counting semaphore: `acquire` waits for a free slot; the slot frees when its guard drops
/// (a call's thread ending, however it ends).
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

struct Slot(Arc<Slots>);

impl Slots {
    fn new(count: usize) -> Slots {
        Slots {
            free: Mutex::new(count),
            freed: Condvar::new(),
        }
    }

    fn acquire(self: &Arc<Self>) -> Slot {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        Slot(self.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

impl Calls {
    /// Answers one plugin invocation (a few requests on one connection).
    fn serve(self: &Arc<Self>, channel: &Channel) {
        let (shared, wake, settings) = (&self.shared, &self.wake, self.settings);
        let metrics = lock(shared).metrics.clone();
        let _ = channel.set_timeout(Some(std::time::Duration::from_secs(30)));
        loop {
            let (request, mut fds) = match channel.recv_json::<Request>() {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "bad request on the CNI socket");
                    let _ = channel.send_json(
                        &Reply::Refused {
                            reason: e.to_string(),
                        },
                        &[],
                    );
                    return;
                }
            };
            if request == Request::HandOver {
                let reply = self.hand_over();
                metrics.cni_answered(request.op_index(), &reply);
                let _ = channel.send_json(&reply, &[]);
                return;
            }
            if request == Request::Waiting {
                let reply = self.answer_predecessor();
                metrics.cni_answered(request.op_index(), &reply);
                let _ = channel.send_json(&reply, &[]);
                return;
            }
            let op = request.op_index();
            let (mut reply, serving) = {
                let mut state = lock(shared);
                handle(&mut state, request, fds.pop(), settings)
            };
            if reply == Reply::Done {
                let _ = wake.send(());
            }
            // Outside the lock: the agent publishes the pod meanwhile, and the data plane opens
            // its listeners once it has both the pod and its namespace.
            if let Some(waiting) = serving {
                reply = await_listeners(&waiting.netns, LISTENERS_WAIT);
                // Under the lock, and only if the sandbox is captured still: a label change may
                // have released it during the wait (and asked for the annotation's removal, which
                // must stay the last word).
                let mut state = lock(shared);
                state.awaiting.remove(&waiting.pod.container_id);
                let captured = state
                    .enrollments
                    .get(&waiting.pod.container_id)
                    .is_some_and(|e| e.captured);
                // Nor once the node is handed over: the new agent annotates.
                if reply == Reply::Done && captured && !state.handed_over {
                    mark_redirection(state.redirections.as_ref(), &waiting.pod, true);
                }
            }
            metrics.cni_answered(op, &reply);
            if channel.send_json(&reply, &[]).is_err() {
                return;
            }
        }
    }
}

/// How long ADD of a captured pod waits for the data plane's listeners in it. Far more than
/// a publication and an adoption take (milliseconds); what runs out is a data plane that is
/// not running, and the runtime retries the ADD.
pub const LISTENERS_WAIT: Duration = Duration::from_secs(10);

/// A captured pod whose ADD waits for the data plane's listeners, and is then annotated.
struct Waiting {
    netns: NetNs,
    pod: PodRef,
}

/// Tells the Kubernetes source (if the agent has one) to annotate `pod` as captured or not.
fn mark_redirection(redirections: Option<&RedirectionSender>, pod: &PodRef, enabled: bool) {
    if let Some(redirections) = redirections {
        let _ = redirections.send(Redirection {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            enabled,
        });
    }
}

/// Answers a request; for a newly captured pod, what its ADD waits for before answering.
fn handle(
    state: &mut Shared,
    request: Request,
    netns_fd: Option<std::os::fd::OwnedFd>,
    settings: CniSettings,
) -> (Reply, Option<Waiting>) {
    if state.handed_over {
        tracing::info!(?request, "answered `moved`: the node is handed over");
        let reason = "this agent handed the node over to a new one: ask again".into();
        return (Reply::Moved { reason }, None);
    }
    let node = state.node.clone();
    let reply = match request {
        Request::Decide { namespace, name } => match &state.config {
            None => Reply::NotYet {
                reason: "the agent has no configuration yet".into(),
            },
            Some(config) => match enroll::decide(config, &node, &namespace, &name) {
                Capture::Yes => Reply::Decision {
                    capture: true,
                    reason: "ambient".into(),
                },
                Capture::No(why) => Reply::Decision {
                    capture: false,
                    reason: why.into(),
                },
                Capture::NotYet(reason) => Reply::NotYet { reason },
            },
        },
        Request::Add {
            pod,
            ips,
            netns_path,
            captured,
            network,
        } => {
            let sandbox = Sandbox {
                pod,
                ips,
                netns_path,
                network,
            };
            return add(state, sandbox, captured, netns_fd);
        }
        Request::Remove { pod } => {
            if release(state, &pod.container_id, Rules::Remove, "sandbox removed") {
                finish_change(state);
            }
            Reply::Done
        }
        Request::Collect { network, valid } => {
            let valid: HashSet<&str> = valid.iter().map(String::as_str).collect();
            let stale =
                state
                    .enrollments
                    .stale(&network, &valid, Instant::now(), settings.gc_grace);
            let mut released = false;
            for container_id in stale {
                // Its rules stay: if the runtime's list was wrong and the pod lives on, its
                // traffic is refused rather than let around the mesh. A namespace that is
                // gone takes them along.
                released |= release(
                    state,
                    &container_id,
                    Rules::Keep,
                    "sandbox the runtime no longer lists (CNI GC) released; its capture rules stay",
                );
            }
            if released {
                finish_change(state);
            }
            Reply::Done
        }
        // Answered by `Calls::hand_over` and `Calls::answer_predecessor` before the state is
        // locked.
        Request::HandOver | Request::Waiting => Reply::Refused {
            reason: "not a sandbox request".into(),
        },
        Request::Status { container_id } => match state.enrollments.get(&container_id) {
            Some(e) => Reply::Status {
                known: true,
                captured: e.captured,
                rules: mesh_io::redirect::check(&e.netns).ok(),
            },
            None => Reply::Status {
                known: false,
                captured: false,
                rules: None,
            },
        },
    };
    (reply, None)
}

/// What becomes of a released sandbox's capture rules.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rules {
    Remove,
    Keep,
}

/// Forgets a sandbox: the data planes close its listeners, and its namespace is no longer
/// held open. Whether it was known.
fn release(state: &mut Shared, container_id: &str, rules: Rules, why: &str) -> bool {
    let Some(gone) = state.enrollments.remove(container_id) else {
        return false;
    };
    let pod = &gone.pod;
    tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name),
        container = %container_id, "{why}");
    if gone.captured {
        if rules == Rules::Remove {
            // The namespace may be on its way out with its rules; a failure is only said.
            if let Err(e) = mesh_io::redirect::remove(&gone.netns) {
                tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name),
                    error = %e, "cannot remove the capture rules of a released sandbox");
            }
        }
        if let Some(uid) = uid_of(state, &gone) {
            broadcast(state, &NetnsUpdate::Remove { uid }, None);
        }
    }
    true
}

/// What ADD says about a sandbox.
struct Sandbox {
    pod: PodRef,
    ips: Vec<std::net::IpAddr>,
    netns_path: String,
    network: String,
}

/// Enrolls a sandbox: follows the pod's labels (capture rules installed or removed), records
/// it and hands the data planes the new set. A captured pod comes back for the caller to wait
/// on.
fn add(
    state: &mut Shared,
    sandbox: Sandbox,
    captured: bool,
    netns_fd: Option<std::os::fd::OwnedFd>,
) -> (Reply, Option<Waiting>) {
    let Sandbox {
        pod,
        ips,
        netns_path,
        network,
    } = sandbox;
    let Some(fd) = netns_fd else {
        let reason = "no network namespace descriptor came with the request".into();
        return (Reply::Refused { reason }, None);
    };
    let netns = NetNs::from_fd(fd, netns_path.clone());
    let decision = match &state.config {
        Some(config) => enroll::decide(config, &state.node, &pod.namespace, &pod.name),
        None => Capture::NotYet("the agent has no configuration yet".into()),
    };
    // The labels may have changed since the plugin asked: follow them now.
    let want = match decision {
        Capture::Yes => true,
        Capture::No(_) => false,
        Capture::NotYet(reason) => return (Reply::NotYet { reason }, None),
    };
    if want != captured {
        let result = if want {
            mesh_io::redirect::install(&netns)
        } else {
            mesh_io::redirect::remove(&netns)
        };
        if let Err(e) = result {
            let reason = format!("adjusting capture rules: {e}");
            return (Reply::Refused { reason }, None);
        }
    }
    tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name),
        container = %pod.container_id, captured = want, ?ips, "sandbox enrolled");
    let serving = if want {
        match netns.try_clone() {
            Ok(clone) => {
                // Not annotated until it is served.
                state.awaiting.insert(pod.container_id.clone());
                Some(Waiting {
                    netns: clone,
                    pod: pod.clone(),
                })
            }
            Err(e) => {
                tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), error = %e,
                    "cannot keep the pod's namespace to wait for its listeners");
                None
            }
        }
    } else {
        None
    };
    let previous = state.enrollments.insert(Enrolled {
        pod,
        ips,
        netns_path,
        netns,
        captured: want,
        network,
        enrolled_at: Instant::now(),
    });
    drop(previous);
    finish_change(state);
    (Reply::Done, serving)
}

/// Waits until the data plane listens in `netns` (all of its in-pod ports but SOCKS5, which
/// is opt-in), up to `wait`. What the pod sends before would be refused.
fn await_listeners(netns: &NetNs, wait: Duration) -> Reply {
    let deadline = Instant::now() + wait;
    let home = match NetNs::current() {
        Ok(home) => home,
        Err(e) => {
            let reason = format!("cannot open this thread's own network namespace: {e}");
            return Reply::Refused { reason };
        }
    };
    let wanted = [
        mesh_core::ports::OUTBOUND,
        mesh_core::ports::INBOUND_PLAINTEXT,
        mesh_core::ports::HBONE,
    ];
    loop {
        match netns.run_in(&home, listening_ports) {
            Ok(Ok(ports)) if wanted.iter().all(|p| ports.contains(p)) => return Reply::Done,
            Ok(Ok(_)) => {}
            Ok(Err(e)) | Err(e) => {
                let reason = format!("cannot list the listeners in the pod's namespace: {e}");
                return Reply::Refused { reason };
            }
        }
        if Instant::now() >= deadline {
            return Reply::NotYet {
                reason: format!(
                    "the data plane did not listen in the pod within {}s: is it running and \
                     connected to the agent? (the capture rules are in place)",
                    wait.as_secs()
                ),
            };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The TCP ports something listens on in the calling thread's network namespace: its own
/// view of /proc, both families (tcp6 is absent where IPv6 is off).
fn listening_ports() -> std::io::Result<HashSet<u16>> {
    let mut ports = HashSet::new();
    for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        ports.extend(text.lines().skip(1).filter_map(listening_port));
    }
    Ok(ports)
}

/// The local port of a /proc/net/tcp line in state LISTEN (0A).
fn listening_port(line: &str) -> Option<u16> {
    let mut fields = line.split_whitespace();
    let local = fields.nth(1)?;
    let state = fields.nth(1)?;
    if state != "0A" {
        return None;
    }
    u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
}

/// After an enrollment change: persist, let the node's probe SNAT cover the captured pods,
/// and hand the data planes the current set.
fn finish_change(state: &mut Shared) {
    if let Err(e) = state.enrollments.save() {
        tracing::error!(error = %e, "cannot persist enrollments");
    }
    state.enrollments.sync_host_probes();
    resync_all(state);
    state.dirty = true;
}

fn uid_of(state: &Shared, e: &Enrolled) -> Option<String> {
    let config = state.config.as_ref()?;
    enroll::workload_of(config, &e.pod).map(|w| w.uid.clone())
}

/// Sends one update to every data plane; drops those that went away.
fn broadcast(state: &mut Shared, update: &NetnsUpdate, netns: Option<&NetNs>) {
    let fds: Vec<_> = netns.iter().map(|n| n.fd()).collect();
    state
        .subscribers
        .retain(|s| s.send_json(update, &fds).is_ok());
}

/// The full set of captured pods' namespaces, as a data plane receives it on connect.
fn send_full_set(state: &Shared, channel: &Channel) -> std::io::Result<()> {
    channel.send_json(&NetnsUpdate::Reset, &[])?;
    for e in state.enrollments.iter().filter(|e| e.captured) {
        if let Some(uid) = uid_of(state, e) {
            channel.send_json(&NetnsUpdate::Add { uid }, &[e.netns.fd()])?;
        }
    }
    channel.send_json(&NetnsUpdate::Synced, &[])
}

/// Every data plane gets the full set again (cheap: one message per captured pod on the node).
fn resync_all(state: &mut Shared) {
    let subscribers = std::mem::take(&mut state.subscribers);
    let kept = subscribers
        .into_iter()
        .filter(|s| send_full_set(state, s).is_ok())
        .collect();
    state.subscribers = kept;
}

/// A data plane that takes no message for this long (stopped, frozen) is dropped, rather than
/// holding the shared lock, and every CNI call behind it, in a blocked send. It reconnects
/// when it runs again and gets the full set.
const SUBSCRIBER_SEND_TIMEOUT: Duration = Duration::from_secs(2);

fn subscribe(shared: &SharedState, channel: Channel) {
    if let Err(e) = channel.set_timeout(Some(SUBSCRIBER_SEND_TIMEOUT)) {
        tracing::warn!(error = %e, "cannot bound sends to a data plane; not subscribed");
        return;
    }
    let mut state = lock(shared);
    match send_full_set(&state, &channel) {
        Ok(()) => {
            tracing::info!(
                pods = state.enrollments.iter().filter(|e| e.captured).count(),
                "data plane subscribed to pod namespaces"
            );
            state.subscribers.push(channel);
        }
        Err(e) => tracing::warn!(error = %e, "data plane went away during sync"),
    }
}

/// After a config change: pods whose labels now say otherwise are captured or released in
/// place (rules installed or removed in their namespace), without restarting them.
pub fn reconcile(state: &mut Shared) {
    let Some(config) = state.config.clone() else {
        return;
    };
    if state.handed_over {
        // The new agent follows the labels; this one's data plane only needs the uids.
        resync_all(state);
        return;
    }
    let node = state.node.clone();
    let mut changed = false;
    for e in state.enrollments.iter_mut() {
        let want = match enroll::decide(&config, &node, &e.pod.namespace, &e.pod.name) {
            Capture::Yes => true,
            Capture::No(_) => false,
            // Unknown to the catalog now: keep serving it as it is until CNI removes it.
            Capture::NotYet(_) => continue,
        };
        if want == e.captured {
            continue;
        }
        let result = if want {
            mesh_io::redirect::install(&e.netns)
        } else {
            mesh_io::redirect::remove(&e.netns)
        };
        match result {
            Ok(()) => {
                tracing::info!(pod = %format!("{}/{}", e.pod.namespace, e.pod.name),
                    captured = want, "labels changed: capture updated in place");
                e.captured = want;
                changed = true;
            }
            Err(error) => tracing::error!(pod = %format!("{}/{}", e.pod.namespace, e.pod.name),
                %error, "labels changed but the capture rules could not follow"),
        }
    }
    if changed {
        finish_change(state);
    } else {
        // Uids may have changed with the catalog.
        resync_all(state);
    }
    converge_redirections(state, &config);
}

/// Asks for the redirection annotation of every enrolled pod whose annotation, as the cluster
/// says, differs from its capture (Kubernetes source only): a captured pod gets it, a released
/// one loses it. A pod whose ADD still waits for the data plane is left to that ADD.
fn converge_redirections(state: &Shared, config: &crate::config::FileConfig) {
    if state.redirections.is_none() {
        return;
    }
    for e in state.enrollments.iter() {
        if state.awaiting.contains(&e.pod.container_id) {
            continue;
        }
        let annotated = enroll::workload_of(config, &e.pod).map(|w| w.redirection_annotated);
        if annotated.is_some_and(|annotated| annotated != e.captured) {
            mark_redirection(state.redirections.as_ref(), &e.pod, e.captured);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call waiting for a slot on a thread of its own: the receiver hears once it has one
    /// (and it frees it at once).
    fn waiter(slots: &Arc<Slots>) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel();
        let waiting = slots.clone();
        std::thread::spawn(move || {
            let slot = waiting.acquire();
            let _ = tx.send(());
            drop(slot);
        });
        rx
    }

    /// An agent of an older release at `path`: it refuses what it does not know (as the
    /// bad request it logs) on each of `connections`, and counts the requests it was sent.
    fn older_agent(path: &Path, connections: usize) -> std::thread::JoinHandle<usize> {
        let listener = Listener::bind(path).expect("bind");
        std::thread::spawn(move || {
            (0..connections)
                .filter(|_| {
                    let channel = listener.accept().expect("accept");
                    let asked = matches!(channel.recv_json::<Request>(), Ok(Some(_)));
                    if asked {
                        let refusal = Reply::Refused {
                            reason: "unknown variant `Waiting`".into(),
                        };
                        channel.send_json(&refusal, &[]).expect("refuse");
                    }
                    asked
                })
                .count()
        })
    }

    #[test]
    fn an_older_successor_is_asked_once_and_then_only_checked_for() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("dir");
        let path = dir.path().join("cni.sock");
        let first = older_agent(&path, 3);
        let mut older = OlderSuccessor::default();
        for _ in 0..3 {
            assert_eq!(ask_successor(&path, &mut older), Some(Reply::Serving));
        }
        assert_eq!(first.join().expect("agent"), 1, "requests it was sent");

        // A successor of its own (a new socket) is asked again.
        let newer = older_agent(&path, 1);
        assert_eq!(ask_successor(&path, &mut older), Some(Reply::Serving));
        assert_eq!(newer.join().expect("agent"), 1, "requests it was sent");

        std::fs::remove_file(&path).expect("remove");
        assert_eq!(ask_successor(&path, &mut older), None, "no one listens");
    }

    #[test]
    fn calls_past_the_limit_wait_for_a_slot_and_a_finished_call_frees_one() {
        let slots = Arc::new(Slots::new(2));
        let (first, second) = (slots.acquire(), slots.acquire());
        let rx = waiter(&slots);
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "a third call got a slot while two were taken"
        );
        drop(first);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the freed slot goes to the waiting call");
        // A call whose thread panics frees its slot too.
        let panicking = slots.clone();
        let _ = std::thread::spawn(move || {
            let _slot = panicking.acquire();
            panic!("a call that panics");
        })
        .join();
        assert!(
            waiter(&slots).recv_timeout(Duration::from_secs(5)).is_ok(),
            "the panicked call's slot is free (one of two is held)"
        );
        drop(second);
    }

    #[test]
    fn only_listening_sockets_count_with_their_local_port() {
        // Lines as the kernel writes them: a listener on 0.0.0.0:15001, a connection from
        // port 15006 (ESTABLISHED, 01), and an IPv6 listener on [::]:15008.
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";
        assert_eq!(listening_port(header), None);
        let listener = "   0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0";
        assert_eq!(listening_port(listener), Some(15001));
        let connection = "   1: 0100007F:3A9E 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(listening_port(connection), None);
        let v6 = "   0: 00000000000000000000000000000000:3AA0 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4244 1 0000000000000000 100 0 0 10 0";
        assert_eq!(listening_port(v6), Some(15008));
    }

    #[test]
    fn a_listener_of_this_namespace_is_seen_and_goes_when_closed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        assert!(listening_ports().expect("ports").contains(&port));
        drop(listener);
        assert!(!listening_ports().expect("ports").contains(&port));
    }
}
