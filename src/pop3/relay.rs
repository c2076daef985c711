//! After login: POP3 commands and responses relayed byte for byte, RETR and TOP served from
//! the message cache when they can be.
//!
//! POP3 responses say nothing about whether a body follows; the command does (`RETR`, `TOP`,
//! `LIST`/`UIDL` without argument, `CAPA`). So the *client pump* queues, for each command, what
//! its answer will be ([`Pending`]), and the *upstream pump* follows the responses in that
//! order with a [`ResponseScanner`], streaming every byte as it arrives. A response the cache
//! can give is queued as [`Pending::Cached`] and written in its turn, so pipelined commands
//! keep their order. For an upstream without `PIPELINING` at most one command is outstanding,
//! which is why mailgate may announce `PIPELINING` to every client.
//!
//! The cache holds whole RETR responses by UIDL (learned with one `UIDL` at session start and
//! from the client's own UIDL commands); `TOP n k` is cut from a cached RETR. A message marked
//! deleted in this session is never served from the cache (the upstream answers `-ERR`).
//! Only a response that completed with its terminating line is stored.
//!
//! The upstream failing inside a body closes the client connection without the terminating
//! `.` line: a message that looks complete but is not would be worse than an error.
//! Deletions stay the upstream's business: they happen when the upstream completes `QUIT`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tracing::debug;

use super::codec::{multiline_if_ok, split_command, CodecError, Event, LineReader, ResponseScanner};
use super::upstream::LoggedIn;
use crate::cache::{Claim, Key, Kind, LoadGuard, Name, Pop3Key, Scope};
use crate::pumps::{self, Outbox, Unread};
use crate::service::{Handover, Service};

/// Commands waiting for their responses; more are not read until some are answered.
const MAX_IN_FLIGHT: usize = 100;
/// A UIDL listing larger than this is relayed but not learned from.
const MAX_UIDL_LISTING: usize = 16 << 20;

/// What the answer to a queued command teaches the session.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Track {
    Nothing,
    /// RETR of this message number: store the response in the cache.
    Retr(u32),
    /// mailgate's own RETR of a message the client got from the cache, for the effect a
    /// RETR has upstream (Dovecot sets `\Seen`); the answer only checks the cached copy.
    Seen(u32),
    /// DELE of this message number; `None`: of an argument mailgate does not read the way
    /// the upstream may.
    Dele(Option<u32>),
    Rset,
    /// A UIDL listing or single UIDL line; `internal`: mailgate asked, the client did not.
    Uidl {
        internal: bool,
    },
    /// A LIST listing or single LIST line (message sizes).
    List {
        internal: bool,
    },
    /// A TOP relayed: its status line is what a TOP from the cache says.
    Top,
    /// The client's QUIT: its answer is the last one.
    Quit,
    /// STAT: the maildrop's size, for the support history.
    Stat,
}

impl Track {
    /// mailgate's own command: its answer is not the client's.
    fn internal(&self) -> bool {
        matches!(self, Track::Seen(_) | Track::Uidl { internal: true } | Track::List { internal: true })
    }
}

/// Where an account's upstream's TOP status line is kept (`+OK` for Dovecot, `+OK headers
/// follow.` for Courier): a TOP cut from a cached RETR says what the upstream says.
fn top_status_key(scope: &Scope) -> Key {
    Key::Pop3(Pop3Key { account: scope.account.clone(), uidl: Name::new("\0top"), size: 0 })
}

/// A message number as the cache path reads it: digits only, no sign, no leading zero.
/// Anything else (`+1`, `01`, trailing junk) is the upstream's to judge.
fn message_number(word: &[u8]) -> Option<u32> {
    let canonical = !word.is_empty() && word[0] != b'0' && word.iter().all(u8::is_ascii_digit);
    canonical.then(|| std::str::from_utf8(word).ok()?.parse().ok()).flatten()
}

/// The arguments of `RETR n` / `TOP n k` / `DELE n` when they are exactly that: single
/// spaces, canonical numbers, nothing after.
fn numbers<const N: usize>(args: &[u8]) -> Option<[u32; N]> {
    let mut words = args.split(|&b| b == b' ');
    let mut out = [0; N];
    for slot in &mut out {
        *slot = match words.next()? {
            // TOP's line count may be 0.
            b"0" => 0,
            word => message_number(word)?,
        };
    }
    words.next().is_none().then_some(out)
}

enum Pending {
    /// `load`: this session loads the message for every session that misses it meanwhile.
    Upstream {
        body: bool,
        track: Track,
        load: Option<LoadGuard>,
        /// The metric label and when the command arrived.
        label: &'static str,
        started: Instant,
    },
    Cached(Bytes),
}

