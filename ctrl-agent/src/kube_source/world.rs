//! What the watchers have seen of the cluster: one store per kind, fed with the watcher's
//! events. A store replaces its contents only when a (re)list is complete, so the world is
//! either the old one or the new one, never half of a relist.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::DynamicObject;
use kube::runtime::watcher::Event;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::model::{DRY_RUN_ANNOTATION, SERVICE_NAME_LABEL, SIDECAR_STATUS_ANNOTATION};
use super::redirection::REDIRECTION_ANNOTATION;
use crate::config::OwnerReferenceSpec;

/// The objects of one kind, by `namespace/name`. Each object is shared and replaced, never
/// changed in place, so a reader that kept one can tell by pointer whether it is still the
/// store's.
#[derive(Debug)]
pub struct Store<K> {
    objects: BTreeMap<String, Arc<K>>,
    /// During a (re)list: what it has returned so far. `objects` stays as it was until the
    /// list is complete, and then is replaced whole, so objects deleted while the agent was
    /// not watching disappear.
    relist: Option<BTreeMap<String, Arc<K>>>,
    /// Listed completely at least once.
    synced: bool,
    /// Counts the visible changes.
    revision: u64,
    /// The last changes of single objects, oldest first: the revision each made, and the
    /// object's key. A reader that saw a revision since `changes_from` reads what changed
    /// after it here, instead of comparing every object.
    changes: VecDeque<(u64, String)>,
    /// The revision `changes` goes back to: the last change it does not hold (a relist, the
    /// kind found gone, or the oldest change dropped to keep it bounded).
    changes_from: u64,
}

/// How many single-object changes a store remembers: bounded, so that its memory does not
/// grow with churn. A reader further behind compares every object, as after a relist.
const CHANGES_KEPT: usize = 4096;

impl<K> Default for Store<K> {
    fn default() -> Self {
        Store {
            objects: BTreeMap::new(),
            relist: None,
            synced: false,
            revision: 0,
            changes: VecDeque::new(),
            changes_from: 0,
        }
    }
}

/// What applying one event did to a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The visible objects did not change (an object buffered during a relist, a relist
    /// starting, an object stored as it was, a relist that found every object as it was).
    Nothing,
    /// The visible objects changed (or the store became complete).
    Changed,
}

/// A field the model reads, with the parts of it that it reads: an empty list keeps the
/// field whole. An array's elements are each trimmed the same way.
struct Read(&'static str, &'static [Read]);

/// What the model (model.rs) reads of each kind, besides the name, namespace, uid, labels and
/// creation time, which are kept of every kind (the time is read of PeerAuthentications and
/// Pods only; it never changes, so keeping it never makes an event look like a change).
/// Everything else
/// an API server sends (managedFields, container specs, volumes, conditions, container
/// statuses) is dropped before an object is stored: for a typical pod that is most of it. It
/// also lets a store see that an event changed nothing the model reads (a container
/// restarted, a condition flipped), so that no model is built for it. Reading a field here
/// that is not listed would read it empty; the model tests build every world trimmed and
/// untrimmed and compare the models.
struct Reads {
    body: &'static [Read],
    annotations: &'static [&'static str],
    /// `metadata.deletionTimestamp`: read of Pods only, so that a deletion starting is an
    /// event for them and for no other kind.
    deletion: bool,
    /// `metadata.generateName` and `metadata.ownerReferences`: read of Pods only, whose
    /// workload name Istio derives from them.
    owners: bool,
}

