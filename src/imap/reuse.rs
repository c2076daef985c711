//! Upstream IMAP sessions parked after a client's LOGOUT, for the next login with the
//! same credentials (`[imap] reuse_for`): a reconnecting client (a phone at every wake-up,
//! webmail per request) then costs the upstream no login (a password lookup, a process).
//!
//! A parked session must be indistinguishable from a fresh login, so:
//! - the key is the upstream, the canonical account, the client's address and the one it
//!   connected to, with whether it used TLS (the upstream was told them at login, in `ID`
//!   or PROXY v2) and an HMAC of the whole credentials (user, authzid,
//!   password) under a key drawn at start: a wrong password never matches, and no password
//!   is kept. OAuth logins are never parked (a token is not a lasting credential);
//! - the relay parks only a session whose state the client could not have changed for
//!   good (see `relay::Parking`), leaving a selected mailbox with `UNSELECT` (never
//!   `CLOSE`, which expunges);
//! - a session is checked with `NOOP` before it is handed out: anything but its tagged
//!   `OK` alone, within [`CHECK`], and it is dropped (the login goes upstream as usual);
//! - parked sessions are bounded per account and in all (the oldest go), expire after
//!   `reuse_for`, and are closed with `LOGOUT` on reload and shutdown.
//!
//! The pool must not decide whether a login is allowed: every login, reused or not, goes
//! through `Service::log_in` and its limits first.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use ring::hmac;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::response::Status;
use super::upstream::LoggedIn;
use crate::auth::Credentials;
use crate::cache::LoginProof;
use crate::metrics::Metrics;
use crate::origin::Origin;
use crate::stream::Stream;

/// How long a parked session may take to answer `NOOP` or `UNSELECT`: it is on a fast
/// link and has nothing else to do; a slower one is not worth waiting for.
const CHECK: Duration = Duration::from_secs(2);

/// The longest answer read from a parked session (a few short lines are expected).
const MAX_ANSWER: usize = 16 << 10;

/// Why parked sessions are dropped (`mailgate_upstream_sessions_dropped_total`).
pub const DROP_REASONS: &[&str] = &["expired", "dead", "evicted", "reload", "shutdown"];

/// What a parked session is found by. Two logins share a key only with the same upstream,
/// account, client address and credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    upstream: String,
    account: String,
    ip: IpAddr,
    /// The address the client connected to and whether it came over TLS: the upstream was
    /// told the first (`ID` `x-connected-ip`) and, with PROXY v2, the second.
    listener: (SocketAddr, bool),
    /// HMAC-SHA256 of the credentials. Compared as plain bytes: without the pool's key, how
    /// long a comparison takes tells nothing about a password.
    credentials: [u8; 32],
}

/// Whether a client command (its line's head) leaves nothing behind in the session once
/// it completed and the mailbox is left: the commands of RFC 9051 and the common
/// extensions whose effects live in the mailboxes, not in the session. Anything else
/// (ENABLE, COMPRESS, NOTIFY, LANGUAGE, a vendor's command, a second login) and the session
/// is not parked. CONDSTORE turned on by a command of this list is seen apart (the relay
/// asks `modseq::enabling`), and so is COMPRESS, which the relay answers itself and never
/// sends upstream (a compressing client's session may be parked).
pub fn keeps_session(head: &[u8]) -> bool {
    const KEEPS: &[&str] = &[
        "CAPABILITY",
        "NOOP",
        "ID",
        "SELECT",
        "EXAMINE",
        "CREATE",
        "DELETE",
        "RENAME",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "LIST",
        "LSUB",
        "STATUS",
        "APPEND",
        "CHECK",
        "CLOSE",
        "UNSELECT",
        "EXPUNGE",
        "SEARCH",
        "FETCH",
        "STORE",
        "COPY",
        "MOVE",
        "UID",
        "IDLE",
        "NAMESPACE",
        "GETQUOTA",
        "GETQUOTAROOT",
        "GETACL",
        "MYRIGHTS",
        "LISTRIGHTS",
        "GETMETADATA",
        "SORT",
        "THREAD",
        "ESEARCH",
    ];
    let command = head.split(|&b| b == b' ').nth(1).unwrap_or_default();
    KEEPS.iter().any(|name| command.eq_ignore_ascii_case(name.as_bytes()))
}

/// A session waiting for its next client.
struct Parked {
    key: Key,
    /// When the upstream last checked the credentials: the session's original login.
    logged_in: Instant,
    stream: Stream,
    capabilities: Vec<String>,
    proof: LoginProof,
}

