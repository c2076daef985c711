//! Authentication failures: an escalating delay per client address, and a lockout of a user
//! at an address after too many failures in a window.
//!
//! - The delay doubles with each failure from an address (`base`, 2×, 4×, ... capped), the
//!   way Dovecot's auth penalty does; it is a timer in the session's task, so it never
//!   blocks a thread or any other session.
//! - Retrying the same wrong password *for the same user* does not escalate: clients re-send
//!   a saved password over and over, and punishing that helps nobody. The wrong passwords
//!   are remembered per (user, address): remembered per address only, an attacker could
//!   try a password on a decoy name first and the real user's attempt with it would pass as
//!   a harmless repeat. Passwords are remembered only as keyed hashes (a random key per
//!   process), never in a form that could be logged or reversed.
//! - Attempts in flight count towards the lockout: an attempt is admitted ([`Penalties::begin`])
//!   only while the user's failures plus its attempts still waiting for the upstream stay
//!   under the lockout, so 30 concurrent guesses cannot all reach the upstream before the
//!   first failure is recorded.
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
/// Distinct wrong passwords remembered per user and address.
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

/// An address's failures (any user), for the delay.
struct AddressRecord {
    failures: u32,
    last: Instant,
}

/// A user's failures at an address, for the lockout.
struct UserRecord {
    failures: u32,
    last: Instant,
    passwords: VecDeque<u64>,
    /// Attempts admitted and not answered yet: per password (its keyed digest), how many.
    /// Concurrent logins with one password are one guess (a client opening ten
    /// connections at once), ten passwords are ten.
    in_flight: Vec<(u64, u32)>,
}

type UserKey = (String, ClientKey);

pub struct Penalties {
    config: PenaltyConfig,
    key: RandomState,
    by_address: Mutex<HashMap<ClientKey, AddressRecord>>,
    by_user: Mutex<HashMap<UserKey, UserRecord>>,
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

    fn users(&self) -> std::sync::MutexGuard<'_, HashMap<UserKey, UserRecord>> {
        self.by_user.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The user's record at `address`, started afresh when its window has passed.
    fn user_record<'a>(
        &self,
        users: &'a mut HashMap<UserKey, UserRecord>,
        user: &str,
        address: ClientKey,
        now: Instant,
    ) -> &'a mut UserRecord {
        prune(users, now, self.config.window, |r| r.last, |r| !r.in_flight.is_empty());
        let record = users.entry((user.to_string(), address)).or_insert(UserRecord {
            failures: 0,
            last: now,
            passwords: VecDeque::new(),
            in_flight: Vec::new(),
        });
        if now.duration_since(record.last) >= self.config.window {
            record.failures = 0;
            record.passwords.clear();
        }
        record
    }

    /// The keyed digest of a password (never stored as it is).
    pub fn digest(&self, password: &str) -> u64 {
        self.key.hash_one(password)
    }

    /// Admits a login attempt of `user` at `address` with the password of digest
    /// `password` unless its failures and the other passwords still in flight reach the
    /// lockout; an admitted attempt must be ended with [`end`].
    ///
    /// [`end`]: Penalties::end
    pub fn begin(&self, user: &str, address: ClientKey, password: u64, now: Instant) -> bool {
        let mut users = self.users();
        let record = self.user_record(&mut users, user, address, now);
        let others = record.in_flight.len() as u32;
        match record.in_flight.iter_mut().find(|(digest, _)| *digest == password) {
            Some((_, count)) => *count += 1,
            None if record.failures + others >= self.config.lockout_failures => return false,
            None => record.in_flight.push((password, 1)),
        }
        record.last = now;
        true
    }

    /// An admitted attempt got its answer (after [`failed`](Penalties::failed) if it failed).
    pub fn end(&self, user: &str, address: ClientKey, password: u64) {
        let mut users = self.users();
        let key = (user.to_string(), address);
        if let Some(record) = users.get_mut(&key) {
            if let Some(i) = record.in_flight.iter().position(|(digest, _)| *digest == password) {
                record.in_flight[i].1 -= 1;
                if record.in_flight[i].1 == 0 {
                    record.in_flight.swap_remove(i);
                }
            }
            if record.in_flight.is_empty() && record.failures == 0 && record.passwords.is_empty() {
                users.remove(&key);
            }
        }
    }

    /// Whether `user` at `address` is locked out now (no attempt in flight counted; the
    /// sessions ask [`begin`](Penalties::begin)).
    #[cfg(test)]
    pub fn locked_out(&self, user: &str, address: ClientKey, now: Instant) -> bool {
        self.users().get(&(user.to_string(), address)).is_some_and(|r| {
            r.failures >= self.config.lockout_failures && now.duration_since(r.last) < self.config.window
        })
    }

    /// Records a failed login: how long to wait before answering it, and whether it counted
    /// (a wrong password this user already tried from this address does not).
    pub fn failed(&self, user: &str, address: ClientKey, password: &str, now: Instant) -> Failure {
        let digest = self.digest(password);
        let counted = {
            let mut users = self.users();
            let record = self.user_record(&mut users, user, address, now);
            record.last = now;
            let repeated = record.passwords.contains(&digest);
            if !repeated {
                record.failures += 1;
                record.passwords.push_back(digest);
                if record.passwords.len() > REMEMBERED {
                    record.passwords.pop_front();
                }
            }
            !repeated
        };
        let mut records = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut records, now, self.config.window, |r| r.last, |_| false);
        let record = records.entry(address).or_insert(AddressRecord { failures: 0, last: now });
        if now.duration_since(record.last) >= self.config.window {
            record.failures = 0;
        }
        if counted {
            record.failures += 1;
        }
        record.last = now;
        Failure { delay: self.delay(record.failures.max(1)), counted }
    }

    /// The delay after `failures` failures from one address: doubling, capped.
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        (self.config.base_delay * 2u32.pow(doublings)).min(self.config.max_delay)
    }

    /// A successful login clears the address's record and the user's failures there
    /// (attempts still in flight keep counting until they end).
    pub fn succeeded(&self, user: &str, address: ClientKey) {
        self.by_address.lock().unwrap_or_else(|p| p.into_inner()).remove(&address);
        let mut users = self.users();
        let key = (user.to_string(), address);
        if let Some(record) = users.get_mut(&key) {
            record.failures = 0;
            record.passwords.clear();
            if record.in_flight.is_empty() {
                users.remove(&key);
            }
        }
    }

    pub fn tracked(&self) -> usize {
        self.by_address.lock().unwrap_or_else(|p| p.into_inner()).len() + self.users().len()
    }
}

