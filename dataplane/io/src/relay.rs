//! Moving bytes between an application's TCP connection and its peer (an HBONE stream or
//! another TCP connection), with half-close and reset carried across.
//!
//! - EOF on one side becomes a half-close on the other (END_STREAM, or shutdown(SHUT_WR)); the
//!   other direction keeps flowing until it ends too.
//! - An error or reset on one side resets the other: RST_STREAM(CANCEL) toward h2, and an RST
//!   (SO_LINGER 0, then close) toward TCP.
//!
//! One future per connection owns both sides and polls both directions, readiness-style (as
//! tokio's `copy_bidirectional` does): no split halves, no second task. Reads go through a
//! [`ReadSlot`], so a quiet connection holds no buffer. Between two TCP sockets ([`tcp_tcp`])
//! nothing is read at all: the kernel splices the bytes across, through a pipe held only
//! while they move.
//!
//! An outbound connection does not wait for its CONNECT to be answered before it sends: the
//! client's first bytes follow the request on the same tunnel ([`await_answer`]), so a new
//! connection's first exchange costs one round trip between the nodes, not two. The peer
//! holds them (HTTP/2 flow control) until it has authorized the stream and connected.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use h2::client::ResponseFuture;
use h2::{Reason, RecvStream, SendStream};
use monoio::io::{IntoCompIo, IntoPollIo};
use monoio::net::tcp::stream_poll::TcpStreamPoll;
use monoio::net::TcpStream;
use smallvec::SmallVec;
use tokio::io::AsyncWrite;

use crate::bufio::ReadSlot;
use crate::local::Trigger;
use crate::sockets::reset_on_close;
use crate::splice::{self, Pipe, Pipes};
use crate::stats::Counter;

/// Where a relay counts the bytes it moves, as it moves them.
#[derive(Clone, Copy)]
pub struct Meters<'a> {
    /// Bytes from the local TCP side to the peer.
    pub sent: Meter<'a>,
    /// Bytes from the peer to the local TCP side.
    pub received: Meter<'a>,
}

/// The counters one direction's bytes are added to: the worker's totals and the connection's
/// metric series.
#[derive(Clone, Copy)]
pub struct Meter<'a>(pub [&'a Counter; 2]);

impl Meter<'_> {
    #[inline]
    fn add(self, n: u64) {
        for counter in self.0 {
            counter.add(n);
        }
    }
}

/// Bytes moved each way by a finished relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// From the local TCP side to the peer.
    pub sent: u64,
    /// From the peer to the local TCP side.
    pub received: u64,
    /// Whether the relay ended in a reset rather than two clean closes.
    pub reset: bool,
}

/// How one direction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// EOF passed on as a half-close.
    Closed,
    /// The side we read from failed or was reset.
    SourceFailed,
    /// The side we write to failed or was reset.
    SinkFailed,
    /// No pipe could be had (descriptor limits): bytes were left unsent.
    NoPipe,
}

/// One TCP connection in poll mode, with its read slot.
pub struct TcpSide {
    io: TcpStreamPoll,
    fd: RawFd,
    slot: ReadSlot,
}

impl TcpSide {
    pub fn new(stream: TcpStream) -> io::Result<TcpSide> {
        let fd = stream.as_raw_fd();
        Ok(TcpSide {
            io: stream.into_poll_io()?,
            fd,
            slot: ReadSlot::default(),
        })
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        self.slot.poll_chunk(&mut self.io, cx)
    }

    /// Writes all of `chunk` (advancing it) or fails.
    fn poll_write_all(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        while !chunk.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, chunk) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => chunk.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    /// Back to a completion-mode stream, for [`tcp_tcp`], which splices rather than reads.
    /// Nothing is lost: the slot hands out every chunk it reads.
    pub fn into_stream(self) -> io::Result<TcpStream> {
        self.io.into_comp_io()
    }

    /// Writes all of `bytes` (a SOCKS5 reply, before relaying).
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut chunk = Bytes::copy_from_slice(bytes);
        poll_fn(|cx| self.poll_write_all(cx, &mut chunk)).await
    }
}

/// How many of the client's bytes may be sent before the CONNECT is answered: a first
/// request's worth. Past it the connection waits for the answer, so a refused stream wastes
/// little and what was sent can be kept for a replay.
const EARLY_LIMIT: usize = 64 * 1024;

/// The client's bytes sent on a stream before its CONNECT was answered, kept until the answer
/// so that a stream the peer never processed can be replayed on another tunnel.
#[derive(Default)]
pub struct Early {
    /// Inline: a connection's first bytes are usually one read, and this costs no allocation.
    chunks: SmallVec<[Bytes; 1]>,
    len: usize,
    /// The client half-closed (EOF) before the answer; END_STREAM went with the bytes.
    eof: bool,
}

impl Early {
    /// Sends the kept bytes (and END_STREAM after an EOF) on a new stream. h2 buffers them
    /// until the stream has window: at most [`EARLY_LIMIT`] plus one read.
    pub fn replay(&self, send: &mut SendStream<Bytes>) -> Result<(), h2::Error> {
        for chunk in &self.chunks {
            send.send_data(chunk.clone(), false)?;
        }
        if self.eof {
            send.send_data(Bytes::new(), true)?;
        }
        Ok(())
    }
}

