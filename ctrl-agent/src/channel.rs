//! The agent's end of the snapshot channel: what it published last, as keyed state, and the
//! region it publishes to. A source hands it either a whole new state (the file source, which
//! rereads everything) or a delta (a watch-based source, which hears of each change); either
//! way one record goes to the region's log when the change is small, and the log is compacted
//! into a complete snapshot once it grows long.

use std::path::Path;

use mesh_snapshot::delta::{self, Delta, State};
use mesh_snapshot::region::{Appended, PublishOptions, Publisher, Version};
use mesh_snapshot::RegionError;

pub struct SnapshotChannel {
    publisher: Publisher,
    /// What the region holds now (base plus log).
    state: Option<State>,
    /// Logs rewritten as a base so far.
    compactions: u64,
}

/// How much of the region the published state takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    /// The complete snapshot as stored (compressed when large).
    pub base_bytes: u64,
    /// Changes appended since.
    pub log_bytes: u64,
    /// What one slot holds, base and log together.
    pub slot_capacity: u64,
    /// The file's pages in memory (tmpfs), both slots.
    pub file_bytes: u64,
    pub compactions: u64,
}

/// What one publication did (not to be confused with a region record, `mesh_snapshot::Published`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publication {
    /// Nothing differed from what readers have.
    Unchanged,
    /// A delta of this many changes was appended.
    Delta { version: Version, changes: usize },
    /// A complete snapshot was written (first publication, a node or root-namespace change, a
    /// change too big for the log).
    Full(Version),
}

impl SnapshotChannel {
    pub fn create(path: &Path, options: PublishOptions) -> Result<SnapshotChannel, RegionError> {
        Ok(SnapshotChannel {
            publisher: Publisher::create(path, options)?,
            state: None,
            compactions: 0,
        })
    }

    /// How much of the region is used.
    pub fn footprint(&self) -> Footprint {
        Footprint {
            base_bytes: self.publisher.base_bytes(),
            log_bytes: self.publisher.log_bytes(),
            slot_capacity: self.publisher.slot_capacity(),
            // Unknown only if fstat fails on an open file; shown as 0 rather than stale.
            file_bytes: self.publisher.file_bytes().unwrap_or(0),
            compactions: self.compactions,
        }
    }

    /// What readers hold now, if anything was published.
    pub fn state(&self) -> Option<&State> {
        self.state.as_ref()
    }

    /// Publishes `next` as the complete new state: the delta from the current state when
    /// there is one, a complete snapshot otherwise.
    pub fn publish_state(&mut self, next: State) -> Result<Publication, RegionError> {
        let delta = self.state.as_ref().and_then(|current| current.diff(&next));
        match delta {
            Some(delta) if delta.is_empty() => Ok(Publication::Unchanged),
            Some(delta) => self.append(delta, next),
            None => self.publish_full(next),
        }
    }

    /// Publishes one change on top of the current state (which must exist: a source
    /// publishes its complete initial state first). The state is changed in place, not
    /// copied (a copy of 100k workloads costs more than the change). If the region refuses
    /// the write, the state is dropped: what readers hold is then unknown, and the next
    /// publication must be complete (`state()` is `None` until then).
    pub fn publish_delta(&mut self, delta: Delta) -> Result<Publication, RegionError> {
        if delta.is_empty() {
            return Ok(Publication::Unchanged);
        }
        let Some(mut next) = self.state.take() else {
            let mut next = State::default();
            next.apply(&delta);
            return self.publish_full(next);
        };
        next.apply(&delta);
        self.append(delta, next)
    }

    /// Appends `delta`, which turns the current state into `next`. On an error the current
    /// state stays unless it was already taken (see `publish_delta`).
    fn append(&mut self, delta: Delta, next: State) -> Result<Publication, RegionError> {
        let bytes = delta::encode(&delta);
        match self.publisher.append(&bytes)? {
            Appended::Published(version) => {
                self.state = Some(next);
                if self.publisher.wants_compaction() {
                    self.compact()?;
                }
                Ok(Publication::Delta {
                    version,
                    changes: delta.len(),
                })
            }
            Appended::NeedsFull => self.publish_full(next),
        }
    }

    fn publish_full(&mut self, next: State) -> Result<Publication, RegionError> {
        let payload = mesh_snapshot::encode(&next.snapshot());
        let version = self.publisher.publish(&payload)?;
        self.state = Some(next);
        Ok(Publication::Full(version))
    }

