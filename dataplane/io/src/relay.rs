//! Moving bytes between an application's TCP connection and its peer (an HBONE stream or
//! another TCP connection), with half-close and reset carried across.
//!
//! - EOF on one side becomes a half-close on the other (END_STREAM, or shutdown(SHUT_WR)); the
//!   other direction keeps flowing until it ends too.
//! - An error or reset on one side resets the other: RST_STREAM(CANCEL) toward h2, and an RST
//!   (SO_LINGER 0 then close) toward TCP.
//!
//! Directions borrow the socket halves rather than own them: monoio's write half shuts down
//! (sends FIN) when dropped, so the halves are reunited and closed as one socket, which lets a
//! reset go out as a bare RST.

use std::cell::Cell;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::pin;

use bytes::{Bytes, BytesMut};
use futures_util::future::{select, Either};
use h2::{Reason, RecvStream, SendStream};
use mesh_core::buffers::{NextRead, ReadSizer};
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;

use crate::sockets::reset_on_close;

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
enum End {
    /// EOF passed on as a half-close.
    Closed,
    /// The side we read from failed or was reset.
    SourceFailed,
    /// The side we write to failed or was reset.
    SinkFailed,
}

/// Reads a TCP half with buffers sized by [`ReadSizer`]: large while data streams, none while
/// the connection is quiet.
struct SizedReader {
    half: OwnedReadHalf<TcpStream>,
    sizer: ReadSizer,
    buf: BytesMut,
}

impl SizedReader {
    fn new(half: OwnedReadHalf<TcpStream>) -> Self {
        SizedReader {
            half,
            sizer: ReadSizer::default(),
            buf: BytesMut::new(),
        }
    }

    /// The next chunk, or `None` at EOF.
    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        let size = match self.sizer.next() {
            NextRead::Now(size) => size,
            NextRead::WhenReadable(size) => {
                self.buf = BytesMut::new();
                // SAFETY: monoio's split halves share the stream through an `UnsafeCell` and
                // each half uses it for its own kind of operation; waiting for readability only
                // submits a poll on the fd and touches no state the write half uses.
                #[allow(unsafe_code)]
                let stream = unsafe { &*self.half.0.get() };
                stream.readable(true).await?;
                size
            }
        };
        self.buf.reserve(size);
        let buf = std::mem::take(&mut self.buf);
        let capacity = buf.capacity();
        let (result, buf) = self.half.read(buf).await;
        self.buf = buf;
        let n = result?;
        if n == 0 {
            return Ok(None);
        }
        self.sizer.observe(n, capacity);
        Ok(Some(self.buf.split().freeze()))
    }
}

/// Sends `data` on an h2 stream as flow control allows.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), h2::Error> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = poll_fn(|cx| send.poll_capacity(cx))
            .await
            .ok_or_else(|| h2::Error::from(Reason::CANCEL))??;
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        send.send_data(chunk, false)?;
    }
    Ok(())
}

async fn tcp_to_h2(
    reader: &mut SizedReader,
    mut send: SendStream<Bytes>,
    count: &Cell<u64>,
) -> End {
    loop {
        match reader.next().await {
            Ok(Some(chunk)) => {
                let n = chunk.len() as u64;
                if send_all(&mut send, chunk).await.is_err() {
                    return End::SinkFailed;
                }
                count.set(count.get() + n);
            }
            Ok(None) => {
                return match send.send_data(Bytes::new(), true) {
                    Ok(()) => End::Closed,
                    Err(_) => End::SinkFailed,
                };
            }
            Err(_) => {
                send.send_reset(Reason::CANCEL);
                return End::SourceFailed;
            }
        }
    }
}

async fn h2_to_tcp(
    mut recv: RecvStream,
    writer: &mut OwnedWriteHalf<TcpStream>,
    count: &Cell<u64>,
) -> End {
    loop {
        match recv.data().await {
            Some(Ok(chunk)) => {
                let n = chunk.len();
                let (result, _) = writer.write_all(chunk).await;
                if result.is_err() {
                    // Dropping `recv` and the send half resets the stream.
                    return End::SinkFailed;
                }
                count.set(count.get() + n as u64);
                // Give the window back only once the bytes are in the socket, so a slow
                // reader holds back the sender instead of growing our memory.
                let _ = recv.flow_control().release_capacity(n);
            }
            None => {
                let _ = writer.shutdown().await;
                return End::Closed;
            }
            Some(Err(_)) => return End::SourceFailed,
        }
    }
}

