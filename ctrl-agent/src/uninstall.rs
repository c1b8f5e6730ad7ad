//! Telling an uninstall from a restart when the agent stops. A restart (a rolling update, a
//! crash, a node agent upgrade) must leave the node as it is: the captured pods stay captured
//! and served by the data plane, so their kubelet probes must keep bypassing the mesh. An
//! uninstall takes the node's rules away. Kubernetes sends the same SIGTERM for both; as
//! Istio's node agent does (istio/istio#54180), the agent looks at the DaemonSet that runs its
//! pod: deleted or being deleted means an uninstall, still there means a new pod will follow.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;

/// What became of the DaemonSet running this agent's pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Departure {
    /// The DaemonSet is gone or being deleted: nothing will replace this agent.
    Uninstall,
    /// The DaemonSet stays (a restart or an upgrade), or the pod was not started by one (run
    /// by hand): what this agent set up is for its successor.
    Restart,
}

/// Reads `namespace/pod` and its controlling DaemonSet. A pod that no longer exists, or that
/// no DaemonSet controls (run by hand), is taken as a restart. An error is for the caller to
/// weigh.
pub async fn departure(
    client: kube::Client,
    namespace: &str,
    pod: &str,
) -> Result<Departure, kube::Error> {
    let Some(pod) = Api::<Pod>::namespaced(client.clone(), namespace)
        .get_opt(pod)
        .await?
    else {
        return Ok(Departure::Restart);
    };
    let owner = pod
        .metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .find(|owner| owner.kind == "DaemonSet" && owner.controller == Some(true));
    let Some(owner) = owner else {
        return Ok(Departure::Restart);
    };
    let daemon_set = Api::<DaemonSet>::namespaced(client, namespace)
        .get_opt(&owner.name)
        .await?;
    // One of the same name that is not being deleted (a reinstall, even) has a successor
    // of ours on this node, which the rules serve.
    Ok(match daemon_set {
        Some(ds) if ds.metadata.deletion_timestamp.is_none() => Departure::Restart,
        _ => Departure::Uninstall,
    })
}

/// How long a shutdown waits for [`ask`]: a pod's grace period is short (30 s by default),
/// and the API may be the very thing that is down.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// [`departure`] from a thread with no runtime (at shutdown), with the client configured as
/// kube infers it (kubeconfig, else the pod's service account), given up after
/// [`ASK_TIMEOUT`].
pub fn ask(namespace: &str, pod: &str) -> Result<Departure, String> {
    let timeout = ASK_TIMEOUT;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    // The client is made inside the runtime: it spawns onto it.
    let asked = async {
        let config = kube::Config::infer()
            .await
            .map_err(|e| format!("Kubernetes client configuration: {e}"))?;
        let client = kube::Client::try_from(config).map_err(|e| format!("client: {e}"))?;
        departure(client, namespace, pod)
            .await
            .map_err(|e| format!("reading pod {namespace}/{pod} and its DaemonSet: {e}"))
    };
    runtime.block_on(async {
        tokio::time::timeout(timeout, asked)
            .await
            .unwrap_or_else(|_| Err(format!("no answer from the API within {timeout:?}")))
    })
}
