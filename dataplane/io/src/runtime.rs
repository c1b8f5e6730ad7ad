//! Building a worker's monoio runtime on io_uring, or on epoll when io_uring is unavailable or
//! turned off, and saying which one runs.

use std::future::Future;

use kernel_tuning::doctor::{free_page_reporting_of, FreePageReporting};
use kernel_tuning::sysfs::Root;
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
    /// Sets malloc up; returns which pages the heap is on.
    pub fn apply(self) -> std::io::Result<HeapPages> {
        if self.retain_bytes > 0 {
            retain_freed_memory(self.retain_bytes)?;
        }
        if !self.fastbins {
            merge_freed_blocks_at_once()?;
        }
        let pages = heap_pages(
            std::env::var("GLIBC_TUNABLES").ok().as_deref(),
            free_page_reporting_of(&Root::default()),
        );
        match pages {
            HeapPages::Huge => {
                mesh_core::index::set_build_thread_start(huge_pages_for_build_thread)
            }
            HeapPages::SmallOnReportingNode => {
                keep_process_off_huge_pages()?;
                tracing::info!(
                    "heap on 4 KiB pages although GLIBC_TUNABLES asks for huge pages: this \
                     node's balloon takes free 2 MiB blocks back, and the host must fault a \
                     fresh huge page in again while it is cleared"
                );
            }
            HeapPages::Small => {}
        }
        Ok(pages)
    }
}

/// Which pages the data plane's heap is on, as [`MallocPolicy::apply`] leaves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeapPages {
    /// 4 KiB pages: `GLIBC_TUNABLES` does not ask for huge pages.
    Small,
    /// Transparent huge pages, the heaps of large builds' threads included.
    Huge,
    /// 4 KiB pages although `GLIBC_TUNABLES` asks for huge pages: on a node whose balloon
    /// takes free 2 MiB blocks back (free page reporting at order 9), the host must fault a
    /// fresh huge page in again while the guest clears it (about 4 ms each on the lab VM). A
    /// cold 100k first adopt took x0.64 of its time there on 4 KiB pages, a 1M one x1.28
    /// (bench-results/README.md). The whole process is kept off huge pages
    /// (PR_SET_THP_DISABLE), since glibc has already advised its main heap.
    SmallOnReportingNode,
}

impl HeapPages {
    /// What a report says of it.
    pub fn describe(self) -> &'static str {
        match self {
            HeapPages::Small => "heap on 4 KiB pages",
            HeapPages::Huge => "heap on huge pages (GLIBC_TUNABLES, as the chart runs the data plane)",
            HeapPages::SmallOnReportingNode => {
                "heap on 4 KiB pages although GLIBC_TUNABLES asks for huge pages (free page reporting at order 9 or below)"
            }
        }
    }
}

fn keep_process_off_huge_pages() -> std::io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes integers only and changes no memory.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn heap_pages(tunables: Option<&str>, reporting: Option<FreePageReporting>) -> HeapPages {
    if !tunables_ask_for_thp_heap(tunables) {
        HeapPages::Small
    } else if reporting.is_some_and(|r| r.takes_back_huge_pages()) {
        HeapPages::SmallOnReportingNode
    } else {
        HeapPages::Huge
    }
}

/// Whether `GLIBC_TUNABLES` asks glibc to back its heap with transparent huge pages
/// (`glibc.malloc.hugetlb=1`, the chart's `dataplane.hugePageHeap`).
fn tunables_ask_for_thp_heap(tunables: Option<&str>) -> bool {
    tunables.is_some_and(|t| {
        t.split(':')
            .any(|setting| setting == "glibc.malloc.hugetlb=1")
    })
}

/// What every thread of a large complete snapshot build runs first when glibc's heap is on
/// huge pages: the same for the thread's own heap, where the build's workloads go.
fn huge_pages_for_build_thread() {
    match thread_heap_on_huge_pages() {
        Ok(true) => {}
        Ok(false) => tracing::debug!("a build thread's malloc heap is not a glibc thread heap"),
        Err(error) => tracing::debug!(%error, "no huge pages for a build thread's malloc heap"),
    }
}

/// The size, and alignment, of each heap glibc maps for the arena of a thread other than the
/// main one (its HEAP_MAX_SIZE on 64-bit).
const THREAD_HEAP_BYTES: usize = 64 << 20;

