//! Istio's standard TCP metrics (`istio_tcp_*`), with Istio's label names, so that existing
//! dashboards and Kiali read this data plane as they read ztunnel.
//!
//! Each worker keeps its own counters per label set. A label set seen for the first time is
//! handed to the scraper through a lock-free queue (the only cross-thread step, once per label
//! set); after that the worker only stores into counters it alone writes. The scraper, on an
//! admin thread, sums the workers' counters per label set when Prometheus asks.
//!
//! Label sets come and go with workloads, versions and bare pods (a pod without a controlling
//! owner is labelled by its own name): a worker retires a series no connection holds once its
//! counters have not moved for [`IDLE`], and the scraper shows it once more with its final
//! counts before forgetting it, so memory follows the traffic of the last minutes, not the
//! process's lifetime.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use mesh_core::identity::SpiffeId;
use mesh_core::index::{ServiceName, Workload};

use crate::stats::Counter;

/// Which side of the connection reports it: Istio's `reporter` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reporter {
    Source,
    Destination,
}

/// One endpoint of a connection as Istio labels it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub canonical_service: String,
    pub canonical_revision: String,
}

/// A [`Peer`] borrowed from the snapshot, so that finding a connection's series allocates
/// nothing once the series exists.
#[derive(Clone, Copy, Debug)]
pub struct PeerRef<'a> {
    pub workload: &'a str,
    pub namespace: &'a str,
    pub principal: Option<&'a SpiffeId>,
    pub canonical_service: &'a str,
    pub canonical_revision: &'a str,
}

impl<'a> PeerRef<'a> {
    pub const UNKNOWN: PeerRef<'static> = PeerRef {
        workload: UNKNOWN,
        namespace: UNKNOWN,
        principal: None,
        canonical_service: UNKNOWN,
        canonical_revision: UNKNOWN,
    };

    /// A workload the snapshot knows, under Istio's workload name (a Deployment's pods as
    /// their Deployment), not its pod name.
    pub fn workload(w: &'a Workload) -> PeerRef<'a> {
        PeerRef {
            workload: &w.owner.workload_name,
            namespace: &w.owner.namespace,
            principal: Some(&w.owner.identity),
            canonical_service: &w.owner.canonical_service,
            canonical_revision: &w.owner.canonical_revision,
        }
    }

    /// A peer known only by its verified identity (not in this node's snapshot).
    pub fn identity(id: &'a SpiffeId) -> PeerRef<'a> {
        PeerRef {
            namespace: id.namespace(),
            principal: Some(id),
            ..PeerRef::UNKNOWN
        }
    }

    fn to_owned(self) -> Peer {
        Peer {
            workload: self.workload.to_owned(),
            namespace: self.namespace.to_owned(),
            principal: self
                .principal
                .map_or_else(|| UNKNOWN.to_owned(), |p| p.to_string()),
            canonical_service: self.canonical_service.to_owned(),
            canonical_revision: self.canonical_revision.to_owned(),
        }
    }

    fn matches(&self, p: &Peer) -> bool {
        let principal = match self.principal {
            Some(id) => p
                .principal
                .strip_prefix("spiffe://")
                .is_some_and(|rest| rest == id.principal()),
            None => p.principal == UNKNOWN,
        };
        principal
            && self.workload == p.workload
            && self.namespace == p.namespace
            && self.canonical_service == p.canonical_service
            && self.canonical_revision == p.canonical_revision
    }

    fn hash_into(&self, h: &mut impl Hasher) {
        self.workload.hash(h);
        self.namespace.hash(h);
        self.principal.map(SpiffeId::principal).hash(h);
        self.canonical_service.hash(h);
        self.canonical_revision.hash(h);
    }
}

/// The labels of a connection, borrowed: what a worker looks its series up by.
#[derive(Clone, Copy, Debug)]
pub struct LabelsRef<'a> {
    pub reporter: Reporter,
    pub source: PeerRef<'a>,
    pub destination: PeerRef<'a>,
    pub service: Option<&'a ServiceName>,
    pub security: Security,
    /// Istio's `response_flags`: "-" for connections that were made, else why not.
    pub response_flags: &'static str,
}

