//! A local message channel that can carry file descriptors: a unix SOCK_SEQPACKET socket, so
//! every message (and the descriptors sent with it, via SCM_RIGHTS) arrives whole and alone.
//! The CNI plugin, the agent and the data plane talk over it; messages are JSON.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

/// Largest message accepted (enrollment records are a few hundred bytes).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most descriptors one message may carry.
pub const MAX_FDS: usize = 8;

pub struct Channel(Socket);

pub struct Listener(Socket);

impl Listener {
    /// Listens at `path` (replacing a socket file there), reachable by root only (mode 0600).
    /// The socket is bound, restricted and listening under a name of its own first, then
    /// renamed over `path` in one step: a client that connects while one agent takes the path
    /// over from another reaches one of them, never a missing file (ENOENT), a socket not yet
    /// listening (ECONNREFUSED) or one with wider permissions.
    pub fn bind(path: &Path) -> io::Result<Listener> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut staged = path.as_os_str().to_owned();
        staged.push(format!(".{}.new", std::process::id()));
        let staged = Path::new(&staged);
        let _ = std::fs::remove_file(staged);
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
        socket.bind(&SockAddr::unix(staged)?)?;
        let listening = std::fs::set_permissions(staged, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| socket.listen(64))
            .and_then(|()| std::fs::rename(staged, path));
        if let Err(error) = listening {
            let _ = std::fs::remove_file(staged);
            return Err(error);
        }
        Ok(Listener(socket))
    }

    pub fn accept(&self) -> io::Result<Channel> {
        let (socket, _) = self.0.accept()?;
        Ok(Channel(socket))
    }

    /// Stops listening: an `accept` blocked on another thread returns an error (EINVAL), and so
    /// does every later one.
    pub fn shut_down(&self) -> io::Result<()> {
        self.0.shutdown(std::net::Shutdown::Both)
    }
}

impl Channel {
    pub fn connect(path: &Path) -> io::Result<Channel> {
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
        socket.connect(&SockAddr::unix(path)?)?;
        Ok(Channel(socket))
    }

