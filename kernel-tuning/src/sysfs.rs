//! Reading and writing kernel settings as files, under a root (`/` on a real node, a scratch
//! directory in tests). Sysctls are addressed by their dotted names, other settings (kernel
//! module parameters under `/sys`) by their absolute paths.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Root(PathBuf);

impl Default for Root {
    fn default() -> Self {
        Root(PathBuf::from("/"))
    }
}

impl Root {
    pub fn new(path: impl Into<PathBuf>) -> Root {
        Root(path.into())
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.0.join(relative.trim_start_matches('/'))
    }

    /// The file of a setting (see [`setting_file`]) under this root.
    pub fn setting_path(&self, key: &str) -> PathBuf {
        self.0.join(setting_file(key))
    }

    /// A file's contents with whitespace runs collapsed to one space (the kernel separates
    /// multi-value sysctls with tabs); `None` if it does not exist or cannot be read.
    pub fn read(&self, relative: &Path) -> Option<String> {
        std::fs::read_to_string(self.0.join(relative))
            .ok()
            .map(|s| normalize(&s))
    }

    pub fn read_setting(&self, key: &str) -> Option<String> {
        std::fs::read_to_string(self.setting_path(key))
            .ok()
            .map(|s| normalize(&s))
    }
}

/// A setting's file relative to the root: a dotted sysctl name is under `proc/sys`
/// (`net.core.somaxconn` is `proc/sys/net/core/somaxconn`), an absolute path is itself.
pub fn setting_file(key: &str) -> PathBuf {
    match key.strip_prefix('/') {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(format!("proc/sys/{}", key.replace('.', "/"))),
    }
}

/// Whether a setting is the whole node's wherever it is written from: a file outside
/// `/proc/sys` (a module parameter), or a sysctl outside `net.*` (`kernel.io_uring_disabled`
/// and the like), which a network namespace sees and can write all the same. `net.*` sysctls
/// are a network namespace's own, or (host-wide ones) read-only or absent inside one.
pub fn is_node_wide_file(key: &str) -> bool {
    key.starts_with('/') || !key.starts_with("net.")
}

/// Whether this process runs in the host's network namespace, where node-wide settings are
/// expected to change. `net.core.netdev_max_backlog` is registered for the initial namespace
/// only, so any other one lacks it (even in a pod with its own PID namespace, where pid 1 is no
/// help); where `/proc/1/ns/net` can be read too, it must be this process's namespace.
pub fn in_host_netns(root: &Root) -> bool {
    let ns = |pid: &str| std::fs::read_link(root.path(&format!("proc/{pid}/ns/net"))).ok();
    let same_as_init = match (ns("self"), ns("1")) {
        (Some(mine), Some(init)) => mine == init,
        _ => true,
    };
    root.setting_path("net.core.netdev_max_backlog").exists() && same_as_init
}

/// What a file write from this process changes, by network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Reach {
    /// This network namespace's own: a `net.*` sysctl, a queue of one of its devices.
    Namespace,
    /// The whole node from any namespace: IRQ affinity (`/proc/irq` is not namespaced: an
    /// interrupt is the machine's), module parameters, sysctls outside `net.*`.
    Node,
    /// A device of another network namespace (usually the host's), seen through a `/sys` that
    /// was mounted there: a bare `unshare -n`, or a container given the host's `/sys`.
    OtherNamespace,
}

/// The network namespace this process runs in, as far as writes under the root go.
#[derive(Debug, Clone, Copy)]
pub struct Netns {
    /// The host's: everything written from here is meant for the node.
    pub host: bool,
    /// `/sys/class/net` lists this namespace's devices (sysfs mounted in it, as `ip netns
    /// exec` and container runtimes do), not another namespace's.
    pub own_sysfs: bool,
}

impl Netns {
    pub fn read(root: &Root) -> Netns {
        Netns {
            host: in_host_netns(root),
            own_sysfs: sysfs_shows_this_netns(root),
        }
    }

    /// What writing `path` (relative to the root) changes.
    pub fn reach(&self, path: &Path) -> Reach {
        if path.starts_with("sys/class/net") {
            if self.own_sysfs {
                Reach::Namespace
            } else {
                Reach::OtherNamespace
            }
        } else if path.starts_with("proc/sys/net") {
            Reach::Namespace
        } else {
            Reach::Node
        }
    }

    /// Why a write to `path` is held back, if it is: outside the host's namespace, whatever
    /// reaches beyond this namespace waits for `--node-wide`.
    pub fn held_back(&self, path: &Path, node_wide: bool) -> Option<Reach> {
        match self.reach(path) {
            _ if self.host || node_wide => None,
            Reach::Namespace => None,
            beyond => Some(beyond),
        }
    }
}

