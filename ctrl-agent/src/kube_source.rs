//! The Kubernetes source: watches Pods, Services, EndpointSlices, Namespaces, Istio's
//! AuthorizationPolicy and PeerAuthentication, and the Gateway API's Gateway and GatewayClass
//! (waypoints) with kube's watcher, and hands the agent loop a new model (`FileConfig`, as
//! the file source produces) whenever the cluster changed.
//!
//! List/watch behaviour, mostly kube's watcher:
//! - each kind is listed, then watched from the list's resourceVersion with bookmarks on, and
//!   a dropped watch resumes from the last event's or bookmark's resourceVersion;
//! - a 410 Gone (the resourceVersion is too old: an ERROR event in the watch, or an HTTP 410)
//!   relists; the store of that kind is replaced whole when the relist completes, so objects
//!   deleted during the gap disappear;
//! - failures are retried with kube's default backoff (0.8 s doubling to 30 s, jittered).
//! - objects are watched untyped and converted one at a time (`world::Update`), so a
//!   malformed object is skipped with a warning rather than failing its kind's list; only
//!   what the model reads of an object is stored, and an event that changed none of it
//!   changes nothing (a relist that found everything as it was included);
//! - a 404 on listing a kind defined by a CRD (Istio's, the Gateway API's) is told apart with
//!   API discovery: a kind served at no version (its CRD is not installed) counts as empty;
//!   one served only at other versions than the one read (an Istio before 1.22 serves
//!   v1beta1 only) is an error, and its kind stays unlisted, so nothing is handed over rather
//!   than a cluster without its policies or waypoints; either way the list is retried, so a
//!   CRD installed or upgraded later is picked up.
//!
//! Nothing is handed over until every kind has completed its initial list, nor while any
//! kind is relisting: readers never see a partial cluster. A burst of events is one
//! hand-over (debounced), and a burst that changes nothing the mesh uses is none (most pod
//! events, which report container states, are not even modeled). The watchers run on a
//! thread of their own with a current-thread tokio runtime, so the agent loop stays
//! synchronous.

pub mod model;
pub mod redirection;
pub mod waypoints;
pub mod world;

use std::collections::BTreeSet;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::APIGroup;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};

use crate::config::FileConfig;
use crate::metrics::AgentMetrics;
use model::{Model, ModelOptions, Modeler};
use world::{ApiGroupVersion, Applied, Kind, Update, World};

#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// Where the API server is and how to authenticate (`kube::Config::infer()` in the binary).
    pub client: kube::Config,
    pub model: ModelOptions,
    /// How long the cluster must be quiet before a change is handed over.
    pub debounce: Duration,
    /// A change is handed over after this long even if events keep coming.
    pub max_delay: Duration,
}

impl KubeOptions {
    pub fn new(client: kube::Config, model: ModelOptions) -> KubeOptions {
        KubeOptions {
            client,
            model,
            debounce: Duration::from_millis(50),
            max_delay: Duration::from_secs(1),
        }
    }
}

/// The newest model the watchers produced that the agent loop has not taken yet. Only the
/// newest matters: the loop publishes complete states, and the channel computes the delta.
#[derive(Default)]
pub struct Handoff {
    latest: Mutex<Option<Arc<FileConfig>>>,
}

impl Handoff {
    pub fn put(&self, config: Arc<FileConfig>) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(config);
    }

    pub fn take(&self) -> Option<Arc<FileConfig>> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Starts the watchers on their own thread. Each new model goes to `handoff`, and `wake`
/// tells the agent loop to take it; pods' redirection changes are annotated on the same
/// thread. The client is built here, so that a configuration it cannot use (a bad
/// certificate, say) stops the agent's start with the reason, rather than leaving a thread
/// that never hands anything over.
pub fn start(
    options: KubeOptions,
    handoff: Arc<Handoff>,
    wake: mpsc::Sender<()>,
    redirections: redirection::RedirectionReceiver,
    metrics: Arc<AgentMetrics>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // kube's client spawns its request buffer on the runtime it is built in.
    let client = {
        let _in_runtime = runtime.enter();
        Client::try_from(options.client.clone()).map_err(|error| {
            std::io::Error::other(format!("cannot build the Kubernetes client: {error}"))
        })?
    };
    std::thread::Builder::new()
        .name("kube-source".into())
        .spawn(move || {
            runtime.block_on(async move {
                tokio::spawn(redirection::annotate(client.clone(), redirections));
                run(client, options, handoff, wake, metrics).await;
            })
        })
}

