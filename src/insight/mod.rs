//! Support insight (`[insight]`): a short history per recently active account, the common
//! mailbox mistakes it shows (POP3 deleting what another device reads, POP3 keeping
//! everything while the maildrop grows, several POP3 clients, heavy resyncs, logins without
//! TLS, a nearly full mailbox), and the support view of one account
//! (`/debug/accounts/<user>`, [`view`]).
//!
//! The relays report what happened ([`Activity`], one per session); [`history`] decides,
//! sans-I/O. The histories live in this process's memory (bounded by `insight.memory`,
//! the least recently active account first out) or, with `limits.store = "redis"`, in
//! Redis with a TTL of `keep_for`, so that every instance of a fleet adds to, and detects
//! from, one history per account. Recording never waits on the client's path: a Redis
//! update runs in its own task (at most [`MAX_PENDING`] at once; more are dropped and
//! counted).
//!
//! Metrics carry no account: a detection is counted by kind only.

pub mod history;
pub mod view;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::InsightConfig;
use crate::limits::fleet::{self, Fleet};
pub use history::{Client, Event, History, Kind, Maildrop, Rules, Summary};

/// Redis updates in flight at once; beyond, an event is dropped (counted), never queued
/// without bound.
pub const MAX_PENDING: usize = 1000;
/// What the memory store spends on an entry besides its history and its key's text:
/// moka's bookkeeping (the key's `Arc`, the entry and its deque node, its slot in the hash
/// table) and the allocations around them, as measured in this module's tests.
const ENTRY_OVERHEAD: u32 = 320;
/// Attempts of one update against concurrent writers of the same account's history. Each
/// round of a race lets one writer through, so N sessions of one account ending at once
/// need up to N attempts: with 8, 2 of 48 updates were lost when 24 sessions ended
/// together on two instances (tests/insight_fleet.rs); with 32 and [`swap_pause`]
/// between them, none.
const SWAP_TRIES: usize = 32;

/// A short random pause after losing a compare-and-set race (0 to 1, 2, 4 ... 16 ms as
/// the losses add up), so that the writers of one account spread out instead of racing
/// again at once.
fn swap_pause(lost: usize) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_usize(lost);
    let ceiling = 1u64 << lost.min(4);
    Duration::from_micros(hasher.finish() % (ceiling * 1000 + 1))
}

/// A detection in the recent list (`/debug/detections`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recent {
    pub at: u64,
    pub account: String,
    pub detection: Kind,
    pub text: String,
}

/// The metric families insight counts into (registered by [`crate::metrics::Metrics`]).
#[derive(Clone)]
pub struct Counters {
    /// `mailgate_insight_detections_total{kind}`.
    pub detections: prometheus::IntCounterVec,
    /// `mailgate_insight_updates_total{result}`: `ok`, `dropped`, `error`.
    pub updates: prometheus::IntCounterVec,
    /// `mailgate_insight_accounts`: histories held in this process's memory.
    pub accounts: prometheus::IntGauge,
}

enum Store {
    Memory(moka::sync::Cache<String, Arc<Mutex<History>>>),
    Redis(Arc<Fleet>),
}

pub struct Insight {
    rules: RwLock<Rules>,
    keep_for: RwLock<Duration>,
    enabled: std::sync::atomic::AtomicBool,
    recent_cap: AtomicUsize,
    store: Store,
    /// The recent detections of this process (memory store only; Redis keeps the fleet's).
    recent: Mutex<VecDeque<Recent>>,
    pending: AtomicUsize,
    counters: Counters,
}

fn rules(config: &InsightConfig) -> Rules {
    Rules {
        window: config.window.0.as_secs(),
        keep_for: config.keep_for.0.as_secs(),
        growth_polls: config.growth_polls as usize,
        resyncs_per_day: config.resyncs_per_day as usize,
        repeat_after: config.repeat_after.0.as_secs(),
        quota_warn_at: config.quota_warn_at,
    }
}

impl Insight {
    /// Histories in Redis when the limits are shared there (`fleet`), else in memory.
    pub fn new(config: &InsightConfig, fleet: Option<Arc<Fleet>>, counters: Counters) -> Arc<Insight> {
        let store = match fleet {
            Some(fleet) => Store::Redis(fleet),
            None => Store::Memory(
                moka::sync::Cache::builder()
                    .max_capacity(config.memory.0)
                    .weigher(|account: &String, history: &Arc<Mutex<History>>| {
                        let weight = history.lock().map_or(0, |h| h.weight());
                        weight.saturating_add(account.capacity() as u32 + ENTRY_OVERHEAD)
                    })
                    .time_to_idle(config.keep_for.0)
                    .build(),
            ),
        };
        Arc::new(Insight {
            rules: RwLock::new(rules(config)),
            keep_for: RwLock::new(config.keep_for.0),
            enabled: config.history.into(),
            recent_cap: AtomicUsize::new(config.recent_detections as usize),
            store,
            recent: Mutex::new(VecDeque::new()),
            pending: AtomicUsize::new(0),
            counters,
        })
    }

