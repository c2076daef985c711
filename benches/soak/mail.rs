//! Mailboxes with known content, their reference copies fetched straight from Dovecot,
//! and the two session scripts of churn and faults (an IMAP sync, a POP3 download) that
//! check every byte through mailgate against those references.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_rustls::rustls::ClientConfig;

use crate::harness::user;
use crate::proto::{open, Conn, Fail, Result, Rng};
use crate::support::dovecot::Dovecot;
use crate::support::mailgen;

/// The header sync of a mail client.
const HEADER_SYNC: &str =
    "UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE MESSAGE-ID)])";

/// One message as Dovecot serves it.
#[derive(Clone, Debug)]
pub struct Message {
    pub uid: u64,
    pub size: u64,
    /// (size, hash) of the header-fields literal, the BODY[] literal, the POP3 RETR text.
    pub header: (usize, u64),
    pub body: (usize, u64),
    pub pop3: (usize, u64),
}

pub struct Mailbox {
    pub user: String,
    pub password: String,
    pub messages: Vec<Message>,
}

/// Delivers `count` generated messages (big ones capped at `max_big`) to each of `users`,
/// seeded by the user so that no two mailboxes hold the same mail.
pub fn fill(dovecot: &Dovecot, users: usize, count: usize, max_big: usize) -> u64 {
    let mut total = 0;
    for i in 0..users {
        let name = user(i).0;
        for n in 0..count {
            let message = mailgen::message(1000 + i as u64, n, max_big);
            total += message.len() as u64;
            dovecot.deliver(&name, &message);
        }
    }
    total
}

/// Every mailbox's reference: header sync, bodies and POP3 texts fetched straight from
/// Dovecot (over TLS), `parallel` users at a time.
pub async fn references(dovecot: &Dovecot, users: usize, parallel: usize) -> Vec<Arc<Mailbox>> {
    let tls = crate::support::tls::client_config_trusting(&dovecot.ca_pem(), &[]);
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::new();
    for i in 0..users {
        let (imap, pop3, tls, gate) = (dovecot.imaps, dovecot.pop3s, tls.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            let (name, password) = user(i);
            reference(imap, pop3, &tls, name, password).await.unwrap_or_else(|e| panic!("reference of user {i}: {e:?}"))
        }));
    }
    let mut mailboxes = Vec::new();
    for task in tasks {
        mailboxes.push(Arc::new(task.await.unwrap()));
    }
    mailboxes
}

async fn reference(
    imap: SocketAddr,
    pop3: SocketAddr,
    tls: &Arc<ClientConfig>,
    user: String,
    password: String,
) -> Result<Mailbox> {
    let local: IpAddr = [127, 0, 0, 1].into();
    let timeout = Duration::from_secs(60);
    let mut conn = open(imap, local, tls, timeout).await?.conn;
    login(&mut conn, &user, &password).await?;
    conn.command("s", "SELECT INBOX", "select").await?;
    let headers = header_sync(&mut conn).await?;
    let mut messages = Vec::new();
    for (&uid, &(size, header)) in &headers {
        let body = body(&mut conn, uid).await?;
        messages.push(Message { uid, size, header, body, pop3: (0, 0) });
    }
    conn.command("z", "LOGOUT", "logout").await?;
    let mut conn = open(pop3, local, tls, timeout).await?.conn;
    conn.pop3(&format!("USER {user}"), "user").await?;
    conn.pop3(&format!("PASS {password}"), "pass").await?;
    for (n, message) in messages.iter_mut().enumerate() {
        conn.pop3(&format!("RETR {}", n + 1), "retr").await?;
        message.pop3 = conn.pop3_multiline("retr").await?;
    }
    conn.pop3("QUIT", "quit").await?;
    Ok(Mailbox { user, password, messages })
}

async fn login(conn: &mut Conn, user: &str, password: &str) -> Result<()> {
    conn.command("a", &format!("LOGIN {user} \"{password}\""), "login").await.map(drop)
}

