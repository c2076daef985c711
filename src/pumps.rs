//! The two directions of a relay session, driven to one end, and the buffers they read and
//! write through.
//!
//! Each relay (IMAP, POP3) runs an *upstream pump* (upstream → client, the only writer to
//! the client) and a *client pump* (client → upstream). Both are polled in place and never
//! re-created: dropping a pump in the middle of a write would lose the bytes it had taken
//! from its buffer. When the client side ends first (the client closed, or mailgate queued
//! its own closing line), the upstream pump still gets [`DRAIN`] to deliver what is owed:
//! answers to commands already sent, or that closing line.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

/// How long the upstream pump may finish its work once the client side has ended.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Runs both pumps until the session ends; returns the first end seen.
///
/// The pumps come pinned by the caller (`std::pin::pin!`): an `async fn` taking them by
/// value would hold each twice in its state, its argument and the pinned copy, and a
/// session's future is memory every idle session keeps (benches/sessions.rs).
pub async fn drive<E>(
    mut upstream_side: Pin<&mut impl Future<Output = E>>,
    mut client_side: Pin<&mut impl Future<Output = E>>,
) -> E {
    tokio::select! {
        end = &mut upstream_side => end,
        end = &mut client_side => {
            let _ = tokio::time::timeout(DRAIN, &mut upstream_side).await;
            end
        }
    }
}

/// Read and write granularity while bytes flow: big enough that a large FETCH or RETR moves
/// in full TLS records (16 KiB of plaintext each) with few system calls. 64 KiB (nginx's
/// `proxy_buffer` in the peers bench) relays a POP3 message one at a time about 15 % faster
/// than 32 KiB did; a waiting session holds none of it.
pub const IO_CHUNK: usize = 64 * 1024;

/// The read buffer of a side that owes nothing: enough for a command line or an IDLE
/// notification, so that an idle session holds no large buffer.
pub const WAITING_READ: usize = 512;

/// Reads from one side of a session into `buffer`.
///
/// `waiting`: nothing is owed from that side (no command or response under way). Then a
/// large buffer is given back first and the read waits in a [`WAITING_READ`] one: a
/// session costs its buffers only while bytes flow, which is what lets 10,000 idle
/// sessions fit in little memory (Dovecot's hibernation and nginx's buffer release do the
/// same). While bytes flow, reads take up to [`IO_CHUNK`].
pub async fn read_into<R: AsyncRead + Unpin>(
    read: &mut R,
    buffer: &mut BytesMut,
    waiting: bool,
) -> std::io::Result<usize> {
    if waiting && buffer.is_empty() {
        if buffer.capacity() > WAITING_READ {
            *buffer = BytesMut::new();
        }
        buffer.reserve(WAITING_READ);
    } else {
        buffer.reserve(IO_CHUNK);
    }
    read.read_buf(buffer).await
}

/// Why a client's read ended without bytes for the relay.
#[derive(Debug, PartialEq, Eq)]
pub enum Unread {
    /// The client closed the connection, or reading failed.
    Closed,
    /// The client's bytes cannot be read any more (a COMPRESS stream that does not
    /// inflate): nothing it sends from now on means anything.
    Unreadable,
    /// Nothing for the idle timeout while nothing was running.
    Idle,
    /// Shutdown began while nothing was running.
    Shutdown,
}

/// What a client pump asks of its session's shared state while it waits for the client.
pub trait Waiting {
    /// Shutdown has already been seen (the session drains).
    fn draining(&self) -> bool;
    /// Marks the session draining; true if nothing is running, so it may end now.
    fn start_draining(&self) -> bool;
    /// A command is still running (a long download is not inactivity).
    fn busy(&self) -> bool;
}

/// The client pump's read, the same for both protocols: the next bytes into `buffer`
/// (`waiting`: see [`read_into`]), unless the client goes away, stays silent for `idle`
/// while nothing runs, or shutdown comes while nothing runs (a running command delays both:
/// the session drains).
pub async fn read_client<R: AsyncRead + Unpin>(
    read: &mut R,
    buffer: &mut BytesMut,
    waiting: bool,
    idle: Duration,
    shutdown: &tokio_util::sync::CancellationToken,
    state: &impl Waiting,
) -> Result<usize, Unread> {
    let mut deadline = tokio::time::Instant::now() + idle;
    loop {
        let draining = state.draining();
        let read = tokio::select! {
            read = tokio::time::timeout_at(deadline, read_into(read, buffer, waiting)) => read,
            _ = shutdown.cancelled(), if !draining => {
                if state.start_draining() {
                    return Err(Unread::Shutdown);
                }
                continue;
            }
        };
        match read {
            Ok(Ok(0)) => return Err(Unread::Closed),
            Ok(Ok(n)) => return Ok(n),
            Ok(Err(e)) if crate::compress::is_bad_deflate(&e) => {
                // Not a network failure: the client's bytes made no sense (a COMPRESS stream
                // that does not inflate). Only this session ends.
                tracing::info!(error = %e, "client stream unreadable: closing");
                return Err(Unread::Unreadable);
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "client read failed");
                return Err(Unread::Closed);
            }
            Err(_) if state.busy() => deadline = tokio::time::Instant::now() + idle,
            Err(_) => return Err(Unread::Idle),
        }
    }
}

