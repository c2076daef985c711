//! The cache's FETCH path: one client FETCH answered with the mutable part asked upstream
//! and the immutable part taken from the cache, fetched upstream only for the misses.
//!
//! Phase one sends `[UID] FETCH set (UID <the client's mutable items>)`, plus the probe
//! `BODY[]<0.1>` when the client's items set `\Seen`: the upstream then sets `\Seen` (and
//! reports the new FLAGS) exactly as it would for the client's own command, also when every
//! body comes from the cache. Phase one yields the sequence numbers, UIDs and mutable
//! values. Phase two asks `UID FETCH` for the missing items only, in batches of
//! [`BATCH`] messages; each complete item is stored. The client gets one FETCH response per
//! message, built from the upstream's own item bytes, then its tagged completion.
//!
//! Anything that does not fit (a response that does not parse, an item missing from the
//! upstream's answer) is relayed as the upstream sent it: a client may receive several FETCH
//! responses for one message (RFC 9051 §7.5.2), never a wrong one. A message expunged
//! between the phases gets no FETCH response (its sequence number may already belong to
//! another message once the EXPUNGE is relayed). Untagged responses unrelated to the job
//! flow through at once, in order.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;

use tokio::sync::oneshot;

use bytes::Bytes;

use super::fetch::{parse_request, parse_response, FetchRequest, FetchResponse, ItemKind, SequenceSet};
use super::flags::{self, Flags};
use super::renumber::{Mark, Renumber};
use super::snapshot::{self, Items, Stored};
use crate::cache::{Claim, Key, Kind, LoadGuard, Name, Scope};

/// How long a miss waits for another session that is loading the same item.
const SHARED_LOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Messages per phase-two command: bounds what one batch holds in memory.
pub const BATCH: usize = 100;

/// The probe that makes the upstream set `\Seen` (a partial fetch of one octet).
const SEEN_PROBE: &str = "BODY[]<0.1>";
const SEEN_PROBE_RESPONSE: &str = "BODY[]<0>";

/// Asked in phase one to check the cache against the upstream: a message's size never
/// changes, so another size under the same UIDVALIDITY shows a rebuilt mailbox.
pub(super) const VALIDATOR: &str = "RFC822.SIZE";

/// The selected mailbox, once its UIDVALIDITY is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selected {
    pub mailbox: Name,
    pub uid_validity: u32,
    /// UIDNEXT as the upstream reported it at SELECT: it never goes down under one
    /// UIDVALIDITY (RFC 9051 §2.3.1.1), unless the mailbox was restored from an older copy.
    pub uid_next: Option<u32>,
}

/// A client FETCH to answer.
#[derive(Debug)]
pub struct Job {
    pub request: FetchRequest,
    pub selected: Selected,
    pub modseq: Modseq,
}

/// What the session's upstream does about modification sequences (RFC 7162).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Modseq {
    /// CONDSTORE is enabled: a flag change is reported with its MODSEQ.
    pub condstore: bool,
    /// QRESYNC is enabled: FETCH responses that report a change carry UID (§3.2.4).
    pub qresync: bool,
}

impl Job {
    /// A job for `line` if the cache can serve it in mailbox `selected`.
    pub fn for_line(line: &[u8], selected: Option<&Selected>, modseq: Modseq) -> Option<Job> {
        let selected = selected?.clone();
        Some(Job { request: parse_request(line)?, selected, modseq })
    }
}

/// The I/O a job needs from the relay.
#[allow(async_fn_in_trait)]
pub trait JobIo {
    /// The next complete upstream response (lines and literals).
    async fn response(&mut self) -> Result<Vec<u8>, JobError>;
    /// The next upstream response streamed to the client as it arrives (nothing of a big
    /// body is held), a copy kept when it is at most `keep` bytes; the completion tagged
    /// `tag` is returned instead, unsent.
    async fn relay_response(&mut self, tag: &str, keep: usize) -> Result<Relayed, JobError>;
    async fn to_upstream(&mut self, bytes: Vec<u8>) -> Result<(), JobError>;
    async fn to_client(&mut self, bytes: &[u8]) -> Result<(), JobError>;
    /// An unrelated response: relay it (and let the session learn from it).
    async fn forward(&mut self, response: &[u8]) -> Result<(), JobError>;
    /// A fresh tag for mailgate's own commands.
    fn tag(&mut self) -> String;
    /// Items answered from the cache and fetched upstream, for the session's totals.
    fn count(&mut self, hits: usize, misses: usize);
    /// Messages answered with a FETCH response mailgate composed (the metrics count the
    /// relayed ones themselves).
    fn answered(&mut self, messages: usize);
    /// The sequence number of `uid` in the selected mailbox, when known for sure.
    fn seq_of(&self, uid: u32) -> Option<u32>;
    /// A (sequence number, UID) pair the upstream just reported.
    fn learn_uid(&mut self, seq: u32, uid: u32);
    /// Several of them at once.
    fn learn_uids(&mut self, pairs: &[(u32, u32)]);
    /// Every message's UID is known.
    fn all_uids_known(&self) -> bool;
    /// The highest UID the session knows in the selected mailbox.
    fn highest_uid(&self) -> Option<u32>;
    /// The answer to `UID SEARCH ALL`: the n-th UID is message n.
    fn learn_all_uids(&mut self, uids: &[u32]);
    /// Every message as (sequence number, UID), in order, when the session knows them all.
    fn all_uids(&self) -> Option<Vec<(u32, u32)>>;
    /// UIDNEXT and the message count as SELECT reported them, while no message has arrived
    /// or gone since: together with UIDVALIDITY they name one set of UIDs.
    fn view_stamp(&self) -> Option<(u32, u32)>;
    /// What the upstream does about modification sequences now (the job's own `modseq`
    /// was taken when the client sent the command).
    fn modseq(&self) -> Modseq;
    /// Whether mailgate may ask the upstream for modification sequences to check the flags
    /// it remembers: the upstream has CONDSTORE and keeps them for the selected mailbox, and
    /// the client did not enable it (nor QRESYNC).
    fn modseq_usable(&self) -> bool;
    /// No message of the selected mailbox is `\Recent` to this session (`* 0 RECENT`,
    /// nothing arrived since): its FLAGS are every session's, and may be remembered.
    fn recent_free(&self) -> bool;
    /// The HIGHESTMODSEQ the selected mailbox announced at SELECT.
    fn selected_highest_modseq(&self) -> Option<u64>;
    /// mailgate is about to send a command that enables CONDSTORE: from now on what it adds
    /// to responses is kept from the client (see [`super::modseq`]).
    fn enable_modseq(&mut self);
}

/// What [`JobIo::relay_response`] saw.
#[derive(Debug)]
pub enum Relayed {
    /// mailgate's own completion line, not sent to the client.
    Tagged(Vec<u8>),
    /// A response sent to the client; its bytes when small enough to keep.
    Sent(Option<Vec<u8>>),
}

#[derive(Debug, PartialEq, Eq)]
pub enum JobError {
    UpstreamClosed,
    ClientClosed,
    TooLarge,
}

