//! From the Kubernetes objects to the agent's model (`FileConfig`), the same model the file
//! source parses, so both go through the one translation to the snapshot (`translate.rs`),
//! the same enrollment rule (`enroll::ambient`) and the same policy checks.
//!
//! Which pods are workloads follows istiod's ambient index (pilot's `workloads.go`): Running
//! or Pending pods, not on the host network, with their `status.podIPs`. One addition: a pod
//! of this node that has no address yet is kept (without addresses), because the CNI plugin
//! asks about a pod before it has one, and CNI then reports its addresses.
//!
//! Nothing here fails as a whole: an object that cannot be used is named in the returned
//! problems, and the rest of the cluster is still published. A pod or service that cannot be
//! used is left out; a security policy that cannot be read fails closed instead (see
//! `unreadable_authorization_policy`), because leaving out a DENY would open what it denied.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::DynamicObject;
use kube::ResourceExt;
use mesh_core::identity::SpiffeId;
use serde::de::DeserializeOwned;

use crate::cni_api::DATAPLANE_MODE_LABEL;
use crate::config::{
    ActionSpec, FileConfig, MtlsModeSpec, MtlsSpec, NamespaceSpec, PeerAuthenticationSpec,
    PolicySpec, ProtocolSpec, RuleSpec, SelectorSpec, ServicePortSpec, ServiceSpec, WaypointSpec,
    WorkloadSpec,
};
use crate::enroll;

use super::waypoints::{self, Addressed, Waypoint, WaypointAddress};
use super::world::{StoredPod, StoredSlice, World};

/// Istio's label naming the waypoint a pod, service or namespace uses (`none`: no waypoint,
/// even if the namespace has one).
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Istio's label for a waypoint in another namespace than the labelled object's.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// Istio's label on a waypoint's Deployment, pods and Service (with
/// [`MESH_CONTROLLER`]): they are a waypoint, and have none.
pub const MANAGED_GATEWAY_LABEL: &str = "gateway.istio.io/managed";
pub const MESH_CONTROLLER: &str = "istio.io-mesh-controller";
/// Gateway API's label on the resources deployed for a Gateway: its name.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Istio's sidecar injector marks the pods it injected with this annotation.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Istio's annotation that turns an AuthorizationPolicy into a dry run.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Waypoints take HBONE on this port of their service's address (as ztunnel dials them).
pub const WAYPOINT_HBONE_PORT: u16 = 15008;
/// For maps with an entry per pod, rebuilt at every model: the keys come from the API server,
/// and std's SipHash was about a tenth of a model of 100k pods in a profile.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Settings that do not come from the cluster.
#[derive(Clone, Debug)]
pub struct ModelOptions {
    /// This node: pods here without an address yet are kept for CNI.
    pub node: String,
    pub trust_domain: String,
    pub root_namespace: String,
}

/// The model and what had to be left out of it (one line per object, naming it).
#[derive(Debug)]
pub struct Model {
    pub config: FileConfig,
    pub problems: Vec<String>,
}

/// What the translation of one object looks up in the rest of the cluster, indexed once per
/// model: a scan per object would make a model of n pods cost O(n^2).
struct Lookups<'a> {
    namespace_labels: HashMap<&'a str, &'a BTreeMap<String, String>>,
    /// By the Gateway's `namespace/name`.
    waypoints: HashMap<String, Waypoint>,
    /// Gateways that could not be read.
    problems: Vec<String>,
}

/// EndpointSlices by (namespace, service name), in the store's order.
type SlicesByService<'a> = FastMap<(&'a str, &'a str), Vec<&'a Arc<StoredSlice>>>;

impl<'a> Lookups<'a> {
    fn new(world: &'a World) -> Lookups<'a> {
        let namespace_labels = world
            .namespaces
            .objects()
            .filter_map(|n| Some((n.metadata.name.as_deref()?, n.labels())))
            .collect();
        let (waypoints, problems) = waypoints::index(world);
        Lookups {
            namespace_labels,
            waypoints,
            problems,
        }
    }

    fn namespace_labels(&self, namespace: &str) -> Option<&'a BTreeMap<String, String>> {
        self.namespace_labels.get(namespace).copied()
    }
}

/// Built for a model that walks the services: an entry per service, so sized once, and not
/// SipHash.
fn slices_by_service(world: &World) -> SlicesByService<'_> {
    let mut slices: SlicesByService<'_> =
        FastMap::with_capacity_and_hasher(world.endpoint_slices.len(), <_>::default());
    for (_, slice) in world.endpoint_slices.entries() {
        let (Some(namespace), Some(service)) =
            (slice.namespace.as_deref(), slice.service.as_deref())
        else {
            continue;
        };
        slices.entry((namespace, service)).or_default().push(slice);
    }
    slices
}

/// One model of `world` from scratch.
pub fn model(world: &World, options: &ModelOptions) -> Model {
    Modeler::new(options.clone()).model(world)
}

