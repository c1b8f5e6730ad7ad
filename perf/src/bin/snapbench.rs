//! `snapbench`: the snapshot channel at cluster sizes, measured end to end in one process with
//! the real pieces: the agent's encoders and region publisher, the data plane's snapshot
//! watcher (`mesh_io::watch`, the same function the data plane runs: futex wait, region read,
//! decode, index build or delta apply), and one monoio worker per core that carries 1 KiB
//! ping-pong traffic on loopback while it adopts each index into its view, as the data plane's
//! workers do.
//!
//! For each size: shared-memory bytes per workload (the region file's allocated pages, in
//! steady state and at the peak of a compaction), data-plane memory per workload (private RSS
//! growth for the adopted index and views), time to adopt a full snapshot, publish-to-visible-on-
//! every-worker latency for a one-pod change (p50/p99), the cost of a compaction, and the cost
//! of diffing two complete snapshots (what the file source does per change).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Parser;
use mesh_core::identity::SpiffeId;
use mesh_core::index::{Generation, Index};
use mesh_io::runtime::{self, Driver, DriverChoice};
use mesh_io::view::View;
use mesh_io::watch::{self, WatchStatus};
use mesh_io::worker::Control;
use mesh_snapshot::region::PublishOptions;
use mesh_snapshot::schema::{
    Action, AuthorizationPolicy, Identity, Protocol, Rule, RuleSource, Service, ServicePort,
    Workload,
};
use mesh_snapshot::{Appended, Publisher, ReadOutcome, Snapshot};
use perf::gen;
use perf::report::{self, Provenance};
use perf::sys;

/// Kubernetes objects as an API server serves them (the kube source tests' fixtures).
#[path = "../../../ctrl-agent/tests/fake_apiserver/objects.rs"]
#[allow(dead_code)] // the policy fixtures: the bench lists no policies
mod served;
use serde::Serialize;

#[derive(Parser)]
#[command(about = "Snapshot channel at cluster sizes: bytes, memory, adopt time, change latency")]
struct Args {
    /// Workload counts to measure (services = 1/10, policies = 1/100 of them).
    #[arg(long, value_delimiter = ',', default_values_t = [1_000usize, 100_000, 1_000_000])]
    sizes: Vec<usize>,
    /// Worker threads adopting each index (the data plane runs one per core).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// One-pod changes published per size (at least 5). The p99 of 500 is their fifth
    /// slowest; of 50 it would be the slowest one.
    #[arg(long, default_value_t = 500)]
    changes: usize,
    /// Complete snapshots of the world the data plane holds published, one at a time, over
    /// its index (resyncs: an agent restart, a compaction it was behind for) per size (at
    /// least 1), and as many of a world where every pod changed (rebuilds: the data plane
    /// cannot compare and builds beside the held index); the table shows their medians.
    #[arg(long, default_value_t = 5)]
    resyncs: usize,
    /// Pause after each resync and rebuild, in milliseconds. By default as long as it took, which
    /// lets the data plane free the replaced index. A pause of seconds lets the node's free
    /// memory go cold first (on the lab VM, whose balloon reports free pages, a freed 2 MiB
    /// block is the host's again within about a second), as between two real resyncs.
    #[arg(long)]
    resync_pause_ms: Option<u64>,
    /// Pause before the first complete snapshot of each size, in milliseconds: the memory the
    /// bench just freed goes cold too, as for a data plane started on a node that has been up
    /// a while. By default none.
    #[arg(long, default_value_t = 0)]
    first_pause_ms: u64,
    /// Workers do not carry traffic while they adopt (separates the channel's own cost from
    /// competition for the cores).
    #[arg(long)]
    idle_workers: bool,
    /// I/O driver of the workers: auto (io_uring where allowed), io-uring or epoll.
    #[arg(long, default_value = "auto")]
    driver: DriverChoice,
    /// Largest size at which the Kubernetes source's per-event cost is measured (its cluster
    /// is built as API objects, which takes memory).
    #[arg(long, default_value_t = 100_000)]
    kube_max: usize,
    /// Where the region lives (memory-backed, as in the chart's emptyDir).
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    #[arg(long)]
    no_save: bool,
}

/// The pauses that differ from the defaults, for the report's method line.
fn pauses(args: &Args) -> String {
    let mut said = String::new();
    if args.first_pause_ms > 0 {
        said += &format!(", {} ms pause before the first adopt", args.first_pause_ms);
    }
    if let Some(ms) = args.resync_pause_ms {
        said += &format!(", {ms} ms pause after each resync and rebuild");
    }
    said
}

/// One-pod changes published right after a complete snapshot replaced the index.
const CHANGES_AFTER_REPLACE: usize = 5;

/// Pods per simulated node and per namespace; node-0 is the node this data plane runs on.
const PODS_PER_NODE: usize = 100;
const PODS_PER_NAMESPACE: usize = 100;
const PODS_PER_SERVICE: usize = 10;
const TRUST_DOMAIN: &str = "cluster.local";
/// Pod events timed per size with the Kubernetes source (their medians are reported).
const KUBE_EVENTS: usize = 15;

fn ip(i: usize) -> Vec<u8> {
    let i = i as u32 + 1;
    vec![10, (i >> 16) as u8, (i >> 8) as u8, i as u8]
}

fn service_account(i: usize) -> String {
    format!("sa-{}", i / PODS_PER_SERVICE)
}

fn namespace(i: usize) -> String {
    format!("ns-{}", i / PODS_PER_NAMESPACE)
}

/// A fixed pseudo-random stream (splitmix64): ids look like a cluster's (random UUIDs, random
/// name suffixes), which matters to how well the region compresses them, yet every run
/// publishes the same bytes.
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A generated name part as Kubernetes makes them: `len` characters of its alphabet (no
/// vowels, no look-alikes), as in a ReplicaSet's hash or a pod's suffix.
fn name_part(seed: u64, len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = mix(seed);
    (0..len)
        .map(|_| {
            let c = ALPHABET[(x % ALPHABET.len() as u64) as usize];
            x /= ALPHABET.len() as u64;
            c as char
        })
        .collect()
}

/// A pod's uid: a random (version 4) UUID, as the API server assigns.
fn pod_uid(i: usize) -> String {
    let (a, b) = (mix(i as u64 ^ 0x5eed), mix(!(i as u64)));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

/// A pod as the agent publishes it: labels for this node's pods only (their policies select
/// by label), canonical names for every pod.
fn workload(i: usize) -> Workload {
    let node = i / PODS_PER_NODE;
    let service = i / PODS_PER_SERVICE;
    let template_hash = name_part(service as u64 | 1 << 40, 9);
    let name = format!("app-{service}-{template_hash}-{}", name_part(i as u64, 5));
    let labels = [
        ("app".to_owned(), format!("app-{service}")),
        ("version".to_owned(), "v1".to_owned()),
        ("pod-template-hash".to_owned(), template_hash),
    ]
    .into();
    let (canonical_service, canonical_revision) =
        mesh_snapshot::schema::canonical_names(&name, &labels);
    Workload {
        uid: pod_uid(i),
        name,
        namespace: namespace(i),
        service_account: service_account(i),
        trust_domain: TRUST_DOMAIN.into(),
        ips: vec![ip(i)],
        node: format!("node-{node}"),
        protocol: Protocol::Hbone as i32,
        waypoint: String::new(),
        netns_path: String::new(),
        labels: if node == 0 {
            labels
        } else {
            Default::default()
        },
        netns_from_agent: node == 0,
        canonical_service,
        canonical_revision,
        // Its Deployment's: the name less the ReplicaSet hash and pod suffix.
        workload_name: format!("app-{}", i / PODS_PER_SERVICE),
        unresolved_waypoint: String::new(),
    }
}

fn snapshot(size: usize, ca: &ctrl_agent::ca::LocalCa) -> anyhow::Result<Snapshot> {
    let workloads: Vec<Workload> = (0..size).map(workload).collect();
    let services = (0..size.div_ceil(PODS_PER_SERVICE))
        .map(|s| {
            let first = s * PODS_PER_SERVICE;
            Service {
                name: format!("app-{s}"),
                namespace: namespace(first),
                hostname: format!("app-{s}.{}.svc.cluster.local", namespace(first)),
                vips: vec![vec![172, 16 + (s >> 16) as u8, (s >> 8) as u8, s as u8]],
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                }],
                endpoints: workloads[first..(first + PODS_PER_SERVICE).min(size)]
                    .iter()
                    .map(|w| w.uid.clone())
                    .collect(),
                waypoint: String::new(),
                unresolved_waypoint: String::new(),
            }
        })
        .collect();
    // One policy per namespace: allow its own service accounts.
    let policies = (0..size.div_ceil(PODS_PER_NAMESPACE))
        .map(|n| AuthorizationPolicy {
            name: "allow-same-namespace".into(),
            namespace: format!("ns-{n}"),
            action: Action::Allow as i32,
            rules: vec![Rule {
                from: vec![RuleSource {
                    namespaces: vec![format!("ns-{n}")],
                    ..RuleSource::default()
                }],
                ..Rule::default()
            }],
            ..AuthorizationPolicy::default()
        })
        .collect();
    // Certificates only for the identities of this node's pods.
    let now = SystemTime::now();
    let mut identities = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..PODS_PER_NODE.min(size) {
        let id = SpiffeId::new(TRUST_DOMAIN, &namespace(i), &service_account(i))?;
        if seen.insert(id.to_string()) {
            let cert = ca.issue(&id, now, Duration::from_secs(86400))?;
            identities.push(Identity {
                spiffe_id: id.to_string(),
                cert_chain: cert.chain,
                private_key: cert.key_pkcs8,
                not_before_unix: cert.not_before_unix,
                not_after_unix: cert.not_after_unix,
            });
        }
    }
    Ok(Snapshot {
        node: "node-0".into(),
        workloads,
        services,
        policies,
        identities,
        trust_roots: vec![ca.root_der().to_vec()],
        source: format!("snapbench {size} workloads"),
        ..Snapshot::default()
    })
}

