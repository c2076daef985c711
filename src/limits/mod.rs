//! Limits on what one client address, one user or the whole gateway may hold at once.
//!
//! This module owns the connection caps: global, per client address (IPv6 grouped by a
//! prefix, /64 by default, since one subscriber gets a whole prefix), per user across IMAP
//! and POP3, and per user and address (Dovecot's `mail_max_userip_connections`). A connection
//! or a logged-in session holds a *lease*; dropping the lease gives the slot back, however
//! the session ends. Counts live in maps pruned to the keys in use, so memory follows the
//! number of open connections, not the number of addresses ever seen.
//!
//! Every per-user limit keys on the user's canonical name ([`identity`]), never on the name
//! as typed.
//!
//! [`Limits`] is the one entry point for the sessions: with `store = "redis"` the caps, the
//! connection and login rates, the failed-login counts and the download quotas go to the
//! fleet's shared store ([`fleet`]) instead of this process's maps.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::config::LimitsConfig;

pub mod bandwidth;
pub mod fleet;
pub mod penalty;
pub mod rate;

use crate::identity;
pub use crate::network::Network;

use fleet::{Fleet, Verdict};

/// A client address as limits see it: IPv4 as is, IPv6 cut to the configured prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    pub fn new(ip: IpAddr, ipv6_prefix: u8) -> ClientKey {
        match ip {
            IpAddr::V4(_) => ClientKey(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6);
                    let prefix = u32::from(ipv6_prefix.min(128));
                    let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
                    ClientKey(IpAddr::V6((bits & mask).into()))
                }
            },
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Which cap refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Too many new connections or logins from the address in the last minute.
    Rate,
    Global,
    PerAddress,
    PerUser,
    PerUserAddress,
    /// Too many failed logins (with the attempts in flight) of the user at the address.
    LockedOut,
    /// The shared store could not answer and is configured to fail closed.
    Unavailable,
}

#[derive(Default)]
struct Counts {
    total: u32,
    per_address: HashMap<ClientKey, u32>,
    per_user: HashMap<String, u32>,
    per_user_address: HashMap<(String, ClientKey), u32>,
}

fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: &K) {
    if let Some(count) = map.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            map.remove(key);
        }
    }
}

pub struct Limits {
    config: LimitsConfig,
    canonical: identity::Canonical,
    counts: Mutex<Counts>,
    pub penalties: penalty::Penalties,
    pub rates: rate::Rates,
    pub bandwidth: Arc<bandwidth::Bandwidth>,
    /// `trusted_networks` with the overrides file's; replaced on reload.
    trusted: std::sync::RwLock<Vec<Network>>,
    /// The overrides file's users; replaced on reload.
    users: std::sync::RwLock<Arc<std::collections::BTreeMap<String, crate::config::UserOverride>>>,
    /// The overrides file's networks with a plaintext exception; replaced on reload.
    plaintext_networks: std::sync::RwLock<Vec<(Network, crate::units::Moment)>>,
    /// Whether some user has a plaintext exception (asked for every command before TLS).
    plaintext_users: std::sync::atomic::AtomicBool,
    fleet: Option<Arc<Fleet>>,
}

impl Limits {
    /// Limits kept in this process.
    pub fn new(config: &LimitsConfig) -> Arc<Limits> {
        Limits::shared(config, None)
    }

