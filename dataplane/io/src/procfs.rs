//! A process's figures from /proc: CPU time, memory, threads, descriptors. The data plane
//! exports its own as Prometheus' standard `process_*` series; the perf lab reads the mesh
//! processes' the same way.

use std::fmt::Write;

/// Which process to read.
#[derive(Clone, Copy, Debug)]
pub enum Process {
    Current,
    Pid(u32),
}

impl Process {
    fn file(self, name: &str) -> String {
        match self {
            Process::Current => format!("/proc/self/{name}"),
            Process::Pid(pid) => format!("/proc/{pid}/{name}"),
        }
    }

    /// CPU time (user + system, all threads, ended ones included), in seconds.
    pub fn cpu_seconds(self) -> Option<f64> {
        let [utime, stime] = stat_fields(&self.file("stat"), [UTIME, STIME])?;
        Some((utime + stime) as f64 / USER_HZ)
    }

    /// When it started, in seconds since the Unix epoch.
    pub fn start_time_unix(self) -> Option<f64> {
        let [ticks] = stat_fields(&self.file("stat"), [STARTTIME])?;
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let boot: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        Some(boot as f64 + ticks as f64 / USER_HZ)
    }

    /// Its `status` file.
    pub fn status(self) -> Option<Status> {
        Status::read(self.file("status"))
    }

    /// A line of its `status` file given in kB (`VmRSS:`, `RssAnon:`, ...), in bytes.
    pub fn status_bytes(self, field: &str) -> Option<u64> {
        self.status()?.bytes(field)
    }

    /// Open file descriptors.
    pub fn open_fds(self) -> Option<u64> {
        Some(std::fs::read_dir(self.file("fd")).ok()?.count() as u64)
    }