/// A write buffer that exists only between a write and the next flush.
///
/// Writes are coalesced (small ones into one TLS record and one system call, up to
/// [`IO_CHUNK`]; larger ones go straight through), and every flush gives the buffer back:
/// a pump flushes whenever its input runs dry, so a session that waits holds no write
/// buffer. (tokio's `BufWriter` keeps its capacity for the life of the session.)
pub struct Outbox<W> {
    inner: W,
    buffer: Vec<u8>,
    /// How much of `buffer` the inner writer has taken.
    written: usize,
}

impl<W: AsyncWrite + Unpin> Outbox<W> {
    pub fn new(inner: W) -> Self {
        Outbox { inner, buffer: Vec::new(), written: 0 }
    }

    /// The inner writer (to change how it writes, between two flushes).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Bytes written but not yet handed to the inner writer.
    pub fn buffered(&self) -> usize {
        self.buffer.len() - self.written
    }

    /// The inner writer back; `None` while written bytes wait for a flush (they would be
    /// lost).
    pub fn into_inner(self) -> Option<W> {
        (self.buffered() == 0).then_some(self.inner)
    }

    /// Hands the buffer to the inner writer.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.written < self.buffer.len() {
            match ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buffer[self.written..])) {
                Ok(0) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => self.written += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.buffer.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Outbox<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.buffer.len() + data.len() > IO_CHUNK {
            ready!(this.poll_write_out(cx))?;
            if data.len() >= IO_CHUNK {
                return Pin::new(&mut this.inner).poll_write(cx, data);
            }
        }
        if this.buffer.capacity() == 0 {
            this.buffer.reserve_exact(IO_CHUNK);
        }
        this.buffer.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_write_out(cx))?;
        self.buffer = Vec::new();
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_write_out(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn an_outbox_coalesces_small_writes_and_holds_nothing_after_a_flush() {
        let (mut near, mut far) = tokio::io::duplex(1 << 20);
        let mut outbox = Outbox::new(&mut near);
        outbox.write_all(b"* 1 EXISTS\r\n").await.unwrap();
        outbox.write_all(b"a OK done\r\n").await.unwrap();
        assert_eq!(outbox.buffered(), 23, "small writes wait for the flush");
        outbox.flush().await.unwrap();
        assert_eq!((outbox.buffered(), outbox.buffer.capacity()), (0, 0), "a flushed outbox holds no buffer");
        let big = vec![b'x'; IO_CHUNK + 10];
        outbox.write_all(b"head ").await.unwrap();
        outbox.write_all(&big).await.unwrap();
        outbox.flush().await.unwrap();
        drop(outbox);
        drop(near);
        let mut seen = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut far, &mut seen).await.unwrap();
        let mut expected = b"* 1 EXISTS\r\na OK done\r\nhead ".to_vec();
        expected.extend_from_slice(&big);
        assert_eq!(seen, expected, "bytes in order, none lost or doubled");
    }

    #[tokio::test]
    async fn a_waiting_read_gives_a_large_buffer_back() {
        let (mut near, mut far) = tokio::io::duplex(1 << 20);
        far.write_all(&vec![b'x'; IO_CHUNK + 20_000]).await.unwrap();
        let mut buffer = BytesMut::new();
        let n = read_into(&mut near, &mut buffer, false).await.unwrap();
        assert!(buffer.capacity() >= IO_CHUNK && n > WAITING_READ, "flowing: large reads");
        buffer.clear();
        far.write_all(b"a NOOP\r\n").await.unwrap();
        read_into(&mut near, &mut buffer, true).await.unwrap();
        assert!(buffer.capacity() < IO_CHUNK, "waiting: {} bytes held", buffer.capacity());
        assert!(buffer.starts_with(b"x"), "the rest of the earlier bytes first");
    }
}
