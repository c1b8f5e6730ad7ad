//! Protobuf schema of a snapshot (prost). Field numbers are the wire contract: never reuse one,
//! only add. Bump [`SCHEMA_VERSION`] when a change would make an older reader misread a snapshot.

use prost::Message;

/// Version of the meaning of the fields below. A reader refuses a snapshot with another major.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, PartialEq, Message)]
pub struct Snapshot {
    #[prost(uint32, tag = "1")]
    pub schema_version: u32,
    /// Name of the node whose agent published this snapshot; local workloads carry it too.
    #[prost(string, tag = "2")]
    pub node: String,
    #[prost(message, repeated, tag = "3")]
    pub workloads: Vec<Workload>,
    #[prost(message, repeated, tag = "4")]
    pub services: Vec<Service>,
    #[prost(message, repeated, tag = "5")]
    pub policies: Vec<AuthorizationPolicy>,
    #[prost(message, repeated, tag = "6")]
    pub peer_authentications: Vec<PeerAuthentication>,
    /// Certificates and keys for the identities of this node's workloads.
    #[prost(message, repeated, tag = "7")]
    pub identities: Vec<Identity>,
    /// Mesh trust anchors (DER). Several during a root rotation.
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub trust_roots: Vec<Vec<u8>>,
    /// Where the content came from (file path and digest, or API resource version), for humans.
    #[prost(string, tag = "9")]
    pub source: String,
    /// Istio's root namespace: policies there without a selector apply mesh-wide.
    #[prost(string, tag = "10")]
    pub root_namespace: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, prost::Enumeration)]
#[repr(i32)]
pub enum Protocol {
    /// In the mesh: reached through HBONE on port 15008.
    Hbone = 0,
    /// Not in the mesh: plain TCP passthrough.
    Tcp = 1,
}

#[derive(Clone, PartialEq, Message)]
pub struct Workload {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    #[prost(string, tag = "4")]
    pub service_account: String,
    #[prost(string, tag = "5")]
    pub trust_domain: String,
    /// 4 or 16 bytes each, network order.
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub ips: Vec<Vec<u8>>,
    #[prost(string, tag = "7")]
    pub node: String,
    #[prost(enumeration = "Protocol", tag = "8")]
    pub protocol: i32,
    /// Address (ip:port) of the waypoint that handles this workload's traffic, if any.
    #[prost(string, tag = "9")]
    pub waypoint: String,
    /// For pods on the publishing node: the network namespace the data plane enters to open
    /// the pod's listeners and sockets.
    #[prost(string, tag = "10")]
    pub netns_path: String,
    /// Sent for pods on the publishing node only: their policies are selected by label. Other
    /// pods need only their canonical names, below, and most of a snapshot's size and decode
    /// time went to labels no one read.
    #[prost(btree_map = "string, string", tag = "11")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// For pods on the publishing node enrolled through CNI: the agent hands their network
    /// namespace to the data plane as a descriptor (see `enrollment`), keyed by uid.
    #[prost(bool, tag = "12")]
    pub netns_from_agent: bool,
    /// Istio's canonical service and revision (metric labels), resolved from the pod's labels
    /// by [`canonical_names`]. Empty (a snapshot from an older agent): the reader resolves them
    /// from `labels`.
    #[prost(string, tag = "13")]
    pub canonical_service: String,
    #[prost(string, tag = "14")]
    pub canonical_revision: String,
    /// Istio's workload name (the `source_workload`/`destination_workload` metric labels):
    /// derived from the pod's owners by [`workload_name`], so a Deployment's pods share their
    /// Deployment's name. Empty (the same as `name`, a snapshot from an older agent, or an
    /// empty workload-name label): the reader uses `name`.
    #[prost(string, tag = "15")]
    pub workload_name: String,
    /// The hostname of this workload's waypoint when it has no address yet (its Gateway names
    /// a Service that does not exist, or has no cluster IP): the workload's traffic is refused
    /// until it has one, as ztunnel refuses it, rather than sent around the waypoint. Set only
    /// when `waypoint` is empty. A separate field so that an older reader, which ignores it,
    /// reads the rest of the snapshot as before.
    #[prost(string, tag = "16")]
    pub unresolved_waypoint: String,
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

/// The pod label that names a pod's workload outright, whatever its owners.
pub const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";

/// One entry of a pod's `metadata.ownerReferences`, as far as [`workload_name`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner<'a> {
    pub kind: &'a str,
    pub name: &'a str,
    /// `controller: true`: the owner that manages the pod.
    pub controller: bool,
}

