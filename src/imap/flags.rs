//! The flags of a mailbox's messages as the upstream last reported them, each with its
//! modification sequence, and the resync they allow (RFC 7162, CONDSTORE).
//!
//! A header resync (`UID FETCH 1:* (UID FLAGS <immutable items>)`) needs every message's
//! current flags, the only part of it that can change. Asked upstream, they cost what the
//! rest costs Dovecot to answer. Under CONDSTORE every change of a message's flags gives it
//! a new MODSEQ, higher than any before in the mailbox, so the flags remembered with the
//! mailbox's modification sequence `n` at which they were complete only need
//! `UID FETCH set (UID FLAGS) (CHANGEDSINCE n)`: the messages changed since, new ones
//! included (nothing at all for an unchanged mailbox). What the upstream adds to the
//! session once CONDSTORE is on is kept from the client ([`super::modseq`]).
//!
//! What is remembered, and when:
//! - one column entry per message: its MODSEQ and the upstream's `FLAGS (...)` item, learned
//!   from answers that carry both (a full resync's phase one asks MODSEQ for it; a resync's
//!   CHANGEDSINCE answers carry it). Of two writers the older MODSEQ never replaces the newer;
//! - the mark `n`: raised only by an answer that covered every message of the mailbox.
//!   A server answers a command from one view of the mailbox, so the highest MODSEQ in such
//!   an answer bounds every change it reflects;
//! - only from sessions with no `\Recent` message (`* 0 RECENT`, nothing arrived since
//!   SELECT): `\Recent` is the one flag that differs between sessions. A message is recent
//!   to the first session that sees it only, so once such a session saw every message, a
//!   message recent to a later one arrived after the mark and comes with the changes;
//! - only after a clean completion, with the session's view of the mailbox unchanged
//!   (no EXISTS, EXPUNGE or VANISHED while it ran).

use std::hash::BuildHasher as _;
use std::io::Write as _;

use bytes::Bytes;

use super::fetch::{parse_response, FetchResponse, ItemKind, SequenceSet};
use super::intercept::{self, Fill, Job, JobError, JobIo, Selected, Wanted};
use super::renumber::Renumber;
use super::snapshot::{self, Items};
use crate::cache::{Kind, Name, Scope};

/// The column of flags (a name no FETCH item has).
const FLAGS_ITEM: &str = "\0flags";
/// The modification sequence up to which the column is complete.
const MODSEQ_MARK: &str = "\0modseq";
/// The whole column with its mark, as the fleet's tier holds it (one value per mailbox).
const SHARED_MARK: &str = "\0flags-column";
/// When this instance last shared the column (seconds since the epoch; memory only).
const SHARED_AT_MARK: &str = "\0flags-shared-at";
/// The least time between two shares of one mailbox's column by one instance.
const SHARE_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

/// Without the flags of more than this many of a resync's messages (plus a tenth of them),
/// the full way is cheaper than asking for the rest.
const LACKING_SLACK: usize = 100;

/// A mailbox's remembered flags, as one command holds them.
pub struct Flags {
    items: Items,
}

impl Flags {
    pub async fn resolve(scope: &Scope, selected: &Selected) -> Flags {
        Flags { items: Items::resolve(scope, selected, vec![(Name::new(FLAGS_ITEM), Kind::Structure)]).await }
    }

    /// Up to which modification sequence every remembered message's flags are complete.
    pub async fn since(&self) -> Option<u64> {
        let scope = self.items.scope();
        let value = scope.cache.peek(&snapshot::mark(scope, self.items.selected(), MODSEQ_MARK)).await?;
        Some(u64::from_be_bytes(value.as_ref().try_into().ok()?))
    }

    /// Raises the mark (never lowers it: a session that saw less may finish last); whether
    /// it did.
    pub async fn advance(&self, modseq: u64) -> bool {
        if self.since().await.is_some_and(|since| since >= modseq) {
            return false;
        }
        let scope = self.items.scope();
        let mark = snapshot::mark(scope, self.items.selected(), MODSEQ_MARK);
        scope.cache.insert(mark, Bytes::copy_from_slice(&modseq.to_be_bytes())).await;
        true
    }