async fn run(
    client: Client,
    options: KubeOptions,
    handoff: Arc<Handoff>,
    wake: mpsc::Sender<()>,
    metrics: Arc<AgentMetrics>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Update>(1024);
    for (kind, resource) in watched() {
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        tokio::spawn(watch(api, kind, tx.clone(), metrics.clone()));
    }
    drop(tx);

    let mut world = World::default();
    let mut modeler = Modeler::new(options.model.clone());
    let mut reported = BTreeSet::new();
    // What was handed over last: most pod events (status, restarts, annotations) change
    // nothing the mesh uses, and those need no translation and diff by the agent.
    let mut handed_over: Option<Arc<FileConfig>> = None;
    // Changes not modeled yet. One that arrives while a kind relists waits for the relist to
    // end, and is modeled then even if the relist itself found everything as it was.
    let mut unmodeled = false;
    while let Some(update) = rx.recv().await {
        let mut changed = world.apply(update) == Applied::Changed;
        // Debounce: take everything that arrives until the cluster is quiet for a moment (or
        // the burst has lasted `max_delay`), then hand over once.
        let burst_end = tokio::time::Instant::now() + options.max_delay;
        loop {
            let quiet_until = (tokio::time::Instant::now() + options.debounce).min(burst_end);
            match tokio::time::timeout_at(quiet_until, rx.recv()).await {
                Ok(Some(update)) => changed |= world.apply(update) == Applied::Changed,
                Ok(None) => return,
                Err(_elapsed) => break,
            }
        }
        unmodeled |= changed;
        // After every burst, changed or not: a relist that begins or ends may change nothing.
        let waiting = world.waiting_for();
        metrics.kinds_waiting(&waiting);
        if !unmodeled {
            continue;
        }
        if !waiting.is_empty() {
            tracing::debug!(?waiting, "not publishing until these kinds are listed");
            continue;
        }
        unmodeled = false;
        let Model { config, problems } = modeler.model(&world);
        // A bad object is named once, not at every change of the cluster.
        let now: BTreeSet<String> = problems.into_iter().collect();
        for problem in now.difference(&reported) {
            tracing::warn!(%problem, "object skipped");
        }
        reported = now;
        if handed_over.as_deref() == Some(&config) {
            tracing::debug!("cluster changed nothing the mesh uses");
            continue;
        }
        tracing::debug!(
            workloads = config.workloads.len(),
            services = config.services.len(),
            policies = config.policies.len(),
            "cluster changed"
        );
        // Shared with the agent, not copied: a model of 100k pods is a deep copy of ~100 MB.
        let config = Arc::new(config);
        handoff.put(config.clone());
        handed_over = Some(config);
        if wake.send(()).is_err() {
            // The agent loop is gone: nothing to publish for.
            return;
        }
    }
}

/// Every kind watched, and where the API server serves it.
fn watched() -> [(Kind, ApiResource); 8] {
    [
        (Kind::Namespaces, ApiResource::erase::<Namespace>(&())),
        (Kind::Pods, ApiResource::erase::<Pod>(&())),
        (Kind::Services, ApiResource::erase::<Service>(&())),
        (
            Kind::EndpointSlices,
            ApiResource::erase::<EndpointSlice>(&()),
        ),
        (
            Kind::AuthorizationPolicies,
            crd_resource(Kind::AuthorizationPolicies, "AuthorizationPolicy"),
        ),
        (
            Kind::PeerAuthentications,
            crd_resource(Kind::PeerAuthentications, "PeerAuthentication"),
        ),
        (Kind::Gateways, crd_resource(Kind::Gateways, "Gateway")),
        (
            Kind::GatewayClasses,
            crd_resource(Kind::GatewayClasses, "GatewayClass"),
        ),
    ]
}