    /// Limits kept in `fleet`'s store when given, else in this process.
    pub fn shared(config: &LimitsConfig, fleet: Option<Arc<Fleet>>) -> Arc<Limits> {
        let penalties = penalty::Penalties::new(penalty::PenaltyConfig {
            base_delay: config.auth_base_delay.0,
            max_delay: config.auth_max_delay.0,
            lockout_failures: config.auth_lockout_failures,
            window: config.auth_window.0,
        });
        let trusted = trusted_networks(config, &config.overrides);
        let canonical = identity::Canonical::new(config.user_case, &config.default_domain);
        let overrides = canonical_overrides(&canonical, &config.overrides);
        let limits = Arc::new(Limits {
            config: config.clone(),
            counts: Mutex::new(Counts::default()),
            penalties,
            rates: rate::Rates::new(config),
            bandwidth: Arc::new(bandwidth::Bandwidth::new(
                config.download_bytes_per_user_per_second.0,
                config.download_bytes_per_session_per_second.0,
                Some(bandwidth::DownloadQuota {
                    bytes: config.download_quota.0,
                    per_user: quota_overrides(&overrides),
                    window: config.download_quota_window.0,
                    reject: config.download_quota_action == crate::config::QuotaAction::Reject,
                    over_rate: config.over_quota_bytes_per_second.0,
                }),
                fleet.clone(),
            )),
            trusted: std::sync::RwLock::new(trusted),
            users: std::sync::RwLock::new(Arc::new(overrides.users.clone())),
            plaintext_networks: std::sync::RwLock::new(plaintext_networks(&overrides)),
            plaintext_users: std::sync::atomic::AtomicBool::new(has_plaintext_users(&overrides)),
            fleet,
            canonical,
        });
        limits.apply_rate_overrides(&overrides);
        limits
    }

    /// `user`'s canonical name: what every per-user limit, quota and report keys on.
    pub fn canonical(&self, user: &str) -> String {
        self.canonical.user(user)
    }

    /// Applies a new overrides file (on reload): trusted networks, per-user caps, download
    /// quotas and rates, command rates. Sessions already open keep the slots they hold.
    pub fn set_overrides(&self, overrides: &crate::config::Overrides) {
        let overrides = &canonical_overrides(&self.canonical, overrides);
        *self.trusted.write().unwrap_or_else(|p| p.into_inner()) = trusted_networks(&self.config, overrides);
        *self.users.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(overrides.users.clone());
        *self.plaintext_networks.write().unwrap_or_else(|p| p.into_inner()) = plaintext_networks(overrides);
        self.plaintext_users.store(has_plaintext_users(overrides), std::sync::atomic::Ordering::Relaxed);
        self.bandwidth.set_quota_overrides(quota_overrides(overrides));
        self.apply_rate_overrides(overrides);
    }

    fn apply_rate_overrides(&self, overrides: &crate::config::Overrides) {
        let users = &overrides.users;
        self.bandwidth.set_rate_overrides(
            users.iter().filter_map(|(u, o)| Some((u.clone(), o.download_bytes_per_user_per_second?.0))).collect(),
        );
        self.rates.set_command_overrides(
            users.iter().filter_map(|(u, o)| Some((u.clone(), o.commands_per_user_per_second?))).collect(),
        );
    }

    /// When the overrides file's plaintext exception for `account` (canonical; `None`: not
    /// known yet) or `ip`'s network ends: the later of the two.
    pub fn plaintext_exception(&self, account: Option<&str>, ip: IpAddr) -> Option<crate::units::Moment> {
        let user = account.and_then(|account| {
            self.users.read().unwrap_or_else(|p| p.into_inner()).get(account).and_then(|o| o.plaintext_until)
        });
        let networks = self.plaintext_networks.read().unwrap_or_else(|p| p.into_inner());
        let network = networks.iter().filter(|(n, _)| n.contains(ip)).map(|(_, until)| *until).max();
        user.max(network)
    }

