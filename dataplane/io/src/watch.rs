//! The snapshot watcher: a thread off the data path that waits on the region's futex, verifies
//! and decodes each new generation, builds the index once (from a complete snapshot, or by
//! applying deltas to the current one), and hands the same `Arc<Index>` to every worker. A
//! refused snapshot or delta changes nothing on the workers: they keep the last good index,
//! and the watcher rereads from the complete snapshot at the next publication.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::index::{Generation, Index};
use mesh_snapshot::{Published, ReadOutcome, RegionError, Subscriber};

use crate::runtime::{self, ThreadClass};
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
    /// Last problem, for humans (admin endpoint); never on the data path.
    pub last_error: Mutex<String>,
    /// The index the workers were last given, for the admin config dump.
    pub current: Mutex<Option<Arc<Index>>>,
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

/// Runs until `stop` is set. `workers` receive every adopted index.
pub fn watch(
    path: PathBuf,
    workers: Vec<flume::Sender<Control>>,
    status: Arc<WatchStatus>,
    stop: Arc<AtomicBool>,
) {
    let mut priority = WatcherPriority::raise();
    let mut subscriber = Subscriber::new(&path);
    let mut last_error = String::new();
    let mut current: Option<Arc<Index>> = None;
    while !stop.load(Ordering::Acquire) {
        match subscriber.read() {
            Ok(ReadOutcome::New {
                version,
                base,
                deltas,
            }) => {
                let started = std::time::Instant::now();
                let full = base.is_some();
                let bytes = base.as_ref().map_or(0, |b| b.payload.len())
                    + deltas.iter().map(|d| d.payload.len()).sum::<usize>();
                let changes = deltas.len();
                // Building a whole index takes long: not at a priority above the workers.
                if full {
                    priority.lower();
                }
                let adopted = adopt(current.as_deref(), version.epoch, base, deltas);
                priority.restore();
                match adopted {
                    Ok(index) => {
                        let index = Arc::new(index);
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
                        let took_ms = started.elapsed().as_secs_f64() * 1e3;
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
                        current = Some(index);
                        last_error.clear();
                    }
                    Err(error) => {
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
                if matches!(
                    error,
                    RegionError::Checksum { .. }
                        | RegionError::Record { .. }
                        | RegionError::Length { .. }
                ) {
                    status.refused.fetch_add(1, Ordering::AcqRel);
                } else {
                    status.read_errors.fetch_add(1, Ordering::AcqRel);
                }
                // Log a problem once, not on every retry.
                if message != last_error {
                    tracing::warn!(error = %message, "cannot read the snapshot region");
                    status.note_error(message.clone());
                    last_error = message;
                }
            }
        }
        subscriber.wait(Duration::from_millis(500));
    }
}

/// The index for what a read returned: built from the base when there is one (first read, new
/// epoch, resync), else the current index; then every delta applied in order. Each delta's
/// generation is stamped on the index it produces.
pub fn adopt(
    current: Option<&Index>,
    epoch: u64,
    base: Option<Published>,
    deltas: Vec<Published>,
) -> Result<Index, String> {
    let stamp = |generation| Generation { epoch, generation };
    let mut index = match (base, current) {
        (Some(base), _) => {
            let snapshot = mesh_snapshot::decode(&base.payload).map_err(|e| e.to_string())?;
            Index::build(snapshot, stamp(base.generation)).map_err(|e| e.to_string())?
        }
        (None, Some(current)) => current.clone(),
        (None, None) => return Err("changes arrived before any complete snapshot".into()),
    };
    for delta in deltas {
        let decoded = mesh_snapshot::delta::decode(&delta.payload)
            .map_err(|e| format!("generation {}: {e}", delta.generation))?;
        index = index
            .apply(decoded, stamp(delta.generation))
            .map_err(|e| format!("generation {}: {e}", delta.generation))?;
    }
    Ok(index)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
