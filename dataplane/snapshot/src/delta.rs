//! A change between two snapshots: what the region's log carries, so that a one-pod change
//! costs one small record instead of a re-encode of the world.
//!
//! Every collection is keyed (workloads by uid, services, policies and peer authentications by
//! namespace/name, identities by SPIFFE id): a delta lists the entries that were added or
//! changed (complete, replacing the old entry) and the keys that were removed. Removals apply
//! first. Changes to the snapshot's node or root namespace are not deltas: they change how
//! everything else is read, so they go out as a complete snapshot.

use std::collections::BTreeMap;

use prost::Message;

use crate::schema::{
    AuthorizationPolicy, DecodeError, Identity, PeerAuthentication, Service, Snapshot, Workload,
    SCHEMA_VERSION,
};

#[derive(Clone, PartialEq, Message)]
pub struct Delta {
    #[prost(uint32, tag = "1")]
    pub schema_version: u32,
    #[prost(message, repeated, tag = "2")]
    pub workloads: Vec<Workload>,
    #[prost(string, repeated, tag = "3")]
    pub removed_workloads: Vec<String>,
    #[prost(message, repeated, tag = "4")]
    pub services: Vec<Service>,
    /// `namespace/name`.
    #[prost(string, repeated, tag = "5")]
    pub removed_services: Vec<String>,
    #[prost(message, repeated, tag = "6")]
    pub policies: Vec<AuthorizationPolicy>,
    #[prost(string, repeated, tag = "7")]
    pub removed_policies: Vec<String>,
    #[prost(message, repeated, tag = "8")]
    pub peer_authentications: Vec<PeerAuthentication>,
    #[prost(string, repeated, tag = "9")]
    pub removed_peer_authentications: Vec<String>,
    #[prost(message, repeated, tag = "10")]
    pub identities: Vec<Identity>,
    #[prost(string, repeated, tag = "11")]
    pub removed_identities: Vec<String>,
    /// Set when `trust_roots` replaces the snapshot's roots (an empty list is meaningful).
    #[prost(bool, tag = "12")]
    pub replace_trust_roots: bool,
    #[prost(bytes = "vec", repeated, tag = "13")]
    pub trust_roots: Vec<Vec<u8>>,
    /// New provenance for humans; empty leaves it as it was.
    #[prost(string, tag = "14")]
    pub source: String,
}

impl Delta {
    /// Number of entries it adds, changes or removes (trust roots count as one).
    pub fn len(&self) -> usize {
        self.workloads.len()
            + self.removed_workloads.len()
            + self.services.len()
            + self.removed_services.len()
            + self.policies.len()
            + self.removed_policies.len()
            + self.peer_authentications.len()
            + self.removed_peer_authentications.len()
            + self.identities.len()
            + self.removed_identities.len()
            + usize::from(self.replace_trust_roots)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Entries added or changed, and keys removed: what a caller that knows which entries of a
/// collection changed hands over instead of the whole collection.
#[derive(Clone, Debug, PartialEq)]
pub struct Changes<T> {
    pub changed: Vec<T>,
    pub removed: Vec<String>,
}

impl<T> Default for Changes<T> {
    fn default() -> Self {
        Changes {
            changed: Vec::new(),
            removed: Vec::new(),
        }
    }
}

impl<T> Changes<T> {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }
}

pub fn workload_key(w: &Workload) -> String {
    w.uid.clone()
}

/// How deltas name a namespaced entry.
pub fn namespaced_key(namespace: &str, name: &str) -> String {
    let mut key = String::with_capacity(namespace.len() + 1 + name.len());
    write_namespaced_key(&mut key, namespace, name);
    key
}

/// [`namespaced_key`] into `key` (cleared first), for a caller that makes many in a row.
pub fn write_namespaced_key(key: &mut String, namespace: &str, name: &str) {
    key.clear();
    key.push_str(namespace);
    key.push('/');
    key.push_str(name);
}

pub fn service_key(s: &Service) -> String {
    namespaced_key(&s.namespace, &s.name)
}

pub fn policy_key(p: &AuthorizationPolicy) -> String {
    namespaced_key(&p.namespace, &p.name)
}

pub fn peer_authentication_key(p: &PeerAuthentication) -> String {
    namespaced_key(&p.namespace, &p.name)
}

pub fn identity_key(i: &Identity) -> String {
    i.spiffe_id.clone()
}

/// A complete snapshot held as keyed maps, so that a delta applies in O(changes) and two states
/// diff in one ordered walk. What the agent keeps of what it published.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    pub node: String,
    pub root_namespace: String,
    pub source: String,
    pub trust_roots: Vec<Vec<u8>>,
    pub workloads: BTreeMap<String, Workload>,
    pub services: BTreeMap<String, Service>,
    pub policies: BTreeMap<String, AuthorizationPolicy>,
    pub peer_authentications: BTreeMap<String, PeerAuthentication>,
    pub identities: BTreeMap<String, Identity>,
}