/// Why a CONNECT got no answer.
#[derive(Debug)]
pub enum Unanswered {
    /// The stream or its tunnel failed.
    Stream(h2::Error),
    /// Reading the client failed (it reset) before the answer; the stream was reset.
    Client(io::Error),
}

/// Whether a stream failed without the peer having processed it (RFC 9113 section 8.7: it
/// refused the stream, or its GOAWAY's last stream id is below it), so that replaying it on
/// another tunnel cannot deliver the client's bytes twice. h2 hands a remote GOAWAY's error
/// only to streams above its last stream id; those at or below it end with an I/O error when
/// the connection closes (the GOAWAY tests below pin this down across h2 upgrades).
pub fn never_processed(error: &h2::Error) -> bool {
    (error.is_go_away() && error.is_remote()) || error.reason() == Some(Reason::REFUSED_STREAM)
}

/// Waits for the answer to a CONNECT just sent on `send`, meanwhile sending what the client
/// writes (up to [`EARLY_LIMIT`]) and keeping it in `early`.
pub async fn await_answer(
    tcp: &mut TcpSide,
    send: &mut SendStream<Bytes>,
    mut response: ResponseFuture,
    early: &mut Early,
) -> Result<http::Response<RecvStream>, Unanswered> {
    poll_fn(|cx| {
        if let Poll::Ready(answer) = Pin::new(&mut response).poll(cx) {
            return Poll::Ready(answer.map_err(Unanswered::Stream));
        }
        while !early.eof && early.len < EARLY_LIMIT {
            match tcp.poll_chunk(cx) {
                Poll::Pending => break,
                Poll::Ready(Ok(Some(chunk))) => {
                    early.len += chunk.len();
                    early.chunks.push(chunk.clone());
                    if let Err(e) = send.send_data(chunk, false) {
                        return Poll::Ready(Err(Unanswered::Stream(e)));
                    }
                }
                Poll::Ready(Ok(None)) => {
                    early.eof = true;
                    if let Err(e) = send.send_data(Bytes::new(), true) {
                        return Poll::Ready(Err(Unanswered::Stream(e)));
                    }
                }
                Poll::Ready(Err(e)) => {
                    send.send_reset(Reason::CANCEL);
                    return Poll::Ready(Err(Unanswered::Client(e)));
                }
            }
        }
        Poll::Pending
    })
    .await
}

/// A direction that reads a TCP side and writes somewhere else.
enum Upload {
    Reading,
    Sending(Bytes),
    Done(End),
}

/// A direction that writes a TCP side.
enum Download {
    Receiving,
    Writing { chunk: Bytes, window: usize },
    ShuttingDown,
    Done(End),
}

/// TCP -> h2: read a chunk, wait for stream window, send it.
fn poll_tcp_to_h2(
    state: &mut Upload,
    tcp: &mut TcpSide,
    send: &mut SendStream<Bytes>,
    count: &mut u64,
    meter: Meter<'_>,
    cx: &mut Context<'_>,
) -> Poll<End> {
    loop {
        match state {
            Upload::Done(end) => return Poll::Ready(*end),
            Upload::Reading => match tcp.poll_chunk(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(Some(chunk))) => *state = Upload::Sending(chunk),
                Poll::Ready(Ok(None)) => {
                    let end = match send.send_data(Bytes::new(), true) {
                        Ok(()) => End::Closed,
                        Err(_) => End::SinkFailed,
                    };
                    *state = Upload::Done(end);
                }
                Poll::Ready(Err(_)) => {
                    send.send_reset(Reason::CANCEL);
                    *state = Upload::Done(End::SourceFailed);
                }
            },
            Upload::Sending(chunk) => {
                send.reserve_capacity(chunk.len());
                match send.poll_capacity(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(0))) => {}
                    Poll::Ready(Some(Ok(granted))) => {
                        let part = chunk.split_to(granted.min(chunk.len()));
                        let n = part.len() as u64;
                        if send.send_data(part, false).is_err() {
                            *state = Upload::Done(End::SinkFailed);
                        } else {
                            *count += n;
                            meter.add(n);
                            if chunk.is_empty() {
                                *state = Upload::Reading;
                            }
                        }
                    }
                    Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                        *state = Upload::Done(End::SinkFailed)
                    }
                }
            }
        }
    }
}

/// h2 -> TCP: receive a chunk, write it, then give its window back (so a slow reader holds
/// the sender back instead of growing our memory).
fn poll_h2_to_tcp(
    state: &mut Download,
    recv: &mut RecvStream,
    tcp: &mut TcpSide,
    count: &mut u64,
    meter: Meter<'_>,
    cx: &mut Context<'_>,
) -> Poll<End> {
    loop {
        match state {
            Download::Done(end) => return Poll::Ready(*end),
            Download::Receiving => match recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    let window = chunk.len();
                    *state = Download::Writing { chunk, window };
                }
                Poll::Ready(None) => *state = Download::ShuttingDown,
                Poll::Ready(Some(Err(_))) => *state = Download::Done(End::SourceFailed),
            },
            Download::Writing { chunk, window } => match tcp.poll_write_all(cx, chunk) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {
                    *count += *window as u64;
                    meter.add(*window as u64);
                    let _ = recv.flow_control().release_capacity(*window);
                    *state = Download::Receiving;
                }
                Poll::Ready(Err(_)) => *state = Download::Done(End::SinkFailed),
            },
            Download::ShuttingDown => match tcp.poll_shutdown(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(_) => *state = Download::Done(End::Closed),
            },
        }
    }
}