#[derive(Clone, Debug, Serialize)]
struct SizeResult {
    workloads: usize,
    services: usize,
    policies: usize,
    encoded_bytes: usize,
    /// Pages the region file occupies in steady state: one slot (base and log) and the header.
    region_bytes: u64,
    region_bytes_per_workload: f64,
    /// Pages occupied while a compaction has written the new base and not yet released the
    /// old slot: the old slot's pages (measured) plus the new base.
    region_peak_bytes: u64,
    /// Private RSS growth (`RssAnon`) for the adopted index held by the watcher and every
    /// worker's view. Before the region stored small bases as is this was `VmRSS`, which
    /// also counted the region's pages, twice: the publisher and the watcher map them in this
    /// one process.
    dataplane_bytes_per_workload: f64,
    encode_ms: f64,
    publish_ms: f64,
    /// From the complete snapshot published to every worker holding it: read, decode, index,
    /// and each worker's view. At least the watcher's own read-to-hand-over time (see
    /// `DataPlane::publish_full`).
    adopt_full_ms: f64,
    /// The same for a complete snapshot of the world the data plane holds, over its index (an
    /// agent restart's resync, a log too long to append to), which the data plane compares
    /// with its index (result files from before `adopt_rebuild_ms` existed timed a build
    /// beside it here). The median of `adopt_replace_samples_ms`, in the order taken.
    adopt_replace_ms: f64,
    adopt_replace_samples_ms: Vec<f64>,
    /// How many of those the data plane took in by comparing (`meshdp_snapshot_compared_adopts_total`).
    adopt_replace_compared: usize,
    /// The same for a complete snapshot in which every pod changed (its protocol flipped):
    /// built beside the held index, on a heap that has served the earlier builds (compared
    /// instead where every pod is fewer than the data plane's comparison takes, 1,024).
    adopt_rebuild_ms: f64,
    adopt_rebuild_compared: usize,
    adopt_rebuild_samples_ms: Vec<f64>,
    adopt_rebuild_page_faults: Vec<u64>,
    /// Minor page faults in the data plane's threads during the first adopt: pages of fresh
    /// memory the index and its build took (a huge page counts once; a later build reuses
    /// much of what earlier ones freed).
    adopt_full_page_faults: u64,
    /// The same for each resync, in order.
    adopt_replace_page_faults: Vec<u64>,
    /// What one page fault costs on this machine (`page_fault_us`): times the counts above,
    /// the share of an adopt spent taking fresh memory from the kernel.
    page_fault_us: f64,
    /// The adopt's big part, timed alone on the bench thread after the run: the index built
    /// from the complete payload, its workloads and services read in place (as the watcher
    /// does).
    adopt_build_ms: f64,
    /// The same payload compared with that index (`Index::rebase_encoded`, a resync of the
    /// world held), timed alone: the median of three.
    adopt_compare_ms: f64,
    /// The same index through a prost decode of the whole payload and a build from the
    /// decoded snapshot (the watcher's way before the in-place reader), for the ratio.
    prost_decode_build_ms: f64,
    /// Freeing that index: what the data plane's `snapshot-free` thread spends on a
    /// generation a new complete snapshot replaced (neither the watcher nor a worker frees
    /// one), through `Index::release`.
    adopt_drop_ms: f64,
    /// The same index dropped plainly, its workloads freed in hash order, for the ratio.
    adopt_drop_hash_order_ms: f64,
    /// A complete snapshot written into a region slot LZ4-compressed and checksummed: the
    /// agent's side of a full publish or compaction. Median of three, timed alone.
    base_write_ms: f64,
    /// The same payload written into a slot as is and checksummed, for the ratio. (Before
    /// the region stored small bases as is: a copy and checksum outside the region.)
    base_write_as_is_ms: f64,
    /// The region's LZ4-compressed base read by a new subscriber: checksummed and decoded
    /// into fresh memory (the first part of a data plane's full adopt). Median of three,
    /// timed alone.
    base_read_ms: f64,
    /// The same payload stored as is, read by a new subscriber: checksummed where it lies,
    /// not copied, for the ratio. (Before the region stored small bases as is: a copy and
    /// checksum outside the region.)
    base_read_as_is_ms: f64,
    /// A new subscriber's read of the LZ4 base and the index built from it, on a warm heap:
    /// a complete adopt's critical path without the hand-off to the workers. Median of three,
    /// timed alone, alternating with the next.
    base_read_build_ms: f64,
    /// The same from the base stored as is, built where it lies.
    base_read_build_as_is_ms: f64,
    /// How the region stores this size's base by default (`lz4` or `as is`, see
    /// `PublishOptions::compress_from`).
    base_stored: String,
    one_pod_change_samples: usize,
    /// Encoding the one-pod delta and appending it to the region (the agent's side).
    one_pod_publish_p50_us: f64,
    /// From the agent starting to publish a one-pod change to the last worker holding it.
    one_pod_change_p50_ms: f64,
    one_pod_change_p99_ms: f64,
    one_pod_change_max_ms: f64,
    /// The same to the first worker holding it. The watcher hands each index to every worker
    /// at once, so what the last one adds is the wait before its loop took the index (on a
    /// busy node, mostly a wait for a core).
    one_pod_change_first_worker_p50_ms: f64,
    one_pod_change_first_worker_p99_ms: f64,
    /// Encoding the complete snapshot and writing it as the new base.
    compact_ms: f64,
    /// A one-pod change right after a compaction (readers that kept up do not reread the base).
    change_after_compaction_ms: f64,
    /// The slowest of [`CHANGES_AFTER_REPLACE`] one-pod changes published one after another
    /// as soon as a complete snapshot had replaced the index: they arrive while the replaced
    /// index is freed (`adopt_drop_ms`), which must not hold them up.
    changes_after_replace_max_ms: f64,
    /// Diffing two complete snapshots that differ by one pod (the file source's way to find
    /// the change; a watch-based source gets the change as an event).
    file_source_diff_ms: f64,
    /// 1 KiB round trips the workers completed during the changes (they carried traffic).
    worker_round_trips: u64,
    /// Per-connection routing on an index carrying just under a fold's worth of pod changes:
    /// a pod address (a VIP miss, then the pod), then a service VIP (round robin over
    /// endpoints), against one lookup of the same pod IPs in a std HashMap built in the same
    /// run (the structure a rebuild-per-snapshot index would use).
    route_by_ip_ns: f64,
    route_by_vip_ns: f64,
    hashmap_lookup_ns: f64,
    /// The ctrl-agent's work for one pod event with the Kubernetes source, at the same size
    /// (same namespaces, services with one EndpointSlice each): model of the cluster,
    /// translation to a snapshot, and the diff against what was published. `None` above
    /// `--kube-max` workloads.
    kube_event: Option<KubeEventCost>,
}

