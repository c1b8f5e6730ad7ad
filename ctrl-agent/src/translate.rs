//! From the source's model to the snapshot schema: the one translation every source uses.

use std::collections::HashMap;
use std::net::IpAddr;

use mesh_core::index::ip_to_bytes;
use mesh_snapshot::schema::{
    self, Action, AuthorizationPolicy, Condition, Identity, MtlsMode, PeerAuthentication, Protocol,
    Rule, RuleOperation, RuleSource, Service, ServicePort, Snapshot, Workload,
};

use crate::config::{
    ActionSpec, FileConfig, MtlsModeSpec, PolicySpec, ProtocolSpec, SelectorSpec, WorkloadSpec,
};

fn selector(s: &Option<SelectorSpec>) -> std::collections::BTreeMap<String, String> {
    s.as_ref()
        .map(|s| s.match_labels.clone())
        .unwrap_or_default()
}

fn mtls_mode(m: MtlsModeSpec) -> i32 {
    (match m {
        MtlsModeSpec::Unset => MtlsMode::Unset,
        MtlsModeSpec::Permissive => MtlsMode::Permissive,
        MtlsModeSpec::Strict => MtlsMode::Strict,
        MtlsModeSpec::Disable => MtlsMode::Disable,
    }) as i32
}

fn policy(p: &PolicySpec) -> AuthorizationPolicy {
    AuthorizationPolicy {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        action: match p.action {
            ActionSpec::Allow => Action::Allow,
            ActionSpec::Deny => Action::Deny,
            ActionSpec::Audit => Action::Audit,
        } as i32,
        selector: selector(&p.selector),
        dry_run: p.dry_run,
        rules: p
            .rules
            .iter()
            .map(|r| Rule {
                from: r
                    .from
                    .iter()
                    .map(|f| {
                        let s = &f.source;
                        RuleSource {
                            principals: s.principals.clone(),
                            not_principals: s.not_principals.clone(),
                            namespaces: s.namespaces.clone(),
                            not_namespaces: s.not_namespaces.clone(),
                            ip_blocks: s.ip_blocks.clone(),
                            not_ip_blocks: s.not_ip_blocks.clone(),
                            remote_ip_blocks: s.remote_ip_blocks.clone(),
                            not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
                            request_principals: s.request_principals.clone(),
                            not_request_principals: s.not_request_principals.clone(),
                            service_accounts: s.service_accounts.clone(),
                            not_service_accounts: s.not_service_accounts.clone(),
                        }
                    })
                    .collect(),
                to: r
                    .to
                    .iter()
                    .map(|t| {
                        let o = &t.operation;
                        RuleOperation {
                            ports: o.ports.clone(),
                            not_ports: o.not_ports.clone(),
                            hosts: o.hosts.clone(),
                            not_hosts: o.not_hosts.clone(),
                            methods: o.methods.clone(),
                            not_methods: o.not_methods.clone(),
                            paths: o.paths.clone(),
                            not_paths: o.not_paths.clone(),
                        }
                    })
                    .collect(),
                when: r
                    .when
                    .iter()
                    .map(|c| Condition {
                        key: c.key.clone(),
                        values: c.values.clone(),
                        not_values: c.not_values.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Addresses CNI gave this node's captured pods, by (namespace, name).
pub type Enrolled = HashMap<(String, String), Vec<IpAddr>>;

/// The CNI enrollment of `w` if it is a pod of `node` (others are never enrolled here: no
/// lookup key is built for them).
fn enrollment<'a>(w: &WorkloadSpec, node: &str, enrolled: &'a Enrolled) -> Option<&'a Vec<IpAddr>> {
    (w.node == node)
        .then(|| enrolled.get(&(w.namespace.clone(), w.name.clone())))
        .flatten()
}

/// One workload as `node`'s snapshot carries it.
fn workload(w: &WorkloadSpec, config: &FileConfig, node: &str, enrolled: &Enrolled) -> Workload {
    let cni = enrollment(w, node, enrolled);
    let ips = match cni {
        Some(ips) if !ips.is_empty() => ips,
        _ => &w.ips,
    };
    let (canonical_service, canonical_revision) = schema::canonical_names(&w.name, &w.labels);
    let local = w.node == node;
    Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
        trust_domain: w
            .trust_domain
            .clone()
            .unwrap_or_else(|| config.trust_domain.clone()),
        ips: ips.iter().map(|ip| ip_to_bytes(*ip)).collect(),
        node: w.node.clone(),
        protocol: match w.protocol {
            ProtocolSpec::Hbone => Protocol::Hbone,
            ProtocolSpec::Tcp => Protocol::Tcp,
        } as i32,
        waypoint: w.waypoint.clone().unwrap_or_default(),
        netns_path: if local {
            w.netns
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        } else {
            String::new()
        },
        labels: if local {
            w.labels.clone()
        } else {
            Default::default()
        },
        netns_from_agent: cni.is_some(),
        canonical_service,
        canonical_revision,
    }
}

/// The snapshot for `node`: routing data for every workload, namespaces only for this node's
/// pods, certificates for this node's identities. `enrolled` maps (namespace, name) of pods of
/// this node captured through CNI to the addresses CNI gave them; the data plane gets their
/// namespaces from the agent, not by path.
pub fn snapshot(
    config: &FileConfig,
    node: &str,
    enrolled: &Enrolled,
    identities: Vec<Identity>,
    trust_roots: Vec<Vec<u8>>,
    source: String,
) -> Snapshot {
    Snapshot {
        workloads: config
            .workloads
            .iter()
            .map(|w| workload(w, config, node, enrolled))
            .collect(),
        ..snapshot_without_workloads(config, node, identities, trust_roots, source)
    }
}

/// Workloads of a new model that translate differently from the last one's, and uids that
/// left: what a snapshot's workloads need to follow the model without translating every pod.
#[derive(Debug, Default)]
pub struct WorkloadChanges {
    pub changed: Vec<Workload>,
    pub removed: Vec<String>,
}

/// The workload changes from (`before`, `before_enrolled`) to (`after`, `after_enrolled`), or
/// `None` when every workload may translate differently (the trust domain changed). A
/// workload's translation depends only on its spec, the trust domain and, for this node's
/// pods, their enrollment. Uids are unique within a model (`FileConfig::parse` and the
/// Kubernetes model both ensure it). Both models list pods in the same order unless pods
/// came or went, so the common prefix is compared in place and only the rest by uid.
pub fn workload_changes(
    before: &FileConfig,
    before_enrolled: &Enrolled,
    after: &FileConfig,
    after_enrolled: &Enrolled,
    node: &str,
) -> Option<WorkloadChanges> {
    if before.trust_domain != after.trust_domain {
        return None;
    }
    let same = |o: &WorkloadSpec, w: &WorkloadSpec| {
        o == w && enrollment(o, node, before_enrolled) == enrollment(w, node, after_enrolled)
    };
    let mut changes = WorkloadChanges::default();
    let in_step = before
        .workloads
        .iter()
        .zip(&after.workloads)
        .take_while(|(o, w)| o.uid == w.uid)
        .count();
    for (o, w) in before.workloads.iter().zip(&after.workloads).take(in_step) {
        if !same(o, w) {
            changes
                .changed
                .push(workload(w, after, node, after_enrolled));
        }
    }
    fn by_uid(workloads: &[WorkloadSpec]) -> HashMap<&str, &WorkloadSpec> {
        workloads.iter().map(|w| (w.uid.as_str(), w)).collect()
    }
    let old = by_uid(&before.workloads[in_step..]);
    let new = by_uid(&after.workloads[in_step..]);
    for (uid, w) in &new {
        if !old.get(uid).is_some_and(|o| same(o, w)) {
            changes
                .changed
                .push(workload(w, after, node, after_enrolled));
        }
    }
    changes.removed = old
        .keys()
        .filter(|uid| !new.contains_key(*uid))
        .map(|uid| (*uid).to_owned())
        .collect();
    Some(changes)
}

/// `snapshot` without its workloads.
pub fn snapshot_without_workloads(
    config: &FileConfig,
    node: &str,
    identities: Vec<Identity>,
    trust_roots: Vec<Vec<u8>>,
    source: String,
) -> Snapshot {
    let services = config
        .services
        .iter()
        .map(|s| Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone().unwrap_or_else(|| {
                format!("{}.{}.svc.{}", s.name, s.namespace, config.trust_domain)
            }),
            vips: s.vips.iter().map(|ip| ip_to_bytes(*ip)).collect(),
            ports: s
                .ports
                .iter()
                .map(|p| ServicePort {
                    port: u32::from(p.port),
                    target_port: u32::from(p.target_port.unwrap_or(p.port)),
                })
                .collect(),
            endpoints: s.endpoints.clone(),
            waypoint: s.waypoint.clone().unwrap_or_default(),
        })
        .collect();
    let peer_authentications = config
        .peer_authentications
        .iter()
        .map(|pa| PeerAuthentication {
            name: pa.name.clone(),
            namespace: pa.namespace.clone(),
            selector: selector(&pa.selector),
            mode: mtls_mode(pa.mtls.mode),
            port_level_mtls: pa
                .port_level_mtls
                .iter()
                .map(|(port, m)| (u32::from(*port), mtls_mode(m.mode)))
                .collect(),
        })
        .collect();
    Snapshot {
        schema_version: schema::SCHEMA_VERSION,
        node: node.to_owned(),
        workloads: Vec::new(),
        services,
        policies: config.policies.iter().map(policy).collect(),
        peer_authentications,
        identities,
        trust_roots,
        source,
        root_namespace: config.root_namespace.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_snapshot::delta::State;

    const TWO_NODES: &str = r#"
trustDomain: cluster.local
workloads:
  - uid: here-1
    name: cart-7d9f-abcde
    serviceAccount: cart
    ips: [10.0.1.2]
    node: node-1
    labels: {app: cart, version: v2, team: shop}
  - uid: there-1
    name: till-5c6d-fghij
    serviceAccount: till
    ips: [10.0.2.2]
    node: node-2
    labels: {"service.istio.io/canonical-name": till, app: ignored, team: pay}
  - uid: there-2
    name: bare
    ips: [10.0.2.3]
    node: node-2
"#;

    /// The agent's incremental path: the workload changes between two models, applied to the
    /// state published from the first, give exactly the full translation of the second.
    #[test]
    fn workload_changes_on_the_published_state_equal_the_full_translation() {
        let node = "node-1";
        let before = FileConfig::parse(TWO_NODES).expect("valid");
        let none = Enrolled::new();
        let mut after = before.clone();
        after.workloads.retain(|w| w.uid != "there-1");
        let mut added = after.workloads[1].clone();
        added.uid = "there-3".into();
        added.name = "other".into();
        added.ips = vec!["10.0.2.4".parse().expect("ip")];
        after.workloads.push(added);
        // A label on another node's pod that does not change its canonical names translates
        // the same (its labels are not sent): no change.
        after.workloads[1]
            .labels
            .insert("team".into(), "pay".into());
        // This node's pod is now captured by CNI, with the address CNI gave it.
        let enrolled: Enrolled = [(
            ("default".to_owned(), "cart-7d9f-abcde".to_owned()),
            vec!["10.0.1.50".parse().expect("ip")],
        )]
        .into();
        let full = |config: &FileConfig, enrolled: &Enrolled| {
            State::from(snapshot(
                config,
                node,
                enrolled,
                Vec::new(),
                Vec::new(),
                "t".into(),
            ))
        };
        let published = full(&before, &none);
        let changes =
            workload_changes(&before, &none, &after, &enrolled, node).expect("same trust domain");
        let rest = snapshot_without_workloads(&after, node, Vec::new(), Vec::new(), "t".into());
        let delta = published
            .diff_with_workload_changes(&State::from(rest), changes.changed, changes.removed)
            .expect("same node");
        let mut uids: Vec<&str> = delta.workloads.iter().map(|w| w.uid.as_str()).collect();
        uids.sort();
        assert_eq!(uids, ["here-1", "there-3"]);
        assert_eq!(delta.removed_workloads, ["there-1"]);
        let mut state = published.clone();
        state.apply(&delta);
        assert_eq!(state, full(&after, &enrolled));

        let unchanged = workload_changes(&after, &enrolled, &after, &enrolled, node).expect("same");
        assert!(unchanged.changed.is_empty() && unchanged.removed.is_empty());
        let mut other_domain = after.clone();
        other_domain.trust_domain = "other.local".into();
        assert!(
            workload_changes(&after, &enrolled, &other_domain, &enrolled, node).is_none(),
            "every workload's identity may change: translate them all"
        );
    }

    #[test]
    fn labels_go_only_with_this_nodes_pods_and_every_pod_gets_its_canonical_names() {
        let config = FileConfig::parse(TWO_NODES).expect("valid");
        let snap = snapshot(
            &config,
            "node-1",
            &HashMap::new(),
            Vec::new(),
            Vec::new(),
            "test".into(),
        );
        let by_uid = |uid: &str| {
            snap.workloads
                .iter()
                .find(|w| w.uid == uid)
                .expect("translated")
        };
        let here = by_uid("here-1");
        assert_eq!(
            here.labels.get("team").map(String::as_str),
            Some("shop"),
            "this node's pods keep their labels: policies select them by label"
        );
        assert_eq!(
            (&*here.canonical_service, &*here.canonical_revision),
            ("cart", "v2")
        );
        let there = by_uid("there-1");
        assert!(there.labels.is_empty(), "{:?}", there.labels);
        assert_eq!(
            (&*there.canonical_service, &*there.canonical_revision),
            ("till", "latest"),
            "Istio's canonical-name label comes before app"
        );
        let bare = by_uid("there-2");
        assert_eq!(
            (&*bare.canonical_service, &*bare.canonical_revision),
            ("bare", "latest")
        );
    }
}
