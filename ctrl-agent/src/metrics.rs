//! The agent's own health, for the SRE who has to tell whether a node's mesh is being fed: what
//! it published and when, whether the cluster's watches are listed, whether this node's pods
//! have certificates and when the first of them expires, what CNI asked, and the process's
//! CPU and memory. Served in Prometheus text with a readiness check (`--metrics-addr`), beside
//! the log filter for clients on the loopback.
//!
//! The data plane keeps serving its last snapshot when the agent stalls, so its own metrics
//! cannot show a stalled agent: a cluster change that never arrives looks the same as no
//! change. These figures can.
//!
//! Counters are atomics written by the agent's threads (never by a data-plane worker) and
//! read by the scrape; the enrollments are counted under the agent's state lock at scrape time.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_io::logs::LogLevel;
use mesh_io::stats::DurationHistogram;
use mesh_snapshot::region::Version;

use crate::agent::{lock, SharedState};
use crate::ca::CaError;
use crate::channel::Footprint;
use crate::cni_api::{Reply, Request};
use crate::kube_source::world::Kind;

/// Bounds of the publish-time histograms, in seconds: a change on a small cluster takes well
/// under a millisecond, a complete snapshot of 100k pods a few hundred.
const PUBLISH_BOUNDS: &[f64] = &[0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// One watched kind's list/watch figures.
#[derive(Debug, Default)]
struct KindFigures {
    /// Listed completely, and not relisting now (nothing is published while a kind is not).
    listed: AtomicBool,
    /// Lists begun: the first, then one per relist (a 410, a watch that could not resume).
    lists: AtomicU64,
    /// Objects received: listed, added, modified or deleted.
    events: AtomicU64,
    /// Failed lists and watches (each retried with backoff).
    errors: AtomicU64,
}

/// Everything the agent counts about itself.
#[derive(Debug)]
pub struct AgentMetrics {
    complete_publications: AtomicU64,
    change_publications: AtomicU64,
    complete_publish: DurationHistogram,
    change_publish: DurationHistogram,
    /// Writes to the region that failed (the data plane keeps the last good snapshot).
    publish_failures: AtomicU64,
    /// Times the source went bad (a file refused), and whether it is now.
    source_refusals: AtomicU64,
    source_refused: AtomicBool,
    epoch: AtomicU64,
    generation: AtomicU64,
    /// 0 until the first publication.
    last_publish_unix_ms: AtomicU64,
    /// The region after the last publication (`Footprint`).
    base_bytes: AtomicU64,
    log_bytes: AtomicU64,
    slot_capacity: AtomicU64,
    region_file_bytes: AtomicU64,
    compactions: AtomicU64,
    /// Identities of this node's pods that want a certificate, and those that have one.
    identities_wanted: AtomicU64,
    certificates: AtomicU64,
    /// The earliest expiry among the certificates held, in Unix seconds; `i64::MAX` for none.
    earliest_expiry_unix: AtomicI64,
    certificates_issued: AtomicU64,
    /// By `CaError::reason_index`.
    certificate_failures: [AtomicU64; CaError::REASONS.len()],
    certificates_expired: AtomicU64,
    kinds: [KindFigures; Kind::ALL.len()],
    /// By request operation and reply, as `cni_api` names them.
    cni: [[AtomicU64; Reply::NAMES.len()]; Request::OPS.len()],
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            complete_publications: AtomicU64::new(0),
            change_publications: AtomicU64::new(0),
            complete_publish: DurationHistogram::new(PUBLISH_BOUNDS),
            change_publish: DurationHistogram::new(PUBLISH_BOUNDS),
            publish_failures: AtomicU64::new(0),
            source_refusals: AtomicU64::new(0),
            source_refused: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            last_publish_unix_ms: AtomicU64::new(0),
            base_bytes: AtomicU64::new(0),
            log_bytes: AtomicU64::new(0),
            slot_capacity: AtomicU64::new(0),
            region_file_bytes: AtomicU64::new(0),
            compactions: AtomicU64::new(0),
            identities_wanted: AtomicU64::new(0),
            certificates: AtomicU64::new(0),
            earliest_expiry_unix: AtomicI64::new(i64::MAX),
            certificates_issued: AtomicU64::new(0),
            certificate_failures: Default::default(),
            certificates_expired: AtomicU64::new(0),
            kinds: Default::default(),
            cni: Default::default(),
        }
    }
}

