//! Upgrades without resets, as Envoy's hot restart does it: a new data-plane process takes the
//! listening sockets over from the running one through a unix socket (SCM_RIGHTS), so every
//! pod's 15001/15006/15008 sockets, and the admin ports, stay open across the switch.
//!
//! 1. The new process connects to the old one's `--upgrade-socket` and asks for a handover.
//! 2. The old one sends a duplicate of every listening socket it has (each worker's, per pod,
//!    and the admin, metrics and readiness ones), then `Done`.
//! 3. The new one starts its workers on those same sockets (a listener is the same kernel
//!    object in both processes, so its accept queue is shared: nothing queued is lost), opens
//!    more only where it runs more workers, and once ready says `Ready`. Only then does it
//!    serve the admin endpoints and listen on the upgrade socket itself.
//! 4. The old one stops accepting (closes its copies, which leaves the sockets open in the
//!    new process) and drains: established connections finish on it, then it exits.
//!
//! If the new process cannot become ready it says `Abort`, closes its copies and exits with an
//! error; the old one goes on serving, and answers the next handover.
//!
//! Across pods (a DaemonSet's rolling update with `maxSurge`), the two processes share the
//! pods' namespaces but not their own: the admin endpoints the old one hands over listen in
//! its pod's namespace, where the new pod's probes and scrapes never come. The new process
//! then opens its own, closes the old one's copies and says `ReadyOwnEndpoints`; the old one
//! keeps serving its endpoints while it drains, and waits for its own SIGTERM rather than
//! exit (its container would be restarted and take the sockets back).
//!
//! While it waits, the old process asks the new one every second whether it is leaving
//! (`Waiting`, answered `Serving` or `Leaving`). The new pod may be deleted first (a rollback
//! during the rolling update): the new process then keeps accepting, answers `Leaving`, and
//! the old one exits so that its container restarts. The restarted process takes the sockets
//! back through an ordinary handover, and the new one drains only then, so no connection
//! finds the pods without listeners. The new one waits 10 s for that: an old process still
//! draining long connections finishes that first, and a kubelet backing off the container's
//! restart waits longer, and then the pods' listeners close meanwhile. A successor of an older
//! release, which does not know the question, is asked once and then only connected to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ipc::{Channel, Listener};
use crate::netns::NetNs;

/// Messages of the handover, in order: Handover (new -> old), Socket* and Done (old -> new),
/// Ready or Abort (new -> old). Apart from a handover: Waiting (a drained predecessor -> the
/// process serving), answered Serving or Leaving.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub enum Message {
    Handover,
    /// One listening socket (its descriptor rides along): a pod's, or an admin endpoint's
    /// (`pod` empty, `endpoint` names it).
    Socket {
        pod: String,
        endpoint: String,
        addr: SocketAddr,
    },
    Done {
        sockets: usize,
        /// How long the new process may take to get ready: the old one waits at least that
        /// long for `Ready` or `Abort`. Releases before this field waited
        /// [`UNSTATED_READY_WITHIN`].
        #[serde(default)]
        ready_within_ms: Option<u64>,
    },
    Ready,
    /// Ready, with admin endpoints of its own (it runs in another network namespace, i.e.
    /// another pod): the old process's stay the old process's.
    ReadyOwnEndpoints,
    Abort {
        reason: String,
    },
    /// From a process that handed over across pods and waits for its pod's SIGTERM: is the
    /// process it handed over to still serving?
    Waiting,
    /// Yes.
    Serving,
    /// No: its pod is being deleted. The waiting one should exit, so that its restarted
    /// container takes the node back.
    Leaving,
}

/// A listening socket a worker hands over.
pub struct HandedListener {
    pub pod: String,
    pub addr: SocketAddr,
    pub fd: OwnedFd,
}

/// A listening socket as the old process handed it over.
struct PodSocket {
    fd: OwnedFd,
    /// The (device, inode) of the namespace it listens in; `None` if the kernel would not say.
    netns: Option<(u64, u64)>,
}