    /// Raises the mark to `modseq` after an answer that covered every message of the
    /// mailbox (`uids`, as `stamp` found it), and shares the column with the fleet when it
    /// rose: another instance's first resync then asks only what changed since, as this
    /// one's next does.
    pub async fn complete(&self, modseq: u64, stamp: (u32, u32), uids: &[u32]) {
        if !self.advance(modseq).await {
            return;
        }
        let scope = self.items.scope();
        if scope.cache.shared().is_none() {
            return;
        }
        // At most every SHARE_EVERY per mailbox and instance: a busy mailbox's mark rises
        // with every resync after new mail, and the value is the whole column. Another
        // instance starting from an older mark only gets more changes from its CHANGEDSINCE.
        let now = crate::units::unix_now();
        let shared_at = snapshot::mark(scope, self.items.selected(), SHARED_AT_MARK);
        let last =
            scope.cache.peek(&shared_at).await.and_then(|v| Some(u64::from_be_bytes(v.as_ref().try_into().ok()?)));
        if last.is_some_and(|last| now.saturating_sub(last) < SHARE_EVERY.as_secs()) {
            return;
        }
        // The mark first, the entries after: another session of this instance may learn a
        // change and raise the mark meanwhile. An entry newer than the mark it is shared
        // under is harmless (the reader's CHANGEDSINCE reports it again); an entry older
        // than its mark would be served as current by every other instance.
        let Some(since) = self.since().await else { return };
        let mut entries = Vec::with_capacity(uids.len());
        for &uid in uids {
            match self.items.peek(uid, 0).await {
                Some(value) if value.len() > 8 => entries.push((uid, value)),
                // Evicted meanwhile: nothing complete to share (the next resync may).
                _ => return,
            }
        }
        scope.cache.insert(shared_at, Bytes::copy_from_slice(&now.to_be_bytes())).await;
        let value = encode_column(since, stamp, &entries);
        scope.cache.share(&snapshot::mark(scope, self.items.selected(), SHARED_MARK), Bytes::from(value));
    }

    /// The column another instance shared (see [`complete`](Flags::complete)), taken into
    /// this one's memory when this one remembers nothing of the mailbox; its mark. The
    /// mailbox's UIDs come with it when the mailbox is still as `stamp` says. A value whose
    /// mark is above `highest` (the HIGHESTMODSEQ this session's SELECT announced) is not
    /// taken: it was shared after this SELECT, or by another history of the mailbox (see
    /// `answer`), and learning it only to forget it would cost every resync the decode.
    pub async fn load_shared(&self, stamp: (u32, u32), highest: Option<u64>) -> Option<u64> {
        let scope = self.items.scope();
        let tier = scope.cache.shared()?;
        let key = snapshot::mark(scope, self.items.selected(), SHARED_MARK);
        let value = tier.get_many(std::slice::from_ref(&key)).await.pop().flatten()?;
        let Some(column) = decode_column(&value) else {
            tracing::debug!("a shared flags column that does not decode; ignored");
            return None;
        };
        if highest.is_some_and(|highest| highest < column.mark) {
            tracing::debug!(mark = column.mark, "the fleet's flags are newer than this session's SELECT; not taken");
            return None;
        }
        for entry in &column.entries {
            let modseq = u64::from_be_bytes(entry.value[..8].try_into().expect("8 bytes"));
            self.learn(entry.uid, modseq, &entry.value[8..]).await;
        }
        self.advance(column.mark).await;
        if column.stamp == stamp {
            let uids: Vec<u32> = column.entries.iter().map(|e| e.uid).collect();
            snapshot::keep_uids(scope, self.items.selected(), stamp, &uids).await;
        }
        self.reweigh().await;
        self.since().await
    }