/// What a publication was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    Complete,
    Change,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl AgentMetrics {
    /// A publication that took `took` from the start of its translation to the region
    /// written. Called from the agent loop only (the histograms have a single writer).
    pub fn published(&self, what: Published, version: Version, took: Duration) {
        let (count, histogram) = match what {
            Published::Complete => (&self.complete_publications, &self.complete_publish),
            Published::Change => (&self.change_publications, &self.change_publish),
        };
        count.fetch_add(1, Ordering::Relaxed);
        histogram.observe(took);
        self.epoch.store(version.epoch, Ordering::Relaxed);
        self.generation.store(version.generation, Ordering::Relaxed);
        self.last_publish_unix_ms
            .store(unix_ms(SystemTime::now()), Ordering::Release);
    }

    /// How much of the region the state published last takes.
    pub fn region(&self, footprint: Footprint) {
        for (figure, value) in [
            (&self.base_bytes, footprint.base_bytes),
            (&self.log_bytes, footprint.log_bytes),
            (&self.slot_capacity, footprint.slot_capacity),
            (&self.region_file_bytes, footprint.file_bytes),
            (&self.compactions, footprint.compactions),
        ] {
            figure.store(value, Ordering::Relaxed);
        }
    }

    pub fn publish_failed(&self) {
        self.publish_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the source's current content was refused (a bad or missing file) or taken.
    /// Counted when the source goes bad, not at every tick it stays so (a missing file is
    /// refused at every tick).
    pub fn source_checked(&self, refused: bool) {
        let was = self.source_refused.swap(refused, Ordering::Relaxed);
        if refused && !was {
            self.source_refusals.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The certificates held after a refresh: how many identities want one, and the expiry
    /// (Unix seconds) of each held.
    pub fn certificates_held(&self, wanted: usize, expiries: impl Iterator<Item = i64>) {
        let mut held = 0u64;
        let mut earliest = i64::MAX;
        for not_after in expiries {
            held += 1;
            earliest = earliest.min(not_after);
        }
        self.identities_wanted
            .store(wanted as u64, Ordering::Relaxed);
        self.certificates.store(held, Ordering::Relaxed);
        self.earliest_expiry_unix.store(earliest, Ordering::Relaxed);
    }

    pub fn certificate_issued(&self) {
        self.certificates_issued.fetch_add(1, Ordering::Relaxed);
    }

    pub fn certificate_failed(&self, error: &CaError) {
        self.certificate_failures[error.reason_index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn certificate_expired(&self) {
        self.certificates_expired.fetch_add(1, Ordering::Relaxed);
    }

    pub fn list_started(&self, kind: Kind) {
        self.kinds[kind as usize]
            .lists
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn object_received(&self, kind: Kind) {
        self.kinds[kind as usize]
            .events
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn watch_failed(&self, kind: Kind) {
        self.kinds[kind as usize]
            .errors
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Which kinds are completely listed now, given those still being (re)listed.
    pub fn kinds_waiting(&self, waiting: &[&str]) {
        for kind in Kind::ALL {
            self.kinds[kind as usize]
                .listed
                .store(!waiting.contains(&kind.name()), Ordering::Relaxed);
        }
    }

    /// A CNI request, by its [`Request::op_index`] (taken before the request is consumed),
    /// and the reply it got.
    pub fn cni_answered(&self, op: usize, reply: &Reply) {
        if let Some(row) = self.cni.get(op) {
            row[reply.name_index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ready once something was published: the data plane has a view of the cluster to serve.
    pub fn readiness(&self) -> Result<(), String> {
        if self.last_publish_unix_ms.load(Ordering::Acquire) != 0 {
            return Ok(());
        }
        if self.source_refused.load(Ordering::Relaxed) {
            return Err(
                "no snapshot published yet: the source's content is refused (see the log)".into(),
            );
        }
        let waiting: Vec<&str> = Kind::ALL
            .into_iter()
            .filter(|k| {
                let figures = &self.kinds[*k as usize];
                figures.lists.load(Ordering::Relaxed) > 0 && !figures.listed.load(Ordering::Relaxed)
            })
            .map(Kind::name)
            .collect();
        if waiting.is_empty() {
            Err("no snapshot published yet".into())
        } else {
            Err(format!(
                "no snapshot published yet: listing {}",
                waiting.join(", ")
            ))
        }
    }

    /// Everything in Prometheus text format. `shared` (the agent's state, locked briefly)
    /// gives the enrollments; `kube` whether the cluster's figures apply.
    pub fn render(&self, shared: Option<&SharedState>, kube: bool) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(out, "# TYPE meshagent_snapshot_publications_total counter");
        for (kind, count) in [
            ("complete", &self.complete_publications),
            ("change", &self.change_publications),
        ] {
            let _ = writeln!(
                out,
                "meshagent_snapshot_publications_total{{kind=\"{kind}\"}} {}",
                load(count)
            );
        }
        let _ = writeln!(out, "# TYPE meshagent_snapshot_publish_seconds histogram");
        self.complete_publish.render(
            "meshagent_snapshot_publish_seconds",
            "kind=\"complete\"",
            &mut out,
        );
        self.change_publish.render(
            "meshagent_snapshot_publish_seconds",
            "kind=\"change\"",
            &mut out,
        );
        let last_ms = self.last_publish_unix_ms.load(Ordering::Acquire);
        let earliest = self.earliest_expiry_unix.load(Ordering::Relaxed);
        let mut gauges = vec![
            ("meshagent_snapshot_epoch", load(&self.epoch) as f64),
            (
                "meshagent_snapshot_generation",
                load(&self.generation) as f64,
            ),
            (
                "meshagent_source_refused",
                f64::from(u8::from(self.source_refused.load(Ordering::Relaxed))),
            ),
            (
                "meshagent_identities_wanted",
                load(&self.identities_wanted) as f64,
            ),
            ("meshagent_certificates", load(&self.certificates) as f64),
        ];
        for (name, value) in [
            ("meshagent_snapshot_base_bytes", &self.base_bytes),
            ("meshagent_snapshot_log_bytes", &self.log_bytes),
            (
                "meshagent_snapshot_slot_capacity_bytes",
                &self.slot_capacity,
            ),
            (
                "meshagent_snapshot_region_memory_bytes",
                &self.region_file_bytes,
            ),
        ] {
            gauges.push((name, load(value) as f64));
        }
        // Left out until there is one: a 0 would read as "published in 1970", "expired".
        if last_ms != 0 {
            gauges.push((
                "meshagent_snapshot_last_publish_timestamp_seconds",
                last_ms as f64 / 1000.0,
            ));
        }
        if earliest != i64::MAX {
            gauges.push((
                "meshagent_certificate_earliest_expiry_timestamp_seconds",
                earliest as f64,
            ));
        }
        for (name, value) in gauges {
            let _ = writeln!(out, "# TYPE {name} gauge\n{name} {value}");
        }
        for (name, value) in [
            (
                "meshagent_snapshot_publish_failures_total",
                &self.publish_failures,
            ),
            ("meshagent_source_refusals_total", &self.source_refusals),
            ("meshagent_snapshot_compactions_total", &self.compactions),
            (
                "meshagent_certificates_issued_total",
                &self.certificates_issued,
            ),
            (
                "meshagent_certificates_expired_total",
                &self.certificates_expired,
            ),
        ] {
            let _ = writeln!(out, "# TYPE {name} counter\n{name} {}", load(value));
        }
        let _ = writeln!(out, "# TYPE meshagent_certificate_failures_total counter");
        for (reason, count) in CaError::REASONS.iter().zip(&self.certificate_failures) {
            let _ = writeln!(
                out,
                "meshagent_certificate_failures_total{{reason=\"{reason}\"}} {}",
                load(count)
            );
        }
        if kube {
            self.render_kinds(&mut out);
        }
        self.render_cni(&mut out);
        if let Some(shared) = shared {
            let (captured, passed) = {
                let state = lock(shared);
                let captured = state.enrollments.iter().filter(|e| e.captured).count();
                (captured, state.enrollments.len() - captured)
            };
            let _ = writeln!(
                out,
                "# TYPE meshagent_enrolled_pods gauge\n\
                 meshagent_enrolled_pods{{captured=\"true\"}} {captured}\n\
                 meshagent_enrolled_pods{{captured=\"false\"}} {passed}"
            );
        }
        mesh_io::procfs::render_process_metrics("meshagent", &mut out);
        out
    }

    fn render_kinds(&self, out: &mut String) {
        type Figure = fn(&KindFigures) -> u64;
        let families: [(&str, &str, Figure); 4] = [
            ("meshagent_kube_listed", "gauge", |f| {
                u64::from(f.listed.load(Ordering::Relaxed))
            }),
            ("meshagent_kube_lists_total", "counter", |f| {
                f.lists.load(Ordering::Relaxed)
            }),
            ("meshagent_kube_objects_received_total", "counter", |f| {
                f.events.load(Ordering::Relaxed)
            }),
            ("meshagent_kube_watch_errors_total", "counter", |f| {
                f.errors.load(Ordering::Relaxed)
            }),
        ];
        for (family, type_, value) in families {
            let _ = writeln!(out, "# TYPE {family} {type_}");
            for kind in Kind::ALL {
                let _ = writeln!(
                    out,
                    "{family}{{kind=\"{}\"}} {}",
                    kind.name(),
                    value(&self.kinds[kind as usize])
                );
            }
        }
    }

    /// Only the pairs that happened: most of the matrix never does.
    fn render_cni(&self, out: &mut String) {
        let _ = writeln!(out, "# TYPE meshagent_cni_requests_total counter");
        for (op, replies) in Request::OPS.iter().zip(&self.cni) {
            for (reply, count) in Reply::NAMES.iter().zip(replies) {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    let _ = writeln!(
                        out,
                        "meshagent_cni_requests_total{{op=\"{op}\",reply=\"{reply}\"}} {count}"
                    );
                }
            }
        }
    }
}

/// Serves `/metrics` (also `/stats/prometheus`, the data plane's path) and `/healthz/ready` on
/// `listener` until `stop` is set, and `/logging` (`GET`: the filter in force; `POST
/// ?level=<RUST_LOG filter>`: a new one) to clients on the pod's loopback only, as the data
/// plane's admin port does: the port faces the pod network. (Bound by the caller before the
/// agent replaces the region, so that a port in use stops the start before anything changed.)
pub fn serve(
    listener: TcpListener,
    endpoint: Endpoint,
    stop: Arc<AtomicBool>,
) -> std::io::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            mesh_io::admin::serve(listener, Arc::new(move |r| endpoint.respond(r)), stop)
        })?;
    Ok(bound)
}

/// What the agent's endpoint answers from.
pub struct Endpoint {
    pub metrics: Arc<AgentMetrics>,
    /// The agent's state, for the enrollments.
    pub shared: Option<SharedState>,
    /// Whether the source is a cluster (its list/watch figures are shown).
    pub kube: bool,
    /// `None`: the filter cannot change in this process.
    pub log_level: Option<LogLevel>,
}

impl Endpoint {
    fn respond(&self, r: &mesh_io::admin::Request<'_>) -> (u16, &'static str, String) {
        match (r.method, r.path) {
            (_, "/metrics" | "/stats/prometheus") => (
                200,
                "text/plain; version=0.0.4",
                self.metrics.render(self.shared.as_ref(), self.kube),
            ),
            (_, "/healthz/ready") => match self.metrics.readiness() {
                Ok(()) => (200, "text/plain", "ready\n".to_owned()),
                Err(why) => (503, "text/plain", format!("{why}\n")),
            },
            // Canonical: a dual-stack listener sees 127.0.0.1 as ::ffff:127.0.0.1.
            (_, "/logging") if !r.peer.to_canonical().is_loopback() => (
                403,
                "text/plain",
                "/logging answers clients on the pod's loopback only (kubectl port-forward)\n"
                    .to_owned(),
            ),
            (method, "/logging") => {
                mesh_io::logs::answer_logging(self.log_level.as_ref(), method, r.query)
            }
            _ => (
                404,
                "text/plain",
                "endpoints: GET /metrics /stats/prometheus /healthz/ready /logging; \
                 POST /logging?level=<filter> (from loopback)\n"
                    .to_owned(),
            ),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
