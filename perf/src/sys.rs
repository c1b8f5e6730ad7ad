//! Small facts about the machine and processes, read from /proc and a few commands.

use std::process::Command;

use mesh_io::procfs::{stat_fields, Process, Status};

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    Process::Current
        .status()
        .and_then(|s| {
            s.field("Uid:")?
                .split_whitespace()
                .nth(1)
                .map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// Runs a command and fails with its stderr if it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("{program}: {e} (is it installed?)"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command feeding `input` on stdin.
pub fn run_with_input(program: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("{program}: {e} (is it installed?)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Minor page faults of this process (all its threads, ended ones included) and of the
/// calling thread: each is a page of memory the kernel handed over at its first touch. The
/// thread is read first, so the process's count, read after it, is never the smaller.
pub fn minor_faults() -> Option<(u64, u64)> {
    const MINFLT: usize = 7;
    let [thread] = stat_fields("/proc/thread-self/stat", [MINFLT])?;
    let [process] = stat_fields("/proc/self/stat", [MINFLT])?;
    Some((process, thread))
}

/// Voluntary context switches of a process, summed over its threads: how often they blocked.
/// (The process's own status line counts its main thread only.)
pub fn voluntary_switches(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for task in tasks.flatten() {
        // A thread that ended meanwhile has nothing left to count.
        total += Status::read(task.path().join("status"))
            .and_then(|status| status.number("voluntary_ctxt_switches:"))
            .unwrap_or(0);
    }
    Some(total)
}

/// Machine facts recorded with every result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub hostname: String,
    /// What `meshtune doctor` finds on this node (huge pages, free page reporting, halt
    /// polling, governors, ...), check name to finding: settings that move results between
    /// runs of the same build.
    pub node: std::collections::BTreeMap<String, String>,
}

impl Machine {
    /// The doctor's findings in one line, for a report's header.
    pub fn node_line(&self) -> String {
        let findings: Vec<String> = self
            .node
            .iter()
            .map(|(check, found)| format!("{check}: {found}"))
            .collect();
        format!("node: {}", findings.join("; "))
    }
}

pub fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    Machine {
        cpu_model,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel,
        hostname,
        node: kernel_tuning::doctor::run(&kernel_tuning::sysfs::Root::default(), None, false)
            .into_iter()
            .map(|check| (check.name, check.found))
            .collect(),
    }
}

/// The git commit of the working tree, with "-dirty" if it has changes.
pub fn git_commit() -> String {
    let commit = run("git", &["rev-parse", "--short=12", "HEAD"])
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let dirty = run("git", &["status", "--porcelain", "--untracked-files=no"])
        .map(|s| !s.trim().is_empty())
        .unwrap_or(false);
    if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    }
}

/// Machine-wide CPU time from /proc/stat: (all ticks, ticks stolen by the hypervisor).
pub fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total = fields.iter().take(8).sum();
    Some((total, *fields.get(7)?))
}

/// Share of CPU time the hypervisor took from this VM between two `cpu_ticks` readings.
pub fn steal_percent(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((t0, s0), (t1, s1)) = (before?, after?);
    let total = t1.checked_sub(t0)?;
    (total > 0).then(|| 100.0 * s1.saturating_sub(s0) as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn voluntary_switches_count_every_thread_not_only_the_main_one() {
        let (go, gate) = mpsc::channel::<()>();
        let (slept, sleeper_slept) = mpsc::channel();
        let (counted, finish) = mpsc::channel::<()>();
        let sleeper = std::thread::spawn(move || {
            gate.recv().expect("main counts first");
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(1));
            }
            slept.send(()).expect("main waits");
            // Stay alive until counted: an ended thread leaves /proc/<pid>/task.
            let _ = finish.recv();
        });
        let before = super::voluntary_switches(std::process::id()).expect("own tasks");
        go.send(()).expect("sleeper waits");
        sleeper_slept.recv().expect("sleeper slept");
        let after = super::voluntary_switches(std::process::id()).expect("own tasks");
        counted.send(()).expect("sleeper waits");
        sleeper.join().expect("sleeper");
        // The main thread blocked about once meanwhile; the sleeper at least 20 times.
        assert!(after - before >= 20, "{before} -> {after}");
    }
}
