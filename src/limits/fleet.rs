//! Limits shared by a fleet of mailgate instances through Redis (`limits.store = "redis"`).
//!
//! What is shared, and how:
//! - **Connection caps** are sorted sets of *leases*: one member per open connection (or
//!   logged-in session), scored with the time it expires. Taking a lease is one Lua script
//!   that drops expired members, compares each set's size with its cap and adds the member
//!   to all of them, or to none, atomically. Each instance refreshes the leases it holds
//!   every third of the TTL, so a crashed or cut-off instance's sessions stop counting
//!   within `lease_ttl`. Closing a session removes its member at once. Redis' own clock
//!   (`TIME`) scores the leases, so instances' clocks never need to agree.
//! - **Connection and login rates** per address are GCRA in Lua: one key per address
//!   holding its theoretical arrival time, expiring when the address has fully recovered.
//! - **Failed logins** per address and per user and address are counters that expire a
//!   window after the last failure. A login attempt takes a lease in the user and address's
//!   set of attempts in flight only while those failures plus the attempts in flight stay
//!   under the lockout (one script), so concurrent guesses on several instances cannot pass
//!   it before their failures are counted. Whether a password is
//!   a repeat is decided by each instance from its own memory: no form of a password is ever
//!   stored in Redis.
//! - **Download quotas**: each instance adds its users' bytes to a per-user counter, whose
//!   window starts at the first byte, about once a second, and reads back the fleet total.
//!
//! What stays per instance: the per-second byte rates and the command rate. Both act on
//! every write or command, where a Redis round trip would cost more than the limit saves;
//! an instance shapes the sockets it owns.
//!
//! Redis unreachable or slower than `timeout`: each check fails open (allowed; its lease is
//! added by the first refresh that reaches Redis again) or closed (refused, the client is
//! told to come back later) as configured; every failure is
//! counted in `mailgate_limit_store_errors_total` and logged, at most once per ten seconds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use redis::aio::ConnectionManager;
use redis::Script;
use tokio::sync::mpsc;

use crate::config::RedisConfig;

/// Takes a lease in every set of KEYS or in none. ARGV: member, TTL in ms, then one cap per
/// key. Returns 0, or the 1-based index of the first set that is full.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[i + 2]) then return i end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[1])
  redis.call('PEXPIRE', key, ttl)
end
return 0
";

/// A login attempt: takes a lease in the attempts-in-flight set KEYS[2] unless the failures
/// counted on KEYS[1] and the attempts in flight reach the lockout. ARGV: member, TTL in ms,
/// lockout. Returns 0, or 1 when locked out.
const ATTEMPT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local failures = tonumber(redis.call('GET', KEYS[1])) or 0
if failures + redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return 1 end
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[2], ttl)
return 0
";
/// Extends leases. ARGV: TTL in ms, then one member per key. A member that expired while
/// Redis could not be reached is added back: its session is still open.
const REFRESH: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
";

/// GCRA. ARGV: emission interval in µs, burst. Returns 1 when the event is allowed.
const RATE: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if tat - now > (burst - 1) * interval then return 0 end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000))
return 1
";

/// A failed login. KEYS: the address's counter, the user and address's counter. ARGV:
/// window in ms, 1 to count it (0: a repeated password). Returns the address's failures.
const FAILED: &str = r"
local window = tonumber(ARGV[1])
if ARGV[2] == '1' then
  redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], window)
  local n = redis.call('INCR', KEYS[1])
  redis.call('PEXPIRE', KEYS[1], window)
  return n
end
return tonumber(redis.call('GET', KEYS[1])) or 1
";

/// Adds bytes to a download counter whose window starts at its first byte. ARGV: bytes,
/// window in ms. Returns the total. Adding nothing only reads: it neither creates the
/// counter nor starts a window.
const DOWNLOADED: &str = r"
if ARGV[1] == '0' then return tonumber(redis.call('GET', KEYS[1])) or 0 end
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return total
";

/// Replaces a value only if it is still what the caller read (empty: absent): the
/// read-modify-write of a per-account history, atomic across a fleet without a lock.
const SWAP: &str = r"
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return {0, current} end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return {1, ''}
";

/// How often pending download bytes are added to the fleet's counters.
const QUOTA_SYNC: Duration = Duration::from_secs(1);

/// Leases refreshed per script call.
const REFRESH_BATCH: usize = 200;

#[derive(Debug, thiserror::Error)]
#[error("limits store: {0}")]
pub struct StoreError(String);

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError(e.to_string())
    }
}

