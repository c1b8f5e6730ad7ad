//! Applying a set of file writes (sysctls, IRQ affinities, RPS/XPS masks) so that they can be
//! reverted exactly: the previous contents of every file written are saved first, a failed
//! write rolls back the ones before it, and revert puts every saved value back.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sysfs::Root;

/// One file to set, relative to the root (e.g. `proc/sys/net/core/somaxconn`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    pub path: PathBuf,
    pub value: String,
}

/// What an apply changed, saved for revert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// What was applied (a profile name, "core plan").
    pub what: String,
    pub entries: Vec<SavedEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedEntry {
    pub path: PathBuf,
    /// The file's contents before, as read (trailing newline trimmed).
    pub previous: String,
    pub value: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0} exists: a previous apply has not been reverted (run `meshtune revert` first)")]
    AlreadyApplied(PathBuf),
    #[error("nothing to revert: {0} does not exist")]
    NothingApplied(PathBuf),
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("writing {value:?} to {path}: {error} (earlier writes were rolled back)")]
    Write {
        path: PathBuf,
        value: String,
        error: std::io::Error,
    },
    #[error("state file {0}: {1}")]
    State(PathBuf, String),
    #[error("revert left {0} file(s) unrestored: {1}")]
    Revert(usize, String),
}

fn read_raw(root: &Root, path: &Path) -> Result<String, StateError> {
    std::fs::read_to_string(root.path(&path.to_string_lossy()))
        .map(|s| s.trim_end_matches('\n').to_owned())
        .map_err(|e| StateError::Read(path.to_owned(), e))
}

fn write_raw(root: &Root, path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(root.path(&path.to_string_lossy()), format!("{value}\n"))
}

/// Applies `writes`, saving what was there to `state`. Files whose value is already right are
/// not touched (and not saved). All or nothing: on a failed write, the earlier ones are put
/// back and nothing is saved.
pub fn apply(root: &Root, what: &str, writes: &[Write], state: &Path) -> Result<Saved, StateError> {
    if state.exists() {
        return Err(StateError::AlreadyApplied(state.to_owned()));
    }
    let mut saved = Saved {
        what: what.to_owned(),
        entries: Vec::new(),
    };
    // Read everything first: a file that cannot be read stops the apply before any write.
    let previous: Vec<String> = writes
        .iter()
        .map(|w| read_raw(root, &w.path))
        .collect::<Result<_, _>>()?;
    for (w, previous) in writes.iter().zip(previous) {
        if crate::sysfs::normalize(&previous) == crate::sysfs::normalize(&w.value) {
            continue;
        }
        if let Err(error) = write_raw(root, &w.path, &w.value) {
            let _ = restore(root, &saved.entries);
            return Err(StateError::Write {
                path: w.path.clone(),
                value: w.value.clone(),
                error,
            });
        }
        saved.entries.push(SavedEntry {
            path: w.path.clone(),
            previous,
            value: w.value.clone(),
        });
    }
    let json = serde_json::to_vec_pretty(&saved)
        .map_err(|e| StateError::State(state.to_owned(), e.to_string()))?;
    if let Some(dir) = state.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| StateError::State(dir.to_owned(), e.to_string()))?;
    }
    if let Err(e) = std::fs::write(state, json) {
        // Without the state file there would be no way back: undo.
        let _ = restore(root, &saved.entries);
        return Err(StateError::State(state.to_owned(), e.to_string()));
    }
    Ok(saved)
}

/// Puts back every file an apply changed, then removes the state file.
pub fn revert(root: &Root, state: &Path) -> Result<Saved, StateError> {
    if !state.exists() {
        return Err(StateError::NothingApplied(state.to_owned()));
    }
    let bytes = std::fs::read(state).map_err(|e| StateError::Read(state.to_owned(), e))?;
    let saved: Saved = serde_json::from_slice(&bytes)
        .map_err(|e| StateError::State(state.to_owned(), e.to_string()))?;
    restore(root, &saved.entries)?;
    std::fs::remove_file(state).map_err(|e| StateError::State(state.to_owned(), e.to_string()))?;
    Ok(saved)
}

/// Restores in reverse order; tries every entry and reports the ones that failed.
fn restore(root: &Root, entries: &[SavedEntry]) -> Result<(), StateError> {
    let failures: Vec<String> = entries
        .iter()
        .rev()
        .filter_map(|e| {
            write_raw(root, &e.path, &e.previous)
                .err()
                .map(|err| format!("{}: {err}", e.path.display()))
        })
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(StateError::Revert(failures.len(), failures.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("meshtune-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("proc/sys/net/core")).expect("dir");
        std::fs::create_dir_all(dir.join("proc/sys/net/ipv4")).expect("dir");
        dir
    }

    #[test]
    fn revert_restores_exactly_what_was_there_and_only_what_changed() {
        let dir = scratch("revert");
        let root = Root::new(&dir);
        std::fs::write(dir.join("proc/sys/net/core/somaxconn"), "4096\n").expect("w");
        std::fs::write(
            dir.join("proc/sys/net/ipv4/tcp_rmem"),
            "4096\t131072\t6291456\n",
        )
        .expect("w");
        std::fs::write(dir.join("proc/sys/net/ipv4/tcp_tw_reuse"), "1\n").expect("w");
        let writes = [
            ("proc/sys/net/core/somaxconn", "8192"),
            ("proc/sys/net/ipv4/tcp_rmem", "4096 131072 16777216"),
            ("proc/sys/net/ipv4/tcp_tw_reuse", "1"),
        ]
        .map(|(p, v)| Write {
            path: p.into(),
            value: v.into(),
        });
        let state = dir.join("state/tuning.json");
        let saved = apply(&root, "throughput", &writes, &state).expect("apply");
        // tcp_tw_reuse was already right: not touched, not saved.
        assert_eq!(saved.entries.len(), 2);
        assert_eq!(
            root.read_setting("net.core.somaxconn").as_deref(),
            Some("8192")
        );
        assert!(matches!(
            apply(&root, "again", &writes, &state),
            Err(StateError::AlreadyApplied(_))
        ));
        revert(&root, &state).expect("revert");
        assert_eq!(
            std::fs::read_to_string(dir.join("proc/sys/net/ipv4/tcp_rmem")).expect("r"),
            "4096\t131072\t6291456\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("proc/sys/net/core/somaxconn")).expect("r"),
            "4096\n"
        );
        assert!(!state.exists());
        assert!(matches!(
            revert(&root, &state),
            Err(StateError::NothingApplied(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_write_rolls_back_the_earlier_ones_and_saves_nothing() {
        let dir = scratch("rollback");
        let root = Root::new(&dir);
        std::fs::write(dir.join("proc/sys/net/core/somaxconn"), "4096\n").expect("w");
        // A file that reads but refuses writes, even for root: the write fails.
        std::os::unix::fs::symlink("/proc/self/stat", dir.join("proc/sys/net/core/rmem_max"))
            .expect("symlink");
        let writes = [
            ("proc/sys/net/core/somaxconn", "8192"),
            ("proc/sys/net/core/rmem_max", "16777216"),
        ]
        .map(|(p, v)| Write {
            path: p.into(),
            value: v.into(),
        });
        let state = dir.join("tuning.json");
        let error = apply(&root, "throughput", &writes, &state).expect_err("fails");
        assert!(error.to_string().contains("rmem_max"), "{error}");
        assert_eq!(
            root.read_setting("net.core.somaxconn").as_deref(),
            Some("4096")
        );
        assert!(!state.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
