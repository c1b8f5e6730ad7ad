//! Telling an uninstall from a restart when the agent stops. A restart (a rolling update, a
//! crash, a node agent upgrade) must leave the node as it is: the captured pods stay captured
//! and served by the data plane, so their kubelet probes must keep bypassing the mesh. An
//! uninstall takes the node's rules away. Kubernetes sends the same SIGTERM for both; as
//! Istio's node agent does (istio/istio#54180), the agent looks at the DaemonSet that runs its
//! pod: deleted or being deleted means an uninstall, still there means a new pod will follow,
//! unless the DaemonSet no longer places pods on this node (its node selector or required node
//! affinity changed: istio/istio#58768), which is an uninstall from this node.

use std::time::Duration;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Pod, PodSpec};
use kube::api::Api;

/// What became of the DaemonSet running this agent's pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Departure {
    /// The DaemonSet is gone, being deleted, or no longer places pods on this node: nothing
    /// will replace this agent.
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
    let daemon_set = Api::<DaemonSet>::namespaced(client.clone(), namespace)
        .get_opt(&owner.name)
        .await?;
    // One of the same name that is not being deleted (a reinstall, even) has a successor
    // of ours on this node, which the rules serve, if it still places pods here.
    let Some(ds) = daemon_set.filter(|ds| ds.metadata.deletion_timestamp.is_none()) else {
        return Ok(Departure::Uninstall);
    };
    let node_name = pod.spec.and_then(|spec| spec.node_name).unwrap_or_default();
    let node = Api::<Node>::all(client).get_opt(&node_name).await?;
    let template = ds.spec.template.spec;
    Ok(match (node, template) {
        (Some(node), Some(template)) if places_on(&template, &node) => Departure::Restart,
        (Some(_), None) => Departure::Restart,
        _ => Departure::Uninstall,
    })
}

/// Whether a DaemonSet's pod `template` places a pod on `node`, by its `nodeSelector` and its
/// required node affinity as the scheduler reads them (terms ORed, each term's requirements
/// ANDed; `matchFields` on `metadata.name`). Taints are not weighed: a pod evicted by a new
/// taint is replaced once it is tolerated or lifted, so it is taken as a restart.
fn places_on(template: &PodSpec, node: &Node) -> bool {
    let no_labels = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&no_labels);
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let selected = template
        .node_selector
        .iter()
        .flatten()
        .all(|(key, value)| labels.get(key) == Some(value));
    let required = template
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    let affine = required.is_none_or(|required| {
        required.node_selector_terms.iter().any(|term| {
            let expressions = term.match_expressions.as_deref().unwrap_or_default();
            let fields = term.match_fields.as_deref().unwrap_or_default();
            // An empty term selects no node.
            (!expressions.is_empty() || !fields.is_empty())
                && expressions
                    .iter()
                    .all(|r| requirement_holds(r, labels.get(&r.key).map(String::as_str)))
                && fields
                    .iter()
                    .all(|r| r.key == "metadata.name" && requirement_holds(r, Some(name)))
        })
    });
    selected && affine
}

/// One `NodeSelectorRequirement` against the node's value for its key (`None`: absent).
fn requirement_holds(requirement: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = requirement.values.as_deref().unwrap_or_default();
    let listed = |v: &str| values.iter().any(|x| x == v);
    // Gt and Lt compare integers, against their single value.
    let compare = |wanted: std::cmp::Ordering| {
        let parse = |v: &str| v.parse::<i64>().ok();
        match (value.and_then(parse), values.first().and_then(|v| parse(v))) {
            (Some(have), Some(bound)) if values.len() == 1 => have.cmp(&bound) == wanted,
            _ => false,
        }
    };
    match requirement.operator.as_str() {
        "In" => value.is_some_and(listed),
        "NotIn" => !value.is_some_and(listed),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => compare(std::cmp::Ordering::Greater),
        "Lt" => compare(std::cmp::Ordering::Less),
        _ => false,
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn node(name: &str, labels: Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).expect("node")
    }

    fn template(spec: Value) -> PodSpec {
        let mut spec = spec;
        spec["containers"] = json!([{"name": "ctrl-agent"}]);
        serde_json::from_value(spec).expect("pod spec")
    }

    fn required(terms: Value) -> Value {
        json!({"affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}})
    }

    #[test]
    fn a_daemon_set_places_pods_by_node_selector_and_required_affinity() {
        let n = node(
            "node-1",
            json!({"kubernetes.io/os": "linux", "pool": "mesh", "cores": "16"}),
        );
        let cases = [
            (json!({}), true),
            (json!({"nodeSelector": {"kubernetes.io/os": "linux"}}), true),
            (json!({"nodeSelector": {"pool": "edge"}}), false),
            (
                required(json!([{"matchExpressions": [
                    {"key": "pool", "operator": "In", "values": ["mesh", "edge"]}]}])),
                true,
            ),
            (
                required(json!([{"matchExpressions": [
                    {"key": "pool", "operator": "NotIn", "values": ["mesh"]}]}])),
                false,
            ),
            // Terms are ORed, requirements within one ANDed.
            (
                required(json!([
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["edge"]}]},
                    {"matchExpressions": [
                        {"key": "cores", "operator": "Gt", "values": ["8"]},
                        {"key": "gpu", "operator": "DoesNotExist"}]},
                ])),
                true,
            ),
            (
                required(json!([{"matchExpressions": [
                    {"key": "cores", "operator": "Lt", "values": ["8"]}]}])),
                false,
            ),
            (
                required(json!([{"matchExpressions": [
                    {"key": "cores", "operator": "Gt", "values": ["many"]}]}])),
                false,
            ),
            (
                required(json!([{"matchFields": [
                    {"key": "metadata.name", "operator": "NotIn", "values": ["node-1"]}]}])),
                false,
            ),
            (
                required(json!([{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": ["node-1"]}]}])),
                true,
            ),
            (required(json!([{}])), false),
            (required(json!([])), false),
        ];
        for (spec, places) in cases {
            assert_eq!(places_on(&template(spec.clone()), &n), places, "{spec}");
        }
    }
}