/// The UIDs phase one reported, sorted: they mostly come in ascending order (an append), and
/// a lookup is a binary search, no hashing per message.
#[derive(Default)]
pub(super) struct Reported(Vec<u32>);

impl Reported {
    pub(super) fn contains(&self, uid: u32) -> bool {
        self.0.binary_search(&uid).is_ok()
    }

    /// Notes `uid`; false if it was reported before.
    pub(super) fn insert(&mut self, uid: u32) -> bool {
        match self.0.last() {
            Some(&last) if uid <= last => match self.0.binary_search(&uid) {
                Ok(_) => false,
                Err(at) => {
                    self.0.insert(at, uid);
                    true
                }
            },
            _ => {
                self.0.push(uid);
                true
            }
        }
    }
}

/// One message as phase one reported it.
struct Message {
    uid: u32,
    response: Vec<u8>,
    parsed: FetchResponse,
    /// Cached item bytes by position in the request's cached items; `None` = miss.
    items: Vec<Option<Bytes>>,
    /// When its sequence number was current.
    mark: Mark,
}

/// The normalized mailbox name of `tag SELECT|EXAMINE name [...]` (INBOX is
/// case-insensitive); `None` when it is not such a command or the name is a literal.
pub fn selected_mailbox(line: &[u8]) -> Option<Option<String>> {
    let mut words = line.splitn(3, |&b| b == b' ');
    let (_tag, command) = (words.next()?, words.next()?);
    if !command.eq_ignore_ascii_case(b"SELECT") && !command.eq_ignore_ascii_case(b"EXAMINE") {
        return None;
    }
    // From here on it is a SELECT: a name that cannot be read means "not cached", never
    // "the selection did not change".
    Some(words.next().and_then(|rest| std::str::from_utf8(rest).ok()).and_then(mailbox_name))
}

/// An astring mailbox name (atom or quoted; not a literal), INBOX normalized.
fn mailbox_name(rest: &str) -> Option<String> {
    let name = if let Some(quoted) = rest.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = quoted.chars();
        loop {
            match chars.next()? {
                '\\' => name.push(chars.next()?),
                '"' => break name,
                c => name.push(c),
            }
        }
    } else {
        let atom = rest.split(' ').next().unwrap_or("");
        if atom.is_empty() || atom.starts_with('{') || atom.ends_with('}') {
            return None;
        }
        atom.to_string()
    };
    Some(if name.eq_ignore_ascii_case("INBOX") { "INBOX".to_string() } else { name })
}

/// A cacheable item of the request (where it is cached: the same position in the job's
/// [`Items`]).
pub(super) struct Wanted<'a> {
    /// As the client wrote it.
    pub(super) request: &'a str,
    /// The name of the upstream's response item.
    pub(super) response: &'a str,
}

pub(super) fn is_tagged(response: &[u8], tag: &str) -> bool {
    response.starts_with(tag.as_bytes()) && response.get(tag.len()) == Some(&b' ')
}

/// The status part of a tagged line (`OK Fetch completed.`), without its line ending.
pub(super) fn status_text(response: &[u8], tag: &str) -> Vec<u8> {
    let line = &response[tag.len() + 1..];
    let end = line.iter().position(|&b| b == b'\r' || b == b'\n').unwrap_or(line.len());
    line[..end].to_vec()
}

/// Most UIDs a FETCH may name for the upstream-free path.
const LOCAL_MAX_UIDS: usize = 1000;

/// The UIDs of a set without `*`, ascending, or `None` when there are too many.
fn explicit_uids(set: &str) -> Option<Vec<u32>> {
    let mut uids = Vec::new();
    for range in set.split(',') {
        let (a, b) = range.split_once(':').unwrap_or((range, range));
        let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
        let (a, b) = (a.min(b), a.max(b));
        if uids.len() + (b - a) as usize >= LOCAL_MAX_UIDS {
            return None;
        }
        uids.extend(a..=b);
    }
    uids.sort_unstable();
    uids.dedup();
    Some(uids)
}