pub struct Fleet {
    redis: ConnectionManager,
    prefix: String,
    /// This process, in lease members: `host-pid-start`, so an operator looking at Redis
    /// sees who holds what.
    instance: String,
    ttl: Duration,
    timeout: Duration,
    fail_open: bool,
    /// This instance's leases: their sets, and whether they count (the acquire succeeded,
    /// or failed open). Only those are refreshed: a refused or undecided one never is.
    held: Mutex<HashMap<u64, (Vec<String>, bool)>>,
    next: AtomicU64,
    released: mpsc::UnboundedSender<Release>,
    /// Releases sent to the background task and not done yet.
    releasing: AtomicU64,
    errors: IntCounterVec,
    quota: Mutex<QuotaSync>,
    scripts: Scripts,
}

struct Scripts {
    acquire: Script,
    attempt: Script,
    refresh: Script,
    rate: Script,
    failed: Script,
    downloaded: Script,
    swap: Script,
}

/// Download bytes not yet added to the fleet's counters, and the totals last read back.
#[derive(Default)]
struct QuotaSync {
    window: Duration,
    pending: HashMap<String, u64>,
    totals: HashMap<String, Known>,
}

/// A user's fleet-wide downloads as last read, and when this instance last asked about
/// them (a user nobody asks about for [`WATCH`] is forgotten).
struct Known {
    total: u64,
    watched: Instant,
}

/// How long a user's fleet total is kept up to date after this instance last looked.
const WATCH: Duration = Duration::from_secs(30);

/// A lease to remove from Redis: its sets, its member, and when it was given back (a
/// release older than the TTL is moot: the lease has expired).
type Release = (Vec<String>, String, Instant);

/// A lease on one or more sets; removed from Redis when dropped.
pub struct Lease {
    fleet: Arc<Fleet>,
    id: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let keys = self.fleet.held.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
        if let Some((keys, _)) = keys {
            self.fleet.releasing.fetch_add(1, Ordering::Relaxed);
            if self.fleet.released.send((keys, self.fleet.member(self.id), Instant::now())).is_err() {
                self.fleet.releasing.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// What a check against the store came to.
pub enum Verdict<T> {
    Allowed(T),
    /// Over a limit: the index of the first key that refused.
    Refused(usize),
    /// Redis could not answer and the store fails closed.
    Unavailable,
}

impl Fleet {
    /// Connects lazily: an unreachable Redis at start is the same as one lost later.
    pub fn new(config: &RedisConfig, errors: IntCounterVec) -> Result<Arc<Fleet>, StoreError> {
        let client = redis::Client::open(config.url.as_str())?;
        let settings = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout.0))
            .set_response_timeout(Some(config.timeout.0))
            .set_number_of_retries(1)
            .set_max_delay(config.timeout.0);
        let redis = ConnectionManager::new_lazy_with_config(client, settings)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let instance = format!("{}-{}-{:x}", host.trim(), std::process::id(), started.as_millis());
        let (released, releases) = mpsc::unbounded_channel();
        for operation in ["connect", "login", "auth", "quota", "refresh", "release", "insight"] {
            for outcome in ["allowed", "refused", "none"] {
                errors.with_label_values(&[operation, outcome]);
            }
        }
        let fleet = Arc::new(Fleet {
            redis,
            prefix: config.key_prefix.clone(),
            instance,
            ttl: config.lease_ttl.0,
            timeout: config.timeout.0,
            fail_open: config.on_error == crate::config::StoreFailure::Open,
            held: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            released,
            releasing: AtomicU64::new(0),
            errors,
            quota: Mutex::new(QuotaSync::default()),
            scripts: Scripts {
                acquire: Script::new(ACQUIRE),
                attempt: Script::new(ATTEMPT),
                refresh: Script::new(REFRESH),
                rate: Script::new(RATE),
                failed: Script::new(FAILED),
                downloaded: Script::new(DOWNLOADED),
                swap: Script::new(SWAP),
            },
        });
        tokio::spawn(keep(Arc::downgrade(&fleet), releases));
        Ok(fleet)
    }

    /// The full Redis key for `parts`.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn member(&self, id: u64) -> String {
        format!("{}:{id}", self.instance)
    }

