//! The message cache's second tier: Redis (standalone or Cluster), shared by every
//! instance of a fleet, so that a user's second device or a restarted instance finds what
//! another instance already fetched.
//!
//! - **Only immutable message data**, under the memory tier's keys and invariants (an
//!   account from a login proof, UIDVALIDITY in every IMAP key, POP3 by UIDL and size), and
//!   the two marks that guard them (the mailbox was filled from; its highest UIDNEXT).
//! - **Keys carry no name in clear**: `prefix` + 128 bits of HMAC-SHA256 of the key under a
//!   key derived from the configured secret.
//! - **Values are bound to their key**: a header (version, flags, the mailbox generation,
//!   the length, a hash of the key's name), the payload LZ4-compressed when that helps, and
//!   an AES-256-GCM tag: over header and payload (GMAC), or over the header with the payload
//!   encrypted (`encrypt`). A value that does not open (corrupt, foreign, moved under
//!   another key, too short) is a miss.
//! - **A forgotten mailbox is forgotten fleet-wide**: each (account, mailbox, UIDVALIDITY)
//!   has a generation counter in Redis, read in the same `MGET` as the items; values
//!   written under an older generation are misses. The memory tier forgets a rebuilt
//!   mailbox (invariant 10 of docs/ARCHITECTURE.md); this makes the other instances' copies
//!   in Redis unusable too.
//! - **Reads are batched and bounded**: one `MGET` per FETCH batch (a Cluster connection
//!   splits it by slot and node), within `timeout`; a failure is a miss, and the tier is
//!   skipped for a second after one (so a dead Redis costs one timeout a second, not one
//!   per command). State changes are logged once; while down, the writer task sends a
//!   PING a second, so the tier comes back by itself.
//! - **Writes never wait**: a bounded queue (of commands' writes), a writer task sending
//!   them in batches; a full queue drops (counted).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::{Histogram, IntCounterVec, IntGauge};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::mpsc;

use super::key::{ImapKey, Key, Pop3Key};
use super::Kind;
use crate::config::SharedCacheConfig;

const VERSION: u8 = 1;
const COMPRESSED: u8 = 1;
const SEALED: u8 = 2;
/// Version, flags, generation (8), length (4), the name's tag (16).
const HEADER: usize = 30;
const TAG: usize = 16;
/// Payloads shorter than this are not worth compressing.
const COMPRESS_FROM: usize = 256;
/// After a failed call, the tier is skipped for this long.
const PAUSE: Duration = Duration::from_secs(1);
/// The `result` labels of a lookup, and their indexes.
const RESULTS: [&str; 4] = ["hit", "miss", "error", "rejected"];
const HIT: usize = 0;
const MISS: usize = 1;
const ERROR: usize = 2;
const REJECTED: usize = 3;
/// Writes sent together by the writer task.
const WRITE_BATCH: usize = 256;

/// The tier's Prometheus families (registered by `metrics`).
#[derive(Clone)]
pub struct SharedMetrics {
    /// Item lookups by `kind` and `result` (`hit`, `miss`, `error`, `rejected`).
    pub requests: IntCounterVec,
    /// Writes by `result` (`written`, `dropped`, `too_large`, `error`).
    pub writes: IntCounterVec,
    /// Time of one lookup round trip.
    pub seconds: Histogram,
    /// Bytes found in Redis: what the upstream did not have to send.
    pub saved: prometheus::IntCounter,
    /// 1 while the last call succeeded.
    pub up: IntGauge,
}

/// A connection to Redis or to a Redis Cluster. Both are multiplexed: clones share one
/// connection per node, and commands sent concurrently are pipelined.
enum Link {
    Standalone(ConnectionManager),
    Cluster(Box<ClusterLink>),
}

/// A Cluster client and its connection, made at the first call (and again after a
/// failure to make one).
struct ClusterLink {
    client: redis::cluster::ClusterClient,
    connection: tokio::sync::Mutex<Option<ClusterConnection>>,
}

