//! `meshtune apply` killed halfway (SIGKILL, as an OOM kill or a lost SSH session's reaper
//! would): `meshtune revert` must still put back exactly what was there. Runs on a scratch tree
//! (`--root`); one setting is a named pipe, so the apply blocks writing it after the settings
//! before it are written, which is where the test kills it.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

#[test]
fn revert_after_a_killed_apply_restores_exactly_what_was_there() {
    let dir = std::env::temp_dir().join(format!("meshtune-killed-{}", std::process::id()));
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
    let range = "32768\t60999\n";
    let status = Command::new("mkfifo").arg(&pipe).status().expect("mkfifo");
    assert!(status.success());
    let state = dir.join("state/tuning.json");

    // meshtune reads the pipe twice (compare, then apply's read of what was there): feed every
    // reader; the pause lets each reader see the end of its feed before the next one starts.
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (pipe, stop) = (pipe.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(mut w) = std::fs::OpenOptions::new().write(true).open(&pipe) {
                    let _ = w.write_all(range.as_bytes());
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
    // Now it waits to write the pipe (nothing reads it): kill it there.
    std::thread::sleep(Duration::from_millis(300));
    apply.kill().expect("kill");
    apply.wait().expect("reap");

    // Release the feeder, and make the pipe a plain file holding what it held.
    stop.store(true, Ordering::SeqCst);
    let release = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&pipe)
        .expect("open pipe");
    feeder.join().expect("feeder");
    drop(release);
    std::fs::remove_file(&pipe).expect("rm pipe");
    std::fs::write(&pipe, range).expect("w");

    let reverted = meshtune(&dir, &["revert", "--yes", "--state"])
        .arg(&state)
        .output()
        .expect("run meshtune revert");
    assert!(reverted.status.success(), "{}", text(&reverted));
    for (path, value) in &before {
        assert_eq!(read(path), *value, "{}", path.display());
    }
    assert_eq!(read(&pipe), range);
    assert!(!state.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
