//! The snapshot watcher: a thread off the data path that waits on the region's futex, verifies
//! and decodes each new generation, builds the index once (from a complete snapshot, or by
//! applying deltas to the current one), and hands the same `Arc<Index>` to every worker. A
//! refused snapshot or delta changes nothing on the workers: they keep the last good index,
//! and the watcher rereads from the complete snapshot at the next publication.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::index::{Changes, Generation, Index};
use mesh_snapshot::{Published, ReadOutcome, RegionError, Subscriber};

use crate::runtime::{self, ThreadClass};
use crate::stats::DurationHistogram;
use crate::worker::Control;

/// What the watcher has done, for readiness and the admin endpoint. Written by the watcher
/// thread only; read by the admin thread.
#[derive(Debug, Default)]
pub struct WatchStatus {
    pub epoch: AtomicU64,
    pub generation: AtomicU64,
    pub adopted_unix_ms: AtomicU64,
    pub refused: AtomicU64,
    pub read_errors: AtomicU64,
    /// Complete snapshots replaced by a newer one while their index was built from the
    /// region: each build dropped, and the newer snapshot built instead.
    pub builds_discarded: AtomicU64,
    /// Complete snapshots taken in by comparing them with the current index (an agent restart,
    /// a compaction while behind) rather than built whole.
    pub compared: AtomicU64,
    pub adopt_durations: AdoptDurations,
    /// Last problem, for humans (admin endpoint); never on the data path.
    pub last_error: Mutex<String>,
    /// The index the workers were last given, for the admin config dump.
    pub current: Mutex<Option<Arc<Index>>>,
}

/// How long adopts take, from the start of the region read to every worker handed the index:
/// a complete snapshot's (tens of milliseconds to seconds, with the node's memory) apart from
/// changes' (microseconds), so neither hides the other.
#[derive(Debug)]
pub struct AdoptDurations {
    pub full: DurationHistogram,
    pub changes: DurationHistogram,
}

impl Default for AdoptDurations {
    fn default() -> Self {
        AdoptDurations {
            full: DurationHistogram::new(&[
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            changes: DurationHistogram::new(&[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0,
            ]),
        }
    }
}

impl WatchStatus {
    pub fn has_snapshot(&self) -> bool {
        self.generation.load(Ordering::Acquire) > 0
    }

    fn note_error(&self, message: String) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = message;
        }
    }
}

/// The watcher sleeps nearly always and works for tens of microseconds per change; on cores
/// the workers keep busy it would otherwise wait a scheduler slice or more (milliseconds,
/// measured by snapbench) before it runs, and every worker would see a pod change that much
/// later. So it runs real-time where the node allows it, else at a raised nice value, and at
/// the default class while it builds a whole index.
struct WatcherPriority {
    raised: Option<ThreadClass>,
}

/// The watcher's sleep when nothing it holds waits to be freed: a publication wakes it at
/// once anyway (futex), so this only bounds how late it notices a stop.
const IDLE_WAIT: Duration = Duration::from_millis(500);
/// Its first look, after an adoption, for whether the workers let the replaced index go;
/// doubled at each look until [`IDLE_WAIT`].
const RECHECK_FIRST: Duration = Duration::from_millis(1);
const WATCHER_REALTIME_PRIORITY: i32 = 1;
const WATCHER_NICE: i32 = -10;

impl WatcherPriority {
    fn raise() -> WatcherPriority {
        let realtime = ThreadClass::Realtime(WATCHER_REALTIME_PRIORITY);
        match runtime::set_current_thread_class(realtime) {
            Ok(()) => WatcherPriority {
                raised: Some(realtime),
            },
            Err(error) => {
                let nice = runtime::set_current_thread_nice(WATCHER_NICE);
                tracing::info!(%error, nice_raised = nice.is_ok(),
                    "snapshot watcher cannot run real-time; pod changes reach busy workers later");
                WatcherPriority { raised: None }
            }
        }
    }

    fn lower(&mut self) {
        if self.raised.is_some() {
            let _ = runtime::set_current_thread_class(ThreadClass::Normal);
        }
    }

