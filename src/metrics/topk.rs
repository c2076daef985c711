//! The heaviest accounts by sync cost over a sliding window, in bounded memory.
//!
//! Account names are unbounded and personal, so they never become metric labels: a label per
//! user would create a time series per user, forever, and put user names into every scrape
//! (see `docs/METRICS.md`). The metric families carry totals only; the per-account view lives
//! in the session-end log line and here, in [`TopAccounts`], which answers "which accounts cost
//! the most lately?" for `GET /debug/top-accounts`.
//!
//! Each session's [`Cost`] is recorded once, at session end. The window is split into rotating
//! buckets (e.g. 6 buckets of 10 minutes for one hour); each bucket is a space-saving summary
//! (Metwally, Agrawal and El Abbadi, "Efficient Computation of Frequent and Top-k Elements in
//! Data Streams", 2005) of at most `capacity` accounts. When a full bucket meets a new account,
//! the lightest entry is replaced and its count becomes the newcomer's `error`: the most the
//! newcomer can have weighed in that bucket before it was tracked. Any heavy hitter whose weight
//! exceeds the lightest count is guaranteed to be tracked, so the top of the list is exact under
//! skewed load, and memory is `capacity × buckets` entries whatever the number of accounts.
//!
//! A bucket is dropped once it lies entirely outside the window, so the oldest part of the window
//! fades out a bucket at a time: cost recorded more than `window` ago never counts, and cost
//! recorded less than `window − window / buckets` ago always does.

use std::collections::HashMap;
use std::ops::AddAssign;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What one session (or a sum of sessions) cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Cost {
    /// Bytes sent to the client.
    pub client_bytes: u64,
    /// Bytes received from the upstream.
    pub upstream_bytes: u64,
    /// Commands relayed.
    pub commands: u64,
    /// Messages fetched.
    pub messages: u64,
}

impl Cost {
    /// What "heaviest" ranks by: the bytes the session moved, `client_bytes + upstream_bytes`
    /// (saturating). Commands and messages are reported alongside but do not rank: bytes are what
    /// a heavy sync costs in bandwidth and upstream load, and they already grow with both.
    pub fn weight(&self) -> u64 {
        self.client_bytes.saturating_add(self.upstream_bytes)
    }
}

/// Field-wise saturating sum.
impl AddAssign for Cost {
    fn add_assign(&mut self, other: Cost) {
        self.client_bytes = self.client_bytes.saturating_add(other.client_bytes);
        self.upstream_bytes = self.upstream_bytes.saturating_add(other.upstream_bytes);
        self.commands = self.commands.saturating_add(other.commands);
        self.messages = self.messages.saturating_add(other.messages);
    }
}

/// One account of [`TopAccounts::top`].
///
/// `cost` is what was recorded for the account while it was tracked, summed over the window's
/// buckets: every field is a lower bound of the truth, never another account's cost. `error`
/// bounds what may be missing, in weight units: the account's true weight over the window lies
/// in `cost.weight() ..= cost.weight() + error`. The error is zero for an account that was
/// tracked from its first record in every bucket that saw it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Heavy {
    pub account: String,
    pub cost: Cost,
    pub error: u64,
}

/// The heaviest accounts over a sliding window; see the module documentation.
///
/// Shared across tasks (`&self` methods behind a `Mutex`); `record` is O(log capacity) under the
/// lock, `top` copies the live entries under the lock and ranks them outside it.
pub struct TopAccounts {
    capacity: usize,
    /// The length of one bucket in nanoseconds, at least 1.
    span: u128,
    state: Mutex<State>,
}