async fn tcp_to_tcp(
    reader: &mut SizedReader,
    writer: &mut OwnedWriteHalf<TcpStream>,
    count: &Cell<u64>,
) -> End {
    loop {
        match reader.next().await {
            Ok(Some(chunk)) => {
                let n = chunk.len() as u64;
                let (result, _) = writer.write_all(chunk).await;
                if result.is_err() {
                    return End::SinkFailed;
                }
                count.set(count.get() + n);
            }
            Ok(None) => {
                let _ = writer.shutdown().await;
                return End::Closed;
            }
            Err(_) => return End::SourceFailed,
        }
    }
}

/// Closes a socket from its halves, with an RST if `reset`.
fn close(fd: RawFd, reader: SizedReader, writer: OwnedWriteHalf<TcpStream>, reset: bool) {
    if reset {
        reset_on_close(fd);
    }
    // Reunited, the socket closes without the write half's implicit shutdown.
    match reader.half.reunite(writer) {
        Ok(stream) => drop(stream),
        Err(halves) => drop(halves),
    }
}

/// Relays between a local TCP connection and an HBONE stream until both directions end.
pub async fn tcp_h2(tcp: TcpStream, send: SendStream<Bytes>, recv: RecvStream) -> Totals {
    let fd = tcp.as_raw_fd();
    let (rd, mut wr) = tcp.into_split();
    let mut reader = SizedReader::new(rd);
    let (sent, received) = (Cell::new(0), Cell::new(0));
    // (the relay ended in a reset, the TCP side must be reset)
    let (reset, reset_tcp) = {
        let up = pin!(tcp_to_h2(&mut reader, send, &sent));
        let down = pin!(h2_to_tcp(recv, &mut wr, &received));
        match select(up, down).await {
            Either::Left((End::Closed, down)) => match down.await {
                End::Closed => (false, false),
                End::SourceFailed => (true, true),
                End::SinkFailed => (true, false),
            },
            // TCP read failed: the stream was reset already.
            Either::Left((End::SourceFailed, _)) => (true, false),
            // The stream failed: reset the TCP side.
            Either::Left((End::SinkFailed, _)) => (true, true),
            Either::Right((End::Closed, up)) => match up.await {
                End::Closed => (false, false),
                End::SourceFailed => (true, false),
                End::SinkFailed => (true, true),
            },
            // The peer reset the stream: reset the TCP side.
            Either::Right((End::SourceFailed, _)) => (true, true),
            // TCP write failed: dropping the stream's handles resets it.
            Either::Right((End::SinkFailed, _)) => (true, false),
        }
    };
    close(fd, reader, wr, reset_tcp);
    Totals {
        sent: sent.get(),
        received: received.get(),
        reset,
    }
}

/// Relays between two TCP connections (passthrough and plaintext inbound).
pub async fn tcp_tcp(local: TcpStream, remote: TcpStream) -> Totals {
    let (local_fd, remote_fd) = (local.as_raw_fd(), remote.as_raw_fd());
    let (local_rd, mut local_wr) = local.into_split();
    let (remote_rd, mut remote_wr) = remote.into_split();
    let mut local_reader = SizedReader::new(local_rd);
    let mut remote_reader = SizedReader::new(remote_rd);
    let (sent, received) = (Cell::new(0), Cell::new(0));
    // A failed read resets the other side; a failed write resets the side we read from.
    let (reset_local, reset_remote) = {
        let up = pin!(tcp_to_tcp(&mut local_reader, &mut remote_wr, &sent));
        let down = pin!(tcp_to_tcp(&mut remote_reader, &mut local_wr, &received));
        match select(up, down).await {
            Either::Left((End::Closed, down)) => match down.await {
                End::Closed => (false, false),
                End::SourceFailed => (true, false),
                End::SinkFailed => (false, true),
            },
            Either::Left((End::SourceFailed, _)) => (false, true),
            Either::Left((End::SinkFailed, _)) => (true, false),
            Either::Right((End::Closed, up)) => match up.await {
                End::Closed => (false, false),
                End::SourceFailed => (false, true),
                End::SinkFailed => (true, false),
            },
            Either::Right((End::SourceFailed, _)) => (true, false),
            Either::Right((End::SinkFailed, _)) => (false, true),
        }
    };
    close(local_fd, local_reader, local_wr, reset_local);
    close(remote_fd, remote_reader, remote_wr, reset_remote);
    Totals {
        sent: sent.get(),
        received: received.get(),
        reset: reset_local || reset_remote,
    }
}
