//! The core planner: from the machine's topology (CPUs, SMT siblings, NUMA nodes) and its
//! NICs (queues and interrupts), proposes which cores run data-plane workers and which take
//! interrupts and housekeeping, and the writes that route interrupts (IRQ affinity) and
//! packet steering (RPS for receive, XPS for transmit) accordingly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::state::Write;
use crate::sysfs::Root;

/// Parses a kernel CPU list such as `0-3,8,10-11`.
pub fn parse_list(list: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                    out.extend(a..=b);
                }
            }
            None => {
                if let Ok(n) = part.trim().parse() {
                    out.push(n);
                }
            }
        }
    }
    out
}

/// Formats CPUs as a kernel list (`0-3,8`).
pub fn format_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// A CPU mask in the kernel's hex form (comma every 32 bits), as rps_cpus and xps_cpus take.
pub fn mask(cpus: &[usize]) -> String {
    let top = cpus.iter().copied().max().unwrap_or(0);
    let mut words = vec![0u32; top / 32 + 1];
    for &c in cpus {
        words[c / 32] |= 1 << (c % 32);
    }
    let mut parts: Vec<String> = words.iter().rev().map(|w| format!("{w:08x}")).collect();
    // The leading word without zero padding, as the kernel prints it.
    if let Some(first) = parts.first_mut() {
        let trimmed = first.trim_start_matches('0');
        *first = if trimmed.is_empty() {
            "0".into()
        } else {
            trimmed.into()
        };
    }
    parts.join(",")
}

