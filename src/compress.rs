//! COMPRESS=DEFLATE (RFC 4978) on the client leg: raw DEFLATE (RFC 1951, no zlib header)
//! both ways, switched on at a byte the relay chooses.
//!
//! The two directions are separate wrappers, each owned by the one pump that uses it: the
//! client pump reads through [`Inflate`], the upstream pump (the only writer to the
//! client) writes through [`Deflate`]. Each starts as a plain pass-through and holds no
//! compression state until [`Inflate::start`] / [`Deflate::start`]: sessions that never ask
//! pay one `Option` each. The relay above keeps framing, caching and limits on the plain
//! bytes; the wire below (TLS, the byte counters, the bandwidth limits) sees the
//! compressed ones.
//!
//! Every flush of the writer is a sync flush (`Z_SYNC_FLUSH`): the relay flushes whenever
//! its input runs dry, so each burst of responses reaches the client whole (IDLE
//! notifications, pipelined answers) instead of waiting in the compressor for more.
//!
//! Memory while active: the decompressor's state (its 32 KiB window and tables, about
//! 45 KiB) for the whole session: the client's next bytes may refer to anything in its
//! window. The compressor's (miniz_oxide: a 32 KiB window with its hash chains and output
//! codes, about 300 KiB) only while responses flow: a session that waits gives it back
//! ([`Deflate::rest`]) and the next burst starts a fresh one. That is valid DEFLATE: after a
//! sync flush every byte given is out, byte-aligned, and a compressor without history simply
//! never refers back (what `Z_FULL_FLUSH` does); the client's inflater goes on as before.
//! Buffers (8 KiB of input, the output) exist only while bytes flow, as in `pumps::Outbox`.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Compressed bytes read from the client at once.
const INPUT: usize = 8 * 1024;

/// Compressed output gathered before it is handed on mid-burst (a flush hands on the rest).
const OUTPUT: usize = 16 * 1024;

/// Bytes on one side of the compressor, for `mailgate_compress_bytes_total`.
#[derive(Clone)]
pub struct Counters {
    /// What the relay reads or writes.
    pub plain: IntCounter,
    /// What travels on the wire.
    pub deflated: IntCounter,
}

/// The reading side: plain bytes until [`Inflate::start`], then the inflated stream.
pub struct Inflate<R> {
    inner: R,
    state: Option<Box<Inflating>>,
}

struct Inflating {
    decompress: Decompress,
    /// Compressed bytes read and not yet inflated: `input[start..end]` (empty between
    /// reads: a waiting session holds no input buffer).
    input: Vec<u8>,
    start: usize,
    end: usize,
    counters: Counters,
    /// Counted once when the client's stream turns out not to be DEFLATE.
    errors: IntCounter,
    /// The client ended its DEFLATE stream (a final block): nothing can follow.
    ended: bool,
    /// The stream was not DEFLATE: it cannot be resynchronized, every read fails.
    failed: bool,
}

impl<R> Inflate<R> {
    pub fn new(inner: R) -> Self {
        Inflate { inner, state: None }
    }

    pub fn is_active(&self) -> bool {
        self.state.is_some()
    }

    /// From now on the stream is DEFLATE. `already_read`: bytes read from the wire after
    /// the COMPRESS command (the client's first compressed bytes, if it sent any early).
    pub fn start(&mut self, already_read: &[u8], counters: Counters, errors: IntCounter) {
        let mut input = vec![0; INPUT.max(already_read.len())];
        input[..already_read.len()].copy_from_slice(already_read);
        counters.deflated.inc_by(already_read.len() as u64);
        self.state = Some(Box::new(Inflating {
            decompress: Decompress::new(false),
            input,
            start: 0,
            end: already_read.len(),
            counters,
            errors,
            ended: false,
            failed: false,
        }));
    }
}

/// The client's DEFLATE stream did not inflate: told apart from other `InvalidData` errors
/// (tokio-rustls reports every TLS error so) by [`is_bad_deflate`].
#[derive(Debug)]
struct BadDeflate(String);

impl std::fmt::Display for BadDeflate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad DEFLATE data from the client: {}", self.0)
    }
}

impl std::error::Error for BadDeflate {}

fn corrupt(error: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, BadDeflate(error.to_string()))
}

