//! Download bandwidth per user: what the gateway writes to a user's clients, all their
//! sessions together, is held to a byte rate (GCRA over bytes, from `governor`). A client
//! over the rate is slowed, never cut: its writes wait until the user's budget allows them,
//! which TCP turns into back-pressure on the upstream read. One second of the rate may go
//! out at once, so small answers and short bursts are never delayed.
//!
//! A download quota counts the same bytes per user over a window (an hour, a day) that
//! starts at the user's first download. Past it, the user is either slowed to a second,
//! lower rate (`throttle`) or refused message downloads (`reject`: the relays ask
//! [`Bandwidth::over_quota`] before a FETCH of message data or a RETR/TOP) until the window
//! rolls over. A download already running is never cut: nothing is lost mid-message.
//! With a shared store the quota counts the whole fleet's downloads (see [`super::fleet`]);
//! the per-second rates always shape this instance's own sockets.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock, QuantaInstant};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, InsufficientCapacity, NotUntil, Quota, RateLimiter};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes asked of the budget at once: a slow user gets steady small writes
/// instead of a second's silence and then a burst.
const CHUNK: u32 = 16 * 1024;

/// Sessions throttled between two prunings of recovered users.
const PRUNE_EVERY: u64 = 1024;

/// A per-user download quota.
#[derive(Clone, Debug)]
pub struct DownloadQuota {
    /// 0: no quota.
    pub bytes: u64,
    /// Users whose quota differs (the overrides file); 0: none for them.
    pub per_user: HashMap<String, u64>,
    pub window: Duration,
    /// Refuse downloads past the quota; otherwise slow them to `over_rate`.
    pub reject: bool,
    pub over_rate: u64,
}

/// A user's downloads in the current window.
struct Usage {
    since: Instant,
    bytes: u64,
}

struct QuotaState {
    quota: DownloadQuota,
    /// `quota.per_user`, replaceable on reload.
    per_user: std::sync::RwLock<Arc<HashMap<String, u64>>>,
    /// Users past their quota are slowed with this limiter (`throttle`).
    over: Arc<Rate>,
    usage: Mutex<HashMap<String, Usage>>,
}

impl QuotaState {
    /// `user`'s quota in bytes (0: none).
    fn limit(&self, user: &str) -> u64 {
        let per_user = self.per_user.read().unwrap_or_else(|p| p.into_inner()).clone();
        per_user.get(user).copied().unwrap_or(self.quota.bytes)
    }
}

/// A keyed byte rate and the largest amount asked of it at once.
struct Rate {
    limiter: DefaultKeyedRateLimiter<String>,
    chunk: NonZeroU32,
}

impl Rate {
    fn new(bytes_per_second: u64) -> Option<Rate> {
        let rate = NonZeroU32::new(bytes_per_second.min(u64::from(u32::MAX)) as u32)?;
        Some(Rate {
            limiter: RateLimiter::keyed(Quota::per_second(rate)),
            chunk: rate.min(NonZeroU32::new(CHUNK).expect("nonzero")),
        })
    }
}

/// Users whose byte rate differs from the default (the overrides file): `None`, no limit.
type UserRates = HashMap<String, Option<Arc<Rate>>>;

pub struct Bandwidth {
    rate: Option<Arc<Rate>>,
    /// Replaced on reload.
    user_rates: std::sync::RwLock<Arc<UserRates>>,
    /// Bytes per second of one session (0: no limit).
    session_rate: u64,
    quota: Option<QuotaState>,
    sessions: AtomicU64,
    /// Counts downloads against the fleet's quota instead of this process's.
    fleet: Option<Arc<super::fleet::Fleet>>,
}