impl Link {
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Link::Standalone(manager) => cmd.query_async(&mut manager.clone()).await,
            Link::Cluster(cluster) => {
                let mut connected = {
                    let mut slot = cluster.connection.lock().await;
                    if slot.is_none() {
                        *slot = Some(cluster.client.get_async_connection().await?);
                    }
                    slot.clone().expect("just connected")
                };
                cmd.query_async(&mut connected).await
            }
        }
    }
}

impl Link {
    /// Sends `commands`: one pipeline to a standalone Redis (one write, one read), each to
    /// its node in a Cluster (a pipeline there must stay in one slot). How many failed.
    async fn send_all(&self, commands: Vec<redis::Cmd>) -> u64 {
        let count = commands.len() as u64;
        match self {
            Link::Standalone(manager) => {
                let mut pipe = redis::pipe();
                for command in commands {
                    pipe.add_command(command).ignore();
                }
                match pipe.query_async::<()>(&mut manager.clone()).await {
                    Ok(()) => 0,
                    Err(_) => count,
                }
            }
            Link::Cluster(_) => {
                let mut failed = 0;
                let sends = commands.iter().map(|command| self.query::<redis::Value>(command));
                for result in futures_util::future::join_all(sends).await {
                    failed += u64::from(result.is_err());
                }
                failed
            }
        }
    }
}

/// What the writer task sends.
enum Write {
    Put { key: String, generation: Option<String>, value: Bytes },
    Forget(String),
}

pub struct SharedTier {
    link: Arc<Link>,
    prefix: String,
    naming: hmac::Key,
    /// Authenticates every value, and encrypts it when `encrypt`.
    values: LessSafeKey,
    encrypt: bool,
    compress: bool,
    random: SystemRandom,
    max_item: usize,
    timeout: Duration,
    /// Each entry is one command's writes (or one write).
    writes: mpsc::Sender<Vec<Write>>,
    /// Generations to raise that Redis could not take yet (retried by the writer).
    bumps: Mutex<Vec<String>>,
    /// Until when the tier is skipped after a failure (ms since `epoch`).
    paused_until: AtomicU64,
    epoch: Instant,
    up: AtomicBool,
    /// `metrics.requests` by kind and result (as in [`RESULTS`]).
    requests: [[prometheus::IntCounter; 4]; 4],
    metrics: SharedMetrics,
}

impl std::fmt::Debug for SharedTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTier").field("prefix", &self.prefix).field("encrypt", &self.encrypt).finish()
    }
}

/// Why the tier could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("cache.shared.secret_file: {0}")]
    Secret(String),
    #[error("cache.shared: {0}")]
    Redis(#[from] redis::RedisError),
}

