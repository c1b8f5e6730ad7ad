//! Socket creation and options: SO_REUSEPORT listeners, marked outbound sockets,
//! SO_ORIGINAL_DST, and resets.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Listen backlog for every data-plane listener.
const BACKLOG: i32 = 4096;

/// A listener bound with SO_REUSEPORT so that every worker can own one on the same port and the
/// kernel spreads connections over them.
pub fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Readies a listener for a worker's accept loop: non-blocking, and TCP_NODELAY, which the
/// sockets it accepts inherit (Linux), so a connection needs no setsockopt of its own.
pub fn prepare_to_accept(listener: &std::net::TcpListener) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    socket2::SockRef::from(listener).set_nodelay(true)
}

/// Lets the kernel hand the connections queued on a closing listener to another listener of
/// its SO_REUSEPORT group, instead of resetting them (`net.ipv4.tcp_migrate_req`, Linux 5.14),
/// in the calling thread's network namespace. A pod's listeners close while others of the
/// same group stay: the old process's at the end of an upgrade (those it opened after the
/// handover, beside the new process's own).
pub fn migrate_queued_connections() -> io::Result<()> {
    std::fs::write(MIGRATE_REQ_SYSCTL, "1")
}

const MIGRATE_REQ_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Whether the kernel has `tcp_migrate_req` (every network namespace has it, or none).
pub fn kernel_migrates_queued_connections() -> bool {
    std::path::Path::new(MIGRATE_REQ_SYSCTL).exists()
}

/// Where a connection the data plane opens comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Wherever the kernel's routing says.
    Any,
    /// One of the namespace's own addresses.
    Local(IpAddr),
    /// An address that is not the namespace's (IP_TRANSPARENT): the client's, when the data
    /// plane connects to a pod's application on the client's behalf.
    Transparent(IpAddr),
}

/// Starts a non-blocking connect from a fresh socket carrying `mark` (so the pod's redirect
/// rules let it through), from `source`.
pub fn start_connect(
    target: SocketAddr,
    source: Source,
    mark: u32,
) -> io::Result<std::net::TcpStream> {
    // Non-blocking from the start: two fcntl calls less per connection.
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_mark(mark)?;
    socket.set_nodelay(true)?;
    let bind = match source {
        Source::Any => None,
        Source::Local(ip) => Some(ip),
        Source::Transparent(ip) => {
            set_transparent(socket.as_raw_fd(), ip.is_ipv6())?;
            Some(ip)
        }
    };
    if let Some(ip) = bind {
        // Let connect pick the port, so binding the address does not reserve ports early.
        set_bind_address_no_port(socket.as_raw_fd())?;
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match socket.connect(&SockAddr::from(target)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(socket.into())
}

/// Waits for a connect started by [`start_connect`] and reports its outcome.
pub async fn finish_connect(stream: std::net::TcpStream) -> io::Result<monoio::net::TcpStream> {
    let stream = monoio::net::TcpStream::from_std(stream)?;
    connected(&stream).await?;
    Ok(stream)
}

/// Waits for the connect under way on `stream` to succeed or fail. A caller that gives up
/// waiting still holds the socket (and its port).
pub async fn connected(stream: &monoio::net::TcpStream) -> io::Result<()> {
    stream.writable(false).await?;
    match take_socket_error(stream.as_raw_fd())? {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

fn set_transparent(fd: RawFd, v6: bool) -> io::Result<()> {
    if v6 {
        setsockopt(fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, &1i32)
    } else {
        setsockopt(fd, libc::SOL_IP, libc::IP_TRANSPARENT, &1i32)
    }
}

/// Whether this process may open sockets from addresses that are not its own (IP_TRANSPARENT
/// needs CAP_NET_ADMIN or CAP_NET_RAW).
pub fn may_connect_transparently() -> io::Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    set_transparent(socket.as_raw_fd(), false)
}

fn set_bind_address_no_port(fd: RawFd) -> io::Result<()> {
    setsockopt(fd, libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT, &1i32)
}

fn take_socket_error(fd: RawFd) -> io::Result<i32> {
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR)
}

/// The destination a connection had before the redirect rules sent it to us.
pub fn original_dst(fd: RawFd, ipv6: bool) -> io::Result<SocketAddr> {
    if !ipv6 {
        let addr: libc::sockaddr_in = getsockopt(fd, libc::SOL_IP, libc::SO_ORIGINAL_DST)?;
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
            u16::from_be(addr.sin_port),
        )))
    } else {
        let addr: libc::sockaddr_in6 = getsockopt(fd, libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST)?;
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(addr.sin6_addr.s6_addr),
            u16::from_be(addr.sin6_port),
            0,
            0,
        )))
    }
}

/// Makes the next close send RST instead of FIN, to pass a reset on to the peer.
pub fn reset_on_close(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // Best effort: if it fails, the peer sees a FIN instead of a reset.
    let _ = setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger);
}

