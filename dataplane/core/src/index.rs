//! The immutable routing index a worker consults per connection, built once per snapshot.
//!
//! Workers share one `Arc<Index>` per generation and never mutate it; a new generation is a new
//! index, adopted between connections, so a connection keeps the index it started with.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mesh_snapshot::schema::{self, Protocol, Snapshot};

use crate::authz::{self, Applicable, Decision, Mtls, PeerAuth, Policies};
use crate::identity::{SpiffeId, SpiffeIdError};
use crate::ports;

/// A workload as the data path needs it: parsed addresses and identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub identity: SpiffeId,
    pub ips: Vec<IpAddr>,
    pub node: String,
    pub protocol: Protocol,
    /// Where the data plane finds this pod's network namespace (pods of this node only).
    pub netns: NetnsSource,
    /// Istio's canonical service and revision, from the workload's labels (metric labels).
    pub canonical_service: String,
    pub canonical_revision: String,
}

/// A service as metrics name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
}

/// How a local pod's network namespace is reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NetnsSource {
    /// Not a pod this node serves.
    None,
    /// A path (file-configured labs): `/run/netns/<name>`.
    Path(String),
    /// Enrolled through CNI: the agent hands the namespace over as a descriptor, by uid.
    Agent,
}

#[derive(Clone, Debug)]
struct Service {
    name: ServiceName,
    /// Indexes into `Index::workloads`, endpoints that exist in the snapshot.
    endpoints: Vec<usize>,
}

/// Where an outbound connection goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// Through HBONE to the destination's node: CONNECT `target` over a tunnel to `tunnel`,
    /// accepting only a server that proves `identity`.
    Hbone {
        destination: &'a Workload,
        target: SocketAddr,
        tunnel: SocketAddr,
        /// The service whose VIP was dialled, if it was one.
        service: Option<&'a ServiceName>,
    },
    /// Not in the mesh: plain TCP to `target`.
    Passthrough { target: SocketAddr },
    /// A service VIP with no endpoint to send to.
    NoEndpoint { service: SocketAddr },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("workload {uid:?}: {field}: {problem}")]
    Workload {
        uid: String,
        field: &'static str,
        problem: String,
    },
    #[error("service {name:?}: {field}: {problem}")]
    Service {
        name: String,
        field: &'static str,
        problem: String,
    },
    #[error("identity {spiffe_id:?}: {0}", spiffe_id = .1)]
    Identity(SpiffeIdError, String),
    #[error("duplicate workload uid {0:?}")]
    DuplicateUid(String),
    #[error("address {ip} belongs to both {first:?} and {second:?}")]
    DuplicateIp {
        ip: IpAddr,
        first: String,
        second: String,
    },
}

/// Istio's canonical service and revision for a workload, from the labels Istio reads, in
/// Istio's order of preference; the workload's name and "latest" when none is set.
pub fn canonical_names(
    name: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> (String, String) {
    let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
    let service = first(&[
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ])
    .unwrap_or_else(|| name.to_owned());
    let revision = first(&[
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or_else(|| "latest".to_owned());
    (service, revision)
}

/// Parses a 4- or 16-byte address from the snapshot.
pub fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| Ipv4Addr::from(b).into()),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|b| Ipv6Addr::from(b).into()),
        _ => None,
    }
}

pub fn ip_to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Version stamp of the snapshot an index was built from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Generation {
    pub epoch: u64,
    pub generation: u64,
}

#[derive(Debug)]
pub struct Index {
    generation: Generation,
    node: String,
    workloads: Vec<Workload>,
    by_ip: HashMap<IpAddr, usize>,
    by_uid: HashMap<String, usize>,
    services: Vec<Service>,
    /// (vip, service port) -> (service, target port).
    by_vip: HashMap<SocketAddr, (usize, u16)>,
    local: Vec<usize>,
    identities: HashMap<SpiffeId, schema::Identity>,
    trust_roots: Vec<Vec<u8>>,
    source: String,
    policies: Policies,
    /// Per local workload: the policies that apply to it and its mTLS mode.
    local_authz: HashMap<String, (Applicable, PeerAuth)>,
}