impl SharedTier {
    /// The tier of `config`, connecting lazily (a Redis down at start is one lost later),
    /// with its writer task.
    pub fn new(config: &SharedCacheConfig, metrics: SharedMetrics) -> Result<Arc<SharedTier>, SharedError> {
        let path = config.secret_file.as_ref().ok_or_else(|| SharedError::Secret("not set".into()))?;
        let secret = std::fs::read(path).map_err(|e| SharedError::Secret(format!("{}: {e}", path.display())))?;
        let secret = secret.trim_ascii();
        if secret.len() < 32 {
            return Err(SharedError::Secret("needs at least 32 bytes".into()));
        }
        let root = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derive = |purpose: &str| hmac::sign(&root, purpose.as_bytes());
        let naming = hmac::Key::new(hmac::HMAC_SHA256, derive("mailgate cache key names").as_ref());
        let values = derive("mailgate cache values");
        let values = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, values.as_ref()).expect("a 32-byte AES-256 key"));
        let timeout = config.timeout.0;
        let link = match &config.url {
            Some(url) => {
                let settings = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(timeout);
                Link::Standalone(ConnectionManager::new_lazy_with_config(redis::Client::open(url.as_str())?, settings)?)
            }
            None => {
                let client = redis::cluster::ClusterClientBuilder::new(config.cluster.clone())
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(1)
                    .build()?;
                Link::Cluster(Box::new(ClusterLink { client, connection: tokio::sync::Mutex::new(None) }))
            }
        };
        // Resolved once: a header sync counts tens of thousands of lookups.
        let requests =
            Kind::ALL.map(|kind| RESULTS.map(|result| metrics.requests.with_label_values(&[kind.name(), result])));
        for result in ["written", "dropped", "too_large", "error"] {
            metrics.writes.with_label_values(&[result]);
        }
        let (writes, queue) = mpsc::channel(config.write_queue.max(1));
        let tier = Arc::new(SharedTier {
            link: Arc::new(link),
            prefix: config.key_prefix.clone(),
            naming,
            values,
            encrypt: config.encrypt,
            compress: config.compress,
            random: SystemRandom::new(),
            max_item: config.max_item_bytes.as_usize(),
            timeout,
            writes,
            bumps: Mutex::new(Vec::new()),
            paused_until: AtomicU64::new(0),
            epoch: Instant::now(),
            up: AtomicBool::new(true),
            requests,
            metrics,
        });
        tier.metrics.up.set(1);
        tokio::spawn(write_behind(Arc::downgrade(&tier), queue, config.time_to_live.0));
        Ok(tier)
    }

    /// The items of `keys` found in Redis (in order; `None`: not there, not usable, or
    /// Redis could not answer in time). One round trip.
    pub async fn get_many(&self, keys: &[Key]) -> Vec<Option<Bytes>> {
        let mut found = vec![None; keys.len()];
        let named = self.names_all(keys);
        let mut generations: Vec<String> = named.iter().flatten().filter_map(|(_, g)| g.clone()).collect();
        generations.sort_unstable();
        generations.dedup();
        let items: Vec<&String> = named.iter().flatten().map(|(key, _)| key).collect();
        if items.is_empty() {
            return found;
        }
        if self.paused() {
            // Skipped after a failure: counted as what they are, lookups that got no answer.
            for key in keys.iter().filter(|k| !matches!(k, Key::Column(_))) {
                self.count(kind_of(key), ERROR);
            }
            return found;
        }
        let mut mget = redis::cmd("MGET");
        mget.arg(&generations).arg(&items);
        let started = Instant::now();
        let answer: Result<Vec<Option<Vec<u8>>>, String> = self.call(self.link.query(&mget)).await;
        self.metrics.seconds.observe(started.elapsed().as_secs_f64());
        let values = match answer {
            Ok(values) if values.len() == generations.len() + items.len() => values,
            Ok(_) => {
                self.failed("MGET answered the wrong number of values");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        let (generation_values, item_values) = values.split_at(values.len().min(generations.len()));
        let generation_of = |name: &Option<String>| -> u64 {
            let Some(name) = name else { return 0 };
            let at = generations.binary_search(name).expect("collected above");
            generation_values
                .get(at)
                .cloned()
                .flatten()
                .and_then(|v| String::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(0)
        };
        let mut values = item_values.iter();
        for (i, key) in keys.iter().enumerate() {
            let kind = kind_of(key);
            let Some((name, generation)) = &named[i] else { continue };
            let result = match values.next() {
                None => ERROR,
                Some(None) => MISS,
                Some(Some(raw)) => match self.open(name, generation_of(generation), raw) {
                    Some(value) => {
                        self.metrics.saved.inc_by(value.len() as u64);
                        found[i] = Some(value);
                        HIT
                    }
                    None => REJECTED,
                },
            };
            self.count(kind, result);
        }
        found
    }

    /// The largest value the tier stores (`max_item_bytes`): what an item it has can weigh.
    pub fn max_item_bytes(&self) -> usize {
        self.max_item
    }

    /// Queues `value` under `key` (dropped, counted, when the queue is full or the value
    /// too large): never waits.
    pub fn put(&self, key: &Key, value: Bytes) {
        self.put_all(vec![(key.clone(), value)]);
    }

    /// Queues the values of one command together: one place in the queue, in order (the
    /// mark that says a mailbox was filled comes after the items it covers).
    pub fn put_all(&self, values: Vec<(Key, Bytes)>) {
        let mut writes = Vec::with_capacity(values.len());
        let keys: Vec<Key> = values.iter().map(|(key, _)| key.clone()).collect();
        for ((_, value), named) in values.into_iter().zip(self.names_all(&keys)) {
            let Some((key, generation)) = named else { continue };
            if value.len() > self.max_item {
                self.metrics.writes.with_label_values(&["too_large"]).inc();
                continue;
            }
            writes.push(Write::Put { key, generation, value });
        }
        self.queue(writes);
    }

    /// Queues the removal of `key` (a POP3 message found changed).
    pub fn forget(&self, key: &Key) {
        let Some((key, _)) = self.names(key) else { return };
        self.queue(vec![Write::Forget(key)]);
    }

    fn queue(&self, writes: Vec<Write>) {
        let count = writes.len() as u64;
        if count > 0 && self.writes.try_send(writes).is_err() {
            self.metrics.writes.with_label_values(&["dropped"]).inc_by(count);
        }
    }

    /// Makes everything stored of the mailbox of `key` (at its UIDVALIDITY) unusable for
    /// every instance: its generation goes up. Retried until Redis takes it.
    pub async fn forget_mailbox(&self, key: &Key) {
        let Some((_, Some(generation))) = self.names(key) else { return };
        if self.bump(&generation).await.is_err() {
            self.bumps.lock().unwrap_or_else(|p| p.into_inner()).push(generation);
        }
    }

    async fn bump(&self, generation: &str) -> Result<(), String> {
        let mut incr = redis::cmd("INCR");
        incr.arg(generation);
        self.call(self.link.query::<i64>(&incr)).await.map(drop)
    }

    /// The Redis names of `key` and of its mailbox generation; `None` for what is never
    /// shared (snapshot columns as a whole).
    fn names(&self, key: &Key) -> Option<(String, Option<String>)> {
        match key {
            Key::Imap(k) => Some((self.name(&imap_id(k)), Some(self.name(&generation_id(k))))),
            Key::Pop3(k) => Some((self.name(&pop3_id(k)), None)),
            Key::Column(_) => None,
        }
    }

    /// [`names`](Self::names) of many keys, the generation's name computed once per
    /// mailbox (a batch is almost always of one).
    fn names_all(&self, keys: &[Key]) -> Vec<Option<(String, Option<String>)>> {
        let mut last: Option<(Vec<u8>, String)> = None;
        keys.iter()
            .map(|key| match key {
                Key::Imap(k) => {
                    let id = generation_id(k);
                    let generation = match &last {
                        Some((seen, name)) if *seen == id => name.clone(),
                        _ => {
                            let name = self.name(&id);
                            last = Some((id, name.clone()));
                            name
                        }
                    };
                    Some((self.name(&imap_id(k)), Some(generation)))
                }
                other => self.names(other),
            })
            .collect()
    }

    /// `prefix` and 128 bits of the keyed hash of `id`, in hex.
    fn name(&self, id: &[u8]) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digest = hmac::sign(&self.naming, id);
        let mut name = String::with_capacity(self.prefix.len() + 32);
        name.push_str(&self.prefix);
        for byte in &digest.as_ref()[..16] {
            name.push(HEX[usize::from(byte >> 4)] as char);
            name.push(HEX[usize::from(byte & 15)] as char);
        }
        name
    }

    /// The stored form of `value` under `name` at `generation`: header, payload (LZ4 when
    /// that helps; encrypted when sealing), the AES-256-GCM tag over the header (and the
    /// payload, as associated data when not sealing), and the nonce. GCM's GHASH runs at
    /// several GB/s with AES-NI and PCLMULQDQ: authenticating a body costs a fraction of an
    /// HMAC-SHA256 over it.
    fn seal(&self, name: &str, generation: u64, value: &[u8]) -> Vec<u8> {
        let compressed = (self.compress && value.len() >= COMPRESS_FROM && compresses(value))
            .then(|| lz4_flex::block::compress(value))
            .filter(|packed| packed.len() < value.len() - value.len() / 16);
        let mut flags = if compressed.is_some() { COMPRESSED } else { 0 };
        if self.encrypt {
            flags |= SEALED;
        }
        let payload = compressed.as_deref().unwrap_or(value);
        let mut out = Vec::with_capacity(HEADER + payload.len() + TAG + NONCE_LEN);
        out.push(VERSION);
        out.push(flags);
        out.extend_from_slice(&generation.to_be_bytes());
        out.extend_from_slice(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&name_tag(name));
        out.extend_from_slice(payload);
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).expect("the system's random source");
        let tag = if self.encrypt {
            let (header, payload) = out.split_at_mut(HEADER);
            self.values.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&*header), payload)
        } else {
            self.values.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&out[..]), &mut [])
        }
        .expect("AES-GCM takes any length a value has");
        out.extend_from_slice(tag.as_ref());
        out.extend_from_slice(&nonce);
        out
    }

    /// The value stored under `name`, if it opens: written at `generation` for this very
    /// name, authentic, of the length its header says.
    fn open(&self, name: &str, generation: u64, stored: &[u8]) -> Option<Bytes> {
        if stored.len() < HEADER + TAG + NONCE_LEN || stored[0] != VERSION {
            return None;
        }
        let flags = stored[1];
        let written_at = u64::from_be_bytes(stored[2..10].try_into().ok()?);
        let length = u32::from_be_bytes(stored[10..14].try_into().ok()?) as usize;
        let sealed = flags & SEALED != 0;
        if written_at != generation || sealed != self.encrypt || stored[14..HEADER] != name_tag(name) {
            return None;
        }
        let (body, nonce) = stored.split_at(stored.len() - NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let payload_end = body.len() - TAG;
        // Decrypted in a copy when sealed; else checked where it lies (no copy of a body
        // but the one the value is made of).
        let decrypted;
        let payload: &[u8] = if sealed {
            let mut in_out = body[HEADER..].to_vec();
            let plain = self.values.open_in_place(nonce, Aad::from(&body[..HEADER]), &mut in_out).ok()?.len();
            in_out.truncate(plain);
            decrypted = in_out;
            &decrypted
        } else {
            let mut tag = [0u8; TAG];
            tag.copy_from_slice(&body[payload_end..]);
            self.values.open_in_place(nonce, Aad::from(&body[..payload_end]), &mut tag).ok()?;
            &body[HEADER..payload_end]
        };
        let value = if flags & COMPRESSED != 0 {
            Bytes::from(lz4_flex::block::decompress(payload, length).ok()?)
        } else {
            Bytes::copy_from_slice(payload)
        };
        (value.len() == length).then_some(value)
    }

    /// Counts a lookup of `kind` with `result` (an index of [`RESULTS`]).
    fn count(&self, kind: Kind, result: usize) {
        self.requests[kind.index()][result].inc();
    }

    fn paused(&self) -> bool {
        (self.epoch.elapsed().as_millis() as u64) < self.paused_until.load(Ordering::Relaxed)
    }

    /// Runs `call` within the timeout; a failure pauses the tier and is logged once per
    /// state change.
    async fn call<T>(&self, call: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, String> {
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        };
        match &result {
            Ok(_) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("shared cache tier reachable again");
                    self.metrics.up.set(1);
                }
            }
            Err(e) => self.failed(e),
        }
        result
    }

    fn failed(&self, error: &str) {
        let until = self.epoch.elapsed().as_millis() as u64 + PAUSE.as_millis() as u64;
        self.paused_until.store(until, Ordering::Relaxed);
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(error, "shared cache tier unavailable: serving from memory and the upstream");
            self.metrics.up.set(0);
        }
    }
}