impl TopAccounts {
    /// `capacity`: accounts tracked per window bucket (memory bound); `window`: how far back
    /// "recent" goes, split into `buckets` rotating buckets (e.g. 6 buckets of 10 minutes for a
    /// 1-hour window). A zero `capacity` or `buckets` is taken as 1, and a bucket is at least
    /// one nanosecond long.
    pub fn new(capacity: usize, window: Duration, buckets: usize) -> Self {
        let buckets = buckets.max(1);
        TopAccounts {
            capacity: capacity.max(1),
            span: (window.as_nanos() / buckets as u128).max(1),
            state: Mutex::new(State {
                origin: None,
                head: 0,
                buckets: (0..buckets).map(|_| Bucket::default()).collect(),
            }),
        }
    }

    /// Adds `cost` for `account` at time `now` (passed in, so that tests need no clock).
    ///
    /// Times may arrive slightly out of order from concurrent sessions; a record older than the
    /// window, relative to the newest time seen, is ignored.
    pub fn record(&self, account: &str, cost: Cost, now: Instant) {
        let mut state = self.state.lock().expect("top accounts lock");
        let epoch = state.advance(now, self.span);
        if !state.live(epoch) {
            return;
        }
        let slots = state.buckets.len() as u64;
        let bucket = &mut state.buckets[(epoch % slots) as usize];
        if bucket.epoch != epoch {
            // A live epoch's slot can only hold an older, dropped epoch (or nothing yet).
            bucket.reset(epoch);
        }
        bucket.add(account, cost, self.capacity);
    }

    /// The `n` heaviest accounts over the window ending at `now` (or at the newest time recorded,
    /// if later), heaviest first by the upper bound `cost.weight() + error`, ties by name.
    pub fn top(&self, n: usize, now: Instant) -> Vec<Heavy> {
        if n == 0 {
            return Vec::new();
        }
        // Copy out under the lock (cheap: the names are shared), rank outside it.
        let mut floors = Vec::new();
        let mut entries = Vec::new();
        {
            let mut state = self.state.lock().expect("top accounts lock");
            state.advance(now, self.span);
            let head = state.head;
            let slots = state.buckets.len() as u64;
            for bucket in state.buckets.iter().filter(|b| live_at(b.epoch, head, slots) && !b.slots.is_empty()) {
                for slot in &bucket.slots {
                    entries.push((slot.account.clone(), slot.cost, slot.error, floors.len()));
                }
                floors.push(bucket.floor());
            }
        }
        if entries.is_empty() {
            return Vec::new();
        }
        // An account absent from a bucket weighed at most that bucket's floor there.
        let all_floors = floors.iter().fold(0u64, |sum, &f| sum.saturating_add(f));
        let mut sums: HashMap<Arc<str>, (Cost, u64, u64)> = HashMap::new();
        for (account, cost, error, bucket) in entries {
            let (sum, errors, covered) = sums.entry(account).or_default();
            *sum += cost;
            *errors = errors.saturating_add(error);
            *covered = covered.saturating_add(floors[bucket]);
        }
        let mut ranked: Vec<(u64, Heavy)> = sums
            .into_iter()
            .map(|(account, (cost, errors, covered))| {
                let error = errors.saturating_add(all_floors - covered);
                let heavy = Heavy { account: account.to_string(), cost, error };
                (cost.weight().saturating_add(error), heavy)
            })
            .collect();
        ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.account.cmp(&b.1.account)));
        ranked.truncate(n);
        ranked.into_iter().map(|(_, heavy)| heavy).collect()
    }

    /// The entries held, over all buckets: at most `capacity × buckets`.
    pub fn tracked(&self) -> usize {
        let state = self.state.lock().expect("top accounts lock");
        state.buckets.iter().map(|b| b.slots.len()).sum()
    }
}

/// Whether a bucket of `epoch` still lies (partly) in the window whose newest bucket is `head`.
fn live_at(epoch: u64, head: u64, slots: u64) -> bool {
    epoch.saturating_add(slots) > head
}

struct State {
    /// The start of epoch 0: the first time seen.
    origin: Option<Instant>,
    /// The newest epoch seen.
    head: u64,
    /// Epoch `e` lives in `buckets[e % buckets.len()]`.
    buckets: Vec<Bucket>,
}