fn keyed<T>(items: Vec<T>, key: impl Fn(&T) -> String) -> BTreeMap<String, T> {
    items.into_iter().map(|t| (key(&t), t)).collect()
}

impl From<Snapshot> for State {
    /// Of entries sharing a key, the last wins (as applying them one by one would).
    fn from(s: Snapshot) -> State {
        State {
            node: s.node,
            root_namespace: s.root_namespace,
            source: s.source,
            trust_roots: s.trust_roots,
            workloads: keyed(s.workloads, workload_key),
            services: keyed(s.services, service_key),
            policies: keyed(s.policies, policy_key),
            peer_authentications: keyed(s.peer_authentications, peer_authentication_key),
            identities: keyed(s.identities, identity_key),
        }
    }
}

/// Entries of `new` that are absent from or different in `old`, and keys of `old` missing
/// from `new`: one merge of two ordered maps.
fn diff_keyed<T: PartialEq + Clone>(
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
) -> (Vec<T>, Vec<String>) {
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    let mut old_entries = old.iter().peekable();
    for (key, value) in new {
        while let Some((k, _)) = old_entries.next_if(|(k, _)| *k < key) {
            removed.push(k.clone());
        }
        match old_entries.next_if(|(k, _)| *k == key) {
            Some((_, before)) if before == value => {}
            _ => changed.push(value.clone()),
        }
    }
    removed.extend(old_entries.map(|(k, _)| k.clone()));
    (changed, removed)
}

/// `changes` less what would not change `held`: entries it holds as they are, removals of
/// keys it lacks.
fn effective<T: PartialEq>(
    held: &BTreeMap<String, T>,
    changes: Changes<T>,
    key: impl Fn(&T) -> String,
) -> Changes<T> {
    Changes {
        changed: changes
            .changed
            .into_iter()
            .filter(|t| held.get(&key(t)) != Some(t))
            .collect(),
        removed: changes
            .removed
            .into_iter()
            .filter(|k| held.contains_key(k))
            .collect(),
    }
}

fn apply_keyed<T: Clone>(
    entries: &mut BTreeMap<String, T>,
    changed: &[T],
    removed: &[String],
    key: impl Fn(&T) -> String,
) {
    for k in removed {
        entries.remove(k);
    }
    for t in changed {
        entries.insert(key(t), t.clone());
    }
}