/// Whether `error` is a client's DEFLATE stream that did not inflate (not a TLS or network
/// failure).
pub fn is_bad_deflate(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<BadDeflate>())
}

impl<R: AsyncRead + Unpin> AsyncRead for Inflate<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(state) = this.state.as_mut() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        loop {
            if state.failed {
                return Poll::Ready(Err(corrupt("after an error")));
            }
            if state.ended {
                // A client ends compression only by closing: this is the end of the session.
                return Poll::Ready(Ok(()));
            }
            // Even with no input left: the last call may have had more output than room.
            let (before_in, before_out) = (state.decompress.total_in(), state.decompress.total_out());
            let status = state.decompress.decompress(
                &state.input[state.start..state.end],
                // Zeroing all the free room at every read would cost more than inflating.
                buf.initialize_unfilled_to(buf.remaining().min(16 << 10)),
                FlushDecompress::None,
            );
            let consumed = (state.decompress.total_in() - before_in) as usize;
            let produced = (state.decompress.total_out() - before_out) as usize;
            state.start += consumed;
            match status {
                Ok(status) => {
                    state.ended = status == Status::StreamEnd;
                    if produced > 0 {
                        buf.advance(produced);
                        state.counters.plain.inc_by(produced as u64);
                        return Poll::Ready(Ok(()));
                    }
                    if consumed > 0 && state.start < state.end {
                        continue;
                    }
                }
                Err(error) => {
                    state.errors.inc();
                    state.failed = true;
                    return Poll::Ready(Err(corrupt(error)));
                }
            }
            if state.ended {
                continue;
            }
            // All taken (or a partial symbol kept at the start): read more behind it.
            if state.start == state.end {
                (state.start, state.end) = (0, 0);
                if state.input.len() != INPUT {
                    state.input = vec![0; INPUT];
                }
            } else if state.end == state.input.len() {
                state.input.copy_within(state.start..state.end, 0);
                (state.start, state.end) = (0, state.end - state.start);
            }
            let mut room = ReadBuf::new(&mut state.input[state.end..]);
            let read = Pin::new(&mut this.inner).poll_read(cx, &mut room);
            let n = room.filled().len();
            if read.is_pending() && state.start == state.end {
                // Waiting for the client: no input buffer meanwhile.
                state.input = Vec::new();
            }
            ready!(read)?;
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            state.end += n;
            state.counters.deflated.inc_by(n as u64);
        }
    }
}

/// The writing side: plain bytes until [`Deflate::start`], then a DEFLATE stream with a
/// sync flush at every flush.
pub struct Deflate<W> {
    inner: W,
    state: Option<Box<Deflating>>,
}

struct Deflating {
    /// `None` while the session rests (see [`Deflate::rest`]).
    compress: Option<Box<Compress>>,
    /// 1 (fastest) to 9 (smallest): `imap.compress_level`.
    level: u32,
    /// Compressed output not yet handed on: `output[written..]`.
    output: Vec<u8>,
    written: usize,
    /// Bytes went in since the last sync flush (an empty flush would still cost 5 bytes).
    owed: bool,
    counters: Counters,
}

impl<W> Deflate<W> {
    pub fn new(inner: W) -> Self {
        Deflate { inner, state: None }
    }

    pub fn is_active(&self) -> bool {
        self.state.is_some()
    }

    /// Gives the compressor back while the session waits: call it after a flush, when
    /// nothing has been owed to the client for a while. The next write starts a new one
    /// (without history, which costs small responses some of their ratio: hence not after
    /// every command).
    pub fn rest(&mut self) {
        if let Some(state) = self.state.as_mut() {
            if !state.owed && state.written == state.output.len() {
                state.compress = None;
            }
        }
    }

    /// Whether a compressor is allocated now (see [`rest`](Deflate::rest)).
    pub fn is_holding(&self) -> bool {
        self.state.as_ref().is_some_and(|s| s.compress.is_some())
    }

    /// Whether the session compresses and its compressor is given back (tests, benches).
    pub fn is_resting(&self) -> bool {
        self.state.as_ref().is_some_and(|s| s.compress.is_none())
    }

