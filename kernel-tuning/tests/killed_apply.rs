//! `meshtune apply` stopped halfway on a scratch tree (`--root`): one setting is a named pipe,
//! so the apply blocks writing it after the settings before it are written. While it is held
//! there, `meshtune revert` must be refused and change nothing; once it is killed (SIGKILL, as
//! an OOM kill or a lost SSH session's reaper would), `revert` must take over the lock it left
//! and put back exactly what was there.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn meshtune(root: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_meshtune"));
    command.arg("--root").arg(root).args(args);
    command
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const RANGE: &str = "32768\t60999\n";

/// A `meshtune apply --profile throughput --yes` that has written its first two settings and
/// waits to write the third, a pipe nothing reads.
struct HeldApply {
    dir: PathBuf,
    before: [(PathBuf, &'static str); 4],
    pipe: PathBuf,
    state: PathBuf,
    apply: Child,
    stop: Arc<AtomicBool>,
    feeder: Option<JoinHandle<()>>,
}

impl HeldApply {
    fn start(name: &str) -> HeldApply {
        let dir = std::env::temp_dir().join(format!("meshtune-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sys = dir.join("proc/sys/net");
        std::fs::create_dir_all(sys.join("core")).expect("dir");
        std::fs::create_dir_all(sys.join("ipv4")).expect("dir");
        // The throughput profile's first settings, in its order; the third is the pipe.
        let before: [(PathBuf, &str); 4] = [
            (sys.join("core/somaxconn"), "4096\n"),
            (sys.join("ipv4/tcp_max_syn_backlog"), "512\n"),
            (sys.join("ipv4/tcp_tw_reuse"), "0\n"),
            (sys.join("ipv4/tcp_slow_start_after_idle"), "1\n"),
        ];
        for (path, value) in &before {
            std::fs::write(path, value).expect("w");
        }
        let pipe = sys.join("ipv4/ip_local_port_range");
        let status = Command::new("mkfifo").arg(&pipe).status().expect("mkfifo");
        assert!(status.success());
        let state = dir.join("state/tuning.json");

        // meshtune reads the pipe twice (compare, then apply's read of what was there): feed
        // every reader; the pause lets each reader see the end of its feed before the next one
        // starts.
        let stop = Arc::new(AtomicBool::new(false));
        let feeder = {
            let (pipe, stop) = (pipe.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(mut w) = std::fs::OpenOptions::new().write(true).open(&pipe) {
                        let _ = w.write_all(RANGE.as_bytes());
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
        };

        let mut apply = meshtune(
            &dir,
            &["apply", "--profile", "throughput", "--yes", "--state"],
        )
        .arg(&state)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run meshtune apply");
        let deadline = Instant::now() + Duration::from_secs(30);
        while read(&before[0].0) != "8192\n" || read(&before[1].0) != "8192\n" {
            assert!(Instant::now() < deadline, "apply never wrote the first two");
            assert!(apply.try_wait().expect("wait").is_none(), "apply exited");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Recorded, the pipe is what it writes next: it waits there, since nothing reads it.
        while !std::fs::read_to_string(&state)
            .unwrap_or_default()
            .contains("ip_local_port_range")
        {
            assert!(Instant::now() < deadline, "apply never recorded the pipe");
            std::thread::sleep(Duration::from_millis(10));
        }
        HeldApply {
            dir,
            before,
            pipe,
            state,
            apply,
            stop,
            feeder: Some(feeder),
        }
    }

    /// SIGKILLs the apply where it waits, and makes the pipe a plain file holding what it held.
    fn kill(&mut self) {
        self.apply.kill().expect("kill");
        self.apply.wait().expect("reap");
        self.stop.store(true, Ordering::SeqCst);
        let release = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.pipe)
            .expect("open pipe");
        if let Some(feeder) = self.feeder.take() {
            feeder.join().expect("feeder");
        }
        drop(release);
        std::fs::remove_file(&self.pipe).expect("rm pipe");
        std::fs::write(&self.pipe, RANGE).expect("w");
    }

    /// `meshtune revert`, failing the test if it has not returned within 20 s (a revert that
    /// does not refuse blocks on the pipe the apply is writing).
    fn revert(&self) -> Output {
        let mut revert = meshtune(&self.dir, &["revert", "--yes", "--state"])
            .arg(&self.state)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run meshtune revert");
        let deadline = Instant::now() + Duration::from_secs(20);
        while revert.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = revert.kill();
                let _ = revert.wait();
                panic!("meshtune revert did not return: it waited on the running apply's files");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        revert.wait_with_output().expect("revert output")
    }

    fn lock(&self) -> PathBuf {
        let mut lock = self.state.clone().into_os_string();
        lock.push(".lock");
        PathBuf::from(lock)
    }

    /// The values before the apply are all back, and no state or lock file is left.
    fn assert_restored(&self) {
        for (path, value) in &self.before {
            assert_eq!(read(path), *value, "{}", path.display());
        }
        assert_eq!(read(&self.pipe), RANGE);
        assert!(!self.state.exists());
        assert!(!self.lock().exists());
    }
}

impl Drop for HeldApply {
    fn drop(&mut self) {
        if self.feeder.is_some() {
            let _ = self.apply.kill();
            let _ = self.apply.wait();
            self.stop.store(true, Ordering::SeqCst);
            let _ = std::fs::remove_file(&self.pipe);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn revert_after_a_killed_apply_restores_exactly_what_was_there() {
    let mut held = HeldApply::start("killed");
    let pid = held.apply.id();
    held.kill();
    // The killed apply's lock file is still there, naming it, but nothing holds it.
    assert!(
        read(&held.lock()).starts_with(&format!("pid {pid}: ")),
        "{}",
        read(&held.lock())
    );

    let reverted = held.revert();
    assert!(reverted.status.success(), "{}", text(&reverted));
    let stderr = String::from_utf8_lossy(&reverted.stderr);
    assert!(
        stderr.contains(&format!("taking over {}", held.lock().display()))
            && stderr.contains(&format!("pid {pid}: ")),
        "revert says whose lock it took over: {stderr}"
    );
    held.assert_restored();
}

#[test]
fn revert_while_an_apply_runs_is_refused_and_changes_nothing() {
    let mut held = HeldApply::start("busy");
    let pid = held.apply.id();
    let recorded = std::fs::read(&held.state).expect("the running apply's state file");

    let refused = held.revert();
    assert!(!refused.status.success(), "{}", text(&refused));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&held.lock().display().to_string())
            && stderr.contains(&format!("pid {pid}: "))
            && stderr.contains("apply --profile throughput"),
        "the error names the lock and its holder: {stderr}"
    );
    for (path, value) in [
        (&held.before[0].0, "8192\n"),
        (&held.before[1].0, "8192\n"),
        (&held.before[2].0, "0\n"),
    ] {
        assert_eq!(read(path), value, "{}", path.display());
    }
    assert_eq!(std::fs::read(&held.state).expect("state"), recorded);

    // A plan written to the same state file is refused the same way.
    let plan = meshtune(&held.dir, &["plan", "--apply", "--yes", "--state"])
        .arg(&held.state)
        .output()
        .expect("run meshtune plan");
    assert!(!plan.status.success(), "{}", text(&plan));
    assert!(text(&plan).contains("is in use"), "{}", text(&plan));
    assert_eq!(std::fs::read(&held.state).expect("state"), recorded);

    held.kill();
    let reverted = held.revert();
    assert!(reverted.status.success(), "{}", text(&reverted));
    held.assert_restored();
}