impl Kind {
    fn reads(self) -> Reads {
        match self {
            Kind::Namespaces => Reads {
                body: &[],
                annotations: &[],
                deletion: false,
                owners: false,
            },
            Kind::Pods => Reads {
                body: &[
                    Read(
                        "spec",
                        &[
                            Read("nodeName", &[]),
                            Read("hostNetwork", &[]),
                            Read("serviceAccountName", &[]),
                        ],
                    ),
                    Read(
                        "status",
                        &[Read("phase", &[]), Read("podIP", &[]), Read("podIPs", &[])],
                    ),
                ],
                annotations: &[SIDECAR_STATUS_ANNOTATION, REDIRECTION_ANNOTATION],
                deletion: true,
                owners: true,
            },
            Kind::Services => Reads {
                body: &[Read(
                    "spec",
                    &[
                        Read("type", &[]),
                        Read("clusterIP", &[]),
                        Read("clusterIPs", &[]),
                        Read("ports", &[]),
                    ],
                )],
                annotations: &[],
                deletion: false,
                owners: false,
            },
            Kind::EndpointSlices => Reads {
                body: &[
                    // Required by the type, so kept although not read.
                    Read("addressType", &[]),
                    Read(
                        "endpoints",
                        &[
                            Read("conditions", &[Read("ready", &[])]),
                            Read("targetRef", &[Read("kind", &[]), Read("uid", &[])]),
                        ],
                    ),
                    Read("ports", &[]),
                ],
                annotations: &[],
                deletion: false,
                owners: false,
            },
            Kind::AuthorizationPolicies | Kind::PeerAuthentications => Reads {
                body: &[Read("spec", &[])],
                annotations: &[DRY_RUN_ANNOTATION],
                deletion: false,
                owners: false,
            },
            // What makes a Gateway a waypoint, where it is, and who may use it: Istio
            // updates a Gateway's status conditions often, and those are not read.
            Kind::Gateways => Reads {
                body: &[
                    Read(
                        "spec",
                        &[
                            Read("gatewayClassName", &[]),
                            Read(
                                "listeners",
                                &[
                                    Read("port", &[]),
                                    Read("protocol", &[]),
                                    Read("allowedRoutes", &[Read("namespaces", &[])]),
                                ],
                            ),
                        ],
                    ),
                    Read("status", &[Read("addresses", &[])]),
                ],
                annotations: &[],
                deletion: false,
                owners: false,
            },
            // Only its labels (`istio.io/waypoint-for`) are read.
            Kind::GatewayClasses => Reads {
                body: &[],
                annotations: &[],
                deletion: false,
                owners: false,
            },
        }
    }
}