/// The parked sessions of one configuration generation.
pub struct Pool {
    secret: hmac::Key,
    reuse_for: Duration,
    per_user: usize,
    total: usize,
    /// Oldest first: the front is what expires and is evicted first.
    parked: Mutex<VecDeque<Parked>>,
    /// Set on reload and shutdown: nothing more is parked.
    closed: std::sync::atomic::AtomicBool,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    /// The sweep and every log-out, so that shutdown can wait for them.
    tasks: TaskTracker,
}

/// What the relay needs to park its session at the end: where, and under which key.
pub struct Ticket {
    pub pool: Arc<Pool>,
    pub key: Key,
}

impl Pool {
    /// The pool for `config`, or `None` when reuse is off.
    pub fn new(
        config: &crate::config::ImapConfig,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Option<Arc<Pool>> {
        if config.reuse_for.0.is_zero() {
            return None;
        }
        let rng = ring::rand::SystemRandom::new();
        let secret = hmac::Key::generate(hmac::HMAC_SHA256, &rng).expect("the system's random source");
        Some(Arc::new(Pool {
            secret,
            reuse_for: config.reuse_for.0,
            per_user: config.reuse_per_user as usize,
            total: config.reuse_total as usize,
            parked: Mutex::new(VecDeque::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
            shutdown,
            metrics,
            tasks,
        }))
    }

    /// The key of a login of `credentials` as `account` (canonical) from `origin` at the
    /// upstream `upstream` (its identity: name and hosts); `None` for OAuth, which is never parked.
    pub fn key(&self, upstream: &str, credentials: &Credentials, account: &str, origin: &Origin) -> Option<Key> {
        if credentials.oauth.is_some() {
            return None;
        }
        let mut context = hmac::Context::with_key(&self.secret);
        // Length-prefixed, so that no two credentials give the same input.
        let authzid = credentials.authzid.as_deref();
        for part in [Some(credentials.user.as_str()), authzid, Some(credentials.password.expose().as_str())] {
            match part {
                Some(part) => {
                    context.update(&[1]);
                    context.update(&(part.len() as u64).to_be_bytes());
                    context.update(part.as_bytes());
                }
                None => context.update(&[0]),
            }
        }
        let mut tag = [0u8; 32];
        tag.copy_from_slice(context.sign().as_ref());
        Some(Key {
            upstream: upstream.to_string(),
            account: account.to_string(),
            ip: origin.client.ip(),
            listener: (origin.local, origin.tls.is_some()),
            credentials: tag,
        })
    }

    /// A parked session for `key` that answered `NOOP`, as a fresh login's result (the
    /// capabilities and proof of its own login); `None` to log in upstream.
    pub async fn take(&self, key: &Key) -> Option<LoggedIn> {
        loop {
            let parked = {
                let mut parked = self.lock();
                self.expire(&mut parked);
                // The newest: the least likely to have been closed by the upstream meanwhile.
                let position = parked.iter().rposition(|p| p.key == *key)?;
                let taken = parked.remove(position).expect("position is in range");
                self.metrics.upstream_sessions_parked.dec();
                taken
            };
            let Parked { mut stream, capabilities, proof, logged_in, .. } = parked;
            if command(&mut stream, b"R1 NOOP\r\n", b"R1", false).await {
                self.metrics.upstream_sessions_reused.inc();
                tracing::info!("parked upstream session reused");
                let leftover = BytesMut::new();
                return Some(LoggedIn { stream, capabilities, leftover, proof, reuse: None, logged_in });
            }
            self.dropped("dead", 1);
            tracing::debug!("parked upstream session did not answer NOOP: dropped");
            self.tasks.spawn(log_out(stream));
        }
    }

    /// Parks `stream` (whose client just logged out) under `ticket`, leaving its mailbox
    /// first when `selected`; a session that cannot be parked is logged out.
    pub async fn park(
        &self,
        key: Key,
        mut stream: Stream,
        capabilities: Vec<String>,
        proof: LoginProof,
        selected: bool,
        logged_in: Instant,
    ) {
        // However often it was reused, a session serves logins for `reuse_for` after the
        // upstream checked the password, no longer: a password changed or an account locked
        // upstream takes effect within that time.
        if logged_in.elapsed() >= self.reuse_for {
            self.dropped("expired", 1);
            self.tasks.spawn(log_out(stream));
            return;
        }
        let left = !selected || command(&mut stream, b"R0 UNSELECT\r\n", b"R0", true).await;
        if !left {
            self.tasks.spawn(log_out(stream));
            return;
        }
        let mut evicted = Vec::new();
        {
            let mut parked = self.lock();
            // Under the lock: the sweep closes the pool and empties it under the same lock,
            // so nothing parked after its last look stays forever.
            if self.is_closed() {
                drop(parked);
                self.tasks.spawn(log_out(stream));
                return;
            }
            self.expire(&mut parked);
            while parked.iter().filter(|p| p.key.account == key.account).count() >= self.per_user {
                let oldest = parked.iter().position(|p| p.key.account == key.account).expect("counted above");
                evicted.extend(parked.remove(oldest));
            }
            while parked.len() >= self.total {
                evicted.extend(parked.pop_front());
            }
            parked.push_back(Parked { key, logged_in, stream, capabilities, proof });
            // Added and taken, not set: a reload's old and new pools overlap for a moment.
            self.metrics.upstream_sessions_parked.add(1 - evicted.len() as i64);
        }
        self.dropped("evicted", evicted.len());
        for parked in evicted {
            self.tasks.spawn(log_out(parked.stream));
        }
        tracing::debug!("upstream session parked");
    }

    /// Drops the sessions parked for longer than `reuse_for`.
    fn expire(&self, parked: &mut VecDeque<Parked>) {
        let mut expired = 0;
        // By login time, which is not parking order (a reused session parks again).
        while let Some(i) = parked.iter().position(|p| p.logged_in.elapsed() >= self.reuse_for) {
            let gone = parked.remove(i).expect("position is in range");
            self.tasks.spawn(log_out(gone.stream));
            expired += 1;
        }
        if expired > 0 {
            self.metrics.upstream_sessions_parked.sub(expired as i64);
            self.dropped("expired", expired);
        }
    }

    /// Expires parked sessions until `stop` (the generation was replaced, or shutdown),
    /// then logs every one out: an idle parked session must not hold an upstream process
    /// past `reuse_for`, nor past its configuration.
    pub async fn sweep(self: Arc<Self>, stop: CancellationToken) {
        let every = (self.reuse_for / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {
                    let mut parked = self.lock();
                    self.expire(&mut parked);
                }
                _ = stop.cancelled() => break,
            }
        }
        let all: Vec<Parked> = {
            let mut parked = self.lock();
            self.closed.store(true, std::sync::atomic::Ordering::Relaxed);
            parked.drain(..).collect()
        };
        self.metrics.upstream_sessions_parked.sub(all.len() as i64);
        let reason = if self.shutdown.is_cancelled() { "shutdown" } else { "reload" };
        self.dropped(reason, all.len());
        if !all.is_empty() {
            tracing::info!(sessions = all.len(), reason, "parked upstream sessions closed");
        }
        for parked in all {
            self.tasks.spawn(log_out(parked.stream));
        }
    }

    /// Where the pool's background work runs (shutdown waits for it).
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Relaxed) || self.shutdown.is_cancelled()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Parked>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dropped(&self, reason: &str, count: usize) {
        if count > 0 {
            self.metrics.upstream_sessions_dropped.with_label_values(&[reason]).inc_by(count as u64);
        }
    }
}

