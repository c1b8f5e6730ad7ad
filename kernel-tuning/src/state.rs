//! Applying a set of file writes (sysctls, IRQ affinities, RPS/XPS masks) so that they can be
//! reverted exactly, whatever point an apply is stopped at (a failed write, a kill, a power
//! loss): the state file is taken first (a later apply finds it and changes nothing), and each
//! file's previous contents are on disk in it before that file is written. A failed write rolls
//! back the ones before it; whatever cannot be rolled back stays in the state file, and revert
//! puts every saved value back. An apply and a revert of one state file never overlap: each
//! holds the state file's lock ([`StateLock`]) from before it reads the state until it is done.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
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
    #[error("{0} exists: an earlier apply (finished or stopped halfway) has not been reverted (run `meshtune revert` first)")]
    AlreadyApplied(PathBuf),
    #[error("{state} is in use: {lock} is held by {holder}; wait for it to finish and retry (a hung holder can be stopped: the kernel releases its lock; do not delete {lock} while it runs)")]
    Busy {
        state: PathBuf,
        lock: PathBuf,
        /// Who holds it, as it recorded itself (`pid N: command line`).
        holder: String,
    },
    #[error("taking the lock {0}: {1}")]
    Lock(PathBuf, std::io::Error),
    #[error("nothing to revert: {0} does not exist")]
    NothingApplied(PathBuf),
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("writing {value:?} to {path}: {error}; {rollback}")]
    Write {
        path: PathBuf,
        value: String,
        error: std::io::Error,
        rollback: Box<Rollback>,
    },
    #[error("state file {0}: {1}")]
    State(PathBuf, String),
    #[error("recording to state file {path}: {error}; {rollback}")]
    Record {
        path: PathBuf,
        error: std::io::Error,
        rollback: Box<Rollback>,
    },
    #[error("revert left {0} file(s) unrestored (still in the state file, retry with `meshtune revert`): {1}")]
    Revert(usize, String),
}

/// What became of the writes before a failed one.
#[derive(Debug)]
pub enum Rollback {
    /// All put back; no state file is left.
    Done,
    /// All put back, but the state file, which now only blocks the next apply, is still there.
    Stale { state: PathBuf, error: String },
    /// These could not be put back (`path: error`); they stay in `state` for a later revert.
    Left {
        state: PathBuf,
        failures: Vec<String>,
        /// Why they could not even be recorded there, if so.
        unrecorded: Option<String>,
    },
}

impl std::fmt::Display for Rollback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rollback::Done => write!(f, "earlier writes were rolled back"),
            Rollback::Stale { state, error } => write!(
                f,
                "earlier writes were rolled back, but removing {} failed ({error}): delete it before the next apply",
                state.display()
            ),
            Rollback::Left {
                state,
                failures,
                unrecorded: None,
            } => write!(
                f,
                "{} earlier write(s) could not be rolled back ({}); they stay in {} for `meshtune revert`",
                failures.len(),
                failures.join("; "),
                state.display()
            ),
            Rollback::Left {
                state,
                failures,
                unrecorded: Some(why),
            } => write!(
                f,
                "{} earlier write(s) could not be rolled back ({}), and recording them in {} failed too ({why}): restore them by hand",
                failures.len(),
                failures.join("; "),
                state.display()
            ),
        }
    }
}

/// The lock file of a state file: `<state>.lock`.
pub fn lock_path(state: &Path) -> PathBuf {
    let mut path = state.as_os_str().to_owned();
    path.push(".lock");
    PathBuf::from(path)
}

/// The lock of one state file, held by an apply or a revert from before it reads the state
/// file until it is done with it and with the files it names: a revert cannot restore a state
/// an apply is still writing, nor can an apply read as "previous" what a revert is putting
/// back. It is a `flock` on [`lock_path`], which the kernel drops however its holder ends, so a
/// killed apply leaves no lock to clear by hand: the next taker gets it, and says whose it was.
/// Dropping it removes the lock file.
#[derive(Debug)]
pub struct StateLock {
    path: PathBuf,
    file: std::fs::File,
}