/// Keeps only the `reads` of `value`. Values of another shape than expected are left as
/// they are, so that a malformed object still fails to convert and is named.
fn keep(value: &mut Value, reads: &[Read]) {
    match value {
        Value::Object(map) => {
            map.retain(|field, _| reads.iter().any(|Read(name, _)| name == field));
            for Read(name, parts) in reads {
                if let (false, Some(part)) = (parts.is_empty(), map.get_mut(*name)) {
                    keep(part, parts);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| keep(item, reads)),
        _ => {}
    }
}

/// A kind as a store keeps it, made from the type the API server serves it as.
pub trait Kept: PartialEq + Sized {
    type Served: DeserializeOwned + kube::Resource;
    /// `Err` names what makes the object unusable.
    fn kept(served: Self::Served) -> Result<Self, String>;
    /// `namespace/name`, or `name` for kinds without a namespace.
    fn key(&self) -> String;
}

/// The kinds kept as served (less what `Kind::reads` drops): their inline size is small,
/// or there are few of them.
macro_rules! kept_as_served {
    ($($kind:ty),*) => {$(
        impl Kept for $kind {
            type Served = $kind;
            fn kept(served: $kind) -> Result<$kind, String> {
                Ok(served)
            }
            fn key(&self) -> String {
                key(self)
            }
        }
    )*};
}

kept_as_served!(Namespace, Service, DynamicObject);

/// What the model reads of a pod. A `Pod` holds 2.4 KB of fields inline, set or not, and
/// pods are most of a cluster's objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoredPod {
    pub name: String,
    pub namespace: Option<String>,
    pub uid: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Carries Istio's sidecar-injection status annotation.
    pub sidecar: bool,
    /// Carries `ambient.istio.io/redirection: enabled`.
    pub redirection_annotated: bool,
    pub node_name: Option<String>,
    pub host_network: bool,
    pub service_account_name: Option<String>,
    pub phase: Option<String>,
    /// `status.podIPs`, or `status.podIP` from a server that sends no list; as written.
    pub ips: Vec<String>,
    /// `metadata.creationTimestamp` in Unix seconds, and whether `deletionTimestamp` is set
    /// (Terminating, though its phase may still say Running): of two pods claiming one
    /// address, the live and newer one keeps it.
    pub created_unix: Option<i64>,
    pub deleting: bool,
    /// `metadata.generateName` (empty when unset) and the kind, name and controller flag of
    /// each `metadata.ownerReferences` entry: Istio names the pod's workload by them.
    pub generate_name: String,
    pub owner_references: Vec<OwnerReferenceSpec>,
}

impl Kept for StoredPod {
    type Served = Pod;

    fn kept(pod: Pod) -> Result<StoredPod, String> {
        let spec = pod.spec.ok_or("no spec")?;
        let status = pod.status.unwrap_or_default();
        let mut ips: Vec<String> = status.pod_ips.into_iter().flatten().map(|p| p.ip).collect();
        if ips.is_empty() {
            ips.extend(status.pod_ip);
        }
        let meta = pod.metadata;
        let annotations = meta.annotations.unwrap_or_default();
        Ok(StoredPod {
            name: meta.name.unwrap_or_default(),
            namespace: meta.namespace,
            uid: meta.uid,
            labels: meta.labels.unwrap_or_default(),
            sidecar: annotations.contains_key(SIDECAR_STATUS_ANNOTATION),
            redirection_annotated: annotations
                .get(REDIRECTION_ANNOTATION)
                .is_some_and(|v| v == "enabled"),
            node_name: spec.node_name,
            host_network: spec.host_network == Some(true),
            service_account_name: spec.service_account_name,
            phase: status.phase,
            ips,
            created_unix: meta.creation_timestamp.map(|t| t.0.as_second()),
            deleting: meta.deletion_timestamp.is_some(),
            generate_name: meta.generate_name.unwrap_or_default(),
            owner_references: meta
                .owner_references
                .into_iter()
                .flatten()
                .map(|o| OwnerReferenceSpec {
                    kind: o.kind,
                    name: o.name,
                    controller: o.controller == Some(true),
                })
                .collect(),
        })
    }

    fn key(&self) -> String {
        store_key(self.namespace.as_deref(), &self.name)
    }
}

/// What the model reads of an EndpointSlice. An `Endpoint` holds 350 bytes inline, and a
/// cluster has one per pod behind a service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoredSlice {
    pub name: String,
    pub namespace: Option<String>,
    /// The service it belongs to (its `kubernetes.io/service-name` label).
    pub service: Option<String>,
    /// The pods it lists as ready, by uid, in its order. Kubernetes: an endpoint whose
    /// `ready` is unset is to be read as ready; endpoints that are not pods are left out.
    pub ready_pods: Vec<String>,
    /// Its ports: name and number.
    pub ports: Vec<(Option<String>, Option<i32>)>,
}

impl Kept for StoredSlice {
    type Served = EndpointSlice;

    fn kept(slice: EndpointSlice) -> Result<StoredSlice, String> {
        let ready_pods = slice
            .endpoints
            .into_iter()
            .flatten()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .filter_map(|e| e.target_ref)
            .filter(|target| target.kind.as_deref().is_none_or(|k| k == "Pod"))
            .filter_map(|target| target.uid)
            .collect();
        let ports = slice
            .ports
            .into_iter()
            .flatten()
            .map(|p| (p.name, p.port))
            .collect();
        let meta = slice.metadata;
        Ok(StoredSlice {
            name: meta.name.unwrap_or_default(),
            namespace: meta.namespace,
            service: meta
                .labels
                .and_then(|mut labels| labels.remove(SERVICE_NAME_LABEL)),
            ready_pods,
            ports,
        })
    }

    fn key(&self) -> String {
        store_key(self.namespace.as_deref(), &self.name)
    }
}