/// Whether `value` is worth compressing, judged on a sample: attachments (base64 of
/// compressed files) hardly shrink, and compressing megabytes of them for nothing would
/// cost a cold sync more CPU than its transfer.
fn compresses(value: &[u8]) -> bool {
    const SAMPLE: usize = 4096;
    if value.len() <= 2 * SAMPLE {
        return true;
    }
    // The middle: a message's start is headers, which always compress.
    let middle = value.len() / 2;
    let sample = &value[middle - SAMPLE / 2..middle + SAMPLE / 2];
    lz4_flex::block::compress(sample).len() < SAMPLE * 3 / 4
}

/// What binds a value to its name (in its header, authenticated with it).
fn name_tag(name: &str) -> [u8; 16] {
    let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    digest.as_ref()[..16].try_into().expect("SHA-256 is longer")
}

fn kind_of(key: &Key) -> Kind {
    match key {
        Key::Imap(k) => k.kind,
        Key::Pop3(_) => Kind::Pop3,
        Key::Column(_) => Kind::Structure,
    }
}

/// The parts of a key, separated by NUL (which none of them can hold).
fn joined(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&0u8)
}

fn imap_id(k: &ImapKey) -> Vec<u8> {
    let (validity, uid) = (k.uid_validity.to_be_bytes(), k.uid.to_be_bytes());
    joined(&[
        b"imap",
        k.account.text().as_bytes(),
        k.mailbox.as_str().as_bytes(),
        &validity,
        &uid,
        k.item.as_str().as_bytes(),
    ])
}