/// The old process's sockets for one pod and address, in its workers' order; `None` once
/// taken.
type PositionedSockets = Vec<Option<PodSocket>>;

/// What a new process received: pods' listeners by (pod, address), each with the sockets of
/// the old process's workers, and the admin endpoints by name.
#[derive(Default)]
pub struct Inherited {
    listeners: Mutex<HashMap<(String, SocketAddr), PositionedSockets>>,
    endpoints: Mutex<HashMap<String, PodSocket>>,
    /// Whether an admin endpoint was taken: the old process must then stop serving on it.
    took_endpoints: std::sync::atomic::AtomicBool,
}

impl Inherited {
    /// The inherited sockets of `pod` on `addr` that worker `worker` of `workers` serves:
    /// every `workers`-th one, so that all of them are accepted from whatever the two
    /// processes' worker counts are. Empty when there are none for this worker.
    ///
    /// `netns` is the (device, inode) of the pod's namespace now. A sandbox the runtime
    /// recreated during the upgrade keeps its pod, so the old process's sockets for it listen
    /// in the former namespace: those are closed instead, so that the worker opens new ones
    /// where the pod is (the old process's late listeners there close when it drains).
    pub fn take(
        &self,
        pod: &str,
        addr: SocketAddr,
        worker: usize,
        workers: usize,
        netns: Option<(u64, u64)>,
    ) -> Vec<std::net::TcpListener> {
        let Ok(mut listeners) = self.listeners.lock() else {
            return Vec::new();
        };
        let key = (pod.to_owned(), addr);
        let Some(fds) = listeners.get_mut(&key) else {
            return Vec::new();
        };
        let mut stale = 0;
        // By position in the old process's order; a taken socket leaves a hole.
        let mine: Vec<std::net::TcpListener> = fds
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| i % workers.max(1) == worker)
            .filter_map(|(_, slot)| slot.take())
            .filter(|socket| match (netns, socket.netns) {
                (Some(now), Some(then)) if now != then => {
                    stale += 1;
                    false
                }
                _ => true,
            })
            .map(|socket| std::net::TcpListener::from(socket.fd))
            .collect();
        if fds.iter().all(Option::is_none) {
            listeners.remove(&key);
        }
        if stale > 0 {
            tracing::warn!(pod, %addr, stale,
                "inherited listeners are in the pod's former namespace (its sandbox was recreated during the upgrade): closed them, opening new ones");
        }
        mine
    }

    /// The admin endpoint `name` ("admin", "metrics", "readiness"), if inherited and
    /// listening in this process's network namespace (`here`). One listening in another
    /// namespace (the old process ran in another pod) is closed: this process's probes and
    /// scrapes come to its own namespace.
    pub fn endpoint(&self, name: &str, here: Option<(u64, u64)>) -> Option<std::net::TcpListener> {
        let socket = self.endpoints.lock().ok()?.remove(name)?;
        if let (Some(here), Some(there)) = (here, socket.netns) {
            if here != there {
                tracing::info!(
                    endpoint = name,
                    "the old data plane's endpoint listens in another namespace (another pod): \
                     opening this process's own"
                );
                return None;
            }
        }
        self.took_endpoints
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Some(std::net::TcpListener::from(socket.fd))
    }

    /// What to tell the old process once ready: whether its endpoints are this one's now.
    pub fn ready_message(&self) -> Message {
        if self
            .took_endpoints
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            Message::Ready
        } else {
            Message::ReadyOwnEndpoints
        }
    }

    /// Closes whatever no worker took (pods the new snapshot no longer has); how many.
    pub fn close_unclaimed(&self) -> usize {
        self.listeners
            .lock()
            .map(|mut l| l.drain().map(|(_, fds)| fds.iter().flatten().count()).sum())
            .unwrap_or(0)
    }

    fn insert(&self, pod: String, endpoint: String, addr: SocketAddr, fd: OwnedFd) {
        let netns = match NetNs::of_socket(fd.as_fd()).and_then(|netns| netns.identity()) {
            Ok(identity) => Some(identity),
            Err(error) => {
                tracing::warn!(%pod, %endpoint, %addr, %error,
                    "cannot tell which namespace an inherited socket listens in; using it as is");
                None
            }
        };
        let socket = PodSocket { fd, netns };
        if pod.is_empty() {
            if let Ok(mut e) = self.endpoints.lock() {
                e.insert(endpoint, socket);
            }
            return;
        }
        if let Ok(mut l) = self.listeners.lock() {
            l.entry((pod, addr)).or_default().push(Some(socket));
        }
    }
}