/// What to do once the directions have ended (or one of them failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Verdict {
    finished: bool,
    reset: bool,
}

/// Both directions ended cleanly: finished. A direction failed: finished now, as a reset.
fn verdict(up: Poll<End>, down: Poll<End>) -> Verdict {
    match (up, down) {
        (Poll::Ready(End::Closed), Poll::Ready(End::Closed)) => Verdict {
            finished: true,
            reset: false,
        },
        (Poll::Ready(End::SourceFailed | End::SinkFailed | End::NoPipe), _)
        | (_, Poll::Ready(End::SourceFailed | End::SinkFailed | End::NoPipe)) => Verdict {
            finished: true,
            reset: true,
        },
        _ => Verdict {
            finished: false,
            reset: false,
        },
    }
}

/// Relays between a local TCP connection and an HBONE stream until both directions end, or
/// until `stop` fires (both sides are then reset). `early` is what the client sent before the
/// stream was answered ([`await_answer`]); the relay goes on from there.
pub fn tcp_h2<'a>(
    tcp: TcpSide,
    send: SendStream<Bytes>,
    recv: RecvStream,
    early: Early,
    meters: Meters<'a>,
    stop: &'a Trigger,
) -> TcpH2<'a> {
    let sent = early.len as u64;
    meters.sent.add(sent);
    TcpH2 {
        tcp,
        send,
        recv,
        up: if early.eof {
            Upload::Done(End::Closed)
        } else {
            Upload::Reading
        },
        down: Download::Receiving,
        tally: Tally {
            sent,
            received: 0,
            meters,
            stop,
        },
    }
}

/// The relay future of [`tcp_h2`]. A plain struct rather than an `async fn`: it is resident
/// in every open connection's task, and a compiler-built future would keep a second copy of
/// its arguments. The TCP side closes (with a reset if one is due) when the future is dropped.
pub struct TcpH2<'a> {
    tcp: TcpSide,
    send: SendStream<Bytes>,
    recv: RecvStream,
    up: Upload,
    down: Download,
    tally: Tally<'a>,
}

/// What a relay counts and watches besides its sockets and directions.
struct Tally<'a> {
    sent: u64,
    received: u64,
    meters: Meters<'a>,
    stop: &'a Trigger,
}

/// Where a relay's poll stands: stopped (`stop` fired), still flowing, or finished with how
/// each direction ended.
enum Pair {
    Stopped,
    Flowing,
    Finished {
        up: Poll<End>,
        down: Poll<End>,
        reset: bool,
    },
}

impl<'a> Tally<'a> {
    /// Polls both directions with `directions` (given the byte counts and meters, upload
    /// first), unless `stop` has fired.
    fn poll_pair(
        &mut self,
        cx: &mut Context<'_>,
        directions: impl FnOnce(
            &mut u64,
            &mut u64,
            Meters<'a>,
            &mut Context<'_>,
        ) -> (Poll<End>, Poll<End>),
    ) -> Pair {
        if self.stop.poll_fired(cx).is_ready() {
            return Pair::Stopped;
        }
        let (up, down) = directions(&mut self.sent, &mut self.received, self.meters, cx);
        let verdict = verdict(up, down);
        if verdict.finished {
            Pair::Finished {
                up,
                down,
                reset: verdict.reset,
            }
        } else {
            Pair::Flowing
        }
    }

    fn totals(&self, reset: bool) -> Totals {
        Totals {
            sent: self.sent,
            received: self.received,
            reset,
        }
    }
}

impl Future for TcpH2<'_> {
    type Output = Totals;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Totals> {
        let TcpH2 {
            tcp,
            send,
            recv,
            up,
            down,
            tally,
        } = self.get_mut();
        let pair = tally.poll_pair(cx, |sent, received, meters, cx| {
            let mut u = poll_tcp_to_h2(up, tcp, send, sent, meters.sent, cx);
            let d = poll_h2_to_tcp(down, recv, tcp, received, meters.received, cx);
            // Once the download has ended, nothing else hears of the peer resetting the
            // stream (or its tunnel ending) while the local side sends nothing.
            if u.is_pending() && d.is_ready() && send.poll_reset(cx).is_ready() {
                *up = Upload::Done(End::SinkFailed);
                u = Poll::Ready(End::SinkFailed);
            }
            (u, d)
        });
        match pair {
            Pair::Flowing => Poll::Pending,
            Pair::Stopped => {
                send.send_reset(Reason::CANCEL);
                reset_on_close(tcp.fd);
                Poll::Ready(tally.totals(true))
            }
            Pair::Finished { up, down, reset } => {
                // Who has to be told: a failed h2 side (SinkFailed up, SourceFailed down)
                // resets the TCP side; a failed TCP side resets the stream (explicitly, or by
                // dropping its handles).
                let reset_tcp = matches!(up, Poll::Ready(End::SinkFailed))
                    || matches!(down, Poll::Ready(End::SourceFailed));
                if reset && !reset_tcp {
                    send.send_reset(Reason::CANCEL);
                }
                if reset_tcp {
                    reset_on_close(tcp.fd);
                }
                Poll::Ready(tally.totals(reset))
            }
        }
    }
}

