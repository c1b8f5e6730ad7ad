//! Following the agent's namespace channel: the network namespaces of pods enrolled through
//! CNI arrive as descriptors, by uid, into a registry the workers consult when they open a
//! pod's listeners. If the agent goes away the registry stays as it is (pods keep being
//! served) and the thread reconnects; each reconnection brings the full set again.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_snapshot::enrollment::NetnsUpdate;

use crate::ipc::Channel;
use crate::netns::NetNs;
use crate::worker::Control;

/// Pods' namespaces by uid. Locked only when a worker opens a pod's listeners and when the
/// agent sends a change, never per connection.
#[derive(Default)]
pub struct NetnsRegistry {
    pods: Mutex<HashMap<String, Arc<NetNs>>>,
}

impl NetnsRegistry {
    pub fn get(&self, uid: &str) -> Option<Arc<NetNs>> {
        self.pods
            .lock()
            .ok()
            .and_then(|pods| pods.get(uid).cloned())
    }

    pub fn len(&self) -> usize {
        self.pods.lock().map(|p| p.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn apply(&self, f: impl FnOnce(&mut HashMap<String, Arc<NetNs>>)) {
        if let Ok(mut pods) = self.pods.lock() {
            f(&mut pods);
        }
    }
}

/// Runs until `stop`: connects to the agent's namespace socket and keeps `registry` in step.
pub fn follow(
    socket: PathBuf,
    registry: Arc<NetnsRegistry>,
    workers: Vec<flume::Sender<Control>>,
    stop: Arc<AtomicBool>,
) {
    let mut reported = false;
    while !stop.load(Ordering::Acquire) {
        let channel = match Channel::connect(&socket) {
            Ok(c) => c,
            Err(error) => {
                if !reported {
                    tracing::warn!(socket = %socket.display(), %error,
                        "ctrl-agent's namespace socket is not reachable; retrying");
                    reported = true;
                }
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
        };
        reported = false;
        tracing::info!(socket = %socket.display(), "following pod namespaces from ctrl-agent");
        let mut incoming: Option<HashSet<String>> = None;
        loop {
            let (update, mut fds) = match channel.recv_json::<NetnsUpdate>() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(%error, "bad message on the namespace channel");
                    break;
                }
            };
            match update {
                NetnsUpdate::Reset => incoming = Some(HashSet::new()),
                NetnsUpdate::Add { uid } => match fds.pop() {
                    Some(fd) => {
                        if let Some(set) = incoming.as_mut() {
                            set.insert(uid.clone());
                        }
                        let netns =
                            Arc::new(NetNs::from_fd(fd, format!("pod {uid} (from ctrl-agent)")));
                        registry.apply(|pods| {
                            pods.insert(uid, netns);
                        });
                        if incoming.is_none() {
                            notify(&workers);
                        }
                    }
                    None => tracing::warn!(%uid, "namespace update without a descriptor"),
                },
                NetnsUpdate::Remove { uid } => {
                    registry.apply(|pods| {
                        pods.remove(&uid);
                    });
                }
                NetnsUpdate::Synced => {
                    if let Some(set) = incoming.take() {
                        registry.apply(|pods| pods.retain(|uid, _| set.contains(uid)));
                    }
                    tracing::debug!(pods = registry.len(), "pod namespaces in sync");
                    notify(&workers);
                }
            }
        }
        tracing::warn!("ctrl-agent's namespace channel closed; serving the pods we have");
    }
}

/// Workers retry pods whose listeners could not open (their namespace may have just arrived).
fn notify(workers: &[flume::Sender<Control>]) {
    for w in workers {
        let _ = w.send(Control::Reconcile);
    }
}
