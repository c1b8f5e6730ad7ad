//! Telling an uninstall from a restart when the agent stops. A restart (a rolling update, a
//! crash, a node agent upgrade) must leave the node as it is: the captured pods stay captured
//! and served by the data plane, so their kubelet probes must keep bypassing the mesh. An
//! uninstall takes the node's rules away. Kubernetes sends the same SIGTERM for both; as
//! Istio's node agent does (istio/istio#54180), the agent looks at the DaemonSet that runs its
//! pod: deleted or being deleted means an uninstall, still there means a new pod will follow,
//! unless the DaemonSet no longer places pods on this node (its node selector or required node
//! affinity changed: istio/istio#58768), or no longer keeps these rules (an upgrade turned the
//! feature off), which is an uninstall of them from this node.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Pod, PodSpec};
use kube::api::Api;

/// The DaemonSet annotation listing the node rules its pods keep up (comma-separated
/// [`NodeRules`] names), as the chart renders it from its values. A restart leaves only the
/// rules its DaemonSet still lists: an upgrade that turns a feature off (`cni.enabled=false`,
/// say) is, for that feature's rules, an uninstall.
pub const NODE_RULES_ANNOTATION: &str = "mesh-dataplane.dev/node-rules";

/// Node-level state a process of the DaemonSet sets up and, on an uninstall, takes away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeRules {
    /// mesh-cni chained into the node's CNI configuration (the installer).
    CniChain,
    /// The host probe SNAT table `inet mesh-host-probes` (the agent).
    HostProbeTable,
}

impl NodeRules {
    pub fn name(self) -> &'static str {
        match self {
            NodeRules::CniChain => "cni-chain",
            NodeRules::HostProbeTable => "host-probe-table",
        }
    }
}

/// What becomes of this process's node rules when it stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Departure {
    /// Nothing of the DaemonSet will keep them up on this node: it is gone or being deleted,
    /// no longer places pods here, no longer lists them, or the pod is no DaemonSet's (any
    /// more). Take them away.
    Uninstall,
    /// The DaemonSet stays, places pods here and lists them: a restart or an upgrade, whose
    /// next pod takes them over. Leave them.
    Restart,
}

/// Reads `namespace/pod`, its controlling DaemonSet and its node. Only a DaemonSet the API
/// shows alive, placing pods on this node and listing `rules` in [`NODE_RULES_ANNOTATION`]
/// makes a restart; a pod that is gone (force-deleted) or that no DaemonSet controls
/// (orphaned, or run by hand) makes an uninstall. An error is for the caller to weigh.
pub async fn departure(
    client: kube::Client,
    namespace: &str,
    pod: &str,
    rules: NodeRules,
) -> Result<Departure, kube::Error> {
    let Some(pod) = Api::<Pod>::namespaced(client.clone(), namespace)
        .get_opt(pod)
        .await?
    else {
        return Ok(Departure::Uninstall);
    };
    let owner = pod
        .metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .find(|owner| owner.kind == "DaemonSet" && owner.controller == Some(true));
    let Some(owner) = owner else {
        return Ok(Departure::Uninstall);
    };
    let daemon_set = Api::<DaemonSet>::namespaced(client.clone(), namespace)
        .get_opt(&owner.name)
        .await?;
    // One of the same name that is not being deleted (a reinstall, even) has a successor
    // of ours on this node, if it still places pods here and keeps these rules.
    let Some(ds) = daemon_set.filter(|ds| ds.metadata.deletion_timestamp.is_none()) else {
        return Ok(Departure::Uninstall);
    };
    let listed = ds
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(NODE_RULES_ANNOTATION))
        .is_some_and(|list| list.split(',').any(|name| name.trim() == rules.name()));
    let Some(template) = ds.spec.template.spec.filter(|_| listed) else {
        return Ok(Departure::Uninstall);
    };
    let Some(node_name) = pod.spec.and_then(|spec| spec.node_name) else {
        return Ok(Departure::Uninstall);
    };
    let node = Api::<Node>::all(client).get_opt(&node_name).await?;
    Ok(match node {
        Some(node) if places_on(&template, &node) => Departure::Restart,
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

/// What a stopping process does with its `rules`, given its pod as (namespace, name), and
/// why, for its log. An API that cannot answer (within [`ASK_TIMEOUT`]) is taken as an
/// uninstall, as Istio's node agent takes it: `helm uninstall` takes the RBAC away right
/// after the DaemonSet, and rules left without their process hold up the node (a CNI chain
/// without its agent holds up every new pod).
pub fn at_shutdown(namespace: &str, pod: &str, rules: NodeRules) -> (Departure, String) {
    match ask(namespace, pod, rules) {
        Ok(departure) => {
            let why = format!("read pod {namespace}/{pod}'s DaemonSet: {departure:?}");
            (departure, why)
        }
        Err(error) => (
            Departure::Uninstall,
            format!("could not tell an uninstall from a restart ({error}): taken as an uninstall"),
        ),
    }
}

/// [`departure`] from a thread with no runtime (at shutdown), with the client configured as
/// kube infers it (kubeconfig, else the pod's service account), given up after
/// [`ASK_TIMEOUT`].
fn ask(namespace: &str, pod: &str, rules: NodeRules) -> Result<Departure, String> {
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
        departure(client, namespace, pod, rules)
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

    /// The chart renders the annotation with these names, as its values turn them on.
    #[test]
    fn the_chart_annotates_its_daemon_set_with_the_node_rules_by_these_names() {
        let template = include_str!("../../charts/mesh-dataplane/templates/daemonset.yaml");
        assert!(template.contains(&format!("{NODE_RULES_ANNOTATION}: ")));
        for rules in [NodeRules::CniChain, NodeRules::HostProbeTable] {
            assert!(
                template.contains(&format!("append $nodeRules \"{}\"", rules.name())),
                "{rules:?}"
            );
        }
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
