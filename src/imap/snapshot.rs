//! The selected mailbox's snapshot as one command sees it: where each cacheable item of a
//! FETCH lives (a snapshot column, resolved once per command, or entries of its own for
//! bodies), and the rules for what may be stored in it.
//!
//! A snapshot is the set of columns of one (account, mailbox, UIDVALIDITY): the upstream's
//! own bytes of every immutable item a client fetched, filled as a side copy of answers
//! relayed to clients. What may go in is decided here: content only (never what a server
//! says of an expunged message), nothing of a command that completes with anything but a
//! plain OK, and an item contradicting what is cached forgets the whole mailbox (a rebuilt
//! store, invariant 10 of docs/ARCHITECTURE.md).

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use super::intercept::Selected;
use crate::cache::{Column, ColumnKey, ImapKey, Key, Kind, LoadGuard, Name, Scope};

/// The key of `item` of message `uid`.
pub fn key(scope: &Scope, selected: &Selected, uid: u32, item: &Name, kind: Kind) -> Key {
    Key::Imap(ImapKey {
        account: scope.account.clone(),
        mailbox: selected.mailbox.clone(),
        uid_validity: selected.uid_validity,
        uid,
        item: item.clone(),
        kind,
    })
}

/// The key of a mark about the mailbox itself (UID 0 is never a message's). Marks are
/// entries of their own, as bodies are.
pub fn mark(scope: &Scope, selected: &Selected, name: &str) -> Key {
    key(scope, selected, 0, &Name::new(name), Kind::Body)
}

/// Set once this account's cache was filled from the mailbox (at this UIDVALIDITY): until
/// then every FETCH that carries UIDs is relayed as it is (see `intercept::looks_cold`).
pub const FILLED_MARK: &str = "\0filled";

/// Where the highest UIDNEXT known of an account's mailbox (at one UIDVALIDITY) is kept:
/// the most of what SELECT reported and of the UIDs seen in answers, plus one.
pub const UID_NEXT_MARK: &str = "\0uidnext";

/// UIDs are never given out twice under one UIDVALIDITY (RFC 9051 §2.3.1.1), so the
/// mailbox's UIDNEXT never goes below one known before, unless the mailbox was restored
/// from an older copy and its UIDs are to be given again to other messages: then what is
/// cached of it is forgotten before anything is answered (the upstream-free path included).
/// What this session knows (SELECT's UIDNEXT, the highest UID it saw) raises the mark for
/// the next.
pub async fn check_uid_next(scope: &Scope, selected: &Selected, highest_uid: Option<u32>) {
    let known = [selected.uid_next, highest_uid.map(|uid| uid.saturating_add(1))];
    let Some(uid_next) = known.into_iter().flatten().max() else { return };
    let mark = mark(scope, selected, UID_NEXT_MARK);
    // What another instance saw counts too (the second tier), when this one knows nothing.
    let known = match scope.cache.peek(&mark).await {
        Some(value) => Some(value),
        None => scope.cache.shared_mark(&mark).await,
    };
    let seen = known.and_then(|v| Some(u32::from_be_bytes(v.as_ref().try_into().ok()?)));
    match seen {
        Some(seen) if seen > uid_next => {
            crate::log_budget::warn_limited!(
                mailbox = selected.mailbox.as_str(),
                uid_validity = selected.uid_validity,
                seen,
                uid_next,
                "UIDNEXT went down without a new UIDVALIDITY; forgetting what is cached of the mailbox"
            );
            scope.cache.forget_mailbox(&scope.account, &selected.mailbox, selected.uid_validity);
        }
        Some(seen) if seen == uid_next => return,
        _ => {}
    }
    let value = Bytes::copy_from_slice(&uid_next.to_be_bytes());
    scope.cache.share(&mark, value.clone());
    scope.cache.insert(mark, value).await;
}

/// Where the mailbox's UIDs in order (message n is the n-th) are kept, with the UIDNEXT
/// and message count they were seen with.
const UIDS_MARK: &str = "\0uids";