#[derive(Default)]
struct Shared {
    pending: VecDeque<Pending>,
    draining: bool,
    /// Message number → UIDL, as the upstream reported them.
    uidl: HashMap<u32, Arc<str>>,
    /// Message number → size in octets, from the upstream's LIST.
    sizes: HashMap<u32, u64>,
    /// Messages the upstream marked deleted in this session (its `+OK` to DELE); cleared by
    /// its `+OK` to RSET. Only the upstream's answers change it.
    deleted: HashSet<u32>,
    /// DELEs sent and not yet answered (a RETR behind one is not answered from the cache),
    /// and RSETs likewise.
    deleting: Vec<u32>,
    resetting: usize,
    /// The upstream accepted a DELE whose argument mailgate did not read: which message it
    /// deleted is unknown, so nothing more is answered from the cache.
    cache_off: bool,
    /// How many such DELEs the upstream accepted (deletions all the same).
    deleted_unread: u64,
    /// The upstream answered QUIT with `+OK`: the deletions are committed (RFC 1939 §6).
    quit_ok: bool,
    /// The maildrop as the session's first STAT found it.
    maildrop: Option<crate::insight::Maildrop>,
    /// mailgate's own UIDL and LIST still unanswered: cache decisions wait for them.
    learning: usize,
    /// The upstream answered the client's QUIT: the session is over (RFC 1939 §6, `+OK` or
    /// `-ERR` alike), and the upstream closing is how it ends, not a failure.
    quit_answered: bool,
}

impl Shared {
    /// The cache key of message `n` when the session may answer it from the cache: its
    /// UIDL and size are known, and no DELE or RSET of this session makes its state unsure.
    fn key(&self, scope: &Scope, n: u32) -> Option<Key> {
        let unsure = self.cache_off || self.resetting > 0 || self.deleted.contains(&n) || self.deleting.contains(&n);
        if unsure {
            return None;
        }
        self.content_key(scope, n)
    }

    /// The key message `n`'s content is stored under (a deletion does not change it).
    fn content_key(&self, scope: &Scope, n: u32) -> Option<Key> {
        let (uidl, size) = (self.uidl.get(&n)?, *self.sizes.get(&n)?);
        Some(Key::Pop3(Pop3Key { account: scope.account.clone(), uidl: Name::new(uidl), size }))
    }
}

/// The bounded metric label of a POP3 command keyword.
fn metric_label(keyword: &str) -> &'static str {
    const LABELS: &[&str] =
        &["stat", "list", "uidl", "retr", "top", "dele", "rset", "noop", "quit", "capa", "auth", "user", "pass"];
    LABELS.iter().find(|l| keyword.eq_ignore_ascii_case(l)).copied().unwrap_or("other")
}

/// How long a RETR miss waits for another session loading the same message.
const SHARED_LOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// What [`ClientPump::claim_retr`] found.
enum SharedLoad {
    /// Another session loaded it meanwhile.
    Value(Bytes),
    /// Load it (for everyone, with the guard).
    Load(Option<LoadGuard>),
}

struct Inject {
    line: &'static str,
    then_close: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The upstream answered the client's QUIT.
    Logout,
    ClientClosed,
    UpstreamClosed,
    Closed(&'static str),
}

/// Relays a logged-in session to its end. The user's session slot is released when it returns.
pub async fn run(handover: Handover<LoggedIn>, service: &Service) {
    let Handover { client, leftover, upstream, scope, account, lease: _lease, unidentified: _, mut activity } =
        handover;
    let account = account.as_str();
    let bytes = crate::metrics::SessionBytes::default();
    let shared = Arc::new(Mutex::new(Shared::default()));
    let answered = Arc::new(Notify::new());
    let queued = Arc::new(Notify::new());
    let (inject_tx, inject_rx) = mpsc::channel::<Box<Inject>>(4);
    let (client_read, client_write) =
        tokio::io::split(service.throttled(service.counted(client, true, &bytes), account));
    let (upstream_read, upstream_write) = tokio::io::split(service.counted(upstream.stream, false, &bytes));
    let limits = &service.config.pop3;

    let mut to_upstream = ClientPump {
        read: client_read,
        write: Outbox::new(upstream_write),
        buffer: leftover,
        lines: LineReader::new(limits.max_line_bytes.as_usize()),
        window: if upstream.pipelining { MAX_IN_FLIGHT } else { 1 },
        shared: shared.clone(),
        answered: answered.clone(),
        queued: queued.clone(),
        inject: inject_tx,
        scope: scope.clone(),
        service,
        label: "other",
        started: Instant::now(),
        account: account.to_string(),
        commands: 0,
        messages: 0,
        cache_hits: 0,
        cache_misses: 0,
        cache_bytes: 0,
        quit_sent: false,
    };
    let mut to_client = UpstreamPump {
        read: upstream_read,
        write: Outbox::new(client_write),
        buffer: upstream.leftover,
        scanner: ResponseScanner::default(),
        answering: None,
        capture: Vec::new(),
        skip_capture: false,
        prompted: false,
        load: None,
        timing: None,
        shared,
        answered,
        queued,
        inject: inject_rx,
        scope,
        service,
    };

    if to_upstream.scope.is_some() {
        // Learn the UIDLs and sizes once, so that RETR and TOP can be served by UIDL.
        lock(&to_upstream.shared).learning = 2;
        for (command, track) in [("UIDL", Track::Uidl { internal: true }), ("LIST", Track::List { internal: true })] {
            if let Err(end) = to_upstream.send_upstream(command.as_bytes().to_vec(), true, track).await {
                debug!(?end, "could not ask for UIDLs and sizes");
            }
        }
    }

    let end = {
        let (upstream_side, client_side) = (std::pin::pin!(to_client.run()), std::pin::pin!(to_upstream.run()));
        crate::pumps::drive(upstream_side, client_side).await
    };
    let _ = to_client.write.shutdown().await;
    // After QUIT's answer both sides close at about the same time; which close a pump sees
    // first is chance, and says nothing about how the session ended.
    let end = if lock(&to_client.shared).quit_answered { End::Logout } else { end };
    tracing::info!(
        reason = ?end,
        cache_hits = to_upstream.cache_hits,
        cache_misses = to_upstream.cache_misses,
        cache_bytes = to_upstream.cache_bytes,
        "session ended"
    );
    service.session_cost(account, &bytes, to_upstream.commands, to_upstream.messages);
    if let Some(activity) = activity.as_mut() {
        let shared = lock(&to_client.shared);
        let summary = &mut activity.summary;
        summary.bytes = bytes.client.1.load(std::sync::atomic::Ordering::Relaxed);
        summary.messages = to_upstream.messages;
        // Deletions happen when the upstream completes QUIT with +OK, and only then.
        summary.deleted = if shared.quit_ok { shared.deleted.len() as u64 + shared.deleted_unread } else { 0 };
        // Without a STAT of the client's, the listing mailgate asked for (the cache's) says it.
        summary.maildrop = shared.maildrop.or_else(|| {
            (!shared.sizes.is_empty()).then(|| crate::insight::Maildrop {
                messages: shared.sizes.len() as u64,
                octets: shared.sizes.values().sum(),
            })
        });
    }
}

/// The maildrop of a `+OK n size` STAT answer (RFC 1939 §5: "drop listing"), when it says one.
fn stat_answer(line: &[u8]) -> Option<crate::insight::Maildrop> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split(' ').skip(1);
    let messages = words.next()?.trim().parse().ok()?;
    let octets = words.next()?.trim().parse().ok()?;
    Some(crate::insight::Maildrop { messages, octets })
}

