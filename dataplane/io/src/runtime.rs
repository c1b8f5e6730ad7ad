//! Building a worker's monoio runtime on io_uring, or on epoll when io_uring is unavailable or
//! turned off, and saying which one runs.

use std::future::Future;

use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};

/// What the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverChoice {
    /// io_uring if this kernel allows it, else epoll.
    Auto,
    /// io_uring or fail.
    IoUring,
    /// epoll, even where io_uring works.
    Epoll,
}

impl std::str::FromStr for DriverChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DriverChoice::Auto),
            "io-uring" | "io_uring" | "uring" => Ok(DriverChoice::IoUring),
            "epoll" | "legacy" => Ok(DriverChoice::Epoll),
            other => Err(format!("unknown driver {other:?} (auto, io-uring, epoll)")),
        }
    }
}

/// What actually runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    IoUring,
    Epoll,
}

impl Driver {
    pub fn name(self) -> &'static str {
        match self {
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
        }
    }
}

/// Decides the driver once for the process (probing io_uring creates and drops a ring).
pub fn resolve(choice: DriverChoice) -> Result<Driver, String> {
    let available = monoio::utils::detect_uring();
    match (choice, available) {
        (DriverChoice::Epoll, _) => Ok(Driver::Epoll),
        (DriverChoice::Auto, true) | (DriverChoice::IoUring, true) => Ok(Driver::IoUring),
        (DriverChoice::Auto, false) => {
            tracing::warn!(
                "io_uring is not available (kernel too old, disabled by sysctl or seccomp); \
                 falling back to the epoll driver"
            );
            Ok(Driver::Epoll)
        }
        (DriverChoice::IoUring, false) => {
            Err("io_uring was requested but this kernel does not allow it".into())
        }
    }
}

/// Ring size: enough in-flight operations for thousands of connections per worker.
const URING_ENTRIES: u32 = 4096;

/// Runs `make()`'s future to completion on a fresh runtime of `driver` on this thread.
pub fn block_on<F, Fut>(driver: Driver, make: F) -> std::io::Result<Fut::Output>
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    match driver {
        Driver::IoUring => {
            let mut rt = RuntimeBuilder::<IoUringDriver>::new()
                .with_entries(URING_ENTRIES)
                .enable_timer()
                .build()?;
            Ok(rt.block_on(make()))
        }
        Driver::Epoll => {
            let mut rt = RuntimeBuilder::<LegacyDriver>::new()
                .enable_timer()
                .build()?;
            Ok(rt.block_on(make()))
        }
    }
}

/// How the data plane sets glibc malloc up, before its workers start (each setting measured in
/// bench-results/README.md). `Default` is the data plane's default; snapbench applies it too,
/// so that it measures the heap the data plane has.
#[derive(Clone, Copy, Debug)]
pub struct MallocPolicy {
    /// Freed memory kept per arena instead of trimmed back to the kernel; 0 for glibc's
    /// adaptive defaults (`retain_freed_memory`).
    pub retain_bytes: usize,
    /// Keep glibc's fastbins (`merge_freed_blocks_at_once` otherwise).
    pub fastbins: bool,
}

impl Default for MallocPolicy {
    fn default() -> Self {
        MallocPolicy {
            retain_bytes: DEFAULT_MALLOC_RETAIN_MIB << 20,
            fastbins: false,
        }
    }
}

impl MallocPolicy {
    pub fn apply(self) -> std::io::Result<()> {
        if self.retain_bytes > 0 {
            retain_freed_memory(self.retain_bytes)?;
        }
        if !self.fastbins {
            merge_freed_blocks_at_once()?;
        }
        Ok(())
    }
}

/// Turns glibc's fastbins off: a small block freed past the thread's cache is merged with its
/// free neighbours when it is freed, instead of parked unmerged until a larger request makes
/// malloc merge the whole heap at once. A replaced snapshot index is hundreds of thousands of
/// small blocks freed on a thread of its own; with fastbins, the next complete build paid for
/// merging them on its first larger allocation, in the adopt's time (bench-results/README.md).
fn merge_freed_blocks_at_once() -> std::io::Result<()> {
    // SAFETY: mallopt takes two integers and only changes the allocator's parameters.
    #[allow(unsafe_code)]
    let ok = unsafe { libc::mallopt(libc::M_MXFAST, 0) == 1 };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::other(
            "glibc refused to turn its fastbins off",
        ))
    }
}

