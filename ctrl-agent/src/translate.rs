//! From the source's model to the snapshot schema: the one translation every source uses.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use mesh_core::index::ip_to_bytes;
use mesh_snapshot::delta::{self, Changes};
use mesh_snapshot::schema::{
    self, Action, AuthorizationPolicy, Condition, Identity, MtlsMode, PeerAuthentication, Protocol,
    Rule, RuleOperation, RuleSource, Service, ServicePort, Snapshot, Workload,
};

use crate::config::{
    ActionSpec, FileConfig, MtlsModeSpec, OwnerReferenceSpec, PolicySpec, ProtocolSpec,
    SelectorSpec, ServiceSpec, WaypointSpec, WorkloadSpec,
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
    let mut workload_name = schema::workload_name(
        &w.name,
        &w.generate_name,
        w.owner_references.iter().map(OwnerReferenceSpec::as_owner),
        &w.labels,
    );
    // Empty reads as the pod's name: a bare pod's bytes are not sent twice.
    if workload_name == w.name {
        workload_name.clear();
    }
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
        waypoint: waypoint_address(&w.waypoint),
        unresolved_waypoint: unresolved_waypoint(&w.waypoint),
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
        workload_name,
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
        services: config.services.iter().map(|s| service(s, config)).collect(),
        ..snapshot_rest(config, node, identities, trust_roots, source)
    }
}

/// How the snapshot's workloads and services follow a new model without translating every
/// pod and service: the entries that translate differently from the last model's, and the
/// keys that left.
#[derive(Debug, Default)]
pub struct ModelChanges {
    pub workloads: Changes<Workload>,
    pub services: Changes<Service>,
}

/// The changes from (`before`, `before_enrolled`) to (`after`, `after_enrolled`), or `None`
/// when every entry may translate differently (the trust domain changed). A workload's
/// translation depends only on its spec, the trust domain and, for this node's pods, their
/// enrollment; a service's on its spec and the trust domain. Uids, and services' namespace
/// and name, are unique within a model (`FileConfig::parse` and the Kubernetes model both
/// ensure it).
pub fn model_changes(
    before: &FileConfig,
    before_enrolled: &Enrolled,
    after: &FileConfig,
    after_enrolled: &Enrolled,
    node: &str,
) -> Option<ModelChanges> {
    if before.trust_domain != after.trust_domain {
        return None;
    }
    let same_enrollment = before_enrolled == after_enrolled;
    let (workloads, removed) = differing(
        &before.workloads,
        &after.workloads,
        |w| w.uid.as_str(),
        |o, w| {
            // The Kubernetes model hands over the same spec for a pod that did not change.
            (Arc::ptr_eq(o, w) && same_enrollment)
                || (o == w
                    && enrollment(o, node, before_enrolled) == enrollment(w, node, after_enrolled))
        },
    );
    let workloads = Changes {
        changed: workloads
            .into_iter()
            .map(|w| workload(w, after, node, after_enrolled))
            .collect(),
        removed: removed.into_iter().map(str::to_owned).collect(),
    };
    let (services, removed) = differing(
        &before.services,
        &after.services,
        |s| (s.namespace.as_str(), s.name.as_str()),
        |o, s| Arc::ptr_eq(o, s) || o == s,
    );
    let services = Changes {
        changed: services.into_iter().map(|s| service(s, after)).collect(),
        removed: removed
            .into_iter()
            .map(|(namespace, name)| delta::namespaced_key(namespace, name))
            .collect(),
    };
    Some(ModelChanges {
        workloads,
        services,
    })
}