    /// Rewrites the current state as the base, emptying the log (readers that kept up notice
    /// nothing; one that starts later reads one payload instead of a long log).
    fn compact(&mut self) -> Result<(), RegionError> {
        if let Some(state) = &self.state {
            let payload = mesh_snapshot::encode(&state.snapshot());
            let version = self.publisher.compact(&payload)?;
            self.compactions += 1;
            tracing::info!(
                generation = version.generation,
                bytes = payload.len(),
                "snapshot log compacted"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_snapshot::schema::{Snapshot, Workload};
    use mesh_snapshot::{ReadOutcome, Subscriber};

    fn state(ips: &[u8]) -> State {
        State::from(Snapshot {
            node: "n1".into(),
            workloads: ips
                .iter()
                .map(|&i| Workload {
                    uid: format!("w{i}"),
                    ips: vec![vec![10, 0, 0, i]],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    #[test]
    fn states_go_out_as_deltas_and_deltas_as_records_readers_replay_exactly() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
        let path = dir.path().join("snapshot");
        let mut channel =
            SnapshotChannel::create(&path, PublishOptions::default()).expect("create");
        assert!(matches!(
            channel.publish_state(state(&[1, 2])).expect("publish"),
            Publication::Full(_)
        ));
        assert_eq!(
            channel.publish_state(state(&[1, 2])).expect("publish"),
            Publication::Unchanged
        );
        assert!(matches!(
            channel.publish_state(state(&[1, 2, 3])).expect("publish"),
            Publication::Delta { changes: 1, .. }
        ));
        let removal = Delta {
            removed_workloads: vec!["w1".into()],
            ..Delta::default()
        };
        assert!(matches!(
            channel.publish_delta(removal).expect("publish"),
            Publication::Delta { changes: 1, .. }
        ));
        assert_eq!(channel.state(), Some(&state(&[2, 3])));

        let mut reader = Subscriber::new(&path);
        let replayed = match reader.read().expect("read") {
            ReadOutcome::New { base, deltas, .. } => {
                assert_eq!(deltas.len(), 2, "the base and two records");
                delta::replay(None, base.as_ref(), &deltas).expect("decodes")
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(replayed.as_ref(), channel.state());
    }

    #[test]
    fn the_footprint_follows_the_base_the_log_and_compactions() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
        let mut channel =
            SnapshotChannel::create(&dir.path().join("snapshot"), PublishOptions::default())
                .expect("create");
        channel.publish_state(state(&[1, 2])).expect("publish");
        let first = channel.footprint();
        assert!(first.base_bytes > 0, "{first:?}");
        assert_eq!(first.log_bytes, 0);
        assert_eq!(first.compactions, 0);
        assert_eq!(
            first.slot_capacity,
            mesh_snapshot::region::DEFAULT_SLOT_CAPACITY
        );
        // Sparse: the header and the base's pages, not two whole slots.
        assert!(first.file_bytes >= first.base_bytes, "{first:?}");
        assert!(first.file_bytes < first.slot_capacity, "{first:?}");

        // Changes of about 10 KB each (a workload renamed back and forth) until the log is
        // rewritten as a base.
        let mut renamed = state(&[1, 2]);
        let mut log_grew = false;
        for round in 0..1000 {
            let name = if round % 2 == 0 { 'a' } else { 'b' };
            let mut next = renamed.snapshot();
            next.workloads[0].name = name.to_string().repeat(10_000);
            renamed = State::from(next);
            channel.publish_state(renamed.clone()).expect("publish");
            let now = channel.footprint();
            if now.compactions == 1 {
                assert!(log_grew, "the log grew first");
                assert_eq!(now.log_bytes, 0, "{now:?}");
                assert!(now.base_bytes > first.base_bytes, "{now:?}");
                return;
            }
            log_grew |= now.log_bytes > 100_000;
        }
        panic!("never compacted: {:?}", channel.footprint());
    }

    #[test]
    fn a_new_node_goes_out_complete() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("scratch dir");
        let mut channel =
            SnapshotChannel::create(&dir.path().join("snapshot"), PublishOptions::default())
                .expect("create");
        channel.publish_state(state(&[1])).expect("publish");
        let mut moved = state(&[1]);
        moved.node = "n2".into();
        assert!(matches!(
            channel.publish_state(moved).expect("publish"),
            Publication::Full(_)
        ));
    }
}