/// Istio's workload name for a pod, as istiod derives it (`GetWorkloadMetaFromPod`): a pod
/// whose name was generated (`generate_name` set) is named after its first controlling
/// owner, less what the owner's own controller added (a Deployment's or Argo Rollout's
/// ReplicaSet hash, a CronJob's Job timestamp; an OpenShift DeploymentConfig's name is on the
/// pod). Otherwise, and when that leaves nothing, the pod's own name. The
/// `service.istio.io/workload-name` label, when present, overrides it all, as in Istio (an
/// empty one too).
pub fn workload_name<'a>(
    pod_name: &str,
    generate_name: &str,
    owners: impl IntoIterator<Item = Owner<'a>>,
    labels: &std::collections::BTreeMap<String, String>,
) -> String {
    if let Some(named) = labels.get(WORKLOAD_NAME_LABEL) {
        return named.clone();
    }
    let controller = owners
        .into_iter()
        .find(|o| o.controller)
        .filter(|_| !generate_name.is_empty());
    let derived = controller.map_or("", |owner| owner_workload(owner, labels));
    if derived.is_empty() {
        pod_name.to_owned()
    } else {
        derived.to_owned()
    }
}

/// The workload a controlling owner stands for (Istio's heuristics, in Istio's order).
fn owner_workload<'a>(
    owner: Owner<'a>,
    labels: &'a std::collections::BTreeMap<String, String>,
) -> &'a str {
    let label = |key: &str| labels.get(key).map_or("", String::as_str);
    // A ReplicaSet named `<parent>-<hash>`, the hash also on the pod: the parent made it.
    // Istio checks for the hash, then trims "-<hash>": a name that ends with the hash but
    // not with "-<hash>" is the parent's name whole.
    let less_hash = |hash: &str| {
        let rest = owner.name.strip_suffix(hash).filter(|_| !hash.is_empty())?;
        Some(rest.strip_suffix('-').unwrap_or(owner.name))
    };
    match owner.kind {
        "ReplicaSet" => less_hash(label("pod-template-hash"))
            .or_else(|| less_hash(label("rollouts-pod-template-hash")))
            .unwrap_or(owner.name),
        "ReplicationController" if !label("deploymentconfig").is_empty() => {
            label("deploymentconfig")
        }
        "Job" => cron_job(owner.name).unwrap_or(owner.name),
        _ => owner.name,
    }
}

/// The CronJob that made a Job named `<cronjob>-<8 to 10 digits>` (its scheduled time), as
/// Istio's `(.+)-\d{8,10}$`.
fn cron_job(job: &str) -> Option<&str> {
    let (prefix, stamp) = job.rsplit_once('-')?;
    let digits = (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit());
    (digits && !prefix.is_empty()).then_some(prefix)
}

#[derive(Clone, PartialEq, Message)]
pub struct ServicePort {
    #[prost(uint32, tag = "1")]
    pub port: u32,
    #[prost(uint32, tag = "2")]
    pub target_port: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct Service {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub hostname: String,
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub vips: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "5")]
    pub ports: Vec<ServicePort>,
    /// Workload uids backing the service.
    #[prost(string, repeated, tag = "6")]
    pub endpoints: Vec<String>,
    #[prost(string, tag = "7")]
    pub waypoint: String,
    /// As for workloads: the waypoint's hostname while it has no address.
    #[prost(string, tag = "8")]
    pub unresolved_waypoint: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, prost::Enumeration)]