/// Entries of `after` that are new or not `same` as in `before`, and keys of `before` that
/// `after` lacks; keys are unique within each list. Both lists are usually in the same order
/// (a model lists its objects in one order, and most changes add or remove none), so the
/// common prefix is compared in place and only the rest by key. In the prefix, an entry that
/// is the very one `before` had has its key without reading it.
fn differing<'a, T, K: Hash + Eq>(
    before: &'a [Arc<T>],
    after: &'a [Arc<T>],
    key: impl Fn(&'a Arc<T>) -> K,
    same: impl Fn(&Arc<T>, &Arc<T>) -> bool,
) -> (Vec<&'a Arc<T>>, Vec<K>) {
    let in_step = before
        .iter()
        .zip(after)
        .take_while(|(o, n)| Arc::ptr_eq(o, n) || key(o) == key(n))
        .count();
    let mut changed: Vec<&Arc<T>> = before
        .iter()
        .zip(after)
        .take(in_step)
        .filter(|(o, n)| !same(o, n))
        .map(|(_, n)| n)
        .collect();
    let old: HashMap<K, &Arc<T>> = before[in_step..].iter().map(|o| (key(o), o)).collect();
    let new: HashMap<K, &Arc<T>> = after[in_step..].iter().map(|n| (key(n), n)).collect();
    changed.extend(
        new.iter()
            .filter(|(k, n)| !old.get(*k).is_some_and(|o| same(o, n)))
            .map(|(_, n)| *n),
    );
    let removed = old.into_keys().filter(|k| !new.contains_key(k)).collect();
    (changed, removed)
}

/// The snapshot's two waypoint fields (one set at most): the address, and the hostname of
/// a waypoint that has none.
fn waypoint_address(waypoint: &Option<WaypointSpec>) -> String {
    match waypoint {
        Some(WaypointSpec::At(address)) => address.to_string(),
        _ => String::new(),
    }
}

fn unresolved_waypoint(waypoint: &Option<WaypointSpec>) -> String {
    match waypoint {
        Some(WaypointSpec::Unresolved(hostname)) => hostname.clone(),
        _ => String::new(),
    }
}

/// One service as the snapshot carries it.
fn service(s: &ServiceSpec, config: &FileConfig) -> Service {
    Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s
            .hostname
            .clone()
            .unwrap_or_else(|| format!("{}.{}.svc.{}", s.name, s.namespace, config.trust_domain)),
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
        waypoint: waypoint_address(&s.waypoint),
        unresolved_waypoint: unresolved_waypoint(&s.waypoint),
    }
}

/// `snapshot` without its workloads and services.
pub fn snapshot_rest(
    config: &FileConfig,
    node: &str,
    identities: Vec<Identity>,
    trust_roots: Vec<Vec<u8>>,
    source: String,
) -> Snapshot {
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
            created_unix: pa.created_unix,
        })
        .collect();
    Snapshot {
        schema_version: schema::SCHEMA_VERSION,
        node: node.to_owned(),
        workloads: Vec::new(),
        services: Vec::new(),
        policies: config.policies.iter().map(policy).collect(),
        peer_authentications,
        identities,
        trust_roots,
        source,
        root_namespace: config.root_namespace.clone(),
    }
}