/// Models one cluster again and again. A pod is translated again only when the store holds
/// another object for it than last time (the store replaces an object when an event changed
/// what it keeps of it, so the pointer tells) or when the namespaces or services changed,
/// which a pod's translation also reads (enrollment, waypoints). Address and uid clashes are
/// settled again only among the pods that share a claim with a changed one. Services are
/// kept whole while no slice changed and no pod came into the model or left it; otherwise
/// each is translated again only if its object or slices changed, and narrows its endpoints
/// again only if the model's set of uids changed. The pods store says which pods changed
/// since the last model, so a pod event on a large cluster costs that pod's translation and
/// moving the other translations across; after a relist, or more changes than the store
/// remembers, every pod is compared by pointer.
pub struct Modeler {
    options: ModelOptions,
    /// Each pod as last translated, and what came of it, in the store's key order (so that
    /// a model walks the store, or the keys that changed, and this list side by side).
    pods: Vec<(String, TranslatedPod)>,
    /// The same for services, before their endpoints are narrowed to the model's pods.
    services: Vec<(String, TranslatedService)>,
    /// The services of the last model.
    modeled_services: Option<ModeledServices>,
    /// Who claims each address and uid among `pods`, and the model's uids.
    owners: Ownership,
    /// The store revisions of what a pod's or service's translation looks up (namespaces,
    /// services, gateways, gateway classes) that `pods` and `services` were translated
    /// against.
    context: Option<[u64; 4]>,
    /// The pods' store revision `pods` follows.
    pods_revision: Option<u64>,
}

/// What two live pods cannot share: an address (the data plane indexes workloads by
/// address) or a uid (the agent compares models pod by pod). If the API says they do, one
/// keeps it (see `precedence`) and the other is left out.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Claim {
    Address(IpAddr),
    Uid(String),
}

impl Claim {
    fn of(w: &WorkloadSpec) -> impl Iterator<Item = Claim> + '_ {
        let addresses = w.ips.iter().map(|ip| Claim::Address(*ip));
        addresses.chain(std::iter::once(Claim::Uid(w.uid.clone())))
    }
}

/// Kept from model to model with the pods' translations, so that a pod event settles the
/// clashes of the pods it shares a claim with (nearly always none) instead of every pod's.
#[derive(Default)]
struct Ownership {
    /// Store keys of the pods whose workload has the claim, in store order.
    claims: FastMap<Claim, Vec<String>>,
    /// Uids of the model's workloads.
    members: std::collections::HashSet<String, foldhash::fast::RandomState>,
}

impl Ownership {
    fn claim(&mut self, claim: Claim, key: &str) {
        let keys = self.claims.entry(claim).or_default();
        if let Err(at) = keys.binary_search_by(|k| k.as_str().cmp(key)) {
            keys.insert(at, key.to_owned());
        }
    }

    fn unclaim(&mut self, claim: &Claim, key: &str) {
        if let Some(keys) = self.claims.get_mut(claim) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.claims.remove(claim);
            }
        }
    }
}

struct TranslatedPod {
    pod: Arc<StoredPod>,
    workload: Result<Option<Arc<WorkloadSpec>>, String>,
    standing: Standing,
}

/// Where a pod's workload stood in the last model.
enum Standing {
    In,
    /// Left out by a clash: the problem line naming the pod that kept the claim.
    Clashed(String),
    /// Not in it: a new translation (not settled yet), or not a workload at all.
    Out,
}

/// A service as translated from its object and its EndpointSlices (by pointer, in order).
struct TranslatedService {
    service: Arc<Service>,
    slices: Vec<Arc<StoredSlice>>,
    spec: Result<Option<ServiceBase>, String>,
    /// The spec the last model had, endpoints narrowed: kept while they stay the same, so
    /// an unchanged service costs no copy and compares by pointer.
    modeled: Option<Arc<ServiceSpec>>,
}

/// The services of a model, with the problem lines of those left out, and the slices'
/// revision they were made from.
struct ModeledServices {
    slices_revision: u64,
    services: Vec<Arc<ServiceSpec>>,
    problems: Vec<String>,
}

/// A service's spec without endpoints, and the ready pod uids its slices list (sorted, once
/// each): the endpoints are those of the model's pods.
struct ServiceBase {
    spec: ServiceSpec,
    ready: Vec<String>,
}

impl Modeler {
    pub fn new(options: ModelOptions) -> Modeler {
        Modeler {
            options,
            pods: Vec::new(),
            services: Vec::new(),
            modeled_services: None,
            owners: Ownership::default(),
            context: None,
            pods_revision: None,
        }
    }

    pub fn model(&mut self, world: &World) -> Model {
        let context = [
            world.namespaces.revision(),
            world.services.revision(),
            world.gateways.revision(),
            world.gateway_classes.revision(),
        ];
        if self.context != Some(context) {
            self.pods.clear();
            self.services.clear();
            self.modeled_services = None;
            self.owners = Ownership::default();
            self.context = Some(context);
            self.pods_revision = None;
        }
        let changed_pods = self
            .pods_revision
            .and_then(|revision| world.pods.changed_since(revision));
        self.pods_revision = Some(world.pods.revision());
        model_with(
            world,
            &self.options,
            &mut self.pods,
            &mut self.services,
            &mut self.modeled_services,
            &mut self.owners,
            changed_pods,
        )
    }
}

