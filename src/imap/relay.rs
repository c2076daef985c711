//! After login: both directions framed and relayed.
//!
//! Two pumps run concurrently in the session's task. The *client pump* reads commands,
//! buffers each command line (bounded by `max_line_bytes`) until it is complete, checks its
//! literal announcement against `max_literal_bytes`, then forwards it; literal data is
//! streamed. The *upstream pump* streams every response byte to the client as it arrives
//! (nothing upstream-sized is buffered) and watches line heads for continuations, tagged
//! completions and `BYE`. It alone writes to the client; the client pump's own answers
//! (`BAD [TOOBIG]`, the idle `BYE`) are handed to it and written between two responses.
//!
//! A synchronizing literal from the client is forwarded only after the upstream's `+`;
//! whether the bytes that follow are literal data or a new command is decided by what the
//! upstream answered (`+` or a tagged refusal), never guessed.
//!
//! The upstream failing mid-response closes the client connection without another byte: a
//! truncated literal followed by a `* BYE` would look like message data to the client.
//!
//! With `[imap] reuse_for`, a client's LOGOUT may end the session as [`End::Park`]: the
//! client pump answers it (see `ClientPump::park_now` for when), and the upstream stream,
//! its halves joined again, goes to `imap::reuse` instead of being logged out.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tracing::debug;

use super::capabilities;
use super::flags;
use super::framing::{strip_eol, Event, FrameError, Framer};
use super::intercept::{self, Fill, Job, JobError, JobIo, Relayed, Selected};
use super::mailbox::UidMap;
use super::modseq::{self, Enabling, Stripped};
use super::response::{self, Kind, Status};
use super::snapshot::Stored;
use super::upstream::LoggedIn;
use crate::cache::{Name, Scope};
use crate::compress::{Deflate, Inflate};
use crate::pumps::{self, Outbox, Unread};
use crate::service::{Handover, Service};

/// Commands in flight at once. A client that pipelines more (mbsync does, by thousands)
/// is simply not read until the upstream has answered some: TCP backpressure keeps the tag
/// queue bounded without failing the client.
const MAX_IN_FLIGHT: usize = 1000;

/// State both pumps look at; each lock is held for a few instructions only.
#[derive(Default)]
struct Shared {
    /// Tags of forwarded commands not yet completed, oldest first.
    in_flight: VecDeque<InFlight>,
    /// The mailbox's message count (EXISTS, less EXPUNGEs), for the resync metrics.
    exists: Option<u32>,
    /// A message arrived or went since the mailbox was selected: SELECT's UIDNEXT and the
    /// message count no longer name the set of UIDs the session sees.
    view_changed: bool,
    /// FETCH responses relayed since the last FETCH completed.
    fetched: u32,
    /// Commands and messages fetched in this session (its sync cost).
    commands: u64,
    messages: u64,
    /// The tag of a command whose synchronizing literal awaits the upstream's answer, and
    /// that answer once seen (`Some(true)` = `+`, `Some(false)` = refused).
    literal_wait: Option<(Vec<u8>, Option<bool>)>,
    /// The tag of a running IDLE.
    idling: Option<Vec<u8>>,
    /// Set by shutdown: no new commands, BYE once nothing is in flight.
    draining: bool,
    /// The selected mailbox with its UIDVALIDITY (what cache keys need).
    selected: Option<Selected>,
    /// A SELECT/EXAMINE under way.
    selecting: Option<Selecting>,
    /// A FETCH is being answered through the cache.
    job_running: bool,
    /// UID → sequence number in the selected mailbox, as far as known.
    uids: UidMap,
    /// The upstream confirmed `ENABLE QRESYNC`: every FETCH response carries UID.
    qresync: bool,
    /// The upstream reports modification sequences (CONDSTORE was enabled by some command,
    /// RFC 7162 §3.1): seen in `ENABLED`, `[HIGHESTMODSEQ]`, MODSEQ in any response.
    condstore: bool,
    /// The upstream completed a LOGOUT with OK: the session ends as a logout, whichever
    /// side's socket is seen to close first.
    logged_out: bool,
    /// A SELECT or EXAMINE was sent: the session is left with UNSELECT before it is parked.
    ever_selected: bool,
    /// The client's LOGOUT was answered by mailgate: the upstream session is to be parked.
    parking: bool,
    /// Tees completed, to be settled (their stores kept or taken back) by the upstream pump.
    settling: Vec<(Arc<Tee>, bool)>,
    /// The upstream announced CONDSTORE: mailgate may ask it what changed (see
    /// [`super::modseq`]).
    upstream_condstore: bool,
    /// `* n RECENT` of the selected mailbox: flags remembered by the cache carry no
    /// `\Recent`, so they are served (and learned) only where no message is recent.
    recent: Option<u32>,
    /// The wording of the upstream's `[HIGHESTMODSEQ]` announcement, when one was kept from
    /// the client (to announce one the same way).
    modseq_text: Option<Vec<u8>>,
    /// HIGHESTMODSEQ as mailgate's own STATUS just reported it.
    status_modseq: Option<u64>,
    /// The selected mailbox has modification sequences of its own (see
    /// [`Selecting::tracked`]): only then does mailgate ask for them, so that it never turns
    /// them on for a mailbox where the upstream keeps none.
    tracked: bool,
    /// The HIGHESTMODSEQ the selected mailbox announced at SELECT.
    highest_modseq: Option<u64>,
    /// INBOX is the selected mailbox (its name not a literal).
    inbox: bool,
    /// Messages the client's own EXPUNGE and MOVE commands took out of INBOX, and full
    /// resyncs: the support history's (`crate::insight`).
    inbox_removed: u64,
    full_resyncs: u32,
}

impl Shared {
    /// The upstream is answering the client's EXPUNGE or MOVE (the oldest command in
    /// flight) in INBOX: what it expunges now, this client took out of INBOX.
    fn removing_from_inbox(&self) -> bool {
        self.inbox
            && (self.answering()).is_some_and(|f| matches!(f.label, "expunge" | "uid_expunge" | "move" | "uid_move"))
    }

    /// The oldest client command in flight (or mailgate's STATUS): what the upstream's
    /// mailbox responses belong to. mailgate's quota question, at the head until answered,
    /// is passed over: it neither changes nor reports a mailbox, and an upstream that never
    /// answers it must not freeze the session's view of its mailboxes.
    fn answering(&self) -> Option<&InFlight> {
        self.in_flight.iter().find(|f| f.modseq != Own::Quota)
    }

    /// The upstream is answering the SELECT or EXAMINE whose mailbox the session will have
    /// (the oldest command in flight, and the last of its kind).
    fn answering_select(&self) -> bool {
        let selecting = self.selecting.as_ref().map(|s| &s.tag);
        selecting.is_some() && self.answering().map(|f| &f.tag) == selecting
    }

    /// The upstream is answering a command that changes the selected mailbox (a SELECT
    /// pipelined behind another included).
    fn answering_reselect(&self) -> bool {
        self.answering().is_some_and(|f| f.reselect == Reselect::Started)
    }

    /// See [`JobIo::modseq_usable`].
    fn modseq_usable(&self) -> bool {
        self.upstream_condstore && self.tracked && !self.condstore && !self.qresync
    }

    /// See [`JobIo::view_stamp`].
    fn view_stamp(&self) -> Option<(u32, u32)> {
        let uid_next = self.selected.as_ref()?.uid_next?;
        (!self.view_changed).then_some((uid_next, self.exists?))
    }

    /// A command that changes the selected mailbox (SELECT, EXAMINE, CLOSE, UNSELECT) takes
    /// effect upstream once every command sent before it has completed: the answers to
    /// those still describe the old mailbox, everything after belongs to the new one (or
    /// none). Called whenever the oldest command in flight may have changed.
    fn begin_reselect(&mut self) {
        if let Some(front) = self.in_flight.iter_mut().find(|f| f.modseq != Own::Quota) {
            if front.reselect == Reselect::Pending {
                front.reselect = Reselect::Started;
                self.uids.forget();
                self.exists = None;
            }
        }
    }

    /// Idle in the sense of shutdown and of the idle timer: nothing in flight but (possibly)
    /// IDLE and mailgate's quota question (an upstream that never answers it must neither
    /// hold a shutdown nor keep an idle session alive).
    fn quiet(&self) -> bool {
        !self.job_running
            && self.in_flight.iter().all(|t| t.modseq == Own::Quota || Some(&t.tag) == self.idling.as_ref())
    }

    /// mailgate's quota question is in flight (see [`super::quota`]).
    fn asking_quota(&self) -> bool {
        // Always the first in flight (see `run`).
        self.in_flight.front().is_some_and(|t| t.modseq == Own::Quota)
    }
}

/// The session's state as the client pump's read sees it.
struct WaitingFor<'a>(&'a Mutex<Shared>);

impl pumps::Waiting for WaitingFor<'_> {
    fn draining(&self) -> bool {
        self.0.lock().expect("relay lock poisoned").draining
    }

    fn start_draining(&self) -> bool {
        let mut shared = self.0.lock().expect("relay lock poisoned");
        shared.draining = true;
        shared.quiet()
    }

    fn busy(&self) -> bool {
        !self.0.lock().expect("relay lock poisoned").quiet()
    }
}

/// A command forwarded upstream and not yet completed.
struct InFlight {
    tag: Vec<u8>,
    /// Its metric label (`command::metric_label`).
    label: &'static str,
    started: Instant,
    reselect: Reselect,
    /// A FETCH relayed as the client wrote it whose answers fill the cache on their way.
    tee: Option<Arc<Tee>>,
    /// What the command is about modification sequences mailgate enabled for itself.
    modseq: Own,
    /// A client's command that turns CONDSTORE on (`SELECT name (CONDSTORE)`, a STORE with
    /// UNCHANGEDSINCE, ...): it is on once the command completes, whether or not its answer
    /// said so (a SELECT's `[HIGHESTMODSEQ]` may come in any case, a `.SILENT` STORE says
    /// nothing).
    enables_condstore: bool,
}

/// How a command in flight bears on the modification sequences mailgate enabled (see
/// [`super::modseq`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Own {
    /// A client's command like any other.
    No,
    /// mailgate's `STATUS mailbox (HIGHESTMODSEQ)`, sent just before a client's enabling
    /// command: its answers are not the client's.
    Status,
    /// A client's command that enables CONDSTORE, while mailgate had enabled it for itself:
    /// from its first answer on, nothing is stripped any more, and (`announce`) the upstream's
    /// `[HIGHESTMODSEQ]` for it, which it no longer sends, is announced by mailgate.
    Enables { announce: bool },
    /// mailgate's `GETQUOTAROOT INBOX` (see [`super::quota`]), the session's first command:
    /// its answers are not the client's. It bears on modification sequences in no way, but
    /// is held apart the same way (counted in [`Implicit::own`]).
    Quota,
}