/// The translation of `config` for `node` alone: no CNI enrollments, certificates or roots.
#[cfg(test)]
pub(crate) fn routing_only(config: &FileConfig, node: &str) -> Snapshot {
    snapshot(
        config,
        node,
        &Enrolled::default(),
        Vec::new(),
        Vec::new(),
        "test".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_snapshot::delta::State;
    use mesh_snapshot::view::WorkloadView;

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

    const SERVICES: &str = r#"
services:
  - name: till
    namespace: shop
    vips: [10.96.0.1]
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [there-1]
  - name: cart
    vips: [10.96.0.2]
    ports: [{port: 80}]
    endpoints: [here-1]
  - name: gone
    namespace: shop
    vips: [10.96.0.3]
    ports: [{port: 80}]
    endpoints: [there-2]
"#;

    /// The agent's incremental path: the changes between two models, applied to the state
    /// published from the first, give exactly the full translation of the second.
    #[test]
    fn model_changes_on_the_published_state_equal_the_full_translation() {
        let node = "node-1";
        let before = FileConfig::parse(&format!("{TWO_NODES}{SERVICES}")).expect("valid");
        let none = Enrolled::new();
        let mut after = before.clone();
        after.workloads.retain(|w| w.uid != "there-1");
        let mut added = WorkloadSpec::clone(&after.workloads[1]);
        added.uid = "there-3".into();
        added.name = "other".into();
        added.ips = vec!["10.0.2.4".parse().expect("ip")];
        after.workloads.push(Arc::new(added));
        // A label on another node's pod that does not change its canonical names translates
        // the same (its labels are not sent): no change.
        Arc::make_mut(&mut after.workloads[1])
            .labels
            .insert("team".into(), "pay".into());
        // This node's pod is now captured by CNI, with the address CNI gave it.
        let enrolled: Enrolled = [(
            ("default".to_owned(), "cart-7d9f-abcde".to_owned()),
            vec!["10.0.1.50".parse().expect("ip")],
        )]
        .into();
        // Services: one loses the pod that left and gains the new one, one goes, one comes,
        // and one stays as it was.
        Arc::make_mut(&mut after.services[0]).endpoints = vec!["there-3".into()];
        after.services.retain(|s| s.name != "gone");
        let mut new_service = ServiceSpec::clone(&after.services[1]);
        new_service.name = "new".into();
        new_service.vips = vec!["10.96.0.9".parse().expect("ip")];
        after.services.insert(0, Arc::new(new_service));
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
            model_changes(&before, &none, &after, &enrolled, node).expect("same trust domain");
        let rest = snapshot_rest(&after, node, Vec::new(), Vec::new(), "t".into());
        let delta = published
            .diff_with_changes(&State::from(rest), changes.workloads, changes.services)
            .expect("same node");
        let mut uids: Vec<&str> = delta.workloads.iter().map(|w| w.uid.as_str()).collect();
        uids.sort();
        assert_eq!(uids, ["here-1", "there-3"]);
        assert_eq!(delta.removed_workloads, ["there-1"]);
        let mut services: Vec<&str> = delta.services.iter().map(|s| s.name.as_str()).collect();
        services.sort();
        assert_eq!(services, ["new", "till"]);
        assert_eq!(delta.removed_services, ["shop/gone"]);
        let mut state = published.clone();
        state.apply(&delta);
        assert_eq!(state, full(&after, &enrolled));

        let unchanged = model_changes(&after, &enrolled, &after, &enrolled, node).expect("same");
        assert!(unchanged.workloads.is_empty() && unchanged.services.is_empty());
        let mut other_domain = after.clone();
        other_domain.trust_domain = "other.local".into();
        assert!(
            model_changes(&after, &enrolled, &other_domain, &enrolled, node).is_none(),
            "every identity and default hostname may change: translate them all"
        );
    }

    #[test]
    fn a_file_workload_is_named_by_its_workload_name_label_or_else_by_its_name() {
        let config = FileConfig::parse(
            r#"
workloads:
  - uid: u1
    name: cart-1
    ips: [10.0.1.2]
    node: node-1
    labels: {"service.istio.io/workload-name": cart, app: shop}
  - uid: u2
    name: bare
    ips: [10.0.2.2]
    node: node-2
"#,
        )
        .expect("valid");
        let snap = routing_only(&config, "node-1");
        let names: Vec<(&str, &str)> = snap
            .workloads
            .iter()
            // As the data plane reads it: an empty field (the pod's own name, not sent twice) is the name.
            .map(|w| (w.name.as_str(), WorkloadView::from(w).workload_name()))
            .collect();
        assert_eq!(names, [("cart-1", "cart"), ("bare", "bare")]);
    }

    #[test]
    fn labels_go_only_with_this_nodes_pods_and_every_pod_gets_its_canonical_names() {
        let config = FileConfig::parse(TWO_NODES).expect("valid");
        let snap = routing_only(&config, "node-1");
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