/// How long an old process that does not say waits for the new one to get ready.
pub const UNSTATED_READY_WITHIN: Duration = Duration::from_secs(60);

/// Beyond the ready window, how long the old process waits for the verdict: the new
/// process's `Abort` at the end of the window still arrives in time.
pub const VERDICT_MARGIN: Duration = Duration::from_secs(5);

/// The new process's side of a handover, the sockets received.
pub struct Takeover {
    pub channel: Channel,
    pub inherited: Inherited,
    /// How long the old process waits for the new one to get ready (at least).
    pub old_waits: Duration,
}

impl Takeover {
    /// How long this process may take to get ready, its own window being `own`: no longer
    /// than the old process waits, or both would serve, each believing the other had stopped.
    pub fn ready_within(&self, own: Duration) -> Duration {
        own.min(self.old_waits)
    }
}

/// The new process's side: asks the process listening on `path` for its sockets. `Ok(None)`
/// when nothing listens there (a first start).
pub fn request(path: &Path) -> std::io::Result<Option<Takeover>> {
    let Some(channel) = Channel::connect_if_listening(path)? else {
        return Ok(None);
    };
    channel.set_timeout(Some(Duration::from_secs(30)))?;
    channel.send_json(&Message::Handover, &[])?;
    let inherited = Inherited::default();
    let mut received = 0;
    loop {
        let Some((message, mut fds)) = channel.recv_json::<Message>()? else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the running data plane closed the handover",
            ));
        };
        match message {
            Message::Socket {
                pod,
                endpoint,
                addr,
            } => {
                let fd = fds.pop().ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("socket {addr} of {pod:?} came without its descriptor"),
                    )
                })?;
                inherited.insert(pod, endpoint, addr, fd);
                received += 1;
            }
            Message::Done {
                sockets,
                ready_within_ms,
            } if sockets == received => {
                let old_waits =
                    ready_within_ms.map_or(UNSTATED_READY_WITHIN, Duration::from_millis);
                return Ok(Some(Takeover {
                    channel,
                    inherited,
                    old_waits,
                }));
            }
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unexpected handover message {other:?} after {received} sockets"),
                ))
            }
        }
    }
}

/// The new process serves: the old one stops accepting and drains.
#[derive(Debug, PartialEq, Eq)]
pub struct Succeeded {
    /// The new process answers on the old one's admin endpoints (same namespace), so the old
    /// one must stop answering there; otherwise it keeps its own while it drains.
    pub shares_endpoints: bool,
}

