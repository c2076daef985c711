//! After login: POP3 commands and responses relayed byte for byte.
//!
//! POP3 responses say nothing about whether a body follows; the command does (`RETR`, `TOP`,
//! `LIST`/`UIDL` without argument, `CAPA`). So the *client pump* records, for each command it
//! forwards, whether its `+OK` brings a multi-line body, and the *upstream pump* follows the
//! responses in that order with a [`ResponseScanner`], streaming every byte as it arrives.
//! For an upstream without `PIPELINING` the client pump forwards one command at a time,
//! which is why mailgate can announce `PIPELINING` to every client.
//!
//! The upstream failing inside a body closes the client connection without the terminating
//! `.` line: a message that looks complete but is not would be worse than an error. Deletions
//! stay the upstream's business: they happen when the upstream completes `QUIT`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tracing::debug;

use super::codec::{multiline_if_ok, split_command, CodecError, Event, LineReader, ResponseScanner};
use super::upstream::LoggedIn;
use crate::service::Service;
use crate::stream::Stream;

pub struct Client {
    pub stream: Stream,
    pub leftover: BytesMut,
}

/// Commands waiting for their responses; more are not read until some are answered.
const MAX_IN_FLIGHT: usize = 100;
const IO_CHUNK: usize = 32 * 1024;
const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Default)]
struct Shared {
    /// For each forwarded command, oldest first: does its `+OK` bring a body?
    pending: VecDeque<bool>,
    draining: bool,
}

struct Inject {
    line: &'static str,
    then_close: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    ClientClosed,
    UpstreamClosed,
    Closed(&'static str),
}

pub async fn run(client: Client, upstream: LoggedIn, service: &Service) {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let answered = Arc::new(Notify::new());
    let (inject_tx, inject_rx) = mpsc::channel(4);
    let (client_read, client_write) = tokio::io::split(client.stream);
    let (upstream_read, upstream_write) = tokio::io::split(upstream.stream);
    let limits = &service.config.pop3;

    let mut to_upstream = ClientPump {
        read: client_read,
        write: BufWriter::with_capacity(IO_CHUNK, upstream_write),
        buffer: client.leftover,
        lines: LineReader::new(limits.max_line_bytes.as_usize()),
        window: if upstream.pipelining { MAX_IN_FLIGHT } else { 1 },
        shared: shared.clone(),
        answered: answered.clone(),
        inject: inject_tx,
        service,
    };
    let mut to_client = UpstreamPump {
        read: upstream_read,
        write: BufWriter::with_capacity(IO_CHUNK, client_write),
        buffer: upstream.leftover,
        scanner: ResponseScanner::default(),
        answering: false,
        shared,
        answered,
        inject: inject_rx,
        service,
    };

    // As in the IMAP relay: pumps are polled in place so none is dropped mid-write.
    let mut upstream_side = Box::pin(to_client.run());
    let mut client_side = Box::pin(to_upstream.run());
    let first = tokio::select! {
        end = &mut upstream_side => Ok(end),
        end = &mut client_side => Err(end),
    };
    let end = match first {
        Ok(end) => end,
        Err(end) => {
            drop(client_side);
            if end == End::ClientClosed {
                let _ = to_upstream.write.shutdown().await;
            }
            let _ = tokio::time::timeout(DRAIN, &mut upstream_side).await;
            end
        }
    };
    drop(upstream_side);
    let _ = to_client.write.shutdown().await;
    tracing::info!(reason = ?end, "session ended");
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().expect("relay lock poisoned")
}

struct ClientPump<'a, R, W> {
    read: ReadHalf<R>,
    write: BufWriter<WriteHalf<W>>,
    buffer: BytesMut,
    lines: LineReader,
    /// Commands that may be outstanding at once: 1 for an upstream without PIPELINING.
    window: usize,
    shared: Arc<Mutex<Shared>>,
    answered: Arc<Notify>,
    inject: mpsc::Sender<Inject>,
    service: &'a Service,
}