/// UID → (RFC822.SIZE, header-fields literal) of a header sync.
async fn header_sync(conn: &mut Conn) -> Result<BTreeMap<u64, (u64, (usize, u64))>> {
    let mut found = BTreeMap::new();
    for response in conn.command("h", HEADER_SYNC, "header sync").await? {
        if !response.text.contains(" FETCH ") || response.literals.len() != 1 {
            continue;
        }
        let (Some(uid), Some(size)) = (response.number("UID"), response.number("RFC822.SIZE")) else {
            return Err(Fail::Other(format!("header sync response {:?}", response.text)));
        };
        found.insert(uid, (size, response.literals[0]));
    }
    Ok(found)
}

/// (size, hash) of `UID FETCH uid BODY.PEEK[]`.
async fn body(conn: &mut Conn, uid: u64) -> Result<(usize, u64)> {
    let responses = conn.command("b", &format!("UID FETCH {uid} BODY.PEEK[]"), "body").await?;
    let mut bodies = responses
        .iter()
        .filter(|r| r.text.contains(" FETCH ") && r.literals.len() == 1 && r.number("UID") == Some(uid));
    match (bodies.next(), bodies.next()) {
        (Some(r), None) => Ok(r.literals[0]),
        _ => Err(Fail::Other(format!("UID FETCH {uid} BODY.PEEK[]: {responses:?}"))),
    }
}

/// Operations done through mailgate, for rates.
#[derive(Default)]
pub struct Ops {
    pub logins: AtomicU64,
    pub header_syncs: AtomicU64,
    pub bodies: AtomicU64,
    pub retrs: AtomicU64,
    pub logouts: AtomicU64,
    pub bytes: AtomicU64,
}

impl Ops {
    pub fn total(&self) -> u64 {
        [&self.logins, &self.header_syncs, &self.bodies, &self.retrs, &self.logouts]
            .iter()
            .map(|c| c.load(Relaxed))
            .sum()
    }

    pub fn summary(&self) -> String {
        format!(
            "logins {}, header syncs {}, body fetches {}, POP3 RETRs {}, logouts {}, {:.1} MB of checked message data",
            self.logins.load(Relaxed),
            self.header_syncs.load(Relaxed),
            self.bodies.load(Relaxed),
            self.retrs.load(Relaxed),
            self.logouts.load(Relaxed),
            self.bytes.load(Relaxed) as f64 / 1e6
        )
    }
}

/// Where a script connects and how it waits.
pub struct Target {
    pub imap: SocketAddr,
    pub pop3: SocketAddr,
    pub tls: Arc<ClientConfig>,
    pub timeout: Duration,
    pub ops: Ops,
    /// connect() to greeting, every session.
    pub greetings: Mutex<Vec<Duration>>,
}

impl Target {
    /// `mailgate`'s implicit-TLS listeners, clients trusting `pki`, 60 s per operation.
    pub fn new(mailgate: &crate::harness::Mailgate, pki: &crate::support::tls::TestPki) -> Arc<Target> {
        Arc::new(Target {
            imap: mailgate.imaps,
            pop3: mailgate.pop3s,
            tls: crate::harness::client_tls(pki),
            timeout: Duration::from_secs(60),
            ops: Default::default(),
            greetings: Mutex::new(Vec::new()),
        })
    }
}

/// A POP3 session that got `-ERR` after QUIT's `+OK` (issue 12, defect 12).
pub const KNOWN_QUIT_ERR: &str = "-ERR-after-QUIT";

/// How sessions ended, by kind, with one example of each.
#[derive(Default)]
pub struct Outcomes(Mutex<BTreeMap<String, (u64, String)>>);

impl Outcomes {
    pub fn record(&self, result: &Result<()>) {
        let (kind, example) = match result {
            Ok(()) => ("ok".to_string(), String::new()),
            Err(Fail::No(text)) if text.starts_with("after QUIT") => (KNOWN_QUIT_ERR.to_string(), text.clone()),
            // Where the session was when it ended, for these.
            Err(fail @ (Fail::Closed(phase) | Fail::Truncated(phase) | Fail::Timeout(phase))) => {
                (format!("{} ({phase})", fail.kind()), format!("{fail:?}"))
            }
            Err(fail) => (fail.kind().to_string(), format!("{fail:?}")),
        };
        let mut map = self.0.lock().unwrap();
        let entry = map.entry(kind).or_insert((0, example));
        entry.0 += 1;
    }

