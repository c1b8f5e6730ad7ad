//! What the node has now against what the data plane wants: kernel, io_uring, locked-memory
//! limit, transparent huge pages, free page reporting, CPU frequency governors, guest halt
//! polling, isolated CPUs, and a profile's settings.

use serde::Serialize;

use crate::profile::{self, Profile, Status, GUEST_HALT_POLL, GUEST_HALT_POLL_NS};
use crate::sysfs::Root;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    Ok,
    /// Works, but slower or riskier than it could be.
    Warn,
    /// Nothing to fix; worth knowing.
    Info,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub found: String,
    pub wanted: String,
    pub verdict: Verdict,
    pub why: String,
}

fn check(name: &str, found: String, wanted: &str, verdict: Verdict, why: &str) -> Check {
    Check {
        name: name.into(),
        found,
        wanted: wanted.into(),
        verdict,
        why: why.into(),
    }
}

/// Every check, in a fixed order. `probe_uring`: also try to create a ring in this process
/// (only meaningful when `root` is the real node's `/`).
pub fn run(root: &Root, profile: Option<&Profile>, probe_uring: bool) -> Vec<Check> {
    let mut checks = vec![kernel(root), uring_sysctl(root)];
    if probe_uring {
        let works = monoio::utils::detect_uring();
        checks.push(check(
            "io_uring usable by this process",
            if works { "yes" } else { "no" }.into(),
            "yes",
            if works { Verdict::Ok } else { Verdict::Warn },
            "a ring could be created here (seccomp and container runtimes can forbid it even when the sysctl allows it)",
        ));
    }
    checks.push(memlock(root));
    checks.push(huge_pages(root));
    checks.push(free_page_reporting(root));
    checks.push(governors(root));
    checks.push(halt_polling(root));
    checks.push(isolated(root));
    if let Some(p) = profile {
        for c in profile::compare(p, root) {
            let found = c.current.clone().unwrap_or_else(|| "(absent)".into());
            let verdict = match c.status {
                Status::Same => Verdict::Ok,
                Status::Change => Verdict::Warn,
                Status::Missing | Status::ReadOnly => Verdict::Info,
            };
            checks.push(check(
                &format!("{} ({})", c.key, p.name),
                found,
                c.wanted,
                verdict,
                c.why,
            ));
        }
    }
    checks
}

/// `(major, minor)` of a kernel release string such as `6.18.44-fc-v445`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn kernel(root: &Root) -> Check {
    let release = root.read_setting("kernel.osrelease").unwrap_or_default();
    let verdict = match kernel_version(&release) {
        Some(v) if v >= (6, 1) => Verdict::Ok,
        _ => Verdict::Warn,
    };
    check(
        "kernel",
        release,
        ">= 6.1",
        verdict,
        "io_uring multishot accept and receive and the fixes the data plane relies on; older kernels run it on fewer io_uring features or on epoll",
    )
}

fn uring_sysctl(root: &Root) -> Check {
    let found = root.read_setting("kernel.io_uring_disabled");
    let verdict = match found.as_deref() {
        Some("0") => Verdict::Ok,
        None => Verdict::Info,
        Some(_) => Verdict::Warn,
    };
    check(
        "kernel.io_uring_disabled",
        found.unwrap_or_else(|| "(absent: kernel < 6.6, io_uring allowed)".into()),
        "0",
        verdict,
        "1 limits io_uring to kernel.io_uring_group, 2 disables it: the data plane then runs on epoll",
    )
}

fn memlock(root: &Root) -> Check {
    let limits = std::fs::read_to_string(root.path("proc/self/limits")).unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or("?")
        .to_owned();
    let release = root.read_setting("kernel.osrelease").unwrap_or_default();
    let needs = kernel_version(&release).is_some_and(|v| v < (5, 12));
    let enough = soft == "unlimited" || soft.parse::<u64>().is_ok_and(|b| b >= 64 << 20);
    let verdict = match (needs, enough) {
        (false, _) => Verdict::Info,
        (true, true) => Verdict::Ok,
        (true, false) => Verdict::Warn,
    };
    check(
        "locked memory limit (RLIMIT_MEMLOCK)",
        soft,
        if needs { ">= 64 MiB" } else { "any (kernel >= 5.12 does not charge rings to it)" },
        verdict,
        "before 5.12 every io_uring ring counts against it; too low and workers cannot create their rings",
    )
}

