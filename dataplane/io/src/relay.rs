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
//! [`ReadSlot`], so a quiet connection holds no buffer.
//!
//! An outbound connection does not wait for its CONNECT to be answered before it sends: the
//! client's first bytes follow the request on the same tunnel ([`await_answer`]), so a new
//! connection's first exchange costs one round trip between the nodes, not two. The peer
//! holds them (HTTP/2 flow control) until it has authorized the stream and connected.

use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use h2::client::ResponseFuture;
use h2::{Reason, RecvStream, SendStream};
use monoio::io::IntoPollIo;
use monoio::net::tcp::stream_poll::TcpStreamPoll;
use monoio::net::TcpStream;
use smallvec::SmallVec;
use tokio::io::AsyncWrite;

use crate::bufio::ReadSlot;
use crate::local::Trigger;
use crate::sockets::reset_on_close;
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
/// another tunnel cannot deliver the client's bytes twice.
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

/// TCP -> TCP: read a chunk, write it, pass EOF on as a shutdown.
fn poll_tcp_to_tcp(
    state: &mut Download,
    src: &mut TcpSide,
    dst: &mut TcpSide,
    count: &mut u64,
    meter: Meter<'_>,
    cx: &mut Context<'_>,
) -> Poll<End> {
    loop {
        match state {
            Download::Done(end) => return Poll::Ready(*end),
            Download::Receiving => match src.poll_chunk(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(Some(chunk))) => {
                    let window = chunk.len();
                    *state = Download::Writing { chunk, window };
                }
                Poll::Ready(Ok(None)) => *state = Download::ShuttingDown,
                Poll::Ready(Err(_)) => *state = Download::Done(End::SourceFailed),
            },
            Download::Writing { chunk, window } => match dst.poll_write_all(cx, chunk) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {
                    *count += *window as u64;
                    meter.add(*window as u64);
                    *state = Download::Receiving;
                }
                Poll::Ready(Err(_)) => *state = Download::Done(End::SinkFailed),
            },
            Download::ShuttingDown => match dst.poll_shutdown(cx) {
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
        (Poll::Ready(End::SourceFailed | End::SinkFailed), _)
        | (_, Poll::Ready(End::SourceFailed | End::SinkFailed)) => Verdict {
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
            let u = poll_tcp_to_h2(up, tcp, send, sent, meters.sent, cx);
            let d = poll_h2_to_tcp(down, recv, tcp, received, meters.received, cx);
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
/// directions end or `stop` fires (both sides are then reset).
pub fn tcp_tcp<'a>(
    local: TcpSide,
    remote: TcpSide,
    meters: Meters<'a>,
    stop: &'a Trigger,
) -> TcpTcp<'a> {
    TcpTcp {
        local,
        remote,
        up: Download::Receiving,
        down: Download::Receiving,
        tally: Tally {
            sent: 0,
            received: 0,
            meters,
            stop,
        },
    }
}

/// The relay future of [`tcp_tcp`], a plain struct for the same reason as [`TcpH2`].
pub struct TcpTcp<'a> {
    local: TcpSide,
    remote: TcpSide,
    up: Download,
    down: Download,
    tally: Tally<'a>,
}

impl Future for TcpTcp<'_> {
    type Output = Totals;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Totals> {
        let TcpTcp {
            local,
            remote,
            up,
            down,
            tally,
        } = self.get_mut();
        let pair = tally.poll_pair(cx, |sent, received, meters, cx| {
            let u = poll_tcp_to_tcp(up, local, remote, sent, meters.sent, cx);
            let d = poll_tcp_to_tcp(down, remote, local, received, meters.received, cx);
            (u, d)
        });
        match pair {
            Pair::Flowing => Poll::Pending,
            Pair::Stopped => {
                reset_on_close(local.fd);
                reset_on_close(remote.fd);
                Poll::Ready(tally.totals(true))
            }
            Pair::Finished { up, down, reset } => {
                // A failed read resets the other side; a failed write resets the side it came
                // from.
                let failed =
                    |end: Poll<End>, which: End| matches!(end, Poll::Ready(e) if e == which);
                if failed(up, End::SinkFailed) || failed(down, End::SourceFailed) {
                    reset_on_close(local.fd);
                }
                if failed(up, End::SourceFailed) || failed(down, End::SinkFailed) {
                    reset_on_close(remote.fd);
                }
                Poll::Ready(tally.totals(reset))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use http::{Request, Response, StatusCode};
    use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
    use monoio::net::TcpListener;

    use super::*;
    use crate::runtime::{self, DriverChoice};

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
            let (sent, received, worker) = <[Counter; 3]>::default().into();
            let meters = Meters {
                sent: Meter([&sent, &worker]),
                received: Meter([&received, &worker]),
            };
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
            assert_eq!(sent.get(), 5, "early bytes are counted as sent");
            assert_eq!(received.get(), 5);
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
        for failure in [End::SourceFailed, End::SinkFailed] {
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