impl StateLock {
    /// Takes the lock of `state`, or fails with [`StateError::Busy`] naming its holder.
    pub fn take(state: &Path) -> Result<StateLock, StateError> {
        let path = lock_path(state);
        let failed = |e: std::io::Error| StateError::Lock(path.clone(), e);
        // Another try only when a holder removed the file between our open and our lock: the
        // lock we got is then on a file no one else will open.
        for _ in 0..8 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(failed)?;
            if !try_lock_exclusive(&file).map_err(failed)? {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "another process (not yet recorded)".to_owned(),
                    recorded => recorded.to_owned(),
                };
                return Err(StateError::Busy {
                    state: state.to_owned(),
                    lock: path,
                    holder,
                });
            }
            if !is_at(&file, &path).map_err(failed)? {
                continue;
            }
            // A clean release empties and removes the file, so a record left in it is the
            // holder's that ended without one (SIGKILL, OOM kill, power loss).
            let mut left = String::new();
            file.read_to_string(&mut left).map_err(failed)?;
            if !left.trim().is_empty() {
                eprintln!(
                    "note: taking over {}: its holder ({}) ended without releasing it (killed?)",
                    path.display(),
                    left.trim()
                );
            }
            let command: Vec<String> = std::env::args_os()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let record = format!("pid {}: {}\n", std::process::id(), command.join(" "));
            file.set_len(0).map_err(failed)?;
            file.write_all_at(record.as_bytes(), 0).map_err(failed)?;
            return Ok(StateLock { path, file });
        }
        Err(failed(std::io::Error::other(
            "it was replaced on every try",
        )))
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        // Emptied first: should the removal fail, the next taker finds no holder to report.
        // The lock itself goes when the file is closed, after this.
        let _ = self.file.set_len(0);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: `false` if another open file (any process, or this one) holds it.
#[allow(unsafe_code)]
fn try_lock_exclusive(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd as _;
    loop {
        // SAFETY: flock takes no pointers; the descriptor belongs to `file`, which is open for
        // the whole call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(true);
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(error),
        }
    }
}

/// Whether `path` still names the open `file` (a released lock file is removed).
fn is_at(file: &std::fs::File, path: &Path) -> std::io::Result<bool> {
    let held = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(now) => Ok(now.dev() == held.dev() && now.ino() == held.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn read_raw(root: &Root, path: &Path) -> Result<String, StateError> {
    std::fs::read_to_string(root.path(&path.to_string_lossy()))
        .map(|s| s.trim_end_matches('\n').to_owned())
        .map_err(|e| StateError::Read(path.to_owned(), e))
}

fn write_raw(root: &Root, path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(root.path(&path.to_string_lossy()), format!("{value}\n"))
}

/// Replaces the state file with `saved`, durably: a crash leaves either the old record or the
/// new one, never a torn file.
fn record(state: &Path, saved: &Saved) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?;
    let mut tmp = state.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&json)?;
    file.sync_all()?;
    std::fs::rename(&tmp, state)?;
    sync_dir(state)
}

/// The rename (or creation) of `state` survives a power loss only once its directory is synced.
fn sync_dir(state: &Path) -> std::io::Result<()> {
    let dir = match state.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Reads a state file. An empty one is an apply stopped before it changed anything.
pub fn load(state: &Path) -> Result<Saved, StateError> {
    let bytes = std::fs::read(state).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => StateError::NothingApplied(state.to_owned()),
        _ => StateError::Read(state.to_owned(), e),
    })?;
    if bytes.is_empty() {
        return Ok(Saved {
            what: String::new(),
            entries: Vec::new(),
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| StateError::State(state.to_owned(), e.to_string()))
}

/// Applies `writes`, saving what was there to `state`. Files whose value is already right are
/// not touched (and not saved). All or nothing: on a failed write, the earlier ones are put
/// back and the state file removed (or left naming the ones that could not be put back).
/// Holds the state file's lock throughout: refused with [`StateError::Busy`] while another
/// apply or a revert of `state` runs.
pub fn apply(root: &Root, what: &str, writes: &[Write], state: &Path) -> Result<Saved, StateError> {
    if let Some(dir) = state.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| StateError::State(dir.to_owned(), e.to_string()))?;
    }
    let _lock = StateLock::take(state)?;
    // An existing state file is an apply not yet reverted: this one stops here, before reading
    // or writing anything, so no apply records another's values as "previous".
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(state)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(StateError::AlreadyApplied(state.to_owned()))
        }
        Err(e) => return Err(StateError::State(state.to_owned(), e.to_string())),
    }
    let mut saved = Saved {
        what: what.to_owned(),
        entries: Vec::new(),
    };
    // Read everything first: a file that cannot be read stops the apply before any write.
    let previous = writes
        .iter()
        .map(|w| read_raw(root, &w.path))
        .collect::<Result<Vec<_>, _>>()
        .and_then(|previous| {
            record(state, &saved)
                .map(|()| previous)
                .map_err(|e| StateError::State(state.to_owned(), e.to_string()))
        });
    let previous = match previous {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_file(state);
            return Err(e);
        }
    };
    for (w, previous) in writes.iter().zip(previous) {
        if crate::sysfs::normalize(&previous) == crate::sysfs::normalize(&w.value) {
            continue;
        }
        saved.entries.push(SavedEntry {
            path: w.path.clone(),
            previous,
            value: w.value.clone(),
        });
        // On disk before the file changes: a kill from here on leaves a record revert can use.
        if let Err(error) = record(state, &saved) {
            saved.entries.pop();
            return Err(StateError::Record {
                path: state.to_owned(),
                error,
                rollback: Box::new(roll_back(root, state, saved)),
            });
        }
        if let Err(error) = write_raw(root, &w.path, &w.value) {
            // A refused write usually changes nothing, but a multi-value sysctl can take the
            // fields before a bad one: restore it too unless it still reads as before.
            let entry = saved.entries.last().expect("just pushed");
            let unchanged = read_raw(root, &entry.path).is_ok_and(|now| {
                crate::sysfs::normalize(&now) == crate::sysfs::normalize(&entry.previous)
            });
            if unchanged {
                saved.entries.pop();
            }
            return Err(StateError::Write {
                path: w.path.clone(),
                value: w.value.clone(),
                error,
                rollback: Box::new(roll_back(root, state, saved)),
            });
        }
    }
    Ok(saved)
}