impl LabelsRef<'_> {
    /// The same labels for a connection that failed for `flags`.
    pub fn failed(self, flags: &'static str) -> Self {
        LabelsRef {
            response_flags: flags,
            ..self
        }
    }

    fn key(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.reporter.hash(&mut h);
        self.source.hash_into(&mut h);
        self.destination.hash_into(&mut h);
        self.service.map(|s| &s.hostname).hash(&mut h);
        self.security.hash(&mut h);
        self.response_flags.hash(&mut h);
        h.finish()
    }

    fn matches(&self, l: &TcpLabels) -> bool {
        self.reporter == l.reporter
            && self.security == l.security
            && self.response_flags == l.response_flags
            && self.source.matches(&l.source)
            && self.destination.matches(&l.destination)
            && match self.service {
                Some(s) => {
                    s.hostname == l.destination_service
                        && s.name == l.destination_service_name
                        && s.namespace == l.destination_service_namespace
                }
                None => l.destination_service == UNKNOWN,
            }
    }

    fn to_owned(self) -> TcpLabels {
        let (destination_service, destination_service_name, destination_service_namespace) =
            match self.service {
                Some(s) => (s.hostname.clone(), s.name.clone(), s.namespace.clone()),
                None => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
            };
        TcpLabels {
            reporter: self.reporter,
            source: self.source.to_owned(),
            destination: self.destination.to_owned(),
            destination_service,
            destination_service_name,
            destination_service_namespace,
            security: self.security,
            response_flags: self.response_flags,
        }
    }
}

const UNKNOWN: &str = "unknown";

/// Istio's `connection_security_policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Security {
    MutualTls,
    None,
}

impl Security {
    fn label(self) -> &'static str {
        match self {
            Security::MutualTls => "mutual_tls",
            Security::None => "none",
        }
    }
}

/// The labels of one `istio_tcp_*` series.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source: Peer,
    pub destination: Peer,
    /// Service hostname (`name.namespace.svc...`), "unknown" when the destination was not
    /// reached through a service.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub security: Security,
    /// Istio's `response_flags`: "-" for connections that were made, else why not.
    pub response_flags: &'static str,
}

impl TcpLabels {
    fn render(&self, out: &mut String) {
        let reporter = match self.reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        };
        let pairs: [(&str, &str); 22] = [
            ("reporter", reporter),
            ("source_workload", &self.source.workload),
            ("source_workload_namespace", &self.source.namespace),
            ("source_principal", &self.source.principal),
            ("source_app", &self.source.canonical_service),
            ("source_version", &self.source.canonical_revision),
            ("source_canonical_service", &self.source.canonical_service),
            ("source_canonical_revision", &self.source.canonical_revision),
            ("source_cluster", CLUSTER),
            ("destination_workload", &self.destination.workload),
            (
                "destination_workload_namespace",
                &self.destination.namespace,
            ),
            ("destination_principal", &self.destination.principal),
            ("destination_app", &self.destination.canonical_service),
            ("destination_version", &self.destination.canonical_revision),
            (
                "destination_canonical_service",
                &self.destination.canonical_service,
            ),
            (
                "destination_canonical_revision",
                &self.destination.canonical_revision,
            ),
            ("destination_service", &self.destination_service),
            ("destination_service_name", &self.destination_service_name),
            (
                "destination_service_namespace",
                &self.destination_service_namespace,
            ),
            ("destination_cluster", CLUSTER),
            ("request_protocol", "tcp"),
            ("connection_security_policy", self.security.label()),
        ];
        out.push('{');
        for (name, value) in pairs {
            let _ = write!(out, "{name}=\"{}\",", escape(value));
        }
        let _ = write!(out, "response_flags=\"{}\"}}", escape(self.response_flags));
    }
}