    /// Forgets every remembered flag and the mark.
    pub async fn reset(&self) {
        let scope = self.items.scope();
        scope.cache.invalidate(&snapshot::mark(scope, self.items.selected(), MODSEQ_MARK)).await;
        self.items.clear(0);
        self.reweigh().await;
    }

    /// The `FLAGS (...)` item remembered of `uid`.
    pub async fn get(&self, uid: u32) -> Option<Bytes> {
        let value = self.items.peek(uid, 0).await?;
        (value.len() > 8).then(|| value.slice(8..))
    }

    pub async fn contains(&self, uid: u32) -> bool {
        self.items.contains(uid, 0).await
    }

    /// Remembers `item` (`FLAGS (...)`) as `uid`'s flags at `modseq`, unless newer ones are
    /// remembered already.
    pub async fn learn(&self, uid: u32, modseq: u64, item: &[u8]) {
        let mut value = Vec::with_capacity(8 + item.len());
        value.extend_from_slice(&modseq.to_be_bytes());
        value.extend_from_slice(item);
        let newer = |old: &[u8]| old.len() >= 8 && old[..8] >= value[..8];
        self.items.insert_unless(uid, 0, &value, newer).await;
    }

    pub async fn reweigh(&self) {
        self.items.reweigh(0).await;
    }
}

/// What a FETCH relayed as the client wrote it (a cold resync, see `relay::Tee`) teaches
/// the remembered flags: mailgate adds MODSEQ to the command ([`with_modseq`]), notes each
/// message's FLAGS with it on the way, and keeps them once the command completed cleanly
/// with the session's view as it was.
pub struct Learning {
    flags: Flags,
    /// UIDNEXT and the message count when the command was sent.
    stamp: (u32, u32),
    seen: std::sync::Mutex<Vec<(u32, u64, Bytes)>>,
}

impl Learning {
    pub async fn new(scope: &Scope, selected: &Selected, stamp: (u32, u32)) -> Learning {
        Learning { flags: Flags::resolve(scope, selected).await, stamp, seen: Default::default() }
    }

    /// A relayed FETCH response (as the client got it, parsed) of `uid`, and the MODSEQ its
    /// first line had.
    pub fn note(&self, response: &Bytes, parsed: &FetchResponse, uid: u32, modseq: u64) {
        let Some(range) = parsed.range("FLAGS") else { return };
        let item = Bytes::copy_from_slice(&response[range]);
        self.seen.lock().expect("learning lock poisoned").push((uid, modseq, item));
    }

    /// At the command's completion (`clean`), with the session's view now (`stamp`).
    pub async fn settle(self, clean: bool, stamp: Option<(u32, u32)>) {
        if !clean || stamp != Some(self.stamp) {
            return;
        }
        let seen = self.seen.into_inner().expect("learning lock poisoned");
        for (uid, modseq, item) in &seen {
            self.flags.learn(*uid, *modseq, item).await;
        }
        let (_, exists) = self.stamp;
        let mut uids: Vec<u32> = seen.iter().map(|s| s.0).collect();
        uids.sort_unstable();
        uids.dedup();
        if uids.len() == exists as usize {
            let items = &self.flags.items;
            snapshot::keep_uids(items.scope(), items.selected(), self.stamp, &uids).await;
            if let Some(newest) = seen.iter().map(|s| s.1).max() {
                self.flags.complete(newest, self.stamp, &uids).await;
            }
        }
        self.flags.reweigh().await;
    }
}

/// A mailbox's flags column as the fleet's tier holds it: the mark, the mailbox's stamp
/// (UIDNEXT and message count) when it was complete, and every message's entry.
struct SharedColumn {
    mark: u64,
    stamp: (u32, u32),
    entries: Vec<SharedEntry>,
}

/// A message's UID and its remembered value (MODSEQ, then the `FLAGS (...)` item).
struct SharedEntry {
    uid: u32,
    value: Bytes,
}