fn generation_id(k: &ImapKey) -> Vec<u8> {
    let validity = k.uid_validity.to_be_bytes();
    joined(&[b"generation", k.account.text().as_bytes(), k.mailbox.as_str().as_bytes(), &validity])
}

fn pop3_id(k: &Pop3Key) -> Vec<u8> {
    joined(&[b"pop3", k.account.text().as_bytes(), k.uidl.as_str().as_bytes(), &k.size.to_be_bytes()])
}

/// The writer task: sends queued writes in batches (each item's generation read first, in
/// one `MGET`), retries generations that could not be raised, until the tier is dropped.
async fn write_behind(tier: std::sync::Weak<SharedTier>, mut queue: mpsc::Receiver<Vec<Write>>, ttl: Duration) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut waiting: std::collections::VecDeque<Write> = std::collections::VecDeque::new();
    loop {
        if waiting.is_empty() {
            match tokio::time::timeout(PAUSE, queue.recv()).await {
                Ok(None) => return, // the tier is gone
                Ok(Some(writes)) => waiting.extend(writes),
                Err(_) => {}
            }
        }
        while waiting.len() < WRITE_BATCH {
            match queue.try_recv() {
                Ok(writes) => waiting.extend(writes),
                Err(_) => break,
            }
        }
        batch.extend(waiting.drain(..waiting.len().min(WRITE_BATCH)));
        let Some(tier) = tier.upgrade() else { return };
        let pending: Vec<String> = std::mem::take(&mut *tier.bumps.lock().unwrap_or_else(|p| p.into_inner()));
        for generation in pending {
            if tier.bump(&generation).await.is_err() {
                tier.bumps.lock().unwrap_or_else(|p| p.into_inner()).push(generation);
            }
        }
        if batch.is_empty() {
            // Recovers by itself: while down, a PING a second finds Redis back.
            if !tier.up.load(Ordering::Relaxed) && !tier.paused() {
                let _ = tier.call(tier.link.query::<String>(&redis::cmd("PING"))).await;
            }
            continue;
        }
        if tier.paused() {
            let dropped = batch.len() + waiting.len();
            tier.metrics.writes.with_label_values(&["error"]).inc_by(dropped as u64);
            batch.clear();
            waiting.clear();
            continue;
        }
        tier.send(std::mem::take(&mut batch), ttl).await;
    }
}