/// The next of `items` if it satisfies `wanted`.
fn next_if<T>(items: &mut std::vec::IntoIter<T>, wanted: impl FnOnce(&T) -> bool) -> Option<T> {
    if items.as_slice().first().is_some_and(wanted) {
        items.next()
    } else {
        None
    }
}

/// The translation under `key`: the last one if `unchanged` says its object is the store's,
/// else a new one. `previous` holds the last model's translations in the store's key order,
/// as `key` comes; what comes before `key` there is of objects that left. The usual case, the
/// next one being this very object, takes no key comparison. Each last translation that is
/// not kept (its object left or changed) goes to `dropped`.
fn reuse_or_translate<T>(
    previous: &mut std::vec::IntoIter<(String, T)>,
    key: &str,
    unchanged: impl Fn(&T) -> bool,
    translate: impl FnOnce() -> T,
    mut dropped: impl FnMut(&str, T),
) -> (String, T) {
    if let Some(entry) = next_if(previous, |(_, seen)| unchanged(seen)) {
        return entry;
    }
    while let Some((key, left)) = next_if(previous, |(seen, _)| seen.as_str() < key) {
        dropped(&key, left);
    }
    match next_if(previous, |(seen, _)| seen == key) {
        Some((key, seen)) if unchanged(&seen) => (key, seen),
        Some((key, seen)) => {
            dropped(&key, seen);
            (key, translate())
        }
        None => (key.to_owned(), translate()),
    }
}

/// The walk from the last model's pod translations (in store key order) to this one's.
struct PodWalk {
    previous: std::vec::IntoIter<(String, TranslatedPod)>,
    now: Vec<(String, TranslatedPod)>,
    /// Where the new translations are in `now`.
    fresh: Vec<usize>,
    /// Workloads of the last model's translations that went (their object left or changed),
    /// with whether they were in it.
    gone: Vec<(String, Arc<WorkloadSpec>, bool)>,
}

/// A last translation whose pod left or changed: its workload, if it had one, goes to `gone`.
fn leave(gone: &mut Vec<(String, Arc<WorkloadSpec>, bool)>, key: &str, old: TranslatedPod) {
    if let Ok(Some(w)) = old.workload {
        gone.push((key.to_owned(), w, matches!(old.standing, Standing::In)));
    }
}

impl PodWalk {
    /// Moves the last translations of keys before `key` across as they are.
    fn keep_before(&mut self, key: &str) {
        let before = self
            .previous
            .as_slice()
            .partition_point(|(seen, _)| seen.as_str() < key);
        self.now.extend(self.previous.by_ref().take(before));
    }

    /// The pod under `key` as the store holds it now (`None`: gone), translated again if its
    /// object is not the one last translated. Last translations of keys before `key` are of
    /// pods that left.
    fn visit(
        &mut self,
        key: &str,
        pod: Option<&Arc<StoredPod>>,
        translate: impl Fn(&Arc<StoredPod>) -> TranslatedPod,
    ) {
        let gone = &mut self.gone;
        let Some(pod) = pod else {
            while let Some((seen, old)) =
                next_if(&mut self.previous, |(seen, _)| seen.as_str() <= key)
            {
                leave(gone, &seen, old);
            }
            return;
        };
        let mut translated_now = false;
        let entry = reuse_or_translate(
            &mut self.previous,
            key,
            |seen: &TranslatedPod| Arc::ptr_eq(&seen.pod, pod),
            || {
                translated_now = true;
                translate(pod)
            },
            |seen, old| leave(gone, seen, old),
        );
        if translated_now {
            self.fresh.push(self.now.len());
        }
        self.now.push(entry);
    }
}

