//! A mailbox snapshot's column: one immutable item (a header field list, RFC822.SIZE,
//! BODYSTRUCTURE, ...) of every message of one mailbox, at one UIDVALIDITY, of one account.
//!
//! Per-item cache entries cost an allocation, a hash and a moka insert or lookup per message
//! and item (3–5 µs of CPU for a header sync, where Dovecot answers in ~3 µs per message).
//! A column is one cache entry for all messages: the upstream's bytes are appended to a
//! shared arena (one allocation per 64 KiB), indexed by UID in a sorted vector (messages
//! mostly arrive in ascending UID order: an append), and served as `Bytes` slices of that
//! arena, without a copy. A job resolves its columns once per command and then only takes a
//! short lock per message.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;

use bytes::{Bytes, BytesMut};

/// Arena allocation size: big enough that allocations are rare, small enough that a
/// mailbox of a few messages does not hold much.
const ARENA_CHUNK: usize = 64 * 1024;

/// What one indexed value costs beyond its bytes (UID and slice handle), for the weigher.
pub const SLOT_OVERHEAD: usize = std::mem::size_of::<(u32, Bytes)>();

#[derive(Debug, Default)]
pub struct Column {
    /// Read far more than written (every session of the account answers from it).
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Sorted by UID.
    slots: Vec<(u32, Bytes)>,
    arena: BytesMut,
    /// Bytes held (values and slots).
    weight: usize,
    /// The weight the cache was last told (see [`Column::reweigh_due`]).
    weighed: usize,
}

impl Inner {
    fn position(&self, uid: u32) -> Result<usize, usize> {
        // The common case first: a message after every known one.
        match self.slots.last() {
            None => Err(0),
            Some(&(last, _)) if uid > last => Err(self.slots.len()),
            _ => self.slots.binary_search_by_key(&uid, |&(u, _)| u),
        }
    }

    fn insert(&mut self, uid: u32, value: &[u8]) -> Bytes {
        let inner = self;
        if inner.arena.capacity() - inner.arena.len() < value.len() {
            inner.arena = BytesMut::with_capacity(ARENA_CHUNK.max(value.len()));
        }
        inner.arena.extend_from_slice(value);
        let kept = inner.arena.split().freeze();
        match inner.position(uid) {
            Ok(i) => {
                inner.weight = inner.weight - inner.slots[i].1.len() + kept.len();
                inner.slots[i].1 = kept.clone();
            }
            Err(i) => {
                inner.weight += kept.len() + SLOT_OVERHEAD;
                inner.slots.insert(i, (uid, kept.clone()));
            }
        }
        kept
    }
}