/// A `UID FETCH` of immutable items only (UID aside), without `\Seen`, for messages whose
/// sequence numbers are known and whose items are all cached, needs no upstream at all:
/// the answer is what the upstream would say for a message that still exists in this
/// session's view (cached content never changes), and pending untagged updates simply come
/// with the next command, as servers may do.
async fn answer_locally<Io: JobIo>(
    io: &mut Io,
    job: &Job,
    client_tag: &str,
    items: &Items,
    wanted: &[Wanted<'_>],
) -> Result<bool, JobError> {
    let request = &job.request;
    let only_uid = request.mutable_requests().iter().all(|m| m.eq_ignore_ascii_case("UID"));
    if !request.uid || !only_uid || request.sets_seen() {
        return Ok(false);
    }
    // Under CONDSTORE the upstream may owe the next command a response code (Dovecot answers
    // the first command after `ENABLE QRESYNC` with `OK [HIGHESTMODSEQ n]`) that only it
    // knows: the upstream answers.
    let modseq = io.modseq();
    if job.modseq.condstore || modseq.condstore || modseq.qresync {
        return Ok(false);
    }
    let Some(uids) = explicit_uids(&request.set) else { return Ok(false) };
    for &uid in &uids {
        for i in 0..wanted.len() {
            if !items.contains(uid, i).await {
                return Ok(false);
            }
        }
    }
    // Everything is cached; only the sequence numbers may be missing. The snapshot knows
    // them when the mailbox is as it was (same UIDNEXT and message count: no message came
    // or went); else one `UID SEARCH ALL` teaches all of them for the rest of the session
    // (until new mail arrives), and the snapshot for the next.
    if uids.iter().any(|&uid| io.seq_of(uid).is_none()) {
        know_all_uids(io, items.scope(), &job.selected).await?;
    }
    let mut known = Vec::with_capacity(uids.len());
    for &uid in &uids {
        let Some(seq) = io.seq_of(uid) else { return Ok(false) };
        known.push((seq, uid));
    }
    // Every value first (slices of the snapshot, nothing copied): an item evicted since the
    // check sends the full path instead, with nothing written yet.
    let mut values = Vec::with_capacity(known.len() * wanted.len());
    for &(_, uid) in &known {
        for i in 0..wanted.len() {
            let Some(bytes) = items.get(uid, i).await else { return Ok(false) };
            values.push(bytes);
        }
    }
    // Written piece by piece: small ones gather in the session's write buffer, a large body
    // goes to the socket from the cache's own bytes.
    let mut served = 0;
    let mut values = values.into_iter();
    let mut head = Vec::with_capacity(32);
    for (seq, uid) in known {
        head.clear();
        write!(head, "* {seq} FETCH (UID {uid}").expect("writing to a Vec");
        io.to_client(&head).await?;
        for bytes in values.by_ref().take(wanted.len()) {
            io.to_client(b" ").await?;
            io.to_client(&bytes).await?;
            served += bytes.len();
        }
        io.to_client(b")\r\n").await?;
    }
    io.count(wanted.len() * uids.len(), 0);
    io.answered(uids.len());
    items.scope().cache.served(served);
    io.to_client(format!("{client_tag} OK Fetch completed.\r\n").as_bytes()).await?;
    Ok(true)
}

/// Makes sure the session knows every message's UID: from the snapshot when the mailbox is
/// as SELECT reported it (same UIDNEXT and message count: no message came or went), else
/// with one `UID SEARCH ALL`, whose answer the snapshot keeps for the next session (when
/// nothing arrived while it ran).
pub(super) async fn know_all_uids<Io: JobIo>(io: &mut Io, scope: &Scope, selected: &Selected) -> Result<(), JobError> {
    if io.all_uids_known() {
        return Ok(());
    }
    let stamp = io.view_stamp();
    if let Some(stamp) = stamp {
        if snapshot::restore_uids(scope, selected, stamp, |uids| io.learn_all_uids(uids)).await {
            return Ok(());
        }
    }
    let learned = learn_all_uids(io).await?;
    if let (Some(stamp), Some(learned)) = (stamp, learned) {
        if io.view_stamp() == Some(stamp) {
            snapshot::keep_uids(scope, selected, stamp, &learned).await;
        }
    }
    Ok(())
}

/// `UID SEARCH ALL`, its answer taught to the UID map (and returned); other responses
/// relayed.
async fn learn_all_uids<Io: JobIo>(io: &mut Io) -> Result<Option<Vec<u32>>, JobError> {
    let tag = io.tag();
    io.to_upstream(format!("{tag} UID SEARCH ALL\r\n").into_bytes()).await?;
    let mut uids: Option<Vec<u32>> = None;
    loop {
        let response = io.response().await?;
        if is_tagged(&response, &tag) {
            if let (true, Some(uids)) = (status_text(&response, &tag).starts_with(b"OK"), uids) {
                io.learn_all_uids(&uids);
                return Ok(Some(uids));
            }
            return Ok(None);
        }
        let line = String::from_utf8_lossy(&response);
        match line.trim_end().strip_prefix("* SEARCH") {
            Some(list) if uids.is_none() => {
                uids = list.split_whitespace().map(|u| u.parse::<u32>().ok()).collect::<Option<Vec<u32>>>();
            }
            _ => io.forward(&response).await?,
        }
    }
}

/// Runs phase one and two and answers the client as `client_tag`.
pub async fn run<Io: JobIo>(
    io: &mut Io,
    job: &Job,
    fill: &Fill,
    client_tag: &str,
    scope: &Scope,
) -> Result<(), JobError> {
    let request = &job.request;
    let wanted: Vec<Wanted<'_>> =
        request.cached_items().map(|w| Wanted { request: w.request, response: w.response }).collect();
    let sizes = Items::resolve(scope, &job.selected, vec![(Name::new(VALIDATOR), Kind::Structure)]).await;
    check_uid_next(io, job, scope).await;
    let answered = answer(io, job, client_tag, fill, &sizes, &wanted).await;
    // The UIDs this job saw raise the mark too.
    check_uid_next(io, job, scope).await;
    sizes.reweigh(0).await;
    fill.items.reweigh(0).await;
    answered
}

/// The answer itself: from memory alone, the cold way, or in two phases.
async fn answer<Io: JobIo>(
    io: &mut Io,
    job: &Job,
    client_tag: &str,
    fill: &Fill,
    sizes: &Items,
    wanted: &[Wanted<'_>],
) -> Result<(), JobError> {
    let request = &job.request;
    let items = &fill.items;
    if answer_locally(io, job, client_tag, items, wanted).await? {
        return Ok(());
    }
    // Decided when the client sent it too (the relay forwards such a FETCH itself), but
    // the cache may have changed since.
    if relays_whole(job, items).await {
        return relay_and_fill(io, job, client_tag, fill).await;
    }
    if flags::answer(io, job, client_tag, fill, sizes, wanted).await? {
        return Ok(());
    }
    // The mutable items' names as the upstream answers them, in request order.
    let mutable_names: Vec<String> = request
        .items
        .iter()
        .filter(|i| i.kind == ItemKind::Mutable)
        .map(|i| super::fetch::normalize(&i.request))
        .collect();
    let mut renumber = Renumber::default();

    // Phase one.
    let tag = io.tag();
    let mutable: Vec<&str> =
        request.mutable_requests().into_iter().filter(|m| !m.eq_ignore_ascii_case("UID")).collect();
    let mut asked: Vec<&str> = vec!["UID"];
    asked.extend(&mutable);
    // What mailgate adds to the client's items, never shown to the client.
    let mut added = Vec::new();
    if request.sets_seen() {
        asked.push(SEEN_PROBE);
        added.push(SEEN_PROBE_RESPONSE);
    }
    asked.push(VALIDATOR);
    if !wanted.iter().any(|w| w.response == VALIDATOR) {
        added.push(VALIDATOR);
    }
    // A resync of flags teaches the snapshot every message's flags with its MODSEQ, so that
    // the next one asks only what changed (see [`flags`]).
    let stamp = io.view_stamp();
    let learn_flags = flags::answers(job)
        && !job.modseq.condstore
        && !job.modseq.qresync
        && io.modseq_usable()
        && io.recent_free()
        && stamp.is_some();
    let remembered = if learn_flags { Some(Flags::resolve(items.scope(), &job.selected).await) } else { None };
    let mut seen_flags: Vec<(u32, u64, Bytes)> = Vec::new();
    if learn_flags {
        asked.push("MODSEQ");
        added.push("MODSEQ");
        io.enable_modseq();
    }
    let uid = if request.uid { "UID " } else { "" };
    io.to_upstream(format!("{tag} {uid}FETCH {} ({})\r\n", request.set, asked.join(" ")).into_bytes()).await?;
    // A set whose `*` can only end a range (`n:*`) decides membership without knowing the
    // last message: answers can then go out while phase one is still arriving, and only the
    // misses are kept, which bounds what a warm resync holds to nothing.
    let streaming = !request.set.split(',').any(|r| r == "*" || r.starts_with("*:"));
    let id = |message: &Message| if request.uid { message.uid } else { message.parsed.seq };
    // Parsed once: membership per message is a binary search, however many ranges.
    let set = SequenceSet::parse(&request.set);
    let in_set = |message: &Message, highest: (u32, u32)| {
        let last = if request.uid { highest.1 } else { highest.0 };
        set.contains(id(message), last)
    };
    let mut held = Vec::new();
    // Streaming, the message with the highest number outside the set as far as known: `n:*`
    // still names the last message when every number is below `n` (RFC 9051 §9,
    // "seq-range"), so it may be an answer after all; known only at the end.
    let mut beyond: Option<Message> = None;
    let mut misses = Vec::new();
    let mut highest = (0u32, 0u32);
    let mut tally = Tally::default();
    // (seq, uid) pairs for the UID map, handed over once (one lock, not one per message).
    let mut learned = Vec::new();
    // Messages phase one already reported: a second response for one (a flag change the
    // upstream reports apart, MODSEQ under CONDSTORE) is relayed as it is, never composed.
    let mut reported = Reported::default();
    let status = loop {
        let response = io.response().await?;
        if is_tagged(&response, &tag) {
            io.learn_uids(&learned);
            break status_text(&response, &tag);
        }
        let Some((parsed, uid)) = parse_response(&response).and_then(|p| p.uid(&response).map(|uid| (p, uid))) else {
            // An EXPUNGE renumbers: what was learned so far goes in first, in order.
            io.learn_uids(&learned);
            learned.clear();
            relay_other(io, &mut renumber, &response).await?;
            continue;
        };
        learned.push((parsed.seq, uid));
        highest = (highest.0.max(parsed.seq), highest.1.max(uid));
        if learn_flags && !reported.contains(uid) {
            let modseq = parsed.item(&response, "MODSEQ").and_then(flags::modseq_value);
            if let (Some(modseq), Some(item)) = (modseq, parsed.item(&response, "FLAGS")) {
                seen_flags.push((uid, modseq, Bytes::copy_from_slice(item)));
            }
        }
        let message = Message { uid, response, parsed, items: vec![None; wanted.len()], mark: renumber.mark() };
        if !reported.insert(uid) {
            relay_phase_one(io, &mut renumber, &message, &added).await?;
        } else if !streaming {
            held.push(message);
        } else if in_set(&message, (u32::MAX, u32::MAX)) {
            if let Some(miss) =
                settle(io, job, items, sizes, &mutable_names, wanted, message, &mut tally, &renumber).await?
            {
                misses.push(miss);
            }
        } else {
            // Another session's flag change, or the last message standing for `*`: only
            // the highest of them can be that, the others are relayed at once.
            let other = match beyond.take() {
                Some(kept) if id(&kept) > id(&message) => {
                    beyond = Some(kept);
                    message
                }
                kept => {
                    beyond = Some(message);
                    let Some(kept) = kept else { continue };
                    kept
                }
            };
            relay_phase_one(io, &mut renumber, &other, &added).await?;
        }
    };
    held.extend(beyond);
    if let Some(remembered) = remembered {
        if snapshot::status_is_clean(&status) && io.view_stamp() == stamp {
            for (uid, modseq, item) in &seen_flags {
                remembered.learn(*uid, *modseq, item).await;
            }
            // Every message answered: the newest MODSEQ bounds every change the answer saw,
            // and the UIDs are the mailbox's (for the next session's message numbers).
            if let Some(stamp @ (_, exists)) = stamp.filter(|&(_, exists)| exists as usize == seen_flags.len()) {
                let mut uids: Vec<u32> = seen_flags.iter().map(|f| f.0).collect();
                uids.sort_unstable();
                if uids.len() == exists as usize {
                    snapshot::keep_uids(items.scope(), &job.selected, stamp, &uids).await;
                }
                if let Some(newest) = seen_flags.iter().map(|f| f.1).max() {
                    remembered.complete(newest, stamp, &uids).await;
                }
            }
            remembered.reweigh().await;
        }
    }
    if status.starts_with(b"BAD") {
        // Relayed as the upstream said it (an invalid set, say). A NO (some messages
        // expunged meanwhile, RFC 9051 §7.4.2) still answers the messages it reported.
        for message in held.iter().chain(&misses) {
            relay_phase_one(io, &mut renumber, message, &added).await?;
        }
        tally.close(io, items);
        return finish(io, client_tag, &status).await;
    }
    for message in held {
        if !in_set(&message, highest) {
            relay_phase_one(io, &mut renumber, &message, &added).await?;
        } else if let Some(miss) =
            settle(io, job, items, sizes, &mutable_names, wanted, message, &mut tally, &renumber).await?
        {
            misses.push(miss);
        }
    }
    tally.close(io, items);
    let mut final_status = status;

    // Phase two, in batches. A plain FETCH asks by sequence number (the numbers of phase
    // one still hold: no EXPUNGE may come during a FETCH, RFC 9051 §7.5.1, and the client
    // must not be sent one while its FETCH is answered), a UID FETCH by UID (whose answers
    // may bring EXPUNGEs: the fresh answers carry the numbers of the moment). The mutable
    // items are asked again: a flag change reported meanwhile must not be undone by phase
    // one's older values.
    let phase_two = PhaseTwo { job, items, wanted, mutable: &mutable, mutable_names: &mutable_names };
    // The fleet's tier first, a round trip per [`SHARED_BATCH`] messages: a message it
    // completes is answered as a cached one is, and only the rest go to the upstream.
    let shared = items.scope().cache.shared().is_some();
    for part in shared_parts(&misses, job, shared) {
        let part = &mut misses[part];
        if shared {
            fill_from_shared(items, sizes, wanted, part).await;
        }
        for chunk in part.chunks_mut(BATCH) {
            let mut done = vec![false; chunk.len()];
            if shared {
                for (m, message) in chunk.iter().enumerate() {
                    if let (true, Some(seq)) =
                        (message.items.iter().all(Option::is_some), renumber.current(message.parsed.seq, message.mark))
                    {
                        let composed = compose(job, &mutable_names, message, message, seq, wanted, &message.items);
                        answer_message(io, composed).await?;
                        done[m] = true;
                    }
                }
            }
            // Concurrent misses share one load: claim what nobody is loading; a message whose
            // every missing item another session is loading waits for that session instead.
            // Waiting happens only after this session's own loads are done, so two sessions
            // can never wait for each other.
            let mut guards: HashMap<(usize, usize), LoadGuard> = HashMap::new();
            let mut waits: Vec<(usize, usize, oneshot::Receiver<Option<Bytes>>)> = Vec::new();
            for (m, message) in chunk.iter().enumerate().filter(|(m, _)| !done[*m]) {
                for i in 0..wanted.len() {
                    if message.items[i].is_none() {
                        match items.scope().cache.claim(items.key(message.uid, i)) {
                            Claim::Load(guard) => drop(guards.insert((m, i), guard)),
                            Claim::Wait(value) => waits.push((m, i, value)),
                        }
                    }
                }
            }
            // Messages with nothing missing are here for a fresh sequence number only.
            let (fetch, wait): (Vec<usize>, Vec<usize>) = (0..chunk.len()).filter(|&m| !done[m]).partition(|&m| {
                guards.keys().any(|&(owner, _)| owner == m) || chunk[m].items.iter().all(Option::is_some)
            });
            let status = phase_two.fetch(io, &mut renumber, chunk, &fetch, &mut guards).await?;
            drop(guards);
            // One bound for the whole batch: a slow loader elsewhere costs at most that once.
            let deadline = tokio::time::Instant::now() + SHARED_LOAD_WAIT;
            for (m, i, value) in waits {
                if chunk[m].items[i].is_some() {
                    continue; // fetched above with the rest of its message
                }
                if let Ok(Ok(Some(bytes))) = tokio::time::timeout_at(deadline, value).await {
                    chunk[m].items[i] = Some(bytes);
                }
            }
            let mut again = Vec::new();
            for m in wait {
                let message = &chunk[m];
                match (message.items.iter().all(Option::is_some), renumber.current(message.parsed.seq, message.mark)) {
                    (true, Some(seq)) => {
                        let composed = compose(job, &mutable_names, message, message, seq, wanted, &message.items);
                        answer_message(io, composed).await?
                    }
                    // That load failed or took too long, or the number moved out of reach: fetch
                    // it here after all.
                    _ => again.push(m),
                }
            }
            let retry = phase_two.fetch(io, &mut renumber, chunk, &again, &mut HashMap::new()).await?;
            for status in [status, retry].into_iter().flatten() {
                // A failure, or a response code the upstream gave this completion (under QRESYNC
                // Dovecot reports the mailbox's `[HIGHESTMODSEQ]` on the first completion after a
                // change; that may be phase two's), is the client's to see.
                let failed = !status.starts_with(b"OK");
                if failed
                    || (status.starts_with(b"OK [")
                        && final_status.starts_with(b"OK")
                        && !final_status.starts_with(b"OK ["))
                {
                    final_status = status;
                }
            }
        }
    }
    finish(io, client_tag, &final_status).await
}

/// The UIDNEXT guard (see [`Items::check_uid_next`]) with what this session knows.
async fn check_uid_next<Io: JobIo>(io: &Io, job: &Job, scope: &Scope) {
    snapshot::check_uid_next(scope, &job.selected, io.highest_uid()).await;
}

/// Relays a response that is not an answer of the job, noting what it renumbers.
pub(super) async fn relay_other<Io: JobIo>(
    io: &mut Io,
    renumber: &mut Renumber,
    response: &[u8],
) -> Result<(), JobError> {
    if let Some(rest) = response.strip_prefix(b"* ") {
        renumber.relayed(&rest[..rest.len().min(super::framing::HEAD_LEN)]);
    }
    io.forward(response).await
}

/// Relays a phase-one response as the upstream sent it, but for the items mailgate `added`
/// (the `\Seen` probe, the size it checks), which the client did not ask for.
async fn relay_phase_one<Io: JobIo>(
    io: &mut Io,
    renumber: &mut Renumber,
    message: &Message,
    added: &[&str],
) -> Result<(), JobError> {
    let response = &message.response;
    let mut ranges: Vec<std::ops::Range<usize>> = message
        .parsed
        .items
        .iter()
        .filter(|i| added.contains(&i.name.as_ref()))
        .map(|item| {
            // The item and the space that separates it from its neighbour.
            let mut range = item.range.clone();
            if response.get(range.end) == Some(&b' ') {
                range.end += 1;
            } else if range.start > 0 && response[range.start - 1] == b' ' {
                range.start -= 1;
            }
            range
        })
        .collect();
    if ranges.is_empty() {
        return relay_other(io, renumber, response).await;
    }
    ranges.sort_by_key(|r| r.start);
    let mut stripped = Vec::with_capacity(response.len());
    let mut at = 0;
    for range in ranges {
        stripped.extend_from_slice(&response[at..range.start.max(at)]);
        at = at.max(range.end);
    }
    stripped.extend_from_slice(&response[at..]);
    relay_other(io, renumber, &stripped).await
}

/// Whether a FETCH is best relayed as it is while its answer fills the cache: possible
/// when the client's answer carries UIDs (UID FETCH, or UID among the items), worth it when
/// nothing of it is likely cached (the mailbox was never filled from, or none of its named
/// UIDs has any of the items), and right when a body section of a named UID is missing.
pub async fn looks_cold(job: &Job, items: &Items) -> bool {
    let request = &job.request;
    let carries_uid = request.uid || request.mutable_requests().iter().any(|m| m.eq_ignore_ascii_case("UID"));
    if !carries_uid {
        return false;
    }
    let scope = items.scope();
    if !scope.cache.has_mark(&snapshot::mark(scope, &job.selected, snapshot::FILLED_MARK)).await {
        return true;
    }
    match (request.uid, explicit_uids(&request.set)) {
        // A body section still to come from the upstream (a client opening a message it has
        // the size or structure of) is relayed as it is too: merged with cached items it
        // would be held whole, however large, where the relay streams it.
        (true, Some(uids)) => {
            prefetch_shared(job, items, &uids).await;
            let (mut missing_body, mut any_cached) = (false, false);
            for &uid in &uids {
                for (i, w) in request.cached_items().enumerate() {
                    let cached = items.contains(uid, i).await;
                    missing_body |= w.class == Kind::Body && !cached;
                    any_cached |= cached;
                }
            }
            missing_body || !any_cached
        }
        _ => false,
    }
}

/// Brings what the second tier has of `uids`' cacheable items (and their sizes, which
/// check them against the upstream's as the memory tier's are checked) into memory, in one
/// round trip, before deciding whether the FETCH is cold: a body a client opens may be in
/// Redis though not in this instance's memory.
async fn prefetch_shared(job: &Job, items: &Items, uids: &[u32]) {
    let scope = items.scope();
    if scope.cache.shared().is_none() {
        return;
    }
    let validator = Name::new(VALIDATOR);
    let mut keys = Vec::new();
    for &uid in uids {
        let mut missing = false;
        for i in 0..job.request.cached_items().count() {
            if !items.contains(uid, i).await {
                keys.push(items.key(uid, i));
                missing = true;
            }
        }
        if missing {
            keys.push(snapshot::key(scope, &job.selected, uid, &validator, Kind::Structure));
        }
    }
    if !keys.is_empty() {
        if let Err(contradiction) = scope.cache.shared_values(&keys).await {
            size_changed(items, contradiction.uid);
        }
        items.refresh().await;
    }
}

/// Whether a FETCH is answered by relaying it whole (its items stored on the way): the
/// cache knows nothing it asks for, or splitting it would change what the upstream reports.
/// Under CONDSTORE a FETCH that sets `\Seen` reports the change with the MODSEQ the message
/// had before it, and the upstream tells its new MODSEQ at the next command: split in two
/// phases, that next command would be mailgate's phase two, inside the client's answer.
pub async fn relays_whole(job: &Job, items: &Items) -> bool {
    let request = &job.request;
    let reports_modseq =
        job.modseq.condstore || request.mutable_requests().iter().any(|m| m.eq_ignore_ascii_case("MODSEQ"));
    (reports_modseq && request.sets_seen()) || looks_cold(job, items).await
}

/// The client's own FETCH, relayed unchanged (under mailgate's tag), its answers streamed
/// to the client byte for byte while their cacheable items are stored: one upstream round
/// trip, exactly the upstream's answer, and no body held whole on its way.
async fn relay_and_fill<Io: JobIo>(io: &mut Io, job: &Job, client_tag: &str, fill: &Fill) -> Result<(), JobError> {
    let status = relay_filling(io, job, &job.request.set, fill).await?;
    finish(io, client_tag, &status).await
}

/// The client's FETCH for the messages `set` names, relayed to the client as the upstream
/// answers it while its cacheable items are stored; the completion's status.
pub(super) async fn relay_filling<Io: JobIo>(
    io: &mut Io,
    job: &Job,
    set: &str,
    fill: &Fill,
) -> Result<Vec<u8>, JobError> {
    let request = &job.request;
    let tag = io.tag();
    let items: Vec<&str> = request.items.iter().map(|i| i.request.as_str()).collect();
    let uid = if request.uid { "UID " } else { "" };
    io.to_upstream(format!("{tag} {uid}FETCH {set} ({})\r\n", items.join(" ")).into_bytes()).await?;
    let mut stored = Stored::default();
    let keep = copy_limit(fill.items.scope());
    let status = loop {
        let response = match io.relay_response(&tag, keep).await? {
            Relayed::Tagged(line) => break status_text(&line, &tag),
            Relayed::Sent(None) => continue,
            Relayed::Sent(Some(response)) => response,
        };
        if let Some((seq, uid)) = fill.learn(&Bytes::from(response), &mut stored).await {
            io.learn_uid(seq, uid);
        }
    };
    io.count(0, stored.len());
    stored.settle(&fill.items, snapshot::status_is_clean(&status)).await;
    Ok(status)
}

/// The largest response worth a side copy: one larger than any item the cache would keep
/// is streamed without one.
pub fn copy_limit(scope: &Scope) -> usize {
    scope.cache.max_entry_bytes().saturating_mul(2).saturating_add(4096)
}

/// A FETCH relayed as the client wrote it, whose answers fill the snapshot on their way to
/// the client: its cacheable items, their response names, resolved once per command.
pub struct Fill {
    pub items: Items,
    names: Vec<String>,
    kinds: Vec<Kind>,
}

impl Fill {
    pub async fn new(job: &Job, scope: &Scope) -> Fill {
        let wanted: Vec<_> = job.request.cached_items().collect();
        let names = wanted.iter().map(|w| w.response.to_string()).collect();
        let kinds = wanted.iter().map(|w| w.class).collect();
        let slots = wanted.iter().map(|w| (Name::new(w.key), w.class)).collect();
        let items = Items::resolve(scope, &job.selected, slots).await;
        Fill { items, names, kinds }
    }

    /// Stores what `response` (a complete upstream response) carries of the items; its
    /// sequence number and UID when it is a FETCH response with a UID.
    pub async fn learn(&self, response: &Bytes, stored: &mut Stored) -> Option<(u32, u32)> {
        self.learn_with(response, stored, |_, _| {}).await
    }

    /// [`learn`](Fill::learn), and `also` sees the parsed response with its UID (one parse
    /// for both).
    pub async fn learn_with(
        &self,
        response: &Bytes,
        stored: &mut Stored,
        also: impl FnOnce(&FetchResponse, u32),
    ) -> Option<(u32, u32)> {
        let parsed = parse_response(response)?;
        let uid = parsed.uid(response)?;
        also(&parsed, uid);
        for (i, name) in self.names.iter().enumerate() {
            if let Some(range) = parsed.range(name) {
                self.items.scope().cache.missed(self.kinds[i]);
                self.items.store(stored, uid, i, &response.slice(range), None).await;
            }
        }
        // A long fill (a first sync of 100,000 headers) is weighed as it grows.
        self.items.reweigh(crate::cache::REWEIGH_SLACK).await;
        Some((parsed.seq, uid))
    }
}

/// What a phase-two fetch needs of the job.
struct PhaseTwo<'a> {
    job: &'a Job,
    items: &'a Items,
    wanted: &'a [Wanted<'a>],
    mutable: &'a [&'a str],
    mutable_names: &'a [String],
}