/// The data plane's default for `MallocPolicy::retain_bytes`, in MiB.
pub const DEFAULT_MALLOC_RETAIN_MIB: usize = 64;

/// Makes glibc malloc keep up to `bytes` of freed memory per arena instead of trimming it
/// back to the kernel, and serve allocations below `bytes / 16` from its heaps rather than
/// fresh mmaps. Call before the workers start. Both thresholds are fixed (glibc otherwise
/// adapts them), so memory kept after a burst is bounded and predictable.
fn retain_freed_memory(bytes: usize) -> std::io::Result<()> {
    let clamp = |v: usize| libc::c_int::try_from(v).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt takes two integers and only changes the allocator's parameters.
    #[allow(unsafe_code)]
    let ok = unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, clamp(bytes)) == 1
            && libc::mallopt(libc::M_MMAP_THRESHOLD, clamp(bytes / 16)) == 1
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "glibc refused malloc thresholds for {bytes} bytes"
        )))
    }
}

/// Bytes glibc malloc has handed out and not had back: the main arena's chunks in use and
/// every mmapped chunk. Allocations of threads other than the main one come from arenas of
/// their own, which this does not count: measure on the main thread.
pub fn heap_bytes_in_use() -> usize {
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value.
    #[allow(unsafe_code)]
    let info = unsafe { libc::mallinfo2() };
    info.uordblks + info.hblkhd
}

/// Sets the calling thread's timer slack: how late the kernel may wake it from a sleep (50 us
/// by default). A pacer that sends on schedule wants its sleeps to end on time.
pub fn set_timer_slack_ns(nanos: u64) -> std::io::Result<()> {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory of ours.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, nanos as libc::c_ulong) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Restricts the calling thread (and the threads it creates afterwards) to `cores`.
pub fn restrict_current_thread(cores: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set, CPU_SET writes within it for
    // core numbers below CPU_SETSIZE (checked), and sched_setaffinity reads exactly its size.
    #[allow(unsafe_code)]
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &core in cores {
            if core >= libc::CPU_SETSIZE as usize {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("core {core} is beyond CPU_SETSIZE"),
                ));
            }
            libc::CPU_SET(core, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets the calling thread's nice value (lower runs sooner). Below 0 needs CAP_SYS_NICE.
pub fn set_current_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid has no arguments; setpriority on our own thread id takes integers only.
    #[allow(unsafe_code)]
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Scheduling class of the calling thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadClass {
    /// SCHED_FIFO at this priority: runs as soon as it is woken, ahead of every normal thread.
    /// Needs CAP_SYS_NICE and a real-time budget in the thread's cgroup.
    Realtime(i32),
    /// SCHED_OTHER, the default.
    Normal,
}

/// Moves the calling thread to `class`.
pub fn set_current_thread_class(class: ThreadClass) -> std::io::Result<()> {
    let (policy, priority) = match class {
        ThreadClass::Realtime(p) => (libc::SCHED_FIFO, p),
        ThreadClass::Normal => (libc::SCHED_OTHER, 0),
    };
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread; the kernel reads one sched_param we own.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes glibc holds in fastbins, over every arena.
    fn parked_in_fastbins() -> usize {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallinfo2().fsmblks
        }
    }

    #[test]
    fn by_default_small_blocks_freed_past_the_thread_cache_are_not_parked_in_fastbins() {
        MallocPolicy::default()
            .apply()
            .expect("glibc takes the settings");
        // Blocks that others' frees parked before the setting may still be merged away by
        // then, so the count can only fall; with fastbins on, these frees would park 48 KiB.
        let before = parked_in_fastbins();
        let blocks: Vec<Box<[u8; 40]>> = (0..1000).map(|i| Box::new([i as u8; 40])).collect();
        drop(std::hint::black_box(blocks));
        assert!(
            parked_in_fastbins() <= before,
            "fastbins grew from {before} to {} bytes",
            parked_in_fastbins()
        );
    }
}