/// The session's state as the client pump's read sees it: a RETR still streaming is not
/// inactivity, and holds a shutdown back.
struct WaitingFor<'a>(&'a Mutex<Shared>);

impl pumps::Waiting for WaitingFor<'_> {
    fn draining(&self) -> bool {
        lock(self.0).draining
    }

    fn start_draining(&self) -> bool {
        let mut shared = lock(self.0);
        shared.draining = true;
        shared.pending.is_empty()
    }

    fn busy(&self) -> bool {
        !lock(self.0).pending.is_empty()
    }
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().expect("relay lock poisoned")
}

/// `TOP n k` from a cached RETR response: `status` (the upstream's own TOP status line,
/// with its line end), the header, the empty line and `k` body lines of the (dot-stuffed)
/// message, then the terminating line (RFC 1939 §7).
pub fn top_from_retr(status: &[u8], retr: &[u8], lines: usize) -> Vec<u8> {
    let body_start = retr.iter().position(|&b| b == b'\n').map_or(retr.len(), |i| i + 1);
    let message = &retr[body_start..retr.len().saturating_sub(3)]; // without ".\r\n"
    let mut out = status.to_vec();
    let mut in_header = true;
    let mut body_lines = 0;
    let mut start = 0;
    while start < message.len() {
        let end = message[start..].iter().position(|&b| b == b'\n').map_or(message.len(), |i| start + i + 1);
        let line = &message[start..end];
        if !in_header {
            if body_lines == lines {
                break;
            }
            body_lines += 1;
        } else if line == b"\r\n" || line == b"\n" {
            in_header = false;
        }
        out.extend_from_slice(line);
        start = end;
    }
    out.extend_from_slice(b".\r\n");
    out
}

struct ClientPump<'a, R, W> {
    read: ReadHalf<R>,
    write: Outbox<WriteHalf<W>>,
    buffer: BytesMut,
    lines: LineReader,
    /// Commands that may be outstanding at once: 1 for an upstream without PIPELINING.
    window: usize,
    shared: Arc<Mutex<Shared>>,
    answered: Arc<Notify>,
    queued: Arc<Notify>,
    inject: mpsc::Sender<Box<Inject>>,
    scope: Option<Scope>,
    service: &'a Service,
    /// The command being handled: its metric label and arrival (answers from the cache are
    /// timed here, the others when the upstream's answer ends).
    label: &'static str,
    started: Instant,
    /// Whose session this is (the per-user command rate).
    account: String,
    /// This session's commands and retrieved messages (its sync cost).
    commands: u64,
    messages: u64,
    /// This session's RETR/TOP answered from the cache, and not.
    cache_hits: u64,
    cache_misses: u64,
    cache_bytes: u64,
    /// The client's QUIT was sent upstream: later commands are dropped.
    quit_sent: bool,
}