impl Index {
    /// Builds and checks an index. Anything malformed refuses the whole snapshot: a data plane
    /// that half-applied a config would be harder to reason about than one that kept the last.
    pub fn build(snapshot: Snapshot, generation: Generation) -> Result<Index, IndexError> {
        let root_namespace = if snapshot.root_namespace.is_empty() {
            authz::DEFAULT_ROOT_NAMESPACE
        } else {
            snapshot.root_namespace.as_str()
        };
        let policies = Policies::build(&snapshot.policies, root_namespace);
        let mut local_authz = HashMap::new();
        let mut workloads = Vec::with_capacity(snapshot.workloads.len());
        let mut by_ip = HashMap::with_capacity(snapshot.workloads.len());
        let mut by_uid = HashMap::with_capacity(snapshot.workloads.len());
        let mut local = Vec::new();
        for w in snapshot.workloads {
            let bad = |field, problem: String| IndexError::Workload {
                uid: w.uid.clone(),
                field,
                problem,
            };
            let identity = SpiffeId::new(&w.trust_domain, &w.namespace, &w.service_account)
                .map_err(|e| bad("identity", e.to_string()))?;
            let ips = w
                .ips
                .iter()
                .map(|b| ip_from_bytes(b).ok_or_else(|| bad("ips", format!("{} bytes", b.len()))))
                .collect::<Result<Vec<_>, _>>()?;
            let slot = workloads.len();
            for ip in &ips {
                if let Some(&other) = by_ip.get(ip) {
                    let other: &Workload = &workloads[other];
                    return Err(IndexError::DuplicateIp {
                        ip: *ip,
                        first: other.uid.clone(),
                        second: w.uid.clone(),
                    });
                }
                by_ip.insert(*ip, slot);
            }
            if by_uid.insert(w.uid.clone(), slot).is_some() {
                return Err(IndexError::DuplicateUid(w.uid));
            }
            let netns = if w.node != snapshot.node {
                NetnsSource::None
            } else if w.netns_from_agent {
                NetnsSource::Agent
            } else if !w.netns_path.is_empty() {
                NetnsSource::Path(w.netns_path.clone())
            } else {
                NetnsSource::None
            };
            if netns != NetnsSource::None {
                local.push(slot);
                // Enforcement happens at the destination: resolve scopes for local pods only.
                local_authz.insert(
                    w.uid.clone(),
                    (
                        policies.applicable(&w.namespace, &w.labels),
                        PeerAuth::resolve(
                            &snapshot.peer_authentications,
                            root_namespace,
                            &w.namespace,
                            &w.labels,
                        ),
                    ),
                );
            }
            let (canonical_service, canonical_revision) = canonical_names(&w.name, &w.labels);
            workloads.push(Workload {
                canonical_service,
                canonical_revision,
                protocol: w.protocol(),
                uid: w.uid,
                name: w.name,
                namespace: w.namespace,
                identity,
                ips,
                node: w.node,
                netns,
            });
        }

        let mut services = Vec::with_capacity(snapshot.services.len());
        let mut by_vip = HashMap::new();
        for s in snapshot.services {
            let bad = |field, problem: String| IndexError::Service {
                name: format!("{}/{}", s.namespace, s.name),
                field,
                problem,
            };
            let slot = services.len();
            let vips = s
                .vips
                .iter()
                .map(|b| ip_from_bytes(b).ok_or_else(|| bad("vips", format!("{} bytes", b.len()))))
                .collect::<Result<Vec<_>, _>>()?;
            for p in &s.ports {
                let port = u16::try_from(p.port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad("ports", format!("port {} out of range", p.port)))?;
                let target = u16::try_from(p.target_port).map_err(|_| {
                    bad(
                        "ports",
                        format!("target port {} out of range", p.target_port),
                    )
                })?;
                let target = if target == 0 { port } else { target };
                for vip in &vips {
                    by_vip.insert(SocketAddr::new(*vip, port), (slot, target));
                }
            }
            // Endpoints that name no known workload are skipped, not fatal: the service
            // and its pods are watched separately and may briefly disagree.
            let endpoints = s
                .endpoints
                .iter()
                .filter_map(|uid| by_uid.get(uid).copied())
                .collect();
            let hostname = if s.hostname.is_empty() {
                format!("{}.{}.svc.cluster.local", s.name, s.namespace)
            } else {
                s.hostname.clone()
            };
            services.push(Service {
                name: ServiceName {
                    name: s.name.clone(),
                    namespace: s.namespace.clone(),
                    hostname,
                },
                endpoints,
            });
        }

        let mut identities = HashMap::with_capacity(snapshot.identities.len());
        for id in snapshot.identities {
            let parsed: SpiffeId = id
                .spiffe_id
                .parse()
                .map_err(|e| IndexError::Identity(e, id.spiffe_id.clone()))?;
            identities.insert(parsed, id);
        }

        Ok(Index {
            generation,
            node: snapshot.node,
            workloads,
            by_ip,
            by_uid,
            services,
            by_vip,
            local,
            identities,
            trust_roots: snapshot.trust_roots,
            source: snapshot.source,
            policies,
            local_authz,
        })
    }