impl<R: AsyncRead + AsyncWrite, W: AsyncRead + AsyncWrite> ClientPump<'_, R, W> {
    async fn close_with(&mut self, line: &'static str) -> End {
        let _ = self.inject.send(Inject { line, then_close: true }).await;
        End::Closed(line)
    }

    async fn run(&mut self) -> End {
        loop {
            while !self.buffer.is_empty() {
                let (consumed, line) = match self.lines.feed(&self.buffer) {
                    Ok(step) => step,
                    Err(CodecError::LineTooLong(_)) => return self.close_with("-ERR Line too long.").await,
                };
                let _ = self.buffer.split_to(consumed);
                if let Some(line) = line {
                    if let Err(end) = self.forward(line).await {
                        return end;
                    }
                }
            }
            if self.write.flush().await.is_err() {
                return End::UpstreamClosed;
            }
            if let Err(end) = self.read_more().await {
                return end;
            }
        }
    }

    async fn forward(&mut self, line: Vec<u8>) -> Result<(), End> {
        let (keyword, args) = split_command(&line);
        let body = multiline_if_ok(&keyword, args);
        // Wait for room in the window; what is written must be flushed to be answered.
        loop {
            let answered = self.answered.notified();
            if lock(&self.shared).pending.len() < self.window {
                break;
            }
            if self.write.flush().await.is_err() {
                return Err(End::UpstreamClosed);
            }
            let deadline = Instant::now() + self.service.config.pop3.idle_timeout.0;
            if tokio::time::timeout_at(deadline, answered).await.is_err() {
                return Err(self.close_with("-ERR Disconnected for inactivity.").await);
            }
        }
        {
            let mut shared = lock(&self.shared);
            if shared.draining {
                // Shutdown: no new commands (and no QUIT: deletions are not committed).
                return Err(End::Closed("shutdown"));
            }
            shared.pending.push_back(body);
        }
        let written = async {
            self.write.write_all(&line).await?;
            self.write.write_all(b"\r\n").await
        };
        written.await.map_err(|_| End::UpstreamClosed)
    }

    async fn read_more(&mut self) -> Result<(), End> {
        let idle = self.service.config.pop3.idle_timeout.0;
        let mut deadline = Instant::now() + idle;
        loop {
            let draining = lock(&self.shared).draining;
            self.buffer.reserve(4096);
            let read = tokio::select! {
                read = tokio::time::timeout_at(deadline, self.read.read_buf(&mut self.buffer)) => read,
                _ = self.service.shutdown.cancelled(), if !draining => {
                    let quiet = {
                        let mut shared = lock(&self.shared);
                        shared.draining = true;
                        shared.pending.is_empty()
                    };
                    if quiet {
                        return Err(self.close_with("-ERR [SYS/TEMP] Server shutting down.").await);
                    }
                    continue;
                }
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(End::ClientClosed),
                Ok(Ok(_)) => return Ok(()),
                // A RETR still streaming is not inactivity.
                Err(_) if !lock(&self.shared).pending.is_empty() => deadline = Instant::now() + idle,
                Err(_) => return Err(self.close_with("-ERR Disconnected for inactivity.").await),
            }
        }
    }
}

struct UpstreamPump<'a, R, W> {
    read: ReadHalf<R>,
    write: BufWriter<WriteHalf<W>>,
    buffer: BytesMut,
    scanner: ResponseScanner,
    /// A response has started (its expectation was taken from `pending`).
    answering: bool,
    shared: Arc<Mutex<Shared>>,
    answered: Arc<Notify>,
    inject: mpsc::Receiver<Inject>,
    service: &'a Service,
}

impl<R: AsyncRead + AsyncWrite, W: AsyncRead + AsyncWrite> UpstreamPump<'_, R, W> {
    async fn run(&mut self) -> End {
        loop {
            while !self.buffer.is_empty() {
                if let Err(end) = self.process().await {
                    return end;
                }
            }
            if self.write.flush().await.is_err() {
                return End::ClientClosed;
            }
            let at_boundary = !self.answering;
            let shutdown_ready = {
                let shared = lock(&self.shared);
                shared.draining && shared.pending.is_empty()
            };
            self.buffer.reserve(IO_CHUNK);
            tokio::select! {
                read = self.read.read_buf(&mut self.buffer) => match read {
                    Ok(0) | Err(_) => return self.upstream_gone().await,
                    Ok(_) => {}
                },
                inject = self.inject.recv(), if at_boundary => {
                    let Some(inject) = inject else { continue };
                    let _ = self.write.write_all(inject.line.as_bytes()).await;
                    if self.write.write_all(b"\r\n").await.is_err() || self.write.flush().await.is_err() {
                        return End::ClientClosed;
                    }
                    if inject.then_close {
                        return End::Closed(inject.line);
                    }
                }
                _ = self.service.shutdown.cancelled(), if at_boundary && shutdown_ready => {
                    let _ = self.write.write_all(b"-ERR [SYS/TEMP] Server shutting down.\r\n").await;
                    let _ = self.write.flush().await;
                    return End::Closed("shutdown");
                }
            }
        }
    }

    async fn upstream_gone(&mut self) -> End {
        if self.answering {
            debug!("upstream closed mid-response: closing the client without completing it");
        } else if !lock(&self.shared).pending.is_empty() {
            let _ = self.write.write_all(b"-ERR [SYS/TEMP] Mail server closed the connection.\r\n").await;
            let _ = self.write.flush().await;
        }
        End::UpstreamClosed
    }

    async fn process(&mut self) -> Result<(), End> {
        if !self.answering {
            // Unsolicited bytes (no command pending) are read as a single line.
            let body = lock(&self.shared).pending.front().copied().unwrap_or(false);
            self.scanner.expect(body);
            self.answering = true;
        }
        let step = match self.scanner.feed(&self.buffer) {
            Ok(step) => step,
            Err(e) => {
                debug!(error = %e, "upstream response not understood; closing");
                return Err(End::UpstreamClosed);
            }
        };
        let bytes = self.buffer.split_to(step.consumed);
        if self.write.write_all(&bytes).await.is_err() {
            return Err(End::ClientClosed);
        }
        if matches!(step.event, Some(Event::End) | Some(Event::Status { body: false, .. })) {
            self.answering = false;
            lock(&self.shared).pending.pop_front();
            self.answered.notify_one();
        }
        Ok(())
    }
}
