//! The message cache: immutable message data in memory, per account, weighed in bytes.
//!
//! Built on moka's future cache. Headers and structure live in mailbox snapshots: one
//! [`Column`] per (account, mailbox, UIDVALIDITY, item) holds that item of every message,
//! one cache entry for thousands of values. Bodies (and POP3 messages) are entries of
//! their own: their size amortizes an entry's cost, and they are evicted one by one. The
//! weight of an entry is its size, anything above `max_entry_bytes` is streamed and never
//! stored, and an eviction listener counts why entries leave. Counters live here
//! ([`Stats`]) so that the metrics exporter only has to read them.

pub mod column;
pub mod key;
pub mod ranges;
pub mod shared;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use moka::notification::RemovalCause;
use tokio::sync::oneshot;

pub use column::Column;
pub use key::{Account, ColumnKey, ImapKey, Key, LoginProof, Name, Pop3Key};

use crate::config::CacheConfig;

/// The most single items one lookup in the second tier asks for (one `MGET`).
const SHARED_KEYS_PER_LOOKUP: usize = 2048;

/// The cache as one session sees it: whose mail, and the shared cache.
#[derive(Clone)]
pub struct Scope {
    pub cache: Arc<MessageCache>,
    pub account: Account,
}

/// What kind of data a lookup was for (a bounded label for metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// IMAP body sections, RFC822*, BINARY.
    Body,
    /// IMAP HEADER / HEADER.FIELDS / MIME sections, RFC822.HEADER.
    Header,
    /// BODYSTRUCTURE, BODY, ENVELOPE, INTERNALDATE, RFC822.SIZE.
    Structure,
    /// A POP3 message.
    Pop3,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Body, Kind::Header, Kind::Structure, Kind::Pop3];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Body => "body",
            Kind::Header => "header",
            Kind::Structure => "structure",
            Kind::Pop3 => "pop3",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Monotonic counters; read with [`MessageCache::stats`].
#[derive(Debug, Default)]
pub struct Stats {
    hits: [AtomicU64; 4],
    misses: [AtomicU64; 4],
    /// Bytes sent to clients from the cache: bytes the upstream did not have to send.
    bytes_served: AtomicU64,
    inserted: AtomicU64,
    too_large: AtomicU64,
    evicted_size: AtomicU64,
    evicted_expired: AtomicU64,
    evicted_other: AtomicU64,
    /// Cached data found to differ from the upstream's (a mailbox or maildrop rebuilt
    /// without a new UIDVALIDITY or UIDL).
    stale: AtomicU64,
}

/// A point-in-time copy of the counters and the cache's size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub hits: [u64; 4],
    pub misses: [u64; 4],
    pub bytes_served: u64,
    pub inserted: u64,
    pub too_large: u64,
    pub evicted_size: u64,
    pub evicted_expired: u64,
    pub evicted_other: u64,
    pub stale: u64,
    pub entries: u64,
    pub bytes: u64,
}

impl StatsSnapshot {
    pub fn hits(&self, kind: Kind) -> u64 {
        self.hits[kind.index()]
    }
    pub fn misses(&self, kind: Kind) -> u64 {
        self.misses[kind.index()]
    }
}

/// What the cache holds under a key.
#[derive(Clone, Debug)]
enum Value {
    Item(Bytes),
    Column(Arc<Column>),
}

/// Columns are refilled while they live: an update (a re-weighing) must not restart their
/// time to live, which runs from their creation like an item's.
struct Expiry(Option<std::time::Duration>);

impl moka::Expiry<Key, Value> for Expiry {
    fn expire_after_create(&self, _: &Key, _: &Value, _: std::time::Instant) -> Option<std::time::Duration> {
        self.0
    }
}

/// A column grows by appends that moka does not see: it is weighed again when a command
/// that filled it ends, and every this many bytes during a long fill.
pub const REWEIGH_SLACK: usize = 64 * 1024;