    /// Runs `call` against Redis within the timeout.
    async fn call<T>(&self, call: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError(format!("no answer within {:?}", self.timeout))),
        }
    }

    /// Counts and logs (within the log budget) a failed store operation; the outcome
    /// follows `on_error` unless the operation decides nothing (`decides` false).
    fn failed(&self, operation: &str, error: &StoreError, decides: bool) -> bool {
        let allowed = self.fail_open;
        let outcome = match (decides, allowed) {
            (false, _) => "none",
            (true, true) => "allowed",
            (true, false) => "refused",
        };
        self.errors.with_label_values(&[operation, outcome]).inc();
        crate::log_budget::warn_limited!(%error, operation, outcome, "shared limits unavailable");
        allowed
    }

    /// Takes a lease in each of `sets` (key, cap), or reports the first one that is full.
    pub async fn acquire(self: &Arc<Self>, operation: &str, sets: &[(String, u32)]) -> Verdict<Lease> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut invocation = self.scripts.acquire.prepare_invoke();
        invocation.arg(self.member(id)).arg(self.ttl.as_millis() as u64);
        for (key, cap) in sets {
            invocation.key(key).arg(*cap);
        }
        self.lease(operation, id, sets.iter().map(|(k, _)| k.clone()).collect(), invocation).await
    }

    /// A login attempt's lease in `attempts_key` (the user and address's attempts in
    /// flight), unless its failures (`failures_key`) and the attempts in flight reach
    /// `lockout`: then `Refused(0)`.
    pub async fn attempt(self: &Arc<Self>, failures_key: &str, attempts_key: &str, lockout: u32) -> Verdict<Lease> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut invocation = self.scripts.attempt.prepare_invoke();
        invocation.key(failures_key).key(attempts_key);
        invocation.arg(self.member(id)).arg(self.ttl.as_millis() as u64).arg(lockout);
        self.lease("auth", id, vec![attempts_key.to_string()], invocation).await
    }

    /// Runs a script that adds lease `id` to `keys` (returning 0) or refuses (the 1-based
    /// index of what refused); the lease is held, refreshed and released like any other.
    async fn lease(
        self: &Arc<Self>,
        operation: &str,
        id: u64,
        keys: Vec<String>,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Verdict<Lease> {
        let mut redis = self.redis.clone();
        // Registered first, unconfirmed: a refresh running meanwhile leaves it alone, and a
        // cancelled acquire still releases it.
        self.held.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (keys, false));
        let lease = Lease { fleet: self.clone(), id };
        let confirm = || {
            if let Some(entry) = self.held.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&id) {
                entry.1 = true;
            }
        };
        match self.call(invocation.invoke_async::<usize>(&mut redis)).await {
            Ok(0) => {
                confirm();
                Verdict::Allowed(lease)
            }
            Ok(full) => {
                // Nothing was added; forget the lease without a release round trip.
                self.held.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                Verdict::Refused(full - 1)
            }
            Err(error) => {
                if self.failed(operation, &error, true) {
                    // Let in uncounted for now, but the lease is confirmed: the first
                    // refresh that reaches Redis again adds it, so the caps count every
                    // session that is still open.
                    confirm();
                    Verdict::Allowed(lease)
                } else {
                    // The script may or may not have run: the release cleans up either way.
                    drop(lease);
                    Verdict::Unavailable
                }
            }
        }
    }

    /// One event against a rate of `per_minute` (burst: a minute's worth) on `key`;
    /// `operation` names the check in the error counts.
    pub async fn rate(&self, operation: &str, key: &str, per_minute: u32) -> Verdict<()> {
        let interval = 60_000_000 / u64::from(per_minute.max(1));
        let mut redis = self.redis.clone();
        let mut invocation = self.scripts.rate.prepare_invoke();
        invocation.key(key).arg(interval).arg(per_minute);
        match self.call(invocation.invoke_async::<u8>(&mut redis)).await {
            Ok(1) => Verdict::Allowed(()),
            Ok(_) => Verdict::Refused(0),
            Err(error) if self.failed(operation, &error, true) => Verdict::Allowed(()),
            Err(_) => Verdict::Unavailable,
        }
    }

    /// Records a failure (`counted`: not a repeated password); the address's failures, or
    /// `None` when Redis cannot say.
    pub async fn record_failure(
        &self,
        address_key: &str,
        user_key: &str,
        counted: bool,
        window: Duration,
    ) -> Option<u32> {
        let mut redis = self.redis.clone();
        let mut invocation = self.scripts.failed.prepare_invoke();
        invocation.key(address_key).key(user_key).arg(window.as_millis() as u64).arg(u8::from(counted));
        match self.call(invocation.invoke_async::<u32>(&mut redis)).await {
            Ok(n) => Some(n),
            Err(error) => {
                self.failed("auth", &error, false);
                None
            }
        }
    }

    /// A successful login clears its counters.
    pub async fn clear(&self, keys: &[String]) {
        let mut redis = self.redis.clone();
        let del = redis::cmd("DEL").arg(keys).clone();
        if let Err(error) = self.call(del.query_async::<()>(&mut redis)).await {
            self.failed("auth", &error, false);
        }
    }

    /// Adds `n` bytes to `user`'s pending downloads (sent with the next sync).
    pub fn downloaded(&self, user: &str, n: u64, window: Duration) {
        let mut quota = self.quota.lock().unwrap_or_else(|p| p.into_inner());
        quota.window = window;
        *quota.pending.entry(user.to_string()).or_default() += n;
    }

    /// `user`'s downloads in the fleet's current window, as last read, plus what this
    /// instance has not sent yet. From now on the total is read back every second, so that
    /// other instances' downloads and the window's end are seen.
    pub fn downloads(&self, user: &str) -> u64 {
        let mut quota = self.quota.lock().unwrap_or_else(|p| p.into_inner());
        let pending = quota.pending.get(user).copied().unwrap_or(0);
        let known = quota.totals.entry(user.to_string()).or_insert(Known { total: 0, watched: Instant::now() });
        known.watched = Instant::now();
        known.total + pending
    }

    /// Sends pending download bytes and reads back the totals of the users this instance
    /// sends bytes for or has asked about lately; the others are forgotten, which keeps
    /// memory to the active users.
    async fn sync_quota(&self) {
        let (window, batch): (Duration, Vec<(String, u64)>) = {
            let mut quota = self.quota.lock().unwrap_or_else(|p| p.into_inner());
            quota.totals.retain(|_, known| known.watched.elapsed() < WATCH);
            let mut pending = std::mem::take(&mut quota.pending);
            for user in quota.totals.keys() {
                pending.entry(user.clone()).or_insert(0);
            }
            (quota.window, pending.into_iter().collect())
        };
        if batch.is_empty() || window.is_zero() {
            return;
        }
        let mut pipe = redis::pipe();
        // Loaded again each time: a restarted Redis has forgotten its scripts.
        pipe.load_script(&self.scripts.downloaded).ignore();
        for (user, n) in &batch {
            pipe.invoke_script(
                self.scripts.downloaded.key(self.key(&format!("dl:{user}"))).arg(*n).arg(window.as_millis() as u64),
            );
        }
        let mut redis = self.redis.clone();
        match self.call(pipe.query_async::<Vec<u64>>(&mut redis)).await {
            Ok(totals) => {
                let mut quota = self.quota.lock().unwrap_or_else(|p| p.into_inner());
                for ((user, _), total) in batch.into_iter().zip(totals) {
                    let known = quota.totals.entry(user).or_insert(Known { total, watched: Instant::now() });
                    known.total = total;
                }
            }
            Err(error) => {
                self.failed("quota", &error, false);
                // Kept for the next attempt: bytes are never dropped from the count.
                let mut quota = self.quota.lock().unwrap_or_else(|p| p.into_inner());
                for (user, n) in batch {
                    *quota.pending.entry(user).or_default() += n;
                }
            }
        }
    }

    /// Extends every lease this instance holds.
    async fn refresh(&self) {
        let held: Vec<(String, String)> = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            (held.iter().filter(|(_, (_, confirmed))| *confirmed))
                .flat_map(|(id, (keys, _))| keys.iter().map(|k| (k.clone(), self.member(*id))))
                .collect()
        };
        for batch in held.chunks(REFRESH_BATCH) {
            let mut invocation = self.scripts.refresh.prepare_invoke();
            invocation.arg(self.ttl.as_millis() as u64);
            for (key, member) in batch {
                invocation.key(key).arg(member);
            }
            let mut redis = self.redis.clone();
            if let Err(error) = self.call(invocation.invoke_async::<u64>(&mut redis)).await {
                self.failed("refresh", &error, false);
                return;
            }
        }
    }

    /// Removes given-back leases, all in one round trip; releases older than the TTL are
    /// skipped (those leases have expired already).
    async fn release(&self, batch: &[Release]) {
        let mut pipe = redis::pipe();
        for (keys, member, _) in batch.iter().filter(|(_, _, at)| at.elapsed() < self.ttl) {
            for key in keys {
                pipe.cmd("ZREM").arg(key).arg(member).ignore();
            }
        }
        if pipe.cmd_iter().next().is_none() {
            return;
        }
        let mut redis = self.redis.clone();
        if let Err(error) = self.call(pipe.query_async::<()>(&mut redis)).await {
            // The leases expire by themselves within their TTL.
            self.failed("release", &error, false);
        }
    }

    /// At shutdown, after the sessions have ended: waits (a few timeouts at most) until
    /// their leases are removed from Redis, so that the fleet sees the slots free at once
    /// rather than after `lease_ttl`.
    pub async fn close(&self) {
        let deadline = Instant::now() + self.timeout * 4;
        while self.releasing.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The text value at `key` (`None` when absent). For the support histories
    /// (`crate::insight`), which decide nothing: a failure is counted as `insight`.
    pub async fn text(&self, key: &str) -> Option<Result<String, StoreError>> {
        let mut redis = self.redis.clone();
        let get = redis::cmd("GET").arg(key).clone();
        match self.call(get.query_async::<Option<String>>(&mut redis)).await {
            Ok(value) => value.map(Ok),
            Err(error) => {
                self.failed("insight", &error, false);
                Some(Err(error))
            }
        }
    }

    /// Sets `key` to `new` (expiring after `ttl`) if it still holds `expected` (`""`:
    /// absent). `Ok(None)` when set; `Ok(Some(current))` when another writer came first.
    pub async fn swap_text(
        &self,
        key: &str,
        expected: &str,
        new: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        let mut redis = self.redis.clone();
        let mut invocation = self.scripts.swap.prepare_invoke();
        invocation.key(key).arg(expected).arg(new).arg(ttl.as_millis().max(1) as u64);
        match self.call(invocation.invoke_async::<(u8, String)>(&mut redis)).await {
            Ok((1, _)) => Ok(None),
            Ok((_, current)) => Ok(Some(current)),
            Err(error) => {
                self.failed("insight", &error, false);
                Err(error)
            }
        }
    }

    /// Pushes `value` at the head of the list `key`, kept to `cap` entries and expiring
    /// after `ttl`.
    pub async fn push_capped(&self, key: &str, value: &str, cap: usize, ttl: Duration) {
        let mut redis = self.redis.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("LPUSH")
            .arg(key)
            .arg(value)
            .ignore()
            .cmd("LTRIM")
            .arg(key)
            .arg(0)
            .arg(cap.max(1) - 1)
            .ignore()
            .cmd("PEXPIRE")
            .arg(key)
            .arg(ttl.as_millis().max(1) as u64)
            .ignore();
        if let Err(error) = self.call(pipe.query_async::<()>(&mut redis)).await {
            self.failed("insight", &error, false);
        }
    }

    /// The first `n` entries of the list `key` (empty when Redis cannot say: counted).
    pub async fn head(&self, key: &str, n: usize) -> Vec<String> {
        let mut redis = self.redis.clone();
        let range = redis::cmd("LRANGE").arg(key).arg(0).arg(n.max(1) - 1).clone();
        match self.call(range.query_async::<Vec<String>>(&mut redis)).await {
            Ok(values) => values,
            Err(error) => {
                self.failed("insight", &error, false);
                Vec::new()
            }
        }
    }

    /// Whether Redis answers a PING within the timeout (for `/readyz`).
    pub async fn ping(&self) -> bool {
        let mut redis = self.redis.clone();
        let ping = redis::cmd("PING");
        self.call(ping.query_async::<String>(&mut redis)).await.is_ok()
    }
}

