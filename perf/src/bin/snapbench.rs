//! `snapbench`: the snapshot channel at cluster sizes, measured end to end in one process with
//! the real pieces: the agent's encoder and region publisher, the data plane's region reader,
//! decoder and index, and one thread per worker adopting each new index (building its view,
//! TLS configs included) as the data plane's workers do.
//!
//! For each size: shared-memory bytes per workload (the region file), data-plane memory per
//! workload (RSS growth for one adopted index), time to adopt a full snapshot, and
//! publish-to-visible-on-every-worker latency for a one-pod change (p50/p99). Every change is
//! a full republish today: these figures are the baseline an incremental channel must beat.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Parser;
use mesh_core::identity::SpiffeId;
use mesh_core::index::{Generation, Index};
use mesh_io::view::View;
use mesh_snapshot::region::PublishOptions;
use mesh_snapshot::schema::{
    Action, AuthorizationPolicy, Identity, Protocol, Rule, RuleSource, Service, ServicePort,
    Workload,
};
use mesh_snapshot::{Publisher, ReadOutcome, Snapshot, Subscriber};
use perf::report::{self, Provenance};
use perf::sys;
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
    /// One-pod changes published per size (fewer above 20k workloads, at least 5).
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// Where the region lives (memory-backed, as in the chart's emptyDir).
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    #[arg(long)]
    no_save: bool,
}

/// Pods per simulated node and per namespace; node-0 is the node this data plane runs on.
const PODS_PER_NODE: usize = 100;
const PODS_PER_NAMESPACE: usize = 100;
const PODS_PER_SERVICE: usize = 10;
const TRUST_DOMAIN: &str = "cluster.local";

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

