//! Download bandwidth per user: what the gateway writes to a user's clients, all their
//! sessions together, is held to a byte rate (GCRA over bytes, from `governor`). A client
//! over the rate is slowed, never cut: its writes wait until the user's budget allows them,
//! which TCP turns into back-pressure on the upstream read. One second of the rate may go
//! out at once, so small answers and short bursts are never delayed.

use std::future::Future;
use std::io;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes asked of the budget at once: a slow user gets steady small writes
/// instead of a second's silence and then a burst.
const CHUNK: u32 = 16 * 1024;

/// Sessions throttled between two prunings of recovered users.
const PRUNE_EVERY: u64 = 1024;

pub struct Bandwidth {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    chunk: NonZeroU32,
    sessions: AtomicU64,
}

impl Bandwidth {
    /// A rate of 0 bytes per second turns the limit off.
    pub fn new(bytes_per_second: u64) -> Bandwidth {
        let rate = NonZeroU32::new(bytes_per_second.min(u64::from(u32::MAX)) as u32);
        Bandwidth {
            limiter: rate.map(|rate| RateLimiter::keyed(Quota::per_second(rate))),
            chunk: rate.map_or(NonZeroU32::MIN, |rate| rate.min(NonZeroU32::new(CHUNK).expect("nonzero"))),
            sessions: AtomicU64::new(0),
        }
    }

    /// Users held (pruned with [`Bandwidth::prune`]).
    pub fn tracked(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }

    /// Drops users whose budget has fully recovered.
    pub fn prune(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// `stream`'s writes held to `user`'s rate; each delayed write counts in `delayed`.
    pub fn throttle<S>(self: &Arc<Self>, stream: S, user: &str, delayed: IntCounter) -> Throttled<S> {
        if self.sessions.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.prune();
        }
        Throttled { inner: stream, bandwidth: self.clone(), user: user.to_string(), credit: 0, wait: None, delayed }
    }
}

pub struct Throttled<S> {
    inner: S,
    bandwidth: Arc<Bandwidth>,
    user: String,
    /// Bytes taken from the budget and not written yet (a write the stream did not accept
    /// in full is not charged twice).
    credit: usize,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
    delayed: IntCounter,
}

impl<S> Throttled<S> {
    /// Takes up to `wanted` bytes from the budget, or arms the timer for when it allows them.
    fn poll_credit(&mut self, cx: &mut Context<'_>, wanted: usize) -> Poll<()> {
        let Some(limiter) = &self.bandwidth.limiter else {
            self.credit = wanted;
            return Poll::Ready(());
        };
        loop {
            if let Some(wait) = &mut self.wait {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
            }
            let n = NonZeroU32::new(wanted.min(self.bandwidth.chunk.get() as usize) as u32).unwrap_or(NonZeroU32::MIN);
            match limiter.check_key_n(&self.user, n) {
                Ok(Ok(())) => {
                    self.credit = n.get() as usize;
                    return Poll::Ready(());
                }
                Ok(Err(not_until)) => {
                    self.delayed.inc();
                    let pause = not_until.wait_time_from(DefaultClock::default().now());
                    self.wait = Some(Box::pin(tokio::time::sleep(pause.max(std::time::Duration::from_millis(1)))));
                }
                // `n` never exceeds the burst (one second of the rate, at least one chunk's
                // worth or the whole rate); should it, write unthrottled rather than stall.
                Err(_) => {
                    self.credit = wanted;
                    return Poll::Ready(());
                }
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
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
        let bandwidth = Arc::new(Bandwidth::new(64 * 1024));
        let delayed = counter();
        let took = send(&bandwidth, "alice", 192 * 1024, &delayed).await;
        assert!(took >= Duration::from_millis(1900), "{took:?}");
        assert!(delayed.get() > 0);
    }

    #[tokio::test]
    async fn the_budget_is_per_user_and_a_burst_goes_through_at_once() {
        let bandwidth = Arc::new(Bandwidth::new(64 * 1024));
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
        let bandwidth = Arc::new(Bandwidth::new(0));
        let delayed = counter();
        send(&bandwidth, "alice", 1 << 20, &delayed).await;
        assert_eq!((delayed.get(), bandwidth.tracked()), (0, 0));
    }

    #[tokio::test]
    async fn recovered_users_are_pruned() {
        // 1 MiB/s: a 1 KiB send recovers within a millisecond or two.
        let bandwidth = Arc::new(Bandwidth::new(1 << 20));
        let delayed = counter();
        for i in 0..100 {
            send(&bandwidth, &format!("user{i}"), 1024, &delayed).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        bandwidth.prune();
        assert_eq!(bandwidth.tracked(), 0);
    }
}
