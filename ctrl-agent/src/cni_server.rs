//! The agent's two sockets for CNI enrollment:
//! - the CNI socket, where `mesh-cni` asks whether a pod is captured and reports sandboxes
//!   coming and going (with each pod's network namespace as a descriptor);
//! - the namespace socket, where data planes receive the namespaces of captured pods: all of
//!   them on connect, then each change.
//!
//! Both run on threads of their own and share state with the main loop under one lock.

use std::path::Path;
use std::sync::mpsc;

use mesh_io::ipc::{Channel, Listener};
use mesh_io::netns::NetNs;
use mesh_snapshot::enrollment::NetnsUpdate;

use crate::agent::{lock, Shared, SharedState};
use crate::cni_api::{Reply, Request};
use crate::enroll::{self, Capture, Enrolled};

/// Starts both servers on their own threads.
pub fn start(
    shared: SharedState,
    wake: mpsc::Sender<()>,
    cni_socket: &Path,
    netns_socket: &Path,
) -> std::io::Result<()> {
    let cni = Listener::bind(cni_socket)?;
    let netns = Listener::bind(netns_socket)?;
    let cni_shared = shared.clone();
    std::thread::Builder::new()
        .name("cni-server".into())
        .spawn(move || loop {
            match cni.accept() {
                Ok(channel) => serve_cni(&cni_shared, &wake, &channel),
                Err(e) => tracing::warn!(error = %e, "CNI socket accept failed"),
            }
        })?;
    std::thread::Builder::new()
        .name("netns-server".into())
        .spawn(move || loop {
            match netns.accept() {
                Ok(channel) => subscribe(&shared, channel),
                Err(e) => tracing::warn!(error = %e, "namespace socket accept failed"),
            }
        })?;
    Ok(())
}

/// Answers one plugin invocation (a few requests on one connection).
fn serve_cni(shared: &SharedState, wake: &mpsc::Sender<()>, channel: &Channel) {
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
        let reply = {
            let mut state = lock(shared);
            handle(&mut state, request, fds.pop())
        };
        if reply == Reply::Done {
            let _ = wake.send(());
        }
        if channel.send_json(&reply, &[]).is_err() {
            return;
        }
    }
}

fn handle(state: &mut Shared, request: Request, netns_fd: Option<std::os::fd::OwnedFd>) -> Reply {
    let node = state.node.clone();
    match request {
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
        } => {
            let Some(fd) = netns_fd else {
                return Reply::Refused {
                    reason: "no network namespace descriptor came with the request".into(),
                };
            };
            let netns = NetNs::from_fd(fd, netns_path.clone());
            let decision = match &state.config {
                Some(config) => enroll::decide(config, &node, &pod.namespace, &pod.name),
                None => Capture::NotYet("the agent has no configuration yet".into()),
            };
            // The labels may have changed since the plugin asked: follow them now.
            let want = match decision {
                Capture::Yes => true,
                Capture::No(_) => false,
                Capture::NotYet(reason) => return Reply::NotYet { reason },
            };
            if want != captured {
                let result = if want {
                    mesh_io::redirect::install(&netns)
                } else {
                    mesh_io::redirect::remove(&netns)
                };
                if let Err(e) = result {
                    return Reply::Refused {
                        reason: format!("adjusting capture rules: {e}"),
                    };
                }
            }
            tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name),
                container = %pod.container_id, captured = want, ?ips, "sandbox enrolled");
            let previous = state.enrollments.insert(Enrolled {
                pod,
                ips,
                netns_path,
                netns,
                captured: want,
            });
            drop(previous);
            finish_change(state);
            Reply::Done
        }
        Request::Remove { pod } => {
            if let Some(gone) = state.enrollments.remove(&pod.container_id) {
                tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name),
                    container = %pod.container_id, "sandbox removed");
                // The namespace may be on its way out with its rules; a failure is only said.
                if gone.captured {
                    if let Err(e) = mesh_io::redirect::remove(&gone.netns) {
                        tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name),
                            error = %e, "cannot remove the capture rules of a removed sandbox");
                    }
                }
                if gone.captured {
                    if let Some(uid) = uid_of(state, &gone) {
                        broadcast(state, &NetnsUpdate::Remove { uid }, None);
                    }
                }
                finish_change(state);
            }
            Reply::Done
        }
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
    }
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

fn subscribe(shared: &SharedState, channel: Channel) {
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
}