/// Relays between two TCP connections (passthrough and plaintext inbound), until both
/// directions end or `stop` fires (both sides are then reset). The bytes stay in the kernel
/// ([`crate::splice`]); a direction waits for readiness only when a splice would block.
///
/// Not an `async fn`, which would keep both sockets twice for as long as they are open.
#[allow(clippy::manual_async_fn)]
pub fn tcp_tcp<'a>(
    local: TcpStream,
    remote: TcpStream,
    pipes: &'a Pipes,
    meters: Meters<'a>,
    stop: &'a Trigger,
) -> impl Future<Output = Totals> + 'a {
    async move {
        let (sent, received) = (Cell::new(0), Cell::new(0));
        for side in [&local, &remote] {
            if splice::set_nonblocking(side.as_raw_fd()).is_err() {
                reset_on_close(local.as_raw_fd());
                reset_on_close(remote.as_raw_fd());
                return Totals {
                    reset: true,
                    ..Totals::default()
                };
            }
        }
        let ended = {
            let mut up = pin!(forward(&local, &remote, pipes, &sent, meters.sent));
            let mut down = pin!(forward(&remote, &local, pipes, &received, meters.received));
            let (mut u, mut d) = (Poll::Pending, Poll::Pending);
            poll_fn(|cx| {
                if stop.poll_fired(cx).is_ready() {
                    return Poll::Ready(None);
                }
                if u.is_pending() {
                    u = up.as_mut().poll(cx);
                }
                if d.is_pending() {
                    d = down.as_mut().poll(cx);
                }
                let verdict = verdict(u, d);
                if verdict.finished {
                    Poll::Ready(Some((u, d, verdict.reset)))
                } else {
                    Poll::Pending
                }
            })
            .await
        };
        let totals = |reset| Totals {
            sent: sent.get(),
            received: received.get(),
            reset,
        };
        let Some((up, down, reset)) = ended else {
            reset_on_close(local.as_raw_fd());
            reset_on_close(remote.as_raw_fd());
            return totals(true);
        };
        // A failed read resets the other side; a failed write resets the side it came from;
        // no pipe resets both (bytes were left unsent).
        let failed =
            |end: Poll<End>, which: &[End]| matches!(end, Poll::Ready(e) if which.contains(&e));
        if failed(up, &[End::SinkFailed, End::NoPipe])
            || failed(down, &[End::SourceFailed, End::NoPipe])
        {
            reset_on_close(local.as_raw_fd());
        }
        if failed(up, &[End::SourceFailed, End::NoPipe])
            || failed(down, &[End::SinkFailed, End::NoPipe])
        {
            reset_on_close(remote.as_raw_fd());
        }
        totals(reset)
    }
}

/// One direction of [`tcp_tcp`]: once `src` is readable, splice what it has into a pipe and
/// the pipe into `dst`, until it has nothing more; until EOF (passed on as a shutdown) or a
/// failure. Not an `async fn`, which would keep its arguments twice.
#[allow(clippy::manual_async_fn)]
fn forward<'a>(
    src: &'a TcpStream,
    dst: &'a TcpStream,
    pipes: &'a Pipes,
    moved: &'a Cell<u64>,
    meter: Meter<'a>,
) -> impl Future<Output = End> + 'a {
    async move {
        let (from, to) = (src.as_raw_fd(), dst.as_raw_fd());
        loop {
            if src.readable(false).await.is_err() {
                return End::SourceFailed;
            }
            let Ok(pipe) = pipes.take() else {
                return End::NoPipe;
            };
            let mut share = FairShare::default();
            loop {
                match splice::fill(from, &pipe, splice::PIPE_BYTES) {
                    Ok(0) => {
                        pipes.give(pipe);
                        // SAFETY: shutdown on a socket this relay owns.
                        #[allow(unsafe_code)]
                        unsafe {
                            libc::shutdown(to, libc::SHUT_WR);
                        }
                        return End::Closed;
                    }
                    Ok(filled) => {
                        if let Err(end) = empty_into(&pipe, filled, dst, moved, meter).await {
                            // The pipe may still hold bytes: it is closed, not reused.
                            return end;
                        }
                        if share.spent(filled) {
                            yield_to_others().await;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        pipes.give(pipe);
                        return End::SourceFailed;
                    }
                }
            }
            pipes.give(pipe);
        }
    }
}

/// How much one direction moves without waiting before the worker's other connections get
/// their turn. A sender and receiver as fast as the splices never make a direction wait, and
/// monoio has no budget of its own: without this, one bulk flow would hold its worker.
const FAIR_SHARE_BYTES: usize = 1024 * 1024;

/// Bytes moved since a direction last waited or yielded.
#[derive(Default)]
struct FairShare(usize);