impl<R: AsyncRead + AsyncWrite, W: AsyncRead + AsyncWrite> ClientPump<'_, R, W> {
    async fn close_with(&mut self, line: &'static str) -> End {
        let _ = self.inject.send(Box::new(Inject { line, then_close: true })).await;
        End::Closed(line)
    }

    async fn run(&mut self) -> End {
        let end = self.pump().await;
        if end == End::ClientClosed {
            // The upstream finishes answering what was sent, then closes its side too.
            let _ = self.write.shutdown().await;
        }
        end
    }

    async fn pump(&mut self) -> End {
        loop {
            while !self.buffer.is_empty() {
                let (consumed, line) = match self.lines.feed(&self.buffer) {
                    Ok(step) => step,
                    Err(CodecError::LineTooLong(_)) => return self.close_with("-ERR Line too long.").await,
                };
                let _ = self.buffer.split_to(consumed);
                if let Some(line) = line {
                    if let Err(end) = self.command(line).await {
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

    /// Answers a command from the cache when possible, else forwards it.
    async fn command(&mut self, line: Vec<u8>) -> Result<(), End> {
        if self.quit_sent {
            // Nothing follows QUIT's answer (the upstream closes): a command pipelined
            // behind it is not sent, so that no answer to it can come after QUIT's.
            return Ok(());
        }
        let (keyword, args) = split_command(&line);
        self.quit_sent = keyword == "QUIT";
        self.service.command_rate(&self.account).await;
        let label = metric_label(&keyword);
        self.service.metrics.commands.with_label_values(&["pop3", label]).inc();
        self.commands += 1;
        if label == "retr" {
            self.messages += 1;
        }
        self.label = label;
        self.started = Instant::now();
        let track = match keyword.as_str() {
            "RETR" => numbers::<1>(args).map_or(Track::Nothing, |[n]| Track::Retr(n)),
            "DELE" => Track::Dele(numbers::<1>(args).map(|[n]| n)),
            "RSET" => Track::Rset,
            "UIDL" => Track::Uidl { internal: false },
            "LIST" => Track::List { internal: false },
            "TOP" => Track::Top,
            "QUIT" => Track::Quit,
            "STAT" => Track::Stat,
            _ => Track::Nothing,
        };
        match &track {
            Track::Dele(Some(n)) => lock(&self.shared).deleting.push(*n),
            Track::Rset => lock(&self.shared).resetting += 1,
            _ => {}
        }
        if (keyword == "RETR" || keyword == "TOP") && self.service.download_refused(&self.account) {
            self.wait_for_room().await?;
            let refusal = Bytes::from_static(b"-ERR [SYS/TEMP] Download quota used up, try again later.\r\n");
            lock(&self.shared).pending.push_back(Pending::Cached(refusal));
            self.queued.notify_one();
            return Ok(());
        }
        // Only exactly spelled RETR/TOP are answered from the cache; whatever else the
        // upstream makes of them (`RETR +1`, `TOP 1 0 junk`) it says itself.
        let cacheable = match keyword.as_str() {
            "RETR" => numbers::<1>(args).map(|[n]| (n, None)),
            "TOP" => numbers::<2>(args).filter(|[n, _]| *n > 0).map(|[n, k]| (n, Some(k))),
            _ => None,
        };
        if let Some((n, top)) = cacheable {
            if let Some(response) = Box::pin(self.cached_answer(n, top)).await {
                return self.answer_cached(response, top.is_none().then_some(n)).await;
            }
        }
        let mut load = None;
        if let Track::Retr(n) = track {
            match self.claim_retr(n).await {
                SharedLoad::Value(response) => return self.answer_cached(response, Some(n)).await,
                SharedLoad::Load(guard) => load = guard,
            }
        }
        // A miss is a message the cache could have answered: one the upstream listed.
        if let (Some(scope), Some((n, _))) = (&self.scope, cacheable) {
            if lock(&self.shared).content_key(scope, n).is_some() {
                self.cache_misses += 1;
            }
        }
        if keyword == "QUIT" {
            self.wait_for_own_commands().await?;
        }
        let body = multiline_if_ok(&keyword, args);
        self.send_upstream_loading(line, body, track, load).await
    }

    /// Waits until the upstream has answered mailgate's own commands (its RETRs for
    /// `\Seen`, its UIDL and LIST). Dovecot 2.3 over TLS drops output still in flight when
    /// a pipelined QUIT ends the session (about one session in a thousand in the soak), so
    /// the client's QUIT, which it did not pipeline, must not be pipelined behind them.
    async fn wait_for_own_commands(&mut self) -> Result<(), End> {
        self.wait_until(|shared| {
            let own = shared.pending.iter().any(|p| matches!(p, Pending::Upstream { track, .. } if track.internal()));
            (!own).then_some(Ok(()))
        })
        .await
    }

    /// RETR (or TOP with `top_lines`) of message `n` from the cache.
    async fn cached_answer(&mut self, n: u32, top_lines: Option<u32>) -> Option<Bytes> {
        self.scope.as_ref()?;
        while lock(&self.shared).learning > 0 {
            let answered = self.answered.notified();
            if lock(&self.shared).learning == 0 {
                break;
            }
            // What is written must be flushed to be answered.
            if self.write.flush().await.is_err() {
                return None;
            }
            // An upstream that never answers: relay the command instead (and let the idle
            // timeout of the ordinary path end the session).
            if tokio::time::timeout(self.service.config.pop3.idle_timeout.0, answered).await.is_err() {
                return None;
            }
        }
        let scope = self.scope.as_ref()?;
        let key = lock(&self.shared).key(scope, n)?;
        // A TOP needs the upstream's own status line, learned from a TOP it answered.
        let status = match top_lines {
            None => None,
            Some(_) => Some(scope.cache.peek(&top_status_key(scope)).await?),
        };
        let retr = match scope.cache.get(&key, Kind::Pop3).await {
            Some(retr) => retr,
            // The fleet's tier (one round trip), kept in memory when found.
            None => {
                let found = scope.cache.shared()?.get_many(std::slice::from_ref(&key)).await.pop().flatten()?;
                scope.cache.insert(key, found.clone()).await;
                found
            }
        };
        let response = match (top_lines, status) {
            (Some(k), Some(status)) => Bytes::from(top_from_retr(&status, &retr, k as usize)),
            _ => retr,
        };
        scope.cache.served(response.len());
        Some(response)
    }

    /// Queues a response from the cache (or another session's load) in the command's
    /// turn: counted as a hit and timed once. For a RETR (`retr` is its message number) the
    /// upstream is sent the same RETR, its answer not shown to the client, when
    /// `cache.pop3_mark_seen` says so: a RETR has effects upstream (Dovecot marks the
    /// message `\Seen` at the end of the session) that the client must not lose.
    async fn answer_cached(&mut self, response: Bytes, retr: Option<u32>) -> Result<(), End> {
        self.cache_hits += 1;
        self.cache_bytes += response.len() as u64;
        self.wait_for_room().await?;
        lock(&self.shared).pending.push_back(Pending::Cached(response));
        let seconds = self.started.elapsed().as_secs_f64();
        self.service.metrics.command_duration.with_label_values(&["pop3", self.label]).observe(seconds);
        self.queued.notify_one();
        if let Some(n) = retr.filter(|_| self.service.config.cache.pop3_mark_seen) {
            self.send_upstream(format!("RETR {n}").into_bytes(), true, Track::Seen(n)).await?;
        }
        Ok(())
    }

    /// A RETR miss: load it for everyone, or take what another session is loading.
    async fn claim_retr(&mut self, n: u32) -> SharedLoad {
        let Some(scope) = self.scope.clone() else { return SharedLoad::Load(None) };
        let Some(key) = lock(&self.shared).key(&scope, n) else { return SharedLoad::Load(None) };
        match scope.cache.claim(key) {
            Claim::Load(guard) => SharedLoad::Load(Some(guard)),
            Claim::Wait(value) => {
                // The load may be this session's own earlier command, still in the write
                // buffer: it must reach the upstream to be answered.
                if self.write.flush().await.is_err() {
                    return SharedLoad::Load(None);
                }
                match tokio::time::timeout(SHARED_LOAD_WAIT, value).await {
                    Ok(Ok(Some(response))) => {
                        scope.cache.served(response.len());
                        SharedLoad::Value(response)
                    }
                    // That load failed or is slow: load it ourselves (without the guard).
                    _ => SharedLoad::Load(None),
                }
            }
        }
    }

    async fn wait_for_room(&mut self) -> Result<(), End> {
        let window = self.window;
        self.wait_until(|shared| {
            if shared.draining {
                // Shutdown: no new commands (and no QUIT: deletions are not committed).
                return Some(Err(End::Closed("shutdown")));
            }
            (shared.pending.len() < window).then_some(Ok(()))
        })
        .await
    }

    /// Waits until `ready` gives an outcome, flushing what is written (it must reach the
    /// upstream to be answered); a whole idle period without an answer ends the session.
    async fn wait_until(&mut self, ready: impl Fn(&Shared) -> Option<Result<(), End>>) -> Result<(), End> {
        loop {
            let answered = self.answered.notified();
            if let Some(outcome) = ready(&lock(&self.shared)) {
                return outcome;
            }
            if self.write.flush().await.is_err() {
                return Err(End::UpstreamClosed);
            }
            let deadline = Instant::now() + self.service.config.pop3.idle_timeout.0;
            if tokio::time::timeout_at(deadline, answered).await.is_err() {
                return Err(self.close_with("-ERR Disconnected for inactivity.").await);
            }
        }
    }

    async fn send_upstream(&mut self, line: Vec<u8>, body: bool, track: Track) -> Result<(), End> {
        self.send_upstream_loading(line, body, track, None).await
    }

    async fn send_upstream_loading(
        &mut self,
        line: Vec<u8>,
        body: bool,
        track: Track,
        load: Option<LoadGuard>,
    ) -> Result<(), End> {
        self.wait_for_room().await?;
        let (label, started) = (self.label, self.started);
        lock(&self.shared).pending.push_back(Pending::Upstream { body, track, load, label, started });
        self.queued.notify_one();
        let written = async {
            self.write.write_all(&line).await?;
            self.write.write_all(b"\r\n").await
        };
        written.await.map_err(|_| End::UpstreamClosed)
    }

    async fn read_more(&mut self) -> Result<(), End> {
        let idle = self.service.config.pop3.idle_timeout.0;
        let state = WaitingFor(&self.shared);
        // Commands are short: the read waits in a small buffer.
        match pumps::read_client(&mut self.read, &mut self.buffer, true, idle, &self.service.shutdown, &state).await {
            Ok(_) => Ok(()),
            // POP3 has no COMPRESS: a read that fails is a connection that failed.
            Err(Unread::Closed | Unread::Unreadable) => Err(End::ClientClosed),
            Err(Unread::Shutdown) => Err(self.close_with("-ERR [SYS/TEMP] Server shutting down.").await),
            Err(Unread::Idle) => Err(self.close_with("-ERR Disconnected for inactivity.").await),
        }
    }
}

struct UpstreamPump<'a, R, W> {
    read: ReadHalf<R>,
    write: Outbox<WriteHalf<W>>,
    buffer: BytesMut,
    scanner: ResponseScanner,
    /// The response being read, once started (taken from the front of `pending`).
    answering: Option<Track>,
    /// The response's bytes, kept while they may be stored or learned from.
    capture: Vec<u8>,
    /// This response is not worth capturing (larger than a cache entry, or a RETR of a
    /// message whose UIDL is unknown).
    skip_capture: bool,
    /// The response being read answers the command at the front of `pending` (and not
    /// bytes the upstream sent unprompted).
    prompted: bool,
    /// This response loads a message that other sessions may be waiting for.
    load: Option<LoadGuard>,
    /// The metric label and start of the command being answered.
    timing: Option<(&'static str, Instant)>,
    shared: Arc<Mutex<Shared>>,
    answered: Arc<Notify>,
    queued: Arc<Notify>,
    inject: mpsc::Receiver<Box<Inject>>,
    scope: Option<Scope>,
    service: &'a Service,
}

impl<R: AsyncRead + AsyncWrite, W: AsyncRead + AsyncWrite> UpstreamPump<'_, R, W> {
    async fn run(&mut self) -> End {
        loop {
            if let Err(end) = self.write_cached().await {
                return end;
            }
            while !self.buffer.is_empty() {
                if let Err(end) = self.process().await {
                    return end;
                }
                if let Err(end) = self.write_cached().await {
                    return end;
                }
            }
            if self.write.flush().await.is_err() {
                return End::ClientClosed;
            }
            let at_boundary = self.answering.is_none();
            let shutdown_ready = {
                let shared = lock(&self.shared);
                shared.draining && shared.pending.is_empty()
            };
            let waiting = at_boundary && {
                let mut shared = lock(&self.shared);
                // A pipelined burst's room is not kept while the session waits.
                let empty = shared.pending.is_empty();
                if empty {
                    shared.pending.shrink_to(8);
                }
                empty
            };
            tokio::select! {
                read = pumps::read_into(&mut self.read, &mut self.buffer, waiting) => match read {
                    Ok(0) | Err(_) => return self.upstream_gone().await,
                    Ok(_) => {}
                },
                _ = self.queued.notified(), if at_boundary => {}
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

    /// Writes the cached responses whose turn it is: after every answer the client will
    /// see that was queued before them. mailgate's own commands (whose answers the client
    /// never sees) do not hold them back.
    async fn write_cached(&mut self) -> Result<(), End> {
        if self.answering.as_ref().is_some_and(|track| !track.internal()) {
            return Ok(());
        }
        loop {
            let cached = {
                let mut shared = lock(&self.shared);
                let next = shared.pending.iter().position(|p| match p {
                    Pending::Cached(_) => true,
                    Pending::Upstream { track, .. } => !track.internal(),
                });
                match next.map(|i| (i, &shared.pending[i])) {
                    Some((i, Pending::Cached(_))) => match shared.pending.remove(i) {
                        Some(Pending::Cached(bytes)) => bytes,
                        _ => unreachable!("the entry was just seen to be cached"),
                    },
                    _ => return Ok(()),
                }
            };
            self.answered.notify_one();
            if self.write.write_all(&cached).await.is_err() {
                return Err(End::ClientClosed);
            }
        }
    }

    async fn upstream_gone(&mut self) -> End {
        if self.answering.is_some() {
            debug!("upstream closed mid-response: closing the client without completing it");
        } else if lock(&self.shared).quit_answered {
            return End::Logout;
        } else if !lock(&self.shared).pending.is_empty() {
            let _ = self.write.write_all(b"-ERR [SYS/TEMP] Mail server closed the connection.\r\n").await;
            let _ = self.write.flush().await;
        }
        End::UpstreamClosed
    }

    async fn process(&mut self) -> Result<(), End> {
        if self.answering.is_none() {
            // Unsolicited bytes (no command pending) are read as a single line.
            let (body, track, prompted, known) = {
                let mut shared = lock(&self.shared);
                let start = match shared.pending.front() {
                    Some(Pending::Upstream { body, track, .. }) => {
                        let known = match (track, &self.scope) {
                            (Track::Retr(n) | Track::Seen(n), Some(scope)) => shared.content_key(scope, *n).is_some(),
                            _ => true,
                        };
                        (*body, track.clone(), true, known)
                    }
                    _ => (false, Track::Nothing, false, true),
                };
                if let Some(Pending::Upstream { load, label, started, .. }) = shared.pending.front_mut() {
                    self.load = load.take();
                    self.timing = Some((*label, *started));
                }
                start
            };
            self.scanner.expect(body);
            self.answering = Some(track);
            self.prompted = prompted;
            self.skip_capture = !known;
            self.capture.clear();
        }
        let step = match self.scanner.feed(&self.buffer) {
            Ok(step) => step,
            Err(e) => {
                debug!(error = %e, "upstream response not understood; closing");
                return Err(End::UpstreamClosed);
            }
        };
        let bytes = self.buffer.split_to(step.consumed);
        let track = self.answering.as_ref().expect("a response is being read");
        if let (Track::Top, Some(Event::Status { ok: true, line, .. }), Some(scope)) = (track, &step.event, &self.scope)
        {
            // Only a line that names no message (no number in it) can stand for every TOP.
            if !line.iter().any(u8::is_ascii_digit) && line.len() <= 200 {
                let status = Bytes::from([line.as_slice(), b"\r\n"].concat());
                // Boxed: a cache insert's state is large, and rare here.
                Box::pin(scope.cache.insert(top_status_key(scope), status)).await;
            }
        }
        if let (Track::Stat, Some(Event::Status { ok: true, line, .. })) = (track, &step.event) {
            let mut shared = lock(&self.shared);
            if shared.maildrop.is_none() {
                shared.maildrop = stat_answer(line);
            }
        }
        if self.wants_capture(track) {
            if let (Track::Retr(_) | Track::Seen(_), Some(Event::Status { line, body: true, .. })) =
                (track, &step.event)
            {
                // "+OK 4022 octets": room for the whole response at once.
                let octets = String::from_utf8_lossy(line).split(' ').nth(1).and_then(|n| n.parse::<usize>().ok());
                let limit = self.scope.as_ref().map_or(0, |s| s.cache.max_entry_bytes());
                match octets {
                    Some(octets) if octets <= limit => self.capture.reserve(octets + octets / 32 + 64),
                    // Too large to be cached: not copied at all.
                    Some(_) => self.skip_capture = true,
                    None => {}
                }
            }
            self.capture.extend_from_slice(&bytes);
        }
        if !track.internal() && self.write.write_all(&bytes).await.is_err() {
            return Err(End::ClientClosed);
        }
        let ok = match &step.event {
            Some(Event::End) => Some(true),
            Some(Event::Status { ok, body: false, .. }) => Some(*ok),
            _ => None,
        };
        if let Some(ok) = ok {
            let track = self.answering.take().expect("a response is being read");
            // mailgate's own commands are not the client's.
            if let Some((label, started)) = self.timing.take().filter(|_| !track.internal()) {
                let seconds = started.elapsed().as_secs_f64();
                self.service.metrics.command_duration.with_label_values(&["pop3", label]).observe(seconds);
            }
            if ok {
                // Boxed: a large, rare state would otherwise be in every session's future.
                Box::pin(self.learn(track.clone())).await;
            }
            // A load not filled by `learn` (refused, too large) releases its waiters.
            self.load = None;
            // A large capture is not kept for the rest of the session.
            if self.capture.capacity() > 64 << 10 {
                self.capture = Vec::new();
            }
            {
                let mut shared = lock(&self.shared);
                if std::mem::take(&mut self.prompted) {
                    shared.pending.pop_front();
                }
                // Only the upstream's answers change what the session knows is deleted.
                match track {
                    Track::Uidl { internal: true } | Track::List { internal: true } => {
                        shared.learning = shared.learning.saturating_sub(1);
                    }
                    Track::Dele(n) => {
                        if let Some(i) = n.and_then(|n| shared.deleting.iter().position(|&d| d == n)) {
                            shared.deleting.swap_remove(i);
                        }
                        match (ok, n) {
                            (true, Some(n)) => drop(shared.deleted.insert(n)),
                            (true, None) => {
                                shared.cache_off = true;
                                shared.deleted_unread += 1;
                            }
                            (false, _) => {}
                        }
                    }
                    Track::Rset => {
                        shared.resetting = shared.resetting.saturating_sub(1);
                        if ok {
                            shared.deleted.clear();
                            shared.deleted_unread = 0;
                        }
                    }
                    Track::Quit => {
                        shared.quit_answered = true;
                        shared.quit_ok = ok;
                    }
                    _ => {}
                }
            }
            self.answered.notify_one();
        }
        Ok(())
    }

    fn wants_capture(&self, track: &Track) -> bool {
        if self.skip_capture {
            return false;
        }
        match track {
            Track::Retr(_) | Track::Seen(_) => {
                self.scope.as_ref().is_some_and(|s| self.capture.len() <= s.cache.max_entry_bytes())
            }
            Track::Uidl { .. } | Track::List { .. } => self.capture.len() <= MAX_UIDL_LISTING,
            _ => false,
        }
    }

    /// Applies what a successful answer says about the session.
    async fn learn(&mut self, track: Track) {
        match track {
            // Applied when the answer ends (see `process`).
            Track::Nothing | Track::Dele(_) | Track::Rset | Track::Top | Track::Quit | Track::Stat => {}
            Track::Uidl { .. } | Track::List { .. } => {
                if self.capture.len() > MAX_UIDL_LISTING {
                    return;
                }
                let mut shared = lock(&self.shared);
                for (n, value) in listing(&self.capture) {
                    if matches!(track, Track::Uidl { .. }) {
                        shared.uidl.insert(n, Arc::from(value));
                    } else if let Ok(size) = value.parse() {
                        shared.sizes.insert(n, size);
                    }
                }
            }
            Track::Retr(n) | Track::Seen(n) => {
                let Some(scope) = &self.scope else { return };
                // Not captured (too large, or an unknown message), or only partly.
                if self.skip_capture || self.capture.len() > scope.cache.max_entry_bytes() {
                    return;
                }
                let Some(key) = lock(&self.shared).content_key(scope, n) else { return };
                let value = Bytes::from(std::mem::take(&mut self.capture));
                if let Track::Seen(_) = track {
                    // The client was answered from the cache: the upstream's answer checks it.
                    if scope.cache.peek(&key).await.is_some_and(|cached| cached != value) {
                        crate::log_budget::warn_limited!(
                            message = n,
                            "a POP3 message changed under its UIDL and size; replacing the cached copy"
                        );
                        scope.cache.forget_pop3(&key).await;
                        scope.cache.share(&key, value.clone());
                        scope.cache.insert(key, value).await;
                    }
                    return;
                }
                scope.cache.share(&key, value.clone());
                match self.load.take() {
                    Some(guard) => guard.fill(value).await,
                    None => scope.cache.insert(key, value).await,
                }
            }
        }
    }
}

/// `(n, value)` pairs of a UIDL or LIST answer: the listing's lines (`n value`) after its
/// status line, or the single `+OK n value` of one message.
fn listing(response: &[u8]) -> Vec<(u32, &str)> {
    let text = std::str::from_utf8(response).unwrap_or_default();
    let mut lines = text.split('\n').map(str::trim_end).filter(|l| !l.is_empty());
    let status = lines.next().unwrap_or_default();
    let rest: Vec<&str> = lines.collect();
    let pairs: Vec<&str> = if rest.is_empty() { vec![status.trim_start_matches("+OK").trim()] } else { rest };
    pairs
        .into_iter()
        .filter_map(|line| {
            let mut words = line.split(' ');
            match (words.next(), words.next(), words.next()) {
                (Some(n), Some(value), None) => Some((n.parse().ok()?, value)),
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_answers_give_the_maildrop() {
        let drop = stat_answer(b"+OK 2 320").unwrap();
        assert_eq!((drop.messages, drop.octets), (2, 320));
        assert_eq!(stat_answer(b"+OK 2 320\r"), Some(drop));
        assert_eq!(stat_answer(b"+OK"), None);
        assert_eq!(stat_answer(b"+OK mailbox locked"), None);
    }

    #[test]
    fn only_exactly_spelled_numbers_are_read() {
        assert_eq!(numbers::<1>(b"12"), Some([12]));
        assert_eq!(numbers::<2>(b"3 0"), Some([3, 0]));
        for args in [&b"+1"[..], b"1 ", b" 1", b"01", b"1x", b"", b"4294967296"] {
            assert_eq!(numbers::<1>(args), None, "{}", String::from_utf8_lossy(args));
        }
        for args in [&b"1 0 junk"[..], b"1  0", b"1 -1", b"1"] {
            assert_eq!(numbers::<2>(args), None, "{}", String::from_utf8_lossy(args));
        }
    }

    #[test]
    fn listings_give_numbers_and_values() {
        assert_eq!(listing(b"+OK 2 messages:\r\n1 120\r\n2 7\r\n.\r\n"), [(1, "120"), (2, "7")]);
        assert_eq!(listing(b"+OK\r\n1 000000a1\r\n.\r\n"), [(1, "000000a1")]);
        assert_eq!(listing(b"+OK 3 abc\r\n"), [(3, "abc")]);
        assert_eq!(listing(b"+OK 0 messages:\r\n.\r\n"), []);
    }

    #[test]
    fn top_is_cut_from_a_retr_response() {
        let retr = b"+OK 80 octets\r\nSubject: a\r\nFrom: b\r\n\r\nline 1\r\n..dotted 2\r\nline 3\r\n.\r\n";
        assert_eq!(top_from_retr(b"+OK\r\n", retr, 0), b"+OK\r\nSubject: a\r\nFrom: b\r\n\r\n.\r\n");
        assert_eq!(
            top_from_retr(b"+OK\r\n", retr, 2),
            b"+OK\r\nSubject: a\r\nFrom: b\r\n\r\nline 1\r\n..dotted 2\r\n.\r\n"
        );
        assert_eq!(
            top_from_retr(b"+OK\r\n", retr, 99),
            b"+OK\r\nSubject: a\r\nFrom: b\r\n\r\nline 1\r\n..dotted 2\r\nline 3\r\n.\r\n"
        );
        let headers_only = b"+OK 20 octets\r\nSubject: a\r\n.\r\n";
        assert_eq!(top_from_retr(b"+OK top follows\r\n", headers_only, 5), b"+OK top follows\r\nSubject: a\r\n.\r\n");
    }
}