/// `object` as `K`, made of only what the model reads of it (`Kind::reads`); `None` (with a
/// warning naming it) when what is read does not convert.
fn convert<K: Kept>(kind: Kind, object: DynamicObject) -> Option<K> {
    let reads = kind.reads();
    let named = key(&object);
    let DynamicObject {
        types,
        metadata,
        mut data,
    } = object;
    keep(&mut data, reads.body);
    if let (Value::Object(body), Some(types)) = (&mut data, types) {
        // Typed kinds check these when present; untyped ones keep them.
        body.insert("apiVersion".into(), types.api_version.into());
        body.insert("kind".into(), types.kind.into());
    }
    let annotations = metadata.annotations.map(|mut all| {
        all.retain(|name, _| reads.annotations.contains(&name.as_str()));
        all
    });
    let kept = serde_json::from_value(data)
        .map_err(|error| error.to_string())
        .and_then(|mut served: K::Served| {
            *served.meta_mut() = ObjectMeta {
                name: metadata.name,
                namespace: metadata.namespace,
                uid: metadata.uid,
                labels: metadata.labels,
                annotations,
                // Istio settles between PeerAuthentications by age; pods' address clashes
                // go by age and liveness.
                creation_timestamp: metadata.creation_timestamp,
                deletion_timestamp: metadata.deletion_timestamp.filter(|_| reads.deletion),
                generate_name: metadata.generate_name.filter(|_| reads.owners),
                owner_references: metadata.owner_references.filter(|_| reads.owners),
                ..ObjectMeta::default()
            };
            K::kept(served)
        });
    match kept {
        Ok(kept) => Some(kept),
        Err(error) => {
            tracing::warn!(kind = kind.name(), object = %named, %error,
                "malformed object skipped");
            None
        }
    }
}

fn key<K: kube::Resource>(object: &K) -> String {
    store_key(object.meta().namespace.as_deref(), &object.name_any())
}