/// How long a tunnel may sit without a byte from its peer before the kernel probes it, how
/// often it probes, and how many unanswered probes end it: a peer node that vanished without a
/// FIN or RST frees the tunnel (and every stream on it) within about two minutes.
const KEEPALIVE_IDLE_S: i32 = 60;
const KEEPALIVE_INTERVAL_S: i32 = 20;
const KEEPALIVE_PROBES: i32 = 3;

/// Turns on TCP keepalive probes ([`KEEPALIVE_IDLE_S`]): for long-lived tunnels whose peer
/// may disappear while they are idle.
pub fn keep_alive(fd: RawFd) -> io::Result<()> {
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, &1i32)?;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, &KEEPALIVE_IDLE_S)?;
    setsockopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        &KEEPALIVE_INTERVAL_S,
    )?;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, &KEEPALIVE_PROBES)
}

/// C types a socket option is read into or written from: every bit pattern, zero included, is
/// a valid value, so a zeroed buffer the kernel fills in part is one.
trait SockoptValue: Copy {}
impl SockoptValue for i32 {}
impl SockoptValue for libc::linger {}
impl SockoptValue for libc::sockaddr_in {}
impl SockoptValue for libc::sockaddr_in6 {}

fn getsockopt<T: SockoptValue>(fd: RawFd, level: i32, name: i32) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes, the size of `value`.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            value.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zeroed, then (partly) written by the kernel; any bit pattern is a valid T.
    #[allow(unsafe_code)]
    Ok(unsafe { value.assume_init() })
}

fn setsockopt<T: SockoptValue>(fd: RawFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: a pointer to a live T and its exact size.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value as *const T as *const libc::c_void,
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Raises the soft open-files limit to the hard limit: every proxied connection holds two
/// sockets, and distributions default the soft limit to 1024.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a live rlimit struct.
    #[allow(unsafe_code)]
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// Waits up to `timeout` for `fd` to be readable (a listener: a connection to accept).
pub fn wait_readable(fd: RawFd, timeout: std::time::Duration) -> io::Result<bool> {
    wait_for(fd, libc::POLLIN, timeout)
}

/// Waits up to `timeout` for room to write on `fd` (a non-blocking socket that said EAGAIN).
pub fn wait_writable(fd: RawFd, timeout: std::time::Duration) -> io::Result<bool> {
    wait_for(fd, libc::POLLOUT, timeout)
}

fn wait_for(fd: RawFd, events: libc::c_short, timeout: std::time::Duration) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: poll on one live pollfd we own, with its exact count.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::poll(&mut pollfd, 1, millis) };
    match rc {
        n if n > 0 => Ok(true),
        0 => Ok(false),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::TcpStream;

    use super::*;

    /// In a new network namespace with loopback up (root only): two listeners of one
    /// SO_REUSEPORT group, `queued` connections made to them, then the first one closed:
    /// how many the second one accepts.
    fn accepted_after_closing_one_of_two(migrate: bool, queued: usize) -> usize {
        std::thread::spawn(move || {
            // SAFETY: unshare(CLONE_NEWNET) moves only this short-lived thread to a new
            // namespace; it touches no memory.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", io::Error::last_os_error());
            // A child started from this thread is in its namespace.
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .expect("ip");
            assert!(up.success(), "ip link set lo up");
            if migrate {
                migrate_queued_connections().expect("tcp_migrate_req");
            }
            let addr: SocketAddr = "127.0.0.1:15001".parse().expect("addr");
            let closing = reuseport_listener(addr).expect("first listener");
            let staying = reuseport_listener(addr).expect("second listener");
            let clients: Vec<TcpStream> = (0..queued)
                .map(|_| TcpStream::connect(addr).expect("connect"))
                .collect();
            drop(closing);
            let mut accepted = 0;
            while staying.accept().is_ok() {
                accepted += 1;
            }
            // The reset ones say so; none is left waiting.
            let reset = clients
                .into_iter()
                .filter(|mut c| {
                    c.set_nonblocking(true).expect("nonblocking");
                    matches!(c.read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::ConnectionReset)
                })
                .count();
            assert_eq!(accepted + reset, queued);
            accepted
        })
        .join()
        .expect("namespace thread")
    }

    #[test]
    fn accepted_connections_are_unbuffered_without_a_call_of_their_own() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        prepare_to_accept(&listener).expect("prepare");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let accepted = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("accept: {e}"),
            }
        };
        assert!(accepted.nodelay().expect("TCP_NODELAY"), "Nagle left on");
        assert!(
            !client.nodelay().expect("TCP_NODELAY"),
            "the client's own setting"
        );
    }

    #[test]
    fn connections_queued_on_a_closing_listener_move_to_the_other_one() {
        let queued = 64;
        assert_eq!(accepted_after_closing_one_of_two(true, queued), queued);
        // What it saves: without it, the closing listener's share is reset.
        assert!(accepted_after_closing_one_of_two(false, queued) < queued);
    }
}