/// Sends `line` and reads its answer within [`CHECK`]; see [`verdict`].
async fn command(stream: &mut Stream, line: &[u8], tag: &[u8], unselect: bool) -> bool {
    let answer = tokio::time::timeout(CHECK, async {
        stream.write_all(line).await?;
        stream.flush().await?;
        let mut buffer = BytesMut::with_capacity(512);
        loop {
            if stream.read_buf(&mut buffer).await? == 0 || buffer.len() > MAX_ANSWER {
                return Ok::<_, std::io::Error>(false);
            }
            if let Some(verdict) = verdict(&buffer, tag, unselect) {
                return Ok(verdict);
            }
        }
    })
    .await;
    matches!(answer, Ok(Ok(true)))
}

/// Sans-I/O: what a parked session's answer to mailgate's command `tag` says, once it is
/// complete (`None`: not yet). True for the tagged `OK` alone, and nothing after it. For
/// `UNSELECT` (`unselect`), untagged lines about the mailbox being left may come first, and
/// `BAD` counts too (RFC 3691: no mailbox was selected, which is the state wanted). Any
/// other line, a literal, or bytes after the completion: false.
fn verdict(buffer: &[u8], tag: &[u8], unselect: bool) -> Option<bool> {
    let tagged = |l: &[u8]| l.strip_prefix(tag).is_some_and(|r| r.starts_with(b" "));
    let mut lines = buffer.split_inclusive(|&b| b == b'\n');
    for line in lines.by_ref() {
        if !line.ends_with(b"\r\n") {
            return None;
        }
        let line = super::framing::strip_eol(line);
        if tagged(line) {
            let status = super::response::status(&line[tag.len() + 1..]).map(|s| s.status);
            let ok = status == Some(Status::Ok) || (unselect && status == Some(Status::Bad));
            return Some(ok && lines.next().is_none());
        }
        if !unselect || !line.starts_with(b"* ") || line.ends_with(b"}") {
            return Some(false);
        }
    }
    None
}

