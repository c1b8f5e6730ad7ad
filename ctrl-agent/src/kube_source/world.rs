//! What the watchers have seen of the cluster: one store per kind, fed with the watcher's
//! events. A store replaces its contents only when a (re)list is complete, so the world is
//! either the old one or the new one, never half of a relist.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use kube::runtime::watcher::Event;
use kube::ResourceExt;
use serde::de::DeserializeOwned;

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
}

impl<K> Default for Store<K> {
    fn default() -> Self {
        Store {
            objects: BTreeMap::new(),
            relist: None,
            synced: false,
            revision: 0,
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

fn convert<K: DeserializeOwned>(kind: Kind, object: &DynamicObject) -> Option<K> {
    match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(typed) => Some(typed),
        Err(error) => {
            tracing::warn!(kind = kind.name(), object = %key(object), %error,
                "malformed object skipped");
            None
        }
    }
}

fn key<K: kube::Resource>(object: &K) -> String {
    match object.namespace() {
        Some(ns) => format!("{ns}/{}", object.name_any()),
        None => object.name_any(),
    }
}

impl<K: kube::Resource> Store<K> {
    pub fn apply(&mut self, event: Event<K>) -> Applied {
        let applied = self.applied(event);
        self.counted(applied)
    }

    fn counted(&mut self, applied: Applied) -> Applied {
        if applied == Applied::Changed {
            self.revision += 1;
        }
        applied
    }

    fn applied(&mut self, event: Event<K>) -> Applied {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                Applied::Nothing
            }
            Event::InitApply(object) => {
                // An InitApply outside a relist would be a watcher bug; keep the object anyway.
                match &mut self.relist {
                    Some(buffer) => {
                        buffer.insert(key(&object), Arc::new(object));
                        Applied::Nothing
                    }
                    None => {
                        self.objects.insert(key(&object), Arc::new(object));
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
                self.objects.insert(key(&object), Arc::new(object));
                Applied::Changed
            }
            Event::Delete(object) => self.remove(&key(&object)),
        }
    }

    /// Applies a watcher event on untyped objects, converting each object to `K`. An object
    /// that does not convert is skipped with a warning; if it replaced a good version, that
    /// version goes too (it no longer says what the cluster holds).
    pub fn apply_untyped(&mut self, kind: Kind, event: Event<DynamicObject>) -> Applied
    where
        K: DeserializeOwned,
    {
        let event = match event {
            Event::Init => Event::Init,
            Event::InitDone => Event::InitDone,
            Event::InitApply(object) => match convert(kind, &object) {
                Some(typed) => Event::InitApply(typed),
                None => return Applied::Nothing,
            },
            Event::Apply(object) => match convert(kind, &object) {
                Some(typed) => Event::Apply(typed),
                None => {
                    let removed = self.remove(&key(&object));
                    return self.counted(removed);
                }
            },
            Event::Delete(object) => {
                let removed = self.remove(&key(&object));
                return self.counted(removed);
            }
        };
        self.apply(event)
    }

    fn remove(&mut self, key: &str) -> Applied {
        match self.objects.remove(key) {
            Some(_) => Applied::Changed,
            None => Applied::Nothing,
        }
    }

    /// The kind is not served at all (an Istio CRD that is not installed): complete and
    /// empty, so the rest of the cluster is still published.
    pub fn absent(&mut self) -> Applied {
        let changed = !self.objects.is_empty() || !self.synced;
        self.objects.clear();
        self.relist = None;
        self.synced = true;
        self.counted(if changed {
            Applied::Changed
        } else {
            Applied::Nothing
        })
    }

    /// Complete (listed at least once) and not in the middle of a relist.
    pub fn ready(&self) -> bool {
        self.synced && self.relist.is_none()
    }

    pub fn objects(&self) -> impl Iterator<Item = &K> {
        self.objects.values().map(|object| &**object)
    }

    /// The objects with their keys, shared.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Arc<K>)> {
        self.objects
            .iter()
            .map(|(key, object)| (key.as_str(), object))
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&K> {
        self.objects
            .get(&format!("{namespace}/{name}"))
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
    pub pods: Store<Pod>,
    pub services: Store<Service>,
    pub endpoint_slices: Store<EndpointSlice>,
    pub authorization_policies: Store<DynamicObject>,
    pub peer_authentications: Store<DynamicObject>,
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
    /// The API server does not serve this kind (404 on list): its CRD is not installed.
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
            Update::Event(kind, event) => match kind {
                Kind::Namespaces => self.namespaces.apply_untyped(kind, event),
                Kind::Pods => self.pods.apply_untyped(kind, event),
                Kind::Services => self.services.apply_untyped(kind, event),
                Kind::EndpointSlices => self.endpoint_slices.apply_untyped(kind, event),
                Kind::AuthorizationPolicies => {
                    self.authorization_policies.apply_untyped(kind, event)
                }
                Kind::PeerAuthentications => self.peer_authentications.apply_untyped(kind, event),
            },
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