fn workload(i: usize) -> Workload {
    let node = i / PODS_PER_NODE;
    Workload {
        uid: format!("{:08x}-1c5e-4e8b-9f6a-{:012x}", i, i * 7919),
        name: format!("app-{}-7d9f8b6c5-{:05x}", i / PODS_PER_SERVICE, i & 0xfffff),
        namespace: namespace(i),
        service_account: service_account(i),
        trust_domain: TRUST_DOMAIN.into(),
        ips: vec![ip(i)],
        node: format!("node-{node}"),
        protocol: Protocol::Hbone as i32,
        waypoint: String::new(),
        netns_path: String::new(),
        labels: [
            ("app".to_owned(), format!("app-{}", i / PODS_PER_SERVICE)),
            ("version".to_owned(), "v1".to_owned()),
            ("pod-template-hash".to_owned(), "7d9f8b6c5".to_owned()),
        ]
        .into(),
        netns_from_agent: node == 0,
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
    /// Memory the region file occupies (allocated pages of the sparse file: header plus the
    /// slots written so far of the double buffer).
    region_bytes: u64,
    region_bytes_per_workload: f64,
    /// RSS growth for one decoded, indexed snapshot held by the data plane.
    dataplane_bytes_per_workload: f64,
    encode_ms: f64,
    publish_ms: f64,
    /// Read from the region, decode, build the index, and every worker's view built.
    adopt_full_ms: f64,
    adopt_decode_ms: f64,
    adopt_index_ms: f64,
    one_pod_change_samples: usize,
    /// From the agent starting to publish a one-pod change to the last worker holding it.
    one_pod_change_p50_ms: f64,
    one_pod_change_p99_ms: f64,
    one_pod_change_max_ms: f64,
}

#[derive(Serialize)]
struct SnapReport {
    #[serde(flatten)]
    run: Provenance,
    workers: usize,
    method: String,
    sizes: Vec<SizeResult>,
}

/// The data plane's side: reads the region, decodes, indexes and hands the index to every
/// worker, which builds its view; returns when all workers hold `generation`.
struct DataPlane {
    subscriber: Subscriber,
    workers: Vec<(flume::Sender<Arc<Index>>, flume::Receiver<u64>)>,
}

impl DataPlane {
    fn start(path: &std::path::Path, workers: usize) -> DataPlane {
        let workers = (0..workers.max(1))
            .map(|_| {
                let (to_worker, from_watcher) = flume::bounded::<Arc<Index>>(1);
                let (to_watcher, adopted) = flume::bounded::<u64>(1);
                std::thread::spawn(move || {
                    let mut current = None;
                    for index in from_watcher.iter() {
                        let generation = index.generation().generation;
                        current = Some(View::build(index));
                        if to_watcher.send(generation).is_err() {
                            break;
                        }
                    }
                    drop(current);
                });
                (to_worker, adopted)
            })
            .collect();
        DataPlane {
            subscriber: Subscriber::new(path),
            workers,
        }
    }

    /// Adopts the newest publication; returns (decode, index) durations and the index.
    fn adopt(&mut self) -> anyhow::Result<(Duration, Duration, Arc<Index>)> {
        let (version, payload) = loop {
            match self.subscriber.read()? {
                ReadOutcome::New { version, payload } => break (version, payload),
                ReadOutcome::Unchanged => self.subscriber.wait(Duration::from_millis(100)),
            }
        };
        let t = Instant::now();
        let snapshot = mesh_snapshot::decode(&payload)?;
        let decoded = t.elapsed();
        drop(payload);
        let t = Instant::now();
        let index = Arc::new(Index::build(
            snapshot,
            Generation {
                epoch: version.epoch,
                generation: version.generation,
            },
        )?);
        let indexed = t.elapsed();
        for (to, _) in &self.workers {
            to.send(index.clone()).context("worker gone")?;
        }
        for (_, adopted) in &self.workers {
            let g = adopted.recv().context("worker gone")?;
            anyhow::ensure!(g == version.generation, "worker adopted {g}");
        }
        Ok((decoded, indexed, index))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn rss() -> f64 {
    sys::rss_bytes(std::process::id()).unwrap_or(0) as f64
}

fn measure(size: usize, args: &Args, ca: &ctrl_agent::ca::LocalCa) -> anyhow::Result<SizeResult> {
    let mut snap = snapshot(size, ca)?;
    let path = args
        .dir
        .join(format!("snapbench-{}-{size}.region", std::process::id()));
    let t = Instant::now();
    let payload = mesh_snapshot::encode(&snap);
    let encode = t.elapsed();
    let mut publisher = Publisher::create(&path, PublishOptions::default())?;
    let t = Instant::now();
    publisher.publish(&payload)?;
    let publish = t.elapsed();
    let encoded_bytes = payload.len();
    drop(payload);

    let mut dataplane = DataPlane::start(&path, args.workers);
    let before = rss();
    let t = Instant::now();
    let (decode, index_time, index) = dataplane.adopt()?;
    let adopt = t.elapsed();
    let held = rss() - before;
    drop(index);

    // One-pod changes: a pod moves to a new IP (a restart), republished by the agent.
    // Fewer samples where each change republishes hundreds of MB.
    let samples = (args.changes * 20_000 / size.max(1)).clamp(5, args.changes.max(5));
    let mut latencies = Vec::with_capacity(samples);
    for n in 0..samples {
        let pod = (n * 7) % size;
        snap.workloads[pod].ips = vec![ip(size + n)];
        let t = Instant::now();
        publisher.publish(&mesh_snapshot::encode(&snap))?;
        dataplane.adopt()?;
        latencies.push(ms(t.elapsed()));
    }
    // Pages the region really occupies once both slots have been written (the file is
    // sparse: slots are sized for growth).
    let region_bytes = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&path)?.blocks() * 512
    };
    let _ = std::fs::remove_file(&path);
    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Ok(SizeResult {
        workloads: size,
        services: snap.services.len(),
        policies: snap.policies.len(),
        encoded_bytes,
        region_bytes,
        region_bytes_per_workload: region_bytes as f64 / size as f64,
        dataplane_bytes_per_workload: held / size as f64,
        encode_ms: ms(encode),
        publish_ms: ms(publish),
        adopt_full_ms: ms(adopt),
        adopt_decode_ms: ms(decode),
        adopt_index_ms: ms(index_time),
        one_pod_change_samples: samples,
        one_pod_change_p50_ms: report::median(latencies.clone()),
        one_pod_change_p99_ms: pct(0.99),
        one_pod_change_max_ms: *latencies.last().unwrap_or(&f64::NAN),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let run = Provenance::now();
    let ca = ctrl_agent::ca::LocalCa::generate(TRUST_DOMAIN)?;
    let mut sizes = Vec::new();
    for &size in &args.sizes {
        eprintln!("snapbench: {size} workloads ...");
        sizes.push(measure(size, &args, &ca)?);
    }
    let report = SnapReport {
        run,
        workers: args.workers,
        method: "full snapshot republished for every change (prost, double-buffered region); \
                 adopt = read + decode + index + every worker's view; no traffic on the workers"
            .into(),
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
    println!(
        "{:>10}{:>12}{:>12}{:>12}{:>12}{:>12}{:>14}{:>14}",
        "workloads",
        "shm MiB",
        "shm B/wl",
        "dp B/wl",
        "adopt ms",
        "publish ms",
        "change p50 ms",
        "change p99 ms"
    );
    for s in &report.sizes {
        println!(
            "{:>10}{:>12.1}{:>12.0}{:>12.0}{:>12.1}{:>12.1}{:>14.2}{:>14.2}",
            s.workloads,
            s.region_bytes as f64 / (1 << 20) as f64,
            s.region_bytes_per_workload,
            s.dataplane_bytes_per_workload,
            s.adopt_full_ms,
            s.encode_ms + s.publish_ms,
            s.one_pod_change_p50_ms,
            s.one_pod_change_p99_ms
        );
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
                format!("{} wl: one-pod change p99, ms", s.workloads),
                s.one_pod_change_p99_ms,
            ));
            bars.push((
                format!("{} wl: shm, KiB", s.workloads),
                s.region_bytes as f64 / 1024.0,
            ));
        }
        let svg = report::log_bar_chart(
            "Snapshot channel: full republish per change",
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