/// A model of `world`, reusing the translations in `translated` (pods) and
/// `translated_services` of objects that did not change, and leaving there the translation of
/// every pod and service of this model, with `owners` kept in step with them. `changed_pods`
/// are the keys of the pods changed since `translated` was made, when the store can say;
/// without them every pod is compared.
fn model_with(
    world: &World,
    options: &ModelOptions,
    translated: &mut Vec<(String, TranslatedPod)>,
    translated_services: &mut Vec<(String, TranslatedService)>,
    modeled_services: &mut Option<ModeledServices>,
    owners: &mut Ownership,
    changed_pods: Option<Vec<&str>>,
) -> Model {
    let lookups = Lookups::new(world);
    let mut problems = lookups.problems.clone();
    let namespaces: Vec<NamespaceSpec> = world
        .namespaces
        .objects()
        .map(|n| NamespaceSpec {
            name: n.name_any(),
            labels: n.labels().clone(),
        })
        .collect();
    let translate = |pod: &Arc<StoredPod>| TranslatedPod {
        pod: pod.clone(),
        workload: workload(pod, world, &lookups, options).map(|w| w.map(Arc::new)),
        standing: Standing::Out,
    };
    let mut walk = PodWalk {
        previous: std::mem::take(translated).into_iter(),
        now: Vec::with_capacity(world.pods.len()),
        fresh: Vec::new(),
        gone: Vec::new(),
    };
    match changed_pods {
        // Only the pods the store says changed are looked at; the other translations move
        // across as they are.
        Some(keys) => {
            for key in keys {
                walk.keep_before(key);
                walk.visit(key, world.pods.get_key(key), translate);
            }
            walk.now.extend(walk.previous);
        }
        None => {
            for (key, pod) in world.pods.entries() {
                walk.visit(key, Some(pod), translate);
            }
            for (key, old) in walk.previous {
                leave(&mut walk.gone, &key, old);
            }
        }
    }
    let PodWalk {
        now: mut now_translated,
        fresh,
        gone,
        ..
    } = walk;

    // The claims of what went leave, those of the new translations come.
    // Uids that left the model and that came into it: when they are the same (a pod changed
    // but stayed, the usual event), so is every service's set of endpoints.
    let mut left: Vec<String> = Vec::new();
    let mut came: Vec<String> = Vec::new();
    let mut unsettled: Vec<Claim> = Vec::new();
    for (key, w, in_model) in &gone {
        if *in_model {
            left.push(w.uid.clone());
        }
        for claim in Claim::of(w) {
            owners.unclaim(&claim, key);
            unsettled.push(claim);
        }
    }
    for &i in &fresh {
        let (key, t) = &now_translated[i];
        if let Ok(Some(w)) = &t.workload {
            for claim in Claim::of(w) {
                owners.claim(claim.clone(), key);
                unsettled.push(claim);
            }
        }
    }
    // The pods that share a claim with those, and with those in turn: their clashes settle
    // again, by `precedence`. Clashes elsewhere cannot change.
    let position = |key: &str| {
        now_translated
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
    };
    let mut affected = BTreeSet::new();
    let mut visited: std::collections::HashSet<Claim> = std::collections::HashSet::new();
    while let Some(claim) = unsettled.pop() {
        let Some(keys) = owners.claims.get(&claim) else {
            continue;
        };
        if !visited.insert(claim) {
            continue;
        }
        for i in keys.iter().filter_map(|key| position(key)) {
            if affected.insert(i) {
                if let Ok(Some(w)) = &now_translated[i].1.workload {
                    unsettled.extend(Claim::of(w));
                }
            }
        }
    }
    let who = |namespace: &str, name: &str| format!("pod {namespace}/{name}");
    let mut owned: HashMap<Claim, usize> = HashMap::new();
    let mut affected: Vec<usize> = affected.into_iter().collect();
    affected.sort_by_key(|&i| (precedence(&now_translated[i].1.pod), i));
    for i in affected {
        let t = &now_translated[i].1;
        if let Ok(Some(w)) = &t.workload {
            let was_in = matches!(t.standing, Standing::In);
            let taken = w
                .ips
                .iter()
                .find_map(|ip| owned.get(&Claim::Address(*ip)))
                .map(|&other| ("an address", other))
                .or_else(|| {
                    let other = owned.get(&Claim::Uid(w.uid.clone()))?;
                    Some(("its uid", *other))
                });
            let standing = match taken {
                Some((what, other)) => {
                    let other = match &now_translated[other].1.workload {
                        Ok(Some(o)) => who(&o.namespace, &o.name),
                        _ => String::new(),
                    };
                    Standing::Clashed(format!(
                        "{}: {what} is also {other}'s; left out",
                        who(&w.namespace, &w.name)
                    ))
                }
                None => {
                    owned.extend(Claim::of(w).map(|c| (c, i)));
                    Standing::In
                }
            };
            let is_in = matches!(standing, Standing::In);
            if was_in != is_in {
                let moved = if was_in { &mut left } else { &mut came };
                moved.push(w.uid.clone());
            }
            now_translated[i].1.standing = standing;
        }
    }
    for uid in &left {
        owners.members.remove(uid);
    }
    for uid in &came {
        owners.members.insert(uid.clone());
    }
    left.sort_unstable();
    came.sort_unstable();
    let members_changed = left != came;

    let mut workloads: Vec<Arc<WorkloadSpec>> = Vec::with_capacity(owners.members.len());
    for (_, t) in &now_translated {
        match (&t.workload, &t.standing) {
            (Err(problem), _) => problems.push(format!(
                "{}: {problem}; left out",
                who(t.pod.namespace.as_deref().unwrap_or_default(), &t.pod.name)
            )),
            (Ok(Some(w)), Standing::In) => workloads.push(w.clone()),
            (_, Standing::Clashed(problem)) => problems.push(problem.clone()),
            _ => {}
        }
    }
    *translated = now_translated;
    let services = match modeled_services {
        // No slice changed and no pod came into the model or left it: every service is as it
        // was (a change of services or namespaces clears what was kept).
        Some(last)
            if last.slices_revision == world.endpoint_slices.revision() && !members_changed =>
        {
            problems.extend(last.problems.iter().cloned());
            last.services.clone()
        }
        _ => {
            let (services, service_problems) = model_services(
                world,
                &lookups,
                translated_services,
                owners,
                members_changed,
            );
            problems.extend(service_problems.iter().cloned());
            let services_now = services.clone();
            *modeled_services = Some(ModeledServices {
                slices_revision: world.endpoint_slices.revision(),
                services,
                problems: service_problems,
            });
            services_now
        }
    };

    let mut policies = Vec::new();
    for object in world.authorization_policies.objects() {
        match authorization_policy(object) {
            Ok(Authorization::Enforced(p)) => policies.push(p),
            Ok(Authorization::Attached) => {}
            Ok(Authorization::NotEnforced(why)) => problems.push(format!(
                "AuthorizationPolicy {}/{}: {why}; left out",
                object.namespace().unwrap_or_default(),
                object.name_any()
            )),
            Err(problem) => {
                let (stand_in, enforced) = unreadable_authorization_policy(object);
                policies.extend(stand_in);
                problems.push(unreadable(
                    "AuthorizationPolicy",
                    object,
                    &problem,
                    enforced,
                ));
            }
        }
    }
    let mut peer_authentications = Vec::new();
    for object in world.peer_authentications.objects() {
        match peer_authentication(object) {
            Ok(pa) => peer_authentications.push(pa),
            Err(problem) => {
                let (stand_in, enforced) = unreadable_peer_authentication(object);
                peer_authentications.extend(stand_in);
                problems.push(unreadable("PeerAuthentication", object, &problem, enforced));
            }
        }
    }
    Model {
        config: FileConfig {
            trust_domain: options.trust_domain.clone(),
            root_namespace: options.root_namespace.clone(),
            namespaces,
            workloads,
            services,
            policies,
            peer_authentications,
        },
        problems,
    }
}