/// The cold path of the cache: a FETCH the cache has nothing for is forwarded in the
/// client's pipeline like any command (no waiting for the session to be quiet, no tag of
/// mailgate's), and the upstream pump keeps a side copy of each FETCH response it relays
/// while one is in flight, storing its cacheable items.
///
/// A response is attributed to the oldest such FETCH in flight (the upstream answers in
/// order; a response of another command carries what the upstream says of that UID just
/// the same). Any completion other than a clean OK while tees are in flight taints them
/// all: their items are taken back, since a placeholder for an expunged message may have
/// come with any of them.
struct Tee {
    fill: Fill,
    stored: Mutex<Stored>,
    tainted: AtomicBool,
    /// A resync of flags also teaches the remembered flags (MODSEQ asked for that).
    learning: Mutex<Option<flags::Learning>>,
}

/// Whether a command in flight changes the selected mailbox, and whether the upstream has
/// begun it (see [`Shared::begin_reselect`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reselect {
    No,
    Pending,
    Started,
}

/// Records a completed command; a FETCH also records how many messages it answered and
/// whether it was a full resync (at least 90 % of a mailbox of at least 1,000 messages).
fn completed_command(service: &Service, shared: &mut Shared, label: &'static str, started: Instant) {
    let metrics = &service.metrics;
    shared.commands += 1;
    metrics.command_duration.with_label_values(&["imap", label]).observe(started.elapsed().as_secs_f64());
    if label == "fetch" || label == "uid_fetch" {
        let fetched = std::mem::take(&mut shared.fetched);
        shared.messages += u64::from(fetched);
        metrics.fetch_messages.observe(f64::from(fetched));
        if let Some(exists) = shared.exists.filter(|&e| e >= 1000) {
            if u64::from(fetched) * 10 >= u64::from(exists) * 9 {
                metrics.full_resyncs.with_label_values(&["imap"]).inc();
                shared.full_resyncs += 1;
            }
        }
    }
}

/// A SELECT or EXAMINE sent upstream and not yet completed.
struct Selecting {
    tag: Vec<u8>,
    /// `None` when the name came as a literal (that mailbox is then not cached).
    mailbox: Option<Arc<str>>,
    uid_validity: Option<u32>,
    uid_next: Option<u32>,
    recent: Option<u32>,
    /// The mailbox announced its HIGHESTMODSEQ: the upstream keeps modification sequences
    /// for it (Dovecot does from the first time any client used CONDSTORE on it, and then
    /// says so in every SELECT, CONDSTORE enabled or not).
    tracked: bool,
    /// The HIGHESTMODSEQ it announced.
    highest_modseq: Option<u64>,
}

/// A FETCH for the upstream pump to answer through the cache; `done` when answered.
/// Boxed in its channel: a channel allocates 32 slots at once, and a `Job` is large.
struct JobOrder {
    job: Job,
    fill: Fill,
    tag: String,
    done: oneshot::Sender<()>,
}

/// Modification sequences mailgate enabled for itself (see [`super::modseq`]); read by the
/// upstream pump at every response without the lock.
#[derive(Default)]
struct Implicit {
    /// mailgate enabled CONDSTORE and the client has not: responses are stripped.
    on: AtomicBool,
    /// mailgate's own commands in flight (STATUS, the quota question), whose answers are not
    /// the client's: every response line is held and looked at while there are any.
    own: AtomicUsize,
    /// Client commands in flight that end the stripping ([`Own::Enables`]).
    enabling: AtomicUsize,
    /// mailgate turned CONDSTORE on at some point: the session is not parked.
    ever: AtomicBool,
}

impl Implicit {
    fn holds(&self) -> bool {
        self.on.load(Ordering::Relaxed) || self.own.load(Ordering::Relaxed) > 0
    }
}

/// A SELECT's `[HIGHESTMODSEQ]`: the mailbox it opens has modification sequences. The
/// client sees it in any case: Dovecot announces them in every SELECT of a mailbox it keeps
/// them for, CONDSTORE on or not. (Once a session with CONDSTORE on, mailgate's included,
/// opened a mailbox, Dovecot keeps them for it, as after any CONDSTORE client.)
fn select_announcement(shared: &mut Shared, rest: &[u8]) {
    if shared.answering_select() {
        if let Some(selecting) = shared.selecting.as_mut() {
            selecting.tracked = true;
            selecting.highest_modseq = modseq::announced_highest(rest);
        }
    }
}

/// The longest response line held whole while [`Implicit::holds`]: what CONDSTORE adds to
/// (a status, a FETCH of flags) is far shorter.
const HOLD_LIMIT: usize = 256 * 1024;

/// What a session keeps between bursts: room for a few commands in flight and a held line's
/// allocation of ordinary size (a long one, up to `HOLD_LIMIT`, is given back).
const KEPT_IN_FLIGHT: usize = 8;
const KEPT_SPARE: usize = 4 << 10;

/// How long a compressing session keeps its compressor with nothing owed to the client:
/// the pause between a client's commands, not an idle session's wait.
const COMPRESSOR_KEPT: std::time::Duration = std::time::Duration::from_secs(2);

/// A message for the client written by the upstream pump between two responses (boxed in
/// its channel, which allocates 32 slots at once: a session's memory).
struct Inject {
    bytes: Vec<u8>,
    then_close: bool,
    /// The bytes are COMPRESS's OK: everything after them goes out compressed.
    then_compress: bool,
}