impl State {
    /// The epoch of `now`; moves the head forward to it and drops the buckets that left the window.
    fn advance(&mut self, now: Instant, span: u128) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        let epoch = u64::try_from(now.saturating_duration_since(origin).as_nanos() / span).unwrap_or(u64::MAX);
        if epoch > self.head {
            self.head = epoch;
            let (head, slots) = (self.head, self.buckets.len() as u64);
            for bucket in self.buckets.iter_mut().filter(|b| !live_at(b.epoch, head, slots)) {
                bucket.reset(bucket.epoch);
            }
        }
        epoch
    }

    fn live(&self, epoch: u64) -> bool {
        live_at(epoch, self.head, self.buckets.len() as u64)
    }
}

/// One bucket's space-saving summary: a binary min-heap on the count, indexed by account.
#[derive(Default)]
struct Bucket {
    epoch: u64,
    slots: Vec<Slot>,
    index: HashMap<Arc<str>, usize>,
    /// Whether an entry was ever replaced, i.e. whether untracked accounts may have weight here.
    evicted: bool,
}

struct Slot {
    account: Arc<str>,
    /// Recorded since the account entered the bucket.
    cost: Cost,
    /// The most the account can have weighed here before it entered: the count it replaced.
    error: u64,
}

impl Slot {
    /// The space-saving counter: an upper bound of the account's weight in the bucket.
    fn count(&self) -> u64 {
        self.cost.weight().saturating_add(self.error)
    }
}

impl Bucket {
    fn reset(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.slots.clear();
        self.index.clear();
        self.evicted = false;
    }

    /// The most an untracked account can have weighed in this bucket.
    fn floor(&self) -> u64 {
        match self.slots.first() {
            Some(lightest) if self.evicted => lightest.count(),
            _ => 0,
        }
    }