/// The old process's side, on a channel that asked for a handover: sends `listeners` (pods')
/// and `endpoints` (admin), tells the new process to get ready within `ready_within`, then
/// waits for the verdict. `Ok(Some(_))`: the new process serves; stop accepting and drain.
pub fn hand_over(
    channel: &Channel,
    listeners: &[HandedListener],
    endpoints: &[(&str, SocketAddr, std::net::TcpListener)],
    ready_within: Duration,
) -> std::io::Result<Option<Succeeded>> {
    for l in listeners {
        channel.send_json(
            &Message::Socket {
                pod: l.pod.clone(),
                endpoint: String::new(),
                addr: l.addr,
            },
            &[l.fd.as_fd()],
        )?;
    }
    for (name, addr, listener) in endpoints {
        channel.send_json(
            &Message::Socket {
                pod: String::new(),
                endpoint: (*name).to_owned(),
                addr: *addr,
            },
            &[listener.as_fd()],
        )?;
    }
    channel.send_json(
        &Message::Done {
            sockets: listeners.len() + endpoints.len(),
            ready_within_ms: Some(u64::try_from(ready_within.as_millis()).unwrap_or(u64::MAX)),
        },
        &[],
    )?;
    // A new process of an older release does not read the window and may take 60 s; one of
    // this release gives up by `ready_within` and says so, which ends the wait sooner.
    channel.set_timeout(Some(
        ready_within.max(UNSTATED_READY_WITHIN) + VERDICT_MARGIN,
    ))?;
    match channel.recv_json::<Message>()? {
        Some((Message::Ready, _)) => Ok(Some(Succeeded {
            shares_endpoints: true,
        })),
        Some((Message::ReadyOwnEndpoints, _)) => Ok(Some(Succeeded {
            shares_endpoints: false,
        })),
        Some((Message::Abort { reason }, _)) => {
            tracing::warn!(%reason, "the new data plane gave up; serving on");
            Ok(None)
        }
        other => {
            tracing::warn!(?other, "handover ended without a verdict; serving on");
            Ok(None)
        }
    }
}

/// Binds the upgrade socket (replacing a stale file, or the previous process's socket once
/// that process has handed over: a new process calls this only after `Ready`, or an aborted
/// takeover would leave the old one unreachable for the next upgrade).
pub fn listen(path: &Path) -> std::io::Result<Listener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Listener::bind(path)
}

/// A predecessor (in another pod) that handed the node over to this process and waits,
/// drained, to be given it back should this process's pod be deleted first: a rollback during
/// a rolling update. The data plane's predecessor asks on the upgrade socket, the agent's on
/// the CNI socket (`Waiting`); both are answered from here.
pub struct WaitingPredecessor {
    /// When it last asked, or handed over (it asks from then on).
    heard: Mutex<Option<Instant>>,
    /// This process is leaving: the predecessor is told to take the node back.
    leaving: AtomicBool,
}

impl WaitingPredecessor {
    /// How recently a predecessor must have asked to count as waiting. A data plane asks once
    /// a second; an agent twice a second, but may take up to 2 s for a reply.
    pub const HEARD_WITHIN: Duration = Duration::from_secs(3);

    /// A predecessor that handed over at `at` (and asks from then on); none for `None`.
    pub fn heard_at(at: Option<Instant>) -> WaitingPredecessor {
        WaitingPredecessor {
            heard: Mutex::new(at),
            leaving: AtomicBool::new(false),
        }
    }

    /// Notes that the predecessor was just heard from.
    pub fn heard(&self) {
        *self.heard.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Whether a predecessor still waits (it asked within [`Self::HEARD_WITHIN`]).
    pub fn waits(&self) -> bool {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() <= Self::HEARD_WITHIN)
    }

    /// From now on the predecessor is told to take the node back.
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::Release);
    }

    /// Notes its question, and answers whether this process is leaving.
    pub fn asked(&self) -> bool {
        self.heard();
        self.leaving.load(Ordering::Acquire)
    }
}

/// The socket of a successor that does not know `Waiting` (an older release, after a
/// downgrade): it logs every such question as a bad request, so from then on it is only
/// connected to, which tells that it runs, as older releases checked.
#[derive(Default)]
pub struct OlderSuccessor {
    socket: Option<SocketFile>,
}

impl OlderSuccessor {
    /// Whether the socket at `path` is the older successor's.
    pub fn is_at(&self, path: &Path) -> bool {
        self.socket.is_some() && SocketFile::at(path) == self.socket
    }

    /// The successor at `path` did not know the question.
    pub fn found_at(&mut self, path: &Path) {
        self.socket = SocketFile::at(path);
    }
}

