//! The snapshot watcher: a thread off the data path that waits on the region's futex, verifies
//! and decodes each new generation, builds the index once, and hands the same `Arc<Index>` to
//! every worker. A refused snapshot changes nothing on the workers.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::index::{Generation, Index};
use mesh_snapshot::{ReadOutcome, Subscriber};

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

/// Runs until `stop` is set. `workers` receive every adopted index.
pub fn watch(
    path: PathBuf,
    workers: Vec<flume::Sender<Control>>,
    status: Arc<WatchStatus>,
    stop: Arc<AtomicBool>,
) {
    let mut subscriber = Subscriber::new(&path);
    let mut last_error = String::new();
    while !stop.load(Ordering::Acquire) {
        match subscriber.read() {
            Ok(ReadOutcome::New { version, payload }) => {
                let generation = Generation {
                    epoch: version.epoch,
                    generation: version.generation,
                };
                let started = std::time::Instant::now();
                let built = mesh_snapshot::decode(&payload)
                    .map_err(|e| e.to_string())
                    .and_then(|s| Index::build(s, generation).map_err(|e| e.to_string()));
                match built {
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
                        if let Ok(mut current) = status.current.lock() {
                            *current = Some(index.clone());
                        }
                        tracing::info!(
                            epoch = version.epoch,
                            generation = version.generation,
                            workloads = index.workloads().len(),
                            bytes = payload.len(),
                            decode_ms = started.elapsed().as_secs_f64() * 1e3,
                            source = index.source(),
                            "snapshot adopted"
                        );
                        last_error.clear();
                    }
                    Err(error) => {
                        status.refused.fetch_add(1, Ordering::AcqRel);
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
                if matches!(error, mesh_snapshot::RegionError::Checksum { .. }) {
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

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