/// A kind defined by a CRD, at the group and version it is read at.
fn crd_resource(kind: Kind, type_name: &str) -> ApiResource {
    let ApiGroupVersion { group, version } = kind.crd().expect("a kind defined by a CRD");
    let gvk = GroupVersionKind::gvk(group, version, type_name);
    ApiResource::from_gvk_with_plural(&gvk, kind.name())
}

/// The API server's status code in a watcher error, if it sent one.
fn status_code(error: &watcher::Error) -> Option<u16> {
    match error {
        watcher::Error::WatchError(status) => Some(status.code),
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => Some(status.code),
        _ => None,
    }
}

/// Where the API server serves a kind defined by a CRD, asked after a 404 on its list.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Served {
    /// At no version (not even the group is served): its CRD is not installed, so no object
    /// of the kind can exist.
    Nowhere,
    /// Only at these versions, not at the one read: objects may exist that cannot be read.
    OnlyAt(Vec<String>),
    /// At the version read after all (the CRD was installed since the list).
    AtVersionRead,
}

/// Asks the API server's discovery where `plural` of group `at.group` is served.
/// `Err` is a failure to ask (not an answer), to be retried.
///
/// Discovery takes several requests (the group, then each version's resources), and CRDs can
/// change in between: read while a kind moves from one version to another, it would seem
/// served nowhere, and its objects be published as none. So the group is read again after
/// its versions, and an answer counts only if the group did not change meanwhile.
async fn discover(client: &Client, at: ApiGroupVersion, plural: &str) -> Result<Served, String> {
    const ATTEMPTS: usize = 3;
    for _ in 0..ATTEMPTS {
        let Some(group) = group_versions(client, at).await? else {
            return Ok(Served::Nowhere);
        };
        // A group's versions are those of all its CRDs: which serve this kind is per version.
        let mut versions = Vec::new();
        for (group_version, version) in &group {
            match client.list_api_group_resources(group_version).await {
                Ok(list) if list.resources.iter().any(|r| r.name == plural) => {
                    versions.push(version.clone());
                }
                Ok(_) => {}
                // Dropped since the group was read: serves nothing.
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => return Err(error.to_string()),
            }
        }
        if group_versions(client, at).await?.as_ref() != Some(&group) {
            continue;
        }
        return Ok(if versions.is_empty() {
            Served::Nowhere
        } else if versions.iter().any(|v| v == at.version) {
            Served::AtVersionRead
        } else {
            Served::OnlyAt(versions)
        });
    }
    Err(format!(
        "the {} group changed during each of {ATTEMPTS} discoveries",
        at.group
    ))
}

/// The (groupVersion, version) pairs `at.group` serves now; `None` when it serves none (no
/// CRD of the group is installed).
async fn group_versions(
    client: &Client,
    at: ApiGroupVersion,
) -> Result<Option<Vec<(String, String)>>, String> {
    let request = http::Request::get(format!("/apis/{}", at.group))
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    match client.request::<APIGroup>(request).await {
        Ok(group) => Ok(Some(
            group
                .versions
                .into_iter()
                .map(|v| (v.group_version, v.version))
                .collect(),
        )),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
        Err(error) => Err(error.to_string()),
    }
}