/// Drops expired records, and the oldest ones beyond `MAX_RECORDS`.
fn prune<K: Clone + std::hash::Hash + Eq, V>(
    map: &mut HashMap<K, V>,
    now: Instant,
    window: Duration,
    last: impl Fn(&V) -> Instant,
    busy: impl Fn(&V) -> bool,
) {
    if map.len() < MAX_RECORDS {
        return;
    }
    map.retain(|_, v| busy(v) || now.duration_since(last(v)) < window);
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
    fn a_password_tried_on_a_decoy_name_still_counts_for_the_real_user() {
        let p = penalties();
        let now = Instant::now();
        for i in 0..5 {
            let password = format!("guess{i}");
            assert!(p.failed(&format!("decoy{i}"), address(1), &password, now).counted);
            assert!(p.failed("alice", address(1), &password, now).counted, "guess {i} is alice's first try of it");
        }
        assert!(p.locked_out("alice", address(1), now));
        // A user's own repeat still does not count.
        assert!(p.failed("bob", address(1), "stale", now).counted);
        assert!(!p.failed("bob", address(1), "stale", now).counted);
    }

    #[test]
    fn attempts_in_flight_count_towards_the_lockout() {
        let p = penalties();
        let now = Instant::now();
        let guess = |i: usize| p.digest(&format!("guess{i}"));
        // Thirty concurrent guesses: five are admitted, the rest wait for their answers.
        let admitted = (0..30).filter(|&i| p.begin("alice", address(1), guess(i), now)).count();
        assert_eq!(admitted, 5);
        assert!(p.begin("bob", address(1), guess(0), now), "another user is not affected");
        p.end("bob", address(1), guess(0));
        for i in 0..5 {
            p.failed("alice", address(1), &format!("guess{i}"), now);
            p.end("alice", address(1), guess(i));
        }
        assert!(!p.begin("alice", address(1), guess(9), now), "five failures: locked out");
        // Repeats answered give their places back.
        let p = penalties();
        let (old, other) = (p.digest("saved-old-password"), |i: usize| p.digest(&format!("other{i}")));
        for _ in 0..3 {
            assert!(p.begin("alice", address(1), old, now));
            p.failed("alice", address(1), "saved-old-password", now);
            p.end("alice", address(1), old);
        }
        assert!((0..4).all(|i| p.begin("alice", address(1), other(i), now)), "one failure and four in flight");
        assert!(!p.begin("alice", address(1), other(4), now));
        for i in 0..4 {
            p.end("alice", address(1), other(i));
        }
        p.succeeded("alice", address(1));
        assert_eq!(p.tracked(), 0, "nothing kept once every attempt ended and one succeeded");
    }

    #[test]
    fn concurrent_logins_with_one_password_are_one_guess() {
        let p = penalties();
        let now = Instant::now();
        let right = p.digest("right");
        // A client (or a webmail) opening thirty sessions at once is not locked out...
        assert!((0..30).all(|_| p.begin("alice", address(1), right, now)));
        // ...and leaves room for four other passwords, not more.
        assert!((0..4).all(|i| p.begin("alice", address(1), p.digest(&format!("g{i}")), now)));
        assert!(!p.begin("alice", address(1), p.digest("g4"), now));
        for _ in 0..30 {
            p.end("alice", address(1), right);
        }
        for i in 0..4 {
            p.end("alice", address(1), p.digest(&format!("g{i}")));
        }
        assert_eq!(p.tracked(), 0);
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