/// The chart runs the data plane with glibc's huge-page heap (`dataplane.hugePageHeap`), which
/// asks for transparent huge pages with madvise: the kernel grants them in modes `madvise`
/// and `always`, never in `never`.
fn huge_pages(root: &Root) -> Check {
    let mode = root
        .read(std::path::Path::new(
            "sys/kernel/mm/transparent_hugepage/enabled",
        ))
        // The kernel marks the mode in force with brackets: "always [madvise] never".
        .and_then(|modes| {
            modes
                .split(' ')
                .find_map(|m| m.strip_prefix('[')?.strip_suffix(']').map(str::to_owned))
        });
    let verdict = match mode.as_deref() {
        Some("madvise" | "always") => Verdict::Ok,
        Some(_) => Verdict::Warn,
        None => Verdict::Info,
    };
    check(
        "transparent huge pages",
        mode.unwrap_or_else(|| "not exposed".into()),
        "madvise or always",
        verdict,
        "the data plane's heap asks for huge pages (GLIBC_TUNABLES glibc.malloc.hugetlb=1); with `never` a full snapshot adopt pays a page fault per 4 KiB",
    )
}

/// The smallest free block (as a power of two of 4 KiB pages) a guest hands back to its host.
const PAGE_REPORTING_ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";

/// How long a block stays free before it is handed back. Not a mainline parameter: the lab
/// VM's kernel has it, and where it exists it decides whether memory freed a moment ago is
/// still the guest's.
const PAGE_REPORTING_MIN_FREE_MS: &str = "/sys/module/page_reporting/parameters/min_free_ms";

/// virtio's balloon feature bit for free page reporting (VIRTIO_BALLOON_F_REPORTING).
const BALLOON_REPORTING_BIT: usize = 5;

/// A balloon device's free page reporting, where it is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreePageReporting {
    /// The smallest free block handed back, as a power of two of 4 KiB pages; `None` where the
    /// kernel does not say (its default is the page allocator's block, order 9 on x86-64).
    pub order: Option<u32>,
}

/// A transparent huge page's order (2 MiB of 4 KiB pages).
const HUGE_PAGE_ORDER: u32 = 9;

impl FreePageReporting {
    /// Whether the free blocks a huge page is taken from are the ones handed back. The page
    /// allocator prefers blocks too small to be reported for a 4 KiB page, but a 2 MiB
    /// page from a free 2 MiB block: at order 9 that block has been handed back once it was
    /// free for a moment, and the host must fault it in again while the guest clears it. On
    /// the lab VM, 64 MiB of fresh huge pages took 113-161 ms that way (about 4 ms each, as
    /// if the host faulted each in 4 KiB at a time) against 32-49 ms in 4 KiB pages
    /// (bench-results/README.md).
    pub fn takes_back_huge_pages(&self) -> bool {
        self.order.is_none_or(|order| order <= HUGE_PAGE_ORDER)
    }
}

/// The node's free page reporting, or `None` where no balloon device reports free pages.
pub fn free_page_reporting_of(root: &Root) -> Option<FreePageReporting> {
    let driver = "sys/bus/virtio/drivers/virtio_balloon";
    let reporting = std::fs::read_dir(root.path(driver))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|device| device.file_name().to_string_lossy().starts_with("virtio"))
        .any(|device| {
            let features = std::path::Path::new(driver)
                .join(device.file_name())
                .join("features");
            // One character per feature bit, bit 0 first.
            root.read(&features)
                .is_some_and(|bits| bits.as_bytes().get(BALLOON_REPORTING_BIT) == Some(&b'1'))
        });
    reporting.then(|| FreePageReporting {
        order: root
            .read_setting(PAGE_REPORTING_ORDER)
            .and_then(|order| order.parse().ok()),
    })
}

