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