impl Bandwidth {
    /// A rate of 0 bytes per second turns the rate off; `None` the quota.
    pub fn new(
        bytes_per_second: u64,
        session_rate: u64,
        quota: Option<DownloadQuota>,
        fleet: Option<Arc<super::fleet::Fleet>>,
    ) -> Bandwidth {
        // Kept when only overrides set quotas: a reload may change them.
        let quota = quota.filter(|q| q.bytes > 0 || !q.per_user.is_empty()).map(|quota| QuotaState {
            over: Arc::new(Rate::new(quota.over_rate.max(1)).expect("nonzero")),
            per_user: std::sync::RwLock::new(Arc::new(quota.per_user.clone())),
            quota,
            usage: Mutex::new(HashMap::new()),
        });
        Bandwidth {
            rate: Rate::new(bytes_per_second).map(Arc::new),
            user_rates: std::sync::RwLock::new(Arc::new(HashMap::new())),
            session_rate,
            quota,
            sessions: AtomicU64::new(0),
            fleet,
        }
    }

    /// Users' own byte rates (the overrides file; 0: no limit), replacing the previous ones.
    pub fn set_rate_overrides(&self, per_user: HashMap<String, u64>) {
        let rates = per_user.into_iter().map(|(user, rate)| (user, Rate::new(rate).map(Arc::new))).collect();
        *self.user_rates.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rates);
    }

    fn user_rates(&self) -> Arc<UserRates> {
        self.user_rates.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// New per-user quotas (the overrides file, on reload). Without any quota configured at
    /// start there is no quota to adjust: that takes a restart.
    pub fn set_quota_overrides(&self, per_user: HashMap<String, u64>) {
        if let Some(q) = &self.quota {
            *q.per_user.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(per_user);
        }
    }

    /// Users held (pruned with [`Bandwidth::prune`]).
    pub fn tracked(&self) -> usize {
        self.rate.as_ref().map_or(0, |r| r.limiter.len())
            + self.user_rates().values().flatten().map(|r| r.limiter.len()).sum::<usize>()
            + self.quota.as_ref().map_or(0, |q| q.over.limiter.len() + lock(&q.usage).len())
    }

    /// Drops users whose budget has fully recovered and quota windows that have ended.
    pub fn prune(&self) {
        for r in self.rate.iter().chain(self.user_rates().values().flatten()) {
            r.limiter.retain_recent();
            r.limiter.shrink_to_fit();
        }
        if let Some(q) = &self.quota {
            q.over.limiter.retain_recent();
            q.over.limiter.shrink_to_fit();
            let now = Instant::now();
            lock(&q.usage).retain(|_, usage| now.duration_since(usage.since) < q.quota.window);
        }
    }

    /// Whether `user` has used up this window's download quota.
    pub fn over_quota(&self, user: &str) -> bool {
        let Some(q) = &self.quota else { return false };
        let limit = q.limit(user);
        if let Some(fleet) = &self.fleet {
            return limit > 0 && fleet.downloads(user) >= limit;
        }
        let usage = lock(&q.usage);
        limit > 0 && usage.get(user).is_some_and(|u| u.since.elapsed() < q.quota.window && u.bytes >= limit)
    }

    /// Adds `n` downloaded bytes to `user`'s window.
    fn downloaded(&self, user: &str, n: usize) {
        let Some(q) = self.quota.as_ref().filter(|q| q.limit(user) > 0) else { return };
        if let Some(fleet) = &self.fleet {
            fleet.downloaded(user, n as u64, q.quota.window);
            return;
        }
        let now = Instant::now();
        let mut usage = lock(&q.usage);
        let entry = usage.entry(user.to_string()).or_insert(Usage { since: now, bytes: 0 });
        if now.duration_since(entry.since) >= q.quota.window {
            *entry = Usage { since: now, bytes: 0 };
        }
        entry.bytes += n as u64;
    }

    /// The rate `user`'s writes are held to now: the over-quota rate past a `throttle`
    /// quota, else the user's own rate from the overrides file, else the plain rate (if
    /// any).
    fn rate_for(&self, user: &str) -> Option<Arc<Rate>> {
        match &self.quota {
            Some(q) if !q.quota.reject && self.over_quota(user) => Some(q.over.clone()),
            _ => match self.user_rates().get(user) {
                Some(own) => own.clone(),
                None => self.rate.clone(),
            },
        }
    }

    /// `stream`'s writes held to `user`'s rate; each delayed write counts in `delayed`.
    pub fn throttle<S>(self: &Arc<Self>, stream: S, user: &str, delayed: IntCounter) -> Throttled<S> {
        if self.sessions.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.prune();
        }
        let session = NonZeroU32::new(self.session_rate.min(u64::from(u32::MAX)) as u32).map(|rate| SessionRate {
            limiter: RateLimiter::direct(Quota::per_second(rate)),
            chunk: rate.min(NonZeroU32::new(CHUNK).expect("nonzero")),
        });
        Throttled {
            inner: stream,
            bandwidth: self.clone(),
            user: user.to_string(),
            credit: 0,
            session,
            session_granted: 0,
            wait: None,
            delayed,
        }
    }
}