    /// From the next byte on, writes are compressed at `level` (1 to 9).
    pub fn start(&mut self, counters: Counters, level: u32) {
        let deflating = Deflating { compress: None, level, output: Vec::new(), written: 0, owed: false, counters };
        self.state = Some(Box::new(deflating));
    }
}

impl<W: AsyncWrite + Unpin> Deflate<W> {
    /// Hands the compressed output to the inner writer.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(state) = self.state.as_mut() else { return Poll::Ready(Ok(())) };
        while state.written < state.output.len() {
            match ready!(Pin::new(&mut self.inner).poll_write(cx, &state.output[state.written..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    state.written += n;
                    state.counters.deflated.inc_by(n as u64);
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        state.output.clear();
        state.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Deflate<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.state.is_none() {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        loop {
            let state = this.state.as_mut().expect("active");
            if state.output.len() >= OUTPUT {
                ready!(this.poll_write_out(cx))?;
                continue;
            }
            if state.output.capacity() - state.output.len() < OUTPUT / 2 {
                state.output.reserve(OUTPUT);
            }
            let level = Compression::new(state.level);
            let compress = state.compress.get_or_insert_with(|| Box::new(Compress::new(level, false)));
            let before = compress.total_in();
            compress.compress_vec(data, &mut state.output, FlushCompress::None).map_err(io::Error::other)?;
            let consumed = (compress.total_in() - before) as usize;
            if consumed > 0 || data.is_empty() {
                state.owed |= consumed > 0;
                state.counters.plain.inc_by(consumed as u64);
                return Poll::Ready(Ok(consumed));
            }
            // The output filled up before any input went in: hand it on first.
            ready!(this.poll_write_out(cx))?;
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(state) = this.state.as_mut() {
            // Until the compressor leaves room in the output, it may have more to give.
            while let (true, Some(compress)) = (state.owed, state.compress.as_mut()) {
                state.output.reserve(OUTPUT);
                compress.compress_vec(&[], &mut state.output, FlushCompress::Sync).map_err(io::Error::other)?;
                state.owed = state.output.len() == state.output.capacity();
            }
            ready!(this.poll_write_out(cx))?;
            // A waiting session holds no output buffer.
            this.state.as_mut().expect("active").output = Vec::new();
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn unused() -> Counters {
        let counter = || IntCounter::new("unused", "unused").expect("valid metric");
        Counters { plain: counter(), deflated: counter() }
    }

    /// What a client inflates of a stream it has so far (not ended: sync-flushed).
    fn inflate_all(data: &[u8]) -> Vec<u8> {
        let mut inflater = Decompress::new(false);
        let mut out = Vec::new();
        while inflater.total_in() < data.len() as u64 || out.len() == out.capacity() {
            out.reserve(64 * 1024);
            let before = (inflater.total_in(), inflater.total_out());
            inflater.decompress_vec(&data[inflater.total_in() as usize..], &mut out, FlushDecompress::Sync).unwrap();
            if (inflater.total_in(), inflater.total_out()) == before {
                break;
            }
        }
        assert_eq!(inflater.total_in(), data.len() as u64, "all of the stream inflates");
        out
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(data).unwrap();
        encoder.flush().unwrap();
        encoder.get_mut().clone()
    }

    #[tokio::test]
    async fn plain_until_started_then_each_flush_is_readable_on_its_own() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut writer = Deflate::new(near);
        writer.write_all(b"a OK DEFLATE active\r\n").await.unwrap();
        writer.flush().await.unwrap();
        writer.start(unused(), 6);
        writer.write_all(b"* 3 EXISTS\r\n").await.unwrap();
        writer.flush().await.unwrap();
        let mut seen = vec![0; 4096];
        let n = far.read(&mut seen).await.unwrap();
        assert!(seen[..n].starts_with(b"a OK DEFLATE active\r\n"));
        // A client reading what it has so far (a sync flush ends on a byte boundary) gets
        // the whole notification: nothing waits in the compressor.
        let compressed = &seen[21..n];
        assert!(compressed.ends_with(&[0, 0, 0xff, 0xff]), "a sync flush marker ends each burst");
        let mut inflater = Decompress::new(false);
        let mut out = Vec::with_capacity(100);
        inflater.decompress_vec(compressed, &mut out, FlushDecompress::Sync).unwrap();
        assert_eq!(out, b"* 3 EXISTS\r\n");
        writer.flush().await.unwrap();
        assert_eq!(writer.state.as_ref().unwrap().output.capacity(), 0, "a flushed writer holds no buffer");
    }

    #[tokio::test]
    async fn a_large_burst_round_trips_and_shrinks() {
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let mut writer = Deflate::new(near);
        writer.start(unused(), 6);
        let body: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("* {i} FETCH (UID {i} FLAGS (\\Seen) BODY[HEADER.FIELDS (SUBJECT)] {{20}}\r\nSubject: hello {:04}\r\n)\r\n", i % 10_000).into_bytes())
            .collect();
        let expected = body.clone();
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            far.read_to_end(&mut all).await.unwrap();
            all
        });
        for chunk in body.chunks(70_000) {
            writer.write_all(chunk).await.unwrap();
        }
        writer.shutdown().await.unwrap();
        drop(writer);
        let wire = reader.await.unwrap();
        assert!(wire.len() * 5 < expected.len(), "{} of {}", wire.len(), expected.len());
        assert!(inflate_all(&wire) == expected, "the stream inflates to what was written");
    }

    #[tokio::test]
    async fn the_reader_takes_bytes_read_before_the_switch_and_any_chunking() {
        let commands = b"b NOOP\r\nc IDLE\r\nDONE\r\nd LOGOUT\r\n".repeat(50);
        let compressed = deflate(&commands);
        for chunk in [1, 2, 7, 64, 4096] {
            let (near, mut far) = tokio::io::duplex(1 << 20);
            let mut reader = Inflate::new(near);
            // The first bytes came with the COMPRESS command; the rest in `chunk`-sized writes.
            let (early, late) = compressed.split_at(3.min(compressed.len()));
            reader.start(early, unused(), IntCounter::new("e", "e").unwrap());
            let late = late.to_vec();
            let writer = tokio::spawn(async move {
                for piece in late.chunks(chunk) {
                    far.write_all(piece).await.unwrap();
                }
            });
            let mut seen = Vec::new();
            while seen.len() < commands.len() {
                let mut buf = [0u8; 100];
                let n = reader.read(&mut buf).await.unwrap();
                assert!(n > 0, "chunk {chunk}: ended early");
                seen.extend_from_slice(&buf[..n]);
            }
            assert_eq!(seen, commands, "chunk {chunk}");
            writer.await.unwrap();
        }
    }

    #[tokio::test]
    async fn bad_deflate_data_is_an_error_and_counted() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut reader = Inflate::new(near);
        let errors = IntCounter::new("e", "e").unwrap();
        reader.start(b"", unused(), errors.clone());
        // BTYPE 11 (reserved) in the first block header.
        far.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
        let mut buf = [0u8; 64];
        let error = reader.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert_eq!(errors.get(), 1);
    }

    #[tokio::test]
    async fn a_resting_writer_gives_its_compressor_back_and_the_stream_goes_on() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut writer = Deflate::new(near);
        writer.start(unused(), 6);
        let burst = |i: usize| format!("* {i} FETCH (UID {i} FLAGS (\\Seen \\Answered))\r\n").repeat(40);
        let mut expected = Vec::new();
        for i in 0..5 {
            writer.write_all(burst(i).as_bytes()).await.unwrap();
            expected.extend_from_slice(burst(i).as_bytes());
            writer.flush().await.unwrap();
            writer.rest();
            assert!(writer.is_resting(), "no compressor while waiting");
        }
        drop(writer);
        let mut wire = Vec::new();
        far.read_to_end(&mut wire).await.unwrap();
        // One inflater for the whole session, as the client has.
        assert!(inflate_all(&wire) == expected, "the stream inflates to what was written");
    }

    #[tokio::test]
    async fn counters_see_both_sides() {
        let counters = unused();
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let mut writer = Deflate::new(near);
        writer.start(counters.clone(), 1);
        writer.write_all(&[b'x'; 10_000]).await.unwrap();
        writer.flush().await.unwrap();
        drop(writer);
        let mut wire = Vec::new();
        far.read_to_end(&mut wire).await.unwrap();
        assert_eq!((counters.plain.get(), counters.deflated.get()), (10_000, wire.len() as u64));
    }
}
