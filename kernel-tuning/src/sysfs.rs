//! Reading and writing kernel settings as files, under a root (`/` on a real node, a scratch
//! directory in tests). Sysctls are addressed by their dotted names.

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

    /// The file of a dotted sysctl name (`net.core.somaxconn`) under this root.
    pub fn sysctl_path(&self, key: &str) -> PathBuf {
        self.0.join(sysctl_file(key))
    }

    /// A file's contents with whitespace runs collapsed to one space (the kernel separates
    /// multi-value sysctls with tabs); `None` if it does not exist or cannot be read.
    pub fn read(&self, relative: &Path) -> Option<String> {
        std::fs::read_to_string(self.0.join(relative))
            .ok()
            .map(|s| normalize(&s))
    }

    pub fn read_sysctl(&self, key: &str) -> Option<String> {
        std::fs::read_to_string(self.sysctl_path(key))
            .ok()
            .map(|s| normalize(&s))
    }
}

/// A sysctl's file relative to the root: `proc/sys/net/core/somaxconn`.
pub fn sysctl_file(key: &str) -> PathBuf {
    PathBuf::from(format!("proc/sys/{}", key.replace('.', "/")))
}

pub fn normalize(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}