/// Logs a session out and closes it, without waiting on anyone: the upstream ends the
/// process at once instead of at its own timeout.
pub async fn log_out(mut stream: Stream) {
    let _ = tokio::time::timeout(CHECK, async {
        let _ = stream.write_all(b"R9 LOGOUT\r\n").await;
        let _ = stream.flush().await;
        let mut sink = [0u8; 512];
        while let Ok(1..) = stream.read(&mut sink).await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(user: &str, password: &str, authzid: Option<&str>) -> Credentials {
        Credentials {
            user: user.into(),
            password: crate::secret::Secret::new(password.to_string()),
            authzid: authzid.map(str::to_string),
            oauth: None,
        }
    }

    #[test]
    fn only_commands_without_session_state_keep_a_session_parkable() {
        for line in ["a SELECT INBOX", "b uid fetch 1:* (FLAGS)", "c NOOP", "d LIST \"\" *", "e IDLE"] {
            assert!(keeps_session(line.as_bytes()), "{line}");
        }
        for line in ["a ENABLE UTF8=ACCEPT", "b COMPRESS DEFLATE", "c NOTIFY SET", "d XAPPLEPUSHSERVICE", "e LOGIN a b"]
        {
            assert!(!keeps_session(line.as_bytes()), "{line}");
        }
    }

    #[test]
    fn a_parked_session_answers_its_check_with_the_tagged_ok_alone() {
        assert_eq!(verdict(b"R1 OK NOOP completed.\r\n", b"R1", false), Some(true));
        assert_eq!(verdict(b"R1 OK NOOP", b"R1", false), None, "not complete");
        assert_eq!(verdict(b"", b"R1", false), None);
        assert_eq!(verdict(b"* 3 EXISTS\r\nR1 OK done\r\n", b"R1", false), Some(false), "news it would lose");
        assert_eq!(verdict(b"* BYE idle\r\n", b"R1", false), Some(false));
        assert_eq!(verdict(b"R1 NO no\r\n", b"R1", false), Some(false));
        assert_eq!(verdict(b"R1 OK done\r\n* 1 EXISTS\r\n", b"R1", false), Some(false), "bytes after");
        assert_eq!(verdict(b"R10 OK done\r\n", b"R1", false), Some(false), "another tag");
        let unselect = b"* OK [CLOSED] x\r\nR0 OK Unselect completed.\r\n";
        assert_eq!(verdict(unselect, b"R0", true), Some(true));
        assert_eq!(verdict(b"R0 BAD No mailbox selected.\r\n", b"R0", true), Some(true));
        assert_eq!(verdict(b"* 1 FETCH (BODY[] {3}\r\n", b"R0", true), Some(false), "a literal");
    }

    #[test]
    fn keys_match_only_the_same_credentials() {
        let config =
            crate::config::ImapConfig { reuse_for: crate::units::Span(Duration::from_secs(60)), ..Default::default() };
        let metrics = Arc::new(Metrics::new(None, &Default::default()));
        let pool = Pool::new(&config, metrics, CancellationToken::new(), TaskTracker::new()).expect("reuse is on");
        let upstream = "u@127.0.0.1:143";
        let origin = |client: &str, local: &str, tls: bool| Origin {
            client: client.parse().unwrap(),
            local: local.parse().unwrap(),
            session: "s".into(),
            tls: tls.then(|| crate::proxy_header::TlsFacts {
                version: "TLSv1.3".into(),
                alpn: None,
                server_name: None,
            }),
        };
        let here = origin("192.0.2.1:5000", "127.0.0.1:993", true);
        let key = |c: &Credentials| pool.key(upstream, c, "alice", &here).unwrap();
        let right = key(&credentials("alice", "secret", None));
        assert!(right == key(&credentials("alice", "secret", None)));
        assert!(right != key(&credentials("alice", "Secret", None)), "another password");
        assert!(right != key(&credentials("alice", "secret", Some("bob"))), "an authzid");
        assert!(right != key(&credentials("alicesecret", "", None)), "no ambiguity between fields");
        let alice = credentials("alice", "secret", None);
        let from = |origin: &Origin| pool.key(upstream, &alice, "alice", origin).unwrap();
        assert!(right == from(&origin("192.0.2.1:6000", "127.0.0.1:993", true)), "another port is fine");
        assert!(right != from(&origin("192.0.2.2:5000", "127.0.0.1:993", true)), "another client address");
        assert!(right != from(&origin("192.0.2.1:5000", "127.0.0.1:143", true)), "another listener");
        assert!(right != from(&origin("192.0.2.1:5000", "127.0.0.1:993", false)), "without TLS");
        assert!(pool.key("v@127.0.0.1:143", &alice, "alice", &here).unwrap() != right, "another upstream");
    }
}