/// Puts the calling thread's malloc heap on transparent huge pages, as `hugetlb=1` makes glibc
/// do for its main heap but not for the heaps of other threads. glibc maps such a heap as a
/// 64 MiB reservation, inaccessible but for the part in use, and grows that part a few pages
/// at a time, one `mprotect` each. A huge page can only back 2 MiB that are all accessible
/// when first touched, so that heap faults in 4 KiB at a time: a complete 100k-workload
/// build took about 11,000 `mprotect` calls and 12,500 page faults (bench-results/README.md).
/// This makes the whole reservation accessible and advised at once: glibc's later
/// `mprotect` calls change nothing, and the heap's memory comes 2 MiB per fault. Pages are
/// still only taken when touched. Returns whether the thread's heap was found (checked
/// against /proc/self/maps) and changed.
fn thread_heap_on_huge_pages() -> std::io::Result<bool> {
    // Larger than glibc's per-thread cache takes (1 KiB), which may hold blocks of another
    // heap freed on this thread, and smaller than a block it maps on its own: so a block of
    // this thread's heap.
    let probe = std::hint::black_box(vec![0u8; 4096]);
    let base = probe.as_ptr() as usize & !(THREAD_HEAP_BYTES - 1);
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    if !is_thread_heap(&maps, base) {
        return Ok(false);
    }
    let heap = base as *mut libc::c_void;
    // SAFETY: the range is one glibc heap reservation of this process (checked above), which
    // glibc itself makes readable and writable as the heap grows, and never hands out beyond
    // what it made so: opening the rest early changes no memory anyone uses. MADV_HUGEPAGE
    // changes no contents. Where the kernel refuses the first (strict overcommit accounting
    // counts a writable reservation in full), nothing else is done.
    #[allow(unsafe_code)]
    let rc = unsafe {
        match libc::mprotect(heap, THREAD_HEAP_BYTES, libc::PROT_READ | libc::PROT_WRITE) {
            0 => libc::madvise(heap, THREAD_HEAP_BYTES, libc::MADV_HUGEPAGE),
            failed => failed,
        }
    };
    if rc == 0 {
        Ok(true)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether `maps` (as /proc/self/maps reads) holds a glibc thread heap at `base`: private
/// anonymous mappings (the part in use read-write, the reserve inaccessible), the first
/// starting at `base`, covering [`THREAD_HEAP_BYTES`] without a gap.
fn is_thread_heap(maps: &str, base: usize) -> bool {
    let end = base + THREAD_HEAP_BYTES;
    let mut covered = base;
    for line in maps.lines() {
        let mut fields = line.split_ascii_whitespace();
        let (Some(range), Some(perms), Some(_offset), Some(_device), Some(inode)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return false;
        };
        let named = fields.next().is_some();
        let Some((start, stop)) = mapped_range(range) else {
            return false;
        };
        if stop <= covered {
            continue;
        }
        // A gap, a mapping that began before `base` (not a heap of its own), or one that is
        // not private and anonymous.
        if start != covered || named || inode != "0" || !perms.ends_with('p') {
            return false;
        }
        covered = stop;
        if covered >= end {
            return true;
        }
    }
    false
}

/// The addresses of a /proc/<pid>/maps (or smaps) range field, `start-end` in hex.
fn mapped_range(field: &str) -> Option<(usize, usize)> {
    let (start, end) = field.split_once('-')?;
    Some((
        usize::from_str_radix(start, 16).ok()?,
        usize::from_str_radix(end, 16).ok()?,
    ))
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
    fn a_node_that_takes_free_huge_pages_back_keeps_the_heap_on_small_pages() {
        let asked = Some("glibc.malloc.hugetlb=1");
        let at = |order| Some(FreePageReporting { order });
        assert_eq!(heap_pages(asked, None), HeapPages::Huge);
        assert_eq!(heap_pages(asked, at(Some(10))), HeapPages::Huge);
        assert_eq!(
            heap_pages(asked, at(Some(9))),
            HeapPages::SmallOnReportingNode
        );
        // The kernel's default order is the huge page's.
        assert_eq!(heap_pages(asked, at(None)), HeapPages::SmallOnReportingNode);
        assert_eq!(heap_pages(None, at(Some(9))), HeapPages::Small);
        assert_eq!(
            heap_pages(Some("glibc.malloc.hugetlb=0"), None),
            HeapPages::Small
        );
    }

    #[test]
    fn only_hugetlb_1_asks_for_thread_heaps_on_transparent_huge_pages() {
        assert!(tunables_ask_for_thp_heap(Some("glibc.malloc.hugetlb=1")));
        assert!(tunables_ask_for_thp_heap(Some(
            "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
        )));
        // 0 is off; 2 maps hugetlbfs pages, for every heap, without our help.
        assert!(!tunables_ask_for_thp_heap(Some("glibc.malloc.hugetlb=0")));
        assert!(!tunables_ask_for_thp_heap(Some("glibc.malloc.hugetlb=2")));
        assert!(!tunables_ask_for_thp_heap(Some("glibc.malloc.hugetlb=10")));
        assert!(!tunables_ask_for_thp_heap(None));
    }

    #[test]
    fn a_thread_heap_is_recognised_only_as_one_anonymous_reservation_from_its_base() {
        let heap = "7f0000000000-7f0000021000 rw-p 00000000 00:00 0 \n\
                    7f0000021000-7f0004000000 ---p 00000000 00:00 0 \n";
        let base = 0x7f00_0000_0000;
        let with = |before: &str, after: &str| format!("{before}{heap}{after}");
        let lib = "7f0004000000-7f0004100000 r-xp 00000000 fd:01 1234 /usr/lib/libc.so.6\n";
        assert!(is_thread_heap(&with("", ""), base));
        assert!(is_thread_heap(
            &with(
                "55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0 [heap]\n",
                lib
            ),
            base
        ));
        // The main heap, a file, a gap, a reserve cut short, a mapping that starts earlier.
        let main = "7f0000000000-7f0004000000 rw-p 00000000 00:00 0 [heap]\n";
        assert!(!is_thread_heap(main, base));
        let file = "7f0000000000-7f0004000000 rw-p 00000000 fd:01 99 /dev/shm/region\n";
        assert!(!is_thread_heap(file, base));
        let gap = "7f0000000000-7f0000021000 rw-p 00000000 00:00 0 \n\
                   7f0000022000-7f0004000000 ---p 00000000 00:00 0 \n";
        assert!(!is_thread_heap(gap, base));
        let short = "7f0000000000-7f0000021000 rw-p 00000000 00:00 0 \n";
        assert!(!is_thread_heap(short, base));
        let earlier = "7effffe00000-7f0004000000 rw-p 00000000 00:00 0 \n";
        assert!(!is_thread_heap(earlier, base));
        let shared = "7f0000000000-7f0004000000 rw-s 00000000 00:01 7 \n";
        assert!(!is_thread_heap(shared, base));
    }

    /// What /proc/self/smaps says of the mapping that holds an address.
    #[derive(Debug, Default)]
    struct Mapping {
        start: usize,
        end: usize,
        perms: String,
        anon_huge_kib: u64,
        flags: Vec<String>,
    }

    fn mapping_at(address: usize) -> Mapping {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut current: Option<Mapping> = None;
        for line in smaps.lines() {
            let mut fields = line.split_ascii_whitespace();
            if let Some((start, end)) = fields.next().and_then(mapped_range) {
                current = (start..end).contains(&address).then(|| Mapping {
                    start,
                    end,
                    perms: fields.next().unwrap_or_default().to_owned(),
                    ..Mapping::default()
                });
            } else if let Some(mapping) = current.as_mut() {
                if let Some(kib) = line.strip_prefix("AnonHugePages:") {
                    mapping.anon_huge_kib = kib.trim().trim_end_matches(" kB").parse().unwrap_or(0);
                } else if let Some(flags) = line.strip_prefix("VmFlags:") {
                    mapping.flags = flags.split_ascii_whitespace().map(str::to_owned).collect();
                    return current.take().expect("mapping");
                }
            }
        }
        panic!("no mapping holds {address:#x}")
    }

    #[test]
    fn a_thread_s_heap_is_on_huge_pages_also_where_it_grows() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .expect("a kernel with transparent huge pages");
        // A new thread gets a heap of its own while the process has fewer arenas than glibc's
        // limit (8 per core); this test process stays far below it.
        std::thread::spawn(move || {
            assert_eq!(thread_heap_on_huge_pages().ok(), Some(true));
            // 8 MB in blocks from this thread's heap, allocated after: the heap grew into its
            // reserve, which glibc alone would have opened a few pages at a time, unadvised.
            let blocks: Vec<Box<[u8; 4000]>> = (0..2000).map(|_| Box::new([1; 4000])).collect();
            let last = mapping_at(&*blocks[1999] as *const [u8; 4000] as usize);
            let heap = last.start & !(THREAD_HEAP_BYTES - 1);
            assert_eq!(last.perms, "rw-p", "{last:?}");
            assert!(last.flags.iter().any(|f| f == "hg"), "{last:?}");
            // One accessible mapping to the reservation's end: no mprotect left to split it.
            assert!(last.end >= heap + THREAD_HEAP_BYTES, "{last:?}");
            if !thp.contains("[never]") {
                assert!(last.anon_huge_kib >= 2048, "{last:?}");
            }
        })
        .join()
        .expect("the thread's checks pass");
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