#[repr(i32)]
pub enum Action {
    Allow = 0,
    Deny = 1,
    Audit = 2,
}

/// An Istio `AuthorizationPolicy` with its L4-relevant fields, plus the L7 fields kept so the
/// data plane can tell that a rule cannot be checked at L4.
#[derive(Clone, PartialEq, Message)]
pub struct AuthorizationPolicy {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(enumeration = "Action", tag = "3")]
    pub action: i32,
    /// Empty: the whole namespace (or the mesh, in the root namespace).
    #[prost(btree_map = "string, string", tag = "4")]
    pub selector: std::collections::BTreeMap<String, String>,
    #[prost(message, repeated, tag = "5")]
    pub rules: Vec<Rule>,
    #[prost(bool, tag = "6")]
    pub dry_run: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct Rule {
    #[prost(message, repeated, tag = "1")]
    pub from: Vec<RuleSource>,
    #[prost(message, repeated, tag = "2")]
    pub to: Vec<RuleOperation>,
    #[prost(message, repeated, tag = "3")]
    pub when: Vec<Condition>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RuleSource {
    #[prost(string, repeated, tag = "1")]
    pub principals: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub not_principals: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    pub namespaces: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    pub not_namespaces: Vec<String>,
    #[prost(string, repeated, tag = "5")]
    pub ip_blocks: Vec<String>,
    #[prost(string, repeated, tag = "6")]
    pub not_ip_blocks: Vec<String>,
    #[prost(string, repeated, tag = "7")]
    pub remote_ip_blocks: Vec<String>,
    #[prost(string, repeated, tag = "8")]
    pub not_remote_ip_blocks: Vec<String>,
    /// L7 (JWT) fields: present means the rule cannot be evaluated at L4.
    #[prost(string, repeated, tag = "9")]
    pub request_principals: Vec<String>,
    #[prost(string, repeated, tag = "10")]
    pub not_request_principals: Vec<String>,
    /// "namespace/name" or "name" (in the policy's namespace).
    #[prost(string, repeated, tag = "11")]
    pub service_accounts: Vec<String>,
    #[prost(string, repeated, tag = "12")]
    pub not_service_accounts: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RuleOperation {
    #[prost(string, repeated, tag = "1")]
    pub ports: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub not_ports: Vec<String>,
    /// L7 fields: present means the rule cannot be evaluated at L4.
    #[prost(string, repeated, tag = "3")]
    pub hosts: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    pub not_hosts: Vec<String>,
    #[prost(string, repeated, tag = "5")]
    pub methods: Vec<String>,
    #[prost(string, repeated, tag = "6")]
    pub not_methods: Vec<String>,
    #[prost(string, repeated, tag = "7")]
    pub paths: Vec<String>,
    #[prost(string, repeated, tag = "8")]
    pub not_paths: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Condition {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, repeated, tag = "2")]
    pub values: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    pub not_values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, prost::Enumeration)]
#[repr(i32)]
pub enum MtlsMode {
    Unset = 0,
    Permissive = 1,
    Strict = 2,
    Disable = 3,
}

#[derive(Clone, PartialEq, Message)]
pub struct PeerAuthentication {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(btree_map = "string, string", tag = "3")]
    pub selector: std::collections::BTreeMap<String, String>,
    #[prost(enumeration = "MtlsMode", tag = "4")]
    pub mode: i32,
    /// Per-port overrides (workload-selector policies only), values are `MtlsMode`.
    #[prost(btree_map = "uint32, enumeration(MtlsMode)", tag = "5")]
    pub port_level_mtls: std::collections::BTreeMap<u32, i32>,
    /// Creation time (Unix seconds; Kubernetes' `creationTimestamp`): of several at one scope
    /// the oldest applies, as in Istio. Absent from a file source and from older agents; a
    /// reader that ignores it settles by name alone, so no version bump.
    #[prost(int64, optional, tag = "6")]
    pub created_unix: Option<i64>,
}