    fn restore(&mut self) {
        if let Some(class) = self.raised {
            let _ = runtime::set_current_thread_class(class);
        }
    }
}

/// Generations the watcher has replaced, held until no worker or connection uses them; the
/// last reference then goes to a reclaimer thread of its own. Freeing a 100k-workload index
/// takes about 30 ms even in address order (snapbench's `index free`): on a worker that would
/// stall every connection it serves, and on the watcher it held up the next pod change (the
/// slowest of 5 right after a replacement: 151-160 ms there, 4-17 ms with the reclaimer).
struct Retired {
    held: Vec<Arc<Index>>,
    /// None if the thread could not be started: the watcher then frees them itself.
    reclaimer: Option<(
        std::sync::mpsc::Sender<Arc<Index>>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Retired {
    /// Starts the reclaimer, in the calling thread's scheduling class and on its cores.
    fn start() -> Retired {
        let (to_reclaimer, retired) = std::sync::mpsc::channel::<Arc<Index>>();
        let spawned = std::thread::Builder::new()
            .name("snapshot-free".into())
            .spawn(move || retired.iter().for_each(free));
        let reclaimer = match spawned {
            Ok(thread) => Some((to_reclaimer, thread)),
            Err(error) => {
                tracing::warn!(%error, "no thread to free replaced snapshots: the watcher frees them");
                None
            }
        };
        Retired {
            held: Vec::new(),
            reclaimer,
        }
    }

    fn hold(&mut self, index: Arc<Index>) {
        self.held.push(index);
    }

    /// Hands over the generations only this thread still holds.
    fn reclaim(&mut self, priority: &mut WatcherPriority) {
        // Nothing else can gain a reference to a retired index (workers and connections only
        // drop theirs, and no weak references exist), so a count of one stays one.
        for index in self
            .held
            .extract_if(.., |index| Arc::strong_count(index) == 1)
        {
            let unsent = match &self.reclaimer {
                Some((to_reclaimer, _)) => to_reclaimer.send(index).err().map(|e| e.0),
                None => Some(index),
            };
            // No reclaimer (or one that is gone): freed here, and not above the workers.
            if let Some(index) = unsent {
                priority.lower();
                free(index);
                priority.restore();
            }
        }
    }

    /// Waits until the reclaimer has freed everything handed over.
    fn finish(self) {
        drop(self.held);
        if let Some((to_reclaimer, thread)) = self.reclaimer {
            drop(to_reclaimer);
            let _ = thread.join();
        }
    }

    fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    fn any_reclaimable(&self) -> bool {
        self.held.iter().any(|index| Arc::strong_count(index) == 1)
    }
}

/// Frees a retired index (see `Index::release`); one still shared is only let go.
fn free(index: Arc<Index>) {
    match Arc::try_unwrap(index) {
        Ok(index) => index.release(),
        Err(shared) => drop(shared),
    }
}

/// Runs until `stop` is set. `workers` receive every adopted index.
pub fn watch(
    path: PathBuf,
    workers: Vec<flume::Sender<Control>>,
    status: Arc<WatchStatus>,
    stop: Arc<AtomicBool>,
) {
    let mut retired = Retired::start();
    let mut priority = WatcherPriority::raise();
    let mut subscriber = Subscriber::new(&path);
    let mut last_error = String::new();
    let mut current: Option<Arc<Index>> = None;
    let mut recheck = RECHECK_FIRST;
    while !stop.load(Ordering::Acquire) {
        // Before any build: what the workers let go of is freed first, so a complete build
        // right after another (a burst of resyncs) reuses the memory of the index before last
        // instead of growing the heaps for a third one (at 100k, a new heap and about 4,400
        // page faults in the second of two resyncs 60 ms apart: snapbench).
        if retired.any_reclaimable() {
            retired.reclaim(&mut priority);
        }
        // A complete snapshot's read (a checksum pass over the base, and for a compressed
        // one its decode into fresh memory: about 0.1 s at 1M) is counted in its adopt time.
        let started = std::time::Instant::now();
        match subscriber.read() {
            Ok(ReadOutcome::New {
                version,
                base,
                deltas,
            }) => {
                let full = base.is_some();
                let bytes = base.as_ref().map_or(0, |b| b.payload.len())
                    + deltas.iter().map(|d| d.payload.len()).sum::<usize>();
                let changes = deltas.len();
                // Building a whole index takes long: not at a priority above the workers.
                if full {
                    priority.lower();
                }
                let adopted = adopt(current.as_deref(), version.epoch, base.as_ref(), &deltas);
                priority.restore();
                // A base read in place that the publisher replaced meanwhile (a newer complete
                // snapshot): what was built from it is dropped unseen, and the next read
                // starts from the new base at once (the wait below does not sleep).
                let adopted = if base.as_ref().is_some_and(|b| !b.payload.intact()) {
                    status.builds_discarded.fetch_add(1, Ordering::AcqRel);
                    if let Ok(adopted) = adopted {
                        retired.hold(Arc::new(adopted.index));
                    }
                    subscriber.resync();
                    tracing::info!(
                        epoch = version.epoch,
                        generation = version.generation,
                        "the snapshot was replaced while being built; building the newer one"
                    );
                    None
                } else {
                    Some(adopted)
                };
                match adopted {
                    None => {}
                    Some(Ok(Adopted { index, compared })) => {
                        let index = Arc::new(index);
                        if compared.is_some() {
                            status.compared.fetch_add(1, Ordering::AcqRel);
                        }
                        for worker in &workers {
                            let _ = worker.send(Control::Adopt(index.clone()));
                        }
                        status.epoch.store(version.epoch, Ordering::Release);
                        status
                            .generation
                            .store(version.generation, Ordering::Release);
                        status.adopted_unix_ms.store(unix_ms(), Ordering::Release);
                        if let Ok(mut shown) = status.current.lock() {
                            *shown = Some(index.clone());
                        }
                        let took = started.elapsed();
                        let durations = &status.adopt_durations;
                        if full {
                            durations.full.observe(took);
                        } else {
                            durations.changes.observe(took);
                        }
                        let took_ms = took.as_secs_f64() * 1e3;
                        // A complete snapshot is news; a stream of pod changes is not.
                        if full {
                            tracing::info!(
                                epoch = version.epoch,
                                generation = version.generation,
                                workloads = index.workload_count(),
                                deltas = changes,
                                bytes,
                                took_ms,
                                source = index.source(),
                                compared_changed_workloads = compared.map(|c| c.workloads),
                                compared_changed_services = compared.map(|c| c.services),
                                "snapshot adopted"
                            );
                        } else {
                            tracing::debug!(
                                generation = version.generation,
                                deltas = changes,
                                bytes,
                                took_ms,
                                "snapshot changes adopted"
                            );
                        }
                        if let Some(replaced) = current.replace(index) {
                            retired.hold(replaced);
                            recheck = RECHECK_FIRST;
                        }
                        last_error.clear();
                    }
                    Some(Err(error)) => {
                        status.refused.fetch_add(1, Ordering::AcqRel);
                        // What follows builds on what was refused: start again from the
                        // complete snapshot at the next publication.
                        subscriber.resync();
                        let kept = status.generation.load(Ordering::Acquire);
                        tracing::error!(
                            epoch = version.epoch,
                            generation = version.generation,
                            kept_generation = kept,
                            %error,
                            "snapshot refused; still serving the last good one"
                        );
                        status.note_error(format!(
                            "refused generation {}: {error}",
                            version.generation
                        ));
                    }
                }
            }
            Ok(ReadOutcome::Unchanged) => {}
            Err(error) => {
                let message = error.to_string();
                // A region with nothing in it yet is the agent still listing its sources, not
                // an error: readiness says so meanwhile.
                let waiting = matches!(error, RegionError::Empty { .. });
                if error.is_corrupt() {
                    status.refused.fetch_add(1, Ordering::AcqRel);
                } else if !waiting {
                    status.read_errors.fetch_add(1, Ordering::AcqRel);
                }
                // Log a problem once, not on every retry.
                if message != last_error {
                    if waiting {
                        tracing::info!(%message, "waiting for the agent's first snapshot");
                    } else {
                        tracing::warn!(error = %message, "cannot read the snapshot region");
                    }
                    status.note_error(message.clone());
                    last_error = message;
                }
            }
        }
        // Workers let a replaced index go at their next event-loop turn, well within a
        // millisecond when idle: look again soon, then less and less often (a connection
        // may hold one for as long as it lives).
        let wait = if retired.is_empty() {
            IDLE_WAIT
        } else {
            let wait = recheck;
            recheck = (recheck * 2).min(IDLE_WAIT);
            wait
        };
        subscriber.wait(wait);
    }
    drop(current);
    retired.finish();
}

/// An index adopted from a read.
#[derive(Debug)]
pub struct Adopted {
    pub index: Index,
    /// What differed, when a complete snapshot was compared with the current index rather
    /// than built whole.
    pub compared: Option<Changes>,
}

/// The index for what a read returned: from the base when there is one (first read, new
/// epoch, resync, compaction while behind; compared with the current index when there is
/// one, else built), else the current index; then every delta applied in order. Each delta's
/// generation is stamped on the index it produces.
///
/// When a read with a base has a delta that does not apply (an earlier refusal the log still
/// holds, say), the whole read is replayed as plain data and only the final state is indexed:
/// a publisher that fixed what was refused heals the data plane at once, without waiting for
/// a compaction.
pub fn adopt(
    current: Option<&Index>,
    epoch: u64,
    base: Option<&Published>,
    deltas: &[Published],
) -> Result<Adopted, String> {
    match base {
        Some(base) => on_build_thread(|| adopt_base(current, epoch, base, deltas)),
        None => {
            let current = current.ok_or("changes arrived before any complete snapshot")?;
            let index = apply_deltas(current.clone(), epoch, deltas)?;
            Ok(Adopted {
                index,
                compared: None,
            })
        }
    }
}

/// Runs a complete build on a thread of its own, which inherits the caller's scheduling class
/// and cores. glibc gives each thread its own heap (arena) and returns a freed block to the
/// heap it came from, under that heap's lock. Built here, an index would fill the watcher's
/// heap, and the free of a replaced one (on the `snapshot-free` thread) would hold the lock
/// the watcher needs for every pod change meanwhile: at 1M, 17 ms for the first change after
/// a resync and 2-3 ms for the next (snapbench, `changes_after_replace_max_ms`). Built on a
/// thread that ends with the build, it fills another heap: 0.2-0.4 ms for those changes.
/// Without a thread to start, the caller builds.
fn on_build_thread<T: Send>(build: impl Fn() -> Result<T, String> + Sync) -> Result<T, String> {
    std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name("snapshot-build".into())
            .spawn_scoped(scope, &build);
        match spawned {
            Ok(thread) => thread.join().unwrap_or_else(|panic| {
                let reason = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(format!("the index build panicked: {reason}"))
            }),
            Err(_) => build(),
        }
    })
}