    pub fn count(&self, kind: &str) -> u64 {
        self.0.lock().unwrap().get(kind).map_or(0, |e| e.0)
    }

    /// Sessions that ended neither well nor cleanly.
    pub fn unclean(&self) -> u64 {
        let clean = ["ok", "bye", "no/-err", "closed", KNOWN_QUIT_ERR];
        let unclean = |k: &str| !clean.iter().any(|c| k == *c || k.starts_with(&format!("{c} (")));
        self.0.lock().unwrap().iter().filter(|(k, _)| unclean(k)).map(|(_, e)| e.0).sum()
    }

    pub fn failed(&self) -> u64 {
        self.0.lock().unwrap().iter().filter(|(k, _)| *k != "ok").map(|(_, e)| e.0).sum()
    }

    pub fn print(&self, indent: &str) {
        for (kind, (count, example)) in self.0.lock().unwrap().iter() {
            let example = if example.is_empty() { String::new() } else { format!("   e.g. {}", cut(example, 150)) };
            println!("{indent}{kind:<14} {count:>8}{example}");
        }
    }
}

pub fn cut(text: &str, n: usize) -> String {
    if text.len() <= n {
        text.to_string()
    } else {
        format!("{}...", &text[..text.char_indices().take_while(|(i, _)| *i < n).last().map_or(0, |(i, _)| i)])
    }
}

/// An IMAP client's visit: login, SELECT, header sync (every header and size checked),
/// `bodies` random bodies (checked), LOGOUT and the close.
pub async fn imap_session(t: &Target, source: IpAddr, mb: &Mailbox, rng: &mut Rng, bodies: usize) -> Result<()> {
    let opened = open(t.imap, source, &t.tls, t.timeout).await?;
    t.greetings.lock().unwrap().push(opened.to_greeting);
    let mut conn = opened.conn;
    let result = imap_visit(t, &mut conn, mb, rng, bodies).await;
    note(&conn, &result);
    result
}

/// Prints where the first few odd ends happened (the client address finds the session in
/// mailgate's log).
fn note(conn: &Conn, result: &Result<()>) {
    static SHOWN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let odd = matches!(result, Err(e) if !matches!(e, Fail::Bye(_) | Fail::No(_)));
    if odd && SHOWN.fetch_add(1, Relaxed) < 20 {
        eprintln!("  session from {} ended: {:?}", conn.local, result.as_ref().unwrap_err());
    }
}

async fn imap_visit(t: &Target, conn: &mut Conn, mb: &Mailbox, rng: &mut Rng, bodies: usize) -> Result<()> {
    login(conn, &mb.user, &mb.password).await?;
    t.ops.logins.fetch_add(1, Relaxed);
    conn.command("s", "SELECT INBOX", "select").await?;
    let headers = header_sync(conn).await?;
    t.ops.header_syncs.fetch_add(1, Relaxed);
    if headers.len() != mb.messages.len() {
        return Err(Fail::Mismatch(format!(
            "{}: header sync of {} messages, {} expected",
            mb.user,
            headers.len(),
            mb.messages.len()
        )));
    }
    for m in &mb.messages {
        if headers.get(&m.uid) != Some(&(m.size, m.header)) {
            return Err(Fail::Mismatch(format!("{} UID {}: header fields or size differ", mb.user, m.uid)));
        }
    }
    for _ in 0..bodies {
        let m = &mb.messages[rng.below(mb.messages.len())];
        let got = body(conn, m.uid).await?;
        if got != m.body {
            return Err(Fail::Mismatch(format!("{} UID {}: body {:?}, Dovecot's {:?}", mb.user, m.uid, got, m.body)));
        }
        t.ops.bodies.fetch_add(1, Relaxed);
        t.ops.bytes.fetch_add(got.0 as u64, Relaxed);
    }
    conn.command("z", "LOGOUT", "logout").await?;
    conn.expect_close().await?;
    t.ops.logouts.fetch_add(1, Relaxed);
    Ok(())
}