    /// An index with nothing in it: what a data plane serves before its first snapshot.
    pub fn empty() -> Index {
        Index {
            generation: Generation::default(),
            node: String::new(),
            workloads: Vec::new(),
            by_ip: HashMap::new(),
            by_uid: HashMap::new(),
            services: Vec::new(),
            by_vip: HashMap::new(),
            local: Vec::new(),
            identities: HashMap::new(),
            trust_roots: Vec::new(),
            source: String::new(),
            policies: Policies::default(),
            local_authz: HashMap::new(),
        }
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }
    pub fn node(&self) -> &str {
        &self.node
    }
    pub fn source(&self) -> &str {
        &self.source
    }
    pub fn workloads(&self) -> &[Workload] {
        &self.workloads
    }
    /// Every service with its VIP:port frontends (sorted) and the number of endpoints.
    pub fn services(&self) -> Vec<(&ServiceName, Vec<SocketAddr>, usize)> {
        let mut frontends: Vec<Vec<SocketAddr>> = vec![Vec::new(); self.services.len()];
        for (vip, (service, _)) in &self.by_vip {
            frontends[*service].push(*vip);
        }
        self.services
            .iter()
            .zip(frontends)
            .map(|(s, mut vips)| {
                vips.sort();
                (&s.name, vips, s.endpoints.len())
            })
            .collect()
    }

    pub fn trust_roots(&self) -> &[Vec<u8>] {
        &self.trust_roots
    }

    /// Workloads on this node that the data plane serves from inside their network namespace.
    pub fn local_workloads(&self) -> impl Iterator<Item = &Workload> {
        self.local.iter().map(|&i| &self.workloads[i])
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).map(|&i| &self.workloads[i])
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Workload> {
        self.by_uid.get(uid).map(|&i| &self.workloads[i])
    }

    /// Certificate chain and key for a local identity.
    pub fn identity(&self, id: &SpiffeId) -> Option<&schema::Identity> {
        self.identities.get(id)
    }

    pub fn identities(&self) -> impl Iterator<Item = (&SpiffeId, &schema::Identity)> {
        self.identities.iter()
    }

    /// Authorizes an inbound connection to local workload `uid`. A workload this node does not
    /// serve gets no policies resolved and is refused.
    pub fn authorize(&self, uid: &str, connection: &authz::Connection) -> Decision {
        match self.local_authz.get(uid) {
            Some((applicable, _)) => self.policies.evaluate(applicable, connection),
            None => Decision {
                allowed: false,
                reason: authz::Reason::NotAllowed,
                audited: Vec::new(),
                dry_run: None,
            },
        }
    }