impl FairShare {
    /// Counts `n` more bytes; true when the direction should yield now (and starts again).
    fn spent(&mut self, n: usize) -> bool {
        self.0 += n;
        if self.0 >= FAIR_SHARE_BYTES {
            self.0 = 0;
            true
        } else {
            false
        }
    }
}

/// Lets the worker's other queued tasks run before this one goes on, and its I/O
/// completions be reaped within a round or two. A task that wakes itself is run again first
/// by monoio, so the wake comes from a task queued behind the others.
async fn yield_to_others() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            let waker = cx.waker().clone();
            drop(monoio::spawn(async move { waker.wake() }));
            Poll::Pending
        }
    })
    .await
}

/// Writes the `filled` bytes in `pipe` to `dst`, counting them as they go.
async fn empty_into(
    pipe: &Pipe,
    mut filled: usize,
    dst: &TcpStream,
    moved: &Cell<u64>,
    meter: Meter<'_>,
) -> Result<(), End> {
    while filled > 0 {
        match splice::drain(pipe, dst.as_raw_fd(), filled) {
            Ok(0) => return Err(End::SinkFailed),
            Ok(n) => {
                filled -= n;
                moved.set(moved.get() + n as u64);
                meter.add(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if dst.writable(false).await.is_err() {
                    return Err(End::SinkFailed);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(End::SinkFailed),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use http::{Request, Response, StatusCode};
    use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
    use monoio::net::TcpListener;

    use std::sync::Arc;

    use super::*;
    use crate::runtime::{self, DriverChoice};
    use crate::stats::WorkerStats;

    fn block_on<F: Future>(future: F) -> F::Output {
        let driver = runtime::resolve(DriverChoice::Auto).expect("a driver");
        runtime::block_on(driver, || future).expect("runtime")
    }

    fn listener() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        (listener, addr)
    }

    /// A tunnel peer (plain HTTP/2 on loopback) that hands each request, with its body read to
    /// the end, to `answer`, which responds or resets.
    async fn tunnel_peer(
        answer: impl Fn(usize, Vec<u8>, h2::server::SendResponse<Bytes>) + 'static,
    ) -> SocketAddr {
        let (listener, addr) = listener();
        monoio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let io = stream.into_poll_io().expect("poll io");
            let mut conn = h2::server::handshake(io).await.expect("h2 server");
            let answer = std::rc::Rc::new(answer);
            let mut n = 0;
            while let Some(Ok((request, respond))) = conn.accept().await {
                let answer = answer.clone();
                n += 1;
                let index = n;
                monoio::spawn(async move {
                    let mut body = request.into_body();
                    let mut got = Vec::new();
                    while let Some(Ok(chunk)) = body.data().await {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        got.extend_from_slice(&chunk);
                    }
                    answer(index, got, respond);
                });
            }
        });
        addr
    }

    async fn tunnel(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
        let io = TcpStream::connect(addr)
            .await
            .expect("connect")
            .into_poll_io()
            .expect("poll io");
        let (sender, conn) = h2::client::handshake(io).await.expect("h2 client");
        monoio::spawn(async move {
            let _ = conn.await;
        });
        sender
    }

    /// An application connection that has written `bytes` and half-closed; returns the
    /// application's end and the data plane's end (as the relay holds it).
    async fn app_that_sent(bytes: &'static [u8]) -> (TcpStream, TcpSide) {
        let (listener, addr) = listener();
        let mut app = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        app.write_all(bytes).await.0.expect("write");
        app.shutdown().await.expect("half-close");
        (app, TcpSide::new(accepted).expect("poll io"))
    }

    /// The peers in these tests answer only once they have the client's bytes: a client
    /// that held them back until the answer would wait forever.
    async fn within_10s<T>(answer: impl Future<Output = T>) -> T {
        monoio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("answered while the client's bytes were held back")
    }

    fn connect() -> Request<()> {
        Request::connect("10.0.0.2:80").body(()).expect("request")
    }

    async fn read_to_end(app: &mut TcpStream) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let (n, buf) = app.read(Vec::with_capacity(1024)).await;
            match n.expect("read") {
                0 => return all,
                _ => all.extend_from_slice(&buf),
            }
        }
    }

    #[test]
    fn the_clients_first_bytes_travel_before_the_connect_is_answered() {
        block_on(async {
            let peer = tunnel_peer(|_, body, mut respond| {
                assert_eq!(body, b"hello");
                let mut send = respond
                    .send_response(Response::new(()), false)
                    .expect("answer");
                send.send_data(Bytes::from_static(b"world"), true)
                    .expect("data");
            })
            .await;
            let mut sender = tunnel(peer).await.ready().await.expect("ready");
            let (mut app, mut tcp) = app_that_sent(b"hello").await;
            let (response, mut send) = sender.send_request(connect(), false).expect("send");
            let mut early = Early::default();
            let answer = within_10s(await_answer(&mut tcp, &mut send, response, &mut early))
                .await
                .expect("answered");
            assert_eq!(answer.status(), StatusCode::OK);
            let counted = Counted::default();
            let meters = counted.meters();
            let never = Trigger::default();
            let moved = tcp_h2(tcp, send, answer.into_body(), early, meters, &never).await;
            assert_eq!(read_to_end(&mut app).await, b"world");
            assert_eq!(
                moved,
                Totals {
                    sent: 5,
                    received: 5,
                    reset: false
                }
            );
            assert_eq!(counted.sent.get(), 5, "early bytes are counted as sent");
            assert_eq!(counted.received.get(), 5);
        });
    }

    #[test]
    fn a_refused_stream_replays_its_early_bytes_and_other_failures_do_not_count_as_unprocessed() {
        block_on(async {
            // First stream refused (RFC 9113: not processed), the replay answered with what
            // it received, a third stream cancelled (processed or not: unknown).
            let peer = tunnel_peer(|index, body, mut respond| match index {
                1 => respond.send_reset(Reason::REFUSED_STREAM),
                2 => {
                    let mut send = respond
                        .send_response(Response::new(()), false)
                        .expect("answer");
                    send.send_data(Bytes::from(body), true).expect("echo");
                }
                _ => respond.send_reset(Reason::CANCEL),
            })
            .await;
            let mut sender = tunnel(peer).await;
            let (_app, mut tcp) = app_that_sent(b"first bytes").await;
            let mut early = Early::default();

            sender = sender.ready().await.expect("ready");
            let (response, mut send) = sender.send_request(connect(), false).expect("send");
            let refused = within_10s(await_answer(&mut tcp, &mut send, response, &mut early)).await;
            let Err(Unanswered::Stream(error)) = refused else {
                panic!("the first stream was refused: {refused:?}");
            };
            assert!(never_processed(&error), "{error}");

            sender = sender.ready().await.expect("ready");
            let (response, mut send) = sender.send_request(connect(), false).expect("send");
            early.replay(&mut send).expect("replay");
            let answer = within_10s(await_answer(&mut tcp, &mut send, response, &mut early))
                .await
                .expect("the replay is answered");
            let mut body = answer.into_body();
            let echoed = body.data().await.expect("echo").expect("echo");
            assert_eq!(
                &echoed[..],
                b"first bytes",
                "the peer got the bytes once, whole"
            );

            sender = sender.ready().await.expect("ready");
            let (response, _send) = sender.send_request(connect(), true).expect("send");
            let cancelled = response.await.expect_err("cancelled");
            assert!(!never_processed(&cancelled), "{cancelled}");
        });
    }

    #[test]
    fn a_stream_the_peer_read_before_an_abrupt_shutdown_does_not_count_as_unprocessed() {
        block_on(async {
            // The peer reads the stream's bytes, then sends GOAWAY(last id = that stream,
            // INTERNAL_ERROR) and closes: replaying would deliver the bytes twice.
            let (listener, addr) = listener();
            let received = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
            let peer_received = received.clone();
            monoio::spawn(async move {
                let (stream, _) = listener.accept().await.expect("accept");
                let io = stream.into_poll_io().expect("poll io");
                let mut conn = h2::server::handshake(io).await.expect("h2 server");
                let (request, _respond) = conn.accept().await.expect("a stream").expect("h2");
                let mut body = request.into_body();
                let mut read_body = pin!(async move {
                    while let Some(Ok(chunk)) = body.data().await {
                        peer_received.borrow_mut().extend_from_slice(&chunk);
                    }
                });
                // The body arrives only while the connection is driven.
                poll_fn(|cx| {
                    let _ = conn.poll_closed(cx);
                    read_body.as_mut().poll(cx)
                })
                .await;
                conn.abrupt_shutdown(Reason::INTERNAL_ERROR);
                let _ = poll_fn(|cx| conn.poll_closed(cx)).await;
            });
            let mut sender = tunnel(addr).await.ready().await.expect("ready");
            let (_app, mut tcp) = app_that_sent(b"first bytes").await;
            let mut early = Early::default();
            let (response, mut send) = sender.send_request(connect(), false).expect("send");
            let cut = within_10s(await_answer(&mut tcp, &mut send, response, &mut early)).await;
            let Err(Unanswered::Stream(error)) = cut else {
                panic!("the peer shut down without answering: {cut:?}");
            };
            assert_eq!(
                &received.borrow()[..],
                b"first bytes",
                "the peer had the bytes"
            );
            assert!(!never_processed(&error), "{error:?}");
        });
    }

    /// An HTTP/2 frame: 9-byte header (RFC 9113 section 4.1) and payload.
    fn raw_frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut frame = vec![len[1], len[2], len[3], kind, 0];
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// A peer that reads until it has the HEADERS of streams 1 and 3, answers
    /// GOAWAY(last stream id 1, `reason`) and closes: stream 1 it may have processed,
    /// stream 3 it did not.
    async fn peer_going_away_after_stream_1(reason: Reason) -> SocketAddr {
        const PREFACE: usize = 24;
        const HEADERS: u8 = 0x1;
        const SETTINGS: u8 = 0x4;
        const GOAWAY: u8 = 0x7;
        let (listener, addr) = listener();
        monoio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut bytes = Vec::new();
            let saw_stream_3 = |bytes: &[u8]| {
                let mut at = PREFACE;
                while let Some(header) = bytes.get(at..at + 9) {
                    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]);
                    let id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
                    if header[3] == HEADERS && id & 0x7fff_ffff == 3 {
                        return true;
                    }
                    at += 9 + len as usize;
                }
                false
            };
            while !saw_stream_3(&bytes) {
                let (read, chunk) = stream.read(Vec::with_capacity(4096)).await;
                assert_ne!(read.expect("read"), 0, "the client closed before stream 3");
                bytes.extend_from_slice(&chunk);
            }
            let mut go_away = 1u32.to_be_bytes().to_vec();
            go_away.extend_from_slice(&u32::from(reason).to_be_bytes());
            let mut answer = raw_frame(SETTINGS, 0, &[]);
            answer.extend(raw_frame(GOAWAY, 0, &go_away));
            stream.write_all(answer).await.0.expect("write");
        });
        addr
    }

    #[test]
    fn after_a_goaway_only_streams_above_its_last_id_count_as_unprocessed() {
        for reason in [Reason::NO_ERROR, Reason::INTERNAL_ERROR] {
            block_on(async move {
                let peer = peer_going_away_after_stream_1(reason).await;
                let mut sender = tunnel(peer).await.ready().await.expect("ready");
                let (_app, mut tcp) = app_that_sent(b"first bytes").await;
                let mut early = Early::default();
                let (first, mut send) = sender.send_request(connect(), false).expect("send");
                early.replay(&mut send).expect("bytes on stream 1");
                let mut sender = sender.ready().await.expect("ready");
                let (third, _send) = sender.send_request(connect(), false).expect("send");

                let cut = within_10s(await_answer(&mut tcp, &mut send, first, &mut early)).await;
                let Err(Unanswered::Stream(at_last_id)) = cut else {
                    panic!("the peer went away without answering: {cut:?}");
                };
                assert!(!never_processed(&at_last_id), "{reason:?}: {at_last_id:?}");
                let above_last_id = within_10s(third).await.expect_err("went away");
                assert!(
                    never_processed(&above_last_id),
                    "{reason:?}: {above_last_id:?}"
                );
            });
        }
    }

    /// A connection's byte counters and its worker's total, as a relay meters them.
    #[derive(Default)]
    struct Counted {
        sent: Counter,
        received: Counter,
        worker: Counter,
    }

    impl Counted {
        fn meters(&self) -> Meters<'_> {
            Meters {
                sent: Meter([&self.sent, &self.worker]),
                received: Meter([&self.received, &self.worker]),
            }
        }
    }

    /// A connected pair on loopback: (the connecting end, the accepted end).
    async fn pair() -> (TcpStream, TcpStream) {
        let (listener, addr) = listener();
        let connecting = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        (connecting, accepted)
    }

    /// The four sockets of a TCP relay: the client, the data plane's end of it (`local`),
    /// the data plane's end toward the server (`remote`), and the server.
    async fn relayed() -> [TcpStream; 4] {
        let (client, local) = pair().await;
        let (remote, server) = pair().await;
        [client, local, remote, server]
    }

    /// A worker's counters and its spare pipes.
    fn worker_pipes() -> (Arc<WorkerStats>, Pipes) {
        let stats = Arc::new(WorkerStats::default());
        (stats.clone(), Pipes::new(stats))
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    async fn send_and_close<W: AsyncWriteRent>(mut to: W, bytes: Vec<u8>) {
        let (written, _) = to.write_all(bytes).await;
        written.expect("write");
        to.shutdown().await.expect("half-close");
    }

    async fn receive_all<R: AsyncReadRent>(mut from: R) -> io::Result<Vec<u8>> {
        let mut all = Vec::new();
        loop {
            let (n, buf) = from.read(Vec::with_capacity(64 * 1024)).await;
            match n? {
                0 => return Ok(all),
                _ => all.extend_from_slice(&buf),
            }
        }
    }

    /// Every driver this kernel has: the plain TCP relay waits on readiness, which each
    /// driver provides its own way.
    fn on_each_driver(test: impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()>>>) {
        for choice in [DriverChoice::Auto, DriverChoice::Epoll] {
            let driver = runtime::resolve(choice).expect("a driver");
            runtime::block_on(driver, || async {
                monoio::time::timeout(Duration::from_secs(20), test())
                    .await
                    .expect("finished within 20 s");
            })
            .expect("runtime");
        }
    }

    #[test]
    fn the_tcp_relay_moves_both_ways_intact_carries_half_close_and_returns_its_pipes() {
        on_each_driver(|| {
            Box::pin(async {
                let (stats, pipes) = worker_pipes();
                let [client, local, remote, server] = relayed().await;
                let (to_server, to_client) = (pattern(3 << 20, 1), pattern(5 << 20, 2));
                let (c_read, c_write) = client.into_split();
                let (s_read, s_write) = server.into_split();
                let counted = Counted::default();
                let meters = counted.meters();
                let never = Trigger::default();
                // The server answers only after the client's FIN has reached it: the other
                // direction stays open after a half-close.
                let server = async {
                    let got = receive_all(s_read).await.expect("server reads");
                    send_and_close(s_write, to_client.clone()).await;
                    got
                };
                let client = async {
                    send_and_close(c_write, to_server.clone()).await;
                    receive_all(c_read).await.expect("client reads")
                };
                let (totals, got_by_server, got_by_client) = monoio::join!(
                    tcp_tcp(local, remote, &pipes, meters, &never),
                    server,
                    client
                );
                assert!(
                    got_by_server == to_server,
                    "the server got the client's bytes"
                );
                assert!(
                    got_by_client == to_client,
                    "the client got the server's bytes"
                );
                assert_eq!(
                    totals,
                    Totals {
                        sent: 3 << 20,
                        received: 5 << 20,
                        reset: false
                    }
                );
                assert_eq!(
                    (counted.sent.get(), counted.received.get()),
                    (3 << 20, 5 << 20)
                );
                assert_eq!(counted.worker.get(), 8 << 20);
                assert!(pipes.spare() >= 1, "the pipes came back for reuse");
                assert_eq!(
                    stats.pipes_open.get(),
                    pipes.spare() as u64,
                    "every pipe opened is spare again, none left held"
                );
                assert_eq!(stats.pipe_failures.get(), 0);
            })
        });
    }

    #[test]
    fn an_idle_tcp_relay_holds_no_pipe_and_a_stop_resets_both_sides() {
        on_each_driver(|| {
            Box::pin(async {
                let (stats, pipes) = worker_pipes();
                let [client, local, remote, server] = relayed().await;
                let stop = Trigger::default();
                let counted = Counted::default();
                let meters = counted.meters();
                let watch = async {
                    monoio::time::sleep(Duration::from_millis(100)).await;
                    let open = stats.pipes_open.get();
                    stop.fire();
                    open
                };
                let (totals, open_while_idle) =
                    monoio::join!(tcp_tcp(local, remote, &pipes, meters, &stop), watch);
                assert_eq!(open_while_idle, 0, "an idle relay holds no pipe");
                assert!(totals.reset);
                for (side, end) in [("client", client), ("server", server)] {
                    let error = receive_all(end)
                        .await
                        .expect_err("a reset, not a clean EOF");
                    assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{side}");
                }
            })
        });
    }

    #[test]
    fn a_reset_on_one_side_of_the_tcp_relay_resets_the_other() {
        on_each_driver(|| {
            Box::pin(async {
                let (_, pipes) = worker_pipes();
                let [mut client, local, remote, mut server] = relayed().await;
                let counted = Counted::default();
                let meters = counted.meters();
                let never = Trigger::default();
                let server_resets = async {
                    let (n, _) = server.read(vec![0u8; 5]).await;
                    assert_eq!(n.expect("the client's bytes"), 5);
                    reset_on_close(server.as_raw_fd());
                    drop(server);
                };
                let (written, _) = client.write_all(b"hello".to_vec()).await;
                written.expect("write");
                let (totals, ()) = monoio::join!(
                    tcp_tcp(local, remote, &pipes, meters, &never),
                    server_resets
                );
                assert!(totals.reset);
                assert_eq!(totals.sent, 5);
                let error = receive_all(client)
                    .await
                    .expect_err("a reset, not a clean EOF");
                assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
            })
        });
    }

    #[test]
    fn a_direction_yields_after_each_fair_share_it_moves_without_waiting() {
        let mut share = FairShare::default();
        let chunk = splice::PIPE_BYTES;
        let yields: Vec<bool> = (0..8).map(|_| share.spent(chunk)).collect();
        let every = FAIR_SHARE_BYTES / chunk;
        assert!(every >= 1);
        for (i, yielded) in yields.iter().enumerate() {
            assert_eq!(*yielded, (i + 1) % every == 0, "after {} chunks", i + 1);
        }
        // Small reads add up to a share too.
        let mut share = FairShare::default();
        assert_eq!(
            (0..FAIR_SHARE_BYTES / 1000 + 1)
                .filter(|_| share.spent(1000))
                .count(),
            1
        );
    }

    #[test]
    fn yielding_lets_the_other_tasks_of_the_worker_run_first() {
        on_each_driver(|| {
            Box::pin(async {
                // In a task of its own, as every connection's relay runs.
                let seen = monoio::spawn(async {
                    let ran = std::rc::Rc::new(Cell::new(false));
                    let other = ran.clone();
                    monoio::spawn(async move { other.set(true) });
                    assert!(!ran.get(), "spawned, not yet run");
                    yield_to_others().await;
                    ran.get()
                })
                .await;
                assert!(seen, "the other task ran while this one yielded");
            })
        });
    }

    #[test]
    fn a_relay_finishes_on_two_clean_closes_or_on_the_first_failure() {
        let closed = Poll::Ready(End::Closed);
        let pending = Poll::Pending;
        assert!(
            !verdict(closed, pending).finished,
            "the other way still flows"
        );
        assert!(!verdict(pending, closed).finished);
        assert_eq!(
            verdict(closed, closed),
            Verdict {
                finished: true,
                reset: false
            }
        );
        for failure in [End::SourceFailed, End::SinkFailed, End::NoPipe] {
            let failed = Poll::Ready(failure);
            for other in [pending, closed] {
                assert_eq!(
                    verdict(failed, other),
                    Verdict {
                        finished: true,
                        reset: true
                    }
                );
                assert_eq!(
                    verdict(other, failed),
                    Verdict {
                        finished: true,
                        reset: true
                    }
                );
            }
        }
    }
}