/// What a 404 on the initial list of a CRD's `kind` means for the world: `Absent` only when
/// discovery finds the kind served nowhere. Anything else leaves the kind unlisted (the list
/// is retried), so that policies or waypoints that exist but cannot be read are never
/// published as none. `told` is the last finding logged, so that a retry finding the same
/// logs nothing.
async fn not_served(
    client: &Client,
    kind: Kind,
    at: ApiGroupVersion,
    told: &mut Option<Served>,
) -> Option<Update> {
    let read_at = format!("{}/{}", at.group, at.version);
    let served = match discover(client, at, kind.name()).await {
        Ok(served) => served,
        Err(error) => {
            tracing::warn!(kind = kind.name(), %error,
                "not served at {read_at}, and API discovery failed; not treated as empty, \
                 retrying");
            return None;
        }
    };
    if told.as_ref() != Some(&served) {
        match &served {
            Served::Nowhere => tracing::warn!(
                kind = kind.name(),
                "no CRD of this kind is installed at {}, so there are no such objects; \
                 treated as empty, retrying",
                at.group
            ),
            Served::OnlyAt(versions) => tracing::error!(kind = kind.name(),
                served_versions = ?versions,
                "the API server serves this kind only at other versions than {read_at} \
                 (an Istio before 1.22, or a Gateway API before 1.0?): its objects cannot \
                 be read, so nothing is published until they can; retrying"),
            Served::AtVersionRead => tracing::info!(
                kind = kind.name(),
                "not found, but discovery says it is served; retrying"
            ),
        }
    }
    let update = (served == Served::Nowhere).then_some(Update::Absent(kind));
    *told = Some(served);
    update
}

/// Runs kube's watcher for one kind for ever, forwarding its events. Objects stay untyped
/// here (see `Update`).
async fn watch(
    api: Api<DynamicObject>,
    kind: Kind,
    tx: tokio::sync::mpsc::Sender<Update>,
    metrics: Arc<AgentMetrics>,
) {
    // Bookmarks are on by default in kube's watcher config; said here because resuming
    // cheaply after a dropped watch depends on them.
    let config = watcher::Config {
        bookmarks: true,
        ..watcher::Config::default()
    };
    // What the last 404 on listing an Istio kind was found to mean, once logged.
    let mut told: Option<Served> = None;
    loop {
        let mut stream = watcher::watcher(api.clone(), config.clone())
            .default_backoff()
            .into_stream()
            .boxed();
        let mut gone = false;
        while let Some(item) = stream.next().await {
            let update = match item {
                Ok(event) => {
                    match &event {
                        watcher::Event::Init => metrics.list_started(kind),
                        watcher::Event::InitApply(_)
                        | watcher::Event::Apply(_)
                        | watcher::Event::Delete(_) => metrics.object_received(kind),
                        watcher::Event::InitDone => {
                            if let (Some(Served::OnlyAt(_)), Some(at)) = (&told, kind.crd()) {
                                tracing::info!(
                                    kind = kind.name(),
                                    "served at {}/{} now: its objects are read",
                                    at.group,
                                    at.version
                                );
                            }
                            // A later 404 is news again.
                            told = None;
                        }
                    }
                    Update::Event(kind, event)
                }
                Err(error) => match (status_code(&error), kind.crd()) {
                    // kube relists by itself after a 410 ERROR event, but an HTTP 410 when
                    // (re)starting a watch leaves it retrying the same resourceVersion for
                    // ever: start a fresh watcher (a relist) for either.
                    (Some(410), _) => {
                        tracing::info!(kind = kind.name(), %error,
                            "resourceVersion too old: relisting");
                        gone = true;
                        break;
                    }
                    (Some(404), Some(at))
                        if matches!(error, watcher::Error::InitialListFailed(_)) =>
                    {
                        let client = api.clone().into_client();
                        match not_served(&client, kind, at, &mut told).await {
                            Some(update) => update,
                            None => continue,
                        }
                    }
                    // Counted: a 410 is a relist and a 404 an absent CRD, both expected.
                    _ => {
                        metrics.watch_failed(kind);
                        tracing::warn!(kind = kind.name(), %error, "watch failed; retrying with backoff");
                        continue;
                    }
                },
            };
            if tx.send(update).await.is_err() {
                return;
            }
        }
        // A short pause before the relist, so that a server answering 410 to every watch
        // does not get a tight loop of lists. (kube's watcher stream does not end by itself;
        // if it ever did, the same pause applies.)
        let pause = if gone { 200 } else { 1000 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

#[cfg(test)]
mod mock_tests;
#[cfg(test)]
mod tests;
