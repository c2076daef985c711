//! One differential environment: the server with two accounts per logical user (the one
//! reached through mailgate and its twin), their initial folders, and mailgate in front
//! (unless the via sessions go straight to the server, `MAILGATE_FUZZ_VIA=direct`, which
//! must never find a difference: that proves the tester itself right).

use std::net::SocketAddr;

use crate::support::redis::Redis;
use crate::support::setup::gateway_config_with;
use crate::support::tls::TestPki;

use super::mailgate::Mailgate;
use super::server::{self, initial_folders, Kind, Server};
use super::wire::Endpoint;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Mailgate,
    Direct,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::Mailgate => "mailgate",
            Via::Direct => "direct",
        }
    }
}

/// How mailgate's cache is configured: its defaults, small (1 MiB in all, entries up to
/// 32 KiB: constant eviction, big items relayed unstored), or entries living 2 s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    Default,
    Small,
    Expiring,
    /// A small memory tier (as `Small`) in front of the shared tier in a redis-server of
    /// its own: what memory evicts comes back from Redis, under every mutation.
    Shared,
}

impl Cache {
    pub const ALL: [Cache; 4] = [Cache::Default, Cache::Small, Cache::Expiring, Cache::Shared];

    pub fn name(self) -> &'static str {
        match self {
            Cache::Default => "default",
            Cache::Small => "small",
            Cache::Expiring => "expiring",
            Cache::Shared => "shared",
        }
    }

    pub fn from_name(name: &str) -> Option<Cache> {
        Cache::ALL.into_iter().find(|c| c.name() == name.trim())
    }

    /// mailgate's `[cache]` for this mode (`redis` and `dir`: the shared tier's store and
    /// where its secret goes).
    fn config(self, redis: Option<&Redis>, dir: &std::path::Path) -> String {
        match (self, redis) {
            (Cache::Default, _) => String::new(),
            (Cache::Small, _) => "[cache]\nmax_bytes = \"1MiB\"\nmax_entry_bytes = \"32KiB\"\n".into(),
            (Cache::Expiring, _) => "[cache]\ntime_to_live = \"2s\"\n".into(),
            (Cache::Shared, Some(redis)) => {
                let secret = dir.join("cache-secret");
                std::fs::write(&secret, "the differential tester's secret, 32 bytes or more").unwrap();
                format!(
                    "[cache]\nmax_bytes = \"1MiB\"\nmax_entry_bytes = \"32KiB\"\n\n[cache.shared]\nenabled = true\nurl = \"{}\"\nsecret_file = {:?}\nencrypt = true\n",
                    redis.url(),
                    secret.display().to_string()
                )
            }
            (Cache::Shared, None) => unreachable!("the shared mode starts its Redis"),
        }
    }
}

/// A logical user: account `name` (through mailgate) and `name-twin` (direct), both
/// starting with the folders of `content_seed`.
#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub content_seed: u64,
}

pub struct Env {
    pub server: Box<dyn Server>,
    pub mailgate: Option<std::sync::Mutex<Mailgate>>,
    /// The shared cache tier's store, in `Cache::Shared`.
    _redis: Option<Redis>,
    via_imap: SocketAddr,
    via_pop3: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Past the defaults a long run logs in too often from 127.0.0.1.
const LIMITS: &str = "[limits]\nconnections_per_ip_per_minute = 0\nlogins_per_ip_per_minute = 0\n";

impl Env {
    pub fn start(via: Via, kind: Kind, cache: Cache, users: &[User]) -> Env {
        let accounts: Vec<String> = users.iter().flat_map(|u| [u.name.clone(), format!("{}-twin", u.name)]).collect();
        let server = server::start(kind, &accounts);
        for user in users {
            let folders = initial_folders(user.content_seed, kind.folders());
            server.provision(&user.name, &folders);
            server.provision(&format!("{}-twin", user.name), &folders);
        }
        let dir = tempfile::tempdir().unwrap();
        let redis = (cache == Cache::Shared && via == Via::Mailgate).then(Redis::start);
        let (mailgate, via_imap, via_pop3) = match via {
            Via::Direct => (None, server.imap().addr, server.pop3().addr),
            Via::Mailgate => {
                let pki = TestPki::generate(dir.path());
                let up = server.gateway_upstream();
                let extra = format!("{LIMITS}{}", cache.config(redis.as_ref(), dir.path()));
                let config =
                    gateway_config_with(&pki, Some(&up.imap), Some(&up.pop3), up.tls, up.ca.as_deref(), "", &extra);
                let mailgate = Mailgate::start(dir.path(), &config);
                let (imap, pop3) = (mailgate.addr("plain"), mailgate.addr("pop3-plain"));
                (Some(std::sync::Mutex::new(mailgate)), imap, pop3)
            }
        };
        Env { server, mailgate, _redis: redis, via_imap, via_pop3, _dir: dir }
    }

    /// IMAP for the accounts under test: mailgate's plaintext listener (or the server).
    pub fn via_imap(&self) -> Endpoint {
        self.endpoint(self.via_imap, self.server.imap())
    }

    pub fn via_pop3(&self) -> Endpoint {
        self.endpoint(self.via_pop3, self.server.pop3())
    }

    fn endpoint(&self, via: SocketAddr, direct: Endpoint) -> Endpoint {
        if self.mailgate.is_some() {
            Endpoint { addr: via, tls: None }
        } else {
            direct
        }
    }

    /// For reports: whether mailgate died, and its last log lines.
    pub fn mailgate_report(&self) -> String {
        let Some(m) = &self.mailgate else { return String::new() };
        let mut m = m.lock().unwrap();
        let status = match m.exited() {
            Some(status) => format!("mailgate EXITED: {status}\n"),
            None => String::new(),
        };
        format!("{status}--- mailgate log (tail) ---\n{}", m.log_tail())
    }

    /// Stops everything in the background (a server takes a second to stop); the test waits
    /// for all of them with [`wait_disposed`] before it ends, so that no server, process or
    /// throwaway user outlives it.
    pub fn dispose(self) {
        let handle = std::thread::spawn(move || drop(self));
        DISPOSING.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
    }
}

static DISPOSING: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>> = std::sync::Mutex::new(Vec::new());

/// Waits until every environment handed to [`Env::dispose`] has stopped.
pub fn wait_disposed() {
    let handles = std::mem::take(&mut *DISPOSING.lock().unwrap_or_else(|e| e.into_inner()));
    for handle in handles {
        let _ = handle.join();
    }
}
