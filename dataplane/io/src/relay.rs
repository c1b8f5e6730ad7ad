//! Moving bytes between an application's TCP connection and its peer (an HBONE stream or
//! another TCP connection), with half-close and reset carried across.
//!
//! - EOF on one side becomes a half-close on the other (END_STREAM, or shutdown(SHUT_WR)); the
//!   other direction keeps flowing until it ends too.
//! - An error or reset on one side resets the other: RST_STREAM(CANCEL) toward h2, and an RST
//!   (SO_LINGER 0 then close) toward TCP.

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

async fn tcp_to_h2(mut reader: SizedReader, mut send: SendStream<Bytes>) -> (u64, End) {
    let mut total = 0u64;
    loop {
        match reader.next().await {
            Ok(Some(chunk)) => {
                let n = chunk.len() as u64;
                if send_all(&mut send, chunk).await.is_err() {
                    return (total, End::SinkFailed);
                }
                total += n;
            }
            Ok(None) => {
                let end = match send.send_data(Bytes::new(), true) {
                    Ok(()) => End::Closed,
                    Err(_) => End::SinkFailed,
                };
                return (total, end);
            }
            Err(_) => {
                send.send_reset(Reason::CANCEL);
                return (total, End::SourceFailed);
            }
        }
    }
}

async fn h2_to_tcp(mut recv: RecvStream, mut writer: OwnedWriteHalf<TcpStream>) -> (u64, End) {
    let mut total = 0u64;
    loop {
        match recv.data().await {
            Some(Ok(chunk)) => {
                let n = chunk.len();
                let (result, _) = writer.write_all(chunk).await;
                if result.is_err() {
                    // Dropping `recv` (and later the send half) resets the stream.
                    return (total, End::SinkFailed);
                }
                total += n as u64;
                // Give the window back only once the bytes are in the socket, so a slow
                // reader holds back the sender instead of growing our memory.
                let _ = recv.flow_control().release_capacity(n);
            }
            None => {
                let _ = writer.shutdown().await;
                return (total, End::Closed);
            }
            Some(Err(_)) => return (total, End::SourceFailed),
        }
    }
}

/// Relays between a local TCP connection and an HBONE stream until both directions end.
pub async fn tcp_h2(tcp: TcpStream, send: SendStream<Bytes>, recv: RecvStream) -> Totals {
    let fd = tcp.as_raw_fd();
    let (rd, wr) = tcp.into_split();
    let up = pin!(tcp_to_h2(SizedReader::new(rd), send));
    let down = pin!(h2_to_tcp(recv, wr));
    let (sent, received, reset) = match select(up, down).await {
        Either::Left(((sent, end), down)) => match end {
            End::Closed => {
                let (received, end) = down.await;
                (sent, received, finish_tcp_side(fd, end))
            }
            End::SourceFailed => (sent, 0, true),
            End::SinkFailed => {
                reset_on_close(fd);
                (sent, 0, true)
            }
        },
        Either::Right(((received, end), up)) => match end {
            End::Closed => {
                let (sent, end) = up.await;
                let reset = match end {
                    End::Closed => false,
                    End::SourceFailed => true,
                    End::SinkFailed => {
                        reset_on_close(fd);
                        true
                    }
                };
                (sent, received, reset)
            }
            End::SourceFailed => {
                reset_on_close(fd);
                (0, received, true)
            }
            End::SinkFailed => (0, received, true),
        },
    };
    Totals {
        sent,
        received,
        reset,
    }
}

/// After the upload finished cleanly, how the download ended decides the TCP side's fate.
fn finish_tcp_side(fd: RawFd, down: End) -> bool {
    match down {
        End::Closed => false,
        End::SourceFailed => {
            reset_on_close(fd);
            true
        }
        End::SinkFailed => true,
    }
}

async fn tcp_to_tcp(mut reader: SizedReader, mut writer: OwnedWriteHalf<TcpStream>) -> (u64, End) {
    let mut total = 0u64;
    loop {
        match reader.next().await {
            Ok(Some(chunk)) => {
                let n = chunk.len() as u64;
                let (result, _) = writer.write_all(chunk).await;
                if result.is_err() {
                    return (total, End::SinkFailed);
                }
                total += n;
            }
            Ok(None) => {
                let _ = writer.shutdown().await;
                return (total, End::Closed);
            }
            Err(_) => return (total, End::SourceFailed),
        }
    }
}

/// Relays between two TCP connections (passthrough and plaintext inbound).
pub async fn tcp_tcp(local: TcpStream, remote: TcpStream) -> Totals {
    let local_fd = local.as_raw_fd();
    let remote_fd = remote.as_raw_fd();
    let (local_rd, local_wr) = local.into_split();
    let (remote_rd, remote_wr) = remote.into_split();
    let up = pin!(tcp_to_tcp(SizedReader::new(local_rd), remote_wr));
    let down = pin!(tcp_to_tcp(SizedReader::new(remote_rd), local_wr));
    // A failure reading one side resets the other; a failure writing one side resets it back
    // toward the side we were reading.
    let reset_for = |end: &End, read_fd: RawFd, write_fd: RawFd| match end {
        End::Closed => false,
        End::SourceFailed => {
            reset_on_close(write_fd);
            true
        }
        End::SinkFailed => {
            reset_on_close(read_fd);
            true
        }
    };
    let (sent, received, reset) = match select(up, down).await {
        Either::Left(((sent, end), down)) => {
            if reset_for(&end, local_fd, remote_fd) {
                (sent, 0, true)
            } else {
                let (received, end) = down.await;
                (sent, received, reset_for(&end, remote_fd, local_fd))
            }
        }
        Either::Right(((received, end), up)) => {
            if reset_for(&end, remote_fd, local_fd) {
                (0, received, true)
            } else {
                let (sent, end) = up.await;
                (sent, received, reset_for(&end, local_fd, remote_fd))
            }
        }
    };
    Totals {
        sent,
        received,
        reset,
    }
}