    /// Connects to whoever listens at `path`; `Ok(None)` when no one does (no socket file, or
    /// one its process left behind): a first start, for a process that takes over from a
    /// running one.
    pub fn connect_if_listening(path: &Path) -> io::Result<Option<Channel>> {
        match Channel::connect(path) {
            Ok(channel) => Ok(Some(channel)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.0.set_read_timeout(timeout)?;
        self.0.set_write_timeout(timeout)
    }

    /// Sends one message with descriptors attached.
    pub fn send(&self, message: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > MAX_FDS || message.len() > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "message too large",
            ));
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let mut iov = libc::iovec {
            iov_base: message.as_ptr() as *mut libc::c_void,
            iov_len: message.len(),
        };
        let mut control = [0u8; 256];
        // SAFETY: msghdr is plain data; every pointer set below refers to a live local buffer
        // whose length is given alongside. CMSG_* only compute offsets within `control`, which
        // is large enough for MAX_FDS descriptors (CMSG_SPACE(8 * 4) < 256).
        #[allow(unsafe_code)]
        unsafe {
            let mut msg: libc::msghdr = MaybeUninit::zeroed().assume_init();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if !raw.is_empty() {
                let bytes = std::mem::size_of_val(raw.as_slice()) as u32;
                msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
                msg.msg_controllen = libc::CMSG_SPACE(bytes) as usize;
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(bytes) as usize;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr() as *const u8,
                    libc::CMSG_DATA(cmsg),
                    bytes as usize,
                );
            }
            // A signal landing on this thread is no reason to fail a handover: try again.
            while libc::sendmsg(self.0.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) < 0 {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// Receives one message and the descriptors that came with it; `None` when the peer
    /// closed the channel.
    pub fn recv(&self) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let mut control = [0u8; 256];
        let mut fds = Vec::new();
        // SAFETY: as in `send`; the kernel writes at most msg_controllen bytes of control data
        // and at most iov_len bytes of payload. Each SCM_RIGHTS descriptor it installs is ours
        // (MSG_CMSG_CLOEXEC) and is wrapped in an OwnedFd exactly once.
        #[allow(unsafe_code)]
        let n = unsafe {
            let mut msg: libc::msghdr = MaybeUninit::zeroed().assume_init();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = control.len();
            // Interrupted by a signal (a data plane taking over once failed its upgrade so,
            // in the lab): nothing was received, so receiving again is safe.
            let n = loop {
                let n = libc::recvmsg(self.0.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
                if n >= 0 {
                    break n;
                }
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            };
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let count =
                        ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                    for i in 0..count {
                        let fd = std::ptr::read_unaligned((data as *const RawFd).add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "message truncated",
                ));
            }
            n as usize
        };
        if n == 0 && fds.is_empty() {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((buf, fds)))
    }

    /// Sends a value as JSON.
    pub fn send_json<T: serde::Serialize>(
        &self,
        value: &T,
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
        self.send(&bytes, fds)
    }

    /// Receives a JSON value; `None` when the peer closed the channel.
    pub fn recv_json<T: serde::de::DeserializeOwned>(
        &self,
    ) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
        match self.recv()? {
            None => Ok(None),
            Some((bytes, fds)) => {
                let value = serde_json::from_slice(&bytes)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                Ok(Some((value, fds)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    #[test]
    fn messages_arrive_whole_with_their_descriptors() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("dir");
        let path = dir.path().join("chan.sock");
        let listener = Listener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let chan = listener.accept().expect("accept");
            let mut got = Vec::new();
            while let Some((msg, fds)) = chan.recv().expect("recv") {
                got.push((msg, fds));
            }
            got
        });
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("payload"))
            .expect("file");
        file.write_all(b"passed by descriptor").expect("write");
        let client = Channel::connect(&path).expect("connect");
        client.send(b"first", &[file.as_fd()]).expect("send");
        client.send(b"second, without", &[]).expect("send");
        drop(client);
        let got = server.join().expect("server");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, b"first");
        assert_eq!(got[0].1.len(), 1);
        assert_eq!(got[1].0, b"second, without");
        assert!(got[1].1.is_empty());
        // The received descriptor is the same open file.
        let mut received = std::fs::File::from(got.into_iter().next().expect("msg").1.remove(0));
        received.rewind().expect("seek");
        let mut text = String::new();
        received.read_to_string(&mut text).expect("read");
        assert_eq!(text, "passed by descriptor");
    }

    #[test]
    fn a_listener_taking_a_path_over_leaves_no_moment_without_a_socket_there() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("dir");
        let path = dir.path().join("cni.sock");
        let _first = Listener::bind(&path).expect("first");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // What a client meets at the path while successors take it over: a socket reachable
        // by root only, every time it looks (before, the file was missing between the old
        // one's removal and the new bind, and a client got ENOENT).
        let watcher = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || -> Result<u64, String> {
                let mut looks = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    let found = std::fs::symlink_metadata(&path).map_err(|e| e.to_string())?;
                    let mode = found.permissions().mode();
                    if mode & 0o777 != 0o600 {
                        return Err(format!("mode {mode:o}"));
                    }
                    looks += 1;
                }
                Ok(looks)
            })
        };
        for _ in 0..300 {
            let successor = Listener::bind(&path).expect("a successor");
            // Listening as soon as it is there: a connect is accepted at once.
            let _client = Channel::connect(&path).expect("connect");
            successor.accept().expect("accept");
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        let looks = watcher
            .join()
            .expect("watcher")
            .expect("a socket at every look");
        assert!(looks > 0);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["cni.sock"], "no staged name left behind");
    }

    #[test]
    fn shutting_a_listener_down_wakes_the_thread_blocked_in_accept() {
        let dir = mesh_snapshot::test_support::ScratchDir::new().expect("dir");
        let listener =
            std::sync::Arc::new(Listener::bind(&dir.path().join("l.sock")).expect("bind"));
        let (done, woke) = std::sync::mpsc::channel();
        let blocked = listener.clone();
        std::thread::spawn(move || {
            let _ = done.send(blocked.accept().is_err());
        });
        std::thread::sleep(Duration::from_millis(50));
        listener.shut_down().expect("shut down");
        assert_eq!(
            woke.recv_timeout(Duration::from_secs(5)),
            Ok(true),
            "accept still blocked, or returned a connection"
        );
    }
}