impl PhaseTwo<'_> {
    /// Fetches the missing items of `chunk[m]` for each `m` in `which`, answers
    /// each of those messages, and stores what it got (through the guard when this session
    /// loads it for others). `None` when there was nothing to fetch.
    async fn fetch<Io: JobIo>(
        &self,
        io: &mut Io,
        renumber: &mut Renumber,
        chunk: &mut [Message],
        which: &[usize],
        guards: &mut HashMap<(usize, usize), LoadGuard>,
    ) -> Result<Option<Vec<u8>>, JobError> {
        if which.is_empty() {
            return Ok(None);
        }
        let (job, items, wanted) = (self.job, self.items, self.wanted);
        let needed: Vec<usize> =
            (0..wanted.len()).filter(|&i| which.iter().any(|&m| chunk[m].items[i].is_none())).collect();
        let request = &job.request;
        let ids: Vec<String> =
            which.iter().map(|&m| if request.uid { chunk[m].uid } else { chunk[m].parsed.seq }.to_string()).collect();
        let mut asked: Vec<&str> = vec!["UID"];
        asked.extend(self.mutable);
        // FLAGS the upstream volunteered in phase one (it set \Seen) are asked again, so
        // that the answer carries their current value.
        let volunteered = which.iter().any(|&m| chunk[m].parsed.item(&chunk[m].response, "FLAGS").is_some());
        if volunteered && !self.mutable.iter().any(|m| m.eq_ignore_ascii_case("FLAGS")) {
            asked.push("FLAGS");
        }
        asked.extend(needed.iter().map(|&i| wanted[i].request));
        let tag = io.tag();
        let uid = if request.uid { "UID " } else { "" };
        io.to_upstream(format!("{tag} {uid}FETCH {} ({})\r\n", ids.join(","), asked.join(" ")).into_bytes()).await?;
        let mut stored = Stored::default();
        let mut answered = HashSet::new();
        loop {
            let response = io.response().await?;
            if is_tagged(&response, &tag) {
                let status = status_text(&response, &tag);
                stored.settle(items, snapshot::status_is_clean(&status)).await;
                let unanswered = which.len() - answered.len();
                if unanswered > 0 {
                    // Expunged meanwhile (a UID FETCH answers nothing for them), or an upstream
                    // that answered in a form mailgate did not recognize (relayed as it came).
                    tracing::debug!(unanswered, "messages of a phase-two FETCH got no answer of their own");
                }
                return Ok(Some(status));
            }
            let parsed = parse_response(&response);
            let position = parsed
                .as_ref()
                .and_then(|p| p.uid(&response))
                .and_then(|uid| which.iter().copied().find(|&m| chunk[m].uid == uid));
            let (Some(parsed), Some(m)) = (parsed, position) else {
                relay_other(io, renumber, &response).await?;
                continue;
            };
            if !answered.insert(m) {
                // A second response for one message: relayed as it came.
                relay_other(io, renumber, &response).await?;
                continue;
            }
            let message = &mut chunk[m];
            for &i in &needed {
                if let Some(raw) = parsed.item(&response, wanted[i].response) {
                    let raw = Bytes::copy_from_slice(raw);
                    if message.items[i].is_none() {
                        items.store(&mut stored, message.uid, i, &raw, guards.remove(&(m, i))).await;
                    }
                    message.items[i] = Some(raw);
                }
            }
            // The fresh answer: its sequence number and mutable items are the current ones.
            let fresh = Message { uid: message.uid, response, parsed, items: Vec::new(), mark: renumber.mark() };
            let composed = compose(job, self.mutable_names, message, &fresh, fresh.parsed.seq, wanted, &message.items);
            answer_message(io, composed).await?;
        }
    }
}