/// Istio's default cluster id; this data plane serves one cluster.
const CLUSTER: &str = "Kubernetes";

/// Counters of one label set on one worker (single writer: that worker).
#[derive(Debug, Default)]
pub struct TcpCounters {
    pub opened: Counter,
    pub closed: Counter,
    pub failed: Counter,
    /// Istio's sent bytes: from the connection's server back to its client.
    pub sent_bytes: Counter,
    /// Istio's received bytes: from the client toward the server.
    pub received_bytes: Counter,
    /// Set by the worker once nothing can count into these any more: the values are final.
    retired: AtomicBool,
}

impl TcpCounters {
    fn values(&self) -> [u64; 5] {
        [
            self.opened.get(),
            self.closed.get(),
            self.failed.get(),
            self.sent_bytes.get(),
            self.received_bytes.get(),
        ]
    }
}

/// How long a series no connection holds keeps its counters unchanged before it is retired.
const IDLE: Duration = Duration::from_secs(10 * 60);
/// How often, at most, a worker looks for idle series (only when it creates one: that is the
/// only way the map grows).
const SWEEP: Duration = Duration::from_secs(60);
/// References to a series' counters that are not a connection's: the worker's map, and the
/// scraper's queue or list.
const UNHELD: usize = 2;

type Series = (Arc<TcpLabels>, Arc<TcpCounters>);

/// A worker as the scraper sees it: the queue of new series, and the series seen so far.
type ScrapedWorker = (Arc<SegQueue<Series>>, Mutex<Vec<Series>>);

/// A worker's series, and when it last saw it move.
struct Entry {
    series: Series,
    /// The sum of its counters at the last sweep: any change means activity.
    seen: Cell<u64>,
    active_at: Cell<Instant>,
}

/// One worker's side: its series, by a hash of their labels, and the queue that announces
/// new ones to the scraper.
pub struct WorkerMetrics {
    series: RefCell<HashMap<u64, Vec<Entry>>>,
    announce: Arc<SegQueue<Series>>,
    last_sweep: Cell<Instant>,
}

impl WorkerMetrics {
    /// The counters for `labels`, created (and announced to the scraper) on first use.
    pub fn counters(&self, labels: LabelsRef<'_>) -> Arc<TcpCounters> {
        let key = labels.key();
        if let Some(bucket) = self.series.borrow().get(&key) {
            if let Some(e) = bucket.iter().find(|e| labels.matches(&e.series.0)) {
                return e.series.1.clone();
            }
        }
        let now = Instant::now();
        if now.saturating_duration_since(self.last_sweep.get()) >= SWEEP {
            self.sweep(now, IDLE);
        }
        let series: Series = (
            Arc::new(labels.to_owned()),
            Arc::new(TcpCounters::default()),
        );
        let counters = series.1.clone();
        self.series
            .borrow_mut()
            .entry(key)
            .or_default()
            .push(Entry {
                series: series.clone(),
                seen: Cell::new(0),
                active_at: Cell::new(now),
            });
        self.announce.push(series);
        counters
    }

    /// Retires the series that no connection holds and whose counters have not moved for
    /// `idle` (as seen by the sweeps).
    fn sweep(&self, now: Instant, idle: Duration) {
        self.last_sweep.set(now);
        self.series.borrow_mut().retain(|_, bucket| {
            bucket.retain(|e| {
                let c = &e.series.1;
                let activity = c.values().iter().fold(0u64, |a, v| a.wrapping_add(*v));
                if Arc::strong_count(c) > UNHELD || activity != e.seen.get() {
                    e.seen.set(activity);
                    e.active_at.set(now);
                    return true;
                }
                if now.saturating_duration_since(e.active_at.get()) < idle {
                    return true;
                }
                // Out of the map, no connection can find it again, and none holds it: its
                // counts are final for the scraper.
                c.retired.store(true, Ordering::Release);
                false
            });
            !bucket.is_empty()
        });
    }