/// The second tier holds another value than memory for one key (the message with `uid`):
/// cached items never change under their key, so one of the tiers holds a mailbox rebuilt
/// under its UIDVALIDITY (a server restored from backup, a broken migration) that no
/// instance has forgotten yet. The caller forgets the mailbox, fleet-wide (its generation
/// rises), and answers from the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Contradiction {
    pub uid: u32,
}

pub struct MessageCache {
    entries: moka::future::Cache<Key, Value>,
    max_entry_bytes: usize,
    stats: Arc<Stats>,
    /// Keys being loaded from an upstream right now, with whoever waits for them.
    loading: Mutex<HashMap<Key, Vec<oneshot::Sender<Option<Bytes>>>>>,
    /// The second tier in Redis, when configured (`[cache.shared]`).
    shared: std::sync::OnceLock<Arc<shared::SharedTier>>,
}

/// The answer to [`MessageCache::claim`].
pub enum Claim {
    /// Nobody is loading the key: load it, and hand the value to the guard.
    Load(LoadGuard),
    /// Another session is loading it: its value (or `None` if that load fails) arrives here.
    Wait(oneshot::Receiver<Option<Bytes>>),
}

/// The right and duty to load one key. Dropped without [`LoadGuard::fill`] (the upstream
/// failed, the value was too large), it tells the waiters to load for themselves.
pub struct LoadGuard {
    cache: Arc<MessageCache>,
    key: Option<Key>,
}

impl LoadGuard {
    pub async fn fill(mut self, value: Bytes) {
        if let Some(key) = self.key.take() {
            self.cache.insert(key.clone(), value.clone()).await;
            self.cache.release(&key, Some(value));
        }
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.cache.release(&key, None);
        }
    }
}

impl std::fmt::Debug for MessageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageCache").field("max_entry_bytes", &self.max_entry_bytes).finish()
    }
}