pub struct Throttled<S> {
    inner: S,
    bandwidth: Arc<Bandwidth>,
    user: String,
    /// Bytes taken from the budget and not written yet (a write the stream did not accept
    /// in full is not charged twice).
    credit: usize,
    /// This session's own rate (`download_bytes_per_session_per_second`).
    session: Option<SessionRate>,
    /// Bytes the session's rate has granted for the chunk the user's rate holds back.
    session_granted: usize,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
    delayed: IntCounter,
}

impl<S> Throttled<S> {
    /// Takes up to `wanted` bytes from the budgets (the session's, then the user's), or arms
    /// the timer for when they allow them.
    fn poll_credit(&mut self, cx: &mut Context<'_>, wanted: usize) -> Poll<()> {
        loop {
            if let Some(wait) = &mut self.wait {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
            }
            let rate = self.bandwidth.rate_for(&self.user);
            let mut n = wanted;
            if self.session.is_some() || rate.is_some() || self.bandwidth.quota.is_some() {
                // Under a quota, looked at again every chunk so that crossing it takes
                // effect within a long write.
                n = n.min(CHUNK as usize);
            }
            if let Some(session) = &self.session {
                n = n.min(session.chunk.get() as usize);
            }
            if let Some(rate) = &rate {
                n = n.min(rate.chunk.get() as usize);
            }
            let cells = NonZeroU32::new(n as u32).unwrap_or(NonZeroU32::MIN);
            // The session's share is taken once, even if the user's budget makes us wait.
            if let Some(session) = self.session.as_ref().filter(|_| self.session_granted < n) {
                if let Some(pause) = pause(session.limiter.check_n(cells), session.limiter.clock()) {
                    self.pause(pause);
                    continue;
                }
                self.session_granted = n;
            }
            if let Some(pause) =
                rate.and_then(|rate| pause(rate.limiter.check_key_n(&self.user, cells), rate.limiter.clock()))
            {
                self.pause(pause);
                continue;
            }
            self.session_granted = 0;
            self.credit = n;
            return Poll::Ready(());
        }
    }

    fn pause(&mut self, pause: Duration) {
        self.delayed.inc();
        self.wait = Some(Box::pin(tokio::time::sleep(pause.max(Duration::from_millis(1)))));
    }
}

/// How long a limiter says to wait for its cells; `None`: granted. A request larger than
/// the burst (never made: chunks are at most one second of the rate) is let through rather
/// than stalled.
fn pause(
    verdict: Result<Result<(), NotUntil<QuantaInstant>>, InsufficientCapacity>,
    clock: &DefaultClock,
) -> Option<Duration> {
    match verdict {
        Ok(Ok(())) | Err(_) => None,
        Ok(Err(not_until)) => Some(not_until.wait_time_from(clock.now())),
    }
}

/// A per-session byte rate.
struct SessionRate {
    limiter: DefaultDirectRateLimiter,
    chunk: NonZeroU32,
}