    /// How many series this worker keeps.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.series.borrow().values().map(Vec::len).sum()
    }

    /// Counts a connection that was not made.
    pub fn fail(&self, labels: LabelsRef<'_>, flags: &'static str) {
        self.counters(labels.failed(flags)).failed.inc();
    }
}

/// The scraper's side: every worker's series, summed per label set when rendered.
#[derive(Default)]
pub struct MetricsRegistry {
    workers: Vec<ScrapedWorker>,
    /// Final counts of retired series whose label set is still live on some worker, so that
    /// its sum never goes down (Prometheus would read that as a reset).
    carry: Mutex<HashMap<TcpLabels, [u64; 5]>>,
}

impl MetricsRegistry {
    /// A registry for `workers` workers and each worker's half.
    pub fn new(workers: usize) -> (MetricsRegistry, Vec<WorkerMetrics>) {
        let mut registry = MetricsRegistry::default();
        let mut halves = Vec::with_capacity(workers);
        for _ in 0..workers {
            let queue = Arc::new(SegQueue::new());
            registry
                .workers
                .push((queue.clone(), Mutex::new(Vec::new())));
            halves.push(WorkerMetrics {
                series: Default::default(),
                announce: queue,
                last_sweep: Cell::new(Instant::now()),
            });
        }
        (registry, halves)
    }

    /// Sums of every counter per label set, over all workers. Retired series are counted
    /// this once more, then forgotten.
    pub fn totals(&self) -> BTreeMap<TcpLabels, [u64; 5]> {
        fn add(sums: &mut [u64; 5], values: [u64; 5]) {
            for (sum, v) in sums.iter_mut().zip(values) {
                *sum += v;
            }
        }
        // Held throughout: two scrapes at once must not both fold a retired series in.
        let mut carry = self.carry.lock().unwrap_or_else(PoisonError::into_inner);
        // (sums, whether some worker still has a live series for it)
        let mut totals: BTreeMap<TcpLabels, ([u64; 5], bool)> = carry
            .iter()
            .map(|(labels, values)| (labels.clone(), (*values, false)))
            .collect();
        for (queue, known) in &self.workers {
            let Ok(mut known) = known.lock() else {
                continue;
            };
            while let Some(series) = queue.pop() {
                known.push(series);
            }
            known.retain(|(labels, c)| {
                // The flag first: the counts written before it was set are final.
                let retired = c.retired.load(Ordering::Acquire);
                let values = c.values();
                let (sums, live) = totals.entry((**labels).clone()).or_default();
                add(sums, values);
                if retired {
                    add(carry.entry((**labels).clone()).or_default(), values);
                } else {
                    *live = true;
                }
                !retired
            });
        }
        // Gone from every worker: shown now with its final counts, absent from the next scrape.
        carry.retain(|labels, _| totals.get(labels).is_some_and(|(_, live)| *live));
        totals
            .into_iter()
            .map(|(labels, (sums, _))| (labels, sums))
            .collect()
    }

    /// How many series the scraper keeps, retired ones' carried counts included.
    #[cfg(test)]
    fn len(&self) -> usize {
        let known: usize = self
            .workers
            .iter()
            .map(|(q, k)| q.len() + k.lock().map_or(0, |k| k.len()))
            .sum();
        known + self.carry.lock().map_or(0, |c| c.len())
    }