/// Which file a unix socket path names: a process that binds the path anew makes another
/// one. Its birth time (statx, where the filesystem records one: ext4, tmpfs and others do) is
/// part of it because a freed inode number may be given out again at once; not the change
/// time, which a chmod of the socket moves. The device is, because the directory may be
/// mounted over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketFile {
    dev: u64,
    ino: u64,
    born: Option<std::time::SystemTime>,
}

impl SocketFile {
    /// The file at `path` now, if there is one.
    pub fn at(path: &Path) -> Option<SocketFile> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| SocketFile {
            dev: m.dev(),
            ino: m.ino(),
            born: m.created().ok(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_file_is_the_same_after_a_chmod_and_another_once_bound_anew() {
        use std::os::unix::fs::PermissionsExt;
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("dir");
        let path = dir.path().join("s.sock");
        assert_eq!(SocketFile::at(&path), None, "no file yet");
        // Held to the end, as a serving process holds its socket: its inode stays taken.
        let first = Listener::bind(&path).expect("bind");
        let bound = SocketFile::at(&path);
        assert!(bound.is_some());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).expect("chmod");
        assert_eq!(
            SocketFile::at(&path),
            bound,
            "a chmod leaves it the same file"
        );
        let _second = Listener::bind(&path).expect("bind anew");
        assert_ne!(
            SocketFile::at(&path),
            bound,
            "bound anew by another process"
        );
        drop(first);
    }

    #[test]
    fn a_predecessor_counts_as_waiting_only_while_it_keeps_asking() {
        let predecessor = WaitingPredecessor::heard_at(None);
        assert!(!predecessor.waits(), "nobody asked yet");
        assert!(
            !predecessor.asked(),
            "answered `Leaving` before this process leaves"
        );
        assert!(predecessor.waits());
        predecessor.leave();
        assert!(predecessor.asked(), "not told to take the node back");
        *predecessor.heard.lock().expect("lock") =
            Instant::now().checked_sub(WaitingPredecessor::HEARD_WITHIN * 2);
        assert!(!predecessor.waits(), "it stopped asking: gone");
        let handed_over = WaitingPredecessor::heard_at(Some(Instant::now()));
        assert!(
            handed_over.waits(),
            "waits from its handover, before its first question"
        );
    }

    fn socket() -> OwnedFd {
        OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
    }

    #[test]
    fn inherited_sockets_are_shared_out_so_every_one_has_a_worker() {
        let addr: SocketAddr = "0.0.0.0:15001".parse().expect("addr");
        // The old process ran three workers.
        let three = Inherited::default();
        for _ in 0..3 {
            three.insert("pod".into(), String::new(), addr, socket());
        }
        // The new one runs two: worker 0 takes the 1st and 3rd, worker 1 the 2nd.
        assert_eq!(three.take("pod", addr, 0, 2, None).len(), 2);
        assert_eq!(three.take("pod", addr, 0, 2, None).len(), 0);
        assert_eq!(three.take("pod", addr, 1, 2, None).len(), 1);
        assert_eq!(three.close_unclaimed(), 0);
        // The old process ran one, the new one two: worker 1 gets none and opens its own.
        let one = Inherited::default();
        one.insert("pod".into(), String::new(), addr, socket());
        one.insert("gone".into(), String::new(), addr, socket());
        assert_eq!(one.take("pod", addr, 1, 2, None).len(), 0);
        assert_eq!(one.take("pod", addr, 0, 2, None).len(), 1);
        assert_eq!(one.close_unclaimed(), 1);
    }

    /// A new, empty network namespace (root only), as a runtime creates for a sandbox.
    fn fresh_netns() -> NetNs {
        std::thread::spawn(|| {
            // SAFETY: unshare(CLONE_NEWNET) moves only this short-lived thread to a new
            // namespace; it touches no memory.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
            NetNs::current().expect("the new namespace")
        })
        .join()
        .expect("namespace thread")
    }

    #[test]
    fn a_pod_s_socket_from_its_former_sandbox_is_not_handed_out() {
        let addr: SocketAddr = "0.0.0.0:15001".parse().expect("addr");
        let home = NetNs::current().expect("home");
        let listen_in = |netns: &NetNs| {
            let listener = netns
                .run_in(&home, || crate::sockets::reuseport_listener(addr))
                .expect("setns")
                .expect("listen");
            OwnedFd::from(listener)
        };
        // The sandbox the pod had when the old process handed over, and the one the runtime
        // created for it since, which the agent has given this process.
        let (former, recreated) = (fresh_netns(), fresh_netns());
        let now = Some(recreated.identity().expect("identity"));
        let inherited = Inherited::default();
        inherited.insert("pod".into(), String::new(), addr, listen_in(&former));
        assert!(
            inherited.take("pod", addr, 0, 1, now).is_empty(),
            "handed out a socket listening in the pod's former namespace"
        );
        assert_eq!(inherited.close_unclaimed(), 0, "closed when set aside");

        // Sockets in the pod's current namespace are handed out, and so are those of a pod
        // whose namespace could not be told.
        inherited.insert("pod".into(), String::new(), addr, listen_in(&recreated));
        inherited.insert("unknown".into(), String::new(), addr, listen_in(&former));
        let taken = inherited.take("pod", addr, 0, 1, now);
        assert_eq!(taken.len(), 1);
        let listens_in = NetNs::of_socket(taken[0].as_fd())
            .and_then(|netns| netns.identity())
            .expect("socket's namespace");
        assert_eq!(listens_in, recreated.identity().expect("identity"));
        assert_eq!(inherited.take("unknown", addr, 0, 1, None).len(), 1);
    }

    /// An old side on a fresh upgrade socket in `dir`: once asked for a handover, `answer`
    /// runs on the channel. The new side's takeover and the old side's thread.
    fn handover<T: Send + 'static>(
        dir: &mesh_snapshot::test_support::ScratchDir,
        answer: impl FnOnce(Channel) -> T + Send + 'static,
    ) -> (Takeover, std::thread::JoinHandle<T>) {
        let path = dir.path().join("upgrade.sock");
        let server = listen(&path).expect("listen");
        let old = std::thread::spawn(move || {
            let channel = server.accept().expect("accept");
            let (asked, _) = channel.recv_json::<Message>().expect("recv").expect("msg");
            assert_eq!(asked, Message::Handover);
            answer(channel)
        });
        let takeover = request(&path).expect("request").expect("someone answered");
        (takeover, old)
    }