    /// Whether plaintext to `port` of local workload `uid` is refused (PeerAuthentication).
    pub fn inbound_mtls(&self, uid: &str, port: u16) -> Mtls {
        self.local_authz
            .get(uid)
            .map_or(Mtls::Permissive, |(_, peer)| peer.mode(port))
    }

    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// Decides where an outbound connection to `dst` goes. `pick` spreads service traffic over
    /// endpoints (callers pass a per-worker counter, so selection is round robin per core).
    pub fn route_outbound(&self, dst: SocketAddr, pick: u64) -> Route<'_> {
        if let Some(&(service, target_port)) = self.by_vip.get(&dst) {
            let endpoints = &self.services[service].endpoints;
            if endpoints.is_empty() {
                return Route::NoEndpoint { service: dst };
            }
            let workload = &self.workloads[endpoints[(pick % endpoints.len() as u64) as usize]];
            // Prefer an address of the VIP's family; fall back to any.
            let ip = workload
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == dst.is_ipv4())
                .or_else(|| workload.ips.first());
            let route = match ip {
                Some(ip) => self.route_to_workload(workload, SocketAddr::new(*ip, target_port)),
                None => Route::NoEndpoint { service: dst },
            };
            return match route {
                Route::Hbone {
                    destination,
                    target,
                    tunnel,
                    ..
                } => Route::Hbone {
                    destination,
                    target,
                    tunnel,
                    service: Some(&self.services[service].name),
                },
                other => other,
            };
        }
        match self.workload_by_ip(dst.ip()) {
            Some(workload) => self.route_to_workload(workload, dst),
            None => Route::Passthrough { target: dst },
        }
    }

    fn route_to_workload<'a>(&'a self, workload: &'a Workload, target: SocketAddr) -> Route<'a> {
        match workload.protocol {
            Protocol::Hbone => Route::Hbone {
                destination: workload,
                target,
                tunnel: SocketAddr::new(target.ip(), ports::HBONE),
                service: None,
            },
            Protocol::Tcp => Route::Passthrough { target },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_snapshot::schema::{Identity, Service as SnapService, ServicePort, Workload as W};

    fn workload(uid: &str, ip: [u8; 4], node: &str, protocol: Protocol, netns: &str) -> W {
        W {
            uid: uid.into(),
            name: uid.into(),
            namespace: "default".into(),
            service_account: format!("sa-{uid}"),
            trust_domain: "cluster.local".into(),
            ips: vec![ip.to_vec()],
            node: node.into(),
            protocol: protocol as i32,
            netns_path: netns.into(),
            ..Default::default()
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            node: "n1".into(),
            workloads: vec![
                workload(
                    "client",
                    [10, 0, 1, 2],
                    "n1",
                    Protocol::Hbone,
                    "/run/netns/c",
                ),
                workload("server-a", [10, 0, 2, 2], "n2", Protocol::Hbone, ""),
                workload("server-b", [10, 0, 2, 3], "n2", Protocol::Hbone, ""),
                workload("legacy", [10, 0, 2, 9], "n2", Protocol::Tcp, ""),
            ],
            services: vec![
                SnapService {
                    name: "server".into(),
                    namespace: "default".into(),
                    vips: vec![vec![10, 96, 0, 10]],
                    ports: vec![ServicePort {
                        port: 80,
                        target_port: 8080,
                    }],
                    endpoints: vec!["server-a".into(), "server-b".into(), "gone".into()],
                    ..Default::default()
                },
                SnapService {
                    name: "empty".into(),
                    namespace: "default".into(),
                    vips: vec![vec![10, 96, 0, 11]],
                    ports: vec![ServicePort {
                        port: 80,
                        target_port: 0,
                    }],
                    ..Default::default()
                },
            ],
            identities: vec![Identity {
                spiffe_id: "spiffe://cluster.local/ns/default/sa/sa-client".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn routes_by_workload_ip_service_vip_or_passthrough() {
        let index = Index::build(snapshot(), Generation::default()).expect("builds");
        let hbone_to = |r: Route<'_>| match r {
            Route::Hbone {
                destination,
                target,
                tunnel,
                ..
            } => (destination.uid.clone(), target, tunnel),
            other => panic!("expected HBONE, got {other:?}"),
        };
        assert_eq!(
            hbone_to(index.route_outbound(addr("10.0.2.2:9000"), 0)),
            (
                "server-a".into(),
                addr("10.0.2.2:9000"),
                addr("10.0.2.2:15008")
            )
        );
        // The VIP resolves to its endpoints in turn, with the target port applied.
        let picked: Vec<_> = (0..4)
            .map(|pick| hbone_to(index.route_outbound(addr("10.96.0.10:80"), pick)).1)
            .collect();
        assert_eq!(
            picked,
            [
                addr("10.0.2.2:8080"),
                addr("10.0.2.3:8080"),
                addr("10.0.2.2:8080"),
                addr("10.0.2.3:8080")
            ]
        );
        assert_eq!(
            index.route_outbound(addr("10.0.2.9:5432"), 0),
            Route::Passthrough {
                target: addr("10.0.2.9:5432")
            }
        );
        assert_eq!(
            index.route_outbound(addr("8.8.8.8:53"), 0),
            Route::Passthrough {
                target: addr("8.8.8.8:53")
            }
        );
        assert_eq!(
            index.route_outbound(addr("10.96.0.11:80"), 0),
            Route::NoEndpoint {
                service: addr("10.96.0.11:80")
            }
        );
        // A port the service does not expose is not the service.
        assert_eq!(
            index.route_outbound(addr("10.96.0.10:81"), 0),
            Route::Passthrough {
                target: addr("10.96.0.10:81")
            }
        );
    }

    #[test]
    fn local_workloads_are_those_on_this_node_with_a_namespace() {
        let index = Index::build(snapshot(), Generation::default()).expect("builds");
        let local: Vec<_> = index.local_workloads().map(|w| w.uid.as_str()).collect();
        assert_eq!(local, ["client"]);
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/sa-client"
            .parse()
            .expect("id");
        assert!(index.identity(&id).is_some());
    }

    #[test]
    fn malformed_snapshots_are_refused_with_the_culprit_named() {
        let mut s = snapshot();
        s.workloads[1].ips = vec![vec![1, 2, 3]];
        assert_eq!(
            Index::build(s, Generation::default()).err(),
            Some(IndexError::Workload {
                uid: "server-a".into(),
                field: "ips",
                problem: "3 bytes".into()
            })
        );

        let mut s = snapshot();
        s.workloads[2].ips = s.workloads[1].ips.clone();
        assert!(matches!(
            Index::build(s, Generation::default()),
            Err(IndexError::DuplicateIp { .. })
        ));

        let mut s = snapshot();
        s.workloads[0].service_account = "a/b".into();
        assert!(matches!(
            Index::build(s, Generation::default()),
            Err(IndexError::Workload {
                field: "identity",
                ..
            })
        ));

        let mut s = snapshot();
        s.services[0].ports[0].port = 70000;
        assert!(matches!(
            Index::build(s, Generation::default()),
            Err(IndexError::Service { field: "ports", .. })
        ));
    }
}
