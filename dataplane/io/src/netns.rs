//! Entering a pod's network namespace to create sockets there.
//!
//! `setns` switches only the calling thread, and a socket keeps the namespace it was created in,
//! so a worker creates a socket in a pod's namespace and returns to its own before the next
//! `.await`: no other task ever runs inside a pod's namespace.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// An open handle on a network namespace (keeps it alive while held).
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: String,
}

impl NetNs {
    pub fn open(path: impl AsRef<Path>) -> io::Result<NetNs> {
        let path = path.as_ref();
        Ok(NetNs {
            file: File::open(path)?,
            path: path.display().to_string(),
        })
    }

    /// A namespace received as a descriptor (for instance from the agent); `label` names it
    /// in logs.
    pub fn from_fd(fd: OwnedFd, label: impl Into<String>) -> NetNs {
        NetNs {
            file: File::from(fd),
            path: label.into(),
        }
    }

    /// Another handle on the same namespace.
    pub fn try_clone(&self) -> io::Result<NetNs> {
        Ok(NetNs {
            file: self.file.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// (device, inode): what identifies a namespace, whatever path or descriptor reaches it.
    pub fn identity(&self) -> io::Result<(u64, u64)> {
        let meta = self.file.metadata()?;
        Ok((meta.dev(), meta.ino()))
    }

    /// The namespace `socket` was created in (SIOCGSKNS): where it listens, whichever thread
    /// holds it now.
    pub fn of_socket(socket: BorrowedFd<'_>) -> io::Result<NetNs> {
        // SAFETY: SIOCGSKNS takes no argument and touches no memory; on success it returns a
        // new descriptor of the socket's namespace, which nothing else owns.
        #[allow(unsafe_code)]
        let fd = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGSKNS) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned to us open and is owned by nothing else.
        #[allow(unsafe_code)]
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(NetNs::from_fd(owned, "a socket's namespace"))
    }

    /// The namespace the calling thread is in now.
    pub fn current() -> io::Result<NetNs> {
        NetNs::open("/proc/thread-self/ns/net")
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn enter(&self) -> io::Result<()> {
        // SAFETY: setns with a valid namespace fd we own; it changes only this thread's network
        // namespace and touches no memory.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Runs `f` with the calling thread inside `self`, then returns it to `home`.
    pub fn run_in<T>(&self, home: &NetNs, f: impl FnOnce() -> T) -> io::Result<T> {
        self.enter()?;
        let out = f();
        if let Err(e) = home.enter() {
            // A worker stranded in a pod's namespace would open every later socket there.
            // There is no safe way to continue.
            tracing::error!(error = %e, pod_netns = %self.path, home = %home.path,
                "cannot return to the home network namespace; aborting");
            std::process::abort();
        }
        Ok(out)
    }
}
