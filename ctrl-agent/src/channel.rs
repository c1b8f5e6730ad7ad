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
        })
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