impl Column {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().expect("column lock poisoned")
    }

    fn lock(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().expect("column lock poisoned")
    }

    pub fn get(&self, uid: u32) -> Option<Bytes> {
        let inner = self.read();
        inner.position(uid).ok().map(|i| inner.slots[i].1.clone())
    }

    /// [`get`](Column::get) for a reader that goes through the messages in order (a sync):
    /// `cursor` is where its last value was; the next one is usually right after it, which
    /// spares a binary search (and its cache misses) per message.
    pub fn get_after(&self, uid: u32, cursor: &AtomicUsize) -> Option<Bytes> {
        let inner = self.read();
        let at = cursor.load(Ordering::Relaxed);
        let found = [at, at + 1]
            .into_iter()
            .find(|&i| inner.slots.get(i).is_some_and(|&(u, _)| u == uid))
            .or_else(|| inner.position(uid).ok())?;
        cursor.store(found, Ordering::Relaxed);
        Some(inner.slots[found].1.clone())
    }

    /// The values of UIDs `first..end`, in order.
    pub fn between(&self, first: u32, end: u32) -> Vec<(u32, Bytes)> {
        let inner = self.read();
        let from = inner.slots.partition_point(|&(uid, _)| uid < first);
        inner.slots[from..].iter().take_while(|&&(uid, _)| uid < end).cloned().collect()
    }

    pub fn contains(&self, uid: u32) -> bool {
        self.read().position(uid).is_ok()
    }

    /// The first of `entries` whose UID has another value here: the items are immutable, so
    /// the two tiers disagreeing means one of them holds a mailbox rebuilt under its
    /// UIDVALIDITY.
    pub fn contradicted_by(&self, entries: &[(u32, Bytes)]) -> Option<u32> {
        let inner = self.read();
        (entries.iter())
            .find(|(uid, value)| inner.position(*uid).is_ok_and(|i| inner.slots[i].1 != *value))
            .map(|&(uid, _)| uid)
    }

    /// Stores `value` for `uid` (replacing what was there) and returns it as kept.
    pub fn insert(&self, uid: u32, value: &[u8]) -> Bytes {
        self.lock().insert(uid, value)
    }

    /// Stores each of `entries` (ascending) whose UID has no value yet, under one lock: a
    /// range of UIDs amid known ones (the second tier's, see `cache::ranges`) is merged in
    /// one pass, where inserting them one by one would move the rest each time.
    pub fn insert_absent(&self, entries: &[(u32, Bytes)]) {
        let mut inner = self.lock();
        let absent: Vec<&(u32, Bytes)> = entries.iter().filter(|(uid, _)| inner.position(*uid).is_err()).collect();
        let Some(&&(first, _)) = absent.first() else { return };
        if inner.slots.last().is_none_or(|&(last, _)| last < first) {
            for (uid, value) in absent {
                inner.insert(*uid, value);
            }
            return;
        }
        let mut kept: Vec<(u32, Bytes)> = Vec::with_capacity(absent.len());
        for (uid, value) in absent {
            if inner.arena.capacity() - inner.arena.len() < value.len() {
                inner.arena = BytesMut::with_capacity(ARENA_CHUNK.max(value.len()));
            }
            inner.arena.extend_from_slice(value);
            let value = inner.arena.split().freeze();
            inner.weight += value.len() + SLOT_OVERHEAD;
            kept.push((*uid, value));
        }
        let old = std::mem::take(&mut inner.slots);
        let mut merged = Vec::with_capacity(old.len() + kept.len());
        let (mut old, mut kept) = (old.into_iter().peekable(), kept.into_iter().peekable());
        loop {
            let next = match (old.peek(), kept.peek()) {
                (Some(a), Some(b)) if a.0 < b.0 => old.next(),
                (_, Some(_)) => kept.next(),
                (Some(_), None) => old.next(),
                (None, None) => break,
            };
            merged.extend(next);
        }
        inner.slots = merged;
    }

    /// Stores `value` for `uid` unless what is there must stay (`keep` says so of it): one
    /// decision under the lock, so that of two writers the one with the older value cannot
    /// undo the newer.
    pub fn insert_unless(&self, uid: u32, value: &[u8], keep: impl FnOnce(&[u8]) -> bool) {
        let mut inner = self.lock();
        if inner.position(uid).is_ok_and(|i| keep(&inner.slots[i].1)) {
            return;
        }
        inner.insert(uid, value);
    }

    pub fn remove(&self, uid: u32) {
        let mut inner = self.lock();
        if let Ok(i) = inner.position(uid) {
            let (_, value) = inner.slots.remove(i);
            inner.weight -= value.len() + SLOT_OVERHEAD;
        }
    }

    /// Forgets every value.
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.slots = Vec::new();
        inner.arena = BytesMut::new();
        inner.weight = 0;
    }

    /// Bytes held: values (whose arena stays allocated until every slice of it is gone)
    /// and the index.
    pub fn weight(&self) -> usize {
        self.read().weight
    }

    /// The weight for the cache's weigher, remembered as the one it knows.
    pub fn weighed(&self) -> usize {
        let mut inner = self.lock();
        inner.weighed = inner.weight;
        inner.weight
    }

    /// Whether the weight moved by more than `slack` since the cache last weighed it.
    pub fn reweigh_due(&self, slack: usize) -> bool {
        let inner = self.read();
        inner.weight.abs_diff(inner.weighed) > slack
    }

    /// How many messages have a value.
    pub fn len(&self) -> usize {
        self.read().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_range_that_disagrees_with_a_known_value_is_a_contradiction() {
        let column = Column::default();
        column.insert(5, b"RFC822.SIZE 1200");
        let range = |size: &str| vec![(4, Bytes::from("RFC822.SIZE 900")), (5, Bytes::from(size.to_string()))];
        assert_eq!(column.contradicted_by(&range("RFC822.SIZE 1200")), None, "the same value, and one memory lacks");
        assert_eq!(column.contradicted_by(&range("RFC822.SIZE 1300")), Some(5));
        assert_eq!(column.contradicted_by(&[]), None);
    }

    #[test]
    fn absent_values_merge_in_order_and_never_replace() {
        let column = Column::default();
        for uid in [1, 5, 9] {
            column.insert(uid, format!("old {uid}").as_bytes());
        }
        let entries: Vec<(u32, Bytes)> =
            [2, 5, 6, 10].iter().map(|&uid| (uid, Bytes::from(format!("new {uid}")))).collect();
        column.insert_absent(&entries);
        let all = column.between(0, 100);
        let uids: Vec<u32> = all.iter().map(|(uid, _)| *uid).collect();
        assert_eq!(uids, [1, 2, 5, 6, 9, 10]);
        assert_eq!(column.get(5).unwrap(), "old 5");
        assert_eq!(column.get(6).unwrap(), "new 6");
        assert_eq!(column.len(), 6);
        let weight = column.weight();
        column.insert_absent(&entries);
        assert_eq!(column.weight(), weight);
        // After every known one: appended.
        column.insert_absent(&[(20, Bytes::from_static(b"x"))]);
        assert_eq!(column.between(11, 21).len(), 1);
    }

    use super::*;

    #[test]
    fn values_are_found_by_uid_in_any_insertion_order() {
        let column = Column::default();
        for uid in [5, 1, 9, 3, 7, 2] {
            column.insert(uid, format!("RFC822.SIZE {uid}").as_bytes());
        }
        for uid in [1, 2, 3, 5, 7, 9] {
            assert_eq!(column.get(uid).unwrap(), format!("RFC822.SIZE {uid}").as_bytes());
        }
        for uid in [0, 4, 6, 8, 10] {
            assert_eq!(column.get(uid), None);
            assert!(!column.contains(uid));
        }
        column.insert(3, b"RFC822.SIZE 33");
        assert_eq!(column.get(3).unwrap(), "RFC822.SIZE 33");
        column.remove(3);
        assert_eq!(column.get(3), None);
        assert_eq!(column.len(), 5);
        // In order, out of order, absent: the cursor only ever saves a search.
        let cursor = AtomicUsize::new(0);
        for uid in [1, 2, 5, 7, 9, 1, 9, 3, 4, 7, 2] {
            assert_eq!(column.get_after(uid, &cursor), column.get(uid), "uid {uid}");
        }
    }

    #[test]
    fn values_share_arena_allocations_and_are_weighed() {
        let column = Column::default();
        let a = column.insert(1, b"abc");
        let b = column.insert(2, b"defg");
        // Adjacent slices of one allocation.
        assert_eq!(a.as_ptr() as usize + a.len(), b.as_ptr() as usize);
        assert_eq!(column.weight(), 7 + 2 * SLOT_OVERHEAD);
        // A value larger than the arena's room gets an allocation of its own.
        let big = vec![b'x'; ARENA_CHUNK + 10];
        assert_eq!(column.insert(3, &big).len(), big.len());
        assert_eq!(column.get(1).unwrap(), "abc");
        column.remove(2);
        assert_eq!(column.weight(), 3 + big.len() + 2 * SLOT_OVERHEAD);
    }
}