    /// The soft limit on open file descriptors (`None` when unlimited or unreadable).
    pub fn max_fds(self) -> Option<u64> {
        let limits = std::fs::read_to_string(self.file("limits")).ok()?;
        limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

/// A process's `status` file, read once.
pub struct Status(String);

impl Status {
    /// A `status` file: a process's, or one of its threads' (`/proc/<pid>/task/<tid>/status`).
    pub fn read(path: impl AsRef<std::path::Path>) -> Option<Status> {
        std::fs::read_to_string(path).ok().map(Status)
    }

    /// What a line says after its name (`Uid:`, `Cpus_allowed_list:`, ...).
    pub fn field(&self, name: &str) -> Option<&str> {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    }

    /// The first number on a line (`Threads:`, ...).
    pub fn number(&self, name: &str) -> Option<u64> {
        self.field(name)?.split_whitespace().next()?.parse().ok()
    }

    /// A line given in kB (`VmRSS:`, `RssAnon:`, ...), in bytes.
    pub fn bytes(&self, field: &str) -> Option<u64> {
        self.number(field).map(|kib| kib * 1024)
    }
}

/// Fields of `stat`, counted from the state (0).
const UTIME: usize = 11;
const STIME: usize = 12;
const STARTTIME: usize = 19;

/// Fields of a `stat` file under /proc, counted from the one after the command name
/// (the state is field 0).
pub fn stat_fields<const N: usize>(path: &str, wanted: [usize; N]) -> Option<[u64; N]> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name may contain spaces; fields resume after the closing parenthesis.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let mut values = [0; N];
    for (value, at) in values.iter_mut().zip(wanted) {
        *value = fields.get(at)?.parse().ok()?;
    }
    Some(values)
}

/// USER_HZ, the unit of the times in `stat`: the kernel converts to it for user space, and it
/// is 100 on every Linux ABI this runs on (x86-64, arm64).
const USER_HZ: f64 = 100.0;

/// This process's figures as Prometheus' standard process series (the names the Prometheus
/// client libraries use, and Istio's ztunnel exports), then its memory split in two under
/// `prefix` (`meshdp`, `meshagent`): what is its own (`<prefix>_memory_private_bytes`: heaps and
/// stacks) and what it maps from shared memory (`<prefix>_memory_shared_bytes`: mostly the
/// snapshot region's pages it has touched, which `process_resident_memory_bytes` counts too and
/// the other process holds as well).
pub fn render_process_metrics(prefix: &str, out: &mut String) {
    let me = Process::Current;
    let status = me.status();
    let bytes = |field| status.as_ref()?.bytes(field).map(|b| b as f64);
    let private = format!("{prefix}_memory_private_bytes");
    let shared = format!("{prefix}_memory_shared_bytes");
    let series = [
        ("process_cpu_seconds_total", "counter", me.cpu_seconds()),
        ("process_resident_memory_bytes", "gauge", bytes("VmRSS:")),
        ("process_virtual_memory_bytes", "gauge", bytes("VmSize:")),
        ("process_open_fds", "gauge", me.open_fds().map(|n| n as f64)),
        ("process_max_fds", "gauge", me.max_fds().map(|n| n as f64)),
        (
            "process_threads",
            "gauge",
            status
                .as_ref()
                .and_then(|s| s.number("Threads:"))
                .map(|n| n as f64),
        ),
        ("process_start_time_seconds", "gauge", me.start_time_unix()),
        (&private, "gauge", bytes("RssAnon:")),
        (&shared, "gauge", bytes("RssShmem:")),
    ];
    // A figure the kernel would not give is left out rather than shown as 0.
    for (name, kind, value) in series {
        if let Some(value) = value {
            let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {value}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of an unlabelled series in Prometheus text.
    fn value(text: &str, name: &str) -> f64 {
        crate::stats::series_value(text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    #[test]
    fn this_process_s_figures_are_exported_as_prometheus_s_process_series() {
        // Something to count: CPU spent, memory touched, a file held open, a thread.
        let me = Process::Current;
        let before = me.cpu_seconds().expect("CPU time");
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut x = 0u64;
        while me.cpu_seconds().expect("CPU time") < before + 0.05 {
            assert!(std::time::Instant::now() < give_up, "no CPU time counted");
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
            }
        }
        let touched = std::hint::black_box(vec![1u8; 16 << 20]);
        let file = std::fs::File::open("/proc/self/stat").expect("open");
        let (stop, parked) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || parked.recv());

        let mut text = String::new();
        render_process_metrics("meshdp", &mut text);
        assert!(
            value(&text, "process_cpu_seconds_total") >= before + 0.05,
            "{text}"
        );
        let resident = value(&text, "process_resident_memory_bytes");
        assert!(resident >= f64::from(16u32 << 20), "{text}");
        assert!(
            value(&text, "process_virtual_memory_bytes") >= resident,
            "{text}"
        );
        let private = value(&text, "meshdp_memory_private_bytes");
        assert!(
            private >= f64::from(16u32 << 20) && private <= resident,
            "{text}"
        );
        assert!(
            value(&text, "meshdp_memory_shared_bytes") <= resident,
            "{text}"
        );
        let open = value(&text, "process_open_fds");
        assert!(open >= 1.0, "the file held open: {text}");
        assert!(value(&text, "process_max_fds") >= open, "{text}");
        assert!(value(&text, "process_threads") >= 2.0, "{text}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        let started = value(&text, "process_start_time_seconds");
        assert!(
            started <= now + 1.0 && started > now - 3600.0,
            "started {started}, now {now}"
        );
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"));

        drop((touched, file));
        let _ = stop.send(());
        let _ = thread.join();
    }

    #[test]
    fn another_process_is_read_by_pid() {
        let me = Process::Pid(std::process::id());
        assert!(me.status_bytes("VmRSS:").is_some_and(|b| b > 0));
        assert!(me.cpu_seconds().is_some());
        assert!(Process::Pid(u32::MAX).cpu_seconds().is_none());
    }
}
