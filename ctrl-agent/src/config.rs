//! The embedded default source: a local YAML file listing workloads, services, policies and
//! peer authentication, shaped like the Kubernetes and Istio objects they stand for.
//!
//! Parsing is strict (unknown fields are errors, so a typo does not silently mean "default")
//! and every error names the field: `workloads[2].ips[0]: invalid IP address syntax`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use mesh_core::identity::SpiffeId;
use serde::Deserialize;

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileConfig {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Istio's root namespace: policies there without a selector apply mesh-wide.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// Namespaces and their labels (`istio.io/dataplane-mode: ambient` enrolls their pods).
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    /// Shared: the Kubernetes model reuses the specs of pods that did not change, and the
    /// agent tells an unchanged pod by pointer before comparing.
    #[serde(default)]
    pub workloads: Vec<Arc<WorkloadSpec>>,
    /// Shared like the workloads: a service whose object, slices and endpoints did not
    /// change keeps its spec.
    #[serde(default)]
    pub services: Vec<Arc<ServiceSpec>>,
    #[serde(default)]
    pub policies: Vec<PolicySpec>,
    #[serde(default)]
    pub peer_authentications: Vec<PeerAuthenticationSpec>,
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.into()
}
fn default_root_namespace() -> String {
    mesh_core::authz::DEFAULT_ROOT_NAMESPACE.into()
}
fn default_namespace() -> String {
    "default".into()
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamespaceSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum ProtocolSpec {
    #[default]
    Hbone,
    Tcp,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    pub uid: String,
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_namespace")]
    pub service_account: String,
    /// Defaults to the file's trust domain.
    pub trust_domain: Option<String>,
    /// May be empty for pods on this node enrolled through CNI: CNI reports their addresses.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    pub node: String,
    #[serde(default)]
    pub protocol: ProtocolSpec,
    /// For pods on this node: their network namespace (e.g. /run/netns/pod-a).
    pub netns: Option<PathBuf>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The waypoint that takes traffic addressed to this pod's own address.
    pub waypoint: Option<WaypointSpec>,
    /// The pod runs Istio's sidecar (Kubernetes: the `sidecar.istio.io/status` annotation):
    /// the sidecar captures its traffic, so ambient does not, whatever the labels say.
    #[serde(default)]
    pub sidecar: bool,
    /// Kubernetes only (`metadata.generateName` and `metadata.ownerReferences`): what Istio
    /// derives the pod's workload name from (`schema::workload_name`). A file's workloads
    /// have no owners: their workload name is their workload-name label, else their name.
    #[serde(skip)]
    pub generate_name: String,
    #[serde(skip)]
    pub owner_references: Vec<OwnerReferenceSpec>,
    /// Kubernetes only: the pod carries Istio's `ambient.istio.io/redirection: enabled`,
    /// which the agent keeps in step with whether it captures the pod.
    #[serde(skip)]
    pub redirection_annotated: bool,
}

/// One of a pod's owners (`metadata.ownerReferences`), as far as Istio reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnerReferenceSpec {
    pub kind: String,
    pub name: String,
    /// `controller: true`: the owner that manages the pod.
    pub controller: bool,
}