/// Which of two pods claiming one address (or uid) keeps it, the smaller first: one not being
/// deleted, then the newest, then (the key's tie-break) store order. An IP is only reused after
/// its pod is gone from the node, so the newest live pod is the one holding it now; a
/// Terminating pod (its phase still Running through its grace period) or one of a node that
/// went away would otherwise keep the address from the pod that has it, which then has no
/// certificate and no endpoints. A pod without a creation time (no API server sends that)
/// counts as the oldest.
fn precedence(pod: &StoredPod) -> (bool, std::cmp::Reverse<i64>) {
    (
        pod.deleting,
        std::cmp::Reverse(pod.created_unix.unwrap_or(i64::MIN)),
    )
}

/// The services of a model: each translated again only if its object or its slices changed,
/// and its endpoints narrowed again to the model's pods only if those changed. Returns them
/// with the problem lines of the services left out.
fn model_services(
    world: &World,
    lookups: &Lookups<'_>,
    translated_services: &mut Vec<(String, TranslatedService)>,
    owners: &Ownership,
    members_changed: bool,
) -> (Vec<Arc<ServiceSpec>>, Vec<String>) {
    let slices_by_service = slices_by_service(world);
    let mut services = Vec::new();
    let mut problems = Vec::new();
    let mut now_translated = Vec::with_capacity(world.services.len());
    let mut previous = std::mem::take(translated_services).into_iter();
    for (key, svc) in world.services.entries() {
        let slices: &[&Arc<StoredSlice>] = match (
            svc.metadata.namespace.as_deref(),
            svc.metadata.name.as_deref(),
        ) {
            (Some(namespace), Some(name)) => slices_by_service
                .get(&(namespace, name))
                .map_or(&[], Vec::as_slice),
            _ => &[],
        };
        let same = |seen: &TranslatedService| {
            Arc::ptr_eq(&seen.service, svc)
                && seen.slices.len() == slices.len()
                && seen
                    .slices
                    .iter()
                    .zip(slices)
                    .all(|(a, b)| Arc::ptr_eq(a, b))
        };
        let (key, mut translated) = reuse_or_translate(
            &mut previous,
            key,
            same,
            || TranslatedService {
                service: svc.clone(),
                slices: slices.iter().map(|s| Arc::clone(s)).collect(),
                spec: service(svc, world, lookups, slices),
                modeled: None,
            },
            |_, _| {},
        );
        let TranslatedService { spec, modeled, .. } = &mut translated;
        match spec {
            // Its objects and the model's pods are the same: so are its endpoints.
            Ok(Some(_)) if !members_changed && modeled.is_some() => {
                services.extend(modeled.clone());
            }
            Ok(Some(base)) => {
                let endpoints = base
                    .ready
                    .iter()
                    .filter(|uid| owners.members.contains(uid.as_str()));
                let spec = match modeled {
                    Some(last) if last.endpoints.iter().eq(endpoints.clone()) => last.clone(),
                    _ => {
                        let mut spec = base.spec.clone();
                        spec.endpoints = endpoints.cloned().collect();
                        Arc::new(spec)
                    }
                };
                *modeled = Some(spec.clone());
                services.push(spec);
            }
            Ok(None) => {}
            Err(problem) => problems.push(format!(
                "service {}/{}: {problem}; left out",
                svc.namespace().unwrap_or_default(),
                svc.name_any()
            )),
        }
        now_translated.push((key, translated));
    }
    *translated_services = now_translated;
    (services, problems)
}

