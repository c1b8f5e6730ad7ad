//! What the watchers have seen of the cluster: one store per kind, fed with the watcher's
//! events. A store replaces its contents only when a (re)list is complete, so the world is
//! either the old one or the new one, never half of a relist.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use kube::runtime::watcher::Event;
use kube::ResourceExt;

/// The objects of one kind, by `namespace/name`.
#[derive(Debug)]
pub struct Store<K> {
    objects: BTreeMap<String, K>,
    /// During a (re)list: what it has returned so far. `objects` stays as it was until the
    /// list is complete, and then is replaced whole, so objects deleted while the agent was
    /// not watching disappear.
    relist: Option<BTreeMap<String, K>>,
    /// Listed completely at least once.
    synced: bool,
}

impl<K> Default for Store<K> {
    fn default() -> Self {
        Store {
            objects: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

/// What applying one event did to a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The visible objects did not change (an object buffered during a relist, a relist
    /// starting).
    Nothing,
    /// The visible objects changed (or the store became complete).
    Changed,
}

fn key<K: kube::Resource>(object: &K) -> String {
    match object.namespace() {
        Some(ns) => format!("{ns}/{}", object.name_any()),
        None => object.name_any(),
    }
}

impl<K: kube::Resource> Store<K> {
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
                        buffer.insert(key(&object), object);
                        Applied::Nothing
                    }
                    None => {
                        self.objects.insert(key(&object), object);
                        Applied::Changed
                    }
                }
            }
            Event::InitDone => {
                if let Some(buffer) = self.relist.take() {
                    self.objects = buffer;
                }
                self.synced = true;
                Applied::Changed
            }
            Event::Apply(object) => {
                self.objects.insert(key(&object), object);
                Applied::Changed
            }
            Event::Delete(object) => match self.objects.remove(&key(&object)) {
                Some(_) => Applied::Changed,
                None => Applied::Nothing,
            },
        }
    }

    /// The kind is not served at all (an Istio CRD that is not installed): complete and
    /// empty, so the rest of the cluster is still published.
    pub fn absent(&mut self) -> Applied {
        let changed = !self.objects.is_empty() || !self.synced;
        self.objects.clear();
        self.relist = None;
        self.synced = true;
        if changed {
            Applied::Changed
        } else {
            Applied::Nothing
        }
    }

    /// Complete (listed at least once) and not in the middle of a relist.
    pub fn ready(&self) -> bool {
        self.synced && self.relist.is_none()
    }

    pub fn objects(&self) -> impl Iterator<Item = &K> {
        self.objects.values()
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&K> {
        self.objects.get(&format!("{namespace}/{name}"))
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
    pub pods: Store<Pod>,
    pub services: Store<Service>,
    pub endpoint_slices: Store<EndpointSlice>,
    pub authorization_policies: Store<DynamicObject>,
    pub peer_authentications: Store<DynamicObject>,
}

/// One watcher's news, tagged with its kind. Not boxed: each event is moved once, through the
/// channel to the store, and boxing would cost an allocation per event for nothing.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Update {
    Namespace(Event<Namespace>),
    Pod(Event<Pod>),
    Service(Event<Service>),
    EndpointSlice(Event<EndpointSlice>),
    AuthorizationPolicy(Event<DynamicObject>),
    PeerAuthentication(Event<DynamicObject>),
    /// The API server does not serve this kind (404 on list): its CRD is not installed.
    Absent(Kind),
}

/// The watched kinds, for logs and for `Update::Absent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Namespaces,
    Pods,
    Services,
    EndpointSlices,
    AuthorizationPolicies,
    PeerAuthentications,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespaces => "namespaces",
            Kind::Pods => "pods",
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
            Kind::AuthorizationPolicies => "authorizationpolicies",
            Kind::PeerAuthentications => "peerauthentications",
        }
    }
}

impl World {
    pub fn apply(&mut self, update: Update) -> Applied {
        match update {
            Update::Namespace(e) => self.namespaces.apply(e),
            Update::Pod(e) => self.pods.apply(e),
            Update::Service(e) => self.services.apply(e),
            Update::EndpointSlice(e) => self.endpoint_slices.apply(e),
            Update::AuthorizationPolicy(e) => self.authorization_policies.apply(e),
            Update::PeerAuthentication(e) => self.peer_authentications.apply(e),
            Update::Absent(kind) => match kind {
                Kind::AuthorizationPolicies => self.authorization_policies.absent(),
                Kind::PeerAuthentications => self.peer_authentications.absent(),
                // Core kinds are always served; a 404 there is an error the watcher retries.
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
        ]
        .into_iter()
        .filter(|(_, ready)| !ready)
        .map(|(kind, _)| kind.name())
        .collect()
    }
}