/// A POP3 client's visit: USER/PASS, STAT, `retrs` random RETRs (checked), QUIT, close.
pub async fn pop3_session(t: &Target, source: IpAddr, mb: &Mailbox, rng: &mut Rng, retrs: usize) -> Result<()> {
    let opened = open(t.pop3, source, &t.tls, t.timeout).await?;
    t.greetings.lock().unwrap().push(opened.to_greeting);
    let mut conn = opened.conn;
    let result = pop3_visit(t, &mut conn, mb, rng, retrs).await;
    note(&conn, &result);
    result
}

async fn pop3_visit(t: &Target, conn: &mut Conn, mb: &Mailbox, rng: &mut Rng, retrs: usize) -> Result<()> {
    conn.pop3(&format!("USER {}", mb.user), "user").await?;
    conn.pop3(&format!("PASS {}", mb.password), "pass").await?;
    t.ops.logins.fetch_add(1, Relaxed);
    let stat = conn.pop3("STAT", "stat").await?;
    if stat.split_whitespace().nth(1) != Some(&mb.messages.len().to_string()) {
        return Err(Fail::Mismatch(format!("{}: STAT {stat:?}, {} messages expected", mb.user, mb.messages.len())));
    }
    for _ in 0..retrs {
        let n = rng.below(mb.messages.len());
        conn.pop3(&format!("RETR {}", n + 1), "retr").await?;
        let got = conn.pop3_multiline("retr").await?;
        if got != mb.messages[n].pop3 {
            return Err(Fail::Mismatch(format!(
                "{} RETR {}: {:?}, Dovecot's {:?}",
                mb.user,
                n + 1,
                got,
                mb.messages[n].pop3
            )));
        }
        t.ops.retrs.fetch_add(1, Relaxed);
        t.ops.bytes.fetch_add(got.0 as u64, Relaxed);
    }
    conn.pop3("QUIT", "quit").await?;
    // Issue 12, defect 12 (fixed elsewhere): mailgate may add `-ERR [SYS/TEMP] Mail
    // server closed the connection.` after QUIT's +OK. Named apart so that it is counted.
    match conn.expect_close().await {
        Err(Fail::Other(text)) if text.contains("-ERR") => Err(Fail::No(format!("after QUIT: {text}"))),
        other => other,
    }?;
    t.ops.logouts.fetch_add(1, Relaxed);
    Ok(())
}

/// Every message of `mb` through mailgate: a header sync, every body, every RETR.
pub async fn verify_all(t: &Target, source: IpAddr, mb: &Mailbox) -> Result<()> {
    let mut rng = Rng::new(1);
    imap_session(t, source, mb, &mut rng, 0).await?;
    let opened = open(t.imap, source, &t.tls, t.timeout).await?;
    let mut conn = opened.conn;
    login(&mut conn, &mb.user, &mb.password).await?;
    conn.command("s", "SELECT INBOX", "select").await?;
    for m in &mb.messages {
        let got = body(&mut conn, m.uid).await?;
        if got != m.body {
            return Err(Fail::Mismatch(format!("{} UID {}: body {:?}, Dovecot's {:?}", mb.user, m.uid, got, m.body)));
        }
    }
    conn.command("z", "LOGOUT", "logout").await?;
    let opened = open(t.pop3, source, &t.tls, t.timeout).await?;
    let mut conn = opened.conn;
    conn.pop3(&format!("USER {}", mb.user), "user").await?;
    conn.pop3(&format!("PASS {}", mb.password), "pass").await?;
    for (n, m) in mb.messages.iter().enumerate() {
        conn.pop3(&format!("RETR {}", n + 1), "retr").await?;
        let got = conn.pop3_multiline("retr").await?;
        if got != m.pop3 {
            return Err(Fail::Mismatch(format!("{} RETR {}: {:?}, Dovecot's {:?}", mb.user, n + 1, got, m.pop3)));
        }
    }
    conn.pop3("QUIT", "quit").await?;
    Ok(())
}

/// p-th percentile (0..=100) of `samples` in milliseconds.
pub fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_unstable();
    let i = ((samples.len() - 1) as f64 * p / 100.0).round() as usize;
    samples[i].as_secs_f64() * 1e3
}

pub fn latency_line(samples: &mut [Duration]) -> String {
    format!(
        "n={} p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        samples.len(),
        percentile(samples, 50.0),
        percentile(samples, 90.0),
        percentile(samples, 99.0),
        percentile(samples, 100.0)
    )
}