/// A workload identity's certificate chain (DER, leaf first) and private key (PKCS#8 DER).
/// The key never leaves the region: not in logs, not in the admin dump.
#[derive(Clone, PartialEq, Message)]
pub struct Identity {
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub cert_chain: Vec<Vec<u8>>,
    #[prost(bytes = "vec", tag = "3")]
    pub private_key: Vec<u8>,
    #[prost(int64, tag = "4")]
    pub not_before_unix: i64,
    #[prost(int64, tag = "5")]
    pub not_after_unix: i64,
}

/// Encodes a snapshot, stamping the schema version.
pub fn encode(snapshot: &Snapshot) -> Vec<u8> {
    let mut stamped = snapshot.clone();
    stamped.schema_version = SCHEMA_VERSION;
    stamped.encode_to_vec()
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("snapshot payload is not valid protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// What the in-place reader (`view`) found wrong, in prost's words.
    #[error("snapshot payload is not valid protobuf: {0}")]
    Malformed(&'static str),
    #[error(
        "snapshot schema version {found} is not {SCHEMA_VERSION}, which this build understands"
    )]
    Version { found: u32 },
}

/// Decodes and checks the schema version.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, DecodeError> {
    let snapshot = Snapshot::decode(bytes)?;
    if snapshot.schema_version != SCHEMA_VERSION {
        return Err(DecodeError::Version {
            found: snapshot.schema_version,
        });
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Snapshot {
        Snapshot {
            node: "node-1".into(),
            workloads: vec![Workload {
                uid: "uid-1".into(),
                name: "client".into(),
                namespace: "default".into(),
                service_account: "client".into(),
                trust_domain: "cluster.local".into(),
                ips: vec![vec![10, 0, 0, 1]],
                node: "node-1".into(),
                protocol: Protocol::Hbone as i32,
                netns_path: "/run/netns/client".into(),
                workload_name: "client-app".into(),
                ..Default::default()
            }],
            services: vec![Service {
                name: "server".into(),
                namespace: "default".into(),
                vips: vec![vec![10, 96, 0, 1]],
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                }],
                endpoints: vec!["uid-1".into()],
                ..Default::default()
            }],
            trust_roots: vec![vec![0x30, 0x03, 1, 2, 3]],
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let s = sample();
        let decoded = decode(&encode(&s)).expect("decodes");
        assert_eq!(decoded.schema_version, SCHEMA_VERSION);
        assert_eq!(
            Snapshot {
                schema_version: 0,
                ..decoded
            },
            s
        );
    }

    #[test]
    fn other_schema_version_is_refused() {
        let mut s = sample();
        s.schema_version = SCHEMA_VERSION + 1;
        let bytes = s.encode_to_vec();
        assert!(matches!(
            decode(&bytes),
            Err(DecodeError::Version { found }) if found == SCHEMA_VERSION + 1
        ));
    }

    /// Istio's workload names (`GetWorkloadMetaFromPod`) for the pods its controllers make.
    #[test]
    fn a_pods_workload_name_comes_from_its_controlling_owner_as_in_istio() {
        let controls = |kind, name| Owner {
            kind,
            name,
            controller: true,
        };
        let generated = "pod-";
        // What, generateName, ownerReferences, pod labels, workload name.
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a [Owner<'a>],
            &'a [(&'a str, &'a str)],
            &'a str,
        );
        #[rustfmt::skip]
        let cases: &[Case<'_>] = &[
            ("a Deployment's pod: its ReplicaSet less the template hash",
             generated, &[controls("ReplicaSet", "cart-7d9f8b6c5")],
             &[("pod-template-hash", "7d9f8b6c5")], "cart"),
            ("an Argo Rollout's pod: its ReplicaSet less the rollout's hash",
             generated, &[controls("ReplicaSet", "web-6b7c8d9f")],
             &[("rollouts-pod-template-hash", "6b7c8d9f")], "web"),
            ("a ReplicaSet whose name does not end with the pod's hash keeps its name",
             generated, &[controls("ReplicaSet", "cart-7d9f8b6c5")],
             &[("pod-template-hash", "abc")], "cart-7d9f8b6c5"),
            ("a hash not after a dash is found but not trimmed, as in Istio",
             generated, &[controls("ReplicaSet", "cart7d9f8b6c5")],
             &[("pod-template-hash", "7d9f8b6c5"), ("rollouts-pod-template-hash", "5c6b")],
             "cart7d9f8b6c5"),
            ("a ReplicaSet of its own keeps its name",
             generated, &[controls("ReplicaSet", "cart-rs")], &[], "cart-rs"),
            ("an OpenShift DeploymentConfig's pod: named by its deploymentconfig label",
             generated, &[controls("ReplicationController", "api-3")],
             &[("deploymentconfig", "api")], "api"),
            ("a ReplicationController without that label keeps its name",
             generated, &[controls("ReplicationController", "api-3")], &[], "api-3"),
            ("a CronJob's pod: its Job less the scheduled time",
             generated, &[controls("Job", "backup-29012345")], &[], "backup"),
            ("ten digits are still a CronJob's time",
             generated, &[controls("Job", "backup-1790123456")], &[], "backup"),
            ("a plain Job keeps its name",
             generated, &[controls("Job", "migrate")], &[], "migrate"),
            ("seven digits are not a CronJob's time",
             generated, &[controls("Job", "migrate-1234567")], &[], "migrate-1234567"),
            ("eleven digits are not either",
             generated, &[controls("Job", "migrate-12345678901")], &[], "migrate-12345678901"),
            ("a StatefulSet's pod: the StatefulSet",
             generated, &[controls("StatefulSet", "db")], &[], "db"),
            ("a DaemonSet's pod: the DaemonSet",
             generated, &[controls("DaemonSet", "agent")], &[], "agent"),
            ("a name not generated is the pod's own, whatever owns it",
             "", &[controls("ReplicaSet", "cart-7d9f8b6c5")],
             &[("pod-template-hash", "7d9f8b6c5")], "the-pod"),
            ("an owner that is not its controller is not read",
             generated,
             &[Owner { kind: "ReplicaSet", name: "other", controller: false },
               controls("StatefulSet", "db")], &[], "db"),
            ("no controller at all: the pod's name",
             generated, &[Owner { kind: "ReplicaSet", name: "other", controller: false }],
             &[], "the-pod"),
            ("no owner: the pod's name", generated, &[], &[], "the-pod"),
            ("an owner that leaves nothing: the pod's name",
             generated, &[controls("ReplicaSet", "-7d9f8b6c5")],
             &[("pod-template-hash", "7d9f8b6c5")], "the-pod"),
            ("Istio's workload-name label over everything",
             generated, &[controls("ReplicaSet", "cart-7d9f8b6c5")],
             &[("pod-template-hash", "7d9f8b6c5"), (WORKLOAD_NAME_LABEL, "checkout")],
             "checkout"),
            ("an empty label too, as in Istio (the snapshot then says: the pod's name)",
             generated, &[controls("StatefulSet", "db")], &[(WORKLOAD_NAME_LABEL, "")], ""),
            ("the label on a pod with no owner", "", &[], &[(WORKLOAD_NAME_LABEL, "checkout")],
             "checkout"),
        ];
        for (what, generate_name, owners, labels, expected) in cases {
            let labels = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            let name = workload_name("the-pod", generate_name, owners.iter().copied(), &labels);
            assert_eq!(name, *expected, "{what}");
        }
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        for bytes in [&[0xff_u8; 16][..], &[0x1a, 0xff, 0xff, 0xff, 0x0f], &[0x0a]] {
            assert!(decode(bytes).is_err(), "{bytes:?}");
        }
    }
}