impl State {
    /// The complete snapshot, entries in key order.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            schema_version: SCHEMA_VERSION,
            node: self.node.clone(),
            root_namespace: self.root_namespace.clone(),
            source: self.source.clone(),
            trust_roots: self.trust_roots.clone(),
            workloads: self.workloads.values().cloned().collect(),
            services: self.services.values().cloned().collect(),
            policies: self.policies.values().cloned().collect(),
            peer_authentications: self.peer_authentications.values().cloned().collect(),
            identities: self.identities.values().cloned().collect(),
        }
    }

    /// The delta that turns `self` into `new`, or `None` when only a complete snapshot can
    /// (the node or root namespace changed).
    pub fn diff(&self, new: &State) -> Option<Delta> {
        let (changed, removed) = diff_keyed(&self.workloads, &new.workloads);
        let workloads = Changes { changed, removed };
        let (changed, removed) = diff_keyed(&self.services, &new.services);
        self.diff_with(new, workloads, Changes { changed, removed })
    }

    /// As `diff`, but the workload and service changes are given by a caller that knows which
    /// pods and services changed, so that it need not rebuild all of them to have them
    /// compared; `new`'s own workloads and services are not read. Changes equal to what
    /// `self` holds, and removals of what it lacks, are left out.
    pub fn diff_with_changes(
        &self,
        new: &State,
        workloads: Changes<Workload>,
        services: Changes<Service>,
    ) -> Option<Delta> {
        let workloads = effective(&self.workloads, workloads, workload_key);
        let services = effective(&self.services, services, service_key);
        self.diff_with(new, workloads, services)
    }

    fn diff_with(
        &self,
        new: &State,
        workloads: Changes<Workload>,
        services: Changes<Service>,
    ) -> Option<Delta> {
        if self.node != new.node || self.root_namespace != new.root_namespace {
            return None;
        }
        let Changes {
            changed: workloads,
            removed: removed_workloads,
        } = workloads;
        let Changes {
            changed: services,
            removed: removed_services,
        } = services;
        let (policies, removed_policies) = diff_keyed(&self.policies, &new.policies);
        let (peer_authentications, removed_peer_authentications) =
            diff_keyed(&self.peer_authentications, &new.peer_authentications);
        let (identities, removed_identities) = diff_keyed(&self.identities, &new.identities);
        let replace_trust_roots = self.trust_roots != new.trust_roots;
        Some(Delta {
            schema_version: SCHEMA_VERSION,
            workloads,
            removed_workloads,
            services,
            removed_services,
            policies,
            removed_policies,
            peer_authentications,
            removed_peer_authentications,
            identities,
            removed_identities,
            replace_trust_roots,
            trust_roots: if replace_trust_roots {
                new.trust_roots.clone()
            } else {
                Vec::new()
            },
            source: if self.source != new.source {
                new.source.clone()
            } else {
                String::new()
            },
        })
    }

    /// Applies `delta`: removals first, then additions and changes.
    pub fn apply(&mut self, delta: &Delta) {
        apply_keyed(
            &mut self.workloads,
            &delta.workloads,
            &delta.removed_workloads,
            workload_key,
        );
        apply_keyed(
            &mut self.services,
            &delta.services,
            &delta.removed_services,
            service_key,
        );
        apply_keyed(
            &mut self.policies,
            &delta.policies,
            &delta.removed_policies,
            policy_key,
        );
        apply_keyed(
            &mut self.peer_authentications,
            &delta.peer_authentications,
            &delta.removed_peer_authentications,
            peer_authentication_key,
        );
        apply_keyed(
            &mut self.identities,
            &delta.identities,
            &delta.removed_identities,
            identity_key,
        );
        if delta.replace_trust_roots {
            self.trust_roots = delta.trust_roots.clone();
        }
        if !delta.source.is_empty() {
            self.source = delta.source.clone();
        }
    }
}

/// The delta that turns `old` into `new`, or `None` when only a complete snapshot can (the
/// node or root namespace changed).
pub fn diff(old: &Snapshot, new: &Snapshot) -> Option<Delta> {
    State::from(old.clone()).diff(&State::from(new.clone()))
}

/// The complete state a read amounts to: `base` (or `held`, what the reader had, when the
/// read brought no base) with every delta applied in order. `None` when there is nothing to
/// apply the deltas to.
pub fn replay(
    held: Option<State>,
    base: Option<&crate::Published>,
    deltas: &[crate::Published],
) -> Result<Option<State>, DecodeError> {
    let mut state = match base {
        Some(base) => State::from(crate::schema::decode(&base.payload)?),
        None => match held {
            Some(held) => held,
            None => return Ok(None),
        },
    };
    for d in deltas {
        state.apply(&decode(&d.payload)?);
    }
    Ok(Some(state))
}