impl OwnerReferenceSpec {
    pub fn as_owner(&self) -> mesh_snapshot::schema::Owner<'_> {
        mesh_snapshot::schema::Owner {
            kind: &self.kind,
            name: &self.name,
            controller: self.controller,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePortSpec {
    pub port: u16,
    pub target_port: Option<u16>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub hostname: Option<String>,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePortSpec>,
    /// Workload uids.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The waypoint that takes traffic addressed to this service's VIPs (as for workloads).
    pub waypoint: Option<WaypointSpec>,
}

/// A waypoint as a workload or service names it: `ip:port`, a waypoint service's VIP (or a
/// waypoint pod's address) and its HBONE port; or a hostname (`wp.ns.svc.cluster.local`)
/// for a waypoint that has no address yet, whose traffic is refused until it has one, as
/// ztunnel refuses it (the Kubernetes source names one so when a Gateway's address names a
/// Service that does not exist).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(try_from = "String")]
pub enum WaypointSpec {
    At(SocketAddr),
    Unresolved(String),
}

impl TryFrom<String> for WaypointSpec {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if let Ok(address) = text.parse::<SocketAddr>() {
            if address.port() == 0 {
                return Err(format!("{text:?}: port 0 is no waypoint's"));
            }
            return Ok(WaypointSpec::At(address));
        }
        // A dotted name whose last label is not all digits, so that an address missing its
        // port (`10.96.0.20`) is an error rather than a waypoint that refuses everything.
        let label_ok = |label: &str| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        let is_hostname = text.len() <= 253
            && text.split('.').all(label_ok)
            && text
                .rsplit('.')
                .next()
                .is_some_and(|last| !last.bytes().all(|b| b.is_ascii_digit()));
        if is_hostname {
            Ok(WaypointSpec::Unresolved(text))
        } else {
            Err(format!("{text:?} is neither ip:port nor a hostname"))
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum ActionSpec {
    #[default]
    Allow,
    Deny,
    Audit,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SelectorSpec {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// An Istio AuthorizationPolicy (security.istio.io/v1), carried to the data plane.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub action: ActionSpec,
    pub selector: Option<SelectorSpec>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    #[serde(default)]
    pub from: Vec<FromSpec>,
    #[serde(default)]
    pub to: Vec<ToSpec>,
    #[serde(default)]
    pub when: Vec<ConditionSpec>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FromSpec {
    pub source: SourceSpec,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ToSpec {
    pub operation: OperationSpec,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SourceSpec {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    /// "namespace/name", or "name" in the policy's namespace.
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OperationSpec {
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConditionSpec {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsModeSpec {
    #[default]
    Unset,
    Permissive,
    Strict,
    Disable,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MtlsSpec {
    #[serde(default)]
    pub mode: MtlsModeSpec,
}

/// An Istio PeerAuthentication, carried to the data plane.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub selector: Option<SelectorSpec>,
    #[serde(default)]
    pub mtls: MtlsSpec,
    /// Per-port overrides; only meaningful with a workload selector (as in Istio).
    #[serde(default)]
    pub port_level_mtls: BTreeMap<u16, MtlsSpec>,
    /// Unix seconds of the object's creation (Kubernetes only; a file has none): of several
    /// at one scope the oldest applies, as in Istio. Not a file field.
    #[serde(skip)]
    pub created_unix: Option<i64>,
}

/// A config problem, with the path of the field it is about.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

fn err(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        problem: problem.into(),
    }
}

impl FileConfig {
    /// Parses and validates YAML text.
    pub fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let config: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "(file)".into() } else { path };
            let message = e.into_inner().to_string();
            // serde_yaml repeats the path in its message ("workloads[0]: unknown field");
            // the field is already named, so keep only the problem.
            let problem = match message.split_once(": ") {
                Some((prefix, rest)) if !prefix.contains(' ') => rest.to_owned(),
                _ => message,
            };
            err(field, problem)
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The SPIFFE identity of a workload (validated by `validate`).
    pub fn identity(&self, w: &WorkloadSpec) -> Result<SpiffeId, ConfigError> {
        let td = w.trust_domain.as_deref().unwrap_or(&self.trust_domain);
        SpiffeId::new(td, &w.namespace, &w.service_account)
            .map_err(|e| err(format!("workloads[uid={}]", w.uid), e.to_string()))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut uids = HashSet::new();
        let mut ip_owner: HashMap<IpAddr, &str> = HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let at = |field: &str| format!("workloads[{i}].{field}");
            if w.uid.is_empty() {
                return Err(err(at("uid"), "must not be empty"));
            }
            if !uids.insert(w.uid.as_str()) {
                return Err(err(
                    at("uid"),
                    format!("{:?} is used by another workload", w.uid),
                ));
            }
            if w.name.is_empty() {
                return Err(err(at("name"), "must not be empty"));
            }
            if w.node.is_empty() {
                return Err(err(at("node"), "must not be empty"));
            }
            let td = w.trust_domain.as_deref().unwrap_or(&self.trust_domain);
            if let Err(e) = SpiffeId::new(td, &w.namespace, &w.service_account) {
                let field = match e {
                    mesh_core::identity::SpiffeIdError::TrustDomain(_) => "trustDomain",
                    mesh_core::identity::SpiffeIdError::Segment {
                        field: "namespace", ..
                    } => "namespace",
                    _ => "serviceAccount",
                };
                return Err(err(at(field), e.to_string()));
            }
            for (j, ip) in w.ips.iter().enumerate() {
                if let Some(other) = ip_owner.insert(*ip, &w.uid) {
                    return Err(err(
                        format!("workloads[{i}].ips[{j}]"),
                        format!("{ip} is also the address of workload {other:?}"),
                    ));
                }
            }
            if let Some(ns) = &w.netns {
                if !ns.is_absolute() {
                    return Err(err(
                        at("netns"),
                        format!("{} is not an absolute path", ns.display()),
                    ));
                }
            }
        }
        // A service is named by namespace and name in the snapshot and in its deltas.
        let mut service_names = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = |field: &str| format!("services[{i}].{field}");
            if s.name.is_empty() {
                return Err(err(at("name"), "must not be empty"));
            }
            if !service_names.insert((s.namespace.as_str(), s.name.as_str())) {
                return Err(err(
                    at("name"),
                    format!(
                        "{}/{} is already the name of another service",
                        s.namespace, s.name
                    ),
                ));
            }
            if s.vips.is_empty() {
                return Err(err(at("vips"), "a service needs at least one VIP"));
            }
            if s.ports.is_empty() {
                return Err(err(at("ports"), "a service needs at least one port"));
            }
            for (j, p) in s.ports.iter().enumerate() {
                if p.port == 0 {
                    return Err(err(
                        format!("services[{i}].ports[{j}].port"),
                        "must be 1-65535",
                    ));
                }
                if p.target_port == Some(0) {
                    return Err(err(
                        format!("services[{i}].ports[{j}].targetPort"),
                        "must be 1-65535",
                    ));
                }
            }
            for (j, uid) in s.endpoints.iter().enumerate() {
                if !uids.contains(uid.as_str()) {
                    return Err(err(
                        format!("services[{i}].endpoints[{j}]"),
                        format!("no workload has uid {uid:?}"),
                    ));
                }
            }
        }
        for (i, p) in self.policies.iter().enumerate() {
            p.check()
                .map_err(|e| err(format!("policies[{i}].{}", e.field), e.problem))?;
        }
        for (i, pa) in self.peer_authentications.iter().enumerate() {
            pa.check()
                .map_err(|e| err(format!("peerAuthentications[{i}].{}", e.field), e.problem))?;
        }
        Ok(())
    }
}

impl PolicySpec {
    /// Checks what the data plane relies on (port numbers, address blocks, in fields and in
    /// `when` values). The field is relative to the policy, so each source can say where the
    /// policy came from.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(err("name", "must not be empty"));
        }
        for (r, rule) in self.rules.iter().enumerate() {
            for (t, to) in rule.to.iter().enumerate() {
                for (field, ports) in [
                    ("ports", &to.operation.ports),
                    ("notPorts", &to.operation.not_ports),
                ] {
                    for (k, port) in ports.iter().enumerate() {
                        if !is_port(port) {
                            return Err(err(
                                format!("rules[{r}].to[{t}].operation.{field}[{k}]"),
                                format!("{port:?} is not a port number"),
                            ));
                        }
                    }
                }
            }
            for (f, from) in rule.from.iter().enumerate() {
                let s = &from.source;
                for (field, blocks) in [
                    ("ipBlocks", &s.ip_blocks),
                    ("notIpBlocks", &s.not_ip_blocks),
                    ("remoteIpBlocks", &s.remote_ip_blocks),
                    ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                ] {
                    for (k, block) in blocks.iter().enumerate() {
                        if !is_ip_block(block) {
                            return Err(err(
                                format!("rules[{r}].from[{f}].source.{field}[{k}]"),
                                format!("{block:?} is not an address or CIDR block"),
                            ));
                        }
                    }
                }
            }
            for (w, condition) in rule.when.iter().enumerate() {
                condition
                    .check()
                    .map_err(|e| err(format!("rules[{r}].when[{w}].{}", e.field), e.problem))?;
            }
        }
        Ok(())
    }
}

impl ConditionSpec {
    /// Istio's checks of a `when` condition, for the keys whose values have a syntax. A
    /// value the data plane could not read would otherwise stop constraining the rule.
    fn check(&self) -> Result<(), ConfigError> {
        if self.values.is_empty() && self.not_values.is_empty() {
            return Err(err(
                "values",
                format!("{:?} needs values or notValues (as in Istio)", self.key),
            ));
        }
        let (valid, what): (fn(&str) -> bool, &str) = match self.key.as_str() {
            "source.ip" | "destination.ip" | "remote.ip" => {
                (is_ip_block, "is not an address or CIDR block")
            }
            "destination.port" => (is_port, "is not a port number"),
            _ => return Ok(()),
        };
        for (field, values) in [("values", &self.values), ("notValues", &self.not_values)] {
            if let Some((k, value)) = values.iter().enumerate().find(|(_, v)| !valid(v)) {
                return Err(err(format!("{field}[{k}]"), format!("{value:?} {what}")));
            }
        }
        Ok(())
    }
}

impl PeerAuthenticationSpec {
    /// As `PolicySpec::check`.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(err("name", "must not be empty"));
        }
        let has_selector = self
            .selector
            .as_ref()
            .is_some_and(|s| !s.match_labels.is_empty());
        if !self.port_level_mtls.is_empty() && !has_selector {
            return Err(err(
                "portLevelMtls",
                "needs a workload selector (as in Istio)",
            ));
        }
        if self.port_level_mtls.contains_key(&0) {
            return Err(err("portLevelMtls", "port 0 is not a port"));
        }
        Ok(())
    }
}

fn is_port(s: &str) -> bool {
    matches!(s.parse::<u16>(), Ok(n) if n > 0)
}

fn is_ip_block(s: &str) -> bool {
    match s.split_once('/') {
        None => s.parse::<IpAddr>().is_ok(),
        Some((ip, len)) => match (ip.parse::<IpAddr>(), len.parse::<u8>()) {
            (Ok(IpAddr::V4(_)), Ok(l)) => l <= 32,
            (Ok(IpAddr::V6(_)), Ok(l)) => l <= 128,
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests;