    #[test]
    fn a_handover_carries_every_socket_and_the_verdict() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("dir");
        let pod_socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let pod_addr = pod_socket.local_addr().expect("addr");
        let admin = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let admin_addr = admin.local_addr().expect("addr");
        let (takeover, old) = handover(&dir, move |channel| {
            let listeners = [HandedListener {
                pod: "p".into(),
                addr: pod_addr,
                fd: OwnedFd::from(pod_socket.try_clone().expect("dup")),
            }];
            let endpoints = [("admin", admin_addr, admin)];
            hand_over(&channel, &listeners, &endpoints, Duration::from_secs(5)).expect("handover")
        });
        // The old side says how long it waits: a new process that would wait longer keeps to
        // that, one that would wait less to its own.
        assert_eq!(takeover.old_waits, Duration::from_secs(5));
        assert_eq!(
            takeover.ready_within(Duration::from_secs(60)),
            Duration::from_secs(5)
        );
        assert_eq!(
            takeover.ready_within(Duration::from_secs(2)),
            Duration::from_secs(2)
        );
        let Takeover {
            channel, inherited, ..
        } = takeover;
        let mut pods = inherited.take("p", pod_addr, 0, 1, None);
        assert_eq!(pods.len(), 1);
        // The same listening socket: a connection to it is accepted through the new copy.
        let listener = pods.remove(0);
        assert_eq!(listener.local_addr().expect("addr"), pod_addr);
        let _client = std::net::TcpStream::connect(pod_addr).expect("connect");
        listener.set_nonblocking(false).expect("blocking");
        listener
            .accept()
            .expect("accepted through the handed-over socket");
        let here = NetNs::current().and_then(|n| n.identity()).ok();
        let admin = inherited.endpoint("admin", here).expect("admin endpoint");
        assert_eq!(admin.local_addr().expect("addr"), admin_addr);
        assert_eq!(
            verdict(&channel, &inherited, old),
            Some(Succeeded {
                shares_endpoints: true
            })
        );
        // Nobody listening: a first start.
        let path = dir.path().join("upgrade.sock");
        std::fs::remove_file(&path).expect("rm");
        assert!(request(&path).expect("no error").is_none());
    }

    #[test]
    fn the_ready_window_travels_between_releases_that_do_and_do_not_state_it() {
        // Releases before `ready_within_ms` sent and expected `Done` with the count alone.
        #[derive(Debug, Serialize, Deserialize, PartialEq)]
        enum OlderRelease {
            Done { sockets: usize },
        }
        let older = serde_json::to_string(&OlderRelease::Done { sockets: 3 }).expect("encode");
        assert_eq!(
            serde_json::from_str::<Message>(&older).expect("an older release's Done"),
            Message::Done {
                sockets: 3,
                ready_within_ms: None
            }
        );
        let newer = serde_json::to_string(&Message::Done {
            sockets: 3,
            ready_within_ms: Some(10_000),
        })
        .expect("encode");
        assert_eq!(
            serde_json::from_str::<OlderRelease>(&newer)
                .expect("this release's Done, read by an older one"),
            OlderRelease::Done { sockets: 3 }
        );

        // A new process taking over from an older release keeps to what that one waited.
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("dir");
        let (takeover, old) = handover(&dir, |channel| {
            channel
                .send_json(&OlderRelease::Done { sockets: 0 }, &[])
                .expect("an older release's Done");
            channel
        });
        assert_eq!(
            takeover.ready_within(Duration::from_secs(300)),
            UNSTATED_READY_WITHIN
        );
        drop(old.join().expect("old side"));
    }

    /// The new side says it is ready, as `inherited` has it; what the old side made of it.
    fn verdict(
        channel: &Channel,
        inherited: &Inherited,
        old: std::thread::JoinHandle<Option<Succeeded>>,
    ) -> Option<Succeeded> {
        channel
            .send_json(&inherited.ready_message(), &[])
            .expect("ready");
        old.join().expect("old side")
    }

    #[test]
    fn endpoints_from_another_pod_s_namespace_stay_the_old_process_s() {
        let home = NetNs::current().expect("home");
        let here = home.identity().ok();
        // The old process's pod: its admin endpoint listens in a namespace of its own.
        let old_pod = fresh_netns();
        let admin_addr: SocketAddr = "127.0.0.1:15000".parse().expect("addr");
        let admin = old_pod
            .run_in(&home, || std::net::TcpListener::bind(admin_addr))
            .expect("setns")
            .expect("bind in the old pod");
        let inherited = Inherited::default();
        inherited.insert(
            String::new(),
            "admin".into(),
            admin_addr,
            OwnedFd::from(admin),
        );
        assert!(
            inherited.endpoint("admin", here).is_none(),
            "took an endpoint that listens in another pod's namespace"
        );
        assert_eq!(inherited.ready_message(), Message::ReadyOwnEndpoints);

        // The old side hears that its endpoints are still its own.
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("dir");
        let (takeover, old) = handover(&dir, |channel| {
            hand_over(&channel, &[], &[], Duration::from_secs(5)).expect("handover")
        });
        assert_eq!(
            verdict(&takeover.channel, &inherited, old),
            Some(Succeeded {
                shares_endpoints: false
            })
        );
    }
}