    /// A reload's new settings (the memory bound and the store stay as started).
    pub fn configure(&self, config: &InsightConfig) {
        *self.rules.write().unwrap_or_else(|p| p.into_inner()) = rules(config);
        *self.keep_for.write().unwrap_or_else(|p| p.into_inner()) = config.keep_for.0;
        self.enabled.store(config.history, Ordering::Relaxed);
        self.recent_cap.store(config.recent_detections as usize, Ordering::Relaxed);
    }

    /// How long a history lasts (`keep_for`).
    pub fn keep_for(&self) -> Duration {
        *self.keep_for.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// A session of `account` logged in: recorded now, and the session's [`Activity`] to
    /// report its end with. `None` while histories are off.
    pub fn began(self: &Arc<Self>, account: &str, session: &str, client: Client) -> Option<Box<Activity>> {
        if !self.enabled() {
            return None;
        }
        self.record(account, Event::Login { session: session.to_string(), client: client.clone() });
        Some(Box::new(Activity {
            insight: self.clone(),
            account: account.to_string(),
            session: session.to_string(),
            client,
            summary: Summary::default(),
        }))
    }

    /// Records `event` for `account`: at once in memory, in a task of its own for Redis.
    pub fn record(self: &Arc<Self>, account: &str, event: Event) {
        if !self.enabled() {
            return;
        }
        match &self.store {
            Store::Memory(_) => {
                let found = self.apply_in_memory(account, event, crate::units::unix_now());
                self.fired(account, found);
            }
            Store::Redis(_) => {
                if self.pending.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING {
                    self.pending.fetch_sub(1, Ordering::Relaxed);
                    self.counters.updates.with_label_values(&["dropped"]).inc();
                    return;
                }
                let (insight, account) = (self.clone(), account.to_string());
                tokio::spawn(async move {
                    let found = insight.apply_in_redis(&account, event, crate::units::unix_now()).await;
                    insight.fired(&account, found);
                    insight.pending.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
    }

    fn current_rules(&self) -> Rules {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn apply_in_memory(&self, account: &str, event: Event, now: u64) -> Vec<history::Detection> {
        let Store::Memory(histories) = &self.store else { return Vec::new() };
        let entry = histories.get_with_by_ref(account, || Arc::new(Mutex::new(History::default())));
        let found = entry.lock().unwrap_or_else(|p| p.into_inner()).apply(event, now, &self.current_rules());
        // Inserted again so that the entry is weighed as it is now.
        histories.insert(account.to_string(), entry);
        self.counters.updates.with_label_values(&["ok"]).inc();
        self.counters.accounts.set(histories.entry_count() as i64);
        found
    }

    fn key(fleet: &Fleet, account: &str) -> String {
        fleet.key(&format!("insight:account:{account}"))
    }

    async fn apply_in_redis(&self, account: &str, event: Event, now: u64) -> Vec<history::Detection> {
        let Store::Redis(fleet) = &self.store else { return Vec::new() };
        let key = Self::key(fleet, account);
        let ttl = *self.keep_for.read().unwrap_or_else(|p| p.into_inner());
        let mut current = match fleet.text(&key).await {
            None => String::new(),
            Some(Ok(text)) => text,
            Some(Err(_)) => {
                self.counters.updates.with_label_values(&["error"]).inc();
                return Vec::new();
            }
        };
        for lost in 0..SWAP_TRIES {
            // A value that does not read (another version's, damaged) starts afresh.
            let mut history: History = serde_json::from_str(&current).unwrap_or_default();
            let found = history.apply(event.clone(), now, &self.current_rules());
            let Ok(new) = serde_json::to_string(&history) else { break };
            match fleet.swap_text(&key, &current, &new, ttl).await {
                Ok(None) => {
                    self.counters.updates.with_label_values(&["ok"]).inc();
                    return found;
                }
                Ok(Some(newer)) => {
                    current = newer;
                    tokio::time::sleep(swap_pause(lost)).await;
                }
                Err(_) => break,
            }
        }
        self.counters.updates.with_label_values(&["error"]).inc();
        Vec::new()
    }

    /// Detections that fired for `account`: counted, logged, listed.
    fn fired(self: &Arc<Self>, account: &str, found: Vec<history::Detection>) {
        for detection in found {
            self.counters.detections.with_label_values(&[detection.kind.label()]).inc();
            tracing::info!(account, detection = detection.kind.label(), "insight: {}", detection.text);
            let recent = Recent {
                at: crate::units::unix_now(),
                account: account.to_string(),
                detection: detection.kind,
                text: detection.text,
            };
            let cap = self.recent_cap.load(Ordering::Relaxed);
            match &self.store {
                Store::Memory(_) => {
                    let mut list = self.recent.lock().unwrap_or_else(|p| p.into_inner());
                    list.push_front(recent);
                    list.truncate(cap);
                }
                Store::Redis(fleet) => {
                    let (fleet, ttl) = (fleet.clone(), *self.keep_for.read().unwrap_or_else(|p| p.into_inner()));
                    let Ok(json) = serde_json::to_string(&recent) else { continue };
                    tokio::spawn(async move {
                        fleet.push_capped(&fleet.key("insight:detections"), &json, cap, ttl).await;
                    });
                }
            }
        }
    }

    /// `account`'s history, if any (the memory tier, or Redis); `Err` when Redis cannot
    /// say (an outage is not "no activity").
    pub async fn history(&self, account: &str) -> Result<Option<History>, fleet::StoreError> {
        match &self.store {
            Store::Memory(histories) => {
                Ok(histories.get(account).map(|h| h.lock().unwrap_or_else(|p| p.into_inner()).clone()))
            }
            Store::Redis(fleet) => match fleet.text(&Self::key(fleet, account)).await {
                None => Ok(None),
                // A value this version cannot read is no history it can show.
                Some(Ok(text)) => Ok(serde_json::from_str(&text).ok()),
                Some(Err(error)) => Err(error),
            },
        }
    }

    /// The most recent detections, newest first (at most `n`).
    pub async fn recent(&self, n: usize) -> Vec<Recent> {
        match &self.store {
            Store::Memory(_) => self.recent.lock().unwrap_or_else(|p| p.into_inner()).iter().take(n).cloned().collect(),
            Store::Redis(fleet) => (fleet.head(&fleet.key("insight:detections"), n).await.iter())
                .filter_map(|json| serde_json::from_str(json).ok())
                .collect(),
        }
    }

    /// Histories held in this process's memory (0 with Redis).
    pub fn accounts_in_memory(&self) -> u64 {
        match &self.store {
            Store::Memory(histories) => {
                histories.run_pending_tasks();
                histories.entry_count()
            }
            Store::Redis(_) => 0,
        }
    }

    /// Redis updates not finished yet (tests wait for them).
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

/// One logged-in session as its history sees it: created at login
/// ([`Insight::began`]), told what the relay learns, reported when the session ends
/// (dropped: a relay that ends any way reports).
pub struct Activity {
    insight: Arc<Insight>,
    account: String,
    session: String,
    client: Client,
    /// What the relay counted so far.
    pub summary: Summary,
}

impl Activity {
    /// The client said what it is (IMAP `ID` after login).
    pub fn identified(&mut self, software: &crate::metrics::clients::Software) {
        self.client.software = Some(software_name(software));
        let event = Event::Identified { session: self.session.clone(), client: self.client.clone() };
        self.insight.record(&self.account, event);
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        let event = Event::Ended {
            session: std::mem::take(&mut self.session),
            client: std::mem::take(&mut self.client),
            summary: std::mem::take(&mut self.summary),
        };
        self.insight.record(&self.account, event);
    }
}

/// `Thunderbird 128.3`: an `ID`'s name and version as the history names the software.
pub fn software_name(software: &crate::metrics::clients::Software) -> String {
    match software.version.as_str() {
        "" => software.name.clone(),
        version => format!("{} {version}", software.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's resident memory (`VmRSS` of /proc/self/status), in bytes.
    fn rss() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    fn memory_insight(memory: u64) -> Arc<Insight> {
        let config = InsightConfig { memory: crate::units::ByteSize(memory), ..InsightConfig::default() };
        // The counters need registered families, as the process's Metrics registers them.
        let counters = crate::metrics::Metrics::insight_families(&prometheus::Registry::new());
        Insight::new(&config, None, counters)
    }

    fn client(i: u64, software: Option<String>) -> Client {
        Client {
            protocol: if software.is_some() { "imap" } else { "pop3" }.into(),
            software,
            network: format!("10.{}.{}.0/24", (i >> 8) & 255, i & 255),
            listener: "imaps-with-a-long-listener-name".into(),
            tls: Some("TLSv1.3".into()),
        }
    }

    /// Many accounts through a memory store of 4 MiB: what it holds is weighed within the
    /// bound, and the process grows by a bounded multiple of it, however many accounts
    /// came through.
    /// Set in the process that measures (see below).
    const MEASURING: &str = "MAILGATE_INSIGHT_MEASURE";

    #[test]
    fn the_memory_store_stays_within_its_bound_with_many_accounts() {
        // Resident memory is the whole process's: measured in a process of its own (this
        // test alone), not among other tests running in parallel threads.
        if std::env::var_os(MEASURING).is_none() {
            let name = "insight::tests::the_memory_store_stays_within_its_bound_with_many_accounts";
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([name, "--exact", "--nocapture", "--test-threads=1"])
                .env(MEASURING, "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            eprintln!("{text}");
            assert!(out.status.success() && text.contains("1 passed"), "the measuring process failed");
            return;
        }
        const BOUND: u64 = 4 << 20;
        const ACCOUNTS: u64 = 200_000;
        let insight = memory_insight(BOUND);
        let Store::Memory(histories) = &insight.store else { panic!("not a memory store") };
        let before = rss();
        // An ID's name and version are each cut to 64 characters (FIELD_CHARS): the longest
        // software a history can hold.
        let long = format!("{} {}", "N".repeat(64), "7".repeat(64));
        let mut peak_weight = 0;
        for i in 0..ACCOUNTS {
            let account = format!("user{i:07}.with.a.longish.local.part@example-provider.org");
            let imap = client(i, Some(format!("{long}{i}")));
            let pop3 = client(i + 1, None);
            insight.record(&account, Event::Login { session: format!("imap-{i}"), client: imap.clone() });
            insight.record(&account, Event::Login { session: format!("pop3-{i}"), client: pop3.clone() });
            let summary = Summary {
                bytes: 10_000,
                messages: 3,
                deleted: 3,
                maildrop: Some(Maildrop { messages: 3, octets: 9_000 }),
                ..Summary::default()
            };
            insight.record(&account, Event::Ended { session: format!("pop3-{i}"), client: pop3, summary });
            insight.record(
                &account,
                Event::Ended { session: format!("imap-{i}"), client: imap, summary: Summary::default() },
            );
            insight.record(&account, Event::Quota { used_kib: 95, limit_kib: 100 });
            if i % 10_000 == 0 {
                histories.run_pending_tasks();
                peak_weight = peak_weight.max(histories.weighted_size());
            }
        }
        histories.run_pending_tasks();
        let weight = histories.weighted_size();
        let held = histories.entry_count();
        let after = rss();
        let growth = after.saturating_sub(before);
        // One account's history as weighed, and as the process pays for it.
        let sample = histories.iter().next().map(|(_, h)| h.lock().unwrap().weight()).unwrap_or_default();
        eprintln!(
            "{ACCOUNTS} accounts through a {BOUND}-byte store: {held} held, weighted size {weight} (peak sampled \
             {peak_weight}), one history weighs {sample}; RSS {before} -> {after} (+{growth}), {} bytes per held account",
            growth / held.max(1)
        );
        assert!(weight <= BOUND, "weighted size {weight} over the bound {BOUND}");
        assert!(peak_weight <= BOUND, "weighted size {peak_weight} over the bound {BOUND}");
        assert!(held > 500 && held < ACCOUNTS, "{held} accounts held");
        assert_eq!(insight.accounts_in_memory(), held);
        // Every detection fired at least once per account: the counters are the registered ones.
        assert!(insight.counters.detections.with_label_values(&["pop3_deletes_shared"]).get() >= ACCOUNTS);
        assert_eq!(insight.counters.updates.with_label_values(&["ok"]).get(), ACCOUNTS * 5);
        // The bound is weighed, not measured: allocator overhead, moka's own per-entry
        // bookkeeping (hash table, deques, timers: a few hundred bytes per entry) and the
        // frequency sketch come on top, and glibc keeps freed memory of the evicted
        // accounts for reuse. A weigher that undercounted by an order of magnitude would
        // take more than 16 times the bound; 64 MiB for a 4 MiB bound leaves that margin
        // and still fails a store that grows with the accounts seen (200,000 histories of
        // about 2 KB each would take some 400 MB).
        assert!(growth < 64 << 20, "RSS grew by {growth} bytes for a {BOUND}-byte bound");
        // And the weigher is honest: what the process pays per held account is within
        // twice what it is weighed (a weigher that counted a third of it did not pass).
        assert!(growth / held <= 2 * weight / held, "{} bytes per account weighed {}", growth / held, weight / held);
    }
}
