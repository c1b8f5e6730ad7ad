//! Adaptive read buffers for poll-mode sockets, shared by the relays and the TLS layer.
//!
//! A read slot allocates its buffer only when it reads, sized by [`ReadSizer`] (large while data
//! streams), and drops it whenever the socket has nothing to give, so an idle connection holds
//! no buffer at all.
//!
//! [`ReadBuffered`] puts a slot under rustls: rustls pulls ciphertext at most 4 KiB per `read`,
//! so a 16 KiB record would cost four syscalls; served from the slot it costs a quarter of one.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use mesh_core::buffers::{NextRead, ReadSizer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Default)]
pub struct ReadSlot {
    buf: BytesMut,
    sizer: ReadSizer,
}

impl ReadSlot {
    /// Reads once from `io` into the (empty) slot; `Ok(0)` is EOF.
    pub fn poll_fill<T: AsyncRead + Unpin>(
        &mut self,
        io: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let size = match self.sizer.next() {
            NextRead::Now(size) | NextRead::WhenReadable(size) => size,
        };
        self.buf.clear();
        self.buf.reserve(size);
        let spare = &mut self.buf.spare_capacity_mut()[..size];
        let mut read = ReadBuf::uninit(spare);
        match Pin::new(io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                // SAFETY: `ReadBuf` guarantees its first `n` (filled) bytes are initialised,
                // and they are the first `n` bytes of `buf`'s spare capacity.
                #[allow(unsafe_code)]
                unsafe {
                    self.buf.set_len(n)
                };
                self.sizer.observe(n, size);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                // Drained: hold no memory while waiting.
                self.buf = BytesMut::new();
                Poll::Pending
            }
        }
    }

    /// The next chunk read from `io` as an owned buffer; `None` at EOF.
    pub fn poll_chunk<T: AsyncRead + Unpin>(
        &mut self,
        io: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<Bytes>>> {
        let n = ready!(self.poll_fill(io, cx))?;
        Poll::Ready(Ok((n > 0).then(|| self.buf.split().freeze())))
    }
}

/// A socket whose reads are served from a [`ReadSlot`]; writes pass straight through.
pub struct ReadBuffered<T> {
    inner: T,
    slot: ReadSlot,
}

impl<T> ReadBuffered<T> {
    pub fn new(inner: T) -> Self {
        ReadBuffered {
            inner,
            slot: ReadSlot::default(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadBuffered<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.slot.buf.is_empty() {
            ready!(this.slot.poll_fill(&mut this.inner, cx))?;
        }
        let buf = &mut this.slot.buf;
        let n = buf.len().min(out.remaining());
        out.put_slice(&buf[..n]);
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadBuffered<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