    fn add(&mut self, account: &str, cost: Cost, capacity: usize) {
        if let Some(&i) = self.index.get(account) {
            self.slots[i].cost += cost;
            self.sift_down(i);
        } else if self.slots.len() < capacity {
            let account: Arc<str> = Arc::from(account);
            self.index.insert(account.clone(), self.slots.len());
            self.slots.push(Slot { account, cost, error: 0 });
            self.sift_up(self.slots.len() - 1);
        } else {
            let account: Arc<str> = Arc::from(account);
            let error = self.slots[0].count();
            let old = std::mem::replace(&mut self.slots[0], Slot { account: account.clone(), cost, error });
            self.index.remove(&old.account);
            self.index.insert(account, 0);
            self.evicted = true;
            self.sift_down(0);
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.slots.swap(a, b);
        for i in [a, b] {
            if let Some(position) = self.index.get_mut(&self.slots[i].account) {
                *position = i;
            }
        }
    }

    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.slots[parent].count() <= self.slots[i].count() {
                break;
            }
            self.swap(i, parent);
            i = parent;
        }
    }

    fn sift_down(&mut self, mut i: usize) {
        loop {
            let mut lightest = i;
            for child in [2 * i + 1, 2 * i + 2] {
                if child < self.slots.len() && self.slots[child].count() < self.slots[lightest].count() {
                    lightest = child;
                }
            }
            if lightest == i {
                break;
            }
            self.swap(i, lightest);
            i = lightest;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic PRNG (xorshift64).
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn bytes(client: u64, upstream: u64) -> Cost {
        Cost { client_bytes: client, upstream_bytes: upstream, commands: 1, messages: 0 }
    }

    fn check_heap(bucket: &Bucket) {
        for (i, slot) in bucket.slots.iter().enumerate() {
            assert_eq!(bucket.index[&slot.account], i);
            if i > 0 {
                assert!(bucket.slots[(i - 1) / 2].count() <= slot.count());
            }
        }
        assert_eq!(bucket.index.len(), bucket.slots.len());
    }

    #[test]
    fn shared_across_tasks() {
        fn is_send_sync<T: Send + Sync>() {}
        is_send_sync::<TopAccounts>();
    }

    #[test]
    fn empty_returns_nothing() {
        let top = TopAccounts::new(10, Duration::from_secs(3600), 6);
        let now = Instant::now();
        assert_eq!(top.top(10, now), Vec::new());
        assert_eq!(top.top(0, now), Vec::new());
        assert_eq!(top.tracked(), 0);
        top.record("alice", bytes(10, 10), now);
        assert_eq!(top.top(0, now), Vec::new());
    }

    #[test]
    fn zipf_top_ten_are_exact() {
        const ACCOUNTS: usize = 1000;
        let window = Duration::from_secs(3600);
        let top = TopAccounts::new(100, window, 6);
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        // Account i is recorded about 3000 / (i + 1) times, with a few kilobytes each.
        let mut records: Vec<(usize, Cost)> = Vec::new();
        for i in 0..ACCOUNTS {
            for _ in 0..(3000 / (i + 1)).max(1) {
                let cost = Cost {
                    client_bytes: 1000 + rng.below(1000),
                    upstream_bytes: 2000 + rng.below(1000),
                    commands: 1 + rng.below(20),
                    messages: rng.below(10),
                };
                records.push((i, cost));
            }
        }
        for i in (1..records.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            records.swap(i, j);
        }
        // Spread over 55 minutes: every one of the 6 buckets gets its share.
        let start = Instant::now();
        let step = Duration::from_secs(55 * 60) / records.len() as u32;
        let mut truth = vec![Cost::default(); ACCOUNTS];
        let mut now = start;
        for (i, cost) in &records {
            top.record(&format!("user{i}@example.org"), *cost, now);
            truth[*i] += *cost;
            now += step;
        }
        assert!(top.tracked() <= 600);

        let mut expected: Vec<usize> = (0..ACCOUNTS).collect();
        expected.sort_by(|a, b| truth[*b].weight().cmp(&truth[*a].weight()));
        assert!(truth[expected[10]].weight() < truth[expected[9]].weight(), "a tie makes the test meaningless");

        let heavy = top.top(10, now);
        let names: Vec<String> = heavy.iter().map(|h| h.account.clone()).collect();
        let want: Vec<String> = expected[..10].iter().map(|i| format!("user{i}@example.org")).collect();
        assert_eq!(names, want);
        for (h, &i) in heavy.iter().zip(&expected) {
            let real = truth[i];
            assert!(h.cost.weight() <= real.weight(), "{h:?} vs {real:?}");
            assert!(real.weight() <= h.cost.weight() + h.error, "{h:?} vs {real:?}");
            assert!(h.cost.client_bytes <= real.client_bytes && h.cost.upstream_bytes <= real.upstream_bytes);
            assert!(h.cost.commands <= real.commands && h.cost.messages <= real.messages);
        }

        // Every reported account, not only the top ten, is within its bound.
        for h in top.top(usize::MAX, now) {
            let i: usize = h.account["user".len()..h.account.find('@').unwrap()].parse().unwrap();
            let real = truth[i].weight();
            assert!(h.cost.weight() <= real && real <= h.cost.weight() + h.error, "{h:?} vs {real}");
        }
        for bucket in &top.state.lock().unwrap().buckets {
            check_heap(bucket);
        }
    }

    #[test]
    fn memory_is_bounded() {
        let (capacity, buckets) = (50, 4);
        let top = TopAccounts::new(capacity, Duration::from_secs(40), buckets);
        let start = Instant::now();
        let mut rng = XorShift(42);
        for i in 0..100_000u64 {
            // Ten seconds per bucket, 100,000 accounts over 100 seconds: every bucket fills up and
            // rotates more than twice.
            let now = start + Duration::from_millis(i);
            top.record(&format!("account-{i}"), bytes(rng.below(10_000), rng.below(10_000)), now);
            if i % 997 == 0 {
                assert!(top.tracked() <= capacity * buckets);
            }
        }
        assert_eq!(top.tracked(), capacity * buckets);
        assert_eq!(top.top(usize::MAX, start + Duration::from_millis(99_999)).len(), capacity * buckets);

        // Within one bucket as well.
        let one = TopAccounts::new(capacity, Duration::from_secs(3600), 1);
        for i in 0..100_000u64 {
            one.record(&format!("account-{i}"), bytes(i % 1000, 1), start);
        }
        assert_eq!(one.tracked(), capacity);
        for bucket in &one.state.lock().unwrap().buckets {
            check_heap(bucket);
        }
    }

    #[test]
    fn sliding_window() {
        let window = Duration::from_secs(60);
        let top = TopAccounts::new(10, window, 6);
        let t0 = Instant::now();
        let secs = |s: u64| t0 + Duration::from_secs(s);
        top.record("old", bytes(1000, 0), t0);
        top.record("new", bytes(10, 0), secs(55));
        top.record("both", bytes(100, 0), t0);
        top.record("both", bytes(0, 100), secs(55));

        let names = |list: Vec<Heavy>| list.into_iter().map(|h| (h.account, h.cost.weight())).collect::<Vec<_>>();
        assert_eq!(names(top.top(10, secs(59))), [("old".into(), 1000), ("both".into(), 200), ("new".into(), 10)]);

        // More than a window after t0: only the recent cost counts.
        assert_eq!(names(top.top(10, secs(61))), [("both".into(), 100), ("new".into(), 10)]);
        // A late record from before the window is ignored.
        top.record("old", bytes(1000, 0), secs(1));
        assert_eq!(names(top.top(10, secs(61))), [("both".into(), 100), ("new".into(), 10)]);
        // Recent cost still counts, and adds up.
        top.record("new", bytes(500, 0), secs(62));
        assert_eq!(names(top.top(10, secs(62))), [("new".into(), 510), ("both".into(), 100)]);

        // Two windows later, nothing is left, and the memory is released.
        assert_eq!(top.top(10, secs(200)), Vec::new());
        assert_eq!(top.tracked(), 0);
    }

    #[test]
    fn error_covers_eviction_in_another_bucket() {
        // One account per bucket, two buckets of 10 seconds.
        let top = TopAccounts::new(1, Duration::from_secs(20), 2);
        let t0 = Instant::now();
        top.record("a", bytes(100, 0), t0);
        let t1 = t0 + Duration::from_secs(10);
        top.record("a", bytes(50, 0), t1);
        top.record("b", bytes(10, 0), t1); // replaces "a" in the second bucket: count 60, error 50
        let heavy = top.top(10, t1);
        assert_eq!(
            heavy,
            [
                // Truly 150: 100 tracked, and at most the second bucket's floor (60) untracked.
                Heavy { account: "a".into(), cost: bytes(100, 0), error: 60 },
                // Truly 10: tracked with the replaced count as error; the first bucket never evicted.
                Heavy { account: "b".into(), cost: bytes(10, 0), error: 50 },
            ]
        );
    }

    #[test]
    fn degenerate_parameters_are_clamped() {
        let top = TopAccounts::new(0, Duration::ZERO, 0);
        let now = Instant::now();
        top.record("a", bytes(1, 0), now);
        top.record("b", bytes(2, 0), now);
        assert_eq!(top.tracked(), 1);
        assert_eq!(top.top(5, now), [Heavy { account: "b".into(), cost: bytes(2, 0), error: 1 }]);
    }

    #[test]
    fn serializes() {
        let cost = Cost { client_bytes: 1, upstream_bytes: 2, commands: 3, messages: 4 };
        assert_eq!(cost.weight(), 3);
        let heavy = Heavy { account: "a".into(), cost, error: 5 };
        let text = toml::to_string(&heavy).unwrap();
        assert!(
            text.contains("account = \"a\"") && text.contains("error = 5") && text.contains("messages = 4"),
            "{text}"
        );
    }
}
