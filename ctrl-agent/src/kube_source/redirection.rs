//! Istio's `ambient.istio.io/redirection: enabled` annotation on the pods this node captures,
//! set as istio-cni sets it: once the data plane serves the pod, and removed when the pod is
//! released in place. Istio's control plane reads it to decide that a pod takes HBONE: a
//! waypoint (or another node's ztunnel fed by istiod) sends to an annotated pod over HBONE,
//! and to any other in plain TCP, which a captured pod's STRICT mode or waypoint-only policy
//! would then refuse.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio::sync::mpsc;

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

/// A failed patch is tried this many times in all, the pause doubling from half a second.
const ATTEMPTS: u32 = 5;

/// Patches each pod as its changes arrive, in order (a pod captured then released ends
/// without the annotation). A pod that is gone needs none; an API server that keeps failing
/// is logged and the change dropped, to be made again at the pod's next capture.
pub async fn annotate(client: Client, mut changes: RedirectionReceiver) {
    while let Some(change) = changes.recv().await {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &change.namespace);
        let value = if change.enabled {
            json!("enabled")
        } else {
            Value::Null
        };
        // A JSON merge patch: null removes the key.
        let patch = json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}});
        let pod = format!("{}/{}", change.namespace, change.name);
        let mut pause = Duration::from_millis(500);
        for attempt in 1..=ATTEMPTS {
            match pods
                .patch(&change.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    tracing::debug!(%pod, enabled = change.enabled, "redirection annotation set");
                    break;
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    tracing::debug!(%pod, "pod gone before its redirection annotation was set");
                    break;
                }
                Err(error) if attempt == ATTEMPTS => {
                    tracing::warn!(%pod, enabled = change.enabled, %error,
                        "cannot set the pod's {REDIRECTION_ANNOTATION} annotation; Istio's \
                         waypoints may send it plain TCP until it is captured again");
                }
                Err(error) => {
                    tracing::debug!(%pod, %error, "redirection annotation failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
    }
}
