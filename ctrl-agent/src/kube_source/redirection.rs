//! Istio's `ambient.istio.io/redirection: enabled` annotation on the pods this node captures,
//! set as istio-cni sets it: once the data plane serves the pod, and removed when the pod is
//! released. The agent compares each enrolled pod's annotation, as watched, with its capture
//! at every change of the cluster and asks again where they differ (a patch that was lost, an
//! annotation someone removed, a pod released while the API server was down), as istio-cni's
//! pod reconciler does. Istio's control plane reads it to decide that a pod takes HBONE: a waypoint (or
//! another node's ztunnel fed by istiod) sends to an annotated pod over HBONE, and to any other
//! in plain TCP, which a captured pod's STRICT mode or waypoint-only policy would then refuse.
//!
//! Written through the pods' `status` subresource, as istio-cni does: the agent needs `patch`
//! on `pods/status` only, which cannot change what a pod runs.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";

/// One pod's annotation to set (`enabled`) or remove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirection {
    pub namespace: String,
    pub name: String,
    pub enabled: bool,
}

/// Where the CNI server sends pods' redirection changes (never blocks: the channel is
/// unbounded, and its consumer is one task on the Kubernetes source's runtime).
pub type RedirectionSender = mpsc::UnboundedSender<Redirection>;
pub type RedirectionReceiver = mpsc::UnboundedReceiver<Redirection>;

/// A patch the API server has not answered in this long counts as failed: a half-open
/// connection must not hold up every other pod's annotation.
const PATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failure a pod is tried again after this pause, doubling up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const MAX_PAUSE: Duration = Duration::from_secs(30);
/// Failures in a row after which a pod's annotation is reported as a warning (once).
const WARN_AFTER: u32 = 3;

/// What waiting on the channel gave.
enum Received {
    Change(Redirection),
    /// The agent dropped its sender.
    Closed,
    /// A retry fell due first.
    Nothing,
}

impl From<Option<Redirection>> for Received {
    fn from(received: Option<Redirection>) -> Received {
        received.map_or(Received::Closed, Received::Change)
    }
}

/// A pod whose annotation is not yet as wanted.
struct Pending {
    enabled: bool,
    due: Instant,
    pause: Duration,
    failures: u32,
}

/// Converges each pod's annotation on the value last asked for (a pod captured then released
/// ends without it): patches are retried with backoff for as long as the API server fails,
/// and a pod that is gone needs none. Returns when the agent drops its sender.
pub async fn annotate(client: Client, mut changes: RedirectionReceiver) {
    let mut pending: BTreeMap<(String, String), Pending> = BTreeMap::new();
    let mut open = true;
    while open || !pending.is_empty() {
        let next_due = pending.values().map(|p| p.due).min();
        // Wait for a change, or for the next retry to fall due.
        let mut arrived = match (open, next_due) {
            (true, None) => Received::from(changes.recv().await),
            (true, Some(due)) => match tokio::time::timeout_at(due, changes.recv()).await {
                Ok(received) => Received::from(received),
                Err(_) => Received::Nothing,
            },
            (false, Some(due)) => {
                tokio::time::sleep_until(due).await;
                Received::Nothing
            }
            (false, None) => break,
        };
        // Then everything asked for meanwhile: the latest word on each pod wins.
        loop {
            match arrived {
                Received::Change(change) => {
                    let key = (change.namespace, change.name);
                    // Asked again for what is being retried: its backoff stands.
                    if pending
                        .get(&key)
                        .is_none_or(|p| p.enabled != change.enabled)
                    {
                        let fresh = Pending {
                            enabled: change.enabled,
                            due: Instant::now(),
                            pause: FIRST_PAUSE,
                            failures: 0,
                        };
                        pending.insert(key, fresh);
                    }
                }
                Received::Closed => {
                    open = false;
                    break;
                }
                Received::Nothing => {}
            }
            arrived = match changes.try_recv() {
                Ok(change) => Received::Change(change),
                Err(mpsc::error::TryRecvError::Disconnected) => Received::Closed,
                Err(mpsc::error::TryRecvError::Empty) => break,
            };
        }
        let now = Instant::now();
        let due: Vec<(String, String)> = pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            let Some(wanted) = pending.get_mut(&key) else {
                continue;
            };
            match patch(&client, &key.0, &key.1, wanted.enabled).await {
                Ok(()) => {
                    if wanted.failures >= WARN_AFTER {
                        tracing::info!(pod = %format!("{}/{}", key.0, key.1),
                            enabled = wanted.enabled, "redirection annotation set at last");
                    }
                    pending.remove(&key);
                }
                Err(error) => {
                    wanted.failures += 1;
                    if wanted.failures == WARN_AFTER {
                        tracing::warn!(pod = %format!("{}/{}", key.0, key.1),
                            enabled = wanted.enabled, %error,
                            "cannot set the pod's {REDIRECTION_ANNOTATION} annotation; \
                             retrying (meanwhile Istio's waypoints may send it plain TCP)");
                    } else {
                        tracing::debug!(pod = %format!("{}/{}", key.0, key.1), %error,
                            "redirection annotation failed; retrying");
                    }
                    wanted.due = Instant::now() + wanted.pause;
                    wanted.pause = (wanted.pause * 2).min(MAX_PAUSE);
                }
            }
        }
    }
}

/// One merge patch of the pod's status subresource: `null` removes the key. A pod that is
/// gone counts as done.
async fn patch(client: &Client, namespace: &str, name: &str, enabled: bool) -> Result<(), String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let value = if enabled {
        json!("enabled")
    } else {
        Value::Null
    };
    let body = json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}});
    let (params, patch) = (PatchParams::default(), Patch::Merge(&body));
    match tokio::time::timeout(PATCH_TIMEOUT, pods.patch_status(name, &params, &patch)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(kube::Error::Api(status))) if status.code == 404 => {
            tracing::debug!(pod = %format!("{namespace}/{name}"),
                "pod gone before its redirection annotation was set");
            Ok(())
        }
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer in {}s", PATCH_TIMEOUT.as_secs())),
    }
}