/// A pod as a workload: `Ok(None)` when it is not one (finished, host network, not
/// scheduled, no address on another node), `Err` when it is malformed.
fn workload(
    pod: &StoredPod,
    world: &World,
    lookups: &Lookups<'_>,
    options: &ModelOptions,
) -> Result<Option<WorkloadSpec>, String> {
    if !matches!(pod.phase.as_deref(), Some("Running" | "Pending")) || pod.host_network {
        return Ok(None);
    }
    let Some(node) = pod.node_name.clone().filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    let uid = pod.uid.clone().filter(|u| !u.is_empty()).ok_or("no uid")?;
    let namespace = pod.namespace.clone().ok_or("no namespace")?;
    let ips = pod
        .ips
        .iter()
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.parse::<IpAddr>()
                .map_err(|_| format!("status.podIPs: {a:?} is not an address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ips.is_empty() && node != options.node {
        return Ok(None);
    }
    let service_account = pod
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    SpiffeId::check(&options.trust_domain, &namespace, &service_account)
        .map_err(|e| format!("no valid identity: {e}"))?;
    let labels = pod.labels.clone();
    let ns_labels = lookups.namespace_labels(&namespace);
    let ns_mode = ns_labels.and_then(|l| l.get(DATAPLANE_MODE_LABEL).map(String::as_str));
    let pod_mode = labels.get(DATAPLANE_MODE_LABEL).map(String::as_str);
    let sidecar = pod.sidecar;
    let protocol = match enroll::ambient(pod_mode, ns_mode, sidecar) {
        Ok(()) => ProtocolSpec::Hbone,
        Err(_) => ProtocolSpec::Tcp,
    };
    let waypoint = waypoint(&labels, &namespace, world, lookups, Addressed::ToWorkload);
    Ok(Some(WorkloadSpec {
        uid,
        name: pod.name.clone(),
        namespace,
        service_account,
        trust_domain: None,
        ips,
        node,
        protocol,
        netns: None,
        labels,
        waypoint,
        sidecar,
        generate_name: pod.generate_name.clone(),
        owner_references: pod.owner_references.clone(),
        redirection_annotated: pod.redirection_annotated,
    }))
}

/// The waypoint named by `istio.io/use-waypoint` on the object, else on its namespace, as
/// the address ztunnel would dial: the waypoint's Service's cluster IP (or the Gateway's
/// address), HBONE port; or, when the Gateway's address is a hostname naming no Service with
/// a cluster IP, that hostname (refused). `none` on the object opts out of its namespace's
/// waypoint. As in istiod, it is no waypoint (traffic goes direct) while its Gateway is
/// unknown or has no address yet, when the Gateway does not let the object's namespace use
/// it, or when it does not take `traffic`. A waypoint's own pods and Service have none
/// ("waypoints do not have waypoints"): else, in a namespace using it, traffic to the
/// waypoint would be sent to the waypoint again.
fn waypoint(
    labels: &BTreeMap<String, String>,
    namespace: &str,
    world: &World,
    lookups: &Lookups<'_>,
    traffic: Addressed,
) -> Option<WaypointSpec> {
    if labels.get(MANAGED_GATEWAY_LABEL).map(String::as_str) == Some(MESH_CONTROLLER) {
        return None;
    }
    let namespace_labels = lookups.namespace_labels(namespace);
    let carrier = if labels.contains_key(USE_WAYPOINT_LABEL) {
        labels
    } else {
        namespace_labels?
    };
    let name = carrier.get(USE_WAYPOINT_LABEL)?;
    if name == "none" || name.is_empty() {
        return None;
    }
    let in_namespace = carrier
        .get(USE_WAYPOINT_NAMESPACE_LABEL)
        .map_or(namespace, String::as_str);
    // The waypoint's own pods and Service, however deployed, carry its Gateway's name (how
    // istiod knows a waypoint instance).
    if in_namespace == namespace && labels.get(GATEWAY_NAME_LABEL) == Some(name) {
        return None;
    }
    let key = format!("{in_namespace}/{name}");
    let Some(waypoint) = lookups.waypoints.get(&key) else {
        tracing::debug!(waypoint = %key, "no Gateway with an address (yet): not a waypoint");
        return None;
    };
    if !waypoint.allows(in_namespace, namespace, namespace_labels) {
        tracing::debug!(waypoint = %key, namespace,
            "the Gateway's HBONE listener does not allow this namespace");
        return None;
    }
    if !waypoint.takes(traffic) {
        return None;
    }
    let ip = match &waypoint.address {
        WaypointAddress::Ip(ip) => *ip,
        // As ztunnel looks it up: a Service of the Gateway's namespace by that hostname. A
        // hostname naming none is still the waypoint, which ztunnel refuses to send to until
        // it resolves: so traffic is refused rather than sent around the waypoint.
        WaypointAddress::Hostname(hostname) => {
            let ip = waypoints::service_of_hostname(hostname)
                .filter(|(ns, _)| *ns == in_namespace)
                .and_then(|(ns, name)| world.services.get(ns, name)?.spec.as_ref())
                .and_then(|spec| cluster_ips(spec).ok()?.into_iter().next());
            match ip {
                Some(ip) => ip,
                None => {
                    tracing::debug!(waypoint = %key, hostname,
                        "the Gateway's hostname names no Service with a cluster IP (yet)");
                    return Some(WaypointSpec::Unresolved(hostname.clone()));
                }
            }
        }
        WaypointAddress::Unusable => {
            tracing::debug!(waypoint = %key, "the Gateway has no address of a known type");
            return None;
        }
    };
    Some(WaypointSpec::At(SocketAddr::new(ip, WAYPOINT_HBONE_PORT)))
}

fn cluster_ips(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Result<Vec<IpAddr>, String> {
    let mut raw: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if raw.is_empty() {
        raw.extend(spec.cluster_ip.as_deref());
    }
    raw.into_iter()
        // Headless services say "None": no virtual address to route by.
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|_| format!("spec.clusterIPs: {ip:?} is not an address"))
        })
        .collect()
}