#[derive(Clone, Debug, Serialize)]
struct KubeEventCost {
    /// The heap the source's stores hold per pod, after listing the cluster as an API server
    /// serves it (whole objects, one at a time).
    world_bytes_per_pod: f64,
    /// The heap the kept model holds per pod: the modeler's translations and claims, and the
    /// model it hands over (which shares the workloads).
    model_bytes_per_pod: f64,
    /// A pod event that changes nothing the model reads (a container restart): the store's
    /// apply, and a model if the store said it changed. Median of `KUBE_EVENTS`.
    unread_event_ms: f64,
    /// The model built from scratch (what the source did per burst before it kept one).
    model_ms: f64,
    /// The model the source keeps, brought up to date after a pod moved: the changed pod
    /// translated again, the rest reused. Median of `KUBE_EVENTS`, one after another.
    model_kept_ms: f64,
    /// Translating the whole model, then diffing the complete state against the published
    /// one: what the agent did for every change before it tracked what the last state was
    /// translated from, and still does for a first or complete publication.
    translate_ms: f64,
    diff_ms: f64,
    /// What the agent does now: the old and new kept models' workloads and services compared
    /// (an unchanged pod by pointer), the changed ones translated and diffed, the rest of the
    /// snapshot (policies) diffed whole. Median of `KUBE_EVENTS`, as `model_kept_ms`.
    changed_only_ms: f64,
}

#[derive(Serialize)]
struct SnapReport {
    #[serde(flatten)]
    run: Provenance,
    workers: usize,
    method: String,
    sizes: Vec<SizeResult>,
}

const PING: usize = 1024;

/// The data plane's side: the real snapshot watcher on its own thread, feeding workers that
/// carry traffic and adopt each index into their view.
struct DataPlane {
    stop: Arc<AtomicBool>,
    watcher: Option<std::thread::JoinHandle<()>>,
    to_workers: Vec<flume::Sender<Control>>,
    workers: Vec<std::thread::JoinHandle<std::io::Result<u64>>>,
    adopted: std::sync::mpsc::Receiver<(usize, u64, Instant)>,
    /// Newest generation each worker reported, and when the worker had adopted it.
    holds: Vec<(u64, Instant)>,
    status: Arc<WatchStatus>,
}

impl DataPlane {
    fn start(
        path: &std::path::Path,
        workers: usize,
        driver: Driver,
        traffic: bool,
    ) -> anyhow::Result<DataPlane> {
        let stop = Arc::new(AtomicBool::new(false));
        let (report, adopted) = std::sync::mpsc::channel();
        let mut to_workers = Vec::new();
        let mut handles = Vec::new();
        for id in 0..workers.max(1) {
            let (to, from_watcher) = flume::unbounded::<Control>();
            to_workers.push(to);
            let report = report.clone();
            let stop = stop.clone();
            handles.push(std::thread::spawn(move || {
                runtime::block_on(driver, move || {
                    worker(id, from_watcher, report, stop, traffic)
                })
                .and_then(|r| r)
            }));
        }
        let status = Arc::new(WatchStatus::default());
        let watcher = {
            let path = path.to_owned();
            let to = to_workers.clone();
            let stop = stop.clone();
            let status = status.clone();
            std::thread::spawn(move || watch::watch(path, to, status, stop))
        };
        Ok(DataPlane {
            stop,
            watcher: Some(watcher),
            to_workers,
            workers: handles,
            adopted,
            holds: vec![(0, Instant::now()); workers.max(1)],
            status,
        })
    }

    /// Publishes a complete snapshot; returns how long the publisher took to write it, and
    /// its adopt: from the publication to every worker holding it. That clock starts when
    /// `publish` returns, which can be late: the publication wakes the watcher, whose
    /// real-time class may take this thread's core for the whole read. So the adopt is at
    /// least what the watcher itself timed from its read to the hand-over (its adopt
    /// histogram).
    fn publish_full(
        &mut self,
        publisher: &mut Publisher,
        payload: &[u8],
    ) -> anyhow::Result<FullAdopt> {
        let (count, sum) = self.status.adopt_durations.full.count_and_sum();
        let faults_before = faults_elsewhere()?;
        let started = Instant::now();
        let version = publisher.publish(payload)?;
        let published_at = Instant::now();
        let seen = self.visible(version.generation)? - published_at;
        // The watcher records its time just after the hand-over the workers report.
        let deadline = Instant::now() + Duration::from_secs(10);
        let timed = || self.status.adopt_durations.full.count_and_sum();
        while timed().0 == count {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the watcher timed no complete snapshot"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(FullAdopt {
            publish: published_at - started,
            adopt: seen.max(timed().1 - sum),
            // The bench thread's own faults between its two reads may count as another
            // thread's; never below zero.
            page_faults: faults_elsewhere()?.saturating_sub(faults_before),
        })
    }

    /// Waits until every worker holds `generation`; returns when the last one got it, as the
    /// workers timed it: not when this thread heard of it, which on busy cores can be
    /// milliseconds later and is no part of the channel's latency.
    fn visible(&mut self, generation: u64) -> anyhow::Result<Instant> {
        Ok(self.held_by_all(generation)?.last)
    }

    /// [`DataPlane::visible`], with when the first worker got it too.
    fn held_by_all(&mut self, generation: u64) -> anyhow::Result<Held> {
        while self.holds.iter().any(|&(g, _)| g < generation) {
            let (worker, g, at) = self
                .adopted
                .recv_timeout(Duration::from_secs(120))
                .context("workers stopped adopting")?;
            self.holds[worker] = (g, at);
        }
        // `generation` is the newest published, so what each worker holds now is it.
        let times = || self.holds.iter().map(|&(_, at)| at);
        let now = Instant::now();
        Ok(Held {
            first: times().min().unwrap_or(now),
            last: times().max().unwrap_or(now),
        })
    }

    /// Complete snapshots the watcher took in by comparing them with its index.
    fn compared(&self) -> u64 {
        self.status.compared.load(Ordering::Acquire)
    }

    fn stop(mut self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Release);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        for to in &self.to_workers {
            let _ = to.send(Control::Shutdown);
        }
        let mut round_trips = 0;
        for w in self.workers.drain(..) {
            round_trips += w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
        }
        Ok(round_trips)
    }
}

/// A complete snapshot published and adopted.
struct FullAdopt {
    /// The publisher writing it.
    publish: Duration,
    /// From the publication to every worker holding it.
    adopt: Duration,
    /// Pages the data plane's threads touched for the first time meanwhile.
    page_faults: u64,
}

