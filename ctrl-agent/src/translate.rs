//! From the source's model to the snapshot schema: the one translation every source uses.

use std::collections::HashMap;
use std::net::IpAddr;

use mesh_core::index::ip_to_bytes;
use mesh_snapshot::schema::{
    self, Action, AuthorizationPolicy, Condition, Identity, MtlsMode, PeerAuthentication, Protocol,
    Rule, RuleOperation, RuleSource, Service, ServicePort, Snapshot, Workload,
};

use crate::config::{ActionSpec, FileConfig, MtlsModeSpec, PolicySpec, ProtocolSpec, SelectorSpec};

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

/// The snapshot for `node`: routing data for every workload, namespaces only for this node's
/// pods, certificates for this node's identities. `enrolled` maps (namespace, name) of pods of
/// this node captured through CNI to the addresses CNI gave them; the data plane gets their
/// namespaces from the agent, not by path.
pub fn snapshot(
    config: &FileConfig,
    node: &str,
    enrolled: &HashMap<(String, String), Vec<IpAddr>>,
    identities: Vec<Identity>,
    trust_roots: Vec<Vec<u8>>,
    source: String,
) -> Snapshot {
    let workloads = config
        .workloads
        .iter()
        .map(|w| {
            // Only this node's pods are enrolled here: no lookup key built for the others.
            let cni = (w.node == node)
                .then(|| enrolled.get(&(w.namespace.clone(), w.name.clone())))
                .flatten();
            let ips = match cni {
                Some(ips) if !ips.is_empty() => ips.clone(),
                _ => w.ips.clone(),
            };
            (w, ips, cni.is_some())
        })
        .map(|(w, ips, from_cni)| {
            let (canonical_service, canonical_revision) =
                schema::canonical_names(&w.name, &w.labels);
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
                netns_from_agent: from_cni,
                canonical_service,
                canonical_revision,
            }
        })
        .collect();
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
        workloads,
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
