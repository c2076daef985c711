//! Authentication failures: an escalating delay per client address, and a lockout of a user
//! at an address after too many failures in a window.
//!
//! - The delay doubles with each failure from an address (`base`, 2×, 4×, ... capped), the
//!   way Dovecot's auth penalty does; it is a timer in the session's task, so it never
//!   blocks a thread or any other session.
//! - Retrying the same wrong password does not escalate: clients re-send a saved password
//!   over and over, and punishing that helps nobody. Passwords are remembered only as keyed
//!   hashes (a random key per process), never in a form that could be logged or reversed.
//! - A success from an address clears its record; trusted networks are exempt.
//! - Memory is bounded: records expire after the window, and at most `MAX_RECORDS` are kept
//!   (the oldest go first).

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::ClientKey;

const MAX_RECORDS: usize = 100_000;
/// Distinct wrong passwords remembered per address.
const REMEMBERED: usize = 4;

#[derive(Clone, Debug)]
pub struct PenaltyConfig {
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub lockout_failures: u32,
    pub window: Duration,
}

/// What a failed login came to.
pub struct Failure {
    pub delay: Duration,
    pub counted: bool,
}

struct Record {
    failures: u32,
    last: Instant,
    passwords: VecDeque<u64>,
}

pub struct Penalties {
    config: PenaltyConfig,
    key: RandomState,
    by_address: Mutex<HashMap<ClientKey, Record>>,
    by_user: Mutex<HashMap<(String, ClientKey), (u32, Instant)>>,
}

impl Penalties {
    pub fn new(config: PenaltyConfig) -> Penalties {
        Penalties {
            config,
            key: RandomState::new(),
            by_address: Mutex::new(HashMap::new()),
            by_user: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `user` at `address` is locked out now.
    pub fn locked_out(&self, user: &str, address: ClientKey, now: Instant) -> bool {
        let users = self.by_user.lock().unwrap_or_else(|p| p.into_inner());
        users.get(&(user.to_string(), address)).is_some_and(|&(failures, last)| {
            failures >= self.config.lockout_failures && now.duration_since(last) < self.config.window
        })
    }

    /// Records a failed login: how long to wait before answering it, and whether it counted
    /// (a repeated wrong password does not).
    pub fn failed(&self, user: &str, address: ClientKey, password: &str, now: Instant) -> Failure {
        let digest = self.key.hash_one(password);
        let mut records = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut records, now, self.config.window, |r| r.last);
        let record = records.entry(address).or_insert(Record { failures: 0, last: now, passwords: VecDeque::new() });
        if now.duration_since(record.last) >= self.config.window {
            *record = Record { failures: 0, last: now, passwords: VecDeque::new() };
        }
        let repeated = record.passwords.contains(&digest);
        if !repeated {
            record.failures += 1;
            record.passwords.push_back(digest);
            if record.passwords.len() > REMEMBERED {
                record.passwords.pop_front();
            }
            let mut users = self.by_user.lock().unwrap_or_else(|p| p.into_inner());
            prune(&mut users, now, self.config.window, |&(_, last)| last);
            let entry = users.entry((user.to_string(), address)).or_insert((0, now));
            if now.duration_since(entry.1) >= self.config.window {
                *entry = (0, now);
            }
            entry.0 += 1;
            entry.1 = now;
        }
        record.last = now;
        Failure { delay: self.delay(record.failures), counted: !repeated }
    }

    /// The delay after `failures` failures from one address: doubling, capped.
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        (self.config.base_delay * 2u32.pow(doublings)).min(self.config.max_delay)
    }

    /// A successful login clears the address's record.
    pub fn succeeded(&self, user: &str, address: ClientKey) {
        self.by_address.lock().unwrap_or_else(|p| p.into_inner()).remove(&address);
        self.by_user.lock().unwrap_or_else(|p| p.into_inner()).remove(&(user.to_string(), address));
    }

    pub fn tracked(&self) -> usize {
        self.by_address.lock().unwrap_or_else(|p| p.into_inner()).len()
            + self.by_user.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Drops expired records, and the oldest ones beyond `MAX_RECORDS`.
fn prune<K: Clone + std::hash::Hash + Eq, V>(
    map: &mut HashMap<K, V>,
    now: Instant,
    window: Duration,
    last: impl Fn(&V) -> Instant,
) {
    if map.len() < MAX_RECORDS {
        return;
    }
    map.retain(|_, v| now.duration_since(last(v)) < window);
    if map.len() >= MAX_RECORDS {
        let mut ages: Vec<(K, Instant)> = map.iter().map(|(k, v)| (k.clone(), last(v))).collect();
        ages.sort_by_key(|(_, at)| *at);
        for (k, _) in ages.into_iter().take(map.len() - MAX_RECORDS / 2) {
            map.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn penalties() -> Penalties {
        Penalties::new(PenaltyConfig {
            base_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(15),
            lockout_failures: 5,
            window: Duration::from_secs(600),
        })
    }

    fn address(i: u32) -> ClientKey {
        ClientKey::new(std::net::IpAddr::from(i.to_be_bytes()), 64)
    }

    #[test]
    fn delays_escalate_and_cap() {
        let p = penalties();
        let now = Instant::now();
        let delays: Vec<u64> =
            (0..6).map(|i| p.failed("alice", address(1), &format!("guess{i}"), now).delay.as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 15, 15, 15]);
        // Another address starts from the base.
        assert_eq!(p.failed("alice", address(2), "x", now).delay.as_secs(), 2);
    }

    #[test]
    fn the_same_wrong_password_does_not_escalate() {
        let p = penalties();
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(p.failed("alice", address(1), "old-password", now).delay.as_secs(), 2);
        }
        assert!(!p.locked_out("alice", address(1), now));
    }

    #[test]
    fn lockout_after_n_failures_and_unlock_after_the_window_or_a_success() {
        let p = penalties();
        let now = Instant::now();
        for i in 0..5 {
            p.failed("alice", address(1), &format!("guess{i}"), now);
        }
        assert!(p.locked_out("alice", address(1), now));
        assert!(!p.locked_out("bob", address(1), now), "another user at the address");
        assert!(!p.locked_out("alice", address(2), now), "the user elsewhere");
        assert!(!p.locked_out("alice", address(1), now + Duration::from_secs(601)), "the window passed");
        p.succeeded("alice", address(1));
        assert!(!p.locked_out("alice", address(1), now));
        assert_eq!(p.failed("alice", address(1), "new", now).delay.as_secs(), 2, "a success clears the record");
    }

    #[test]
    fn memory_stays_bounded_with_100000_addresses() {
        let p = penalties();
        let now = Instant::now();
        for i in 0..150_000 {
            p.failed("u", address(i), "x", now);
        }
        assert!(p.tracked() <= 2 * MAX_RECORDS, "{}", p.tracked());
    }
}