#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    pub id: usize,
    pub package: usize,
    pub core: usize,
    pub node: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Nic {
    pub name: String,
    pub rx_queues: usize,
    pub tx_queues: usize,
    pub irqs: Vec<usize>,
    pub node: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Topology {
    pub cpus: Vec<Cpu>,
    pub nics: Vec<Nic>,
}

fn read_num(root: &Root, path: &str) -> Option<usize> {
    root.read(Path::new(path))?.trim().parse().ok()
}

impl Topology {
    /// Reads the machine under `root` (sysfs and /proc/interrupts).
    pub fn read(root: &Root) -> Topology {
        let online = root
            .read(Path::new("sys/devices/system/cpu/online"))
            .map(|s| parse_list(&s))
            .unwrap_or_default();
        let cpus = online
            .into_iter()
            .map(|id| {
                let base = format!("sys/devices/system/cpu/cpu{id}");
                let node = std::fs::read_dir(root.path(&base))
                    .ok()
                    .and_then(|entries| {
                        entries.filter_map(|e| e.ok()).find_map(|e| {
                            e.file_name()
                                .to_str()
                                .and_then(|n| n.strip_prefix("node"))
                                .and_then(|n| n.parse().ok())
                        })
                    })
                    .unwrap_or(0);
                Cpu {
                    id,
                    package: read_num(root, &format!("{base}/topology/physical_package_id"))
                        .unwrap_or(0),
                    core: read_num(root, &format!("{base}/topology/core_id")).unwrap_or(id),
                    node,
                }
            })
            .collect();
        let interrupts = std::fs::read_to_string(root.path("proc/interrupts")).unwrap_or_default();
        let mut nics = Vec::new();
        if let Ok(entries) = std::fs::read_dir(root.path("sys/class/net")) {
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            for name in names {
                let base = format!("sys/class/net/{name}");
                // Physical devices only: virtual ones (lo, veth, bridges) have no `device`.
                if !root.path(&format!("{base}/device")).exists() {
                    continue;
                }
                let count = |prefix: &str| {
                    std::fs::read_dir(root.path(&format!("{base}/queues")))
                        .map(|d| {
                            d.filter_map(|e| e.ok())
                                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                                .count()
                        })
                        .unwrap_or(0)
                };
                let mut irqs: Vec<usize> =
                    std::fs::read_dir(root.path(&format!("{base}/device/msi_irqs")))
                        .map(|d| {
                            d.filter_map(|e| e.ok())
                                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                                .collect()
                        })
                        .unwrap_or_default();
                if irqs.is_empty() {
                    // No MSI listing: interrupts named after the device.
                    irqs = interrupts
                        .lines()
                        .filter(|l| {
                            l.split_whitespace()
                                .last()
                                .is_some_and(|n| n.contains(&name))
                        })
                        .filter_map(|l| l.split(':').next()?.trim().parse().ok())
                        .collect();
                }
                irqs.sort_unstable();
                let node = root
                    .read(Path::new(&format!("{base}/device/numa_node")))
                    .and_then(|n| n.parse::<i64>().ok())
                    .and_then(|n| usize::try_from(n).ok());
                nics.push(Nic {
                    rx_queues: count("rx-"),
                    tx_queues: count("tx-"),
                    irqs,
                    node,
                    name,
                });
            }
        }
        Topology { cpus, nics }
    }

    /// Physical cores (package, core) with their CPUs (SMT siblings), in CPU order.
    fn cores(&self) -> Vec<Vec<&Cpu>> {
        let mut by_core: BTreeMap<(usize, usize), Vec<&Cpu>> = BTreeMap::new();
        for c in &self.cpus {
            by_core.entry((c.package, c.core)).or_default().push(c);
        }
        let mut cores: Vec<Vec<&Cpu>> = by_core.into_values().collect();
        cores.sort_by_key(|siblings| siblings.iter().map(|c| c.id).min());
        cores
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// CPUs for data-plane workers: `dataplane --cores <list>`.
    pub worker_cpus: Vec<usize>,
    /// CPUs left for NIC interrupts, the kernel and everything else on the node.
    pub housekeeping_cpus: Vec<usize>,
    pub notes: Vec<String>,
    /// The writes that route interrupts and steering (IRQ affinity, RPS, XPS).
    pub writes: Vec<Write>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// At most this many workers (0: as many as the plan allows).
    pub workers: usize,
    /// Run workers on both SMT siblings of a core (more workers, each slower).
    pub use_smt: bool,
}

/// Proposes a split of the machine's cores.
///
/// - With four or more physical cores, one physical core (both siblings) on the NIC's NUMA
///   node is kept for interrupts and housekeeping; workers get the others, on that node first.
/// - With fewer, nothing is reserved: workers share every core with interrupts.
/// - Workers take one sibling per core unless `use_smt`: two workers on one core share its
///   execution units and caches, so each runs slower.
/// - NIC interrupts go to the housekeeping CPUs. When a NIC has fewer receive queues than
///   there are workers, RPS spreads receive processing over the worker CPUs; XPS maps each
///   transmit queue to one worker CPU so a worker's sends stay on its own queue.
pub fn plan(topology: &Topology, options: Options) -> Plan {
    let mut notes = Vec::new();
    let cores = topology.cores();
    let nic_node = topology.nics.iter().find_map(|n| n.node).unwrap_or(0);
    let mut ordered: Vec<&Vec<&Cpu>> = cores.iter().collect();
    // The NIC's node first: its memory and interrupts are local there.
    ordered.sort_by_key(|siblings| (siblings[0].node != nic_node, siblings[0].id));
    let reserve = ordered.len() >= 4;
    let (housekeeping, worker_cores): (Vec<&Vec<&Cpu>>, Vec<&Vec<&Cpu>>) = if reserve {
        (vec![ordered[0]], ordered[1..].to_vec())
    } else {
        notes.push(format!(
            "{} physical core(s): none reserved; workers share every core with interrupts",
            ordered.len()
        ));
        (Vec::new(), ordered.clone())
    };
    let mut worker_cpus: Vec<usize> = Vec::new();
    for siblings in &worker_cores {
        if options.use_smt {
            worker_cpus.extend(siblings.iter().map(|c| c.id));
        } else {
            worker_cpus.push(siblings[0].id);
        }
    }
    if options.workers > 0 && options.workers < worker_cpus.len() {
        worker_cpus.truncate(options.workers);
    }
    let mut housekeeping_cpus: Vec<usize> = housekeeping
        .iter()
        .flat_map(|s| s.iter().map(|c| c.id))
        .collect();
    if !options.use_smt {
        // Idle siblings of worker cores take no workers; they may take housekeeping.
        notes.push("one worker per physical core; SMT siblings left to the kernel".into());
    }
    housekeeping_cpus.sort_unstable();
    let irq_cpus = if housekeeping_cpus.is_empty() {
        worker_cpus.clone()
    } else {
        housekeeping_cpus.clone()
    };
    let mut writes = Vec::new();
    for nic in &topology.nics {
        for irq in &nic.irqs {
            writes.push(Write {
                path: PathBuf::from(format!("proc/irq/{irq}/smp_affinity_list")),
                value: format_list(&irq_cpus),
            });
        }
        let rps = if nic.rx_queues < worker_cpus.len() {
            mask(&worker_cpus)
        } else {
            "0".into()
        };
        for q in 0..nic.rx_queues {
            writes.push(Write {
                path: PathBuf::from(format!("sys/class/net/{}/queues/rx-{q}/rps_cpus", nic.name)),
                value: rps.clone(),
            });
        }
        // XPS picks among transmit queues: a single-queue device has no choice to make, and
        // the kernel refuses its xps_cpus (ENOENT), which would fail the whole apply.
        if !worker_cpus.is_empty() && nic.tx_queues > 1 {
            for q in 0..nic.tx_queues {
                writes.push(Write {
                    path: PathBuf::from(format!(
                        "sys/class/net/{}/queues/tx-{q}/xps_cpus",
                        nic.name
                    )),
                    value: mask(&[worker_cpus[q % worker_cpus.len()]]),
                });
            }
        }
        if nic.irqs.is_empty() {
            notes.push(format!("{}: no interrupts found to route", nic.name));
        }
    }
    if topology.nics.is_empty() {
        notes.push("no physical NIC found (virtual interfaces only): no interrupt routing".into());
    }
    Plan {
        worker_cpus,
        housekeeping_cpus,
        notes,
        writes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(PathBuf);

    impl Fake {
        fn new(name: &str) -> Fake {
            let dir =
                std::env::temp_dir().join(format!("meshtune-plan-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Fake(dir)
        }
        fn file(&self, path: &str, contents: &str) -> &Self {
            let p = self.0.join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("dir");
            std::fs::write(p, contents).expect("write");
            self
        }
        fn dir(&self, path: &str) -> &Self {
            std::fs::create_dir_all(self.0.join(path)).expect("dir");
            self
        }
        /// `cpus` CPUs over cores of `smt` siblings (sibling of cpu i is i + cores).
        fn cpus(&self, cpus: usize, smt: usize) -> &Self {
            self.file("sys/devices/system/cpu/online", &format!("0-{}", cpus - 1));
            let cores = cpus / smt;
            for id in 0..cpus {
                let base = format!("sys/devices/system/cpu/cpu{id}");
                self.file(
                    &format!("{base}/topology/core_id"),
                    &(id % cores).to_string(),
                );
                self.file(&format!("{base}/topology/physical_package_id"), "0");
                self.dir(&format!("{base}/node0"));
            }
            self
        }
        fn nic(&self, name: &str, queues: usize, irqs: &[usize]) -> &Self {
            let base = format!("sys/class/net/{name}");
            self.dir(&format!("{base}/device"));
            self.file(&format!("{base}/device/numa_node"), "-1");
            for q in 0..queues {
                self.file(&format!("{base}/queues/rx-{q}/rps_cpus"), "0");
                self.file(&format!("{base}/queues/tx-{q}/xps_cpus"), "0");
            }
            for irq in irqs {
                self.file(&format!("{base}/device/msi_irqs/{irq}"), "msix");
            }
            self
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn lists_and_masks_read_and_print_as_the_kernel_does() {
        assert_eq!(parse_list("0-3,8,10-11\n"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(format_list(&[3, 0, 1, 2, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(mask(&[1, 2, 3]), "e");
        assert_eq!(mask(&[0, 33]), "2,00000001");
    }

    #[test]
    fn eight_cpus_with_smt_keep_one_core_for_interrupts() {
        let fake = Fake::new("smt");
        fake.cpus(8, 2)
            .nic("eth0", 2, &[40, 41, 42])
            .dir("sys/class/net/lo");
        let topology = Topology::read(&Root::new(&fake.0));
        assert_eq!(topology.nics.len(), 1, "lo is virtual");
        let plan = plan(&topology, Options::default());
        // Core 0 (cpus 0 and 4) for interrupts; one worker on each other core.
        assert_eq!(plan.housekeeping_cpus, vec![0, 4]);
        assert_eq!(plan.worker_cpus, vec![1, 2, 3]);
        let value = |path: &str| {
            plan.writes
                .iter()
                .find(|w| w.path == Path::new(path))
                .map(|w| w.value.clone())
        };
        assert_eq!(
            value("proc/irq/41/smp_affinity_list").as_deref(),
            Some("0,4")
        );
        // Two receive queues for three workers: RPS spreads over the workers.
        assert_eq!(
            value("sys/class/net/eth0/queues/rx-0/rps_cpus").as_deref(),
            Some("e")
        );
        assert_eq!(
            value("sys/class/net/eth0/queues/tx-0/xps_cpus").as_deref(),
            Some("2")
        );
        assert_eq!(
            value("sys/class/net/eth0/queues/tx-1/xps_cpus").as_deref(),
            Some("4")
        );
        let smt = plan_with(&topology, 0, true);
        assert_eq!(smt.worker_cpus, vec![1, 5, 2, 6, 3, 7]);
        assert_eq!(plan_with(&topology, 2, false).worker_cpus, vec![1, 2]);
    }

    fn plan_with(topology: &Topology, workers: usize, use_smt: bool) -> Plan {
        plan(topology, Options { workers, use_smt })
    }

    #[test]
    fn a_single_queue_nic_gets_no_transmit_steering() {
        let fake = Fake::new("one-queue");
        fake.cpus(4, 1).nic("eth0", 1, &[30]);
        let plan = plan(&Topology::read(&Root::new(&fake.0)), Options::default());
        let paths: Vec<_> = plan
            .writes
            .iter()
            .map(|w| w.path.display().to_string())
            .collect();
        assert!(paths.iter().all(|p| !p.contains("xps_cpus")), "{paths:?}");
        assert!(paths.contains(&"sys/class/net/eth0/queues/rx-0/rps_cpus".to_owned()));
        assert!(paths.contains(&"proc/irq/30/smp_affinity_list".to_owned()));
    }

    #[test]
    fn two_cpus_reserve_nothing() {
        let fake = Fake::new("small");
        fake.cpus(2, 1);
        let plan = plan(&Topology::read(&Root::new(&fake.0)), Options::default());
        assert_eq!(plan.worker_cpus, vec![0, 1]);
        assert!(plan.housekeeping_cpus.is_empty());
        assert!(plan.writes.is_empty());
        assert!(plan.notes.iter().any(|n| n.contains("none reserved")));
    }
}