    /// Istio's TCP metrics in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        const FAMILIES: [(&str, &str); 5] = [
            (
                "istio_tcp_connections_opened_total",
                "TCP connections opened",
            ),
            (
                "istio_tcp_connections_closed_total",
                "TCP connections closed",
            ),
            (
                "istio_tcp_connections_failed_total",
                "TCP connections that could not be made",
            ),
            (
                "istio_tcp_sent_bytes_total",
                "Bytes sent from the server to the client",
            ),
            (
                "istio_tcp_received_bytes_total",
                "Bytes received from the client by the server",
            ),
        ];
        let totals = self.totals();
        for (i, (name, help)) in FAMILIES.iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} counter");
            for (labels, sums) in &totals {
                // Failed series only carry failures, the others never do.
                if (labels.response_flags == "-") == (i == 2) {
                    continue;
                }
                out.push_str(name);
                labels.render(out);
                let _ = writeln!(out, " {}", sums[i]);
            }
        }
    }
}

/// Escapes a Prometheus label value.
pub fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return value.into();
    }
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::index::Owner;

    fn workload(name: &str) -> Workload {
        Workload {
            uid: name.into(),
            name: name.into(),
            owner: Arc::new(Owner {
                namespace: "default".into(),
                identity: SpiffeId::new("cluster.local", "default", name).expect("identity"),
                canonical_service: name.into(),
                canonical_revision: "latest".into(),
                workload_name: name.into(),
            }),
            ips: Default::default(),
            node: "node".into(),
            protocol: mesh_snapshot::schema::Protocol::Hbone,
            netns: mesh_core::index::NetnsSource::None,
            waypoint: None,
        }
    }

    /// The pod `pod` of the Deployment `deployment` (its workload name).
    fn pod_of(deployment: &str, pod: &str) -> Workload {
        Workload {
            name: pod.into(),
            ..workload(deployment)
        }
    }

    /// The labels of an mTLS connection from `client` to `server`, not through a service.
    fn mutual_tls<'a>(
        reporter: Reporter,
        client: &'a Workload,
        server: &'a Workload,
    ) -> LabelsRef<'a> {
        LabelsRef {
            reporter,
            source: PeerRef::workload(client),
            destination: PeerRef::workload(server),
            service: None,
            security: Security::MutualTls,
            response_flags: "-",
        }
    }

    #[test]
    fn series_from_every_worker_are_summed_per_label_set() {
        let (registry, workers) = MetricsRegistry::new(2);
        let (client, server) = (workload("client"), workload("server"));
        let labels = mutual_tls(Reporter::Destination, &client, &server);
        for (w, bytes) in workers.iter().zip([100, 23]) {
            let c = w.counters(labels);
            c.opened.inc();
            c.sent_bytes.add(bytes);
        }
        workers[1].fail(labels, "DENY");
        let mut text = String::new();
        registry.render(&mut text);
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
                .to_owned()
        };
        let opened = "istio_tcp_connections_opened_total{reporter=\"destination\",source_workload";
        assert!(line(opened).ends_with(" 2"));
        assert!(line("istio_tcp_sent_bytes_total{").ends_with(" 123"));
        let failed = line("istio_tcp_connections_failed_total{");
        assert!(failed.contains("response_flags=\"DENY\"") && failed.ends_with(" 1"));
        let opened = line("istio_tcp_connections_opened_total{");
        assert!(opened.contains("connection_security_policy=\"mutual_tls\""));
        let principal = "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"";
        assert!(opened.contains(principal));
        assert!(opened.contains("destination_canonical_revision=\"latest\""));
        // A series seen before is found again, not created twice.
        let again = workers[0].counters(labels);
        again.closed.inc();
        assert_eq!(registry.totals().len(), 2);
        let mut text = String::new();
        registry.render(&mut text);
        assert!(text.contains("istio_tcp_connections_closed_total{reporter=\"destination\""));
    }

    #[test]
    fn workload_labels_are_istios_workload_names_not_pod_names() {
        let (registry, workers) = MetricsRegistry::new(1);
        let client = pod_of("cart", "cart-7d9f8b6c5-x2x4z");
        let server = pod_of("db", "db-0");
        let labels = mutual_tls(Reporter::Source, &client, &server);
        workers[0].counters(labels).opened.inc();
        let mut text = String::new();
        registry.render(&mut text);
        let opened = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .unwrap_or_else(|| panic!("no series in\n{text}"));
        assert!(opened.contains("source_workload=\"cart\""), "{opened}");
        assert!(opened.contains("destination_workload=\"db\""), "{opened}");
    }

    /// The `istio_tcp_connections_<family>_total` value of the series from `source`, if shown.
    fn scraped(registry: &MetricsRegistry, family: &str, source: &str) -> Option<u64> {
        let mut text = String::new();
        registry.render(&mut text);
        let prefix = format!("istio_tcp_connections_{family}_total{{");
        let label = format!("source_workload=\"{source}\"");
        text.lines()
            .find(|l| l.starts_with(&prefix) && l.contains(&label))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn series_of_departed_pods_leave_after_a_last_scrape() {
        let (registry, workers) = MetricsRegistry::new(2);
        let (old, new, server) = (
            workload("client-7d9f8-abcde"),
            workload("client-5c4b6-fghij"),
            workload("server"),
        );
        let labels = |client| mutual_tls(Reporter::Destination, client, &server);
        let pod = "client-7d9f8-abcde";
        // The old pod: a finished connection on worker 0, one still open on worker 1.
        let done = workers[0].counters(labels(&old));
        done.opened.inc();
        done.closed.inc();
        drop(done);
        let open = workers[1].counters(labels(&old));
        open.opened.inc();
        assert_eq!(scraped(&registry, "opened", pod), Some(2));

        let t0 = Instant::now();
        for w in &workers {
            w.sweep(t0, IDLE);
            w.sweep(t0 + IDLE / 2, IDLE);
        }
        // Not idle long enough yet.
        assert_eq!((workers[0].len(), workers[1].len()), (1, 1));
        for w in &workers {
            w.sweep(t0 + IDLE, IDLE);
        }
        // Worker 0's is retired; worker 1's is held by its open connection.
        assert_eq!((workers[0].len(), workers[1].len()), (0, 1));
        // The sum does not go down while the label set is shown.
        assert_eq!(scraped(&registry, "opened", pod), Some(2));
        assert_eq!(scraped(&registry, "opened", pod), Some(2));

        // The last connection ends and the pod is gone: its final counts are shown once.
        open.closed.inc();
        drop(open);
        workers[1].sweep(t0 + IDLE * 2, IDLE);
        assert_eq!(workers[1].len(), 1, "just closed: not idle yet");
        workers[1].sweep(t0 + IDLE * 3, IDLE);
        assert_eq!(workers[1].len(), 0);
        assert_eq!(scraped(&registry, "closed", pod), Some(2));
        assert_eq!(scraped(&registry, "opened", pod), None);
        assert_eq!(registry.len(), 0, "nothing kept for the old pod");

        // The new pod's series are counted as before.
        workers[0].counters(labels(&new)).opened.inc();
        assert_eq!(scraped(&registry, "opened", "client-5c4b6-fghij"), Some(1));
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn a_retired_label_set_that_comes_back_counts_on() {
        let (registry, workers) = MetricsRegistry::new(2);
        let (client, server) = (workload("client"), workload("server"));
        let labels = mutual_tls(Reporter::Source, &client, &server);
        workers[0].counters(labels).opened.add(5);
        let held = workers[1].counters(labels);
        held.opened.inc();
        assert_eq!(scraped(&registry, "opened", "client"), Some(6));
        let t0 = Instant::now();
        workers[0].sweep(t0, IDLE);
        workers[0].sweep(t0 + IDLE, IDLE);
        assert_eq!(workers[0].len(), 0);
        // Back on worker 0 before any scrape saw it go: 5 carried + 1 + 1, never less than 6.
        workers[0].counters(labels).opened.inc();
        assert_eq!(scraped(&registry, "opened", "client"), Some(7));
        assert_eq!(scraped(&registry, "opened", "client"), Some(7));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("plain"), "plain");
    }
}