/// Undoes a partial apply: the state file goes if everything was put back, and otherwise keeps
/// just what was not.
fn roll_back(root: &Root, state: &Path, mut saved: Saved) -> Rollback {
    let failed = restore(root, &saved.entries);
    if failed.is_empty() {
        return match std::fs::remove_file(state) {
            Ok(()) => Rollback::Done,
            Err(e) => Rollback::Stale {
                state: state.to_owned(),
                error: e.to_string(),
            },
        };
    }
    let failures = failed.iter().map(|(_, why)| why.clone()).collect();
    saved.entries = failed.into_iter().map(|(e, _)| e).collect();
    Rollback::Left {
        state: state.to_owned(),
        failures,
        unrecorded: record(state, &saved).err().map(|e| e.to_string()),
    }
}

/// Puts back every file an apply changed, then removes the state file. Files that cannot be
/// put back stay in it, alone, so that a retry restores just those. Holds the state file's
/// lock throughout: refused with [`StateError::Busy`], changing nothing, while an apply of
/// `state` runs.
pub fn revert(root: &Root, state: &Path) -> Result<Saved, StateError> {
    let _lock = match StateLock::take(state) {
        // No directory for the lock file: no state file either.
        Err(StateError::Lock(_, e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StateError::NothingApplied(state.to_owned()))
        }
        taken => taken?,
    };
    let saved = load(state)?;
    let failed = restore(root, &saved.entries);
    if !failed.is_empty() {
        let why: Vec<String> = failed.iter().map(|(_, why)| why.clone()).collect();
        let left = Saved {
            what: saved.what.clone(),
            entries: failed.into_iter().map(|(e, _)| e).collect(),
        };
        record(state, &left).map_err(|e| StateError::State(state.to_owned(), e.to_string()))?;
        return Err(StateError::Revert(why.len(), why.join("; ")));
    }
    std::fs::remove_file(state).map_err(|e| StateError::State(state.to_owned(), e.to_string()))?;
    Ok(saved)
}

