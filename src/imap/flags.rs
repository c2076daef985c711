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

    /// Raises the mark (never lowers it: a session that saw less may finish last).
    pub async fn advance(&self, modseq: u64) {
        if self.since().await.is_some_and(|since| since >= modseq) {
            return;
        }
        let scope = self.items.scope();
        let mark = snapshot::mark(scope, self.items.selected(), MODSEQ_MARK);
        scope.cache.insert(mark, Bytes::copy_from_slice(&modseq.to_be_bytes())).await;
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
            if let Some(newest) = seen.iter().map(|s| s.1).max() {
                self.flags.advance(newest).await;
            }
            let items = &self.flags.items;
            snapshot::keep_uids(items.scope(), items.selected(), self.stamp, &uids).await;
        }
        self.flags.reweigh().await;
    }
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

/// Answers a resync of flags and cached items with the flags remembered and what changed
/// since: one `CHANGEDSINCE` round trip, and a relayed FETCH for the messages whose
/// immutable items are not cached (new ones). False, with nothing written to the client
/// but unsolicited responses, when this session or the snapshot cannot: the caller then
/// answers the full way.
pub(super) async fn answer<Io: JobIo>(
    io: &mut Io,
    job: &Job,
    client_tag: &str,
    fill: &Fill,
    wanted: &[Wanted<'_>],
) -> Result<bool, JobError> {
    if !answers(job) || job.modseq.condstore || job.modseq.qresync || !io.modseq_usable() {
        return Ok(false);
    }
    let Some(stamp) = io.view_stamp() else { return Ok(false) };
    let scope = fill.items.scope();
    let flags = Flags::resolve(scope, &job.selected).await;
    let Some(since) = flags.since().await else { return Ok(false) };
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

    // What changed since.
    let tag = io.tag();
    io.enable_modseq();
    let command = format!("{tag} UID FETCH {} (UID FLAGS) (CHANGEDSINCE {since})\r\n", job.request.set);
    io.to_upstream(command.into_bytes()).await?;
    let in_set = |uid: u32| messages.binary_search_by_key(&uid, |&(_, u)| u).is_ok();
    let mut changed: Vec<(u32, u64, Bytes)> = Vec::new();
    let mut reported = intercept::Reported::default();
    let mut renumber = Renumber::default();
    let status = loop {
        let response = io.response().await?;
        if intercept::is_tagged(&response, &tag) {
            break intercept::status_text(&response, &tag);
        }
        let change = parse_response(&response).and_then(|parsed| {
            let uid = parsed.uid(&response)?;
            let modseq = modseq_value(parsed.item(&response, "MODSEQ")?)?;
            Some((uid, modseq, Bytes::copy_from_slice(parsed.item(&response, "FLAGS")?)))
        });
        match change {
            // A linear search here would make a mass flag change quadratic.
            Some(change) if in_set(change.0) && reported.insert(change.0) => changed.push(change),
            // Another session's change to a message outside the set, a second report of one
            // inside it: unsolicited, relayed (without what CONDSTORE added).
            _ => intercept::relay_other(io, &mut renumber, &response).await?,
        }
    };
    if !snapshot::status_is_clean(&status) || io.view_stamp() != Some(stamp) {
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

    // Every value first (slices of the snapshot, nothing copied).
    let changed_flags = |uid: u32| changed.binary_search_by_key(&uid, |c| c.0).ok().map(|i| changed[i].2.clone());
    let per = wanted.len() + 1;
    let mut values: Vec<Bytes> = Vec::with_capacity(messages.len() * per);
    let mut answered = Vec::with_capacity(messages.len());
    let mut misses = Vec::new();
    for &(seq, uid) in &messages {
        let Some(item) = (match changed_flags(uid) {
            Some(item) => Some(item),
            None => flags.get(uid).await,
        }) else {
            // Never reported, never remembered: the full way learns it.
            flags.reweigh().await;
            return Ok(false);
        };
        let start = values.len();
        values.push(item);
        // Looked at without counting: a message with anything missing is relayed whole, and
        // its items count as misses when that relay stores them.
        for i in 0..wanted.len() {
            match fill.items.peek(uid, i).await {
                Some(value) => values.push(value),
                None => break,
            }
        }
        if values.len() - start == per {
            answered.push((seq, uid));
            (0..wanted.len()).for_each(|i| fill.items.counted(i, true));
        } else {
            values.truncate(start);
            misses.push(uid);
        }
    }
    if complete && messages.len() == all.len() {
        // Every message's flags are now known up to the newest change.
        let newest = changed.iter().map(|c| c.1).max().unwrap_or(since).max(since);
        flags.advance(newest).await;
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
                    Some(Some(next))
                }
            })
            .collect()
    };
    let mut served = 0;
    let mut head = Vec::with_capacity(32);
    for (values, &(seq, uid)) in values.chunks_exact(per).zip(&answered) {
        head.clear();
        write!(head, "* {seq} FETCH (UID {uid}").expect("writing to a Vec");
        io.to_client(&head).await?;
        for piece in &layout {
            let value = &values[piece.unwrap_or(0)];
            io.to_client(b" ").await?;
            io.to_client(value).await?;
            served += value.len();
        }
        io.to_client(b")\r\n").await?;
    }
    io.count(wanted.len() * answered.len(), 0);
    io.answered(answered.len());
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
    fn modseq_values_are_read() {
        assert_eq!(modseq_value(b"MODSEQ (25)"), Some(25));
        assert_eq!(modseq_value(b"MODSEQ (x)"), None);
        assert_eq!(modseq_value(b"FLAGS (25)"), None);
    }
}