/// Teaches `learn` the mailbox's UIDs when the snapshot has them for `stamp` (UIDNEXT and
/// message count at SELECT, with nothing arrived or gone since): UIDs are never reused and
/// new messages always get one at least UIDNEXT, so under one UIDVALIDITY an unchanged
/// UIDNEXT means no message arrived, and then an unchanged count means none went. Whether
/// it did.
pub async fn restore_uids(scope: &Scope, selected: &Selected, stamp: (u32, u32), learn: impl FnOnce(&[u32])) -> bool {
    let Some(value) = scope.cache.peek(&mark(scope, selected, UIDS_MARK)).await else { return false };
    let words: Vec<u32> = value.chunks_exact(4).map(|w| u32::from_be_bytes(w.try_into().expect("4 bytes"))).collect();
    let [uid_next, exists, ref uids @ ..] = words[..] else { return false };
    if (uid_next, exists) != stamp || uids.len() != exists as usize {
        return false;
    }
    learn(uids);
    true
}

/// Keeps the mailbox's UIDs (the answer to `UID SEARCH ALL`) for sessions that find the
/// mailbox as `stamp` says.
pub async fn keep_uids(scope: &Scope, selected: &Selected, stamp: (u32, u32), uids: &[u32]) {
    let (uid_next, exists) = stamp;
    if uids.len() != exists as usize || uids.iter().any(|&uid| uid >= uid_next) || !uids.is_sorted() {
        return;
    }
    let mut value = Vec::with_capacity(8 + 4 * uids.len());
    for word in [uid_next, exists].iter().chain(uids) {
        value.extend_from_slice(&word.to_be_bytes());
    }
    scope.cache.insert(mark(scope, selected, UIDS_MARK), Bytes::from(value)).await;
}

/// One cacheable item of a command and where it lives.
struct Slot {
    item: Name,
    kind: Kind,
    /// Its column, for headers and structure (bodies are entries of their own).
    column: Option<ColumnSlot>,
}

/// A column as a command holds it: found when the command began, or created by the
/// command's first store (a lookup never creates one).
struct ColumnSlot {
    key: ColumnKey,
    column: OnceLock<Arc<Column>>,
    /// Where this command's last lookup was (commands go through messages in order).
    cursor: AtomicUsize,
}

/// A command's cacheable items, each resolved to its column once.
pub struct Items {
    scope: Scope,
    selected: Selected,
    slots: Vec<Slot>,
}