impl MessageCache {
    pub fn new(config: &CacheConfig) -> MessageCache {
        let stats = Arc::new(Stats::default());
        let listener_stats = stats.clone();
        let builder = moka::future::Cache::builder()
            .max_capacity(config.max_bytes.0)
            .support_invalidation_closures()
            .weigher(|key: &Key, value: &Value| -> u32 {
                let key_bytes = match key {
                    Key::Imap(k) => k.mailbox.len() + k.item.len() + 64,
                    Key::Column(k) => k.mailbox.len() + k.item.len() + 64,
                    Key::Pop3(k) => k.uidl.len() + 48,
                };
                let value_bytes = match value {
                    Value::Item(bytes) => bytes.len(),
                    Value::Column(column) => column.weighed(),
                };
                u32::try_from(value_bytes + key_bytes).unwrap_or(u32::MAX)
            })
            .eviction_listener(move |_key, _value, cause| {
                let counter = match cause {
                    RemovalCause::Size => &listener_stats.evicted_size,
                    RemovalCause::Expired => &listener_stats.evicted_expired,
                    RemovalCause::Explicit | RemovalCause::Replaced => &listener_stats.evicted_other,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            });
        MessageCache {
            entries: builder.expire_after(Expiry(config.time_to_live.map(|ttl| ttl.0))).build(),
            max_entry_bytes: config.max_entry_bytes.as_usize(),
            stats,
            loading: Mutex::new(HashMap::new()),
            shared: std::sync::OnceLock::new(),
        }
    }

    /// Puts the second tier behind this cache (once, at start).
    pub fn attach_shared(&self, tier: Arc<shared::SharedTier>) {
        let _ = self.shared.set(tier);
    }

    /// The second tier, when there is one.
    pub fn shared(&self) -> Option<&Arc<shared::SharedTier>> {
        self.shared.get()
    }

    /// Whether the mark `key` (an entry of its own) is known: in memory, else in the
    /// second tier (then kept in memory too).
    pub async fn has_mark(&self, key: &Key) -> bool {
        if self.entries.contains_key(key) {
            return true;
        }
        self.shared_mark(key).await.is_some()
    }

    /// The mark `key` from the second tier (kept in memory when found).
    pub async fn shared_mark(&self, key: &Key) -> Option<Bytes> {
        let tier = self.shared()?;
        let found = tier.get_many(std::slice::from_ref(key)).await.pop().flatten()?;
        self.entries.insert(key.clone(), Value::Item(found.clone())).await;
        Some(found)
    }

    /// Shares `value` of `key` with the fleet (the second tier), if there is one.
    pub fn share(&self, key: &Key, value: Bytes) {
        if let Some(tier) = self.shared() {
            tier.put(key, value);
        }
    }

    /// Shares the values of `keys` (as this cache holds them now) with the fleet, and
    /// `then` after them (the marks that cover them): the items of a column that a command
    /// stored many of in one range go as that range's one value, holding every item the
    /// column has there (see [`ranges`]); the rest one by one.
    pub async fn share_stored(&self, keys: Vec<Key>, then: Vec<(Key, Bytes)>) {
        let Some(tier) = self.shared() else { return };
        let mut by_range: HashMap<(ColumnKey, u32), Vec<Key>> = HashMap::new();
        let mut single = Vec::new();
        for key in keys {
            match &key {
                Key::Imap(imap) => match imap.column() {
                    Some(column) => by_range.entry((column, ranges::start(imap.uid))).or_default().push(key),
                    None => single.push(key),
                },
                _ => single.push(key),
            }
        }
        let mut values = Vec::new();
        for ((column_key, first), keys) in by_range {
            let column = match self.existing_column(&column_key).await {
                Some(column) if keys.len() >= ranges::RANGE_FROM => column,
                _ => {
                    single.extend(keys);
                    continue;
                }
            };
            let entries = column.between(first, first.saturating_add(ranges::RANGE_UIDS));
            let Key::Imap(imap) = &keys[0] else { continue };
            if entries.is_empty() {
                continue;
            }
            let encoded = ranges::encode(&entries);
            if encoded.len() > tier.max_item_bytes() {
                // Too large for the tier (a range of large headers): the items one by one,
                // not lost with it.
                single.extend(keys);
                continue;
            }
            values.push((ranges::key(imap), Bytes::from(encoded)));
        }
        for key in single {
            if let Some(value) = self.peek(&key).await {
                values.push((key, value));
            }
        }
        values.extend(then);
        tier.put_all(values);
    }

    /// The values of `keys` the second tier has (in order, as the tier holds them), kept in
    /// memory too: the range values holding column items first, in one round trip,
    /// everything in them going to memory; then, in a second, the items those lacked, one
    /// by one. A value that contradicts memory's for the same key (see [`Contradiction`])
    /// keeps nothing of the lookup.
    pub async fn shared_values(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>, Contradiction> {
        let mut found = vec![None; keys.len()];
        if self.shared().is_none() {
            return Ok(found);
        }
        // One key per range and column.
        let mut seen = std::collections::HashSet::new();
        let mut representatives: Vec<ImapKey> = Vec::new();
        for key in keys {
            let Key::Imap(imap) = key else { continue };
            let Some(column) = imap.column() else { continue };
            if seen.insert((column, ranges::start(imap.uid))) {
                representatives.push(imap.clone());
            }
        }
        if !representatives.is_empty() {
            let from_ranges = self.fill_ranges(&representatives).await?;
            for (key, found) in keys.iter().zip(found.iter_mut()) {
                if let Key::Imap(imap) = key {
                    *found = imap.column().and_then(|column| from_ranges.get(&(column, imap.uid)).cloned());
                }
            }
        }
        let rest: Vec<usize> = (0..keys.len()).filter(|&k| found[k].is_none()).collect();
        let asked: Vec<Key> = rest.iter().map(|&k| keys[k].clone()).collect();
        for (k, value) in rest.into_iter().zip(self.shared_items(&asked).await?) {
            found[k] = value;
        }
        Ok(found)
    }

    /// Brings the range values of the second tier that hold `representatives` (a column
    /// item's key per range) into memory, in one round trip; what they held, by column and
    /// UID. Every range is checked against memory before anything is kept: one that
    /// contradicts it keeps nothing (see [`Contradiction`]).
    pub async fn fill_ranges(
        &self,
        representatives: &[ImapKey],
    ) -> Result<HashMap<(ColumnKey, u32), Bytes>, Contradiction> {
        let mut held = HashMap::new();
        let Some(tier) = self.shared() else { return Ok(held) };
        let range_keys: Vec<Key> = representatives.iter().map(ranges::key).collect();
        let mut decoded: Vec<(ColumnKey, Arc<Column>, ranges::Entries)> = Vec::new();
        for (imap, value) in representatives.iter().zip(tier.get_many(&range_keys).await) {
            let (Some(value), Some(column_key)) = (value, imap.column()) else { continue };
            let Some(entries) = ranges::decode(&value, ranges::start(imap.uid)) else {
                tracing::debug!("a shared range value that does not decode; ignored");
                continue;
            };
            let column = self.column(&column_key).await;
            if let Some(uid) = column.contradicted_by(&entries) {
                return Err(Contradiction { uid });
            }
            decoded.push((column_key, column, entries));
        }
        let mut columns: Vec<(ColumnKey, Arc<Column>)> = Vec::new();
        for (column_key, column, entries) in decoded {
            let admitted: Vec<(u32, Bytes)> =
                entries.iter().filter(|(_, value)| self.admits(value.len())).cloned().collect();
            column.insert_absent(&admitted);
            for (uid, value) in entries {
                held.insert((column_key.clone(), uid), value);
            }
            if !columns.iter().any(|(key, _)| *key == column_key) {
                columns.push((column_key, column));
            }
        }
        for (column_key, column) in &columns {
            self.reweigh(column_key, column, 0).await;
        }
        Ok(held)
    }

    /// The single items of `keys` the second tier has (in order), kept in memory too; none
    /// kept when one contradicts memory's value for its key (see [`Contradiction`]).
    pub async fn shared_items(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>, Contradiction> {
        let mut found = Vec::with_capacity(keys.len());
        let Some(tier) = self.shared() else { return Ok(vec![None; keys.len()]) };
        for part in keys.chunks(SHARED_KEYS_PER_LOOKUP) {
            found.extend(tier.get_many(part).await);
        }
        for (key, value) in keys.iter().zip(&found) {
            let (Some(value), Some(kept)) = (value, self.peek(key).await) else { continue };
            if kept != *value {
                let uid = if let Key::Imap(imap) = key { imap.uid } else { 0 };
                return Err(Contradiction { uid });
            }
        }
        for (key, value) in keys.iter().zip(&found) {
            if let Some(value) = value {
                self.insert(key.clone(), value.clone()).await;
            }
        }
        Ok(found)
    }

    /// Concurrent misses on one key share one upstream load: the first session to miss
    /// loads, the others wait for its value.
    pub fn claim(self: &Arc<Self>, key: Key) -> Claim {
        let mut loading = self.loading.lock().expect("cache loading lock");
        if let Some(waiters) = loading.get_mut(&key) {
            let (tx, rx) = oneshot::channel();
            waiters.push(tx);
            return Claim::Wait(rx);
        }
        loading.insert(key.clone(), Vec::new());
        Claim::Load(LoadGuard { cache: self.clone(), key: Some(key) })
    }

    fn release(&self, key: &Key, value: Option<Bytes>) {
        let waiters = self.loading.lock().expect("cache loading lock").remove(key);
        for waiter in waiters.into_iter().flatten() {
            let _ = waiter.send(value.clone());
        }
    }

    pub fn max_entry_bytes(&self) -> usize {
        self.max_entry_bytes
    }

    /// The column `key`, created empty when there is none.
    pub async fn column(&self, key: &ColumnKey) -> Arc<Column> {
        let key = Key::Column(key.clone());
        match self.entries.get_with_by_ref(&key, async { Value::Column(Arc::default()) }).await {
            Value::Column(column) => column,
            Value::Item(_) => unreachable!("column keys only ever hold columns"),
        }
    }

    /// The column `key` when there is one.
    pub async fn existing_column(&self, key: &ColumnKey) -> Option<Arc<Column>> {
        match self.entries.get(&Key::Column(key.clone())).await? {
            Value::Column(column) => Some(column),
            Value::Item(_) => None,
        }
    }

    /// Tells the cache how much a column weighs now, when it has changed by more than
    /// `slack` bytes since the cache last weighed it (0 when a command ends or for a single
    /// store, [`REWEIGH_SLACK`] during a long fill).
    pub async fn reweigh(&self, key: &ColumnKey, column: &Arc<Column>, slack: usize) {
        if !column.reweigh_due(slack) {
            return;
        }
        // Only if it is still the cached column (not evicted, nor replaced after a forget).
        let current = self.existing_column(key).await;
        if current.is_some_and(|current| Arc::ptr_eq(&current, column)) {
            self.entries.insert(Key::Column(key.clone()), Value::Column(column.clone())).await;
        }
    }

    /// Looks `key` up, counting a hit or a miss for `kind`.
    pub async fn get(&self, key: &Key, kind: Kind) -> Option<Bytes> {
        let found = self.peek(key).await;
        self.count(kind, found.is_some());
        found
    }

    /// Counts a lookup made through a column the caller holds.
    pub fn count(&self, kind: Kind, hit: bool) {
        let counter = if hit { &self.stats.hits } else { &self.stats.misses };
        counter[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `key` is cached, without counting a lookup.
    pub async fn contains(&self, key: &Key) -> bool {
        match key {
            Key::Imap(imap) => match imap.column() {
                Some(column) => self.existing_column(&column).await.is_some_and(|c| c.contains(imap.uid)),
                None => self.entries.contains_key(key),
            },
            _ => self.entries.contains_key(key),
        }
    }

    /// The value of `key`, without counting a lookup (to compare, not to serve).
    pub async fn peek(&self, key: &Key) -> Option<Bytes> {
        if let Key::Imap(imap) = key {
            if let Some(column) = imap.column() {
                return self.existing_column(&column).await?.get(imap.uid);
            }
        }
        match self.entries.get(key).await? {
            Value::Item(bytes) => Some(bytes),
            Value::Column(_) => None,
        }
    }

    /// Counts a miss that needed no lookup (an item relayed the cold way and stored).
    pub fn missed(&self, kind: Kind) {
        self.stats.misses[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes back a value stored in error (a placeholder for an expunged message).
    pub async fn invalidate(&self, key: &Key) {
        if let Key::Imap(imap) = key {
            if let Some(column) = imap.column() {
                if let Some(column) = self.existing_column(&column).await {
                    column.remove(imap.uid);
                }
                return;
            }
        }
        self.entries.invalidate(key).await;
    }

    /// Forgets everything of one mailbox at one UIDVALIDITY of an account: its upstream
    /// changed an immutable item without a new UIDVALIDITY (a rebuilt mailbox).
    pub fn forget_mailbox(&self, account: &Account, mailbox: &Name, uid_validity: u32) {
        self.stats.stale.fetch_add(1, Ordering::Relaxed);
        if let Some(tier) = self.shared().cloned() {
            // The fleet's copies go too: the mailbox's generation goes up in Redis.
            let key = Key::Imap(ImapKey {
                account: account.clone(),
                mailbox: mailbox.clone(),
                uid_validity,
                uid: 0,
                item: Name::new(""),
                kind: Kind::Body,
            });
            tokio::spawn(async move { tier.forget_mailbox(&key).await });
        }
        // Sessions hold the columns they resolved for the rest of their command: emptied
        // now, so that none of them answers from what was just found stale.
        let of_mailbox =
            |k: &ColumnKey| k.uid_validity == uid_validity && &k.mailbox == mailbox && &k.account == account;
        for (key, value) in self.entries.iter() {
            if let (Key::Column(k), Value::Column(column)) = (key.as_ref(), value) {
                if of_mailbox(k) {
                    column.clear();
                }
            }
        }
        let (account, mailbox) = (account.clone(), mailbox.clone());
        let forgotten = self.entries.invalidate_entries_if(move |key, _| match key {
            Key::Imap(k) => k.uid_validity == uid_validity && k.mailbox == mailbox && k.account == account,
            Key::Column(k) => k.uid_validity == uid_validity && k.mailbox == mailbox && k.account == account,
            Key::Pop3(_) => false,
        });
        if let Err(e) = forgotten {
            crate::log_budget::error_limited!(error = %e, "could not forget a stale mailbox");
        }
    }

    /// Forgets one POP3 message of an account whose cached copy no longer matches the
    /// upstream's.
    pub async fn forget_pop3(&self, key: &Key) {
        self.stats.stale.fetch_add(1, Ordering::Relaxed);
        if let Some(tier) = self.shared() {
            tier.forget(key);
        }
        self.entries.invalidate(key).await;
    }

    /// Records that `bytes` were sent to a client from the cache.
    pub fn served(&self, bytes: usize) {
        self.stats.bytes_served.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Stores a complete value; values over `max_entry_bytes` are not kept.
    pub async fn insert(&self, key: Key, value: Bytes) {
        if !self.admits(value.len()) {
            return;
        }
        if let Key::Imap(imap) = &key {
            if let Some(column_key) = imap.column() {
                let column = self.column(&column_key).await;
                column.insert(imap.uid, &value);
                self.reweigh(&column_key, &column, 0).await;
                return;
            }
        }
        self.entries.insert(key, Value::Item(value)).await;
    }

    /// Whether a value of `len` bytes may be stored (counted as inserted, or as too large).
    pub fn admits(&self, len: usize) -> bool {
        if len > self.max_entry_bytes {
            self.stats.too_large.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.stats.inserted.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub async fn stats(&self) -> StatsSnapshot {
        self.entries.run_pending_tasks().await;
        let load = |a: &[AtomicU64; 4]| std::array::from_fn(|i| a[i].load(Ordering::Relaxed));
        StatsSnapshot {
            hits: load(&self.stats.hits),
            misses: load(&self.stats.misses),
            bytes_served: self.stats.bytes_served.load(Ordering::Relaxed),
            inserted: self.stats.inserted.load(Ordering::Relaxed),
            too_large: self.stats.too_large.load(Ordering::Relaxed),
            evicted_size: self.stats.evicted_size.load(Ordering::Relaxed),
            evicted_expired: self.stats.evicted_expired.load(Ordering::Relaxed),
            evicted_other: self.stats.evicted_other.load(Ordering::Relaxed),
            stale: self.stats.stale.load(Ordering::Relaxed),
            entries: self.entries.entry_count(),
            bytes: self.entries.weighted_size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{ByteSize, Span};

    fn config(max_bytes: u64, max_entry: u64) -> CacheConfig {
        CacheConfig {
            enabled: true,
            max_bytes: ByteSize(max_bytes),
            max_entry_bytes: ByteSize(max_entry),
            time_to_live: None,
            pop3_mark_seen: true,
            shared: Default::default(),
        }
    }

    fn pop3_key(user: &str, uidl: &str) -> Key {
        let account = Account::new("default", user, &LoginProof::upstream_accepted());
        Key::Pop3(Pop3Key { account, uidl: Name::new(uidl), size: 100 })
    }

    #[tokio::test]
    async fn accounts_never_share_entries() {
        let cache = MessageCache::new(&config(1 << 20, 1 << 16));
        cache.insert(pop3_key("alice", "u1"), Bytes::from_static(b"alice's mail")).await;
        assert_eq!(cache.get(&pop3_key("bob", "u1"), Kind::Pop3).await, None);
        assert_eq!(cache.get(&pop3_key("Alice", "u1"), Kind::Pop3).await, None);
        assert_eq!(cache.get(&pop3_key("alice", "u1"), Kind::Pop3).await.unwrap(), "alice's mail");
        let stats = cache.stats().await;
        assert_eq!((stats.hits(Kind::Pop3), stats.misses(Kind::Pop3)), (1, 2));
    }

    #[tokio::test]
    async fn oversized_values_are_not_kept_and_size_evicts() {
        let cache = MessageCache::new(&config(10_000, 4_000));
        cache.insert(pop3_key("a", "big"), Bytes::from(vec![0u8; 5_000])).await;
        assert_eq!(cache.get(&pop3_key("a", "big"), Kind::Pop3).await, None);
        for i in 0..10 {
            cache.insert(pop3_key("a", &i.to_string()), Bytes::from(vec![0u8; 3_000])).await;
        }
        let stats = cache.stats().await;
        assert_eq!(stats.too_large, 1);
        assert!(stats.bytes <= 10_000, "{stats:?}");
        assert!(stats.evicted_size >= 6, "{stats:?}");
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_load() {
        let cache = Arc::new(MessageCache::new(&config(1 << 20, 1 << 16)));
        let Claim::Load(guard) = cache.claim(pop3_key("a", "m")) else { panic!("first claim loads") };
        let Claim::Wait(first) = cache.claim(pop3_key("a", "m")) else { panic!("second claim waits") };
        let Claim::Wait(second) = cache.claim(pop3_key("a", "m")) else { panic!("third claim waits") };
        assert!(matches!(cache.claim(pop3_key("b", "m")), Claim::Load(_)), "other accounts load apart");
        guard.fill(Bytes::from_static(b"mail")).await;
        assert_eq!(first.await.unwrap().unwrap(), "mail");
        assert_eq!(second.await.unwrap().unwrap(), "mail");
        // A failed load releases the waiters with nothing, and the next miss loads again.
        let Claim::Load(guard) = cache.claim(pop3_key("a", "n")) else { panic!() };
        let Claim::Wait(waiter) = cache.claim(pop3_key("a", "n")) else { panic!() };
        drop(guard);
        assert_eq!(waiter.await.unwrap(), None);
        assert!(matches!(cache.claim(pop3_key("a", "n")), Claim::Load(_)));
    }

    #[tokio::test]
    async fn snapshot_columns_are_weighed_and_evicted_within_the_capacity() {
        let cache = Arc::new(MessageCache::new(&config(200_000, 1 << 16)));
        let account = Account::new("default", "alice", &LoginProof::upstream_accepted());
        // Forty mailboxes, 20 KB of headers each: 800 KB into a 200 KB cache.
        for mailbox in 0..40 {
            let key = ColumnKey {
                account: account.clone(),
                mailbox: Name::new(&format!("box{mailbox}")),
                uid_validity: 1,
                item: Name::new("BODY[HEADER]"),
            };
            let column = cache.column(&key).await;
            for uid in 1..=40 {
                column.insert(uid, &[b'h'; 500]);
            }
            cache.reweigh(&key, &column, 0).await;
        }
        let stats = cache.stats().await;
        assert!(stats.bytes <= 200_000, "{stats:?}");
        assert!(stats.bytes >= 100_000, "columns are weighed by their content: {stats:?}");
        assert!(stats.evicted_size >= 20, "{stats:?}");
    }

    #[tokio::test]
    async fn time_to_live_expires_entries() {
        let mut c = config(1 << 20, 1 << 16);
        c.time_to_live = Some(Span(std::time::Duration::from_millis(50)));
        let cache = MessageCache::new(&c);
        cache.insert(pop3_key("a", "x"), Bytes::from_static(b"x")).await;
        tokio::time::sleep(std::time::Duration::from_millis(120)).await;
        assert_eq!(cache.get(&pop3_key("a", "x"), Kind::Pop3).await, None);
    }
}