/// `namespace/name`, or `name` for kinds without a namespace.
fn store_key(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

impl<K: Kept> Store<K> {
    pub fn apply(&mut self, event: Event<K>) -> Applied {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                Applied::Nothing
            }
            Event::InitApply(object) => {
                // An InitApply outside a relist would be a watcher bug; keep the object anyway.
                match &mut self.relist {
                    Some(buffer) => {
                        buffer.insert(object.key(), Arc::new(object));
                        Applied::Nothing
                    }
                    None => self.put(object),
                }
            }
            Event::InitDone => {
                let mut same = self.synced;
                if let Some(mut listed) = self.relist.take() {
                    same &= listed.len() == self.objects.len();
                    // An object the relist found as it was keeps its pointer, so that
                    // readers keeping work by pointer (the modeler) keep it too.
                    for (key, object) in &mut listed {
                        match self.objects.get(key) {
                            Some(kept) if kept == object => *object = kept.clone(),
                            _ => same = false,
                        }
                    }
                    self.objects = listed;
                }
                self.synced = true;
                if same {
                    Applied::Nothing
                } else {
                    self.changed(None)
                }
            }
            Event::Apply(object) => self.put(object),
            Event::Delete(object) => self.remove(&object.key()),
        }
    }

    /// Stores `object` unless the store holds it already as it is (the event changed
    /// nothing that is kept of it).
    fn put(&mut self, object: K) -> Applied {
        let key = object.key();
        if self.objects.get(&key).is_some_and(|kept| **kept == object) {
            return Applied::Nothing;
        }
        self.objects.insert(key.clone(), Arc::new(object));
        self.changed(Some(key))
    }

    /// Counts a visible change: of the object under `key`, or of any number (`None`).
    fn changed(&mut self, key: Option<String>) -> Applied {
        self.revision += 1;
        match key {
            Some(key) => {
                if self.changes.len() == CHANGES_KEPT {
                    if let Some((dropped, _)) = self.changes.pop_front() {
                        self.changes_from = dropped;
                    }
                }
                self.changes.push_back((self.revision, key));
            }
            None => {
                self.changes.clear();
                self.changes_from = self.revision;
            }
        }
        Applied::Changed
    }

    /// The keys of the objects changed (stored, replaced or removed) after `revision`, in key
    /// order and each once; `None` when the store does not remember that far back, and every
    /// object is to be compared.
    pub fn changed_since(&self, revision: u64) -> Option<Vec<&str>> {
        if revision < self.changes_from || revision > self.revision {
            return None;
        }
        let first = self.changes.partition_point(|(r, _)| *r <= revision);
        let mut keys: Vec<&str> = self
            .changes
            .range(first..)
            .map(|(_, key)| key.as_str())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        Some(keys)
    }

    /// Applies a watcher event on untyped objects, converting each object to `K` and keeping
    /// only what the model reads of it. An object that does not convert is skipped with a
    /// warning; if it replaced a good version, that version goes too (it no longer says what
    /// the cluster holds).
    pub fn apply_untyped(&mut self, kind: Kind, event: Event<DynamicObject>) -> Applied {
        let event = match event {
            Event::Init => Event::Init,
            Event::InitDone => Event::InitDone,
            Event::InitApply(object) => match convert(kind, object) {
                Some(typed) => Event::InitApply(typed),
                None => return Applied::Nothing,
            },
            Event::Apply(object) => {
                let key = key(&object);
                match convert(kind, object) {
                    Some(typed) => Event::Apply(typed),
                    None => return self.remove(&key),
                }
            }
            Event::Delete(object) => return self.remove(&key(&object)),
        };
        self.apply(event)
    }

    fn remove(&mut self, key: &str) -> Applied {
        match self.objects.remove(key) {
            Some(_) => self.changed(Some(key.to_owned())),
            None => Applied::Nothing,
        }
    }

    /// The kind is served at no version (an Istio CRD that is not installed): complete and
    /// empty, so the rest of the cluster is still published.
    pub fn absent(&mut self) -> Applied {
        let changed = !self.objects.is_empty() || !self.synced;
        self.objects.clear();
        self.relist = None;
        self.synced = true;
        if changed {
            self.changed(None)
        } else {
            Applied::Nothing
        }
    }

    /// Complete (listed at least once) and not in the middle of a relist.
    pub fn ready(&self) -> bool {
        self.synced && self.relist.is_none()
    }

    pub fn objects(&self) -> impl Iterator<Item = &K> {
        self.objects.values().map(|object| &**object)
    }

    /// The object under `key` (`namespace/name`), shared.
    pub fn get_key(&self, key: &str) -> Option<&Arc<K>> {
        self.objects.get(key)
    }

    /// The objects with their keys, shared.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Arc<K>)> {
        self.objects
            .iter()
            .map(|(key, object)| (key.as_str(), object))
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&K> {
        self.objects
            .get(&store_key(Some(namespace), name))
            .map(|object| &**object)
    }

    /// Changes with every visible change: a reader that saw this revision has seen every
    /// object as it is.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

/// Every kind the Kubernetes source watches.
#[derive(Debug, Default)]
pub struct World {
    pub namespaces: Store<Namespace>,
    pub pods: Store<StoredPod>,
    pub services: Store<Service>,
    pub endpoint_slices: Store<StoredSlice>,
    pub authorization_policies: Store<DynamicObject>,
    pub peer_authentications: Store<DynamicObject>,
    /// Gateway API Gateways: a waypoint is one (see `waypoints::Waypoint`).
    pub gateways: Store<DynamicObject>,
    pub gateway_classes: Store<DynamicObject>,
}

/// One watcher's news. Every kind is watched as untyped objects and converted here one
/// object at a time, so that a malformed object is skipped (with a warning naming it) instead
/// of failing the whole list or watch of its kind.
///
/// Not boxed although `Absent` is small: each update is moved once, through the channel to
/// the store, and boxing would cost an allocation per event for nothing.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Update {
    Event(Kind, Event<DynamicObject>),
    /// The API server serves this optional kind at no version (a 404 on its list, and
    /// discovery finds it nowhere): its CRD is not installed, so no such object exists. Not
    /// sent for a kind served at other versions only: its objects exist but cannot be read,
    /// and it stays unlisted (holding back publishing) instead.
    Absent(Kind),
}