impl<S: AsyncRead + Unpin> AsyncRead for Throttled<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Throttled<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Pin::new(&mut self.inner).poll_write(cx, data);
        }
        if self.credit == 0 {
            ready!(self.poll_credit(cx, data.len()));
        }
        let allowed = data.len().min(self.credit);
        let result = Pin::new(&mut self.inner).poll_write(cx, &data[..allowed]);
        if let Poll::Ready(Ok(n)) = result {
            self.credit -= n;
            self.bandwidth.downloaded(&self.user, n);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn counter() -> IntCounter {
        IntCounter::new("delayed", "delayed writes").expect("valid counter")
    }

    /// Writes `total` bytes to a throttled in-memory pipe, draining it; the time it took.
    async fn send(bandwidth: &Arc<Bandwidth>, user: &str, total: usize, delayed: &IntCounter) -> Duration {
        let (near, mut far) = tokio::io::duplex(4096);
        let mut throttled = bandwidth.throttle(near, user, delayed.clone());
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            far.read_to_end(&mut sink).await.map(|_| sink.len())
        });
        let started = Instant::now();
        throttled.write_all(&vec![b'x'; total]).await.expect("write");
        throttled.shutdown().await.expect("shutdown");
        drop(throttled);
        assert_eq!(drain.await.expect("join").expect("read"), total, "every byte arrives");
        started.elapsed()
    }

    #[tokio::test]
    async fn writes_over_the_rate_wait_and_nothing_is_lost() {
        // 64 KiB/s with a one-second burst: 192 KiB needs at least two seconds.
        let bandwidth = Arc::new(Bandwidth::new(64 * 1024, 0, None, None));
        let delayed = counter();
        let took = send(&bandwidth, "alice", 192 * 1024, &delayed).await;
        assert!(took >= Duration::from_millis(1900), "{took:?}");
        assert!(delayed.get() > 0);
    }

    #[tokio::test]
    async fn the_budget_is_per_user_and_a_burst_goes_through_at_once() {
        let bandwidth = Arc::new(Bandwidth::new(64 * 1024, 0, None, None));
        let delayed = counter();
        send(&bandwidth, "alice", 64 * 1024, &delayed).await;
        let before = delayed.get();
        // Bob's first second of budget is untouched by alice's.
        send(&bandwidth, "bob", 48 * 1024, &delayed).await;
        assert_eq!(delayed.get(), before, "bob was not delayed");
        assert_eq!(bandwidth.tracked(), 2);
    }

    #[tokio::test]
    async fn off_means_no_delay_and_no_state() {
        let bandwidth = Arc::new(Bandwidth::new(0, 0, None, None));
        let delayed = counter();
        send(&bandwidth, "alice", 1 << 20, &delayed).await;
        assert_eq!((delayed.get(), bandwidth.tracked()), (0, 0));
    }

    fn quota(bytes: u64, window: Duration, reject: bool) -> Option<DownloadQuota> {
        Some(DownloadQuota { bytes, per_user: HashMap::new(), window, reject, over_rate: 32 * 1024 })
    }

    #[tokio::test]
    async fn past_a_throttle_quota_the_user_is_slowed_to_the_over_quota_rate() {
        let bandwidth = Arc::new(Bandwidth::new(0, 0, quota(16 * 1024, Duration::from_secs(3600), false), None));
        let delayed = counter();
        send(&bandwidth, "alice", 16 * 1024, &delayed).await;
        assert!(bandwidth.over_quota("alice") && !bandwidth.over_quota("bob"));
        assert_eq!(delayed.get(), 0, "within the quota nothing waits");
        // 32 KiB/s with a one-second burst: 96 KiB more needs at least two seconds.
        let took = send(&bandwidth, "alice", 96 * 1024, &delayed).await;
        assert!(took >= Duration::from_millis(1900), "{took:?}");
        let took = send(&bandwidth, "bob", 16 * 1024, &delayed).await;
        assert!(took < Duration::from_millis(1900), "bob has his own quota: {took:?}");
    }

    #[tokio::test]
    async fn a_reject_quota_never_cuts_a_download_and_rolls_over_with_its_window() {
        let bandwidth = Arc::new(Bandwidth::new(0, 0, quota(8 * 1024, Duration::from_millis(300), true), None));
        let delayed = counter();
        send(&bandwidth, "alice", 100 * 1024, &delayed).await;
        assert!(bandwidth.over_quota("alice"));
        assert_eq!(delayed.get(), 0, "reject refuses new downloads, it does not slow");
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(!bandwidth.over_quota("alice"), "a new window");
        bandwidth.prune();
        assert_eq!(bandwidth.tracked(), 0);
    }

    #[tokio::test]
    async fn each_session_has_its_own_rate_under_the_users() {
        // Sessions at 32 KiB/s each, the user at 1 MiB/s: two sessions of one user side by
        // side each need at least two seconds for 96 KiB, together not four.
        let bandwidth = Arc::new(Bandwidth::new(1 << 20, 32 * 1024, None, None));
        let delayed = counter();
        let started = Instant::now();
        let (a, b) = tokio::join!(
            send(&bandwidth, "alice", 96 * 1024, &delayed),
            send(&bandwidth, "alice", 96 * 1024, &delayed)
        );
        assert!(a >= Duration::from_millis(1900) && b >= Duration::from_millis(1900), "{a:?} {b:?}");
        assert!(started.elapsed() < Duration::from_millis(3900), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_users_own_quota_overrides_the_default() {
        let mut quota = quota(8 * 1024, Duration::from_secs(3600), true).unwrap();
        quota.per_user = HashMap::from([("vip".to_string(), 0), ("small".to_string(), 1024)]);
        let bandwidth = Arc::new(Bandwidth::new(0, 0, Some(quota), None));
        let delayed = counter();
        for user in ["vip", "small", "alice"] {
            send(&bandwidth, user, 4 * 1024, &delayed).await;
        }
        assert!(!bandwidth.over_quota("vip") && bandwidth.over_quota("small") && !bandwidth.over_quota("alice"));
        send(&bandwidth, "alice", 4 * 1024, &delayed).await;
        assert!(bandwidth.over_quota("alice"));
        assert_eq!(bandwidth.tracked(), 2, "no usage is kept for users without a quota");
    }

    #[tokio::test]
    async fn a_users_own_rate_overrides_the_default() {
        let bandwidth = Arc::new(Bandwidth::new(64 * 1024, 0, None, None));
        bandwidth.set_rate_overrides(HashMap::from([("vip".to_string(), 0), ("slow".to_string(), 8 * 1024)]));
        let delayed = counter();
        // No limit for vip: 256 KiB at once.
        assert!(send(&bandwidth, "vip", 256 * 1024, &delayed).await < Duration::from_millis(300));
        assert_eq!(delayed.get(), 0);
        // 8 KiB/s for slow: one second's worth at once, the next 8 KiB after a second.
        let took = send(&bandwidth, "slow", 16 * 1024, &delayed).await;
        assert!(took >= Duration::from_millis(900), "{took:?}");
        // Everyone else keeps the default.
        assert!(send(&bandwidth, "alice", 32 * 1024, &delayed).await < Duration::from_millis(300));
    }

    #[tokio::test]
    async fn recovered_users_are_pruned() {
        // 1 MiB/s: a 1 KiB send recovers within a millisecond or two.
        let bandwidth = Arc::new(Bandwidth::new(1 << 20, 0, None, None));
        let delayed = counter();
        for i in 0..100 {
            send(&bandwidth, &format!("user{i}"), 1024, &delayed).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        bandwidth.prune();
        assert_eq!(bandwidth.tracked(), 0);
    }
}