/// `mark`, `stamp`, then each entry as UID, length and value (big-endian words).
fn encode_column(mark: u64, stamp: (u32, u32), entries: &[(u32, Bytes)]) -> Vec<u8> {
    let size = 16 + entries.iter().map(|(_, v)| 8 + v.len()).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&mark.to_be_bytes());
    out.extend_from_slice(&stamp.0.to_be_bytes());
    out.extend_from_slice(&stamp.1.to_be_bytes());
    for (uid, value) in entries {
        out.extend_from_slice(&uid.to_be_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }
    out
}

/// The column [`encode_column`] wrote, its values slices of `value`; `None` unless it is
/// whole and sound: one entry per message of the stamp, UIDs ascending below its UIDNEXT,
/// each value a MODSEQ and a `FLAGS (...)` item.
fn decode_column(value: &Bytes) -> Option<SharedColumn> {
    let word = |at: usize| -> Option<u32> { Some(u32::from_be_bytes(value.get(at..at + 4)?.try_into().ok()?)) };
    let mark = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let stamp = (word(8)?, word(12)?);
    let mut entries = Vec::with_capacity((stamp.1 as usize).min(value.len() / 24));
    let mut at = 16;
    while at < value.len() {
        let (uid, len) = (word(at)?, word(at + 4)? as usize);
        let start = at + 8;
        let end = start.checked_add(len).filter(|&end| end <= value.len())?;
        let entry = value.slice(start..end);
        let item = entry.get(8..)?;
        let sound = item.starts_with(b"FLAGS (") && item.ends_with(b")");
        if !sound || uid >= stamp.0 || entries.last().is_some_and(|e: &SharedEntry| e.uid >= uid) {
            return None;
        }
        entries.push(SharedEntry { uid, value: entry });
        at = end;
    }
    (entries.len() == stamp.1 as usize).then_some(SharedColumn { mark, stamp, entries })
}

/// The client's FETCH command line asking MODSEQ first as well (`None` when its items are
/// not a parenthesized list): the upstream answers it in the line that carries UID and
/// FLAGS, where the relay takes it out again.
pub fn with_modseq(line: &[u8]) -> Option<Vec<u8>> {
    let fetch = line.windows(6).position(|w| w.eq_ignore_ascii_case(b"FETCH "))?;
    let open = fetch + line[fetch..].iter().position(|&b| b == b'(')?;
    let mut out = Vec::with_capacity(line.len() + 7);
    out.extend_from_slice(&line[..=open]);
    out.extend_from_slice(b"MODSEQ ");
    out.extend_from_slice(&line[open + 1..]);
    Some(out)
}

/// The value of a `MODSEQ (n)` item.
pub fn modseq_value(item: &[u8]) -> Option<u64> {
    let inner = item.strip_prefix(b"MODSEQ (")?.strip_suffix(b")")?;
    std::str::from_utf8(inner).ok()?.parse().ok()
}

/// Whether a `FLAGS (...)` item names `\Recent`.
fn is_recent(item: &[u8]) -> bool {
    item.windows(7).any(|w| w.eq_ignore_ascii_case(b"\\Recent"))
}

/// Whether a client's FETCH is one this module answers: a UID FETCH of flags and immutable
/// items, that sets no `\Seen`.
pub fn answers(job: &Job) -> bool {
    let request = &job.request;
    let mutable = request.mutable_requests();
    request.uid
        && !request.sets_seen()
        && mutable.iter().any(|m| m.eq_ignore_ascii_case("FLAGS"))
        && mutable.iter().all(|m| m.eq_ignore_ascii_case("FLAGS") || m.eq_ignore_ascii_case("UID"))
}

/// How many messages' sizes (the last one's and others at random) a resync answered from
/// remembered flags checks against the upstream's, in the round trip that asks the changes.
const SAMPLE: usize = 8;