#[derive(Default)]
struct Tally {
    hits: usize,
    misses: usize,
    /// Sizes learned for the next job, for the fleet's tier too (sent together at the end
    /// of phase one).
    sizes: Vec<Key>,
}

impl Tally {
    /// Counts the lookups in the session and sends the sizes learned to the fleet's tier
    /// (gathered in a task of its own, off the client's answer).
    fn close<Io: JobIo>(&mut self, io: &mut Io, items: &Items) {
        io.count(self.hits, self.misses);
        let cache = items.scope().cache.clone();
        let sizes = std::mem::take(&mut self.sizes);
        if cache.shared().is_some() && !sizes.is_empty() {
            tokio::spawn(async move { cache.share_stored(sizes, Vec::new()).await });
        }
    }
}

/// Answers `message` from the cache when every item is there and its number is still
/// known; otherwise hands it back, its cached items filled in, for phase two.
#[allow(clippy::too_many_arguments)]
async fn settle<Io: JobIo>(
    io: &mut Io,
    job: &Job,
    items: &Items,
    sizes: &Items,
    mutable_names: &[String],
    wanted: &[Wanted<'_>],
    mut message: Message,
    tally: &mut Tally,
    renumber: &Renumber,
) -> Result<Option<Message>, JobError> {
    for i in 0..wanted.len() {
        message.items[i] = items.get(message.uid, i).await;
        if message.items[i].is_some() {
            tally.hits += 1;
        } else {
            tally.misses += 1;
        }
    }
    if let Some(size) = message.parsed.item(&message.response, VALIDATOR) {
        let cached = match wanted.iter().position(|w| w.response == VALIDATOR) {
            Some(i) => message.items[i].clone(),
            None => sizes.peek(message.uid, 0).await,
        };
        if cached.is_none() && snapshot::is_content(size) {
            // Kept, so that the next job (and the fleet's next, through the second tier)
            // can check this message too.
            let size = Bytes::copy_from_slice(size);
            if sizes.scope().cache.shared().is_some() {
                tally.sizes.push(sizes.key(message.uid, 0));
            }
            sizes.insert(message.uid, 0, &size).await;
        }
        if cached.is_some_and(|cached| cached != size) {
            size_changed(items, message.uid);
            message.items.iter_mut().for_each(|item| *item = None);
        }
    }
    let seq = renumber.current(message.parsed.seq, message.mark);
    let (true, Some(seq)) = (message.items.iter().all(Option::is_some), seq) else {
        return Ok(Some(message));
    };
    items.scope().cache.served(message.items.iter().flatten().map(Bytes::len).sum());
    let composed = compose(job, mutable_names, &message, &message, seq, wanted, &message.items);
    answer_message(io, composed).await?;
    Ok(None)
}

/// The most messages whose missing items one lookup in the second tier asks for (one
/// `MGET`; a header sync's items are a few hundred bytes each) ...
const SHARED_BATCH: usize = 2048;
/// ... and the most bytes of bodies it may bring at once (by the sizes phase one read):
/// what is found is held until answered.
const SHARED_BATCH_BYTES: u64 = 16 << 20;

/// `misses` cut into the parts looked up in the second tier at once (all of them in one
/// part without a second tier: phase two's own batches follow).
fn shared_parts(misses: &[Message], job: &Job, shared: bool) -> Vec<std::ops::Range<usize>> {
    if !shared {
        return std::iter::once(0..misses.len()).collect();
    }
    let bodies = job.request.cached_items().any(|w| w.class == Kind::Body);
    batches(misses.iter().map(|message| match (bodies, message.parsed.item(&message.response, VALIDATOR)) {
        (true, Some(item)) => size_value(item).unwrap_or(0),
        _ => 1024,
    }))
}

/// Messages of `sizes` (bytes each) cut into the batches one lookup in the second tier
/// brings: at most [`SHARED_BATCH`] messages and [`SHARED_BATCH_BYTES`] (or one message).
pub(super) fn batches(sizes: impl Iterator<Item = u64>) -> Vec<std::ops::Range<usize>> {
    let mut parts = Vec::new();
    let (mut start, mut bytes, mut end) = (0, 0u64, 0);
    for (m, size) in sizes.enumerate() {
        if m > start && (m - start >= SHARED_BATCH || bytes.saturating_add(size) > SHARED_BATCH_BYTES) {
            parts.push(start..m);
            (start, bytes) = (m, 0);
        }
        bytes = bytes.saturating_add(size);
        end = m + 1;
    }
    if start < end {
        parts.push(start..end);
    }
    parts
}

/// The number of an `RFC822.SIZE n` item.
pub(super) fn size_value(item: &[u8]) -> Option<u64> {
    std::str::from_utf8(item.get(VALIDATOR.len()..)?).ok()?.trim().parse().ok()
}

/// The sizes known of `uids` (`RFC822.SIZE n` items): in memory, else in the second tier
/// (then kept in memory too).
pub(super) async fn known_sizes(sizes: &Items, uids: &[u32]) -> HashMap<u32, Bytes> {
    let mut values = Vec::with_capacity(uids.len());
    for &uid in uids {
        values.push(sizes.peek(uid, 0).await);
    }
    fill_from_shared_tier(sizes, uids, &mut values).await;
    uids.iter().zip(values).filter_map(|(&uid, size)| Some((uid, size?))).collect()
}

/// Fills the `None`s of `values` (the items of `items`, per message of `uids` in order)
/// from the second tier in one round trip, keeping what it finds in memory too.
pub(super) async fn fill_from_shared_tier(items: &Items, uids: &[u32], values: &mut [Option<Bytes>]) {
    let cache = &items.scope().cache;
    if cache.shared().is_none() || uids.is_empty() {
        return;
    }
    let per = values.len() / uids.len();
    // The ranges of column items first: a key per range that lacks something.
    let mut representatives = Vec::new();
    for i in (0..per).filter(|&i| items.is_column(i)) {
        let mut last = None;
        for (m, &uid) in uids.iter().enumerate() {
            let start = crate::cache::ranges::start(uid);
            if values[m * per + i].is_none() && last != Some(start) {
                if let Key::Imap(imap) = items.key(uid, i) {
                    representatives.push(imap);
                }
                last = Some(start);
            }
        }
    }
    if !representatives.is_empty() {
        if let Err(contradiction) = cache.fill_ranges(&representatives).await {
            size_changed(items, contradiction.uid);
            return;
        }
        items.refresh().await;
        for (v, value) in values.iter_mut().enumerate().filter(|(_, value)| value.is_none()) {
            if items.is_column(v % per) {
                *value = items.peek(uids[v / per], v % per).await;
            }
        }
    }
    // Then what no range held, one by one.
    let missing: Vec<usize> = (0..values.len()).filter(|&v| values[v].is_none()).collect();
    if !missing.is_empty() {
        let keys: Vec<Key> = missing.iter().map(|&v| items.key(uids[v / per], v % per)).collect();
        match cache.shared_items(&keys).await {
            Ok(found) => {
                for (&v, value) in missing.iter().zip(found) {
                    values[v] = value;
                }
            }
            Err(contradiction) => {
                size_changed(items, contradiction.uid);
                return;
            }
        }
        items.refresh().await;
    }
}

/// Fills the missing items of `chunk` from the second tier (kept in memory too), in one
/// round trip. The size the upstream just reported checks the size Redis holds (not
/// memory's: the size range that came with stale headers must be seen), as it checks the
/// memory tier (see [`settle`]), and memory checks everything that comes (see
/// [`crate::cache::Contradiction`]): a different size is a rebuilt mailbox, forgotten here
/// and fleet-wide, and nothing from Redis is used for it.
async fn fill_from_shared(items: &Items, sizes: &Items, wanted: &[Wanted<'_>], chunk: &mut [Message]) {
    if items.scope().cache.shared().is_none() {
        return;
    }
    let validator = wanted.iter().position(|w| w.response == VALIDATOR);
    // (message, item or None for the size, key)
    let mut asked: Vec<(usize, Option<usize>)> = Vec::new();
    let mut keys = Vec::new();
    for (m, message) in chunk.iter().enumerate() {
        for i in (0..wanted.len()).filter(|&i| message.items[i].is_none()) {
            asked.push((m, Some(i)));
            keys.push(items.key(message.uid, i));
        }
        if validator.is_none() {
            asked.push((m, None));
            keys.push(sizes.key(message.uid, 0));
        }
    }
    let found = match items.scope().cache.shared_values(&keys).await {
        Ok(found) => found,
        Err(contradiction) => {
            size_changed(items, contradiction.uid);
            return;
        }
    };
    items.refresh().await;
    sizes.refresh().await;
    let mut per_message: Vec<Vec<(Option<usize>, Bytes)>> = vec![Vec::new(); chunk.len()];
    for ((m, i), value) in asked.into_iter().zip(found) {
        if let Some(value) = value {
            per_message[m].push((i, value));
        }
    }
    // Every size first: one that differs makes the whole batch's values suspect, and none
    // of them may be used (nor kept in memory).
    for (message, found) in chunk.iter().zip(&per_message) {
        let shared_size = found.iter().find(|(i, _)| *i == validator).map(|(_, v)| v);
        let fresh = message.parsed.item(&message.response, VALIDATOR);
        if let (Some(fresh), Some(shared)) = (fresh, shared_size) {
            if shared.as_ref() != fresh {
                size_changed(items, message.uid);
                return;
            }
        }
    }
    let mut served = 0;
    for (message, found) in chunk.iter_mut().zip(per_message) {
        for (i, value) in found {
            if let Some(i) = i {
                served += value.len();
                message.items[i] = Some(value);
            }
        }
    }
    items.scope().cache.served(served);
}

/// A cached size (in memory or in the shared tier) differs from the one the upstream just
/// reported: the mailbox was rebuilt under its UIDVALIDITY, and is forgotten (fleet-wide).
pub(super) fn size_changed(items: &Items, uid: u32) {
    crate::log_budget::warn_limited!(
        uid,
        mailbox = items.selected().mailbox.as_str(),
        uid_validity = items.selected().uid_validity,
        "a message's size changed without a new UIDVALIDITY; forgetting what is cached of the mailbox"
    );
    items.forget_mailbox();
}

/// Sends one message's composed answer.
async fn answer_message<Io: JobIo>(io: &mut Io, composed: Vec<u8>) -> Result<(), JobError> {
    io.answered(1);
    io.to_client(&composed).await
}

/// The client's tagged completion of its FETCH.
pub(super) async fn finish<Io: JobIo>(io: &mut Io, client_tag: &str, status: &[u8]) -> Result<(), JobError> {
    io.to_client(&[client_tag.as_bytes(), b" ", status, b"\r\n"].concat()).await
}

/// `* seq FETCH (...)` for one message: the client's items in its order; the UID and
/// mutable items from `fresh`, the upstream's latest answer for it; cached items from
/// `items` (else from `fresh`); and what the upstream volunteered in phase one (FLAGS after
/// setting `\Seen`, MODSEQ under CONDSTORE), in its latest value when `fresh` has it too.
/// UID comes first for a UID FETCH and, under QRESYNC, for every FETCH (RFC 7162 §3.2.4).
///
/// An item found nowhere is a bug (of mailgate, or an upstream answering what it was not
/// asked): the answer goes out without it, and says so in the log.
fn compose(
    job: &Job,
    mutable_names: &[String],
    phase_one: &Message,
    fresh: &Message,
    seq: u32,
    wanted: &[Wanted<'_>],
    items: &[Option<Bytes>],
) -> Vec<u8> {
    let request = &job.request;
    let mutable = |name: &str| mutable_names.iter().any(|m| m == name);
    let from_fresh = |name: &str| fresh.parsed.item(&fresh.response, name);
    let mut parts: Vec<&[u8]> = Vec::new();
    let mut missing: Vec<&str> = Vec::new();
    // Under QRESYNC a server reports a change it made (the \Seen of this FETCH) with the
    // message's UID and MODSEQ (RFC 7162 §3.2.4); phase one caused the same change.
    let volunteered_modseq = !mutable("MODSEQ") && phase_one.parsed.item(&phase_one.response, "MODSEQ").is_some();
    if (request.uid || (job.modseq.qresync && volunteered_modseq)) && !mutable("UID") {
        parts.push(from_fresh("UID").unwrap_or(b""));
    }
    let (mut next, mut next_mutable) = (0, 0);
    for item in &request.items {
        let (name, found) = match &item.kind {
            ItemKind::Mutable => {
                let name = mutable_names[next_mutable].as_str();
                next_mutable += 1;
                (name, from_fresh(name))
            }
            ItemKind::Cached { .. } => {
                debug_assert_eq!(wanted[next].request, item.request);
                let name = wanted[next].response;
                let found = items[next].as_deref().or_else(|| from_fresh(name));
                next += 1;
                (name, found)
            }
        };
        match found {
            Some(bytes) => parts.push(bytes),
            None => missing.push(name),
        }
    }
    for extra in &phase_one.parsed.items {
        let name = extra.name.as_ref();
        // MODSEQ the client did not ask for is mailgate's (see `flags`), unless the client
        // has CONDSTORE on and the upstream volunteered it.
        let added = name == "UID"
            || name == SEEN_PROBE_RESPONSE
            || name == VALIDATOR
            || (name == "MODSEQ" && !job.modseq.condstore);
        if !added && !mutable(name) && !wanted.iter().any(|w| w.response == name) {
            parts.push(from_fresh(name).unwrap_or(&phase_one.response[extra.range.clone()]));
        }
    }
    if !missing.is_empty() {
        crate::log_budget::warn_limited!(
            ?missing,
            uid = fresh.uid,
            "FETCH items missing from the upstream's answer; answered without them"
        );
    }
    let mut out = Vec::with_capacity(32 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    write!(out, "* {seq} FETCH (").expect("writing to a Vec");
    for (i, part) in parts.iter().filter(|p| !p.is_empty()).enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b")\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selected_mailbox_names() {
        assert_eq!(selected_mailbox(b"a SELECT inbox"), Some(Some("INBOX".into())));
        assert_eq!(selected_mailbox(b"a EXAMINE \"Sent Items\""), Some(Some("Sent Items".into())));
        assert_eq!(selected_mailbox(b"a select \"a\\\"b\" (CONDSTORE)"), Some(Some("a\"b".into())));
        assert_eq!(selected_mailbox(b"a SELECT {5}"), Some(None));
        assert_eq!(selected_mailbox(b"a FETCH 1 BODY[]"), None);
        // Unreadable names still count as a new selection (nothing cached for it).
        assert_eq!(selected_mailbox(b"a SELECT \"broken\\"), Some(None));
        assert_eq!(selected_mailbox(b"a SELECT caf\xe9"), Some(None));
        assert_eq!(selected_mailbox(b"a SELECT"), Some(None));
    }
}