/// A service with its cluster IPs, TCP ports and ready pod endpoints (`uids`: the workloads
/// of the model). `Ok(None)` for services there is nothing to route by (headless,
/// ExternalName, no TCP port).
fn service(
    svc: &Service,
    world: &World,
    lookups: &Lookups<'_>,
    slices: &[&Arc<StoredSlice>],
) -> Result<Option<ServiceBase>, String> {
    let Some(spec) = &svc.spec else {
        return Err("no spec".into());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let vips = cluster_ips(spec)?;
    if vips.is_empty() {
        return Ok(None);
    }
    let name = svc.name_any();
    let namespace = svc.namespace().ok_or("no namespace")?;
    let ready: BTreeSet<&String> = slices.iter().flat_map(|s| &s.ready_pods).collect();
    let mut ports = Vec::new();
    for port in spec.ports.iter().flatten() {
        if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
            continue;
        }
        let number = u16::try_from(port.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("port {} is not a port number", port.port))?;
        match target_port(port, slices) {
            Ok(target) => ports.push(ServicePortSpec {
                port: number,
                target_port: target,
            }),
            Err(why) => tracing::debug!(service = %format!("{namespace}/{name}"),
                port = number, %why, "port left out"),
        }
    }
    if ports.is_empty() {
        return Ok(None);
    }
    let waypoint = waypoint(
        svc.labels(),
        &namespace,
        world,
        lookups,
        Addressed::ToService,
    );
    Ok(Some(ServiceBase {
        spec: ServiceSpec {
            name,
            namespace,
            hostname: None,
            vips,
            ports,
            endpoints: Vec::new(),
            waypoint,
        },
        ready: ready.into_iter().cloned().collect(),
    }))
}

/// The pods' port for a service port: a number as it is; a name resolved through the
/// EndpointSlices, which carry the resolved number under the service port's name.
fn target_port(port: &ServicePort, slices: &[&Arc<StoredSlice>]) -> Result<Option<u16>, String> {
    let valid = |n: i32| u16::try_from(n).ok().filter(|p| *p > 0);
    match &port.target_port {
        None => Ok(None),
        Some(IntOrString::Int(n)) => valid(*n)
            .map(Some)
            .ok_or_else(|| format!("targetPort {n} is not a port number")),
        Some(IntOrString::String(named)) => {
            let wanted = port.name.as_deref().unwrap_or_default();
            slices
                .iter()
                .flat_map(|s| &s.ports)
                .filter(|(name, _)| name.as_deref().unwrap_or_default() == wanted)
                .find_map(|(_, number)| number.and_then(valid))
                .map(Some)
                .ok_or_else(|| format!("targetPort {named:?} is not resolved by any endpoint"))
        }
    }
}

/// The spec of an Istio object, with its name and namespace, in the file source's shape.
fn spec_with_identity(
    object: &DynamicObject,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let mut spec = match object.data.get("spec") {
        None | Some(serde_json::Value::Null) => serde_json::Map::new(),
        Some(serde_json::Value::Object(map)) => map.clone(),
        Some(_) => return Err("spec is not an object".into()),
    };
    let namespace = object.namespace().ok_or("no namespace")?;
    spec.insert("name".into(), object.name_any().into());
    spec.insert("namespace".into(), namespace.into());
    Ok(spec)
}

fn from_json<T: DeserializeOwned>(
    map: serde_json::Map<String, serde_json::Value>,
) -> Result<T, String> {
    serde_path_to_error::deserialize(serde_json::Value::Object(map)).map_err(|e| {
        let path = e.path().to_string();
        format!("spec.{path}: {}", e.into_inner())
    })
}

