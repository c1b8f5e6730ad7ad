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

use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use monoio::io::IntoPollIo;
use monoio::net::tcp::stream_poll::TcpStreamPoll;
use monoio::net::TcpStream;
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
struct TcpSide {
    io: TcpStreamPoll,
    fd: RawFd,
    slot: ReadSlot,
}

impl TcpSide {
    fn new(stream: TcpStream) -> io::Result<TcpSide> {
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
/// until `stop` fires (both sides are then reset).
pub async fn tcp_h2(
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    meters: Meters<'_>,
    stop: &Trigger,
) -> Totals {
    let mut tcp = match TcpSide::new(tcp) {
        Ok(t) => t,
        Err(_) => {
            send.send_reset(Reason::INTERNAL_ERROR);
            return Totals {
                reset: true,
                ..Totals::default()
            };
        }
    };
    let (mut up, mut down) = (Upload::Reading, Download::Receiving);
    let (mut sent, mut received) = (0u64, 0u64);
    let ended = both_directions(stop, |cx| {
        let u = poll_tcp_to_h2(&mut up, &mut tcp, &mut send, &mut sent, meters.sent, cx);
        let d = poll_h2_to_tcp(
            &mut down,
            &mut recv,
            &mut tcp,
            &mut received,
            meters.received,
            cx,
        );
        (u, d)
    })
    .await;
    let Some((up_end, down_end)) = ended else {
        send.send_reset(Reason::CANCEL);
        close(tcp, true);
        return Totals {
            sent,
            received,
            reset: true,
        };
    };
    // Who has to be told: a failed h2 side (SinkFailed up, SourceFailed down) resets the TCP
    // side; a failed TCP side resets the stream (explicitly, or by dropping its handles).
    let reset = verdict(up_end, down_end).reset;
    let reset_tcp = matches!(up_end, Poll::Ready(End::SinkFailed))
        || matches!(down_end, Poll::Ready(End::SourceFailed));
    if reset && !reset_tcp {
        send.send_reset(Reason::CANCEL);
    }
    close(tcp, reset_tcp);
    Totals {
        sent,
        received,
        reset,
    }
}

/// Relays between two TCP connections (passthrough and plaintext inbound), until both
/// directions end or `stop` fires (both sides are then reset).
pub async fn tcp_tcp(
    local: TcpStream,
    remote: TcpStream,
    meters: Meters<'_>,
    stop: &Trigger,
) -> Totals {
    let (mut local, mut remote) = match (TcpSide::new(local), TcpSide::new(remote)) {
        (Ok(l), Ok(r)) => (l, r),
        _ => {
            return Totals {
                reset: true,
                ..Totals::default()
            }
        }
    };
    let (mut up, mut down) = (Download::Receiving, Download::Receiving);
    let (mut sent, mut received) = (0u64, 0u64);
    let ended = both_directions(stop, |cx| {
        let u = poll_tcp_to_tcp(&mut up, &mut local, &mut remote, &mut sent, meters.sent, cx);
        let d = poll_tcp_to_tcp(
            &mut down,
            &mut remote,
            &mut local,
            &mut received,
            meters.received,
            cx,
        );
        (u, d)
    })
    .await;
    let Some((up_end, down_end)) = ended else {
        close(local, true);
        close(remote, true);
        return Totals {
            sent,
            received,
            reset: true,
        };
    };
    // A failed read resets the other side; a failed write resets the side it came from.
    let failed = |end: Poll<End>, which: End| matches!(end, Poll::Ready(e) if e == which);
    let reset_local = failed(up_end, End::SinkFailed) || failed(down_end, End::SourceFailed);
    let reset_remote = failed(up_end, End::SourceFailed) || failed(down_end, End::SinkFailed);
    let reset = verdict(up_end, down_end).reset;
    close(local, reset_local);
    close(remote, reset_remote);
    Totals {
        sent,
        received,
        reset,
    }
}

/// Polls both directions of a relay in one task until the pair is finished (their last
/// states) or `stop` fires (`None`).
async fn both_directions(
    stop: &Trigger,
    mut poll_pair: impl FnMut(&mut Context<'_>) -> (Poll<End>, Poll<End>),
) -> Option<(Poll<End>, Poll<End>)> {
    poll_fn(|cx| {
        if stop.poll_fired(cx).is_ready() {
            return Poll::Ready(None);
        }
        let (u, d) = poll_pair(cx);
        if verdict(u, d).finished {
            Poll::Ready(Some((u, d)))
        } else {
            Poll::Pending
        }
    })
    .await
}

fn close(side: TcpSide, reset: bool) {
    if reset {
        reset_on_close(side.fd);
    }
    drop(side);
}

#[cfg(test)]
mod tests {
    use super::*;

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