/// Minor page faults of this process's other threads: while the bench thread publishes and
/// waits, the data plane's (the watcher, its build threads, the workers).
fn faults_elsewhere() -> anyhow::Result<u64> {
    let (process, this_thread) = sys::minor_faults().context("page faults from /proc")?;
    Ok(process - this_thread)
}

/// What one minor page fault costs here, in microseconds: 64 MiB of fresh anonymous memory
/// (as malloc's heaps get it from the kernel), one byte written per page, timed and divided
/// by the faults it took; median of three. On a VM a fault can cost several times what it
/// does on bare metal, and a first adopt touches every page of the index it builds.
fn page_fault_us() -> anyhow::Result<f64> {
    const SIZE: usize = 64 << 20;
    const PAGE: usize = 4096;
    let mut samples = Vec::new();
    for _ in 0..3 {
        let mut fresh = memmap2::MmapMut::map_anon(SIZE)?;
        let (_, before) = sys::minor_faults().context("page faults from /proc")?;
        let t = Instant::now();
        for byte in fresh.iter_mut().step_by(PAGE) {
            *byte = 1;
        }
        let took = t.elapsed();
        let (_, after) = sys::minor_faults().context("page faults from /proc")?;
        std::hint::black_box(&fresh);
        anyhow::ensure!(after > before, "64 MiB of fresh memory took no page fault");
        samples.push(took.as_secs_f64() * 1e6 / (after - before) as f64);
    }
    Ok(report::median(samples))
}