/// [`adopt`] with a complete snapshot.
fn adopt_base(
    current: Option<&Index>,
    epoch: u64,
    base: &Published,
    deltas: &[Published],
) -> Result<Adopted, String> {
    let stamp = |generation| Generation { epoch, generation };
    let rebased = current.and_then(|c| c.rebase_encoded(&base.payload, stamp(base.generation)));
    let compared = rebased.as_ref().map(|r| r.changes);
    let built = match rebased {
        Some(rebased) => Ok(rebased.index),
        None => {
            Index::build_encoded(&base.payload, stamp(base.generation)).map_err(|e| e.to_string())
        }
    };
    match built.and_then(|index| apply_deltas(index, epoch, deltas)) {
        Ok(index) => Ok(Adopted { index, compared }),
        Err(_) if !deltas.is_empty() => {
            let state = mesh_snapshot::delta::replay(None, Some(base), deltas)
                .map_err(|e| e.to_string())?
                .ok_or("a base that replays to nothing")?;
            let newest = deltas.last().map_or(base.generation, |d| d.generation);
            let index = Index::build(state.snapshot(), stamp(newest)).map_err(|e| e.to_string())?;
            Ok(Adopted {
                index,
                compared: None,
            })
        }
        Err(error) => Err(error),
    }
}