/// On a virtual machine whose balloon device has free page reporting, the guest hands free
/// memory back to the host, and the host must fault it in again when the guest reuses it. A
/// full snapshot adopt allocates its index on fresh memory, so this shows as adopt times that
/// vary from run to run. A trade (host memory for first-touch speed), so never a warning.
fn free_page_reporting(root: &Root) -> Check {
    let reporting = free_page_reporting_of(root);
    let mut found = match reporting {
        None => "off (no balloon device reports free pages)".to_owned(),
        Some(FreePageReporting {
            order: Some(order @ ..20),
        }) => format!(
            "on: free blocks of {} KiB and up (order {order})",
            4 << order
        ),
        Some(FreePageReporting { order: Some(order) }) => format!("on (order {order})"),
        Some(FreePageReporting { order: None }) => "on".to_owned(),
    };
    let reporting = reporting.is_some();
    if let (true, Some(ms)) = (reporting, root.read_setting(PAGE_REPORTING_MIN_FREE_MS)) {
        found.push_str(&format!(", once free {ms} ms"));
    }
    check(
        "free page reporting (virtio balloon)",
        found,
        "off where snapshot adopt times matter or are compared",
        Verdict::Info,
        "the guest hands free memory back to the host, which must fault it in again when the guest reuses it, and a full snapshot adopt builds its index on fresh memory. In the lab a 1M resync took 2.8-3.6 s with memory handed back at once and 1.17-1.28 s with this kernel's min_free_ms at 60000; idle 100k adopts took 68-275 ms at order 9 and 85-118 ms at order 10 (bench-results/README.md). At order 9 the data plane keeps its heap off huge pages, since each fresh one is a reported block the host must fault in again (about 4 ms each in the lab). How much memory the guest keeps from the host is the host operator's trade",
    )
}

fn cpus(root: &Root) -> Vec<usize> {
    root.read(std::path::Path::new("sys/devices/system/cpu/online"))
        .map(|s| crate::planner::parse_list(&s))
        .unwrap_or_default()
}

fn governors(root: &Root) -> Check {
    let mut found: Vec<String> = Vec::new();
    for cpu in cpus(root) {
        let path = format!("sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor");
        if let Some(g) = root.read(std::path::Path::new(&path)) {
            found.push(format!("cpu{cpu}={g}"));
        }
    }
    let verdict = if found.is_empty() {
        Verdict::Info
    } else if found.iter().all(|g| g.ends_with("=performance")) {
        Verdict::Ok
    } else {
        Verdict::Warn
    };
    check(
        "CPU frequency governor",
        if found.is_empty() {
            "not exposed (virtual machine or fixed frequency)".into()
        } else {
            found.join(" ")
        },
        "performance",
        verdict,
        "powersave and schedutil ramp the clock down between bursts, which shows as latency",
    )
}

/// On a KVM guest with the haltpoll idle driver, whether an idle vCPU polls before it halts.
/// A trade (host CPU for wakeup latency), so never a warning.
fn halt_polling(root: &Root) -> Check {
    let driver = root.read(std::path::Path::new(
        "sys/devices/system/cpu/cpuidle/current_driver",
    ));
    let found = match (driver.as_deref(), root.read_setting(GUEST_HALT_POLL)) {
        (Some("haltpoll"), Some(ns)) if ns == "0" => "off".to_owned(),
        (Some("haltpoll"), Some(ns)) => format!("up to {ns} ns"),
        (driver, _) => format!(
            "not a KVM guest with cpuidle-haltpoll (idle driver: {})",
            driver.unwrap_or("none")
        ),
    };
    check(
        "guest halt polling",
        found,
        &format!("on where latency matters (profile latency: {GUEST_HALT_POLL_NS} ns)"),
        Verdict::Info,
        "an idle vCPU that halts at once costs a trip through the host to wake; polling first cut the mesh's p50 at 1000 requests/s by about 40% in the lab and raised its connection rate, for host CPU",
    )
}