/// Whether the devices under `sys/class/net` are this process's network namespace's. sysfs
/// shows the devices of the namespace it was mounted in, whatever namespace reads it, and a
/// write to one of their files changes that device. `/proc/net/dev` always lists this
/// namespace's devices: every device sysfs shows must be there. Comparing every name, not one,
/// matters: a pod's `eth0` and the node's `eth0` share a name.
pub fn sysfs_shows_this_netns(root: &Root) -> bool {
    let Ok(listed) = std::fs::read_to_string(root.path("proc/net/dev")) else {
        return false;
    };
    // Two header lines, then `  name: counters...`.
    let ours: Vec<&str> = listed
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim()))
        .collect();
    let Ok(entries) = std::fs::read_dir(root.path("sys/class/net")) else {
        return true;
    };
    entries
        .filter_map(|e| e.ok())
        // Devices are directories; `bonding_masters` and the like are plain files.
        .filter(|e| e.path().is_dir())
        .all(|e| ours.contains(&e.file_name().to_string_lossy().as_ref()))
}

pub fn normalize(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctls_live_under_proc_sys_and_module_parameters_where_their_path_says() {
        assert_eq!(
            setting_file("net.core.somaxconn"),
            PathBuf::from("proc/sys/net/core/somaxconn")
        );
        let halt_poll = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";
        assert_eq!(
            setting_file(halt_poll),
            PathBuf::from("sys/module/haltpoll/parameters/guest_halt_poll_ns")
        );
        assert!(is_node_wide_file(halt_poll));
        assert!(is_node_wide_file("kernel.io_uring_disabled"));
        assert!(!is_node_wide_file("net.core.somaxconn"));
    }

    #[test]
    fn irq_affinity_is_node_wide_and_queues_are_the_namespace_s_when_sysfs_is() {
        let dir = std::env::temp_dir().join(format!("meshtune-reach-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = Root::new(&dir);
        for device in ["lo", "eth0"] {
            std::fs::create_dir_all(dir.join(format!("sys/class/net/{device}"))).expect("dir");
        }
        std::fs::write(dir.join("sys/class/net/bonding_masters"), "\n").expect("w");
        std::fs::create_dir_all(dir.join("proc/net")).expect("dir");
        let header = "Inter-|   Receive\n face |bytes    packets\n";
        let dev = dir.join("proc/net/dev");
        std::fs::write(&dev, format!("{header}    lo: 0 0\n  eth0: 0 0\n")).expect("w");
        let irq = Path::new("proc/irq/41/smp_affinity_list");
        let rps = Path::new("sys/class/net/eth0/queues/rx-0/rps_cpus");
        let somaxconn = Path::new("proc/sys/net/core/somaxconn");

        let netns = Netns::read(&root);
        assert!(!netns.host && netns.own_sysfs);
        assert_eq!(netns.reach(irq), Reach::Node);
        assert_eq!(netns.reach(rps), Reach::Namespace);
        assert_eq!(netns.reach(somaxconn), Reach::Namespace);
        assert_eq!(netns.held_back(irq, false), Some(Reach::Node));
        assert_eq!(netns.held_back(irq, true), None);
        assert_eq!(netns.held_back(rps, false), None);

        // Only `lo` is this namespace's: sysfs (and its eth0) is another namespace's.
        std::fs::write(&dev, format!("{header}    lo: 0 0\n")).expect("w");
        let netns = Netns::read(&root);
        assert!(!netns.own_sysfs);
        assert_eq!(netns.held_back(rps, false), Some(Reach::OtherNamespace));
        assert_eq!(netns.held_back(rps, true), None);

        // The host's namespace: everything is for the node.
        std::fs::create_dir_all(dir.join("proc/sys/net/core")).expect("dir");
        std::fs::write(dir.join("proc/sys/net/core/netdev_max_backlog"), "1000\n").expect("w");
        let netns = Netns::read(&root);
        assert_eq!(netns.held_back(irq, false), None);
        assert_eq!(netns.held_back(rps, false), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_host_namespace_is_the_one_with_netdev_max_backlog_and_pid_1s_netns() {
        let dir = std::env::temp_dir().join(format!("meshtune-hostns-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = Root::new(&dir);
        std::fs::create_dir_all(dir.join("proc/sys/net/core")).expect("dir");
        assert!(
            !in_host_netns(&root),
            "a namespace has no netdev_max_backlog"
        );
        std::fs::write(dir.join("proc/sys/net/core/netdev_max_backlog"), "1000\n").expect("w");
        assert!(in_host_netns(&root));
        for (pid, ns) in [("self", "net:[4026532177]"), ("1", "net:[4026531833]")] {
            std::fs::create_dir_all(dir.join(format!("proc/{pid}/ns"))).expect("dir");
            std::os::unix::fs::symlink(ns, dir.join(format!("proc/{pid}/ns/net"))).expect("ln");
        }
        assert!(
            !in_host_netns(&root),
            "pid 1 is in another network namespace"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