/// Restores in reverse order; tries every entry and returns the ones that failed (in their
/// original order), each with why.
fn restore(root: &Root, entries: &[SavedEntry]) -> Vec<(SavedEntry, String)> {
    let mut failed: Vec<(SavedEntry, String)> = entries
        .iter()
        .rev()
        .filter_map(|e| {
            write_raw(root, &e.path, &e.previous)
                .err()
                .map(|err| (e.clone(), format!("{}: {err}", e.path.display())))
        })
        .collect();
    failed.reverse();
    failed
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
        // A file that reads the same always but refuses writes, even for root: the write
        // fails and leaves nothing of its own to restore.
        std::os::unix::fs::symlink("/proc/version", dir.join("proc/sys/net/core/rmem_max"))
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

    /// A named pipe at `path`: an apply reading it waits for the test to write, and one
    /// writing it waits for the test to read, which holds an apply at a chosen point.
    fn fifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("mkfifo");
        assert!(status.success());
    }

    /// Waits (at most 20 s) until `path` reads `want`.
    fn wait_for(path: &Path, want: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::fs::read_to_string(path).ok().as_deref() != Some(want) {
            assert!(
                std::time::Instant::now() < deadline,
                "{} never became {want:?}",
                path.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn writes(pairs: &[(&str, &str)]) -> Vec<Write> {
        pairs
            .iter()
            .map(|(p, v)| Write {
                path: p.into(),
                value: (*v).into(),
            })
            .collect()
    }

    /// An apply of somaxconn 8192, then 0 to the pipe at `tcp_slow_start_after_idle`, that
    /// has set somaxconn (from 4096) and now blocks writing the pipe, which nothing reads.
    struct HeldApply {
        root: Root,
        somaxconn: PathBuf,
        pipe: PathBuf,
        state: PathBuf,
        thread: std::thread::JoinHandle<Result<Saved, StateError>>,
    }

    impl HeldApply {
        fn start(dir: &Path, what: &'static str) -> HeldApply {
            let root = Root::new(dir);
            let somaxconn = dir.join("proc/sys/net/core/somaxconn");
            let pipe = dir.join("proc/sys/net/ipv4/tcp_slow_start_after_idle");
            std::fs::write(&somaxconn, "4096\n").expect("w");
            fifo(&pipe);
            let state = dir.join("tuning.json");
            let thread = {
                let (root, state) = (root.clone(), state.clone());
                std::thread::spawn(move || {
                    let w = writes(&[
                        ("proc/sys/net/core/somaxconn", "8192"),
                        ("proc/sys/net/ipv4/tcp_slow_start_after_idle", "0"),
                    ]);
                    apply(&root, what, &w, &state)
                })
            };
            std::fs::write(&pipe, "1\n").expect("feed the apply's read");
            wait_for(&somaxconn, "8192\n");
            HeldApply {
                root,
                somaxconn,
                pipe,
                state,
                thread,
            }
        }

        /// Lets the apply write the pipe and finish, then reverts: both files as before.
        fn finish_and_revert(self) -> Saved {
            assert_eq!(std::fs::read_to_string(&self.pipe).expect("r"), "0\n");
            let saved = self.thread.join().expect("thread").expect("apply");
            std::fs::remove_file(&self.pipe).expect("rm");
            std::fs::write(&self.pipe, "0\n").expect("w");
            revert(&self.root, &self.state).expect("revert");
            assert_eq!(
                std::fs::read_to_string(&self.somaxconn).expect("r"),
                "4096\n"
            );
            assert_eq!(std::fs::read_to_string(&self.pipe).expect("r"), "1\n");
            saved
        }
    }

    #[test]
    fn a_second_apply_while_one_is_running_is_refused_and_changes_nothing() {
        let dir = scratch("concurrent");
        let tw_reuse = dir.join("proc/sys/net/ipv4/tcp_tw_reuse");
        std::fs::write(&tw_reuse, "0\n").expect("w");
        // The first apply sets somaxconn, then waits on the pipe.
        let first = HeldApply::start(&dir, "first");
        let (root, somaxconn, state) = (&first.root, &first.somaxconn, &first.state);

        let recorded = std::fs::read(state).ok();
        let second = writes(&[
            ("proc/sys/net/core/somaxconn", "16384"),
            ("proc/sys/net/ipv4/tcp_tw_reuse", "1"),
        ]);
        assert!(matches!(
            apply(root, "second", &second, state),
            Err(StateError::Busy { .. })
        ));
        assert_eq!(std::fs::read_to_string(somaxconn).expect("r"), "8192\n");
        assert_eq!(std::fs::read_to_string(&tw_reuse).expect("r"), "0\n");
        assert!(recorded.is_some(), "the running apply holds the state file");
        assert_eq!(std::fs::read(state).ok(), recorded);

        // Let the first one finish: its revert restores the values from before it.
        let saved = first.finish_and_revert();
        assert_eq!(saved.entries.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_revert_while_an_apply_runs_is_refused_and_changes_nothing() {
        let dir = scratch("revert-during-apply");
        // The apply sets somaxconn, records it, then waits to write the pipe.
        let running = HeldApply::start(&dir, "throughput");
        let (root, somaxconn, state) = (&running.root, &running.somaxconn, &running.state);
        // Recorded, the pipe is what it writes next: it waits there, since nothing reads it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !std::fs::read_to_string(state)
            .unwrap_or_default()
            .contains("tcp_slow_start_after_idle")
        {
            assert!(std::time::Instant::now() < deadline, "never recorded");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }

        let recorded = std::fs::read(state).expect("the running apply's state file");
        // A revert that does not refuse would wait on the pipe too: give it a deadline.
        let (sender, receiver) = std::sync::mpsc::channel();
        {
            let (root, state) = (root.clone(), state.clone());
            std::thread::spawn(move || sender.send(revert(&root, &state)));
        }
        let reverted = receiver
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("revert returns instead of waiting on the apply's files");
        match reverted {
            Err(StateError::Busy { lock, holder, .. }) => {
                assert_eq!(lock, lock_path(state));
                assert!(
                    holder.starts_with(&format!("pid {}:", std::process::id())),
                    "{holder}"
                );
            }
            other => panic!("revert during an apply: {other:?}"),
        }
        assert_eq!(std::fs::read_to_string(somaxconn).expect("r"), "8192\n");
        assert_eq!(std::fs::read(state).expect("state"), recorded);

        // Once the apply is done, revert restores both and the lock file is gone.
        let state = state.clone();
        running.finish_and_revert();
        assert!(!lock_path(&state).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_lock_file_its_holder_left_behind_is_taken_over_and_a_held_one_is_not() {
        let dir = scratch("stale-lock");
        let root = Root::new(&dir);
        let somaxconn = dir.join("proc/sys/net/core/somaxconn");
        std::fs::write(&somaxconn, "4096\n").expect("w");
        let state = dir.join("tuning.json");
        let w = writes(&[("proc/sys/net/core/somaxconn", "8192")]);

        // Held by a live holder (here, this test): refused, nothing changes.
        let held = StateLock::take(&state).expect("lock");
        assert!(matches!(
            apply(&root, "throughput", &w, &state),
            Err(StateError::Busy { .. })
        ));
        assert!(!state.exists());
        assert_eq!(std::fs::read_to_string(&somaxconn).expect("r"), "4096\n");
        drop(held);
        assert!(
            !lock_path(&state).exists(),
            "a released lock leaves no file"
        );

        // What a killed apply leaves: the file with its record, and no one holding it.
        std::fs::write(
            lock_path(&state),
            "pid 4194303: meshtune apply --profile throughput --yes\n",
        )
        .expect("w");
        apply(&root, "throughput", &w, &state).expect("apply takes it over");
        assert_eq!(std::fs::read_to_string(&somaxconn).expect("r"), "8192\n");
        std::fs::write(lock_path(&state), "pid 4194303: meshtune revert --yes\n").expect("w");
        revert(&root, &state).expect("revert takes it over");
        assert_eq!(std::fs::read_to_string(&somaxconn).expect("r"), "4096\n");
        assert!(!lock_path(&state).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_rollback_that_fails_leaves_a_state_file_naming_what_is_left() {
        let dir = scratch("failed-rollback");
        let root = Root::new(&dir);
        let somaxconn = dir.join("proc/sys/net/core/somaxconn");
        let pipe = dir.join("proc/sys/net/ipv4/tcp_slow_start_after_idle");
        std::fs::write(&somaxconn, "4096\n").expect("w");
        fifo(&pipe);
        std::os::unix::fs::symlink("/proc/version", dir.join("proc/sys/net/core/rmem_max"))
            .expect("symlink");
        let state = dir.join("tuning.json");
        let apply = {
            let (root, state) = (root.clone(), state.clone());
            std::thread::spawn(move || {
                let w = writes(&[
                    ("proc/sys/net/core/somaxconn", "8192"),
                    ("proc/sys/net/ipv4/tcp_slow_start_after_idle", "0"),
                    ("proc/sys/net/core/rmem_max", "16777216"),
                ]);
                apply(&root, "throughput", &w, &state)
            })
        };
        std::fs::write(&pipe, "1\n").expect("feed the apply's read");
        wait_for(&somaxconn, "8192\n");
        // somaxconn can no longer be written (open for writing fails on a directory, even for
        // root), so rolling it back will fail.
        std::fs::remove_file(&somaxconn).expect("rm");
        std::fs::create_dir(&somaxconn).expect("mkdir");
        // Kept open, the pipe takes both the apply's write and its rollback; rmem_max fails.
        let reader = std::fs::File::open(&pipe).expect("open pipe");
        let error = apply
            .join()
            .expect("thread")
            .expect_err("rmem_max refuses the write");
        let message = error.to_string();
        assert!(message.contains("rmem_max"), "{message}");
        assert!(
            message.contains("1 earlier write(s) could not be rolled back")
                && message.contains("somaxconn"),
            "{message}"
        );
        drop(reader);
        let left = load(&state).expect("the state file stays for revert");
        assert_eq!(
            left.entries,
            [SavedEntry {
                path: "proc/sys/net/core/somaxconn".into(),
                previous: "4096".into(),
                value: "8192".into(),
            }]
        );
        // Once somaxconn can be written again, revert finishes the job.
        std::fs::remove_dir(&somaxconn).expect("rmdir");
        std::fs::write(&somaxconn, "8192\n").expect("w");
        revert(&root, &state).expect("revert");
        assert_eq!(std::fs::read_to_string(&somaxconn).expect("r"), "4096\n");
        assert!(!state.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