impl Items {
    /// `wanted`: each item's key name and kind, in the command's order.
    pub async fn resolve(scope: &Scope, selected: &Selected, wanted: Vec<(Name, Kind)>) -> Items {
        let mut slots = Vec::new();
        for (item, kind) in wanted {
            let column = match key(scope, selected, 0, &item, kind) {
                Key::Imap(imap) => imap.column(),
                _ => None,
            };
            let column = match column {
                Some(key) => {
                    let column = OnceLock::new();
                    if let Some(found) = scope.cache.existing_column(&key).await {
                        let _ = column.set(found);
                    }
                    Some(ColumnSlot { key, column, cursor: AtomicUsize::new(0) })
                }
                None => None,
            };
            slots.push(Slot { item, kind, column });
        }
        Items { scope: scope.clone(), selected: selected.clone(), slots }
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    pub fn selected(&self) -> &Selected {
        &self.selected
    }

    pub fn key(&self, uid: u32, i: usize) -> Key {
        key(&self.scope, &self.selected, uid, &self.slots[i].item, self.slots[i].kind)
    }

    /// Whether item `i` lives in a column (headers and structure; bodies do not).
    pub fn is_column(&self, i: usize) -> bool {
        self.slots[i].column.is_some()
    }

    /// Item `i` of `uid`, without counting a lookup.
    pub async fn peek(&self, uid: u32, i: usize) -> Option<Bytes> {
        match &self.slots[i].column {
            Some(slot) => slot.column.get()?.get_after(uid, &slot.cursor),
            None => self.scope.cache.peek(&self.key(uid, i)).await,
        }
    }

    /// Finds the columns created since the command resolved its own (the second tier's
    /// values fill columns a command had not found).
    pub async fn refresh(&self) {
        for slot in self.slots.iter().filter_map(|s| s.column.as_ref()) {
            if slot.column.get().is_none() {
                if let Some(found) = self.scope.cache.existing_column(&slot.key).await {
                    let _ = slot.column.set(found);
                }
            }
        }
    }

    /// Item `i` of `uid`, counted as a hit or a miss.
    pub async fn get(&self, uid: u32, i: usize) -> Option<Bytes> {
        let found = self.peek(uid, i).await;
        self.counted(i, found.is_some());
        found
    }

    /// Counts a lookup of item `i` made with [`peek`](Items::peek).
    pub fn counted(&self, i: usize, hit: bool) {
        self.scope.cache.count(self.slots[i].kind, hit);
    }

    pub async fn contains(&self, uid: u32, i: usize) -> bool {
        match &self.slots[i].column {
            Some(slot) => slot.column.get().is_some_and(|column| column.contains(uid)),
            None => self.scope.cache.contains(&self.key(uid, i)).await,
        }
    }

    /// Stores `raw` as item `i` of `uid` (within the cache's size cap): copied into its
    /// column, or kept as it is (a slice of a response, say) as an entry.
    pub async fn insert(&self, uid: u32, i: usize, raw: &Bytes) {
        match &self.slots[i].column {
            Some(slot) => {
                if self.scope.cache.admits(raw.len()) {
                    if slot.column.get().is_none() {
                        let _ = slot.column.set(self.scope.cache.column(&slot.key).await);
                    }
                    slot.column.get().expect("just set").insert(uid, raw);
                }
            }
            None => self.scope.cache.insert(self.key(uid, i), raw.clone()).await,
        }
    }

    /// Stores `raw` as item `i` of `uid` in its column unless the value there must stay
    /// (`keep` decides, under the column's lock). Items without a column are not stored.
    pub async fn insert_unless(&self, uid: u32, i: usize, raw: &[u8], keep: impl FnOnce(&[u8]) -> bool) {
        let Some(slot) = &self.slots[i].column else { return };
        if self.scope.cache.admits(raw.len()) {
            if slot.column.get().is_none() {
                let _ = slot.column.set(self.scope.cache.column(&slot.key).await);
            }
            slot.column.get().expect("just set").insert_unless(uid, raw, keep);
        }
    }

    /// Empties item `i`'s column (for every message).
    pub fn clear(&self, i: usize) {
        if let Some(column) = self.slots[i].column.as_ref().and_then(|slot| slot.column.get()) {
            column.clear();
        }
    }

    pub async fn remove(&self, uid: u32, i: usize) {
        match &self.slots[i].column {
            Some(slot) => {
                if let Some(column) = slot.column.get() {
                    column.remove(uid);
                }
            }
            None => self.scope.cache.invalidate(&self.key(uid, i)).await,
        }
    }

    /// Forgets everything cached of the mailbox at this UIDVALIDITY: its upstream changed an
    /// immutable item without a new UIDVALIDITY (a rebuilt mailbox).
    pub fn forget_mailbox(&self) {
        self.scope.cache.forget_mailbox(&self.scope.account, &self.selected.mailbox, self.selected.uid_validity);
    }

    /// Tells the cache what the columns weigh now (their appends are not seen by it): when
    /// a command ends, and every [`crate::cache::REWEIGH_SLACK`] bytes of a long one.
    pub async fn reweigh(&self, slack: usize) {
        for slot in self.slots.iter().filter_map(|s| s.column.as_ref()) {
            if let Some(column) = slot.column.get() {
                self.scope.cache.reweigh(&slot.key, column, slack).await;
            }
        }
    }

    /// Stores `raw` as item `i` of `uid` when it is content, noting it in `stored` so that
    /// an unclean completion takes it back. A value other than the cached one shows a
    /// rebuilt mailbox: the mailbox is forgotten first.
    pub async fn store(&self, stored: &mut Stored, uid: u32, i: usize, raw: &Bytes, guard: Option<LoadGuard>) -> bool {
        if !is_content(raw) {
            return false;
        }
        match self.peek(uid, i).await {
            // Stored meanwhile by another session (concurrent cold syncs of one mailbox).
            Some(cached) if cached == *raw => {
                if let Some(guard) = guard {
                    guard.fill(cached).await;
                }
                return false;
            }
            Some(_) => {
                crate::log_budget::warn_limited!(
                    item = self.slots[i].item.as_str(),
                    mailbox = self.selected.mailbox.as_str(),
                    uid_validity = self.selected.uid_validity,
                    "the upstream changed an immutable item without a new UIDVALIDITY; forgetting what is cached of the mailbox"
                );
                self.forget_mailbox();
            }
            None => {}
        }
        match guard {
            // The value goes to the sessions waiting for it too.
            Some(guard) => guard.fill(raw.clone()).await,
            None => self.insert(uid, i, raw).await,
        }
        stored.items.push((uid, i));
        true
    }
}

/// What a command stored, to be taken back when its completion says that some messages
/// were expunged under the session: their answers are placeholders, not content.
#[derive(Default)]
pub struct Stored {
    items: Vec<(u32, usize)>,
}

impl Stored {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// At the command's completion: keep what it stored only after a completion that says
    /// the answers are content ([`status_is_clean`]), and then mark the mailbox as one the
    /// cache was filled from; else take it back.
    pub async fn settle(self, items: &Items, clean: bool) {
        if !clean {
            for (uid, i) in self.items {
                items.remove(uid, i).await;
            }
        } else if !self.items.is_empty() {
            let scope = items.scope();
            let filled = mark(scope, items.selected(), FILLED_MARK);
            // Content after a clean completion: now the fleet may have it too, then the mark
            // that says so. Gathered in a task of its own, off the client's answer.
            if scope.cache.shared().is_some() {
                // Through the cache, not the command's slots: a load another session waited
                // for filled a column this command had not resolved.
                let keys: Vec<Key> = self.items.iter().map(|(uid, i)| items.key(*uid, *i)).collect();
                let (cache, filled) = (scope.cache.clone(), filled.clone());
                tokio::spawn(async move { cache.share_stored(keys, vec![(filled, Bytes::new())]).await });
            }
            scope.cache.insert(filled, Bytes::new()).await;
        }
        items.reweigh(0).await;
    }
}

/// A completion after which the answers are content: OK, without `[EXPUNGEISSUED]`
/// (RFC 5530: some messages were expunged and answered with placeholders).
pub fn status_is_clean(status: &[u8]) -> bool {
    status.starts_with(b"OK") && !status.windows(14).any(|w| w.eq_ignore_ascii_case(b"[EXPUNGEISSUED"))
}

/// Whether an item's bytes are the message's content rather than what a server says of a
/// message that is gone: `NIL` (RFC 2180 §4.1.3), or Dovecot's placeholders (`RFC822.SIZE
/// 0`, the 1970 INTERNALDATE, an ENVELOPE of NILs, an empty text/plain structure). A real
/// message that looks like one is merely not cached. (The command's `[EXPUNGEISSUED]`
/// completion takes back whatever else it stored: see [`Stored::settle`].)
pub fn is_content(raw: &[u8]) -> bool {
    let Some(space) = raw.iter().position(|&b| b == b' ') else { return false };
    let (name, value) = (&raw[..space], &raw[space + 1..]);
    let placeholder = match name {
        b"RFC822.SIZE" => value == b"0",
        b"INTERNALDATE" => value.starts_with(b"\"01-Jan-1970 00:00:00"),
        b"ENVELOPE" => value.split(|&b| b == b' ' || b == b'(' || b == b')').all(|w| w.is_empty() || w == b"NIL"),
        b"BODYSTRUCTURE" | b"BODY" => value.starts_with(b"(\"text\" \"plain\" NIL NIL NIL \"7bit\" 0 0"),
        _ => false,
    };
    value != b"NIL" && !placeholder
}