fn isolated(root: &Root) -> Check {
    let list = root
        .read(std::path::Path::new("sys/devices/system/cpu/isolated"))
        .unwrap_or_default();
    check(
        "isolated CPUs",
        if list.is_empty() { "none".into() } else { list.clone() },
        "the data-plane worker cores (isolcpus= / nohz_full= at boot)",
        if list.is_empty() {
            Verdict::Info
        } else {
            Verdict::Ok
        },
        "on isolated cores nothing else is scheduled next to the workers; without it, pin them (`meshtune plan`) and accept some interference",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_huge_page_mode_in_force_is_read_from_its_brackets() {
        let dir = std::env::temp_dir().join(format!("meshtune-thp-{}", std::process::id()));
        let file = dir.join("sys/kernel/mm/transparent_hugepage/enabled");
        std::fs::create_dir_all(file.parent().expect("parent")).expect("dir");
        let root = Root::new(&dir);
        for (modes, found, verdict) in [
            ("always [madvise] never\n", "madvise", Verdict::Ok),
            ("[always] madvise never\n", "always", Verdict::Ok),
            ("always madvise [never]\n", "never", Verdict::Warn),
        ] {
            std::fs::write(&file, modes).expect("write");
            let check = huge_pages(&root);
            assert_eq!(
                (check.found.as_str(), check.verdict),
                (found, verdict),
                "{modes}"
            );
        }
        std::fs::remove_file(&file).expect("remove");
        assert_eq!(huge_pages(&root).verdict, Verdict::Info);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn free_page_reporting_is_read_from_the_balloon_devices_feature_bits() {
        let dir = std::env::temp_dir().join(format!("meshtune-reporting-{}", std::process::id()));
        let features = dir.join("sys/bus/virtio/drivers/virtio_balloon/virtio0/features");
        let order = dir.join(PAGE_REPORTING_ORDER.trim_start_matches('/'));
        let min_free = dir.join(PAGE_REPORTING_MIN_FREE_MS.trim_start_matches('/'));
        for file in [&features, &order] {
            std::fs::create_dir_all(file.parent().expect("parent")).expect("dir");
        }
        let root = Root::new(&dir);
        let found_after = |file: &std::path::Path, contents: &str| {
            std::fs::write(file, contents).expect("write");
            free_page_reporting(&root).found
        };
        std::fs::write(&order, "9\n").expect("w");
        // This lab VM's balloon: stats, deflate on OOM, reporting (bit 5).
        assert_eq!(
            found_after(&features, "0110010100000000\n"),
            "on: free blocks of 2048 KiB and up (order 9)"
        );
        let takes_back_huge_pages =
            || free_page_reporting_of(&root).map(|r| r.takes_back_huge_pages());
        assert_eq!(takes_back_huge_pages(), Some(true));
        assert_eq!(
            found_after(&order, "10\n"),
            "on: free blocks of 4096 KiB and up (order 10)"
        );
        assert_eq!(takes_back_huge_pages(), Some(false));
        // The lab kernel's delay before a free block is handed back, shown where it exists.
        assert_eq!(
            found_after(&min_free, "0\n"),
            "on: free blocks of 4096 KiB and up (order 10), once free 0 ms"
        );
        // A balloon without reporting: the order is the page allocator's and means nothing.
        let off = "off (no balloon device reports free pages)";
        assert_eq!(found_after(&features, "0110000100000000\n"), off);
        std::fs::remove_dir_all(dir.join("sys/bus")).expect("remove");
        assert_eq!(free_page_reporting(&root).found, off);
        assert_eq!(takes_back_huge_pages(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn halt_polling_is_reported_only_for_the_haltpoll_idle_driver() {
        let dir = std::env::temp_dir().join(format!("meshtune-haltpoll-{}", std::process::id()));
        let driver = dir.join("sys/devices/system/cpu/cpuidle/current_driver");
        let poll = dir.join(GUEST_HALT_POLL.trim_start_matches('/'));
        for file in [&driver, &poll] {
            std::fs::create_dir_all(file.parent().expect("parent")).expect("dir");
        }
        let root = Root::new(&dir);
        std::fs::write(&driver, "intel_idle\n").expect("w");
        assert_eq!(
            halt_polling(&root).found,
            "not a KVM guest with cpuidle-haltpoll (idle driver: intel_idle)"
        );
        std::fs::write(&driver, "haltpoll\n").expect("w");
        std::fs::write(&poll, "0\n").expect("w");
        assert_eq!(halt_polling(&root).found, "off");
        std::fs::write(&poll, "200000\n").expect("w");
        assert_eq!(halt_polling(&root).found, "up to 200000 ns");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