impl SharedTier {
    async fn send(self: &Arc<Self>, batch: Vec<Write>, ttl: Duration) {
        let mut generations: Vec<String> = (batch.iter())
            .filter_map(|w| match w {
                Write::Put { generation, .. } => generation.clone(),
                Write::Forget(_) => None,
            })
            .collect();
        generations.sort_unstable();
        generations.dedup();
        let current: Vec<Option<u64>> = if generations.is_empty() {
            Vec::new()
        } else {
            let mut mget = redis::cmd("MGET");
            mget.arg(&generations);
            match self.call(self.link.query::<Vec<Option<u64>>>(&mget)).await {
                Ok(values) => values,
                Err(_) => {
                    self.metrics.writes.with_label_values(&["error"]).inc_by(batch.len() as u64);
                    return;
                }
            }
        };
        let generation_of = |name: &Option<String>| {
            name.as_ref()
                .and_then(|name| current.get(generations.binary_search(name).ok()?).copied().flatten())
                .unwrap_or(0)
        };
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let count = batch.len() as u64;
        let generations: Vec<u64> = (batch.iter())
            .map(|w| match w {
                Write::Put { generation, .. } => generation_of(generation),
                Write::Forget(_) => 0,
            })
            .collect();
        // Compressing and sealing a batch of bodies is milliseconds of CPU: on the blocking
        // pool, not on a runtime worker whose sessions would wait behind it.
        let tier = self.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            (batch.into_iter().zip(generations))
                .map(|(write, generation)| match write {
                    Write::Put { key, value, .. } => {
                        let stored = tier.seal(&key, generation, &value);
                        let mut set = redis::cmd("SET");
                        set.arg(&key).arg(stored).arg("PX").arg(ttl_ms);
                        set
                    }
                    Write::Forget(key) => {
                        let mut del = redis::cmd("DEL");
                        del.arg(key);
                        del
                    }
                })
                .collect::<Vec<redis::Cmd>>()
        })
        .await;
        let Ok(commands) = sealed else { return };
        let sent = tokio::time::timeout(self.timeout.max(Duration::from_secs(1)), self.link.send_all(commands)).await;
        let failed = sent.unwrap_or(count);
        if failed > 0 {
            self.failed(&format!("{failed} of {count} writes failed"));
            self.metrics.writes.with_label_values(&["error"]).inc_by(failed);
        }
        self.metrics.writes.with_label_values(&["written"]).inc_by(count - failed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(encrypt: bool) -> Arc<SharedTier> {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef-test").unwrap();
        let config = SharedCacheConfig {
            enabled: true,
            url: Some("redis://127.0.0.1:1/0".into()),
            secret_file: Some(secret),
            encrypt,
            ..SharedCacheConfig::default()
        };
        let registry = prometheus::Registry::new();
        let metrics = crate::metrics::Metrics::shared_families(&registry);
        SharedTier::new(&config, metrics).unwrap()
    }

    #[tokio::test]
    async fn values_open_only_under_their_own_name_generation_and_key() {
        for encrypt in [false, true] {
            let tier = tier(encrypt);
            let body = Bytes::from("Subject: hello\r\n\r\n".repeat(40));
            let stored = tier.seal("k1", 3, &body);
            assert!(stored.len() < body.len(), "compressed");
            assert_eq!(tier.open("k1", 3, &stored).unwrap(), body);
            assert_eq!(tier.open("k2", 3, &stored), None, "moved under another key");
            assert_eq!(tier.open("k1", 4, &stored), None, "an older generation");
            let mut flipped = stored.clone();
            let last = flipped.len() - 20;
            flipped[last] ^= 1;
            assert_eq!(tier.open("k1", 3, &flipped), None, "corrupt");
            assert_eq!(tier.open("k1", 3, &stored[..10]), None, "short");
            let mut longer = stored.clone();
            longer[13] ^= 1;
            assert_eq!(tier.open("k1", 3, &longer), None, "wrong length");
            let small = tier.seal("k1", 0, b"RFC822.SIZE 42");
            assert_eq!(tier.open("k1", 0, &small).unwrap(), "RFC822.SIZE 42");
            // A value of the other mode (sealed vs bound) is not taken either.
            let other = self::tier(!encrypt);
            assert_eq!(other.open("k1", 3, &stored), None);
        }
    }

    #[tokio::test]
    async fn names_hide_users_and_mailboxes_and_differ_by_every_part() {
        let tier = tier(false);
        let proof = crate::cache::LoginProof::upstream_accepted();
        let key = |user: &str, mailbox: &str, uid: u32| {
            Key::Imap(ImapKey {
                account: crate::cache::Account::new("default", user, &proof),
                mailbox: crate::cache::Name::new(mailbox),
                uid_validity: 7,
                uid,
                item: crate::cache::Name::new("BODY[]"),
                kind: Kind::Body,
            })
        };
        let (name, generation) = tier.names(&key("alice", "INBOX", 1)).unwrap();
        assert!(name.starts_with("mailgate:cache:") && !name.contains("alice") && !name.contains("INBOX"), "{name}");
        assert_eq!(name.len(), "mailgate:cache:".len() + 32);
        assert_ne!(tier.names(&key("bob", "INBOX", 1)).unwrap().0, name);
        assert_ne!(tier.names(&key("alice", "Sent", 1)).unwrap().0, name);
        assert_ne!(tier.names(&key("alice", "INBOX", 2)).unwrap().0, name);
        assert_eq!(tier.names(&key("alice", "INBOX", 2)).unwrap().1, generation, "one generation per mailbox");
    }
}