fn apply_deltas(mut index: Index, epoch: u64, deltas: &[Published]) -> Result<Index, String> {
    for delta in deltas {
        let decoded = mesh_snapshot::delta::decode(&delta.payload)
            .map_err(|e| format!("generation {}: {e}", delta.generation))?;
        let generation = Generation {
            epoch,
            generation: delta.generation,
        };
        index = index
            .apply(decoded, generation)
            .map_err(|e| format!("generation {}: {e}", delta.generation))?;
    }
    Ok(index)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_snapshot::delta::{self, Delta};
    use mesh_snapshot::schema::{Snapshot, Workload};
    use std::net::IpAddr;

    fn workload(uid: &str, last: u8) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "default".into(),
            service_account: "default".into(),
            trust_domain: "cluster.local".into(),
            ips: vec![vec![10, 0, 0, last]],
            node: "n2".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_complete_build_runs_on_a_thread_of_its_own_and_a_panic_in_it_is_a_refusal() {
        let name = on_build_thread(|| Ok(std::thread::current().name().map(str::to_owned)));
        assert_eq!(name, Ok(Some("snapshot-build".to_owned())));
        let panicked = on_build_thread(|| -> Result<(), String> { panic!("a malformed base") });
        assert_eq!(
            panicked,
            Err("the index build panicked: a malformed base".to_owned())
        );
    }

    fn published(generation: u64, payload: Vec<u8>) -> Published {
        Published {
            generation,
            payload: payload.into(),
        }
    }

    fn base() -> Published {
        let snapshot = Snapshot {
            node: "n1".into(),
            workloads: vec![workload("a", 1), workload("b", 2)],
            ..Default::default()
        };
        published(1, mesh_snapshot::encode(&snapshot))
    }

    fn delta(generation: u64, d: Delta) -> Published {
        published(generation, delta::encode(&d))
    }

    fn ips(index: &Index) -> Vec<(String, String)> {
        let mut all: Vec<_> = index
            .workloads()
            .map(|w| (w.uid.to_string(), format!("{:?}", w.ips)))
            .collect();
        all.sort();
        all
    }

    /// A region at a scratch path with the real watcher loop on it, handing its indexes to
    /// a channel that the test reads as a worker would. Dropped, it stops the watcher.
    struct Watched {
        path: PathBuf,
        publisher: mesh_snapshot::Publisher,
        from_watcher: flume::Receiver<Control>,
        status: Arc<WatchStatus>,
        stop: Arc<AtomicBool>,
        watcher: Option<std::thread::JoinHandle<()>>,
    }

    impl Watched {
        fn start(name: &str) -> Watched {
            let path =
                std::env::temp_dir().join(format!("watch-{name}-{}.region", std::process::id()));
            let publisher = mesh_snapshot::Publisher::create(
                &path,
                mesh_snapshot::region::PublishOptions::default(),
            )
            .expect("region");
            let (to_worker, from_watcher) = flume::unbounded();
            let status = Arc::new(WatchStatus::default());
            let stop = Arc::new(AtomicBool::new(false));
            let watcher = {
                let (path, status, stop) = (path.clone(), status.clone(), stop.clone());
                std::thread::spawn(move || watch(path, vec![to_worker], status, stop))
            };
            Watched {
                path,
                publisher,
                from_watcher,
                status,
                stop,
                watcher: Some(watcher),
            }
        }
    }

    impl Drop for Watched {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
            if let Some(watcher) = self.watcher.take() {
                // A panic there fails the test that started it, unless one already did.
                if watcher.join().is_err() && !std::thread::panicking() {
                    panic!("the watcher panicked");
                }
            }
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// The real watcher loop on a real region: a worker (this thread) that drops the last
    /// index it was given does not free it; the watcher has it freed, off the data path.
    #[test]
    fn a_replaced_index_is_freed_by_the_watcher_not_by_the_worker_that_let_it_go() {
        let mut region = Watched::start("retire");
        let next_index = || match region.from_watcher.recv_timeout(Duration::from_secs(10)) {
            Ok(Control::Adopt(index)) => index,
            _ => panic!("the watcher handed no index over"),
        };
        region.publisher.publish(&base().payload).expect("publish");
        let first = next_index();
        let first_alive = Arc::downgrade(&first);
        // A second complete snapshot replaces the first.
        region.publisher.publish(&base().payload).expect("publish");
        let second = next_index();
        assert_ne!(first.generation(), second.generation());
        drop(first);
        assert!(
            first_alive.strong_count() > 0,
            "the worker's drop freed the index it let go of"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while first_alive.strong_count() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the watcher never freed the replaced index"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            Arc::strong_count(&second) > 1,
            "the watcher let go of the index in use"
        );
    }

    /// The real watcher loop, two complete snapshots and then a third at once (a burst of
    /// resyncs): the index the worker let go of is freed before the third is built, not after,
    /// so the heaps never hold three indexes at once.
    #[test]
    fn in_a_burst_of_complete_snapshots_the_index_before_last_is_freed_before_the_next_build() {
        let mut region = Watched::start("burst");
        let next_index =
            |from: &flume::Receiver<Control>| match from.recv_timeout(Duration::from_secs(30)) {
                Ok(Control::Adopt(index)) => index,
                _ => panic!("the watcher handed no index over"),
            };
        region.publisher.publish(&base().payload).expect("publish");
        let first = next_index(&region.from_watcher);
        region.publisher.publish(&base().payload).expect("publish");
        let _second = next_index(&region.from_watcher);
        let first_alive = Arc::downgrade(&first);
        drop(first);
        // Large enough that its build takes milliseconds, far longer than freeing two pods.
        let large = Snapshot {
            node: "n1".into(),
            workloads: (0..50_000u32)
                .map(|i| Workload {
                    ips: vec![vec![10, 1, (i >> 8) as u8, i as u8]],
                    ..workload(&format!("pod-{i}"), 0)
                })
                .collect(),
            ..Default::default()
        };
        region
            .publisher
            .publish(&mesh_snapshot::encode(&large))
            .expect("publish");
        let third = next_index(&region.from_watcher);
        assert_eq!(
            first_alive.strong_count(),
            0,
            "the next index was built while the one before last was still held"
        );
        assert_eq!(third.workload_count(), 50_000);
    }

    /// The real watcher loop on a region whose bases are read in place, replaced while they
    /// are built: a build from a replaced base is dropped, not handed out and not counted as
    /// a refusal, and the newest snapshot is the one the workers end with.
    #[test]
    fn a_base_replaced_while_built_is_dropped_and_the_newer_one_built() {
        let mut region = Watched::start("torn");
        let (publisher, status) = (&mut region.publisher, region.status.clone());
        // Large enough that a build takes milliseconds; each publication moves every pod
        // to an address of its own, so an index shows which one it was built from.
        let pods = 5000;
        let snapshot = |generation: u64| Snapshot {
            node: "n1".into(),
            workloads: (0..pods)
                .map(|i| Workload {
                    ips: vec![vec![10, (generation % 250) as u8, (i >> 8) as u8, i as u8]],
                    ..workload(&format!("pod-{i}"), 0)
                })
                .collect(),
            ..Default::default()
        };
        // Until several builds overlapped a publication: many of them read bytes the
        // publisher had already released or rewritten.
        let mut last = publisher
            .publish(&mesh_snapshot::encode(&snapshot(1)))
            .expect("publish");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while status.builds_discarded.load(Ordering::Acquire) < 10 {
            assert!(
                std::time::Instant::now() < deadline,
                "fewer than 10 builds overlapped a publication in 30 s"
            );
            std::thread::sleep(Duration::from_millis(2));
            let next = last.generation + 1;
            last = publisher
                .publish(&mesh_snapshot::encode(&snapshot(next)))
                .expect("publish");
        }
        let mut handed = Vec::new();
        let newest = loop {
            match region.from_watcher.recv_timeout(Duration::from_secs(10)) {
                Ok(Control::Adopt(index)) => {
                    let done = index.generation().generation == last.generation;
                    handed.push(index);
                    if done {
                        break handed.last().cloned().expect("just pushed");
                    }
                }
                _ => panic!("the newest snapshot was never handed over"),
            }
        };
        for index in &handed {
            let generation = index.generation().generation;
            let octet = (generation % 250) as u8;
            let expected = IpAddr::from([10, octet, 0, 7]);
            assert_eq!(index.workload_count(), pods, "generation {generation}");
            assert!(
                index.workload_by_ip(expected).is_some(),
                "generation {generation} was built from other bytes"
            );
        }
        assert_eq!(newest.generation().epoch, last.epoch);
        assert_eq!(status.refused.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_complete_snapshot_of_the_world_held_is_compared_not_built_and_its_deltas_follow() {
        let first = adopt(None, 7, Some(&base()), &[]).expect("base");
        assert_eq!(first.compared, None, "nothing to compare with: built");
        // The agent restarts (epoch 8) with the same world, and a pod moves right after.
        let moved = Delta {
            workloads: vec![workload("b", 3)],
            ..Delta::default()
        };
        let next = adopt(Some(&first.index), 8, Some(&base()), &[delta(2, moved)]).expect("adopts");
        assert_eq!(next.compared, Some(Changes::default()));
        assert_eq!(
            next.index.generation(),
            Generation {
                epoch: 8,
                generation: 2
            }
        );
        assert!(next
            .index
            .workload_by_ip("10.0.0.3".parse().expect("ip"))
            .is_some());
        assert!(next.index.same_tls_material(&first.index));
    }

    #[test]
    fn deltas_apply_on_the_current_index_and_stamp_their_generation() {
        let first = adopt(None, 7, Some(&base()), &[]).expect("base").index;
        let moved = Delta {
            workloads: vec![workload("b", 3)],
            ..Delta::default()
        };
        let next = adopt(Some(&first), 7, None, &[delta(2, moved)])
            .expect("delta")
            .index;
        assert_eq!(
            next.generation(),
            Generation {
                epoch: 7,
                generation: 2
            }
        );
        assert!(next
            .workload_by_ip("10.0.0.3".parse().expect("ip"))
            .is_some());
        assert!(next
            .workload_by_ip("10.0.0.2".parse().expect("ip"))
            .is_none());
        assert!(adopt(None, 7, None, &[delta(2, Delta::default())]).is_err());
    }

    #[test]
    fn a_log_holding_a_refused_delta_heals_once_a_later_delta_fixes_it() {
        let first = adopt(None, 7, Some(&base()), &[]).expect("base").index;
        // "c" takes a's address: refused, the current index stays.
        let clash = delta(
            2,
            Delta {
                workloads: vec![workload("c", 1)],
                ..Delta::default()
            },
        );
        assert!(adopt(Some(&first), 7, None, &[clash]).is_err());
        // The publisher removes a; the watcher rereads from the base: base + both deltas.
        let clash = delta(
            2,
            Delta {
                workloads: vec![workload("c", 1)],
                ..Delta::default()
            },
        );
        let fix = delta(
            3,
            Delta {
                removed_workloads: vec!["a".into()],
                ..Delta::default()
            },
        );
        let healed = adopt(Some(&first), 7, Some(&base()), &[clash, fix])
            .expect("heals")
            .index;
        assert_eq!(healed.generation().generation, 3);
        assert_eq!(
            ips(&healed),
            [
                ("b".to_owned(), "[10.0.0.2]".to_owned()),
                ("c".to_owned(), "[10.0.0.1]".to_owned())
            ]
        );
        // A final state that is still contradictory stays refused.
        let clash = delta(
            2,
            Delta {
                workloads: vec![workload("c", 1)],
                ..Delta::default()
            },
        );
        assert!(adopt(Some(&first), 7, Some(&base()), &[clash]).is_err());
    }
}
