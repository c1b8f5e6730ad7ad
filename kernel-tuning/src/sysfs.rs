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
/// `/proc/sys` (a module parameter). Sysctls may be a network namespace's own; whether one is
/// shows when it is read from inside one (host-wide ones are read-only or absent there).
pub fn is_node_wide_file(key: &str) -> bool {
    key.starts_with('/')
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
        assert!(!is_node_wide_file("net.core.somaxconn"));
    }
}
