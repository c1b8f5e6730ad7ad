//! The agent loop: take the source's new model when it changed (the file reread, or the
//! cluster's watchers handing one over), keep this node's certificates fresh, publish a new
//! snapshot generation whenever either (or the set of pods enrolled through CNI) changed. A
//! bad file is reported (field and problem) and changes nothing: the last good snapshot stays
//! published.
//!
//! A change is published as a delta against what was published last (one record in the
//! region's log), and the log is compacted into a complete snapshot once it grows long.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rustls_pki_types::UnixTime;

use mesh_core::identity::SpiffeId;
use mesh_snapshot::delta::State;
use mesh_snapshot::region::{PublishOptions, Version};
use mesh_snapshot::schema::Identity;

use crate::authority::{CertificateAuthority, Renewals};
use crate::ca::IssuedCert;
use crate::channel::{Publication, SnapshotChannel};
use crate::config::{ConfigError, FileConfig, ProtocolSpec};
use crate::enroll::Enrollments;
use crate::metrics::{AgentMetrics, Published};
use crate::source::{Source, SourceOptions};
use crate::translate::{self, Enrolled};

#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Where the model comes from: the file or the cluster.
    pub source: SourceOptions,
    pub node: String,
    pub snapshot_path: PathBuf,
    /// (uid, gid) that owns the region: the data plane's user.
    pub owner: Option<(u32, u32)>,
    pub cert_ttl: Duration,
    /// Extra trust anchors (DER) published next to the CA's root, e.g. during a root rotation.
    pub extra_roots: Vec<Vec<u8>>,
    /// Where pods enrolled through CNI are remembered across restarts.
    pub state_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{path}: {problem}")]
    Config { path: String, problem: ConfigError },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the Kubernetes source: {0}")]
    Start(#[source] std::io::Error),
    #[error(transparent)]
    Region(#[from] mesh_snapshot::RegionError),
}

/// What one pass of the loop did.
#[derive(Debug, PartialEq, Eq)]
pub enum Tick {
    Unchanged,
    Published(Version),
}

/// What the CNI and namespace-channel threads share with the main loop. Only control-plane
/// threads ever take this lock.
pub struct Shared {
    pub node: String,
    /// Shared, not copied, with whoever reads it without the lock held (the publisher).
    pub config: Option<Arc<FileConfig>>,
    pub enrollments: Enrollments,
    /// Data planes listening for enrolled pods' namespaces.
    pub subscribers: Vec<mesh_io::ipc::Channel>,
    /// Enrollments changed since the last publish.
    pub dirty: bool,
    /// Captured and released pods go here to be annotated (Kubernetes source only).
    pub redirections: Option<crate::kube_source::redirection::RedirectionSender>,
    /// Sandboxes whose ADD waits for the data plane's listeners: annotated once served.
    pub awaiting: std::collections::HashSet<String>,
    /// Another agent serves the node's CNI socket (a rolling update's next pod): this one no
    /// longer changes enrollments, capture rules or annotations, and only keeps its own data
    /// plane fed while that drains (`cni_server::take_over`).
    pub handed_over: bool,
    /// The agent's own figures (`metrics`), counted by every thread of it.
    pub metrics: Arc<AgentMetrics>,
}

pub type SharedState = Arc<Mutex<Shared>>;

/// Takes the lock even if a thread panicked while holding it (the state stays usable).
pub fn lock(shared: &SharedState) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Agent {
    options: AgentOptions,
    ca: CertificateAuthority,
    /// When certificates are due, and when to retry those that could not be issued.
    renewals: Renewals,
    channel: SnapshotChannel,
    source: Source,
    shared: SharedState,
    certs: BTreeMap<SpiffeId, IssuedCert>,
    wake: (mpsc::Sender<()>, mpsc::Receiver<()>),
    /// The model and enrollments the channel's published state was translated from.
    published_from: Option<(Arc<FileConfig>, Enrolled)>,
    metrics: Arc<AgentMetrics>,
}

impl Agent {
    pub fn new(
        options: AgentOptions,
        ca: impl Into<CertificateAuthority>,
    ) -> Result<Agent, AgentError> {
        // Read before the region is replaced: the data plane adopts our first publication, and
        // an unreachable CA must not cost local pods their still-valid identities.
        let ca = ca.into();
        let roots = ca.trust_roots(&options.extra_roots);
        let certs = previous_certificates(&options.snapshot_path, &roots, SystemTime::now());
        let channel = SnapshotChannel::create(
            &options.snapshot_path,
            PublishOptions {
                owner: options.owner,
                ..PublishOptions::default()
            },
        )?;
        let (enrollments, dropped) = Enrollments::load(&options.state_dir.join("enrollments.json"));
        for why in dropped {
            tracing::warn!(%why, "forgetting an enrollment");
        }
        refresh_capture_rules(&enrollments);
        let wake = mpsc::channel();
        let metrics = Arc::new(AgentMetrics::default());
        let source = Source::start(options.source.clone(), wake.0.clone(), metrics.clone())?;
        let shared = Arc::new(Mutex::new(Shared {
            node: options.node.clone(),
            config: None,
            enrollments,
            subscribers: Vec::new(),
            dirty: true,
            redirections: source.redirections(),
            awaiting: Default::default(),
            handed_over: false,
            metrics: metrics.clone(),
        }));
        Ok(Agent {
            options,
            ca,
            renewals: Renewals::default(),
            channel,
            source,
            shared,
            certs,
            wake,
            published_from: None,
            metrics,
        })
    }

    /// What the agent counts about itself, for `metrics::serve`.
    pub fn metrics(&self) -> Arc<AgentMetrics> {
        self.metrics.clone()
    }

    /// Whether the model comes from the cluster (which has list/watch figures of its own).
    pub fn watches_a_cluster(&self) -> bool {
        self.source.is_cluster()
    }

    /// The state the CNI server shares, and how it asks the loop to publish.
    pub fn handles(&self) -> (SharedState, mpsc::Sender<()>) {
        (self.shared.clone(), self.wake.0.clone())
    }

    /// Checks the source and the certificates; publishes if anything changed. An error means
    /// the file was refused; what was published before stays.
    pub fn tick(&mut self, now: SystemTime) -> Result<Tick, AgentError> {
        let mut changed = false;
        let polled = self.source.poll();
        match &polled {
            Ok(Some(_)) => self.metrics.source_checked(false),
            Err(_) => self.metrics.source_checked(true),
            Ok(None) => {}
        }
        if let Some(config) = polled? {
            let mut shared = lock(&self.shared);
            shared.config = Some(config);
            // Labels may have moved pods in or out of the mesh.
            crate::cni_server::reconcile(&mut shared);
            changed = true;
        }
        {
            let mut shared = lock(&self.shared);
            if shared.config.is_none() {
                return Ok(Tick::Unchanged);
            }
            changed |= std::mem::take(&mut shared.dirty);
        }
        // A root rotation reaches the data plane now, not at the next certificate renewal.
        changed |= self.ca.reload_roots();
        changed |= self.refresh_certificates(now);
        if !changed {
            return Ok(Tick::Unchanged);
        }
        self.publish()
    }

    /// Issues missing certificates and renews those past half their lifetime; drops those of
    /// identities no longer on this node. A failed renewal keeps the current certificate (still
    /// valid; the data plane only uses certificates for new handshakes) and is retried with
    /// backoff; a certificate that expires before it could be renewed is dropped.
    fn refresh_certificates(&mut self, now: SystemTime) -> bool {
        let shared = lock(&self.shared);
        let Some(config) = &shared.config else {
            return false;
        };
        let wanted: Vec<SpiffeId> = config
            .workloads
            .iter()
            .filter(|w| w.node == self.options.node && w.protocol == ProtocolSpec::Hbone)
            .filter_map(|w| config.identity(w).ok())
            .collect();
        drop(shared);
        let wanted_count = wanted.len();
        let mut changed = false;
        let before = self.certs.len();
        self.certs.retain(|id, _| wanted.contains(id));
        self.renewals.retain(&wanted);
        self.ca.retain_identities(&wanted);
        changed |= self.certs.len() != before;
        let now_unix = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for id in wanted {
            // Due from halfway through the time granted (see `Renewals::issued`).
            let due = self.renewals.due(&id, self.certs.contains_key(&id), now);
            if due && self.renewals.may_try(&id, now) {
                match self.ca.issue(&id, now, self.options.cert_ttl) {
                    Ok(cert) => {
                        tracing::info!(identity = %id, not_after_unix = cert.not_after_unix, "certificate issued");
                        self.renewals.issued(&id, now, &cert);
                        self.metrics.certificate_issued();
                        self.certs.insert(id, cert);
                        changed = true;
                        continue;
                    }
                    Err(error) => {
                        self.metrics.certificate_failed(&error);
                        self.renewals.failed(&id, now, &error, self.certs.get(&id));
                    }
                }
            }
            if self
                .certs
                .get(&id)
                .is_some_and(|c| c.not_after_unix <= now_unix)
            {
                tracing::error!(identity = %id,
                    "certificate expired and could not be renewed; dropped until one is issued");
                self.certs.remove(&id);
                self.metrics.certificate_expired();
                changed = true;
            }
        }
        self.metrics
            .certificates_held(wanted_count, self.certs.values().map(|c| c.not_after_unix));
        changed
    }

    fn publish(&mut self) -> Result<Tick, AgentError> {
        let began = Instant::now();
        // The CNI server waits on this lock: hold it only to take what the translation reads
        // (about 150 ms of translation at 100k pods).
        let (config, enrolled) = {
            let shared = lock(&self.shared);
            let Some(config) = shared.config.clone() else {
                return Ok(Tick::Unchanged);
            };
            // Captured pods of this node, with the addresses CNI gave them.
            let enrolled: Enrolled = shared
                .enrollments
                .iter()
                .filter(|e| e.captured)
                .map(|e| ((e.pod.namespace.clone(), e.pod.name.clone()), e.ips.clone()))
                .collect();
            (config, enrolled)
        };
        let identities: Vec<Identity> = self
            .certs
            .iter()
            .map(|(id, c)| Identity {
                spiffe_id: id.to_string(),
                cert_chain: c.chain.clone(),
                private_key: c.key_pkcs8.clone(),
                not_before_unix: c.not_before_unix,
                not_after_unix: c.not_after_unix,
            })
            .collect();
        let roots = self.ca.trust_roots(&self.options.extra_roots);
        let source = self.source.describe();
        let node = self.options.node.as_str();
        // Most changes touch a few pods or services: only those are translated and compared,
        // against the model the published state came from. Everything else is small and
        // diffed whole.
        let delta = match (&self.published_from, self.channel.state()) {
            (Some((before, before_enrolled)), Some(current)) => {
                translate::model_changes(before, before_enrolled, &config, &enrolled, node)
                    .and_then(|changes| {
                        let rest = translate::snapshot_rest(
                            &config,
                            node,
                            identities.clone(),
                            roots.clone(),
                            source.clone(),
                        );
                        current.diff_with_changes(
                            &State::from(rest),
                            changes.workloads,
                            changes.services,
                        )
                    })
            }
            _ => None,
        };
        let publication = match delta {
            Some(delta) => self.channel.publish_delta(delta),
            None => {
                let snapshot =
                    translate::snapshot(&config, node, &enrolled, identities, roots, source);
                self.channel.publish_state(State::from(snapshot))
            }
        };
        // What the published state was translated from; unknown after a failed write.
        self.published_from = None;
        let publication = publication.inspect_err(|_| self.metrics.publish_failed())?;
        self.published_from = Some((config, enrolled));
        self.report(publication, began.elapsed())
    }

    fn report(&self, publication: Publication, took: Duration) -> Result<Tick, AgentError> {
        self.metrics.region(self.channel.footprint());
        match publication {
            Publication::Unchanged => Ok(Tick::Unchanged),
            Publication::Delta { version, changes } => {
                self.metrics.published(Published::Change, version, took);
                tracing::info!(
                    generation = version.generation,
                    changes,
                    "snapshot change published"
                );
                Ok(Tick::Published(version))
            }
            Publication::Full(version) => {
                self.metrics.published(Published::Complete, version, took);
                let state = self.channel.state();
                let count = |f: fn(&State) -> usize| state.map_or(0, f);
                tracing::info!(
                    generation = version.generation,
                    workloads = count(|s| s.workloads.len()),
                    services = count(|s| s.services.len()),
                    policies = count(|s| s.policies.len()),
                    identities = count(|s| s.identities.len()),
                    "snapshot published"
                );
                Ok(Tick::Published(version))
            }
        }
    }

    /// Runs ticks every `interval`, or sooner when CNI changes an enrollment or the cluster
    /// changed, until `stop` is set. Each distinct problem is logged once.
    pub fn run(mut self, interval: Duration, stop: Arc<AtomicBool>) {
        let mut last_problem = String::new();
        while !stop.load(Ordering::Acquire) {
            match self.tick(SystemTime::now()) {
                Ok(_) => last_problem.clear(),
                Err(error) => {
                    let message = error.to_string();
                    if message != last_problem {
                        tracing::error!(error = %message,
                            "config refused; the last good snapshot stays published");
                        last_problem = message;
                    }
                }
            }
            let _ = self.wake.1.recv_timeout(interval);
        }
    }
}

/// The certificates the previous agent published at `path` that are still valid at `now`. They
/// get no renewal time, so they are due at once: replaced on the first tick if the CA answers,
/// kept until expiry if it does not.
/// The still-valid certificates of the region at `path` that chain to `roots` (the roots this
/// agent will publish: a certificate from a CA replaced meanwhile would fail every handshake).
fn previous_certificates(
    path: &Path,
    roots: &[Vec<u8>],
    now: SystemTime,
) -> BTreeMap<SpiffeId, IssuedCert> {
    let mut certs = BTreeMap::new();
    let state = match mesh_snapshot::Subscriber::new(path).read() {
        Ok(mesh_snapshot::ReadOutcome::New { base, deltas, .. }) => {
            let replayed = mesh_snapshot::delta::replay(None, base.as_ref(), &deltas);
            // Read in place and replaced meanwhile: another agent is publishing.
            if base.as_ref().is_some_and(|b| !b.payload.intact()) {
                tracing::warn!(path = %path.display(),
                    "previous snapshot replaced while read; no certificates carried over");
                return certs;
            }
            match replayed {
                Ok(state) => state,
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error,
                        "previous snapshot does not decode; no certificates carried over");
                    return certs;
                }
            }
        }
        Ok(mesh_snapshot::ReadOutcome::Unchanged) => None,
        Err(mesh_snapshot::RegionError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            tracing::debug!(path = %path.display(), "no previous snapshot");
            return certs;
        }
        Err(error @ mesh_snapshot::RegionError::Empty { .. }) => {
            tracing::debug!(%error, "no certificates to carry over");
            return certs;
        }
        Err(error) => {
            tracing::warn!(%error, "previous snapshot unreadable; no certificates carried over");
            return certs;
        }
    };
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let now_unix = since_epoch.as_secs() as i64;
    let at = UnixTime::since_unix_epoch(since_epoch);
    let mut skipped = 0;
    for identity in state
        .map(|s| s.identities)
        .unwrap_or_default()
        .into_values()
    {
        let usable = identity.not_after_unix > now_unix && !identity.private_key.is_empty();
        let carried = usable
            && match crate::ca::verify_chain(&identity.cert_chain, roots, at) {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(identity = %identity.spiffe_id, %error,
                    "previous certificate does not chain to the current trust roots; not carried over");
                    false
                }
            };
        match identity.spiffe_id.parse::<SpiffeId>() {
            Ok(id) if carried => {
                certs.insert(
                    id,
                    IssuedCert {
                        chain: identity.cert_chain,
                        key_pkcs8: identity.private_key,
                        not_before_unix: identity.not_before_unix,
                        not_after_unix: identity.not_after_unix,
                    },
                );
            }
            _ => skipped += 1,
        }
    }
    tracing::info!(
        carried = certs.len(),
        skipped,
        "certificates carried over from the previous snapshot until renewed"
    );
    certs
}

#[cfg(test)]
mod tests;

/// Installs this agent's capture rules again in every pod captured before it started: pods
/// captured by an older agent get what this one installs (its policy routing, say). One nft
/// transaction per pod; connections already open keep their conntrack state.
fn refresh_capture_rules(enrollments: &Enrollments) {
    for e in enrollments.iter().filter(|e| e.captured) {
        if let Err(error) = mesh_io::redirect::install(&e.netns) {
            tracing::warn!(pod = %format!("{}/{}", e.pod.namespace, e.pod.name), %error,
                "cannot refresh the capture rules of a captured pod; it keeps the ones it has");
        }
    }
}