    /// Whether some user has a plaintext exception (then a login's verdict waits for its
    /// user name).
    pub fn plaintext_user_exceptions(&self) -> bool {
        self.plaintext_users.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Trusted networks are exempt from authentication penalties.
    pub fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted.read().unwrap_or_else(|p| p.into_inner()).iter().any(|n| n.contains(ip))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn client_key(&self, ip: IpAddr) -> ClientKey {
        ClientKey::new(ip, self.config.ipv6_prefix)
    }

    /// A new connection from `ip` (within its rate and the caps), or what refuses it.
    pub async fn connect(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionLease, Refused> {
        let key = self.client_key(ip);
        let Some(fleet) = &self.fleet else {
            if !self.rates.connection(key) {
                return Err(Refused::Rate);
            }
            return self.connect_here(key);
        };
        let per_minute = self.config.connections_per_ip_per_minute;
        if per_minute > 0 {
            fleet_verdict(fleet.rate("connect", &fleet.key(&format!("rate:connect:{key}")), per_minute).await, |_| {
                Refused::Rate
            })?;
        }
        let sets = [
            (fleet.key("conn"), self.config.max_connections),
            (fleet.key(&format!("conn:ip:{key}")), self.config.max_connections_per_ip),
        ];
        let lease = fleet_verdict(fleet.acquire("connect", &sets).await, |full| {
            if full == 0 {
                Refused::Global
            } else {
                Refused::PerAddress
            }
        })?;
        Ok(ConnectionLease { _held: Held::Fleet { _lease: lease } })
    }

    fn connect_here(self: &Arc<Self>, key: ClientKey) -> Result<ConnectionLease, Refused> {
        let mut counts = self.lock();
        if counts.total >= self.config.max_connections {
            return Err(Refused::Global);
        }
        let from_here = counts.per_address.get(&key).copied().unwrap_or(0);
        if from_here >= self.config.max_connections_per_ip {
            return Err(Refused::PerAddress);
        }
        counts.total += 1;
        *counts.per_address.entry(key).or_default() += 1;
        Ok(ConnectionLease { _held: Held::Local { limits: self.clone(), key } })
    }

    /// `user`'s session caps: the overrides file's, else `[limits]`'.
    fn user_caps(&self, user: &str) -> (u32, u32) {
        let users = self.users.read().unwrap_or_else(|p| p.into_inner()).clone();
        let special = users.get(user);
        let per_user = special.and_then(|o| o.max_connections_per_user).unwrap_or(self.config.max_connections_per_user);
        let per_user_ip =
            special.and_then(|o| o.max_connections_per_user_ip).unwrap_or(self.config.max_connections_per_user_ip);
        (per_user, per_user_ip)
    }

    /// At shutdown, once sessions have ended: gives their shared leases back.
    pub async fn close(&self) {
        if let Some(fleet) = &self.fleet {
            fleet.close().await;
        }
    }

    /// A login of `user` from `ip`, or which cap refuses it.
    pub async fn login(self: &Arc<Self>, user: &str, ip: IpAddr) -> Result<UserLease, Refused> {
        let key = self.client_key(ip);
        let (per_user, per_user_ip) = self.user_caps(user);
        if let Some(fleet) = &self.fleet {
            let sets = [
                (fleet.key(&format!("conn:user:{user}")), per_user),
                (fleet.key(&format!("conn:userip:{key}:{user}")), per_user_ip),
            ];
            let lease = fleet_verdict(fleet.acquire("login", &sets).await, |full| {
                if full == 0 {
                    Refused::PerUser
                } else {
                    Refused::PerUserAddress
                }
            })?;
            return Ok(UserLease { _held: Held::Fleet { _lease: lease } });
        }
        let mut counts = self.lock();
        if counts.per_user.get(user).copied().unwrap_or(0) >= per_user {
            return Err(Refused::PerUser);
        }
        let pair = (user.to_string(), key);
        if counts.per_user_address.get(&pair).copied().unwrap_or(0) >= per_user_ip {
            return Err(Refused::PerUserAddress);
        }
        *counts.per_user.entry(user.to_string()).or_default() += 1;
        *counts.per_user_address.entry(pair).or_default() += 1;
        Ok(UserLease { _held: Held::User { limits: self.clone(), user: user.to_string(), key } })
    }

    /// Whether a login attempt from `ip` is within its rate (trusted networks are exempt).
    pub async fn login_rate(&self, ip: IpAddr) -> Result<(), Refused> {
        if self.trusted(ip) {
            return Ok(());
        }
        let key = self.client_key(ip);
        let per_minute = self.config.logins_per_ip_per_minute;
        match &self.fleet {
            None if self.rates.login(key) => Ok(()),
            None => Err(Refused::Rate),
            Some(_) if per_minute == 0 => Ok(()),
            Some(fleet) => {
                fleet_verdict(fleet.rate("login", &fleet.key(&format!("rate:login:{key}")), per_minute).await, |_| {
                    Refused::Rate
                })
            }
        }
    }

    /// Admits a login attempt of `user` (canonical) from `ip` unless the user is locked out
    /// there: its failures in the window, with the attempts still waiting for the upstream,
    /// reached `auth_lockout_failures`. The attempt counts until it is given to
    /// [`failed_login`](Limits::failed_login) or [`succeeded`](Limits::succeeded), or dropped.
    pub async fn attempt(self: &Arc<Self>, user: &str, ip: IpAddr, password: &str) -> Result<Attempt, Refused> {
        let key = self.client_key(ip);
        let password = self.penalties.digest(password);
        let attempt = |held| Attempt { user: user.to_string(), ip, key, password, held };
        if self.trusted(ip) {
            return Ok(attempt(AttemptHeld::Nothing));
        }
        match &self.fleet {
            None if self.penalties.begin(user, key, password, std::time::Instant::now()) => {
                Ok(attempt(AttemptHeld::Local(self.clone())))
            }
            None => Err(Refused::LockedOut),
            Some(fleet) => {
                let [_, failures] = self.failure_keys(fleet, user, key);
                let attempts = fleet.key(&format!("authtry:user:{key}:{user}"));
                let lockout = self.config.auth_lockout_failures;
                let lease = fleet_verdict(fleet.attempt(&failures, &attempts, lockout).await, |_| Refused::LockedOut)?;
                Ok(attempt(AttemptHeld::Fleet { _lease: lease }))
            }
        }
    }

    /// The shared failed-login counters: the address's, then the user and address's.
    fn failure_keys(&self, fleet: &Fleet, user: &str, key: ClientKey) -> [String; 2] {
        [fleet.key(&format!("authfail:ip:{key}")), fleet.key(&format!("authfail:user:{key}:{user}"))]
    }

    /// Records `attempt` as failed with `password`; how long to wait before answering it.
    /// The failure is counted before the attempt stops counting as in flight.
    pub async fn failed_login(&self, attempt: Attempt, password: &str) -> std::time::Duration {
        if self.trusted(attempt.ip) {
            return std::time::Duration::ZERO;
        }
        let (user, key) = (attempt.user.as_str(), attempt.key);
        let failure = self.penalties.failed(user, key, password, std::time::Instant::now());
        let Some(fleet) = &self.fleet else { return failure.delay };
        let [address, user_key] = self.failure_keys(fleet, user, key);
        match fleet.record_failure(&address, &user_key, failure.counted, self.config.auth_window.0).await {
            Some(failures) => self.penalties.delay(failures).max(failure.delay),
            None => failure.delay,
        }
    }

    /// A successful login clears the address's failures.
    pub fn succeeded(&self, attempt: Attempt) {
        self.penalties.succeeded(&attempt.user, attempt.key);
        if let Some(fleet) = &self.fleet {
            let (fleet, keys) = (fleet.clone(), self.failure_keys(fleet, &attempt.user, attempt.key));
            tokio::spawn(async move { fleet.clear(&keys).await });
        }
    }

    /// Keys held right now (for tests of the memory bound).
    pub fn tracked(&self) -> usize {
        let counts = self.lock();
        counts.per_address.len() + counts.per_user.len() + counts.per_user_address.len()
    }
}

/// `[limits] trusted_networks` and the overrides file's. Both were validated with the
/// configuration: unparsable entries were refused there.
fn trusted_networks(config: &LimitsConfig, overrides: &crate::config::Overrides) -> Vec<Network> {
    (config.trusted_networks.iter().chain(&overrides.trusted_networks)).filter_map(|n| Network::parse(n).ok()).collect()
}

fn has_plaintext_users(overrides: &crate::config::Overrides) -> bool {
    overrides.users.values().any(|o| o.plaintext_until.is_some())
}

fn plaintext_networks(overrides: &crate::config::Overrides) -> Vec<(Network, crate::units::Moment)> {
    (overrides.networks.iter())
        .filter_map(|(network, o)| Some((Network::parse(network).ok()?, o.plaintext_until)))
        .collect()
}

/// The overrides file with its users under their canonical names (two spellings of one
/// user: the first in the file's order wins).
fn canonical_overrides(
    canonical: &identity::Canonical,
    overrides: &crate::config::Overrides,
) -> crate::config::Overrides {
    let mut users = std::collections::BTreeMap::new();
    for (user, o) in &overrides.users {
        users.entry(canonical.user(user)).or_insert(*o);
    }
    crate::config::Overrides { users, ..overrides.clone() }
}

/// The overrides file's per-user download quotas.
fn quota_overrides(overrides: &crate::config::Overrides) -> HashMap<String, u64> {
    overrides.users.iter().filter_map(|(user, o)| Some((user.clone(), o.download_quota?.0))).collect()
}

/// The answer of the shared store as a limit's result: `refused` names the cap from the
/// index of the set that was full.
fn fleet_verdict<T>(verdict: Verdict<T>, refused: impl FnOnce(usize) -> Refused) -> Result<T, Refused> {
    match verdict {
        Verdict::Allowed(value) => Ok(value),
        Verdict::Refused(full) => Err(refused(full)),
        Verdict::Unavailable => Err(Refused::Unavailable),
    }
}

/// What a lease holds: counts in this process, or a lease in the shared store.
enum Held {
    Local { limits: Arc<Limits>, key: ClientKey },
    User { limits: Arc<Limits>, user: String, key: ClientKey },
    Fleet { _lease: fleet::Lease },
}

/// A login attempt admitted by [`Limits::attempt`]: it counts towards the user's lockout
/// while it waits for the upstream's answer.
pub struct Attempt {
    user: String,
    ip: IpAddr,
    key: ClientKey,
    /// The password's keyed digest (concurrent attempts with one password are one guess).
    password: u64,
    held: AttemptHeld,
}

enum AttemptHeld {
    /// A trusted network: nothing counted.
    Nothing,
    Local(Arc<Limits>),
    Fleet {
        _lease: fleet::Lease,
    },
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let AttemptHeld::Local(limits) = &self.held {
            limits.penalties.end(&self.user, self.key, self.password);
        }
    }
}

/// A connection slot; given back on drop.
pub struct ConnectionLease {
    _held: Held,
}

/// A logged-in session's slot for its user; given back on drop.
pub struct UserLease {
    _held: Held,
}

impl Drop for Held {
    fn drop(&mut self) {
        match self {
            Held::Local { limits, key } => {
                let mut counts = limits.lock();
                counts.total -= 1;
                release(&mut counts.per_address, key);
            }
            Held::User { limits, user, key } => {
                let mut counts = limits.lock();
                release(&mut counts.per_user, user);
                release(&mut counts.per_user_address, &(std::mem::take(user), *key));
            }
            Held::Fleet { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(global: u32, per_ip: u32, per_user: u32, per_user_ip: u32) -> Arc<Limits> {
        Limits::new(&LimitsConfig {
            max_connections: global,
            max_connections_per_ip: per_ip,
            max_connections_per_user: per_user,
            max_connections_per_user_ip: per_user_ip,
            ipv6_prefix: 64,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn caps_hold_and_leases_give_slots_back() {
        let limits = limits(3, 2, 2, 1);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = limits.connect(a).await.unwrap();
        let _second = limits.connect(a).await.unwrap();
        assert!(matches!(limits.connect(a).await, Err(Refused::PerAddress)));
        let _third = limits.connect(b).await.unwrap();
        assert!(matches!(limits.connect(b).await, Err(Refused::Global)));
        drop(first);
        let _again = limits.connect(b).await.unwrap();

        let alice = limits.login("alice", a).await.unwrap();
        assert!(matches!(limits.login("alice", a).await, Err(Refused::PerUserAddress)));
        let _elsewhere = limits.login("alice", b).await.unwrap();
        assert!(matches!(limits.login("alice", "192.0.2.3".parse().unwrap()).await, Err(Refused::PerUser)));
        drop(alice);
        let _back = limits.login("alice", a).await.unwrap();
    }

    #[tokio::test]
    async fn overrides_raise_or_lower_one_users_caps_and_add_trusted_networks() {
        let overrides: crate::config::Overrides = toml::from_str(
            "trusted_networks = [\"10.9.0.0/16\"]\n[users.bigcorp]\nmax_connections_per_user = 3\nmax_connections_per_user_ip = 3\n[users.abuser]\nmax_connections_per_user = 0\n",
        )
        .unwrap();
        let limits = Limits::new(&LimitsConfig {
            max_connections_per_user: 1,
            max_connections_per_user_ip: 1,
            trusted_networks: vec!["192.0.2.0/24".into()],
            overrides,
            ..Default::default()
        });
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let mut leases = Vec::new();
        for _ in 0..3 {
            leases.push(limits.login("bigcorp", a).await.unwrap());
        }
        assert!(matches!(limits.login("bigcorp", a).await, Err(Refused::PerUser)));
        let _alice = limits.login("alice", a).await.unwrap();
        assert!(matches!(limits.login("alice", a).await, Err(Refused::PerUser)), "the default for everyone else");
        assert!(matches!(limits.login("abuser", a).await, Err(Refused::PerUser)));
        assert!(limits.trusted("10.9.3.4".parse().unwrap()) && limits.trusted("192.0.2.9".parse().unwrap()));
        assert!(!limits.trusted(a));
        drop(leases);
    }

    #[tokio::test]
    async fn overrides_apply_to_every_spelling_of_a_user() {
        let overrides: crate::config::Overrides =
            toml::from_str("[users.\"BigCorp@Example.ORG\"]\nmax_connections_per_user = 2\n").unwrap();
        let limits = Limits::new(&LimitsConfig {
            max_connections_per_user: 1,
            default_domain: "example.org".into(),
            overrides,
            ..Default::default()
        });
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let canonical = limits.canonical("BIGCORP");
        assert_eq!(canonical, "bigcorp@example.org");
        let _one = limits.login(&canonical, a).await.unwrap();
        let _two = limits.login(&limits.canonical("bigcorp@example.org"), a).await.unwrap();
        assert!(matches!(limits.login(&limits.canonical("BigCorp"), a).await, Err(Refused::PerUser)));
    }

    #[tokio::test]
    async fn ipv6_addresses_group_by_prefix() {
        let limits = limits(100, 1, 10, 10);
        let _one = limits.connect("2001:db8:1:2::1".parse().unwrap()).await.unwrap();
        assert!(limits.connect("2001:db8:1:2:ffff::9".parse().unwrap()).await.is_err(), "same /64");
        assert!(limits.connect("2001:db8:1:3::1".parse().unwrap()).await.is_ok(), "another /64");
        assert_eq!(
            ClientKey::new("::ffff:192.0.2.1".parse().unwrap(), 64),
            ClientKey::new("192.0.2.1".parse().unwrap(), 64)
        );
    }

    #[tokio::test]
    async fn memory_follows_open_connections_not_addresses_seen() {
        let limits = limits(u32::MAX, 10, 10, 10);
        for i in 0..100_000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            let lease = limits.connect(ip).await.unwrap();
            let user = limits.login(&format!("user{i}"), ip).await.unwrap();
            drop((lease, user));
        }
        assert_eq!(limits.tracked(), 0);
    }
}