/// Encodes a delta, stamping the schema version.
pub fn encode(delta: &Delta) -> Vec<u8> {
    let mut stamped = delta.clone();
    stamped.schema_version = SCHEMA_VERSION;
    stamped.encode_to_vec()
}

/// Decodes and checks the schema version.
pub fn decode(bytes: &[u8]) -> Result<Delta, DecodeError> {
    let delta = Delta::decode(bytes)?;
    if delta.schema_version != SCHEMA_VERSION {
        return Err(DecodeError::Version {
            found: delta.schema_version,
        });
    }
    Ok(delta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Action, Protocol};

    fn workload(uid: &str, ip: u8) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "default".into(),
            service_account: "sa".into(),
            trust_domain: "cluster.local".into(),
            ips: vec![vec![10, 0, 0, ip]],
            node: "n1".into(),
            protocol: Protocol::Hbone as i32,
            ..Default::default()
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            node: "n1".into(),
            workloads: (1..=5).map(|i| workload(&format!("w{i}"), i)).collect(),
            services: vec![Service {
                name: "svc".into(),
                namespace: "default".into(),
                endpoints: vec!["w1".into(), "w2".into()],
                ..Default::default()
            }],
            policies: vec![AuthorizationPolicy {
                name: "allow".into(),
                namespace: "default".into(),
                action: Action::Allow as i32,
                ..Default::default()
            }],
            trust_roots: vec![vec![1, 2, 3]],
            source: "one".into(),
            ..Default::default()
        }
    }

    fn applied(old: &Snapshot, delta: &Delta) -> State {
        let mut state = State::from(old.clone());
        state.apply(delta);
        state
    }

    #[test]
    fn a_one_pod_change_is_one_entry_and_applying_the_diff_gives_the_new_snapshot() {
        let old = snapshot();
        let mut new = old.clone();
        new.workloads[2].ips = vec![vec![10, 0, 0, 99]];
        let delta = diff(&old, &new).expect("a delta");
        assert_eq!(delta.len(), 1);
        assert_eq!(delta.workloads[0].uid, "w3");
        let decoded = decode(&encode(&delta)).expect("decodes");
        assert_eq!(applied(&old, &decoded), State::from(new));
    }

    #[test]
    fn removals_additions_roots_and_source_round_trip() {
        let old = snapshot();
        let mut new = old.clone();
        new.workloads.remove(0);
        new.workloads.push(workload("w9", 9));
        new.services.clear();
        new.policies[0].dry_run = true;
        new.trust_roots = vec![vec![1, 2, 3], vec![4, 5, 6]];
        new.source = "two".into();
        let delta = diff(&old, &new).expect("a delta");
        assert_eq!(delta.removed_workloads, ["w1"]);
        assert_eq!(delta.removed_services, ["default/svc"]);
        assert!(delta.replace_trust_roots);
        assert_eq!(applied(&old, &delta), State::from(new.clone()));
        assert!(diff(&new, &new).expect("delta").is_empty());
    }

    #[test]
    fn a_new_node_or_root_namespace_needs_a_complete_snapshot() {
        let old = snapshot();
        let mut new = old.clone();
        new.node = "n2".into();
        assert!(diff(&old, &new).is_none());
        let mut new = old.clone();
        new.root_namespace = "mesh-root".into();
        assert!(diff(&old, &new).is_none());
    }

    #[test]
    fn another_schema_version_is_refused() {
        let delta = Delta {
            schema_version: SCHEMA_VERSION + 1,
            ..Default::default()
        };
        assert!(matches!(
            decode(&delta.encode_to_vec()),
            Err(DecodeError::Version { .. })
        ));
    }
}