/// One worker: an echo server and a ping-pong client on loopback keep its event loop busy,
/// while it adopts each index between events as the data plane's workers do.
async fn worker(
    id: usize,
    control: flume::Receiver<Control>,
    report: std::sync::mpsc::Sender<(usize, u64, Instant)>,
    stop: Arc<AtomicBool>,
    traffic: bool,
) -> std::io::Result<u64> {
    let listener = monoio::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    monoio::spawn(gen::accept_loop(listener, gen::echo_conn));
    let traffic = monoio::spawn({
        let stop = stop.clone();
        async move {
            use monoio::io::{AsyncReadRentExt, AsyncWriteRentExt};
            let mut conn = monoio::net::TcpStream::connect(addr).await?;
            conn.set_nodelay(true)?;
            let mut buf = vec![7u8; PING];
            let mut round_trips = 0u64;
            while traffic && !stop.load(Ordering::Relaxed) {
                let (res, b) = conn.write_all(buf).await;
                res?;
                let (res, b) = conn.read_exact(b).await;
                res?;
                buf = b;
                round_trips += 1;
            }
            std::io::Result::Ok(round_trips)
        }
    });
    let mut view: Option<View> = None;
    while let Ok(message) = control.recv_async().await {
        match message {
            Control::Adopt(index) => {
                let generation = index.generation().generation;
                view = Some(match &view {
                    Some(previous) => previous.next(index),
                    None => View::build(index),
                });
                let _ = report.send((id, generation, Instant::now()));
            }
            Control::Shutdown => break,
            _ => {}
        }
    }
    stop.store(true, Ordering::Release);
    drop(view);
    traffic.await
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn private_rss() -> f64 {
    mesh_io::procfs::Process::Current
        .status_bytes("RssAnon:")
        .unwrap_or(0) as f64
}

fn allocated(path: &std::path::Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// Nanoseconds per route decision by pod IP and by VIP on an index of `snap`, and per lookup
/// of the same pod IPs in a std HashMap (the baseline).
fn route_costs(snap: &Snapshot) -> anyhow::Result<(f64, f64, f64)> {
    const LOOKUPS: usize = 1_000_000;
    let mut index = Index::build(snap.clone(), Generation::default())?;
    // As the watcher holds it after a run of pod changes: just under a fold's worth of
    // changes waiting in the overlays (every lookup probes them first).
    let changes = (mesh_core::layered::FOLD_MIN - 1).min(snap.workloads.len());
    for n in 0..changes {
        let mut moved = snap.workloads[(n * 7919) % snap.workloads.len()].clone();
        moved.ips = vec![ip(snap.workloads.len() * 2 + n)];
        let delta = mesh_snapshot::Delta {
            workloads: vec![moved],
            ..mesh_snapshot::Delta::default()
        };
        index = index.apply(delta, Generation::default())?;
    }
    let ips: Vec<SocketAddr> = snap
        .workloads
        .iter()
        .filter_map(|w| w.ips.first())
        .filter_map(|b| mesh_core::index::ip_from_bytes(b))
        .map(|ip| SocketAddr::new(ip, 8080))
        .collect();
    let vips: Vec<SocketAddr> = snap
        .services
        .iter()
        .filter_map(|s| s.vips.first())
        .filter_map(|b| mesh_core::index::ip_from_bytes(b))
        .map(|ip| SocketAddr::new(ip, 80))
        .collect();
    anyhow::ensure!(!ips.is_empty() && !vips.is_empty(), "nothing to route to");
    // Spread the keys so consecutive lookups do not share cache lines.
    let pick = |keys: &[SocketAddr], i: usize| keys[i.wrapping_mul(7919) % keys.len()];
    let per = |t: Instant| t.elapsed().as_secs_f64() * 1e9 / LOOKUPS as f64;
    let t = Instant::now();
    for i in 0..LOOKUPS {
        std::hint::black_box(index.route_outbound(pick(&ips, i), i as u64));
    }
    let by_ip = per(t);
    let t = Instant::now();
    for i in 0..LOOKUPS {
        std::hint::black_box(index.route_outbound(pick(&vips, i), i as u64));
    }
    let by_vip = per(t);
    let map: std::collections::HashMap<std::net::IpAddr, usize> =
        ips.iter().enumerate().map(|(i, a)| (a.ip(), i)).collect();
    let t = Instant::now();
    for i in 0..LOOKUPS {
        std::hint::black_box(map.get(&pick(&ips, i).ip()));
    }
    Ok((by_ip, by_vip, per(t)))
}

/// A generated address as Kubernetes writes it.
fn dotted(address: &[u8]) -> String {
    mesh_core::index::ip_from_bytes(address)
        .map(|ip| ip.to_string())
        .unwrap_or_default()
}

/// The Kubernetes source's cluster at `size` pods, as its watchers would have stored it
/// from what an API server serves (each object whole, with managedFields, container specs
/// and statuses), listed one object at a time as the watchers list.
fn kube_world(size: usize) -> ctrl_agent::kube_source::world::World {
    use ctrl_agent::kube_source::world::{Kind, Update, World};
    use kube::runtime::watcher::Event;
    use serde_json::json;
    let pod_ip = |i: usize| dotted(&ip(i));
    let mut world = World::default();
    let mut list = |kind: Kind,
                    api_version: &str,
                    type_name: &str,
                    items: &mut dyn Iterator<Item = serde_json::Value>| {
        world.apply(Update::Event(kind, Event::Init));
        for mut item in items {
            item["apiVersion"] = api_version.into();
            item["kind"] = type_name.into();
            if let Ok(o) = serde_json::from_value::<kube::api::DynamicObject>(item) {
                world.apply(Update::Event(kind, Event::InitApply(o)));
            }
        }
        world.apply(Update::Event(kind, Event::InitDone));
    };
    list(
        Kind::Namespaces,
        "v1",
        "Namespace",
        &mut (0..size.div_ceil(PODS_PER_NAMESPACE)).map(|n| {
            served::namespace(
                &format!("ns-{n}"),
                json!({"istio.io/dataplane-mode": "ambient"}),
            )
        }),
    );
    list(
        Kind::Pods,
        "v1",
        "Pod",
        &mut (0..size).map(|i| {
            let w = workload(i);
            served::pod(
                &w.namespace,
                &w.name,
                &w.uid,
                &w.node,
                &[&pod_ip(i)],
                json!(w.labels),
            )
        }),
    );
    let services = size.div_ceil(PODS_PER_SERVICE);
    list(
        Kind::Services,
        "v1",
        "Service",
        &mut (0..services).map(|s| {
            let vip = format!("172.{}.{}.{}", 16 + (s >> 16), (s >> 8) & 0xff, s & 0xff);
            served::service(
                &namespace(s * PODS_PER_SERVICE),
                &format!("app-{s}"),
                &[&vip],
                &[("http", 80, json!(8080))],
            )
        }),
    );
    list(
        Kind::EndpointSlices,
        "discovery.k8s.io/v1",
        "EndpointSlice",
        &mut (0..services).map(|s| {
            let pods: Vec<(String, String)> = (s * PODS_PER_SERVICE
                ..((s + 1) * PODS_PER_SERVICE).min(size))
                .map(|i| (workload(i).uid, pod_ip(i)))
                .collect();
            let endpoints: Vec<(&str, &str, bool)> = pods
                .iter()
                .map(|(uid, ip)| (uid.as_str(), ip.as_str(), true))
                .collect();
            served::endpoint_slice(
                &namespace(s * PODS_PER_SERVICE),
                &format!("app-{s}"),
                &endpoints,
                &[("http", 8080)],
            )
        }),
    );
    list(
        Kind::AuthorizationPolicies,
        "security.istio.io/v1",
        "AuthorizationPolicy",
        &mut std::iter::empty(),
    );
    list(
        Kind::PeerAuthentications,
        "security.istio.io/v1",
        "PeerAuthentication",
        &mut std::iter::empty(),
    );
    for (kind, type_name) in [
        (Kind::Gateways, "Gateway"),
        (Kind::GatewayClasses, "GatewayClass"),
    ] {
        list(
            kind,
            "gateway.networking.k8s.io/v1",
            type_name,
            &mut std::iter::empty(),
        );
    }
    world
}

/// What one pod event costs the ctrl-agent with the Kubernetes source: the source rebuilds
/// its model of the cluster, the agent translates it to a snapshot and diffs that against
/// what it published last.
fn kube_event_cost(size: usize) -> anyhow::Result<KubeEventCost> {
    use ctrl_agent::kube_source::model::{self, ModelOptions};
    use ctrl_agent::kube_source::world::{Kind, Update};
    let options = ModelOptions {
        node: "node-0".into(),
        trust_domain: TRUST_DOMAIN.into(),
        root_namespace: "istio-system".into(),
    };
    let publish = |world: &ctrl_agent::kube_source::world::World| {
        let t = Instant::now();
        let m = model::model(world, &options);
        let model_time = t.elapsed();
        let t = Instant::now();
        let snap = ctrl_agent::translate::snapshot(
            &m.config,
            &options.node,
            &std::collections::HashMap::new(),
            Vec::new(),
            Vec::new(),
            "kube".into(),
        );
        let translate_time = t.elapsed();
        (m.config, snap, model_time, translate_time)
    };
    // On this (the main) thread, so that the main arena holds the stores.
    let heap_before = runtime::heap_bytes_in_use();
    let mut world = kube_world(size);
    let world_bytes = runtime::heap_bytes_in_use().saturating_sub(heap_before);
    let mut modeler = model::Modeler::new(options.clone());
    let heap_before = runtime::heap_bytes_in_use();
    let before_kept = modeler.model(&world).config;
    let model_bytes = runtime::heap_bytes_in_use().saturating_sub(heap_before);
    let (before_model, before, _, _) = publish(&world);
    let workloads = before_model.workloads.len();
    anyhow::ensure!(
        workloads == size,
        "the model has {workloads} of {size} workloads"
    );
    let mut published = mesh_snapshot::delta::State::from(before);
    let served_pod = |i: usize, address: Vec<u8>| {
        let w = workload(i);
        let ip = dotted(&address);
        let mut pod = served::pod(
            &w.namespace,
            &w.name,
            &w.uid,
            &w.node,
            &[&ip],
            serde_json::json!(w.labels),
        );
        pod["apiVersion"] = "v1".into();
        pod["kind"] = "Pod".into();
        serde_json::from_value::<kube::api::DynamicObject>(pod)
    };
    // A pod restarts with a new address (a watch MODIFIED event): the kept model and the
    // changed entries must give what the model from scratch and the whole diff give.
    let moved = size / 2;
    let object = served_pod(moved, ip(size + 7))?;
    world.apply(Update::Event(
        Kind::Pods,
        kube::runtime::watcher::Event::Apply(object),
    ));
    let after_kept = modeler.model(&world).config;
    let (after_model, after, model_time, translate_time) = publish(&world);
    anyhow::ensure!(
        after_kept == after_model,
        "the kept model differs from the one built from scratch"
    );
    let t = Instant::now();
    let delta = published
        .diff(&mesh_snapshot::delta::State::from(after))
        .context("a delta")?;
    let diff_time = t.elapsed();
    anyhow::ensure!(
        delta.workloads.len() == 1,
        "{} workloads changed",
        delta.workloads.len()
    );
    let none = ctrl_agent::translate::Enrolled::new();
    let changed_only = |before: &ctrl_agent::config::FileConfig,
                        after: &ctrl_agent::config::FileConfig,
                        published: &mesh_snapshot::delta::State| {
        let changes =
            ctrl_agent::translate::model_changes(before, &none, after, &none, &options.node)
                .context("model changes")?;
        let rest = ctrl_agent::translate::snapshot_rest(
            after,
            &options.node,
            Vec::new(),
            Vec::new(),
            "kube".into(),
        );
        published
            .diff_with_changes(
                &mesh_snapshot::delta::State::from(rest),
                changes.workloads,
                changes.services,
            )
            .context("a delta")
    };
    let first = changed_only(&before_kept, &after_kept, &published)?;
    anyhow::ensure!(
        first.workloads == delta.workloads
            && first.removed_workloads == delta.removed_workloads
            && first.services == delta.services
            && first.removed_services == delta.removed_services,
        "the changed-only delta differs from the full diff"
    );
    published.apply(&first);

    // Then a run of events, as a busy cluster sends them: each pod moving to a new address
    // after a container of another restarted. Timed each, reported as medians.
    let (mut unread, mut kept, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = after_kept;
    // Where the moved pods are now: a restart reports a pod where it is.
    let mut moved_to = std::collections::HashMap::from([(moved, ip(size + 7))]);
    for n in 1..=KUBE_EVENTS {
        let restarted = (n * 7919 + size / 3) % size;
        let address = moved_to
            .get(&restarted)
            .cloned()
            .unwrap_or_else(|| ip(restarted));
        let mut event = served_pod(restarted, address)?;
        event.data["status"]["containerStatuses"][0]["restartCount"] = n.into();
        let t = Instant::now();
        let applied = world.apply(Update::Event(
            Kind::Pods,
            kube::runtime::watcher::Event::Apply(event),
        ));
        if applied == ctrl_agent::kube_source::world::Applied::Changed {
            modeler.model(&world);
        }
        unread.push(ms(t.elapsed()));
        anyhow::ensure!(
            applied == ctrl_agent::kube_source::world::Applied::Nothing,
            "a container restart changed the store"
        );
        let moved = (n * 104_729 + size / 2) % size;
        moved_to.insert(moved, ip(size + 7 + n));
        let object = served_pod(moved, ip(size + 7 + n))?;
        world.apply(Update::Event(
            Kind::Pods,
            kube::runtime::watcher::Event::Apply(object),
        ));
        let t = Instant::now();
        let now = modeler.model(&world).config;
        kept.push(ms(t.elapsed()));
        let t = Instant::now();
        let delta = changed_only(&last, &now, &published)?;
        changed.push(ms(t.elapsed()));
        anyhow::ensure!(
            delta.workloads.len() == 1,
            "{} workloads changed",
            delta.workloads.len()
        );
        published.apply(&delta);
        last = now;
    }
    Ok(KubeEventCost {
        world_bytes_per_pod: world_bytes as f64 / size as f64,
        model_bytes_per_pod: model_bytes as f64 / size as f64,
        unread_event_ms: report::median(unread),
        model_ms: ms(model_time),
        model_kept_ms: report::median(kept),
        translate_ms: ms(translate_time),
        diff_ms: ms(diff_time),
        changed_only_ms: report::median(changed),
    })
}

/// The index of a complete snapshot built from its payload in place (what the watcher does
/// when it adopts a base) and through prost (the way before), and its free as the data
/// plane's free thread does it when a base replaced it (`Index::release`) and as a plain
/// drop, each timed alone. Also the region's base written and read both ways it can be
/// stored: LZ4-compressed, and as is (read in place).
fn adopt_parts(snap: &Snapshot, dir: &std::path::Path) -> anyhow::Result<AdoptParts> {
    let payload = mesh_snapshot::encode(snap);
    // LZ4 first, then as is; rounds alternate between the two.
    let mut regions = Vec::new();
    for (name, compress_from) in [("lz4", 0), ("as-is", u64::MAX)] {
        let path = dir.join(format!("snapbench-{}-{name}.region", std::process::id()));
        let options = PublishOptions {
            compress_from,
            ..PublishOptions::default()
        };
        let publisher = Publisher::create(&path, options)?;
        regions.push((path, publisher, compress_from > 0, [vec![], vec![], vec![]]));
    }
    // What a data plane that starts reads: the complete snapshot.
    let new_reader_base = |path: &std::path::Path| -> anyhow::Result<mesh_snapshot::Published> {
        match mesh_snapshot::Subscriber::new(path).read()? {
            ReadOutcome::New {
                base: Some(base), ..
            } => Ok(base),
            _ => anyhow::bail!("the region gave back no base"),
        }
    };
    for _ in 0..3 {
        for (path, publisher, in_place, [writes, reads, built]) in &mut regions {
            let t = Instant::now();
            publisher.publish(&payload)?;
            writes.push(ms(t.elapsed()));
            let t = Instant::now();
            let base = new_reader_base(path)?;
            reads.push(ms(t.elapsed()));
            anyhow::ensure!(
                *base.payload == *payload && base.payload.in_place() == *in_place,
                "the region gave back another payload"
            );
            drop(base);
            // What a data plane's complete adopt does before handing the index out.
            let t = Instant::now();
            let base = new_reader_base(path)?;
            let index =
                Index::build_encoded(&base.payload, Generation::default()).context("index")?;
            anyhow::ensure!(base.payload.intact(), "nothing replaced the base");
            built.push(ms(t.elapsed()));
            index.release();
        }
    }
    let mut timed = Vec::new();
    for (path, publisher, _, [writes, reads, built]) in regions {
        drop(publisher);
        let _ = std::fs::remove_file(&path);
        timed.push([writes, reads, built].map(report::median));
    }
    let [lz4, as_is] = timed[..] else {
        anyhow::bail!("two ways to store a base, two timings");
    };
    let [base_write_ms, base_read_ms, base_read_build_ms] = lz4;
    let [base_write_as_is_ms, base_read_as_is_ms, base_read_build_as_is_ms] = as_is;
    let t = Instant::now();
    let decoded = mesh_snapshot::decode(&payload).context("decode")?;
    let index = Index::build(decoded, Generation::default()).context("index")?;
    let through_prost = t.elapsed();
    drop(index);
    let t = Instant::now();
    let index = Index::build_encoded(&payload, Generation::default()).context("index")?;
    let in_place = t.elapsed();
    // The same payload compared with that index (a resync of the world held), median of 3.
    let mut compared = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let rebased = index
            .rebase_encoded(&payload, Generation::default())
            .context("the world held is compared, not built")?;
        compared.push(t.elapsed());
        anyhow::ensure!(
            rebased.changes == Default::default(),
            "the world held compared as changed: {:?}",
            rebased.changes
        );
    }
    compared.sort();
    let t = Instant::now();
    index.release();
    let release = t.elapsed();
    // The same index dropped as any value is: its workloads freed in hash order.
    let index = Index::build_encoded(&payload, Generation::default()).context("index")?;
    let t = Instant::now();
    drop(index);
    Ok(AdoptParts {
        in_place,
        compared: compared[1],
        through_prost,
        release,
        hash_order_drop: t.elapsed(),
        base_write_ms,
        base_write_as_is_ms,
        base_read_ms,
        base_read_as_is_ms,
        base_read_build_ms,
        base_read_build_as_is_ms,
    })
}

/// When the first and the last worker took in a generation.
struct Held {
    first: Instant,
    last: Instant,
}

struct AdoptParts {
    in_place: Duration,
    compared: Duration,
    through_prost: Duration,
    release: Duration,
    hash_order_drop: Duration,
    base_write_ms: f64,
    base_write_as_is_ms: f64,
    base_read_ms: f64,
    base_read_as_is_ms: f64,
    base_read_build_ms: f64,
    base_read_build_as_is_ms: f64,
}

/// The delta a watch event on one pod turns into.
fn one_pod_delta(workload: &Workload) -> Vec<u8> {
    mesh_snapshot::delta::encode(&mesh_snapshot::Delta {
        workloads: vec![workload.clone()],
        ..mesh_snapshot::Delta::default()
    })
}

/// Appends `delta`, which must fit in the log right `after` what was just published (no
/// complete snapshot in its place).
fn append_to_log(
    publisher: &mut Publisher,
    delta: &[u8],
    after: &str,
) -> anyhow::Result<mesh_snapshot::region::Version> {
    match publisher.append(delta)? {
        Appended::Published(version) => Ok(version),
        Appended::NeedsFull => anyhow::bail!("a one-pod delta did not fit after {after}"),
    }
}

fn measure(
    size: usize,
    args: &Args,
    ca: &ctrl_agent::ca::LocalCa,
    driver: Driver,
) -> anyhow::Result<SizeResult> {
    let mut snap = snapshot(size, ca)?;
    let path = args
        .dir
        .join(format!("snapbench-{}-{size}.region", std::process::id()));
    let t = Instant::now();
    let payload = mesh_snapshot::encode(&snap);
    let encode = t.elapsed();
    let encoded_bytes = payload.len();
    let mut publisher = Publisher::create(&path, PublishOptions::default())?;

    let before = private_rss();
    let mut dataplane = DataPlane::start(&path, args.workers, driver, !args.idle_workers)?;
    std::thread::sleep(Duration::from_millis(args.first_pause_ms));
    let first = dataplane.publish_full(&mut publisher, &payload)?;
    drop(payload);
    let held = private_rss() - before;

    // One-pod changes: a pod moves to a new IP (a restart), as a watch event would report it.
    let samples = args.changes.max(5);
    let mut latencies = Vec::with_capacity(samples);
    let mut first_worker = Vec::with_capacity(samples);
    let mut publishes = Vec::with_capacity(samples);
    for n in 0..samples {
        let pod = (n * 7919) % size;
        snap.workloads[pod].ips = vec![ip(size + n)];
        let t = Instant::now();
        let delta = one_pod_delta(&snap.workloads[pod]);
        let version = match publisher.append(&delta)? {
            Appended::Published(version) => version,
            Appended::NeedsFull => publisher.publish(&mesh_snapshot::encode(&snap))?,
        };
        publishes.push(t.elapsed().as_secs_f64() * 1e6);
        let held = dataplane.held_by_all(version.generation)?;
        latencies.push(ms(held.last - t));
        first_worker.push(ms(held.first - t));
        // Changes arrive one by one, not back to back.
        std::thread::sleep(Duration::from_millis(2));
    }

    // The file source finds a change by diffing two complete snapshots.
    let mut changed = snap.clone();
    changed.workloads[size / 2].ips = vec![ip(size + samples)];
    let t = Instant::now();
    let diff = mesh_snapshot::delta::diff(&snap, &changed).context("a delta")?;
    let file_source_diff = t.elapsed();
    anyhow::ensure!(diff.len() == 1, "diff found {} changes", diff.len());
    drop(changed);

    // A compaction: the new base goes to the other slot, the old one's pages are released.
    let before_compaction = allocated(&path)?;
    let t = Instant::now();
    let compacted = mesh_snapshot::encode(&snap);
    publisher.compact(&compacted)?;
    let compact = t.elapsed();
    // Until the old slot is released, the region holds both bases and the old log.
    let region_peak_bytes = before_compaction + publisher.base_bytes();
    let base_stored = if publisher.base_bytes() == compacted.len() as u64 {
        "as is"
    } else {
        "lz4"
    };
    drop(compacted);
    let region_bytes = allocated(&path)?;
    let pod = size / 3;
    snap.workloads[pod].ips = vec![ip(size + samples + 1)];
    let t = Instant::now();
    let delta = one_pod_delta(&snap.workloads[pod]);
    let version = append_to_log(&mut publisher, &delta, "a compaction")?;
    let change_after_compaction = dataplane.visible(version.generation)? - t;

    // Complete snapshots that replace the index: first the world held (compared with it),
    // then worlds in which every pod changed (built beside it). Then pod changes at once,
    // after a build: the replaced index is freed (tens of milliseconds at 100k) while they
    // arrive.
    let mut flipped = snap.clone();
    for w in &mut flipped.workloads {
        w.protocol = if w.protocol == Protocol::Hbone as i32 {
            Protocol::Tcp as i32
        } else {
            Protocol::Hbone as i32
        };
    }
    let worlds = [
        mesh_snapshot::encode(&flipped),
        mesh_snapshot::encode(&snap),
    ];
    drop(flipped);
    let rounds = args.resyncs.max(1);
    // The replaced index is freed on the data plane's free thread after each (about half a
    // build when it was built whole): let it finish, as it would between two real resyncs.
    let pause = |took: Duration| {
        std::thread::sleep(args.resync_pause_ms.map_or(took, Duration::from_millis));
    };
    let [flipped, same] = &worlds;
    let compared_before = dataplane.compared();
    let (mut resyncs, mut resync_faults) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let adopted = dataplane.publish_full(&mut publisher, same)?;
        resyncs.push(ms(adopted.adopt));
        resync_faults.push(adopted.page_faults);
        pause(adopted.adopt);
    }
    let resyncs_compared = dataplane.compared() - compared_before;
    let compared_before = dataplane.compared();
    let (mut rebuilds, mut rebuild_faults) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let world = if round % 2 == 0 { flipped } else { same };
        let adopted = dataplane.publish_full(&mut publisher, world)?;
        rebuilds.push(ms(adopted.adopt));
        rebuild_faults.push(adopted.page_faults);
        pause(adopted.adopt);
    }
    let rebuilds_compared = dataplane.compared() - compared_before;
    if rounds % 2 == 1 {
        // Back to the held world (a build too, not counted), on which the changes below go.
        pause(dataplane.publish_full(&mut publisher, same)?.adopt);
    }
    drop(worlds);
    let mut changes_after_replace = Duration::ZERO;
    for n in 0..CHANGES_AFTER_REPLACE {
        let pod = (size / 5 + n) % size;
        snap.workloads[pod].ips = vec![ip(size + samples + 2 + n)];
        let t = Instant::now();
        let delta = one_pod_delta(&snap.workloads[pod]);
        let version = append_to_log(&mut publisher, &delta, "a complete snapshot")?;
        changes_after_replace =
            changes_after_replace.max(dataplane.visible(version.generation)? - t);
    }
    let worker_round_trips = dataplane.stop()?;
    let (route_by_ip_ns, route_by_vip_ns, hashmap_lookup_ns) = route_costs(&snap)?;
    let parts = adopt_parts(&snap, &args.dir)?;
    let page_fault_us = page_fault_us()?;
    let kube_event = if size <= args.kube_max {
        Some(kube_event_cost(size)?)
    } else {
        None
    };
    let _ = std::fs::remove_file(&path);

    latencies.sort_by(f64::total_cmp);
    first_worker.sort_by(f64::total_cmp);
    let at = |sorted: &[f64], q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    Ok(SizeResult {
        workloads: size,
        services: snap.services.len(),
        policies: snap.policies.len(),
        encoded_bytes,
        region_bytes,
        region_bytes_per_workload: region_bytes as f64 / size as f64,
        region_peak_bytes,
        dataplane_bytes_per_workload: held / size as f64,
        encode_ms: ms(encode),
        publish_ms: ms(first.publish),
        adopt_full_ms: ms(first.adopt),
        adopt_replace_ms: report::median(resyncs.clone()),
        adopt_replace_samples_ms: resyncs,
        adopt_replace_compared: resyncs_compared as usize,
        adopt_rebuild_ms: report::median(rebuilds.clone()),
        adopt_rebuild_compared: rebuilds_compared as usize,
        adopt_rebuild_samples_ms: rebuilds,
        adopt_rebuild_page_faults: rebuild_faults,
        adopt_full_page_faults: first.page_faults,
        adopt_replace_page_faults: resync_faults,
        page_fault_us,
        adopt_build_ms: ms(parts.in_place),
        adopt_compare_ms: ms(parts.compared),
        prost_decode_build_ms: ms(parts.through_prost),
        adopt_drop_ms: ms(parts.release),
        adopt_drop_hash_order_ms: ms(parts.hash_order_drop),
        base_write_ms: parts.base_write_ms,
        base_write_as_is_ms: parts.base_write_as_is_ms,
        base_read_ms: parts.base_read_ms,
        base_read_as_is_ms: parts.base_read_as_is_ms,
        base_read_build_ms: parts.base_read_build_ms,
        base_read_build_as_is_ms: parts.base_read_build_as_is_ms,
        base_stored: base_stored.to_owned(),
        one_pod_change_samples: samples,
        one_pod_publish_p50_us: report::median(publishes),
        one_pod_change_p50_ms: report::median(latencies.clone()),
        one_pod_change_p99_ms: at(&latencies, 0.99),
        one_pod_change_max_ms: *latencies.last().unwrap_or(&f64::NAN),
        one_pod_change_first_worker_p50_ms: report::median(first_worker.clone()),
        one_pod_change_first_worker_p99_ms: at(&first_worker, 0.99),
        compact_ms: ms(compact),
        change_after_compaction_ms: ms(change_after_compaction),
        changes_after_replace_max_ms: ms(changes_after_replace),
        file_source_diff_ms: ms(file_source_diff),
        worker_round_trips,
        route_by_ip_ns,
        route_by_vip_ns,
        hashmap_lookup_ns,
        kube_event,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The data plane's allocator, as it runs by default.
    let heap = runtime::MallocPolicy::default().apply()?;
    let run = Provenance::now();
    let ca = ctrl_agent::ca::LocalCa::generate(TRUST_DOMAIN)?;
    let driver = runtime::resolve(args.driver).map_err(anyhow::Error::msg)?;
    let mut sizes = Vec::new();
    for &size in &args.sizes {
        eprintln!("snapbench: {size} workloads ...");
        sizes.push(measure(size, &args, &ca, driver)?);
    }
    let report = SnapReport {
        run,
        workers: args.workers,
        method: format!(
            "one-pod changes appended as deltas to the region's log, applied to a persistent \
             index; adopt = the data plane's watcher (futex wake, read, decode, index) + every \
             worker's view, workers {} ({} driver), {}",
            if args.idle_workers {
                "idle"
            } else {
                "carrying 1 KiB ping-pong on loopback"
            },
            driver.name(),
            heap.describe()
        ) + &pauses(&args),
        sizes,
    };
    println!(
        "\nsnapbench: {} | {} workers | {} ({} cores) | commit {}",
        report.method,
        report.workers,
        report.run.machine.cpu_model,
        report.run.machine.cores,
        report.run.commit
    );
    println!("{}", report.run.machine.node_line());
    println!(
        "{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}{:>11}{:>11}{:>12}{:>12}{:>12}{:>11}",
        "workloads",
        "shm MiB",
        "shm B/wl",
        "dp B/wl",
        "adopt ms",
        "resync ms",
        "rebuild ms",
        "publish us",
        "change p50",
        "change p99",
        "compact ms",
        "diff ms"
    );
    for s in &report.sizes {
        println!(
            "{:>10}{:>10.1}{:>10.0}{:>10.0}{:>10.1}{:>10.1}{:>11.1}{:>11.1}{:>10.3}ms{:>10.3}ms{:>12.1}{:>11.1}",
            s.workloads,
            s.region_bytes as f64 / (1 << 20) as f64,
            s.region_bytes_per_workload,
            s.dataplane_bytes_per_workload,
            s.adopt_full_ms,
            s.adopt_replace_ms,
            s.adopt_rebuild_ms,
            s.one_pod_publish_p50_us,
            s.one_pod_change_p50_ms,
            s.one_pod_change_p99_ms,
            s.compact_ms,
            s.file_source_diff_ms
        );
    }
    for s in &report.sizes {
        println!(
            "{:>10} workloads: route by pod IP {:.0} ns, by VIP {:.0} ns; std HashMap lookup of the same IPs {:.0} ns (x{:.1})",
            s.workloads,
            s.route_by_ip_ns,
            s.route_by_vip_ns,
            s.hashmap_lookup_ns,
            s.route_by_ip_ns / s.hashmap_lookup_ns
        );
    }
    for s in &report.sizes {
        println!(
            "{:>10} workloads: adopt parts timed alone: index built in place {:.1} ms (through \
             prost {:.1} ms, x{:.2}), the same bytes compared with it {:.1} ms (x{:.2}), index \
             free {:.1} ms (in hash order {:.1} ms, x{:.2}); the slowest of \
             {CHANGES_AFTER_REPLACE} pod changes published while a replaced index is freed \
             {:.2} ms",
            s.workloads,
            s.adopt_build_ms,
            s.prost_decode_build_ms,
            s.adopt_build_ms / s.prost_decode_build_ms,
            s.adopt_compare_ms,
            s.adopt_compare_ms / s.adopt_build_ms,
            s.adopt_drop_ms,
            s.adopt_drop_hash_order_ms,
            s.adopt_drop_ms / s.adopt_drop_hash_order_ms,
            s.changes_after_replace_max_ms
        );
    }
    for s in &report.sizes {
        println!(
            "{:>10} workloads: the region's base, LZ4 / as is (read in place), timed alone: \
             written {:.1} / {:.1} ms (x{:.2}), read {:.1} / {:.1} ms (x{:.2}), read and \
             indexed {:.1} / {:.1} ms (x{:.2}); stored {} by default",
            s.workloads,
            s.base_write_ms,
            s.base_write_as_is_ms,
            s.base_write_ms / s.base_write_as_is_ms,
            s.base_read_ms,
            s.base_read_as_is_ms,
            s.base_read_ms / s.base_read_as_is_ms,
            s.base_read_build_ms,
            s.base_read_build_as_is_ms,
            s.base_read_build_ms / s.base_read_build_as_is_ms,
            s.base_stored,
        );
    }
    let listed = |values: &[f64]| -> String {
        let shown: Vec<String> = values.iter().map(|v| format!("{v:.1}")).collect();
        shown.join(", ")
    };
    let counted = |values: &[u64]| -> String {
        let shown: Vec<String> = values.iter().map(u64::to_string).collect();
        shown.join(", ")
    };
    for s in &report.sizes {
        println!(
            "{:>10} workloads: resyncs (the world held, over its index; {} of {} compared, not \
             built), in order: {} ms; rebuilds (every pod changed; {} of {} compared), in order: \
             {} ms; the table shows their medians",
            s.workloads,
            s.adopt_replace_compared,
            s.adopt_replace_samples_ms.len(),
            listed(&s.adopt_replace_samples_ms),
            s.adopt_rebuild_compared,
            s.adopt_rebuild_samples_ms.len(),
            listed(&s.adopt_rebuild_samples_ms)
        );
    }
    for s in &report.sizes {
        println!(
            "{:>10} workloads: {} one-pod changes held by the first worker p50 {:.3} / p99 {:.3} \
             ms, by every worker p50 {:.3} / p99 {:.3} / slowest {:.3} ms (the watcher hands \
             each index to every worker at once: the gap is the wait before the last worker's \
             loop took it)",
            s.workloads,
            s.one_pod_change_samples,
            s.one_pod_change_first_worker_p50_ms,
            s.one_pod_change_first_worker_p99_ms,
            s.one_pod_change_p50_ms,
            s.one_pod_change_p99_ms,
            s.one_pod_change_max_ms,
        );
    }
    for s in &report.sizes {
        println!(
            "{:>10} workloads: page faults in the data plane's threads: first adopt {} (about {:.1} \
             ms at {:.2} us each, timed alone), resyncs in order {}, rebuilds in order {}",
            s.workloads,
            s.adopt_full_page_faults,
            s.adopt_full_page_faults as f64 * s.page_fault_us / 1e3,
            s.page_fault_us,
            counted(&s.adopt_replace_page_faults),
            counted(&s.adopt_rebuild_page_faults)
        );
    }
    for s in &report.sizes {
        if let Some(k) = &s.kube_event {
            println!(
                "{:>10} workloads: one pod event with the Kubernetes source costs the agent: kept model updated {:.2} ms (from scratch {:.1} ms) + changed entries translated and diffed {:.2} ms (whole model translated {:.1} ms + diffed {:.1} ms)",
                s.workloads, k.model_kept_ms, k.model_ms, k.changed_only_ms, k.translate_ms, k.diff_ms
            );
            println!(
                "{:>10} workloads: the Kubernetes source's stores hold {:.0} B per pod listed as served, its kept model {:.0} B; a container restart costs it {:.3} ms",
                s.workloads, k.world_bytes_per_pod, k.model_bytes_per_pod, k.unread_event_ms
            );
        }
    }
    println!("targets (issue 3): 1M workloads in <= 256 MiB of shared memory; a full 100k snapshot adopted within 100 ms; a one-pod change on every worker within 1 ms at p99");
    if !args.no_save {
        std::fs::create_dir_all(&args.out)?;
        let stem = report.run.file_stem("snapshot");
        let json = args.out.join(format!("{stem}.json"));
        std::fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")?;
        let mut bars = Vec::new();
        for s in &report.sizes {
            bars.push((
                format!("{} wl: adopt full, ms", s.workloads),
                s.adopt_full_ms,
            ));
            bars.push((
                format!("{} wl: resync (median), ms", s.workloads),
                s.adopt_replace_ms,
            ));
            bars.push((
                format!("{} wl: rebuild (median), ms", s.workloads),
                s.adopt_rebuild_ms,
            ));
            bars.push((
                format!("{} wl: one-pod change p99, ms", s.workloads),
                s.one_pod_change_p99_ms,
            ));
            bars.push((
                format!("{} wl: shm, KiB", s.workloads),
                s.region_bytes as f64 / 1024.0,
            ));
        }
        let svg = report::log_bar_chart(
            "Snapshot channel: deltas on a persistent index",
            &format!(
                "{} ({} cores) | {} workers | commit {}",
                report.run.machine.cpu_model,
                report.run.machine.cores,
                report.workers,
                report.run.commit
            ),
            "",
            &bars,
        );
        std::fs::write(args.out.join(format!("{stem}.svg")), svg)?;
        println!("saved {}", json.display());
    }
    Ok(())
}