/// Answers a resync of flags and cached items with the flags remembered (this instance's,
/// or the fleet's through the second tier) and what changed since: one `CHANGEDSINCE`
/// round trip, which checks a sample of sizes too (see [`sample`]); the items from memory,
/// then from the second tier, a batch at a time; a relayed FETCH for the messages whose
/// immutable items are in neither (new ones). False, with nothing written to the client
/// but unsolicited responses, when this session or the snapshot cannot: the caller then
/// answers the full way.
pub(super) async fn answer<Io: JobIo>(
    io: &mut Io,
    job: &Job,
    client_tag: &str,
    fill: &Fill,
    sizes: &Items,
    wanted: &[Wanted<'_>],
) -> Result<bool, JobError> {
    if !answers(job) || job.modseq.condstore || job.modseq.qresync || !io.modseq_usable() {
        return Ok(false);
    }
    let Some(stamp) = io.view_stamp() else { return Ok(false) };
    let scope = fill.items.scope();
    let flags = Flags::resolve(scope, &job.selected).await;
    let since = match flags.since().await {
        Some(since) => since,
        None => match flags.load_shared(stamp, io.selected_highest_modseq()).await {
            Some(since) => since,
            None => return Ok(false),
        },
    };
    // Modification sequences never go down: a mailbox that announced one below the mark at
    // SELECT has another history (an index rebuilt under the same UIDVALIDITY), or another
    // session raised the mark since (a change made after this SELECT). Either way the flags
    // are learned again, the full way.
    if io.selected_highest_modseq().is_some_and(|highest| highest < since) {
        tracing::debug!(since, "HIGHESTMODSEQ at SELECT below the flags' mark; learning the flags again");
        flags.reset().await;
        return Ok(false);
    }
    // Every message's number: from the snapshot when the mailbox is as it was, else asked.
    intercept::know_all_uids(io, scope, &job.selected).await?;
    let (Some(all), true) = (io.all_uids(), io.view_stamp() == Some(stamp)) else { return Ok(false) };
    let Some(&(_, highest)) = all.last() else { return Ok(false) };
    let set = SequenceSet::parse(&job.request.set);
    let messages: Vec<(u32, u32)> = all.iter().copied().filter(|&(_, uid)| set.contains(uid, highest)).collect();
    let mut lacking = 0;
    for &(_, uid) in &messages {
        lacking += usize::from(!flags.contains(uid).await);
    }
    if lacking > LACKING_SLACK + messages.len() / 10 {
        return Ok(false);
    }

    // What changed since, and the sample's sizes, in one round trip.
    let tag = io.tag();
    io.enable_modseq();
    let command = format!("{tag} UID FETCH {} (UID FLAGS) (CHANGEDSINCE {since})\r\n", job.request.set);
    io.to_upstream(command.into_bytes()).await?;
    let sample = sample(&messages);
    let sample_tag = io.tag();
    if !sample.is_empty() {
        let command = format!("{sample_tag} UID FETCH {} (UID {})\r\n", uid_set(&sample), intercept::VALIDATOR);
        io.to_upstream(command.into_bytes()).await?;
    }
    // The sizes known, meanwhile: of the sample, and of every message when bodies are asked
    // (they cut the batches below).
    let bodies = job.request.cached_items().any(|w| w.class == Kind::Body);
    let uids: Vec<u32> = if bodies { messages.iter().map(|&(_, uid)| uid).collect() } else { sample.clone() };
    // Headers and structure are small: all of them now, from memory and then the second
    // tier, while the upstream works (what comes from the tier is kept in memory anyway).
    // Bodies come a batch at a time below, bounded by their sizes.
    let per = wanted.len();
    fill.items.refresh().await;
    let mut early = if bodies { None } else { Some(gather(&fill.items, &messages, per).await) };
    // After those: a header sync's sizes are among them.
    sizes.refresh().await;
    let known = intercept::known_sizes(sizes, &uids).await;

    let in_set = |uid: u32| messages.binary_search_by_key(&uid, |&(_, u)| u).is_ok();
    let mut changed: Vec<(u32, u64, Bytes)> = Vec::new();
    let mut fresh: Vec<(u32, Bytes)> = Vec::new();
    let mut reported = intercept::Reported::default();
    let mut renumber = Renumber::default();
    // Dovecot may run the two commands side by side: their answers come in any order.
    let (mut status, mut sample_status) = (None, sample.is_empty().then(|| b"OK".to_vec()));
    while status.is_none() || sample_status.is_none() {
        let response = io.response().await?;
        if intercept::is_tagged(&response, &tag) {
            status = Some(intercept::status_text(&response, &tag));
            continue;
        }
        if !sample.is_empty() && intercept::is_tagged(&response, &sample_tag) {
            sample_status = Some(intercept::status_text(&response, &sample_tag));
            continue;
        }
        let parsed = parse_response(&response);
        let uid = parsed.as_ref().and_then(|parsed| parsed.uid(&response));
        let (Some(parsed), Some(uid)) = (parsed, uid) else {
            intercept::relay_other(io, &mut renumber, &response).await?;
            continue;
        };
        // The sample's answer carries its size and no flags; a change, its flags.
        let modseq = parsed.item(&response, "MODSEQ").and_then(modseq_value);
        match (parsed.item(&response, "FLAGS"), parsed.item(&response, intercept::VALIDATOR), modseq) {
            (None, Some(size), _) if sample.binary_search(&uid).is_ok() => {
                fresh.push((uid, Bytes::copy_from_slice(size)));
            }
            // A linear search here would make a mass flag change quadratic.
            (Some(item), _, Some(modseq)) if in_set(uid) && reported.insert(uid) => {
                changed.push((uid, modseq, Bytes::copy_from_slice(item)));
            }
            // Another session's change to a message outside the set, a second report of one
            // inside it: unsolicited, relayed (without what CONDSTORE added).
            _ => intercept::relay_other(io, &mut renumber, &response).await?,
        }
    }
    let (status, sample_status) = (status.unwrap_or_default(), sample_status.unwrap_or_default());
    let clean = snapshot::status_is_clean(&status) && snapshot::status_is_clean(&sample_status);
    if !clean || io.view_stamp() != Some(stamp) {
        return Ok(false);
    }
    // A size that differs is a mailbox rebuilt under its UIDVALIDITY: forgotten (fleet-wide),
    // and answered the full way.
    if let Some(&(uid, _)) = fresh.iter().find(|(uid, size)| known.get(uid).is_some_and(|known| known != size)) {
        intercept::size_changed(&fill.items, uid);
        return Ok(false);
    }
    changed.sort_unstable_by_key(|c| c.0);
    // `\Recent` is this session's alone (messages that arrived since the flags were
    // complete, the only ones that can be recent here): not remembered, and the mark stays
    // where it was until a session without recent messages sees them.
    let mut complete = true;
    for (uid, modseq, item) in &changed {
        if is_recent(item) {
            complete = false;
        } else {
            flags.learn(*uid, *modseq, item).await;
        }
    }

    // Every message's flags first: a message with none is learned the full way.
    let changed_flags = |uid: u32| changed.binary_search_by_key(&uid, |c| c.0).ok().map(|i| changed[i].2.clone());
    let mut flag_items = Vec::with_capacity(messages.len());
    for &(_, uid) in &messages {
        let item = match changed_flags(uid) {
            Some(item) => Some(item),
            None => flags.get(uid).await,
        };
        match item {
            Some(item) => flag_items.push(item),
            None => {
                flags.reweigh().await;
                return Ok(false);
            }
        }
    }
    if complete && messages.len() == all.len() {
        // Every message's flags are now known up to the newest change.
        let newest = changed.iter().map(|c| c.1).max().unwrap_or(since).max(since);
        let uids: Vec<u32> = all.iter().map(|&(_, uid)| uid).collect();
        flags.complete(newest, stamp, &uids).await;
    }
    flags.reweigh().await;

    // The client's items in its order, UID first.
    let layout: Vec<Option<usize>> = {
        let mut next = 0;
        job.request
            .items
            .iter()
            .filter_map(|item| match item.kind {
                ItemKind::Mutable if item.request.eq_ignore_ascii_case("FLAGS") => Some(None),
                ItemKind::Mutable => None,
                ItemKind::Cached { .. } => {
                    next += 1;
                    Some(Some(next - 1))
                }
            })
            .collect()
    };
    // A batch at a time (headers and structure: one, gathered above): memory first, the
    // second tier for what memory lacks, then the batch's answers. A message with anything
    // still missing is relayed whole, and its items count as misses when that relay stores
    // them.
    let unknown = scope.cache.shared().map_or(0, |tier| tier.max_item_bytes() as u64);
    let batches = match bodies {
        false => std::iter::once(0..messages.len()).collect(),
        true => intercept::batches(messages.iter().map(|(_, uid)| match known.get(uid) {
            Some(size) => intercept::size_value(size).unwrap_or(unknown),
            None => unknown,
        })),
    };
    let (mut served, mut hits, mut from_shared, mut answered) = (0, 0, 0, 0);
    let mut misses = Vec::new();
    let mut head = Vec::with_capacity(32);
    for batch in batches {
        let batch_messages = &messages[batch.clone()];
        let (values, in_memory) = match early.take() {
            Some(early) => early,
            None => gather(&fill.items, batch_messages, per).await,
        };
        for ((m, &(seq, uid)), flags_item) in batch_messages.iter().enumerate().zip(&flag_items[batch]) {
            let row = &values[m * per..(m + 1) * per];
            if row.iter().any(Option::is_none) {
                misses.push(uid);
                continue;
            }
            for (i, &memory) in in_memory[m * per..(m + 1) * per].iter().enumerate() {
                fill.items.counted(i, memory);
                if memory {
                    hits += 1;
                } else {
                    from_shared += 1;
                }
            }
            head.clear();
            write!(head, "* {seq} FETCH (UID {uid}").expect("writing to a Vec");
            io.to_client(&head).await?;
            for piece in &layout {
                let value = match piece {
                    None => flags_item,
                    Some(i) => row[*i].as_ref().expect("checked above"),
                };
                io.to_client(b" ").await?;
                io.to_client(value).await?;
                served += value.len();
            }
            io.to_client(b")\r\n").await?;
            answered += 1;
        }
    }
    io.count(hits, from_shared);
    io.answered(answered);
    scope.cache.served(served);
    let mut status = b"OK Fetch completed.".to_vec();
    if !misses.is_empty() {
        let relayed = intercept::relay_filling(io, job, &uid_set(&misses), fill).await?;
        if !relayed.starts_with(b"OK") {
            status = relayed;
        }
    }
    intercept::finish(io, client_tag, &status).await?;
    Ok(true)
}

/// The items of `messages` (`per` each, in order) from memory, then what memory lacks from
/// the second tier (one lookup); and which of them memory had.
async fn gather(items: &Items, messages: &[(u32, u32)], per: usize) -> (Vec<Option<Bytes>>, Vec<bool>) {
    let mut values: Vec<Option<Bytes>> = Vec::with_capacity(messages.len() * per);
    for &(_, uid) in messages {
        for i in 0..per {
            values.push(items.peek(uid, i).await);
        }
    }
    let in_memory: Vec<bool> = values.iter().map(Option::is_some).collect();
    let uids: Vec<u32> = messages.iter().map(|&(_, uid)| uid).collect();
    intercept::fill_from_shared_tier(items, &uids, &mut values).await;
    (values, in_memory)
}

/// The UIDs whose sizes a resync answered from remembered flags checks: the last message's
/// and up to [`SAMPLE`] others, at random (ascending). UIDVALIDITY and MODSEQs that never
/// go down are what a server promises; a mailbox restored or rebuilt by hand may keep both
/// and hold other messages. Sizes are immutable and differ between most messages: one
/// that changed shows the rebuild, as it does on the full way, at a cost of a few lines.
fn sample(messages: &[(u32, u32)]) -> Vec<u32> {
    let Some(&(_, last)) = messages.last() else { return Vec::new() };
    let mut picked = vec![last];
    let random = std::collections::hash_map::RandomState::new();
    for n in 0..4 * SAMPLE {
        if picked.len() >= SAMPLE.min(messages.len()) {
            break;
        }
        let (_, uid) = messages[random.hash_one(n) as usize % messages.len()];
        if !picked.contains(&uid) {
            picked.push(uid);
        }
    }
    picked.sort_unstable();
    picked
}

/// A UID set naming `uids` (ascending) in ranges.
fn uid_set(uids: &[u32]) -> String {
    let mut set = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        while i + 1 < uids.len() && uids[i + 1] == uids[i] + 1 {
            i += 1;
        }
        if !set.is_empty() {
            set.push(',');
        }
        if uids[i] == start {
            set.push_str(&start.to_string());
        } else {
            set.push_str(&format!("{start}:{}", uids[i]));
        }
        i += 1;
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modseq_is_asked_first() {
        assert_eq!(
            with_modseq(b"a UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (FROM)])\r\n").unwrap(),
            b"a UID FETCH 1:* (MODSEQ UID FLAGS BODY.PEEK[HEADER.FIELDS (FROM)])\r\n"
        );
        assert_eq!(with_modseq(b"a UID FETCH 1:* FLAGS\r\n"), None);
    }

    #[test]
    fn uid_sets_are_ranges() {
        assert_eq!(uid_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(uid_set(&[9]), "9");
    }

    #[test]
    fn recent_is_told() {
        assert!(is_recent(b"FLAGS (\\Seen \\Recent)"));
        assert!(is_recent(b"FLAGS (\\recent)"));
        assert!(!is_recent(b"FLAGS (\\Seen $Recently)"));
    }

    #[test]
    fn shared_columns_round_trip_and_refuse_what_is_not_whole() {
        let entry = |modseq: u64, item: &str| {
            let mut v = modseq.to_be_bytes().to_vec();
            v.extend_from_slice(item.as_bytes());
            Bytes::from(v)
        };
        let entries = vec![(3, entry(7, "FLAGS (\\Seen)")), (9, entry(12, "FLAGS ()"))];
        let raw = Bytes::from(encode_column(12, (10, 2), &entries));
        let column = decode_column(&raw).unwrap();
        assert_eq!((column.mark, column.stamp), (12, (10, 2)));
        let got: Vec<(u32, Bytes)> = column.entries.into_iter().map(|e| (e.uid, e.value)).collect();
        assert_eq!(got, entries);
        // Cut short, one entry missing, UIDs out of order or past UIDNEXT, not a FLAGS item.
        assert!(decode_column(&raw.slice(..raw.len() - 1)).is_none());
        assert!(decode_column(&Bytes::from(encode_column(12, (10, 3), &entries))).is_none());
        assert!(decode_column(&Bytes::from(encode_column(12, (9, 2), &entries))).is_none());
        let reversed = vec![entries[1].clone(), entries[0].clone()];
        assert!(decode_column(&Bytes::from(encode_column(12, (10, 2), &reversed))).is_none());
        let odd = vec![(3, entry(7, "BODY[] {3}"))];
        assert!(decode_column(&Bytes::from(encode_column(12, (10, 1), &odd))).is_none());
        assert!(decode_column(&Bytes::from_static(b"short")).is_none());
        // An empty mailbox is a column too.
        assert_eq!(decode_column(&Bytes::from(encode_column(4, (1, 0), &[]))).unwrap().entries.len(), 0);
    }

    #[test]
    fn modseq_values_are_read() {
        assert_eq!(modseq_value(b"MODSEQ (25)"), Some(25));
        assert_eq!(modseq_value(b"MODSEQ (x)"), None);
        assert_eq!(modseq_value(b"FLAGS (25)"), None);
    }
}
