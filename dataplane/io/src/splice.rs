//! Kernel-side forwarding for plain TCP relays (passthrough and plaintext inbound): bytes go
//! socket -> pipe -> socket with splice(2), so the data plane never copies payload it only
//! forwards through user space.
//!
//! A pipe is held only while a direction moves bytes: it takes one from its worker's spares
//! once its source is readable, and gives it back once the source has nothing more and the
//! pipe is empty. An idle connection holds no pipe (and no descriptors beyond its two
//! sockets), as it holds no buffer on the other relays.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use crate::stats::WorkerStats;

/// Capacity asked of each pipe: one splice moves up to this much. The default (64 KiB, 16
/// pages) costs a pair of splice calls per 64 KiB; a larger pipe lets one call take what the
/// socket has queued (the lab measured 64 KiB at x1.33 the CPU per byte of this size).
/// Where the kernel refuses (`fs.pipe-max-size`, or the user's pipe pages are spent; the
/// chart's CAP_SYS_ADMIN exempts the data plane from the latter), the pipe keeps the size it
/// was given.
pub const PIPE_BYTES: usize = 256 * 1024;

/// Empty pipes a worker keeps for reuse; more are closed when given back.
const SPARE_PIPES: usize = 32;

/// A pipe's two ends, both non-blocking. Counted in its worker's `pipes_open` while open.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    stats: Arc<WorkerStats>,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.stats.pipes_open.dec();
    }
}

impl Pipe {
    fn new(stats: Arc<WorkerStats>) -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        #[allow(unsafe_code)]
        let made = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if made < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both descriptors are open and nothing else owns them.
        #[allow(unsafe_code)]
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
                stats,
            }
        };
        pipe.stats.pipes_open.inc();
        // SAFETY: fcntl on a descriptor this function owns. A refusal leaves the default size.
        #[allow(unsafe_code)]
        unsafe {
            libc::fcntl(
                pipe.write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_BYTES as libc::c_int,
            );
        }
        Ok(pipe)
    }
}

/// One worker's empty pipes. Worker-local: no other thread touches it.
pub struct Pipes {
    spare: RefCell<Vec<Pipe>>,
    stats: Arc<WorkerStats>,
}

impl Pipes {
    pub fn new(stats: Arc<WorkerStats>) -> Pipes {
        Pipes {
            spare: RefCell::new(Vec::new()),
            stats,
        }
    }

    /// An empty pipe: a spare one, or a new one.
    pub fn take(&self) -> io::Result<Pipe> {
        if let Some(pipe) = self.spare.borrow_mut().pop() {
            return Ok(pipe);
        }
        Pipe::new(self.stats.clone()).inspect_err(|_| self.stats.pipe_failures.inc())
    }

    /// Gives back a pipe the caller has emptied.
    pub fn give(&self, pipe: Pipe) {
        let mut spare = self.spare.borrow_mut();
        if spare.len() < SPARE_PIPES {
            spare.push(pipe);
        }
    }

    /// How many empty pipes are kept now.
    pub fn spare(&self) -> usize {
        self.spare.borrow().len()
    }
}

/// Moves up to `len` bytes from `from` into `pipe`, without blocking.
pub fn fill(from: RawFd, pipe: &Pipe, len: usize) -> io::Result<usize> {
    splice(from, pipe.write.as_raw_fd(), len)
}

/// Moves up to `len` bytes from `pipe` to `to`, without blocking.
pub fn drain(pipe: &Pipe, to: RawFd, len: usize) -> io::Result<usize> {
    splice(pipe.read.as_raw_fd(), to, len)
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two descriptors the caller keeps open, no offsets (both ends
    // are a socket or a pipe).
    #[allow(unsafe_code)]
    let moved = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if moved < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(moved as usize)
    }
}

/// Makes a socket's reads and writes non-blocking, as splice with `SPLICE_F_NONBLOCK` needs
/// for its socket end (the flag covers only the pipe end).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns.
    #[allow(unsafe_code)]
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    #[allow(unsafe_code)]
    let set = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if set < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