/// The fleet's background work: releases as sessions end, lease refreshes every third of
/// the TTL, download counts every second. Ends when the [`Fleet`] is dropped.
async fn keep(fleet: std::sync::Weak<Fleet>, mut releases: mpsc::UnboundedReceiver<Release>) {
    let (mut refresh, mut quota) = {
        let Some(fleet) = fleet.upgrade() else { return };
        (tokio::time::interval(fleet.ttl / 3), tokio::time::interval(QUOTA_SYNC))
    };
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    quota.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            released = releases.recv() => {
                let Some(first) = released else { return };
                let Some(fleet) = fleet.upgrade() else { return };
                // Everything queued goes in one round trip: while Redis is slow or away,
                // the queue drains a whole batch per timeout instead of one release.
                let mut batch = vec![first];
                while let Ok(more) = releases.try_recv() {
                    batch.push(more);
                }
                fleet.release(&batch).await;
                fleet.releasing.fetch_sub(batch.len() as u64, Ordering::Relaxed);
            }
            _ = refresh.tick() => {
                let Some(fleet) = fleet.upgrade() else { return };
                fleet.refresh().await;
            }
            _ = quota.tick() => {
                let Some(fleet) = fleet.upgrade() else { return };
                fleet.sync_quota().await;
            }
        }
    }
}