/// What becomes of an AuthorizationPolicy that reads.
#[derive(Debug)]
pub enum Authorization {
    Enforced(PolicySpec),
    /// Attached to a waypoint or gateway (`targetRef(s)`): theirs to enforce, as in Istio; not
    /// a problem.
    Attached,
    /// Meant for this data plane's workloads but not enforced by it: why, for its problem line.
    NotEnforced(&'static str),
}

/// An AuthorizationPolicy (security.istio.io/v1). Its spec has the file source's field names
/// (Istio's JSON: `selector.matchLabels`, `action`, `rules[].from[].source`,
/// `rules[].to[].operation`, `rules[].when[]`); dry run is Istio's annotation. Policies ztunnel
/// does not enforce either are not enforced: those attached to a waypoint or gateway, and
/// CUSTOM ones (external authorization). For CUSTOM istiod sends ztunnel nothing and writes
/// "ztunnel does not support the CUSTOM action" on the policy's status; here the problem line
/// says it, since this agent writes no status. Left out, not failed closed: a CUSTOM policy
/// selecting an ingress gateway is enforced by the gateway itself, and ztunnel lets the
/// traffic through.
pub fn authorization_policy(object: &DynamicObject) -> Result<Authorization, String> {
    let mut spec = spec_with_identity(object)?;
    let targeted = ["targetRef", "targetRefs"].into_iter().any(|field| {
        spec.remove(field)
            .is_some_and(|v| !v.is_null() && v != serde_json::json!([]))
    });
    if targeted {
        tracing::debug!(policy = %object.name_any(), "attached to a waypoint or gateway: not ours");
        return Ok(Authorization::Attached);
    }
    if spec.get("action").and_then(|a| a.as_str()) == Some("CUSTOM") {
        return Ok(Authorization::NotEnforced(
            "action CUSTOM (external authorization) is not enforced by this L4 data plane, nor \
             by ztunnel (only a waypoint or gateway enforces it)",
        ));
    }
    spec.insert("dryRun".into(), dry_run(object).into());
    let policy: PolicySpec = from_json(spec)?;
    policy.check().map_err(|e| format!("spec.{e}"))?;
    Ok(Authorization::Enforced(policy))
}

/// A PeerAuthentication (security.istio.io/v1): `selector`, `mtls.mode`, `portLevelMtls`
/// (port numbers as the JSON's string keys), and its creation time, by which Istio settles
/// between several at one scope.
pub fn peer_authentication(object: &DynamicObject) -> Result<PeerAuthenticationSpec, String> {
    let spec = spec_with_identity(object)?;
    let mut pa: PeerAuthenticationSpec = from_json(spec)?;
    pa.check().map_err(|e| format!("spec.{e}"))?;
    pa.created_unix = created_unix(object);
    Ok(pa)
}

/// `metadata.creationTimestamp` in Unix seconds (the API server's precision).
fn created_unix(object: &DynamicObject) -> Option<i64> {
    object
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
}

/// The problem line of a policy that does not read, and what was enforced instead.
fn unreadable(kind: &str, object: &DynamicObject, problem: &str, enforced: &str) -> String {
    format!(
        "{kind} {}/{}: {problem}; {enforced}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// The scope an unreadable policy can be given: its selector if that part reads, else its whole
/// namespace (wider, which for a restriction is the safe side).
fn readable_selector(object: &DynamicObject) -> Option<SelectorSpec> {
    let selector = object.data.get("spec")?.get("selector")?.clone();
    serde_json::from_value::<SelectorSpec>(selector)
        .ok()
        .filter(|s| !s.match_labels.is_empty())
}

/// Fail closed for an AuthorizationPolicy that does not read: it is enforced in its most
/// restrictive form over the widest scope it could have, as Istio's ztunnel does with rules it
/// cannot check. A DENY (or an action that does not read) denies everything in scope; an
/// ALLOW allows nothing in scope (other ALLOW policies still allow what they allow); an AUDIT
/// only logs, so it is left out. Dry run (an annotation, which reads) is kept. Returns the
/// stand-in and the words saying what was done.
pub fn unreadable_authorization_policy(
    object: &DynamicObject,
) -> (Option<PolicySpec>, &'static str) {
    let action = object
        .data
        .get("spec")
        .and_then(|s| s.get("action"))
        .and_then(|a| a.as_str());
    let (action, rules, enforced) = match action {
        None | Some("ALLOW") => (
            ActionSpec::Allow,
            Vec::new(),
            "enforced as allow-nothing on its scope (fail closed)",
        ),
        Some("AUDIT") => return (None, "left out (AUDIT only logs)"),
        Some(_) => (
            ActionSpec::Deny,
            vec![RuleSpec::default()],
            "enforced as deny-all on its scope (fail closed)",
        ),
    };
    let stand_in = PolicySpec {
        name: object.name_any(),
        namespace: object.namespace().unwrap_or_default(),
        action,
        selector: readable_selector(object),
        rules,
        dry_run: dry_run(object),
    };
    (Some(stand_in), enforced)
}

/// Whether the policy is in dry run (`istio.io/dry-run`): true for the values istiod reads as
/// true (Go's `strconv.ParseBool`), so that a policy istiod would not enforce is not enforced
/// here either.
fn dry_run(object: &DynamicObject) -> bool {
    object
        .annotations()
        .get(DRY_RUN_ANNOTATION)
        .is_some_and(|v| matches!(v.as_str(), "1" | "t" | "T" | "true" | "TRUE" | "True"))
}

/// Fail closed for a PeerAuthentication that does not read: STRICT over the widest scope it
/// could have (its selector if that reads, else its namespace; the mesh in the root namespace),
/// since any other mode, or a port override, could only accept plaintext that STRICT refuses.
pub fn unreadable_peer_authentication(
    object: &DynamicObject,
) -> (Option<PeerAuthenticationSpec>, &'static str) {
    let stand_in = PeerAuthenticationSpec {
        name: object.name_any(),
        namespace: object.namespace().unwrap_or_default(),
        selector: readable_selector(object),
        mtls: MtlsSpec {
            mode: MtlsModeSpec::Strict,
        },
        port_level_mtls: BTreeMap::new(),
        // Its real age: in Istio an older one at its scope would win whatever it says, and a
        // newer one would lose to it, so STRICT applies where it could have applied.
        created_unix: created_unix(object),
    };
    (
        Some(stand_in),
        "enforced as STRICT on its scope (fail closed)",
    )
}