/// Relays a logged-in session to its end. The user's session slot is released when it returns.
pub async fn run(handover: Handover<LoggedIn>, service: &Service) {
    let Handover { client, leftover, mut upstream, scope, account, lease: _lease, unidentified, activity } = handover;
    let ticket = upstream.reuse.take();
    let can_unselect = response::has_capability(&upstream.capabilities, "UNSELECT");
    let account = account.as_str();
    let bytes = crate::metrics::SessionBytes::default();
    let shared = Arc::new(Mutex::new(Shared::default()));
    let shared_end = shared.clone();
    let tees = Arc::new(AtomicUsize::new(0));
    let implicit = Arc::new(Implicit::default());
    shared.lock().expect("relay lock poisoned").upstream_condstore =
        ["CONDSTORE", "QRESYNC"].iter().any(|c| response::has_capability(&upstream.capabilities, c));
    // The quota question goes first, ahead of anything the client sends (already sent, in
    // `leftover`, or later): in flight from the start, written by the client pump first.
    let quota = super::quota::Question::due(service, account, &upstream.capabilities).map(Box::new);
    if quota.is_some() {
        implicit.own.fetch_add(1, Ordering::Relaxed);
        shared.lock().expect("relay lock poisoned").in_flight.push_back(InFlight {
            tag: super::quota::TAG.to_vec(),
            label: "getquotaroot",
            started: Instant::now(),
            reselect: Reselect::No,
            tee: None,
            modseq: Own::Quota,
            enables_condstore: false,
        });
    }
    let completed = Arc::new(Notify::new());
    let (inject_tx, inject_rx) = mpsc::channel::<Box<Inject>>(4);
    let (jobs_tx, jobs_rx) = mpsc::channel::<Box<JobOrder>>(1);
    let (writes_tx, writes_rx) = mpsc::channel::<Vec<u8>>(4);
    let (client_read, client_write) =
        tokio::io::split(service.throttled(service.counted(client, true, &bytes), account));
    let (upstream_read, upstream_write) = tokio::io::split(service.counted(upstream.stream, false, &bytes));

    let mut to_upstream = ClientPump {
        read: Inflate::new(client_read),
        write: Outbox::new(upstream_write),
        buffer: leftover,
        framer: Framer::new(service.config.imap.max_line_bytes.as_usize()),
        line: Vec::new(),
        continuing: false,
        command_tag: Vec::new(),
        command_append_bytes: None,
        refusing: false,
        shared: shared.clone(),
        completed: completed.clone(),
        inject: inject_tx,
        jobs: jobs_tx,
        account: account.to_string(),
        writes: writes_rx,
        scope: scope.clone(),
        tees: tees.clone(),
        implicit: implicit.clone(),
        own_tags: 0,
        ask_quota: quota.is_some(),
        unidentified,
        activity,
        parkable: ticket.is_some(),
        can_unselect,
        service,
    };
    let mut to_client = UpstreamPump {
        read: upstream_read,
        write: Outbox::new(Deflate::new(client_write)),
        buffer: upstream.leftover,
        framer: Framer::new(usize::MAX),
        upstream_bye: false,
        shared: shared.clone(),
        completed: completed.clone(),
        inject: inject_rx,
        jobs: jobs_rx,
        writes: writes_tx,
        scope,
        tees,
        capture: Capture::Idle,
        implicit: implicit.clone(),
        held: None,
        held_spare: Vec::new(),
        response_modseq: None,
        settle_due: false,
        answered: 0,
        fetched: 0,
        next_tag: 0,
        quota,
        cache_hits: 0,
        cache_misses: 0,
        service,
    };

    let end = {
        let (upstream_side, client_side) = (std::pin::pin!(to_client.run()), std::pin::pin!(to_upstream.run()));
        crate::pumps::drive(upstream_side, client_side).await
    };
    to_client.abandon_tees().await;
    if let Some(question) = to_client.quota.take() {
        question.unanswered(service);
    }
    let _ = to_client.write.shutdown().await;
    // After LOGOUT both sides close at about the same time; which close a pump sees first
    // is chance, and says nothing about how the session ended.
    let (logged_out, parking) = {
        let shared = shared_end.lock().expect("relay lock poisoned");
        (shared.logged_out, shared.parking)
    };
    let end = if logged_out { End::Logout } else { end };
    tracing::info!(
        reason = ?end,
        cache_hits = to_client.cache_hits,
        cache_misses = to_client.cache_misses,
        "session ended"
    );
    let (commands, messages) = {
        let shared = shared_end.lock().expect("relay lock poisoned");
        if let Some(activity) = to_upstream.activity.as_mut() {
            let summary = &mut activity.summary;
            summary.bytes = bytes.client.1.load(Ordering::Relaxed);
            summary.messages = shared.messages;
            summary.deleted = shared.inbox_removed;
            summary.full_resyncs = shared.full_resyncs;
        }
        (shared.commands, shared.messages)
    };
    service.session_cost(account, &bytes, commands, messages);
    if let (End::Park, true, Some(ticket)) = (&end, parking, ticket) {
        // The upstream side must be at a response boundary with nothing read and not
        // relayed, and everything written to it sent: else a parked session would start
        // its next client mid-stream.
        // An upstream that said BYE is ending the session: never parked.
        let clean = to_client.buffer.is_empty()
            && to_client.framer.at_boundary()
            && to_client.held.is_none()
            && !to_client.upstream_bye;
        let selected = shared_end.lock().expect("relay lock poisoned").ever_selected;
        let stream = to_upstream.write.into_inner().map(|write| to_client.read.unsplit(write).into_inner());
        let super::reuse::Ticket { pool, key } = *ticket;
        match stream {
            Some(stream) if clean => {
                // In a task of the pool's: the session ends now, its user's slot (the lease)
                // free at once, not after the UNSELECT's round trip.
                let (capabilities, proof, logged_in) = (upstream.capabilities, upstream.proof, upstream.logged_in);
                let parking = pool.clone();
                let park = async move { parking.park(key, stream, capabilities, proof, selected, logged_in).await };
                drop(pool.tasks().spawn(park));
            }
            Some(stream) => drop(pool.tasks().spawn(super::reuse::log_out(stream))),
            None => {}
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The client's LOGOUT completed.
    Logout,
    /// The client's LOGOUT was answered by mailgate and the upstream session parked.
    Park,
    ClientClosed,
    UpstreamClosed,
    /// mailgate closed the session (BYE sent).
    Closed(&'static str),
    Io,
}

struct ClientPump<'a, R, W> {
    /// The client's commands, inflated once COMPRESS is on.
    read: Inflate<ReadHalf<R>>,
    write: Outbox<WriteHalf<W>>,
    buffer: BytesMut,
    framer: Framer,
    /// The command line being assembled (complete lines are forwarded whole).
    line: Vec<u8>,
    /// The next line continues the current command (it follows a literal).
    continuing: bool,
    /// The tag of the command being read (continuation lines carry none).
    command_tag: Vec<u8>,
    /// For an APPEND being read: the octets its literals announced so far.
    command_append_bytes: Option<u64>,
    /// Shutdown began and the client started a new command: its bytes are dropped.
    refusing: bool,
    shared: Arc<Mutex<Shared>>,
    /// Signalled by the upstream pump at each tagged completion, and when it answers an
    /// announced literal.
    completed: Arc<Notify>,
    inject: mpsc::Sender<Box<Inject>>,
    jobs: mpsc::Sender<Box<JobOrder>>,
    /// Whose session this is (the per-user command rate).
    account: String,
    /// mailgate's own commands from the upstream pump during a job (this pump owns the writer).
    writes: mpsc::Receiver<Vec<u8>>,
    /// The cache, when this session uses it.
    scope: Option<Scope>,
    /// Tees in flight (read by the upstream pump without the lock).
    tees: Arc<AtomicUsize>,
    implicit: Arc<Implicit>,
    /// mailgate's own commands sent so far (their tags).
    own_tags: u64,
    /// The quota question is to be written before anything else (see [`super::quota`]).
    ask_quota: bool,
    /// Until the client says what software it is (its first `ID`), its census entry.
    unidentified: Option<Box<crate::metrics::clients::Unidentified>>,
    /// The session in its account's support history, told its software by `ID`.
    activity: Option<Box<crate::insight::Activity>>,
    /// The session may be parked at LOGOUT (`[imap] reuse_for`): until a command whose
    /// effect may outlive it (see `reuse::keeps_session`).
    parkable: bool,
    /// The upstream has UNSELECT: a session that selected a mailbox can leave it.
    can_unselect: bool,
    service: &'a Service,
}

impl<R: AsyncRead + AsyncWrite, W: AsyncRead + AsyncWrite> ClientPump<'_, R, W> {
    async fn close_with(&mut self, text: &'static str) -> End {
        let bytes = format!("* BYE {text}\r\n").into_bytes();
        let _ = self.inject.send(Box::new(Inject { bytes, then_close: true, then_compress: false })).await;
        End::Closed(text)
    }

    async fn run(&mut self) -> End {
        if std::mem::take(&mut self.ask_quota) {
            // Registered in flight already; flushed now, since the client may send nothing.
            let question = super::quota::Question::command();
            if self.write.write_all(&question).await.is_err() || self.write.flush().await.is_err() {
                return End::UpstreamClosed;
            }
        }
        let end = self.pump().await;
        if end == End::ClientClosed {
            // The upstream finishes answering what was sent, then closes its side too.
            let _ = self.write.shutdown().await;
        }
        end
    }

    async fn pump(&mut self) -> End {
        loop {
            if self.buffer.is_empty() {
                if let Err(end) = self.read_more().await {
                    return end;
                }
                if self.refusing {
                    self.buffer.clear();
                    continue;
                }
            }
            if let Some(end) = self.process().await {
                return end;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().expect("relay lock poisoned")
    }

    /// Waits for client bytes, watching the idle timer and shutdown.
    async fn read_more(&mut self) -> Result<(), End> {
        let idle = self.service.config.imap.idle_timeout.0;
        // Between commands (not inside a literal) the read may wait in a small buffer.
        let waiting = self.framer.at_boundary();
        let state = WaitingFor(&self.shared);
        match pumps::read_client(&mut self.read, &mut self.buffer, waiting, idle, &self.service.shutdown, &state).await
        {
            Ok(_) => Ok(()),
            Err(Unread::Closed) => Err(End::ClientClosed),
            Err(Unread::Unreadable) => {
                // No BYE: the stream is broken, and RFC 4978 has no way back; a response
                // being written is finished (never cut), then the connection closes.
                let inject = Inject { bytes: Vec::new(), then_close: true, then_compress: false };
                let _ = self.inject.send(Box::new(inject)).await;
                Err(End::Closed("unreadable client stream"))
            }
            Err(Unread::Shutdown) => Err(self.close_with("Server shutting down.").await),
            Err(Unread::Idle) => Err(self.close_with("Autologout; idle for too long.").await),
        }
    }

    /// Frames and forwards what is buffered; `Some` ends the session.
    async fn process(&mut self) -> Option<End> {
        while !self.buffer.is_empty() {
            if self.framer.pending_literal().is_some() {
                let answer = match self.literal_answer().await {
                    Ok(answer) => answer,
                    Err(end) => return Some(end),
                };
                // The upstream refused the command: the client will not send the literal.
                if answer == Some(false) {
                    self.framer.reject_literal();
                    self.continuing = false;
                } else {
                    self.framer.accept_literal();
                }
            }
            let in_literal = self.framer.in_literal();
            let step = match self.framer.feed(&self.buffer) {
                Ok(step) => step,
                Err(FrameError::LineTooLong(_)) => return Some(self.close_with("Command line too long.").await),
                Err(FrameError::LiteralUndecided) => return Some(End::Io),
            };
            let bytes = self.buffer.split_to(step.consumed);
            if in_literal {
                if self.write.write_all(&bytes).await.is_err() {
                    return Some(End::UpstreamClosed);
                }
                continue;
            }
            self.line.extend_from_slice(&bytes);
            if let Some(Event::Line(line)) = step.event {
                if let Some(end) = self.forward_line(line).await {
                    return Some(end);
                }
            }
        }
        let _ = self.write.flush().await;
        None
    }

    /// Waits until every command sent upstream has completed (what was written is flushed
    /// first, so that it can); with `but_quota`, every command but mailgate's quota
    /// question, whose answer is never the client's (an upstream may never answer it).
    async fn until_nothing_in_flight(&mut self, but_quota: bool) -> Option<End> {
        loop {
            let completed = self.completed.notified();
            let done = {
                let shared = self.lock();
                shared.in_flight.iter().all(|t| but_quota && t.modseq == Own::Quota)
            };
            if done {
                return None;
            }
            if self.write.flush().await.is_err() {
                return Some(End::UpstreamClosed);
            }
            completed.await;
        }
    }

    /// Hands a FETCH to the upstream pump once nothing else is outstanding, writing
    /// upstream what it asks until it has answered the client.
    async fn answer_through_cache(&mut self, job: Job, fill: Fill, tag: String) -> Option<End> {
        // Never with the quota question in flight (such a FETCH is relayed instead): the job
        // reads the upstream's answers itself.
        if let Some(end) = self.until_nothing_in_flight(false).await {
            return Some(end);
        }
        self.lock().job_running = true;
        let label = if job.request.uid { "uid_fetch" } else { "fetch" };
        self.service.metrics.commands.with_label_values(&["imap", label]).inc();
        let started = Instant::now();
        let (done_tx, mut done_rx) = oneshot::channel();
        if self.jobs.send(Box::new(JobOrder { job, fill, tag, done: done_tx })).await.is_err() {
            return Some(End::UpstreamClosed);
        }
        let end = loop {
            tokio::select! {
                _ = &mut done_rx => break None,
                bytes = self.writes.recv() => {
                    let Some(bytes) = bytes else { break Some(End::UpstreamClosed) };
                    if self.write.write_all(&bytes).await.is_err() || self.write.flush().await.is_err() {
                        break Some(End::UpstreamClosed);
                    }
                }
            }
        };
        let mut shared = self.lock();
        shared.job_running = false;
        completed_command(self.service, &mut shared, label, started);
        drop(shared);
        end
    }

    /// Waits until fewer than [`MAX_IN_FLIGHT`] commands are outstanding; false if none
    /// completed for a whole idle period (the client is not reading its answers).
    async fn room_for_a_command(&mut self) -> bool {
        let deadline = Instant::now() + self.service.config.imap.idle_timeout.0;
        loop {
            let completed = self.completed.notified();
            if self.lock().in_flight.len() < MAX_IN_FLIGHT {
                return true;
            }
            // What is written but not flushed cannot be answered.
            if self.write.flush().await.is_err() {
                return false;
            }
            if tokio::time::timeout_at(deadline, completed).await.is_err() {
                return false;
            }
        }
    }

    /// The upstream's answer to the synchronizing literal just announced: `+`
    /// (`Some(true)`) or a refusal (`Some(false)`); `None` for a non-synchronizing one.
    /// A client that sends the literal before the `+` is not trusted to be right: what
    /// follows is data only if the upstream agrees, else it would reach the upstream as
    /// commands mailgate never looked at.
    async fn literal_answer(&mut self) -> Result<Option<bool>, End> {
        let idle = self.service.config.imap.idle_timeout.0;
        loop {
            let answered = self.completed.notified();
            {
                let mut shared = self.lock();
                match shared.literal_wait {
                    None => return Ok(None),
                    Some((_, Some(answer))) => {
                        shared.literal_wait = None;
                        return Ok(Some(answer));
                    }
                    Some((_, None)) => {}
                }
            }
            if tokio::time::timeout(idle, answered).await.is_err() {
                return Err(self.close_with("Autologout; idle for too long.").await);
            }
        }
    }

    /// Answers the command being read with `text` (tagged) instead of forwarding it. A
    /// synchronizing literal it announced is refused with it; one whose bytes are already
    /// on their way (non-synchronizing, or in a line that continues a command already
    /// partly forwarded) leaves no way to go on: the session ends with `* BYE bye`.
    async fn refuse(
        &mut self,
        tag: &[u8],
        text: &str,
        announce: Option<super::framing::Announce>,
        first_line: bool,
        bye: &'static str,
    ) -> Option<End> {
        if let Some(announce) = announce {
            if announce.non_sync || !first_line {
                return Some(self.close_with(bye).await);
            }
            self.framer.reject_literal();
        }
        self.line.clear();
        let bytes = format!("{} {text}\r\n", String::from_utf8_lossy(tag)).into_bytes();
        let _ = self.inject.send(Box::new(Inject { bytes, then_close: false, then_compress: false })).await;
        None
    }

    /// `COMPRESS algorithm` (RFC 4978), answered by mailgate: the client leg alone is
    /// compressed, whatever the upstream supports, and the upstream never sees the command.
    /// The commands sent before it complete first (their answers go out as they were asked,
    /// uncompressed); the OK is the last plain byte each way. Bytes the client sent after
    /// the command are already its DEFLATE stream.
    async fn compress(&mut self, tag: &[u8], line: &[u8], announce: Option<super::framing::Announce>) -> Option<End> {
        self.service.metrics.commands.with_label_values(&["imap", "compress"]).inc();
        let arguments: Vec<&[u8]> = line.split(|&b| b == b' ').skip(2).collect();
        let refusal = match arguments[..] {
            // The old answer where the listener does not offer it.
            _ if !self.service.compress => Some("NO [CANNOT] COMPRESS is not available through this gateway."),
            [algorithm] if announce.is_none() && !algorithm.is_empty() => {
                if self.read.is_active() {
                    Some("NO [COMPRESSIONACTIVE] DEFLATE active via COMPRESS.")
                } else if !algorithm.eq_ignore_ascii_case(b"DEFLATE") {
                    // RFC 4978 §3: NO for an algorithm the server does not support.
                    Some("NO Unsupported compression algorithm.")
                } else {
                    None
                }
            }
            _ => Some("BAD Syntax: COMPRESS algorithm"),
        };
        if let Some(text) = refusal {
            return self.refuse(tag, text, announce, true, "Invalid COMPRESS.").await;
        }
        // The quota question's answer is never the client's (but for an ALERT, which may go
        // out compressed): COMPRESS does not wait for it.
        if let Some(end) = self.until_nothing_in_flight(true).await {
            return Some(end);
        }
        self.line.clear();
        let bytes = format!("{} OK DEFLATE active\r\n", String::from_utf8_lossy(tag)).into_bytes();
        let inject = Inject { bytes, then_close: false, then_compress: true };
        if self.inject.send(Box::new(inject)).await.is_err() {
            return Some(End::ClientClosed);
        }
        let metrics = &self.service.metrics;
        let early = std::mem::take(&mut self.buffer);
        self.read.start(&early, metrics.compress_counters("in"), metrics.compress_errors.clone());
        metrics.compress_sessions.inc();
        debug!("COMPRESS=DEFLATE on");
        None
    }

    /// At the client's LOGOUT: whether the upstream session can be parked for the next login
    /// with the same credentials, and if so the client's answer (`* BYE`, tagged `OK`, as
    /// a LOGOUT relayed would get) queued and the session marked for parking. Only a
    /// session that a fresh login could not be told from: no command in flight, no job, no
    /// IDLE, no literal, nothing more from the client, no command that changed the
    /// session's state, CONDSTORE never on (the client's or mailgate's), and a mailbox it
    /// can leave without expunging (UNSELECT). The upstream pump's side is checked after
    /// the pumps stopped (nothing unread from the upstream).
    async fn park_now(&mut self, tag: &[u8]) -> bool {
        {
            let mut shared = self.lock();
            let quiet = shared.in_flight.is_empty()
                && !shared.job_running
                && shared.idling.is_none()
                && shared.literal_wait.is_none()
                && !shared.draining
                && self.tees.load(Ordering::Relaxed) == 0;
            let unchanged = !shared.condstore
                && !shared.qresync
                && !self.implicit.ever.load(Ordering::Relaxed)
                && !self.implicit.on.load(Ordering::Relaxed)
                && self.implicit.own.load(Ordering::Relaxed) == 0
                && (!shared.ever_selected || self.can_unselect);
            let parkable = quiet && unchanged && self.buffer.is_empty() && !self.continuing;
            if !parkable {
                return false;
            }
            shared.parking = true;
        }
        if self.write.flush().await.is_err() {
            self.lock().parking = false;
            return false;
        }
        self.line.clear();
        let tag = String::from_utf8_lossy(tag);
        let bytes = format!("* BYE Logging out.\r\n{tag} OK LOGOUT completed.\r\n").into_bytes();
        let _ = self.inject.send(Box::new(Inject { bytes, then_close: true, then_compress: false })).await;
        true
    }

    async fn forward_line(&mut self, line: super::framing::Line) -> Option<End> {
        let first_line = !self.continuing;
        if first_line && self.lock().draining {
            // Shutdown: commands already sent finish (their literals still flow), new ones
            // are not started; the session ends with BYE once the old ones complete.
            self.refusing = true;
            self.buffer.clear();
            self.line.clear();
            return None;
        }
        let head = strip_eol(&line.head);
        // A line after a literal continues its command: it has the command's tag.
        let tag = if first_line {
            self.command_tag = head.split(|&b| b == b' ').next().unwrap_or_default().to_vec();
            self.command_append_bytes = (super::command::metric_label(head) == "append").then_some(0);
            self.command_tag.clone()
        } else {
            self.command_tag.clone()
        };
        // A line during IDLE is its DONE: the lines after it are commands again, even before
        // the upstream completes the IDLE (its tag stays in flight until then).
        let idling = first_line && self.lock().idling.take().is_some();
        if let Some(announce) = line.announce {
            // A message to APPEND has its own cap (`limits.max_append_bytes`, answered with
            // NO: the command is valid, the message too big), every literal of the command
            // (the first message, MULTIAPPEND's next ones, CATENATE's parts: RFC 3502, 4469),
            // and the command's literals together are bounded by
            // `limits.max_append_command_bytes`; any other literal has the line cap.
            let limits = &self.service.config.limits;
            let appended = self.command_append_bytes.map(|total| total.saturating_add(announce.len));
            self.command_append_bytes = appended;
            let too_large = appended.is_some_and(|total| {
                announce.len > limits.max_append_bytes.0 || total > limits.max_append_command_bytes.0
            });
            let refusal = if too_large {
                self.service.limited("append_size");
                Some("NO [TOOBIG] Message too large.")
            } else if announce.len > self.service.config.imap.max_literal_bytes.0 {
                Some("BAD [TOOBIG] Literal too large.")
            } else {
                None
            };
            if let Some(refusal) = refusal {
                return self.refuse(&tag, refusal, Some(announce), first_line, "Literal too large.").await;
            }
        }
        if first_line && !idling {
            self.service.command_rate(&self.account).await;
            let full_line = strip_eol(&self.line);
            // A FETCH line announcing a literal (in a HEADER.FIELDS list) has asked for its
            // sections before the literal: it is judged on what it has said so far.
            if super::command::fetches_message_data(full_line) && self.service.download_refused(&self.account) {
                let text = "NO [LIMIT] Download quota used up, try again later.";
                return self.refuse(&tag, text, line.announce, true, "Download quota used up.").await;
            }
            let command = head.split(|&b| b == b' ').nth(1).unwrap_or_default();
            if command.eq_ignore_ascii_case(b"ID") && line.announce.is_none() {
                identify(&mut self.unidentified, &mut self.activity, full_line);
            }
            // A command that enables CONDSTORE while mailgate has it on for itself goes to the
            // upstream as it is (never through the cache: its answers are the client's own).
            let enables = modseq::enabling(full_line);
            if self.parkable {
                let is_logout = command.eq_ignore_ascii_case(b"LOGOUT") && full_line.len() == tag.len() + 7;
                // Only the first line is looked at: a literal other than APPEND's may carry the
                // rest of a command (`SEARCH ... {5}` then `x MODSEQ 5` turns CONDSTORE on).
                // COMPRESS never reaches the upstream (mailgate answers it, and compresses the
                // client leg, which goes with the client): the upstream session is as it was.
                let keeps = enables == Enabling::No
                    && (super::reuse::keeps_session(full_line) || command.eq_ignore_ascii_case(b"COMPRESS"))
                    && (line.announce.is_none() || command.eq_ignore_ascii_case(b"APPEND"));
                if is_logout && line.announce.is_none() && self.park_now(&tag).await {
                    return Some(End::Park);
                }
                if !keeps {
                    self.parkable = false;
                } else if command.eq_ignore_ascii_case(b"SELECT") || command.eq_ignore_ascii_case(b"EXAMINE") {
                    self.lock().ever_selected = true;
                }
            }
            let full_line = strip_eol(&self.line);
            let enables_condstore = enables != Enabling::No;
            let enabling = if self.implicit.on.load(Ordering::Relaxed) { enables } else { Enabling::No };
            // No job is built for any mailbox until the upstream has completed a change of
            // mailbox; what the session knows of the old one goes when the upstream begins it.
            let mut reselect = Reselect::No;
            let mut tee = None;
            if let Some(mailbox) = intercept::selected_mailbox(full_line) {
                let mut shared = self.lock();
                shared.selected = None;
                shared.inbox = false;
                shared.selecting = Some(Selecting {
                    tag: tag.clone(),
                    mailbox: mailbox.map(Arc::from),
                    uid_validity: None,
                    uid_next: None,
                    recent: None,
                    tracked: false,
                    highest_modseq: None,
                });
                reselect = Reselect::Pending;
            } else if command.eq_ignore_ascii_case(b"CLOSE") || command.eq_ignore_ascii_case(b"UNSELECT") {
                let mut shared = self.lock();
                shared.selected = None;
                shared.inbox = false;
                drop(shared);
                reselect = Reselect::Pending;
            } else if let (Some(scope), None, Enabling::No) = (self.scope.as_ref(), line.announce, enabling) {
                let (selected, modseq) = {
                    let shared = self.lock();
                    let modseq = intercept::Modseq { condstore: shared.condstore, qresync: shared.qresync };
                    (shared.selected.clone(), modseq)
                };
                if let Some(job) = Job::for_line(full_line, selected.as_ref(), modseq) {
                    // Boxed here and below: the cache paths' states are large, and a session's
                    // future (memory every idle session keeps) is as large as its largest state.
                    let fill = Box::pin(Fill::new(&job, scope)).await;
                    // Under QRESYNC, Dovecot gives the first completion after ENABLE the
                    // mailbox's `[HIGHESTMODSEQ]`, or not, depending on what it has queued: a
                    // FETCH held back until the commands before it completed would change
                    // which. Pipelined behind others, it is relayed in its place.
                    // Behind the quota question, too: a job reads the upstream itself, and the
                    // question's answer may take its time (or never come).
                    let queued = {
                        let shared = self.lock();
                        (modseq.qresync && !shared.in_flight.is_empty()) || shared.asking_quota()
                    };
                    if queued || Box::pin(intercept::relays_whole(&job, &fill.items)).await {
                        // A cold resync of flags, alone in flight, asks MODSEQ too: the flags
                        // it relays are remembered, and the next resync asks what changed.
                        let learn = {
                            let shared = self.lock();
                            let usable = flags::answers(&job)
                                && shared.modseq_usable()
                                && shared.recent == Some(0)
                                && shared.in_flight.is_empty();
                            usable.then(|| shared.view_stamp()).flatten()
                        };
                        let mut learning = None;
                        if let (Some(stamp), Some(line)) = (learn, learn.and_then(|_| flags::with_modseq(&self.line))) {
                            self.line = line;
                            self.implicit.on.store(true, Ordering::Relaxed);
                            self.implicit.ever.store(true, Ordering::Relaxed);
                            learning = Some(Box::pin(flags::Learning::new(scope, &job.selected, stamp)).await);
                        }
                        tee = Some(Arc::new(Tee {
                            fill,
                            stored: Mutex::default(),
                            tainted: AtomicBool::new(false),
                            learning: Mutex::new(learning),
                        }));
                    } else {
                        let tag = String::from_utf8_lossy(&tag).into_owned();
                        self.line.clear();
                        return Box::pin(self.answer_through_cache(job, fill, tag)).await;
                    }
                }
            }
            if command.eq_ignore_ascii_case(b"COMPRESS") {
                // Never relayed: the upstream's DEFLATE stream would hide the session from
                // the framing, the cache and the limits. mailgate compresses the client leg
                // itself (or refuses, where the listener does not offer it).
                let full_line = strip_eol(&self.line).to_vec();
                return self.compress(&tag, &full_line, line.announce).await;
            }
            if !self.room_for_a_command().await {
                return Some(self.close_with("Too many commands in flight.").await);
            }
            {
                let shared = self.shared.clone();
                let mut shared = shared.lock().expect("relay lock poisoned");
                let own = match enabling {
                    Enabling::No => Own::No,
                    Enabling::Select => Own::Enables { announce: false },
                    // In a selected mailbox the upstream's first answer would have been its
                    // `[HIGHESTMODSEQ]`: mailgate asks for the value just before.
                    Enabling::Other => {
                        let mailbox = match (&shared.selected, &shared.selecting) {
                            (Some(selected), _) => Some(selected.mailbox.as_str().to_string()),
                            (None, Some(selecting)) => selecting.mailbox.as_deref().map(str::to_string),
                            (None, None) => None,
                        };
                        let status = mailbox.and_then(|mailbox| {
                            self.own_tags += 1;
                            modseq::status_command(&format!("mgs{}", self.own_tags), &mailbox)
                        });
                        let announce = status.is_some();
                        if let Some(status) = status {
                            let tag = status.split(|&b| b == b' ').next().unwrap_or_default().to_vec();
                            self.implicit.own.fetch_add(1, Ordering::Relaxed);
                            shared.in_flight.push_back(InFlight {
                                tag,
                                label: "status",
                                started: Instant::now(),
                                reselect: Reselect::No,
                                tee: None,
                                modseq: Own::Status,
                                enables_condstore: false,
                            });
                            // Ahead of the client's line, in the same write.
                            let mut line = status;
                            line.append(&mut self.line);
                            self.line = line;
                        }
                        Own::Enables { announce }
                    }
                };
                if matches!(own, Own::Enables { .. }) {
                    self.implicit.enabling.fetch_add(1, Ordering::Relaxed);
                }
                let command = head.split(|&b| b == b' ').nth(1).unwrap_or_default();
                if command.eq_ignore_ascii_case(b"IDLE") {
                    shared.idling = Some(tag.clone());
                }
                let label = super::command::metric_label(head);
                self.service.metrics.commands.with_label_values(&["imap", label]).inc();
                if tee.is_some() {
                    self.tees.fetch_add(1, Ordering::Relaxed);
                }
                shared.in_flight.push_back(InFlight {
                    tag: tag.clone(),
                    label,
                    started: Instant::now(),
                    reselect,
                    tee,
                    modseq: own,
                    enables_condstore,
                });
                shared.begin_reselect();
            }
        }
        if let Some(announce) = line.announce {
            if !announce.non_sync {
                self.lock().literal_wait = Some((tag, None));
            }
        }
        self.continuing = line.announce.is_some();
        let bytes = std::mem::take(&mut self.line);
        if self.write.write_all(&bytes).await.is_err() {
            return Some(End::UpstreamClosed);
        }
        if line.announce.is_some_and(|a| !a.non_sync) {
            // The upstream must see the line now to send its `+`.
            let _ = self.write.flush().await;
        }
        None
    }
}

struct UpstreamPump<'a, R, W> {
    read: ReadHalf<R>,
    /// To the client, deflated once COMPRESS is on.
    write: Outbox<Deflate<WriteHalf<W>>>,
    buffer: BytesMut,
    framer: Framer,
    upstream_bye: bool,
    shared: Arc<Mutex<Shared>>,
    completed: Arc<Notify>,
    inject: mpsc::Receiver<Box<Inject>>,
    jobs: mpsc::Receiver<Box<JobOrder>>,
    writes: mpsc::Sender<Vec<u8>>,
    scope: Option<Scope>,
    /// Tees in flight: while there are any, FETCH responses are copied on their way.
    tees: Arc<AtomicUsize>,
    capture: Capture,
    implicit: Arc<Implicit>,
    /// The first line of the response under way, held while [`Implicit::holds`].
    held: Option<Vec<u8>>,
    /// An allocation for the next held line.
    held_spare: Vec<u8>,
    /// The MODSEQ of the FETCH response under way, for a tee that learns flags.
    response_modseq: Option<u64>,

    /// A tee completed: settle it once the response is relayed.
    settle_due: bool,
    /// FETCH responses a job composed so far.
    answered: u32,
    /// FETCH responses relayed and not yet added to `Shared::fetched` (see `observe`).
    fetched: u32,
    next_tag: u64,
    /// mailgate's quota question while it is in flight.
    quota: Option<Box<super::quota::Question>>,
    /// This session's FETCH items answered from the cache, and fetched upstream.
    cache_hits: u64,
    cache_misses: u64,
    service: &'a Service,
}

impl<R: AsyncRead + AsyncWrite, W: AsyncRead + AsyncWrite> UpstreamPump<'_, R, W> {
    async fn run(&mut self) -> End {
        loop {
            while !self.buffer.is_empty() {
                let plain = self.plain_responses();
                if plain > 0 {
                    if self.write.write_all(&self.buffer[..plain]).await.is_err() {
                        return End::ClientClosed;
                    }
                    self.buffer.advance(plain);
                } else if self.awaits_capability_line() {
                    break;
                } else if let Some(end) = self.process().await {
                    return end;
                }
            }
            if self.write.flush().await.is_err() {
                return End::ClientClosed;
            }
            let at_boundary = self.framer.at_boundary();
            let (waiting, owed) = if at_boundary {
                let mut shared = self.lock();
                // A session that pipelined a thousand commands once does not keep room for
                // them while it waits.
                let quiet = shared.quiet();
                if quiet {
                    shared.in_flight.shrink_to(KEPT_IN_FLIGHT);
                }
                let owed =
                    shared.in_flight.iter().any(|t| t.modseq != Own::Quota && Some(&t.tag) != shared.idling.as_ref());
                (quiet, owed)
            } else {
                (false, true)
            };
            // Nothing owed for COMPRESSOR_KEPT: a compressed session waits without its
            // compressor (about 230 KiB). Not at once: a client sending one command at a time
            // would build a compressor per response, and lose the history that gives small
            // responses their ratio. (Not `waiting`: a cache job this pump just finished may
            // not be marked done yet.)
            let rest_due = !owed && self.write.get_mut().is_holding();
            tokio::select! {
                _ = tokio::time::sleep(COMPRESSOR_KEPT), if rest_due => self.write.get_mut().rest(),
                read = pumps::read_into(&mut self.read, &mut self.buffer, waiting) => match read {
                    Ok(0) | Err(_) => return self.upstream_gone().await,
                    Ok(_) => {}
                },
                order = self.jobs.recv(), if at_boundary => {
                    let Some(order) = order else { continue };
                    let scope = self.scope.clone().expect("jobs are sent only with a cache");
                    // Boxed: a cache job's state is large and rare; inline, every idle
                    // session's future would carry it.
                    let result = Box::pin(intercept::run(self, &order.job, &order.fill, &order.tag, &scope)).await;
                    let answered = std::mem::take(&mut self.answered);
                    self.lock().fetched += answered;
                    let _ = order.done.send(());
                    match result {
                        Ok(()) => {}
                        Err(JobError::ClientClosed) => return End::ClientClosed,
                        Err(JobError::UpstreamClosed) => return self.upstream_gone().await,
                        Err(JobError::TooLarge) => {
                            // Part of the response may already be with the client: a BYE now
                            // could land inside it, so the connection just closes.
                            crate::log_budget::warn_limited!("upstream response over the size a cache job may hold; closing");
                            return End::Closed("response too large");
                        }
                    }
                }
                inject = self.inject.recv(), if at_boundary => {
                    let Some(inject) = inject else { continue };
                    if self.write.write_all(&inject.bytes).await.is_err() || self.write.flush().await.is_err() {
                        return End::ClientClosed;
                    }
                    if inject.then_compress {
                        let level = self.service.config.imap.compress_level;
                        self.write.get_mut().start(self.service.metrics.compress_counters("out"), level);
                    }
                    if inject.then_close {
                        return End::Closed("closed by mailgate");
                    }
                }
                _ = self.service.shutdown.cancelled(), if at_boundary && self.shutdown_ready() => {
                    let _ = self.write.write_all(b"* BYE Server shutting down.\r\n").await;
                    let _ = self.write.flush().await;
                    return End::Closed("shutdown");
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().expect("relay lock poisoned")
    }

    /// A `* CAPABILITY` response has begun and its line has not all arrived: it is read
    /// whole before anything of it goes out, since the client sees a rewritten list (see
    /// `capabilities::relayed`). Past 16 KiB it is not a list to rewrite: streamed as is.
    fn awaits_capability_line(&self) -> bool {
        self.framer.at_boundary()
            && self.framer.pending_literal().is_none()
            && self.buffer.len() < 16 << 10
            && capabilities::relayed(&self.buffer, self.service.compress) == capabilities::Relayed::Incomplete
    }

    /// During shutdown: true once only IDLE (or nothing) is in flight.
    fn shutdown_ready(&self) -> bool {
        let shared = self.lock();
        shared.draining && shared.quiet()
    }

    async fn upstream_gone(&mut self) -> End {
        if self.framer.at_boundary() && !self.upstream_bye {
            let _ = self.write.write_all(b"* BYE Upstream server closed the connection.\r\n").await;
            let _ = self.write.flush().await;
        } else if !self.framer.at_boundary() {
            debug!("upstream closed mid-response: closing the client without completing it");
        }
        End::UpstreamClosed
    }

    async fn process(&mut self) -> Option<End> {
        if self.framer.pending_literal().is_some() {
            self.framer.accept_literal();
        }
        if self.framer.at_boundary() {
            if let capabilities::Relayed::Rewritten { len, line } =
                capabilities::relayed(&self.buffer, self.service.compress)
            {
                let _ = self.buffer.split_to(len);
                return self.write.write_all(&line).await.is_err().then_some(End::ClientClosed);
            }
        }
        let response_starts = self.framer.at_boundary();
        let step = match self.framer.feed(&self.buffer) {
            Ok(step) => step,
            // Nothing was consumed: the session cannot go on (and must not spin).
            Err(_) => return Some(End::Io),
        };
        // The step's bytes stay in the buffer until they are handled (no handle per line).
        let consumed = step.consumed;
        if response_starts {
            if self.implicit.holds() {
                self.held = Some(std::mem::take(&mut self.held_spare));
            }
            if self.tees.load(Ordering::Relaxed) > 0 {
                self.capture = Capture::Copying(Vec::new());
            }
        }
        // While mailgate's modification sequences are on, a response's first line is held
        // until complete, and released as the client is to see it (maybe not at all).
        let mut released: Option<(Vec<u8>, bool)> = None;
        if let Some(held) = self.held.as_mut() {
            held.extend_from_slice(&self.buffer[..consumed]);
            self.buffer.advance(consumed);
            let line = match &step.event {
                Some(Event::Line(line)) => Some(line),
                // Longer than any line CONDSTORE adds to: streamed as it is.
                _ if held.len() > HOLD_LIMIT => None,
                _ => return None,
            };
            let held = self.held.take().expect("holding");
            if self.tees.load(Ordering::Relaxed) > 0 {
                self.response_modseq = modseq::fetch_modseq(&held);
            }
            released = Some(match line {
                Some(line) => (self.release(held, line.announce.is_some()).await.unwrap_or_default(), true),
                None => (held, false),
            });
        }
        let out: &[u8] = match &released {
            Some((out, _)) => out,
            None => &self.buffer[..consumed],
        };
        if self.write.write_all(out).await.is_err() {
            return Some(End::ClientClosed);
        }
        if let Capture::Copying(copy) = &mut self.capture {
            let keep = self.scope.as_ref().map_or(0, intercept::copy_limit);
            if copy.len() + out.len() > keep {
                self.capture = Capture::Skipping;
            } else {
                copy.extend_from_slice(out);
            }
        }
        if released.is_none() {
            self.buffer.advance(consumed);
        }
        if let Some(Event::Line(line)) = step.event {
            if matches!(&self.capture, Capture::Copying(copy) if !is_fetch_response(copy)) {
                self.capture = Capture::Skipping;
            }
            match &released {
                // Not for the client's eyes: nothing to learn from either.
                Some((out, true)) if out.is_empty() => {}
                Some((out, true)) => self.observe(&out[..out.len().min(super::framing::HEAD_LEN)]),
                _ => self.observe(&line.head),
            }
            if let Some(announce) = line.announce {
                // The literal that follows is copied whole or not at all: room for it at once
                // (growing by doubling would copy a large body again and again).
                if let Capture::Copying(copy) = &mut self.capture {
                    let room = usize::try_from(announce.len).unwrap_or(usize::MAX).saturating_add(64);
                    if copy.len().saturating_add(room) <= self.scope.as_ref().map_or(0, intercept::copy_limit) {
                        copy.reserve(room);
                    }
                }
                self.framer.accept_literal();
            } else if let Capture::Copying(copy) = std::mem::replace(&mut self.capture, Capture::Idle) {
                Box::pin(self.tee_response(copy.into())).await;
            }
            self.framer.recycle(line.head);
        }
        if let Some((mut spare, _)) = released {
            // The next held line reuses the allocation.
            spare.clear();
            if spare.capacity() <= KEPT_SPARE {
                self.held_spare = spare;
            }
        }
        if self.framer.at_boundary() {
            self.capture = Capture::Idle;
            if self.settle_due {
                self.settle_due = false;
                Box::pin(self.settle_tees()).await;
            }
        }
        None
    }

    /// How many bytes at the start of the buffer are complete responses that need nothing
    /// but to be observed and passed on, observed here: at a response boundary with nothing
    /// of mailgate's own held or copied, up to a CAPABILITY (filtered by `process`) or a
    /// response whose literal is not all in the buffer yet (streamed by `process`). Most of
    /// a sync is such responses (flags, headers and envelopes in small literals); they go
    /// out in one write instead of a framing step and a write per line and literal.
    fn plain_responses(&mut self) -> usize {
        if !self.framer.at_boundary()
            || self.framer.pending_literal().is_some()
            || self.implicit.holds()
            || self.tees.load(Ordering::Relaxed) > 0
            || !matches!(self.capture, Capture::Idle)
        {
            return 0;
        }
        // Observing needs `&mut self`; the buffer is not touched by it.
        let buffer = std::mem::take(&mut self.buffer);
        let mut done = 0;
        'responses: while done < buffer.len() {
            const CAPABILITY: &[u8] = b"* CAPABILITY ";
            if buffer[done..].get(..CAPABILITY.len()).is_some_and(|p| p.eq_ignore_ascii_case(CAPABILITY)) {
                break;
            }
            // The response's lines, each maybe ending in a literal that follows it.
            let mut at = done;
            loop {
                let Some(newline) = memchr::memchr(b'\n', &buffer[at..]) else { break 'responses };
                let line_end = at + newline + 1;
                match super::framing::parse_announce(strip_eol(&buffer[at..line_end])) {
                    Some(literal) => match usize::try_from(literal.len).ok().and_then(|n| line_end.checked_add(n)) {
                        Some(end) if end <= buffer.len() => at = end,
                        _ => break 'responses,
                    },
                    None => {
                        at = line_end;
                        break;
                    }
                }
            }
            // As `process` sees it: the head of the response's first line.
            let first = &buffer[done..at];
            let first = &first[..memchr::memchr(b'\n', first).map_or(first.len(), |i| i + 1)];
            self.observe(&first[..first.len().min(super::framing::HEAD_LEN)]);
            done = at;
        }
        self.buffer = buffer;
        done
    }

    /// A held response line (complete; `literal`: a literal follows it) as the client is to
    /// see it: `None` when it is not for the client at all. mailgate's own STATUS is
    /// answered here; a client's enabling command ends the stripping as the upstream begins
    /// answering it, after announcing the `[HIGHESTMODSEQ]` the upstream would have sent.
    async fn release(&mut self, line: Vec<u8>, literal: bool) -> Option<Vec<u8>> {
        // Most lines: nothing of mailgate's own and no client's enabling command in flight,
        // no lock needed.
        let pending = self.implicit.own.load(Ordering::Relaxed) + self.implicit.enabling.load(Ordering::Relaxed);
        let (front, tagged) = if pending == 0 {
            (None, None)
        } else {
            let shared = self.lock();
            let front = shared.in_flight.front().map(|f| (f.modseq, f.tag.clone()));
            let tagged = match response::kind(strip_eol(&line)) {
                Kind::Tagged { tag, rest } => Some((tag.to_vec(), response::status(rest).map(|s| s.status))),
                _ => None,
            };
            (front, tagged)
        };
        match front {
            Some((Own::Quota, _)) if !literal => {
                let taken = match self.quota.as_mut() {
                    Some(question) => question.take(strip_eol(&line)),
                    None => super::quota::Taken::Relay,
                };
                match taken {
                    super::quota::Taken::Relay => {}
                    super::quota::Taken::Absorbed => return None,
                    super::quota::Taken::Answered(usage) => {
                        {
                            let mut shared = self.lock();
                            shared.in_flight.pop_front();
                            shared.begin_reselect();
                        }
                        self.implicit.own.fetch_sub(1, Ordering::Relaxed);
                        self.completed.notify_one();
                        // In the completion's place, at a response boundary: the ALERT, if due.
                        let question = self.quota.take()?;
                        return question.conclude(self.service, usage);
                    }
                }
            }
            Some((Own::Status, tag)) if !literal => match &tagged {
                Some((t, _)) if *t == tag => {
                    let mut shared = self.lock();
                    shared.in_flight.pop_front();
                    self.implicit.own.fetch_sub(1, Ordering::Relaxed);
                    shared.begin_reselect();
                    self.completed.notify_one();
                    return None;
                }
                _ => {
                    if let Some(value) = modseq::status_highest_modseq(&line) {
                        self.lock().status_modseq = Some(value);
                        return None;
                    }
                }
            },
            Some((Own::Enables { announce }, tag)) if self.implicit.on.load(Ordering::Relaxed) => {
                // A command refused as malformed (BAD) enabled nothing; one that failed (a
                // SELECT of a mailbox that does not exist, NO) still did, as Dovecot does.
                let refused = matches!(&tagged, Some((t, status)) if *t == tag && *status == Some(Status::Bad));
                if !refused {
                    self.implicit.on.store(false, Ordering::Relaxed);
                    let (value, text) = {
                        let mut shared = self.lock();
                        (shared.status_modseq.take(), shared.modseq_text.clone())
                    };
                    if let (true, Some(value)) = (announce, value) {
                        let announced = modseq::highest_modseq_line(value, text.as_deref());
                        if self.write.write_all(&announced).await.is_err() {
                            return Some(line);
                        }
                    }
                    return Some(line);
                }
            }
            _ => {}
        }
        if line.strip_prefix(b"* ").is_some_and(modseq::announces) && self.lock().answering_reselect() {
            return Some(line);
        }
        if !self.implicit.on.load(Ordering::Relaxed) {
            return Some(line);
        }
        self.stripped(line, literal)
    }

    /// `line` without what mailgate's modification sequences added to it. A SELECT's
    /// `[HIGHESTMODSEQ]` stays: mailgate asks for modification sequences only in mailboxes
    /// that announce them in any case.
    fn stripped(&mut self, mut line: Vec<u8>, literal: bool) -> Option<Vec<u8>> {
        match modseq::strip(&mut line) {
            Stripped::Keep | Stripped::Rewritten => Some(line),
            Stripped::Drop if literal => Some(line),
            Stripped::Drop => {
                if let Some(text) = modseq::highest_modseq_text(&line) {
                    let mut shared = self.lock();
                    if shared.modseq_text.is_none() {
                        shared.modseq_text = Some(text.to_vec());
                    }
                }
                None
            }
        }
    }

    /// Stores what a FETCH response relayed while tees are in flight carries for the
    /// oldest of them.
    async fn tee_response(&mut self, response: bytes::Bytes) {
        let tee = self.lock().in_flight.iter().find_map(|f| f.tee.clone());
        let Some(tee) = tee else { return };
        let modseq = self.response_modseq.take();
        let mut stored = std::mem::take(&mut *tee.stored.lock().expect("tee lock poisoned"));
        let before = stored.len();
        tee.fill
            .learn_with(&response, &mut stored, |parsed, uid| {
                if let (Some(learning), Some(modseq)) =
                    (tee.learning.lock().expect("tee lock poisoned").as_ref(), modseq)
                {
                    learning.note(&response, parsed, uid, modseq);
                }
            })
            .await;
        self.cache_misses += (stored.len() - before) as u64;
        *tee.stored.lock().expect("tee lock poisoned") = stored;
    }

    /// Keeps or takes back what completed tees stored.
    async fn settle_tees(&mut self) {
        let (settling, highest_uid) = {
            let mut shared = self.lock();
            (std::mem::take(&mut shared.settling), shared.uids.highest())
        };
        for (tee, clean) in settling {
            // The UIDs it relayed raise the mailbox's UIDNEXT mark (or show it went down).
            let items = &tee.fill.items;
            super::snapshot::check_uid_next(items.scope(), items.selected(), highest_uid).await;
            let stored = std::mem::take(&mut *tee.stored.lock().expect("tee lock poisoned"));
            let clean = clean && !tee.tainted.load(Ordering::Relaxed);
            stored.settle(&tee.fill.items, clean).await;
            let learning = tee.learning.lock().expect("tee lock poisoned").take();
            if let Some(learning) = learning {
                let stamp = self.lock().view_stamp();
                learning.settle(clean, stamp).await;
            }
        }
    }

    /// At the session's end: tees still in flight never saw their completion (the upstream
    /// or the client went away mid-answer), so what they stored is taken back, as after a
    /// `NO`; completed ones not settled yet are settled as they completed.
    async fn abandon_tees(&mut self) {
        {
            let mut shared = self.lock();
            let unfinished: Vec<Arc<Tee>> = shared.in_flight.iter_mut().filter_map(|f| f.tee.take()).collect();
            shared.settling.extend(unfinished.into_iter().map(|tee| (tee, false)));
        }
        // Boxed: it runs once, after the pumps, and would size the session's future.
        Box::pin(self.settle_tees()).await;
    }

    /// Keeps the shared view of the session in step with the upstream's answers.
    fn observe(&mut self, head: &[u8]) {
        // Callers pass a line head with or without its line end (`7 EXPUNGE\r\n` must
        // still be an EXPUNGE).
        let head = super::framing::strip_eol(head);
        let kind = response::kind(head);
        // Most lines of a sync: a FETCH response that teaches nothing (no cache to learn
        // UIDs for, no MODSEQ to notice). Counted without the lock, which is otherwise most
        // of what relaying a line costs.
        if let Kind::Untagged(rest) = kind {
            if self.scope.is_none() && is_fetch_response(head) && !modseq::mentions(rest) {
                self.fetched += 1;
                return;
            }
        }
        let mut shared = self.shared.lock().expect("relay lock poisoned");
        shared.fetched += std::mem::take(&mut self.fetched);
        match kind {
            Kind::Continuation => {
                if let Some((_, answer @ None)) = shared.literal_wait.as_mut() {
                    *answer = Some(true);
                    self.completed.notify_one();
                }
            }
            Kind::Tagged { tag, rest } => {
                if shared.selecting.as_ref().is_some_and(|s| s.tag == tag) {
                    let Selecting { mailbox, uid_validity, uid_next, recent, tracked, highest_modseq, .. } =
                        shared.selecting.take().expect("just checked");
                    shared.recent = recent;
                    shared.tracked = tracked;
                    shared.highest_modseq = highest_modseq;
                    let ok = response::status(rest).is_some_and(|s| s.status == Status::Ok);
                    shared.view_changed = false;
                    shared.inbox = ok && mailbox.as_deref() == Some("INBOX");
                    if let (true, Some(exists)) = (ok, shared.exists) {
                        self.service.metrics.mailbox_messages.observe(f64::from(exists));
                    }
                    shared.selected = match (ok, mailbox, uid_validity) {
                        (true, Some(mailbox), Some(uid_validity)) => {
                            Some(Selected { mailbox: Name::new(&mailbox), uid_validity, uid_next })
                        }
                        _ => None,
                    };
                }
                if let Some(i) = shared.in_flight.iter().position(|t| t.tag == tag) {
                    let done = shared.in_flight.remove(i).expect("position is in range");
                    if matches!(done.modseq, Own::Enables { .. }) {
                        self.implicit.enabling.fetch_sub(1, Ordering::Relaxed);
                    }
                    if done.modseq == Own::Quota {
                        // Only a completion `release` could not read (a literal in it) comes
                        // here: the question ends unread, and is nobody's command.
                        self.implicit.own.fetch_sub(1, Ordering::Relaxed);
                        if let Some(question) = self.quota.take() {
                            question.unanswered(self.service);
                        }
                        shared.begin_reselect();
                        self.completed.notify_one();
                        return;
                    }
                    if done.enables_condstore && response::status(rest).is_some_and(|s| s.status != Status::Bad) {
                        shared.condstore = true;
                    }
                    let clean = response::status(rest).is_some_and(|s| s.status == Status::Ok)
                        && super::snapshot::status_is_clean(rest);
                    if !clean {
                        for tee in shared.in_flight.iter().filter_map(|f| f.tee.as_ref()) {
                            tee.tainted.store(true, Ordering::Relaxed);
                        }
                    }
                    if let Some(tee) = done.tee {
                        self.tees.fetch_sub(1, Ordering::Relaxed);
                        shared.settling.push((tee, clean));
                        self.settle_due = true;
                    }
                    if done.label == "logout" && response::status(rest).is_some_and(|s| s.status == Status::Ok) {
                        shared.logged_out = true;
                    }
                    completed_command(self.service, &mut shared, done.label, done.started);
                    shared.begin_reselect();
                    self.completed.notify_one();
                }
                if shared.idling.as_deref() == Some(tag) {
                    shared.idling = None;
                }
                if let Some((waiting, answer @ None)) = shared.literal_wait.as_mut() {
                    if waiting == tag {
                        *answer = Some(false);
                        self.completed.notify_one();
                    }
                }
            }
            Kind::Untagged(rest) => match response::status(rest) {
                Some(s) if s.status == Status::Bye => self.upstream_bye = true,
                None if rest.len() > 8 && rest[..8].eq_ignore_ascii_case(b"ENABLED ") => {
                    for word in rest[8..].split(|&b| b == b' ') {
                        if word.eq_ignore_ascii_case(b"QRESYNC") {
                            (shared.qresync, shared.condstore) = (true, true);
                        } else if word.eq_ignore_ascii_case(b"CONDSTORE") {
                            shared.condstore = true;
                        }
                    }
                }
                // A SELECT's `[HIGHESTMODSEQ]` says the mailbox has modification sequences,
                // not that the session enabled CONDSTORE (Dovecot announces it in any case).
                _ if shared.answering_reselect() && modseq::announces(rest) => select_announcement(&mut shared, rest),
                // `HIGHESTMODSEQ`, `NOMODSEQ`, or `MODSEQ` in FETCH and SEARCH data: the upstream
                // sends them only once CONDSTORE is enabled (RFC 7162 §3.1).
                _ if !shared.condstore && modseq::mentions(rest) => {
                    shared.condstore = true;
                    // Not a response this arm must otherwise act on (a status with
                    // HIGHESTMODSEQ, a FETCH or SEARCH with MODSEQ): learn from it too.
                    drop(shared);
                    self.observe(head);
                }
                Some(s) if s.status == Status::Ok => {
                    if let Some(("UIDNEXT", value)) = s.code.as_ref().map(|(c, v)| (c.as_str(), *v)) {
                        if let Some(selecting) = shared.selecting.as_mut() {
                            selecting.uid_next = std::str::from_utf8(value).ok().and_then(|v| v.trim().parse().ok());
                        }
                    }
                    if let Some(("UIDVALIDITY", value)) = s.code.as_ref().map(|(c, v)| (c.as_str(), *v)) {
                        let value = std::str::from_utf8(value).ok().and_then(|v| v.trim().parse::<u32>().ok());
                        if let Some(selecting) = shared.selecting.as_mut() {
                            selecting.uid_validity = value;
                        } else if let (Some(selected), Some(value)) = (shared.selected.as_mut(), value) {
                            // The mailbox changed under us (RFC 9051 §2.3.1.1): new keys.
                            if selected.uid_validity != value {
                                selected.uid_validity = value;
                                shared.uids.forget();
                            }
                        }
                    }
                }
                _ => {
                    // `n EXPUNGE` moves the later messages down; VANISHED names UIDs we may
                    // not know: forget everything.
                    let mut words = rest.splitn(3, |&b| b == b' ');
                    let (first, second) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
                    if second.eq_ignore_ascii_case(b"FETCH") {
                        shared.fetched += 1;
                        // The UID map serves the cache only: a session without one does not
                        // pay for it on every response of a sync.
                        if self.scope.is_some() {
                            if let Some((seq, uid)) = super::fetch::seq_and_uid(rest) {
                                shared.uids.learn(seq, uid);
                            }
                        }
                    } else if second.eq_ignore_ascii_case(b"EXPUNGE") {
                        if let Some(seq) = std::str::from_utf8(first).ok().and_then(|s| s.parse().ok()) {
                            if shared.removing_from_inbox() {
                                shared.inbox_removed += 1;
                            }
                            shared.uids.expunge(seq);
                            shared.exists = shared.exists.map(|e| e.saturating_sub(1));
                            shared.view_changed = true;
                        }
                    } else if second.eq_ignore_ascii_case(b"RECENT") {
                        let count = std::str::from_utf8(first).ok().and_then(|s| s.parse().ok());
                        match shared.selecting.as_mut() {
                            Some(selecting) => selecting.recent = count,
                            None => shared.recent = count,
                        }
                    } else if second.eq_ignore_ascii_case(b"EXISTS") {
                        if let Some(count) = std::str::from_utf8(first).ok().and_then(|s| s.parse().ok()) {
                            shared.uids.exists(count);
                            shared.view_changed |= shared.selecting.is_none() && shared.exists != Some(count);
                            shared.exists = Some(count);
                        }
                    } else if first.eq_ignore_ascii_case(b"VANISHED") {
                        // `VANISHED (EARLIER)` reports the past (a resync), not this command.
                        if shared.removing_from_inbox() && !second.starts_with(b"(") {
                            shared.inbox_removed += uid_set_size(second);
                        }
                        shared.uids.forget();
                        shared.view_changed = true;
                    }
                }
            },
        }
    }
}

impl<R: AsyncRead + AsyncWrite, W: AsyncRead + AsyncWrite> UpstreamPump<'_, R, W> {
    /// The next framed piece of the upstream's answer for a job: whether it is literal data,
    /// its bytes, and the event it completed. Announced literals are always accepted (the
    /// job's own size limit applies instead).
    async fn next_fragment(&mut self) -> Result<(bool, BytesMut, Option<Event>), JobError> {
        if self.buffer.is_empty() {
            match pumps::read_into(&mut self.read, &mut self.buffer, false).await {
                Ok(0) | Err(_) => return Err(JobError::UpstreamClosed),
                Ok(_) => {}
            }
        }
        if self.framer.pending_literal().is_some() {
            self.framer.accept_literal();
        }
        let in_literal = self.framer.in_literal();
        let step = self.framer.feed(&self.buffer).map_err(|_| JobError::UpstreamClosed)?;
        Ok((in_literal, self.buffer.split_to(step.consumed), step.event))
    }
}

/// The side copy of the response being relayed (see [`Tee`]).
enum Capture {
    Idle,
    Copying(Vec<u8>),
    /// Too large to keep, or not a FETCH response: relayed without a copy.
    Skipping,
}

/// Whether a response (its start) is `* n FETCH ...`.
/// A client's `ID` after login (`line`, without literals): the census learns what the
/// client is, once.
/// Its support history learns the software too.
fn identify(
    unidentified: &mut Option<Box<crate::metrics::clients::Unidentified>>,
    activity: &mut Option<Box<crate::insight::Activity>>,
    line: &[u8],
) {
    if unidentified.is_none() && activity.is_none() {
        return;
    }
    let parts = [super::command::Part::Line { text: line.to_vec(), literal_follows: false }];
    if let Ok(super::command::Command::Id(Some(software))) = super::command::parse(&parts).map(|tagged| tagged.command)
    {
        if let Some(activity) = activity.as_mut() {
            activity.identified(&software);
        }
        if let Some(mut note) = unidentified.take() {
            note.identified(software);
        }
    }
}

/// How many UIDs a set (`1:3,7`) names; `*` and garbage count nothing.
fn uid_set_size(set: &[u8]) -> u64 {
    let set = std::str::from_utf8(set).unwrap_or_default().trim();
    (set.split(','))
        .map(|range| match range.split_once(':') {
            None => u64::from(range.parse::<u32>().is_ok()),
            Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
                (Ok(a), Ok(b)) => u64::from(a.abs_diff(b)) + 1,
                _ => 0,
            },
        })
        .sum()
}

fn is_fetch_response(head: &[u8]) -> bool {
    let Some(rest) = head.strip_prefix(b"* ") else { return false };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    digits > 0 && rest.len() >= digits + 7 && rest[digits..digits + 7].eq_ignore_ascii_case(b" FETCH ")
}

/// Most one upstream response may weigh while a job assembles it.
fn job_response_limit(service: &Service) -> usize {
    let cache = service.config.cache.max_entry_bytes.as_usize();
    let literal = service.config.imap.max_literal_bytes.as_usize();
    cache.max(literal).saturating_mul(2).saturating_add(1 << 20)
}

impl<R: AsyncRead + AsyncWrite, W: AsyncRead + AsyncWrite> JobIo for UpstreamPump<'_, R, W> {
    async fn response(&mut self) -> Result<Vec<u8>, JobError> {
        let limit = job_response_limit(self.service);
        let mut response = Vec::new();
        loop {
            let (_, bytes, event) = self.next_fragment().await?;
            response.extend_from_slice(&bytes);
            if response.len() > limit {
                return Err(JobError::TooLarge);
            }
            if let Some(Event::Line(line)) = event {
                if line.announce.is_none() {
                    return Ok(response);
                }
                self.framer.accept_literal();
            }
        }
    }

    async fn relay_response(&mut self, tag: &str, keep: usize) -> Result<Relayed, JobError> {
        let limit = job_response_limit(self.service);
        let (mut line, mut kept, mut first) = (Vec::new(), Some(Vec::new()), true);
        loop {
            let (in_literal, bytes, event) = self.next_fragment().await?;
            if in_literal {
                self.write.write_all(&bytes).await.map_err(|_| JobError::ClientClosed)?;
                match kept.as_mut() {
                    Some(copy) if copy.len() + bytes.len() <= keep => copy.extend_from_slice(&bytes),
                    _ => kept = None,
                }
                continue;
            }
            // Lines are held until complete: the first may be mailgate's completion.
            line.extend_from_slice(&bytes);
            if line.len() > limit {
                return Err(JobError::TooLarge);
            }
            let Some(Event::Line(parsed)) = event else { continue };
            if first && intercept::is_tagged(&line, tag) {
                return Ok(Relayed::Tagged(line));
            }
            if first {
                if self.implicit.on.load(Ordering::Relaxed) {
                    match self.stripped(std::mem::take(&mut line), parsed.announce.is_some()) {
                        Some(kept) => line = kept,
                        None => return Ok(Relayed::Sent(None)),
                    }
                }
                self.observe(&line[..line.len().min(super::framing::HEAD_LEN)]);
                first = false;
            }
            self.write.write_all(&line).await.map_err(|_| JobError::ClientClosed)?;
            match kept.as_mut() {
                Some(copy) if copy.len() + line.len() <= keep => copy.extend_from_slice(&line),
                _ => kept = None,
            }
            line.clear();
            if parsed.announce.is_none() {
                return Ok(Relayed::Sent(kept));
            }
            self.framer.accept_literal();
        }
    }

    async fn to_upstream(&mut self, bytes: Vec<u8>) -> Result<(), JobError> {
        self.writes.send(bytes).await.map_err(|_| JobError::UpstreamClosed)
    }

    async fn to_client(&mut self, bytes: &[u8]) -> Result<(), JobError> {
        self.write.write_all(bytes).await.map_err(|_| JobError::ClientClosed)
    }

    async fn forward(&mut self, response: &[u8]) -> Result<(), JobError> {
        let head_end = response.iter().position(|&b| b == b'\n').map_or(response.len(), |i| i + 1);
        let rewritten;
        let response = if self.implicit.on.load(Ordering::Relaxed) {
            let literal = head_end < response.len();
            match self.stripped(response[..head_end].to_vec(), literal) {
                None => return Ok(()),
                Some(mut first) => {
                    first.extend_from_slice(&response[head_end..]);
                    rewritten = first;
                    &rewritten[..]
                }
            }
        } else {
            response
        };
        let head_end = response.iter().position(|&b| b == b'\n').map_or(response.len(), |i| i + 1);
        self.observe(&response[..head_end.min(super::framing::HEAD_LEN)]);
        self.write.write_all(response).await.map_err(|_| JobError::ClientClosed)
    }

    fn modseq_usable(&self) -> bool {
        self.lock().modseq_usable()
    }

    fn recent_free(&self) -> bool {
        self.lock().recent == Some(0)
    }

    fn selected_highest_modseq(&self) -> Option<u64> {
        self.lock().highest_modseq
    }

    fn enable_modseq(&mut self) {
        if !self.lock().condstore {
            self.implicit.on.store(true, Ordering::Relaxed);
            self.implicit.ever.store(true, Ordering::Relaxed);
        }
    }

    fn tag(&mut self) -> String {
        self.next_tag += 1;
        format!("mg{}", self.next_tag)
    }

    fn seq_of(&self, uid: u32) -> Option<u32> {
        self.lock().uids.seq(uid)
    }

    fn learn_uid(&mut self, seq: u32, uid: u32) {
        self.lock().uids.learn(seq, uid);
    }

    fn learn_uids(&mut self, pairs: &[(u32, u32)]) {
        let mut shared = self.lock();
        for &(seq, uid) in pairs {
            shared.uids.learn(seq, uid);
        }
    }

    fn all_uids_known(&self) -> bool {
        self.lock().uids.is_complete()
    }

    fn highest_uid(&self) -> Option<u32> {
        self.lock().uids.highest()
    }

    fn learn_all_uids(&mut self, uids: &[u32]) {
        self.lock().uids.learn_all(uids);
    }

    fn all_uids(&self) -> Option<Vec<(u32, u32)>> {
        self.lock().uids.all()
    }

    fn modseq(&self) -> intercept::Modseq {
        let shared = self.lock();
        intercept::Modseq { condstore: shared.condstore, qresync: shared.qresync }
    }

    fn view_stamp(&self) -> Option<(u32, u32)> {
        self.lock().view_stamp()
    }

    fn answered(&mut self, messages: usize) {
        // Handed to the shared state once the job is done (no lock per message).
        self.answered += messages as u32;
    }

    fn count(&mut self, hits: usize, misses: usize) {
        self.cache_hits += hits as u64;
        self.cache_misses += misses as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modseq_is_noticed_in_any_case_anywhere_in_a_head() {
        assert!(modseq::mentions(b"OK [HIGHESTMODSEQ 12] Highest"));
        assert!(modseq::mentions(b"3 FETCH (UID 5 MODSEQ (7))"));
        assert!(modseq::mentions(b"3 FETCH (uid 5 modseq (7))"));
        assert!(modseq::mentions(b"SEARCH 1 2 (MODSEQ 9)"));
        assert!(!modseq::mentions(b"3 FETCH (UID 5 FLAGS (\\Seen) BODY[HEADER.FIELDS (FROM MESSAGE-ID)] {12}"));
        assert!(!modseq::mentions(b"OK [UIDNEXT 5] MODSE"));
    }
}