/// The watched kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Namespaces,
    Pods,
    Services,
    EndpointSlices,
    AuthorizationPolicies,
    PeerAuthentications,
    Gateways,
    GatewayClasses,
}

/// Istio's security kinds' API group and the version read (Istio 1.22 and later serve v1).
pub const ISTIO_SECURITY: ApiGroupVersion = ApiGroupVersion {
    group: "security.istio.io",
    version: "v1",
};
/// The Gateway API's group and the version read (GA since Gateway API 1.0; what Istio reads).
pub const GATEWAY_API: ApiGroupVersion = ApiGroupVersion {
    group: "gateway.networking.k8s.io",
    version: "v1",
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiGroupVersion {
    pub group: &'static str,
    pub version: &'static str,
}

impl Kind {
    /// Every kind, in declaration order (`kind as usize` indexes it).
    pub const ALL: [Kind; 8] = [
        Kind::Namespaces,
        Kind::Pods,
        Kind::Services,
        Kind::EndpointSlices,
        Kind::AuthorizationPolicies,
        Kind::PeerAuthentications,
        Kind::Gateways,
        Kind::GatewayClasses,
    ];

    /// Where a kind defined by a CRD is read: a cluster may lack it, or serve it at other
    /// versions than the one read. `None` for the core kinds, always served.
    pub fn crd(self) -> Option<ApiGroupVersion> {
        match self {
            Kind::AuthorizationPolicies | Kind::PeerAuthentications => Some(ISTIO_SECURITY),
            Kind::Gateways | Kind::GatewayClasses => Some(GATEWAY_API),
            Kind::Namespaces | Kind::Pods | Kind::Services | Kind::EndpointSlices => None,
        }
    }

    /// The kind's plural, as its collection's path and API discovery name it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespaces => "namespaces",
            Kind::Pods => "pods",
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
            Kind::AuthorizationPolicies => "authorizationpolicies",
            Kind::PeerAuthentications => "peerauthentications",
            Kind::Gateways => "gateways",
            Kind::GatewayClasses => "gatewayclasses",
        }
    }
}

impl World {
    pub fn apply(&mut self, update: Update) -> Applied {
        match update {
            Update::Event(kind, event) => match kind {
                Kind::Namespaces => self.namespaces.apply_untyped(kind, event),
                Kind::Pods => self.pods.apply_untyped(kind, event),
                Kind::Services => self.services.apply_untyped(kind, event),
                Kind::EndpointSlices => self.endpoint_slices.apply_untyped(kind, event),
                Kind::AuthorizationPolicies => {
                    self.authorization_policies.apply_untyped(kind, event)
                }
                Kind::PeerAuthentications => self.peer_authentications.apply_untyped(kind, event),
                Kind::Gateways => self.gateways.apply_untyped(kind, event),
                Kind::GatewayClasses => self.gateway_classes.apply_untyped(kind, event),
            },
            Update::Absent(kind) => match kind {
                Kind::AuthorizationPolicies => self.authorization_policies.absent(),
                Kind::PeerAuthentications => self.peer_authentications.absent(),
                Kind::Gateways => self.gateways.absent(),
                Kind::GatewayClasses => self.gateway_classes.absent(),
                // Core kinds are always served: never sent for them.
                _ => Applied::Nothing,
            },
        }
    }

    /// The kinds not yet complete (never listed, or relisting): nothing is published while
    /// any is, so readers never see a partial cluster.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        [
            (Kind::Namespaces, self.namespaces.ready()),
            (Kind::Pods, self.pods.ready()),
            (Kind::Services, self.services.ready()),
            (Kind::EndpointSlices, self.endpoint_slices.ready()),
            (
                Kind::AuthorizationPolicies,
                self.authorization_policies.ready(),
            ),
            (Kind::PeerAuthentications, self.peer_authentications.ready()),
            (Kind::Gateways, self.gateways.ready()),
            (Kind::GatewayClasses, self.gateway_classes.ready()),
        ]
        .into_iter()
        .filter(|(_, ready)| !ready)
        .map(|(kind, _)| kind.name())
        .collect()
    }
}
