//! Rate limits (GCRA, from the `governor` crate): new connections and logins per client
//! address, commands per user. Connections and logins over their rate are refused; commands
//! over theirs wait (the session is slowed, not broken). Keys no longer limiting anything are
//! dropped every few thousand checks, so memory follows the addresses and users active now.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::ClientKey;
use crate::config::LimitsConfig;

/// Checks between two prunings of idle keys.
const PRUNE_EVERY: u64 = 4096;

pub struct Rates {
    connections: Option<DefaultKeyedRateLimiter<ClientKey>>,
    logins: Option<DefaultKeyedRateLimiter<ClientKey>>,
    commands: Option<DefaultKeyedRateLimiter<String>>,
    /// Users whose command rate differs (the overrides file): `None`, no limit. Replaced on
    /// reload.
    user_commands: RwLock<Arc<HashMap<String, Option<Arc<DefaultDirectRateLimiter>>>>>,
    checks: AtomicU64,
}

fn keyed<K: std::hash::Hash + Eq + Clone>(quota: Option<Quota>) -> Option<DefaultKeyedRateLimiter<K>> {
    quota.map(RateLimiter::keyed)
}

impl Rates {
    /// A rate of 0 turns that limit off.
    pub fn new(config: &LimitsConfig) -> Rates {
        let per_minute = |n: u32| NonZeroU32::new(n).map(Quota::per_minute);
        let per_second = |n: u32| NonZeroU32::new(n).map(Quota::per_second);
        Rates {
            connections: keyed(per_minute(config.connections_per_ip_per_minute)),
            logins: keyed(per_minute(config.logins_per_ip_per_minute)),
            commands: keyed(per_second(config.commands_per_user_per_second)),
            user_commands: RwLock::new(Arc::new(HashMap::new())),
            checks: AtomicU64::new(0),
        }
    }

    /// Users' own command rates per second (0: no limit), replacing the previous ones.
    pub fn set_command_overrides(&self, per_user: HashMap<String, u32>) {
        let limiters = (per_user.into_iter())
            .map(|(user, rate)| {
                (user, NonZeroU32::new(rate).map(|r| Arc::new(RateLimiter::direct(Quota::per_second(r)))))
            })
            .collect();
        *self.user_commands.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(limiters);
    }

    fn checked(&self) {
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.prune();
        }
    }

    fn prune(&self) {
        if let Some(l) = &self.connections {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.logins {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.commands {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// A new connection from `key` is within its rate.
    pub fn connection(&self, key: ClientKey) -> bool {
        self.checked();
        self.connections.as_ref().is_none_or(|l| l.check_key(&key).is_ok())
    }

    /// A login attempt from `key` is within its rate.
    pub fn login(&self, key: ClientKey) -> bool {
        self.checked();
        self.logins.as_ref().is_none_or(|l| l.check_key(&key).is_ok())
    }

    /// Waits until `user` may send another command; true if it had to wait.
    pub async fn command(&self, user: &str) -> bool {
        let own = self.user_commands.read().unwrap_or_else(|p| p.into_inner()).get(user).cloned();
        if let Some(own) = own {
            let Some(limiter) = own else { return false };
            if limiter.check().is_ok() {
                return false;
            }
            limiter.until_ready().await;
            return true;
        }
        let Some(limiter) = &self.commands else { return false };
        self.checked();
        let key = user.to_string();
        if limiter.check_key(&key).is_ok() {
            return false;
        }
        limiter.until_key_ready(&key).await;
        true
    }

    /// Keys held (for the memory-bound test).
    pub fn tracked(&self) -> usize {
        self.connections.as_ref().map_or(0, |l| l.len())
            + self.logins.as_ref().map_or(0, |l| l.len())
            + self.commands.as_ref().map_or(0, |l| l.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(connections: u32, logins: u32, commands: u32) -> Rates {
        Rates::new(&LimitsConfig {
            connections_per_ip_per_minute: connections,
            logins_per_ip_per_minute: logins,
            commands_per_user_per_second: commands,
            ..Default::default()
        })
    }

    fn key(i: u32) -> ClientKey {
        ClientKey::new(std::net::IpAddr::from(i.to_be_bytes()), 64)
    }

    #[test]
    fn connections_and_logins_over_the_rate_are_refused_per_address() {
        let rates = rates(3, 2, 0);
        assert!((0..3).all(|_| rates.connection(key(1))));
        assert!(!rates.connection(key(1)));
        assert!(rates.connection(key(2)), "another address has its own rate");
        assert!(rates.login(key(1)) && rates.login(key(1)));
        assert!(!rates.login(key(1)));
    }

    #[tokio::test]
    async fn commands_over_the_rate_wait_instead_of_failing() {
        let rates = rates(0, 0, 20);
        let started = std::time::Instant::now();
        let mut waited = 0;
        for _ in 0..30 {
            waited += usize::from(rates.command("alice").await);
        }
        // A loop slowed by a busy machine needs fewer waits to keep to the rate (how many
        // depends on the scheduler: under a loaded test run, a handful), but some.
        let took = started.elapsed();
        assert!(waited >= 1 || took >= std::time::Duration::from_millis(900), "{waited} in {took:?}");
        assert!(took >= std::time::Duration::from_millis(400), "{took:?}");
        assert!(!rates.command("bob").await, "another user has its own rate");
    }

    #[tokio::test]
    async fn a_users_own_command_rate_overrides_the_default() {
        let rates = rates(0, 0, 1000);
        rates.set_command_overrides(HashMap::from([("slow".to_string(), 10), ("free".to_string(), 0)]));
        let (mut waited, started) = (0, std::time::Instant::now());
        for _ in 0..15 {
            waited += usize::from(rates.command("slow").await);
        }
        let took = started.elapsed();
        assert!(waited >= 4 || took >= std::time::Duration::from_millis(900), "{waited} in {took:?}");
        assert!(took >= std::time::Duration::from_millis(350), "10 per second: {took:?}");
        for _ in 0..2000 {
            assert!(!rates.command("free").await, "no limit for this user");
        }
    }

    #[test]
    fn memory_stays_bounded_with_100000_addresses() {
        let rates = rates(600, 60, 0);
        for i in 0..100_000 {
            rates.connection(key(i));
        }
        // Keys of addresses seen once stay until their cell has fully recovered; what is held
        // never exceeds the addresses seen, and pruning drops the recovered ones.
        assert!(rates.tracked() <= 100_000);
        let rates = rates_with_fast_recovery();
        for i in 0..100_000 {
            rates.connection(key(i));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        rates.prune();
        assert!(rates.tracked() < 100, "{}", rates.tracked());
    }

    fn rates_with_fast_recovery() -> Rates {
        // 60,000 per minute: one cell recovers in a millisecond.
        rates(60_000, 0, 0)
    }
}
