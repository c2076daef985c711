//! Mail-client sync load against a real Dovecot, direct and through mailgate (release build)
//! with a cold and a warm message cache, all in the same run.
//!
//! `cargo bench --bench sync_load` fills one mailbox (10,000 mailgen messages by default),
//! then measures four workloads:
//!
//! - (a) header sync: `UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM TO
//!   SUBJECT DATE MESSAGE-ID)])`,
//! - (b) 1,000 full bodies, `UID FETCH n BODY.PEEK[]`, one command at a time,
//! - (c) POP3 `RETR` of 1,000 messages, one command at a time,
//! - (d) 16 concurrent clients doing (a) (aggregate rate),
//!
//! - (s) a header sync whose UID set is 9,000 single numbers in scattered order (a 54 KB
//!   command line: the CPU amplification an attacker tried, issue 12, defect 5; mailgate's
//!   CPU per command is the figure to watch),
//!
//! - (a') and (b'): (a) and (b) whose warm run follows another client's changes to the
//!   mailbox (1 % of the messages flagged or unflagged, 10 appended, 5 expunged), verified
//!   against a direct run after the same changes,
//! - (m) mbsync (the tests' isync) syncing the whole INBOX into a new Maildir: a real client
//!   that pipelines one `UID FETCH n (BODY.PEEK[])` per message (plaintext, like the rest),
//!
//! and, for context: (b1) and (b2), (b) in a session that first did a header sync (a) or a
//! flag sync `UID FETCH 1:* (UID FLAGS)` (untimed, traffic not counted); (f) that flag sync
//! alone, which is also what mailgate asks the upstream in phase one of (a).
//!
//! Each repetition runs the workload straight to Dovecot, then through a *fresh* mailgate
//! (cold cache), then again through that same mailgate (warm cache). Reported figures are
//! medians over the repetitions.
//!
//! With a shared cache tier (`[cache.shared]`, a redis-server the bench starts on loopback;
//! on unless `SYNC_LOAD_SHARED=0`), (a), (b) and (c) get two more rows: `cold+S`, a fresh
//! mailgate's cold run with the tier on (what the tier costs a cold sync: its writes), and
//! `shared`, the same workload through *another* fresh mailgate of the fleet right after
//! (memory cold, Redis warm: a user's second device on another instance, or an instance
//! after a restart). Redis is emptied before each repetition. `SYNC_LOAD_SHARED_COMPRESS=false`
//! measures the tier without compression (`[cache.shared] compress = false`).
//!
//! Plumbing, all on loopback and all plaintext so that direct and mailgate are compared
//! alike: Dovecot's plain IMAP/POP3 ports sit behind a byte-counting TCP forwarder (one per
//! protocol); direct clients and mailgate's upstream (`tls = "plaintext"`) both go through
//! it, so "upstream" bytes and command lines are counted the same way for both. Clients
//! reach mailgate on its plaintext listeners (`plain`, `pop3-plain`), so neither path pays
//! TLS and the difference is mailgate itself.
//!
//! Every response is checksummed (per message: size and a 64-bit hash of the response
//! bytes) and compared with the direct run: data served from the cache must be identical.
//!
//! Environment knobs (all optional):
//! - `SYNC_LOAD_MESSAGES` (default 10000): mailbox size,
//! - `SYNC_LOAD_ONLY` (e.g. `a,c`; default `a,b,b1,b2,c,d,f,s,m,a',b'`): run only these workloads,
//! - `SYNC_LOAD_REPS` (default `9,5,5,5`): repetitions for a, b, c (and m), d,
//! - `SYNC_LOAD_LATENCY_MS` (e.g. `1`): the forwarder delays every chunk by this much in
//!   each direction, as an upstream on another machine would (direct and mailgate's upstream
//!   leg pay it, `raw` does not),
//! - `SYNC_LOAD_POP3_MARK_SEEN=false`: mailgate does not send a RETR answered from the cache
//!   upstream for its `\Seen` (what `cache.pop3_mark_seen` costs, with (c)),
//! - `SYNC_LOAD_NO_MODSEQ=1`: the mailbox is one no CONDSTORE client ever opened, so Dovecot
//!   keeps no modification sequences for it and mailgate asks every resync's flags in full
//!   (by default a `SELECT INBOX (CONDSTORE)` opens it once first, as Thunderbird would have),
//! - `SYNC_LOAD_PERF` (a directory): record `perf record -e cpu-clock -g` of mailgate during
//!   each cold and warm run into `DIR/<workload>-<cold|warm>.data` (see docs/PERFORMANCE.md).

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memchr::memmem;
use support::dovecot::Dovecot;
use support::gateway::Gateway;
use support::setup::{gateway_config_with, BOB};
use support::tls::TestPki;
use support::wire::Wire;

const USER: (&str, &str) = BOB;
const SEED: u64 = 20_240_611;
const HEADER_SYNC: &[u8] =
    b"UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE MESSAGE-ID)])";
const BODIES: usize = 1000;
const CONCURRENT: usize = 16;

// ---------------------------------------------------------------------------------------
// Checksums

/// A streaming 64-bit hash (8-byte words, multiply-rotate); the same bytes give the same
/// value however they are split across `update` calls.
#[derive(Clone, Copy)]
struct Hash {
    state: u64,
    tail: u64,
    tail_len: u32,
    len: u64,
}

impl Hash {
    fn new() -> Hash {
        Hash { state: 0x243F_6A88_85A3_08D3, tail: 0, tail_len: 0, len: 0 }
    }

    #[inline]
    fn mix(&mut self, word: u64) {
        self.state = (self.state ^ word).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(31);
    }

    fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        while self.tail_len > 0 && !data.is_empty() {
            self.tail |= (data[0] as u64) << (8 * self.tail_len);
            self.tail_len += 1;
            data = &data[1..];
            if self.tail_len == 8 {
                let word = self.tail;
                self.mix(word);
                self.tail = 0;
                self.tail_len = 0;
            }
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            self.mix(u64::from_le_bytes(w.try_into().unwrap()));
        }
        for &b in words.remainder() {
            self.tail |= (b as u64) << (8 * self.tail_len);
            self.tail_len += 1;
        }
    }

    /// (length, hash) of everything fed so far.
    fn finish(&self) -> (u64, u64) {
        let mut h = *self;
        h.mix(h.tail ^ (h.tail_len as u64) << 56);
        h.mix(h.len);
        (h.len, h.state)
    }
}

/// Per-message (length, hash) in arrival order.
type Digest = Vec<(u64, u64)>;

// ---------------------------------------------------------------------------------------
// CPU time from /proc (no libc)

/// CPU time of the calling thread (on-CPU nanoseconds from schedstat).
fn thread_cpu() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    Duration::from_nanos(text.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0))
}

/// utime + stime of a process, in seconds (USER_HZ = 100 on Linux).
fn process_cpu(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields after the comm: state is [0], utime is field 14 overall = [11], stime [12].
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Resident memory of a process in bytes (VmRSS).
fn process_rss(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
    kib.unwrap_or(0.0) * 1024.0
}

/// What mailgate's cache weighs (its own accounting, `mailgate_cache_size_bytes`).
fn cache_bytes(gateway: &Gateway) -> f64 {
    let metrics = gateway.metrics();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("mailgate_cache_size_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// (busy, total) jiffies of the whole machine, from /proc/stat.
fn machine_cpu() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = text.lines().next().unwrap_or("");
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

// ---------------------------------------------------------------------------------------
// Byte-counting forwarder

#[derive(Default)]
struct Counters {
    /// Client (or mailgate) → Dovecot.
    up_bytes: AtomicU64,
    /// CRLF-terminated lines client → Dovecot: commands (plus literal lines, none here).
    up_lines: AtomicU64,
    /// Dovecot → client.
    down_bytes: AtomicU64,
    connections: AtomicU64,
    active: AtomicUsize,
}

#[derive(Clone, Copy, Debug, Default)]
struct Traffic {
    up: u64,
    lines: u64,
    down: u64,
    connections: u64,
}

impl Traffic {
    fn total(&self) -> u64 {
        self.up + self.down
    }
    fn minus(self, before: Traffic) -> Traffic {
        Traffic {
            up: self.up - before.up,
            lines: self.lines - before.lines,
            down: self.down - before.down,
            connections: self.connections - before.connections,
        }
    }
}

struct Forwarder {
    addr: SocketAddr,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    pumps: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Forwarder {
    /// `latency`: added to every chunk in each direction (an upstream on another machine).
    fn start(target: SocketAddr, latency: Duration) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind forwarder");
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let pumps = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (counters, stop, sockets, pumps) = (counters.clone(), stop.clone(), sockets.clone(), pumps.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    counters.connections.fetch_add(1, Ordering::SeqCst);
                    counters.active.fetch_add(1, Ordering::SeqCst);
                    {
                        let mut s = sockets.lock().unwrap();
                        s.push(client.try_clone().unwrap());
                        s.push(server.try_clone().unwrap());
                    }
                    let done = Arc::new(AtomicUsize::new(0));
                    let mut handles = Vec::new();
                    for up in [true, false] {
                        let (from, to) = if up {
                            (client.try_clone().unwrap(), server.try_clone().unwrap())
                        } else {
                            (server.try_clone().unwrap(), client.try_clone().unwrap())
                        };
                        let (counters, done) = (counters.clone(), done.clone());
                        handles.push(std::thread::spawn(move || {
                            pump(from, to, &counters, up, latency);
                            if done.fetch_add(1, Ordering::SeqCst) == 1 {
                                counters.active.fetch_sub(1, Ordering::SeqCst);
                            }
                        }));
                    }
                    pumps.lock().unwrap().extend(handles);
                }
            })
        };
        Forwarder { addr, counters, stop, accept: Some(accept), sockets, pumps }
    }

    fn snapshot(&self) -> Traffic {
        let c = &self.counters;
        Traffic {
            up: c.up_bytes.load(Ordering::SeqCst),
            lines: c.up_lines.load(Ordering::SeqCst),
            down: c.down_bytes.load(Ordering::SeqCst),
            connections: c.connections.load(Ordering::SeqCst),
        }
    }

    /// Waits (bounded) until every forwarded connection has closed on both sides.
    fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.counters.active.load(Ordering::SeqCst) == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}

fn pump(mut from: TcpStream, to: TcpStream, counters: &Counters, up: bool, latency: Duration) {
    // With a latency, a second thread writes each chunk once it is due: the delay of a
    // link, not a cap on its throughput.
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        let mut to = to;
        for (due, chunk) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if up {
            counters.up_bytes.fetch_add(n as u64, Ordering::Relaxed);
            let lines = memchr::memchr_iter(b'\n', &buf[..n]).count();
            counters.up_lines.fetch_add(lines as u64, Ordering::Relaxed);
        } else {
            counters.down_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        if tx.send((Instant::now() + latency, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop, then cut every connection so that the pumps end.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        for p in self.pumps.lock().unwrap().drain(..) {
            let _ = p.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The load generator's connection: one buffer, lines found with memchr, literals and POP3
// bodies consumed in bulk straight from the buffer.

fn literal_len(line: &[u8]) -> Option<usize> {
    let body = line.strip_suffix(b"}\r\n")?;
    let open = memchr::memrchr(b'{', body)?;
    std::str::from_utf8(&body[open + 1..]).ok()?.parse().ok()
}

fn is_tagged<'a>(line: &'a [u8], tag: &[u8]) -> Option<&'a [u8]> {
    line.strip_prefix(tag)?.strip_prefix(b" ")
}

// ---------------------------------------------------------------------------------------
// IMAP and POP3 sessions

/// Reads responses until `tag` completes; each untagged response (lines and literals) is
/// one digest entry. Panics unless the completion is OK.
fn imap_until(conn: &mut Wire, tag: &[u8], digest: Option<&mut Digest>) -> usize {
    let mut count = 0;
    let mut out = digest;
    let mut hash = Hash::new();
    let mut in_response = false;
    loop {
        let line = conn.line();
        if !in_response {
            if let Some(rest) = is_tagged(line, tag) {
                assert!(
                    rest.starts_with(b"OK"),
                    "{} failed: {}",
                    String::from_utf8_lossy(tag),
                    String::from_utf8_lossy(line)
                );
                return count;
            }
        }
        hash.update(line);
        let literal = literal_len(line);
        match literal {
            Some(n) => {
                conn.literal(n, |piece| hash.update(piece));
                in_response = true;
            }
            None => {
                if let Some(d) = out.as_deref_mut() {
                    d.push(hash.finish());
                }
                count += 1;
                hash = Hash::new();
                in_response = false;
            }
        }
    }
}

fn imap_login(addr: SocketAddr) -> Wire {
    let mut conn = Wire::connect(addr, 1 << 20);
    let greeting = conn.line().to_vec();
    assert!(greeting.starts_with(b"* OK"), "{}", String::from_utf8_lossy(&greeting));
    conn.send(format!("l LOGIN {} {}\r\n", USER.0, USER.1).as_bytes());
    imap_until(&mut conn, b"l", None);
    conn.send(b"s SELECT INBOX\r\n");
    imap_until(&mut conn, b"s", None);
    conn
}

/// Messages the mutator appends, and expunges, per change.
const CHANGE_APPENDS: usize = 10;
const CHANGE_EXPUNGES: usize = 5;

/// Another client changes the mailbox (straight at Dovecot): `\Flagged` toggled on 1 % of
/// the messages, [`CHANGE_APPENDS`] new messages, [`CHANGE_EXPUNGES`] expunged.
fn change_mailbox(addr: SocketAddr, messages: usize, round: usize) {
    let mut conn = imap_login(addr);
    let every = (messages / (messages / 100).max(1)).max(1);
    let set: Vec<String> = (1..=messages).step_by(every).map(|n| n.to_string()).collect();
    let sign = if round % 2 == 0 { '+' } else { '-' };
    conn.send(format!("f STORE {} {sign}FLAGS.SILENT (\\Flagged)\r\n", set.join(",")).as_bytes());
    imap_until(&mut conn, b"f", None);
    for i in 0..CHANGE_APPENDS {
        let message = format!(
            "From: mutator@example.com\r\nTo: {}\r\nSubject: change {round}.{i}\r\nDate: Mon, 7 Dec 2026 00:00:00 +0000\r\nMessage-ID: <change-{round}-{i}@example.com>\r\n\r\nNew mail {round}.{i}.\r\n",
            USER.0
        );
        conn.send(format!("p APPEND INBOX {{{}+}}\r\n{message}\r\n", message.len()).as_bytes());
        imap_until(&mut conn, b"p", None);
    }
    let doomed: Vec<String> = (0..CHANGE_EXPUNGES).map(|i| (50 + i * 100 + round).to_string()).collect();
    conn.send(format!("d STORE {} +FLAGS.SILENT (\\Deleted)\r\n", doomed.join(",")).as_bytes());
    imap_until(&mut conn, b"d", None);
    conn.send(b"e EXPUNGE\r\n");
    imap_until(&mut conn, b"e", None);
    imap_logout(conn);
}

fn imap_logout(mut conn: Wire) {
    conn.send(b"z LOGOUT\r\n");
    imap_until(&mut conn, b"z", None);
}

fn pop3_login(addr: SocketAddr) -> Wire {
    // Dovecot locks the maildrop per session and releases it just after the last one ends.
    for attempt in 0.. {
        let mut conn = Wire::connect(addr, 1 << 20);
        let greeting = conn.line().to_vec();
        assert!(greeting.starts_with(b"+OK"), "{}", String::from_utf8_lossy(&greeting));
        conn.send(format!("USER {}\r\nPASS {}\r\n", USER.0, USER.1).as_bytes());
        let user = conn.line().to_vec();
        assert!(user.starts_with(b"+OK"), "{}", String::from_utf8_lossy(&user));
        let pass = conn.line().to_vec();
        if pass.starts_with(b"+OK") {
            return conn;
        }
        assert!(attempt < 100 && pass.starts_with(b"-ERR [IN-USE]"), "{}", String::from_utf8_lossy(&pass));
        std::thread::sleep(Duration::from_millis(20));
    }
    unreachable!()
}

fn pop3_quit(mut conn: Wire) {
    conn.send(b"QUIT\r\n");
    let bye = conn.line().to_vec();
    assert!(bye.starts_with(b"+OK"), "{}", String::from_utf8_lossy(&bye));
}

/// What one client did during the timed part.
struct ClientRun {
    elapsed: Duration,
    messages: usize,
    bytes: u64,
    cpu: Duration,
    digest: Digest,
    /// When it finished (for the concurrent workload).
    finished: Instant,
}

fn timed(conn: &mut Wire, work: impl FnOnce(&mut Wire, &mut Digest) -> usize) -> ClientRun {
    let (rx, cpu) = (conn.rx, thread_cpu());
    let mut digest = Vec::new();
    let start = Instant::now();
    let messages = work(conn, &mut digest);
    let finished = Instant::now();
    ClientRun { elapsed: finished - start, messages, bytes: conn.rx - rx, cpu: thread_cpu() - cpu, digest, finished }
}

fn header_sync(conn: &mut Wire, digest: &mut Digest) -> usize {
    conn.send(&[b"h ", HEADER_SYNC, b"\r\n"].concat());
    imap_until(conn, b"h", Some(digest))
}

/// Ranges in the sparse set of (s).
const SPARSE_RANGES: usize = 9_000;

/// (s): the header items of 9,000 UIDs named one by one, scattered (and some twice), in
/// one command.
fn sparse_sync(conn: &mut Wire, digest: &mut Digest, messages: usize) -> usize {
    let set: Vec<String> = (0..SPARSE_RANGES).map(|i| ((i * 7919) % messages + 1).to_string()).collect();
    let items = "(UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE MESSAGE-ID)])";
    conn.send(format!("s UID FETCH {} {items}\r\n", set.join(",")).as_bytes());
    imap_until(conn, b"s", Some(digest))
}

fn flag_sync(conn: &mut Wire, digest: &mut Digest) -> usize {
    conn.send(b"f UID FETCH 1:* (UID FLAGS)\r\n");
    imap_until(conn, b"f", Some(digest))
}

fn bodies(conn: &mut Wire, digest: &mut Digest, count: usize) -> usize {
    let mut messages = 0;
    for uid in 1..=count {
        conn.send(format!("b{uid} UID FETCH {uid} BODY.PEEK[]\r\n").as_bytes());
        messages += imap_until(conn, format!("b{uid}").as_bytes(), Some(digest));
    }
    messages
}

fn retrs(conn: &mut Wire, digest: &mut Digest, count: usize) -> usize {
    let finder = memmem::Finder::new(b"\r\n.\r\n");
    for n in 1..=count {
        conn.send(format!("RETR {n}\r\n").as_bytes());
        let mut hash = Hash::new();
        let status = conn.line();
        assert!(status.starts_with(b"+OK"), "RETR {n}: {}", String::from_utf8_lossy(status));
        hash.update(status);
        conn.pop3_body(&finder, |piece| hash.update(piece));
        digest.push(hash.finish());
    }
    count
}

// ---------------------------------------------------------------------------------------
// Workloads and measurement

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    HeaderSync,
    /// (b) and its variants: what the session did before the (timed) body fetches.
    Bodies(Prelude),
    Retr,
    Concurrent,
    /// Reference: `UID FETCH 1:* (UID FLAGS)`, which is also the cache's phase one for (a).
    FlagSync,
    /// (s): a header sync of a 9,000-range set.
    SparseSync,
    /// (m): mbsync's full sync of the mailbox into an empty Maildir.
    Mbsync,
    /// (a') and (b'): (a) and (b), the warm run after another session changed the mailbox.
    Changed(Changed),
}

/// The workloads run again on a changed mailbox.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Changed {
    HeaderSync,
    Bodies,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Prelude {
    None,
    /// A header sync (a): through mailgate it teaches the session every UID's number.
    HeaderSync,
    /// A flag sync, relayed as is (no cacheable item).
    FlagSync,
}

impl Workload {
    fn letter(self) -> &'static str {
        match self {
            Workload::HeaderSync => "a",
            Workload::Bodies(Prelude::None) => "b",
            Workload::Bodies(Prelude::HeaderSync) => "b1",
            Workload::Bodies(Prelude::FlagSync) => "b2",
            Workload::Retr => "c",
            Workload::Concurrent => "d",
            Workload::FlagSync => "f",
            Workload::SparseSync => "s",
            Workload::Mbsync => "m",
            Workload::Changed(Changed::HeaderSync) => "a'",
            Workload::Changed(Changed::Bodies) => "b'",
        }
    }
    fn title(self) -> String {
        match self {
            Workload::HeaderSync => {
                "(a) header sync, UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (...)])".into()
            }
            Workload::Bodies(Prelude::None) => {
                format!("(b) {BODIES} x UID FETCH n BODY.PEEK[], sequential, fresh session")
            }
            Workload::Bodies(Prelude::HeaderSync) => {
                "(b1) as (b), after an (untimed, uncounted) header sync (a) in the same session".into()
            }
            Workload::Bodies(Prelude::FlagSync) => {
                "(b2) as (b), after an (untimed, uncounted) UID FETCH 1:* (UID FLAGS) in the same session".into()
            }
            Workload::Retr => format!("(c) POP3 RETR 1..{BODIES}, sequential"),
            Workload::Concurrent => format!("(d) {CONCURRENT} concurrent clients doing (a), aggregate"),
            Workload::FlagSync => "(f) reference: flag sync UID FETCH 1:* (UID FLAGS), relayed as is".into(),
            Workload::SparseSync => format!("(s) header sync of {SPARSE_RANGES} scattered single UIDs in one command"),
            Workload::Mbsync => {
                "(m) mbsync (isync) full sync of INBOX into a new Maildir (it pipelines UID FETCH n BODY.PEEK[])".into()
            }
            Workload::Changed(Changed::HeaderSync) => format!(
                "(a') as (a); between cold and warm another session flags 1 % of the messages, appends {CHANGE_APPENDS} and expunges {CHANGE_EXPUNGES}"
            ),
            Workload::Changed(Changed::Bodies) => format!(
                "(b') as (b); between cold and warm another session flags 1 % of the messages, appends {CHANGE_APPENDS} and expunges {CHANGE_EXPUNGES}"
            ),
        }
    }
}

/// One measured run of a workload (all its clients).
#[derive(Clone, Debug)]
struct Run {
    secs: f64,
    messages: usize,
    bytes: u64,
    client_cpu: f64,
    traffic: Traffic,
    mailgate_cpu: f64,
    /// Share of the machine's CPU (both cores) busy during the run.
    machine_busy: f64,
    /// mailgate's resident memory growth over the run, and its cache's weight after it.
    rss_growth: f64,
    cache_bytes: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.secs
    }
    fn mbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
}

struct Bench {
    /// Kept alive for the whole run.
    _dovecot: Dovecot,
    /// The shared tier's Redis, when the bench measures it.
    redis: Option<support::redis::Redis>,
    pki: TestPki,
    dir: tempfile::TempDir,
    imap: Forwarder,
    pop3: Forwarder,
    messages: usize,
    perf: Option<std::path::PathBuf>,
    problems: Vec<String>,
}

/// Where a run goes.
#[derive(Clone, Copy)]
enum Target<'a> {
    Direct,
    /// Straight to Dovecot, without the counting forwarder: what the forwarder's hop costs
    /// the direct path (no traffic figures).
    Raw,
    Mailgate(&'a Gateway),
}

impl Bench {
    fn start_gateway(&self) -> Gateway {
        self.start_gateway_with("")
    }

    /// A fresh mailgate of the fleet sharing the bench's Redis as its second cache tier.
    fn start_shared_gateway(&self) -> Gateway {
        let redis = self.redis.as_ref().expect("the shared tier's Redis");
        let secret = self.dir.path().join("cache-secret");
        std::fs::write(&secret, "the bench fleet's secret, thirty-two bytes or more").unwrap();
        self.start_gateway_with(&format!(
            "\n[cache.shared]\nenabled = true\nurl = \"{}\"\nsecret_file = {:?}\ncompress = {}\n",
            redis.url(),
            secret.display().to_string(),
            std::env::var("SYNC_LOAD_SHARED_COMPRESS").map_or(true, |v| v != "false")
        ))
    }

    /// Waits (bounded) until `gateway`'s writes to the shared tier have stopped growing.
    fn shared_writes_settled(gateway: &Gateway) {
        let written = || {
            let text = gateway.metrics();
            let line = text.lines().find(|l| l.starts_with("mailgate_cache_shared_writes_total{result=\"written\"}"));
            line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut last, mut steady) = (-1.0, 0);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
            let now = written();
            steady = if now == last && now > 0.0 { steady + 1 } else { 0 };
            if steady >= 4 {
                return;
            }
            last = now;
        }
        eprintln!("warning: the shared tier's writes did not settle");
    }

    fn start_gateway_with(&self, extra: &str) -> Gateway {
        let config = gateway_config_with(
            &self.pki,
            Some(&self.imap.addr.to_string()),
            Some(&self.pop3.addr.to_string()),
            "plaintext",
            None,
            "",
            &format!(
                "\n[cache]\nenabled = true\nmax_bytes = \"2GiB\"\nmax_entry_bytes = \"8MiB\"\npop3_mark_seen = {}\n{extra}",
                std::env::var("SYNC_LOAD_POP3_MARK_SEEN").map_or(true, |v| v != "false")
            ),
        );
        Gateway::start(self.dir.path(), &config)
    }

    fn addr(&self, workload: Workload, target: Target) -> SocketAddr {
        match (workload, target) {
            (Workload::Retr, Target::Raw) => self._dovecot.pop3,
            (_, Target::Raw) => self._dovecot.imap,
            (Workload::Retr, Target::Direct) => self.pop3.addr,
            (Workload::Retr, Target::Mailgate(g)) => g.addr("pop3-plain"),
            (_, Target::Direct) => self.imap.addr,
            (_, Target::Mailgate(g)) => g.addr("plain"),
        }
    }

    fn forwarder(&self, workload: Workload) -> &Forwarder {
        if workload == Workload::Retr {
            &self.pop3
        } else {
            &self.imap
        }
    }

    fn count(&self) -> usize {
        BODIES.min(self.messages)
    }

    /// Runs `workload` once against `target`; returns the measurements and the digests.
    fn run(&self, workload: Workload, target: Target, label: &str) -> (Run, Vec<Digest>) {
        let fwd = self.forwarder(workload);
        assert!(fwd.wait_idle(Duration::from_secs(10)), "forwarded connections did not close");
        let addr = self.addr(workload, target);
        let pid = match target {
            Target::Mailgate(g) => Some(g.pid()),
            Target::Direct | Target::Raw => None,
        };
        let perf = match (&self.perf, pid) {
            (Some(dir), Some(pid)) => Some(start_perf(dir, &format!("{}-{label}", workload.letter()), pid)),
            _ => None,
        };
        let traffic = fwd.snapshot();
        let mailgate_cpu = pid.map(process_cpu).unwrap_or(0.0);
        let rss = pid.map(process_rss).unwrap_or(0.0);
        let machine = machine_cpu();
        let count = self.count();
        let mut prelude = Traffic::default();
        let clients: Vec<ClientRun> = match workload {
            Workload::HeaderSync
            | Workload::FlagSync
            | Workload::SparseSync
            | Workload::Changed(Changed::HeaderSync) => {
                let mut conn = imap_login(addr);
                let messages = self.messages;
                let run = match workload {
                    Workload::HeaderSync | Workload::Changed(Changed::HeaderSync) => timed(&mut conn, header_sync),
                    Workload::SparseSync => timed(&mut conn, |c, d| sparse_sync(c, d, messages)),
                    _ => timed(&mut conn, flag_sync),
                };
                imap_logout(conn);
                vec![run]
            }
            Workload::Changed(Changed::Bodies) => {
                let mut conn = imap_login(addr);
                let run = timed(&mut conn, |c, d| bodies(c, d, count));
                imap_logout(conn);
                vec![run]
            }
            Workload::Bodies(before) => {
                let mut conn = imap_login(addr);
                // The prelude's answer is complete only once mailgate has all it asked the
                // upstream for, so the forwarder's counters are settled here.
                let at = fwd.snapshot();
                match before {
                    Prelude::None => {}
                    Prelude::HeaderSync => drop(header_sync(&mut conn, &mut Vec::new())),
                    Prelude::FlagSync => drop(flag_sync(&mut conn, &mut Vec::new())),
                }
                prelude = fwd.snapshot().minus(at);
                let run = timed(&mut conn, |c, d| bodies(c, d, count));
                imap_logout(conn);
                vec![run]
            }
            Workload::Retr => {
                let mut conn = pop3_login(addr);
                let run = timed(&mut conn, |c, d| retrs(c, d, count));
                pop3_quit(conn);
                vec![run]
            }
            Workload::Mbsync => vec![self.mbsync(addr, label)],
            Workload::Concurrent => {
                let barrier = Barrier::new(CONCURRENT + 1);
                std::thread::scope(|s| {
                    let handles: Vec<_> = (0..CONCURRENT)
                        .map(|_| {
                            let barrier = &barrier;
                            s.spawn(move || {
                                let mut conn = imap_login(addr);
                                barrier.wait();
                                let run = timed(&mut conn, header_sync);
                                imap_logout(conn);
                                run
                            })
                        })
                        .collect();
                    barrier.wait();
                    let start = Instant::now();
                    let mut runs: Vec<ClientRun> = handles.into_iter().map(|h| h.join().expect("client")).collect();
                    // The aggregate: from the common start to the last client's end.
                    let last = runs.iter().map(|r| r.finished).max().unwrap();
                    runs[0].elapsed = runs[0].elapsed.max(last.saturating_duration_since(start));
                    for r in runs.iter_mut().skip(1) {
                        r.elapsed = Duration::ZERO;
                    }
                    runs
                })
            }
        };
        let idle = fwd.wait_idle(Duration::from_secs(15));
        if !idle {
            eprintln!("warning: upstream connections still open after {label} {}", workload.letter());
        }
        let after_machine = machine_cpu();
        let mailgate_cpu = pid.map(|p| process_cpu(p) - mailgate_cpu).unwrap_or(0.0);
        let rss_growth = pid.map(|p| process_rss(p) - rss).unwrap_or(0.0);
        let cache = match target {
            Target::Mailgate(g) => cache_bytes(g),
            _ => 0.0,
        };
        if let Some(perf) = perf {
            stop_perf(perf);
        }
        let busy = (after_machine.0 - machine.0) as f64 / (after_machine.1 - machine.1).max(1) as f64;
        let secs = clients.iter().map(|c| c.elapsed).max().unwrap().as_secs_f64();
        let run = Run {
            secs,
            messages: clients.iter().map(|c| c.messages).sum(),
            bytes: clients.iter().map(|c| c.bytes).sum(),
            client_cpu: clients.iter().map(|c| c.cpu.as_secs_f64()).sum(),
            traffic: fwd.snapshot().minus(traffic).minus(prelude),
            mailgate_cpu,
            machine_busy: busy,
            rss_growth,
            cache_bytes: cache,
        };
        eprintln!(
            "  {}/{label:<6} {:>8.3}s {:>8} msgs {:>9.0} msg/s {:>8.1} MB/s  upstream {:>11} B {:>6} lines  client cpu {:.3}s  mailgate cpu {:.2}s  machine busy {:.0}%",
            workload.letter(),
            run.secs,
            run.messages,
            run.rate(),
            run.mbps(),
            run.traffic.total(),
            run.traffic.lines,
            run.client_cpu,
            run.mailgate_cpu,
            run.machine_busy * 100.0
        );
        (run, clients.into_iter().map(|c| c.digest).collect())
    }

    /// One mbsync run into a new Maildir: the time of the whole run (login to logout), the
    /// messages it stored, and a digest of their contents (sorted: mbsync's order of
    /// arrival is its own).
    fn mbsync(&self, addr: SocketAddr, label: &str) -> ClientRun {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let home = self.dir.path().join(format!("mbsync-{label}-{}", RUNS.fetch_add(1, Ordering::Relaxed)));
        let local = home.join("mail");
        std::fs::create_dir_all(&local).unwrap();
        let config = format!(
            // No fsync per message: the disk is not what is measured.
            "FSync no\n\nIMAPAccount bench\nHost {}\nPort {}\nUser {}\nPass \"{}\"\nSSLType None\nAuthMechs LOGIN\nTimeout 120\n\n\
             IMAPStore bench-far\nAccount bench\n\n\
             MaildirStore bench-near\nPath {local}/\nInbox {local}/INBOX\n\n\
             Channel bench\nFar :bench-far:\nNear :bench-near:\nPatterns INBOX\nSync Pull\nCreate Near\nExpunge None\nSyncState *\n",
            addr.ip(),
            addr.port(),
            USER.0,
            USER.1,
            local = local.display(),
        );
        let rc = home.join("mbsyncrc");
        std::fs::write(&rc, config).unwrap();
        // mbsync's own CPU (user + system) from GNU time, when it is installed.
        let times = home.join("cpu");
        let timed = std::path::Path::new("/usr/bin/time").exists();
        let mut cmd = Command::new(if timed { "/usr/bin/time" } else { "timeout" });
        if timed {
            cmd.args(["-f", "%U %S", "-o"]).arg(&times).arg("timeout");
        }
        cmd.args(["--kill-after=5", "600", support::mbsync::MBSYNC, "--quiet", "--config"])
            .arg(&rc)
            .arg("bench")
            .env("HOME", &home);
        let start = Instant::now();
        let run = support::process::run_bounded(cmd, Duration::from_secs(610));
        let elapsed = start.elapsed();
        assert!(run.status.success(), "mbsync failed: {}", support::process::tail(&run.stderr(), 20));
        let cpu = std::fs::read_to_string(&times)
            .ok()
            .and_then(|t| {
                t.lines().last().map(|l| l.split_whitespace().filter_map(|v| v.parse::<f64>().ok()).sum::<f64>())
            })
            .map_or(Duration::ZERO, Duration::from_secs_f64);
        // mbsync adds a random `X-TUID` header to every message it stores: taken out.
        let mut digest: Digest = support::mbsync::contents(&local.join("INBOX"), support::mbsync::strip_tuid)
            .iter()
            .map(|message| {
                let mut hash = Hash::new();
                hash.update(message);
                hash.finish()
            })
            .collect();
        digest.sort_unstable();
        let bytes = digest.iter().map(|&(len, _)| len).sum();
        let _ = std::fs::remove_dir_all(&home);
        ClientRun { elapsed, messages: digest.len(), bytes, cpu, digest, finished: Instant::now() }
    }

    /// Compares every client's digest with the direct reference.
    fn verify(&mut self, workload: Workload, label: &str, reference: &Digest, digests: &[Digest]) {
        for (i, digest) in digests.iter().enumerate() {
            if digest == reference {
                continue;
            }
            let mut report = format!(
                "({}) {label} client {i}: {} responses vs {} direct",
                workload.letter(),
                digest.len(),
                reference.len()
            );
            let wrong: Vec<usize> =
                (0..digest.len().max(reference.len())).filter(|&k| digest.get(k) != reference.get(k)).collect();
            report.push_str(&format!(", {} differ", wrong.len()));
            for &k in wrong.iter().take(5) {
                report.push_str(&format!(
                    "; #{} (uid/msg {}): {:?} vs direct {:?}",
                    k,
                    k + 1,
                    digest.get(k),
                    reference.get(k)
                ));
            }
            eprintln!("MISMATCH {report}");
            self.problems.push(report);
        }
    }
}

struct Perf {
    child: Child,
}

fn start_perf(dir: &std::path::Path, name: &str, pid: u32) -> Perf {
    let _ = std::fs::create_dir_all(dir);
    let child = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "2000", "-g", "-p", &pid.to_string(), "-o"])
        .arg(dir.join(format!("{name}.data")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("perf");
    std::thread::sleep(Duration::from_millis(300));
    Perf { child }
}

fn stop_perf(mut perf: Perf) {
    let _ = Command::new("kill").arg("-INT").arg(perf.child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = perf.child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = perf.child.kill();
    let _ = perf.child.wait();
}

fn median_by(runs: &[Run], f: impl Fn(&Run) -> f64) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn human(bytes: f64) -> String {
    if bytes >= 1e9 {
        format!("{:.2} GB", bytes / 1e9)
    } else if bytes >= 1e6 {
        format!("{:.2} MB", bytes / 1e6)
    } else if bytes >= 1e3 {
        format!("{:.1} kB", bytes / 1e3)
    } else {
        format!("{bytes:.0} B")
    }
}

fn main() {
    let wall = Instant::now();
    let messages: usize = std::env::var("SYNC_LOAD_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let only = std::env::var("SYNC_LOAD_ONLY").unwrap_or_else(|_| "a,b,b1,b2,c,d,f,s,m,a',b'".into());
    let reps: Vec<usize> = std::env::var("SYNC_LOAD_REPS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| v.len() == 4)
        .unwrap_or_else(|| vec![9, 5, 5, 5]);
    let perf = std::env::var_os("SYNC_LOAD_PERF").map(std::path::PathBuf::from);

    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let dovecot = Dovecot::start(&[USER]);
    let t = Instant::now();
    let total = dovecot.fill(USER.0, messages, SEED);
    let fill_secs = t.elapsed().as_secs_f64();
    eprintln!("mailbox: {messages} messages, {} ({fill_secs:.1}s to generate)", human(total as f64));
    let latency = Duration::from_micros(
        std::env::var("SYNC_LOAD_LATENCY_MS")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |ms| (ms * 1000.0) as u64),
    );
    if !latency.is_zero() {
        eprintln!("remote upstream: the forwarder adds {latency:?} per direction");
    }
    let imap = Forwarder::start(dovecot.imap, latency);
    let pop3 = Forwarder::start(dovecot.pop3, latency);
    let redis = (std::env::var("SYNC_LOAD_SHARED").map_or(true, |v| v != "0")
        && std::path::Path::new(support::redis::REDIS_SERVER).exists())
    .then(support::redis::Redis::start);
    let mut bench = Bench { _dovecot: dovecot, redis, pki, dir, imap, pop3, messages, perf, problems: Vec::new() };
    // The first session to select the mailbox sees every message \Recent (in FLAGS); take
    // that one out of the comparisons.
    imap_logout(imap_login(bench.imap.addr));
    // A CONDSTORE client (Thunderbird, Apple Mail) has opened the mailbox before: Dovecot
    // keeps its modification sequences from then on, and mailgate checks the flags it
    // remembers against them. `SYNC_LOAD_NO_MODSEQ=1` measures a mailbox without.
    if std::env::var_os("SYNC_LOAD_NO_MODSEQ").is_none() {
        let mut conn = imap_login(bench.imap.addr);
        conn.send(b"c SELECT INBOX (CONDSTORE)\r\n");
        imap_until(&mut conn, b"c", None);
        imap_logout(conn);
    }

    // Order matters: POP3 RETR makes Dovecot set \Seen, which (a) reports in FLAGS; it runs
    // last so that every IMAP comparison sees the same flags.
    let workloads = [
        (Workload::HeaderSync, reps[0]),
        (Workload::FlagSync, reps[0]),
        (Workload::SparseSync, reps[0]),
        (Workload::Concurrent, reps[3]),
        (Workload::Bodies(Prelude::None), reps[1]),
        (Workload::Bodies(Prelude::HeaderSync), reps[1]),
        (Workload::Bodies(Prelude::FlagSync), reps[1]),
        (Workload::Retr, reps[2]),
        // Last too: mbsync's fetches do not set \Seen (BODY.PEEK), but it takes longest.
        (Workload::Mbsync, reps[2]),
        // Last of all: they change the mailbox.
        (Workload::Changed(Changed::HeaderSync), reps[0].min(5)),
        (Workload::Changed(Changed::Bodies), reps[1]),
    ];
    let mut results = Vec::new();
    for (workload, reps) in workloads {
        if !only.split(',').any(|w| w.trim() == workload.letter()) || reps == 0 {
            continue;
        }
        eprintln!("{}", workload.title());
        let t = Instant::now();
        // Warm Dovecot (its index cache, the page cache, \Recent) and take the reference.
        let (_, reference) = bench.run(workload, Target::Direct, "prime");
        let reference = reference[0].clone();
        let (mut direct, mut raw, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut cold_shared, mut shared) = (Vec::new(), Vec::new());
        let measures_shared = bench.redis.is_some()
            && matches!(workload, Workload::HeaderSync | Workload::Bodies(Prelude::None) | Workload::Retr);
        for rep in 0..reps {
            let gateway;
            if let Workload::Changed(_) = workload {
                // Cold fills a fresh mailgate; another client changes the mailbox; direct
                // (the reference for this round) and warm see the changed mailbox.
                gateway = bench.start_gateway();
                let (run, _) = bench.run(workload, Target::Mailgate(&gateway), "cold");
                cold.push(run);
                change_mailbox(bench.imap.addr, bench.messages, rep);
                let (run, reference) = bench.run(workload, Target::Direct, "direct");
                direct.push(run);
                let (run, digests) = bench.run(workload, Target::Raw, "raw");
                bench.verify(workload, "raw", &reference[0], &digests);
                raw.push(run);
                let (run, digests) = bench.run(workload, Target::Mailgate(&gateway), "warm");
                bench.verify(workload, "warm", &reference[0], &digests);
                warm.push(run);
            } else {
                let (run, digests) = bench.run(workload, Target::Direct, "direct");
                bench.verify(workload, "direct", &reference, &digests);
                direct.push(run);
                let (run, digests) = bench.run(workload, Target::Raw, "raw");
                bench.verify(workload, "raw", &reference, &digests);
                raw.push(run);
                gateway = bench.start_gateway();
                let (run, digests) = bench.run(workload, Target::Mailgate(&gateway), "cold");
                bench.verify(workload, "cold", &reference, &digests);
                cold.push(run);
                let (run, digests) = bench.run(workload, Target::Mailgate(&gateway), "warm");
                bench.verify(workload, "warm", &reference, &digests);
                warm.push(run);
            }
            if measures_shared {
                let redis = bench.redis.as_ref().expect("checked");
                redis.command(&["FLUSHALL"]);
                let first = bench.start_shared_gateway();
                let (run, digests) = bench.run(workload, Target::Mailgate(&first), "cold+S");
                bench.verify(workload, "cold+S", &reference, &digests);
                cold_shared.push(run);
                Bench::shared_writes_settled(&first);
                let second = bench.start_shared_gateway();
                let (run, digests) = bench.run(workload, Target::Mailgate(&second), "shared");
                bench.verify(workload, "shared", &reference, &digests);
                shared.push(run);
            }
            // mailgate logs a session's end after closing its upstream connection: wait
            // (bounded) for the warm session's line.
            let sessions = if workload == Workload::Concurrent { 2 * CONCURRENT } else { 2 };
            let deadline = Instant::now() + Duration::from_secs(5);
            while gateway.log().matches("session ended").count() < sessions && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let log = gateway.log();
            for line in log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")) {
                // The plaintext upstream is configured on purpose.
                if !line.contains("plaintext") {
                    eprintln!("  mailgate: {line}");
                    bench.problems.push(format!("({}) mailgate logged: {line}", workload.letter()));
                }
            }
            let ended: Vec<&str> = log.lines().filter(|l| l.contains("session ended")).collect();
            if let Some(last) = ended.last() {
                let field =
                    |k: &str| last.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or("?").to_string();
                eprintln!(
                    "  last mailgate session: cache_hits={} cache_misses={}",
                    field("cache_hits="),
                    field("cache_misses=")
                );
            }
            drop(gateway);
        }
        eprintln!("  ({:.1}s)", t.elapsed().as_secs_f64());
        results.push((workload, reps, direct, raw, cold, warm, reference.len(), cold_shared, shared));
    }

    // The table.
    println!();
    println!(
        "sync_load: {messages} messages ({}), medians; clients and upstream plaintext on loopback; {} cores",
        human(total as f64),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!(
        "upstream = bytes both ways between the client (direct) or mailgate and Dovecot; up cmds = CRLF lines \
         sent to Dovecot; ratios are against `direct`; `raw` is direct without the counting forwarder"
    );
    println!(
        "{:<6} {:>4} {:>10} {:>8} {:>10} {:>7} {:>8} {:>7} {:>5}  {:>8} {:>8} {:>8} {:>8}",
        "run",
        "reps",
        "msg/s",
        "MB/s",
        "upstream",
        "up cmds",
        "cli cpu",
        "mg cpu",
        "busy",
        "rate",
        "bytes",
        "cmds",
        "vs raw"
    );
    for (workload, reps, direct, raw, cold, warm, responses, cold_shared, shared) in &results {
        println!("{}  [{} responses per client]", workload.title(), responses);
        let d_rate = median_by(direct, Run::rate);
        let d_bytes = median_by(direct, |r| r.traffic.total() as f64);
        let d_lines = median_by(direct, |r| r.traffic.lines as f64);
        let r_rate = median_by(raw, Run::rate);
        let rows = [
            ("direct", direct),
            ("raw", raw),
            ("cold", cold),
            ("warm", warm),
            ("cold+S", cold_shared),
            ("shared", shared),
        ];
        for (label, runs) in rows.into_iter().filter(|(_, runs)| !runs.is_empty()) {
            let rate = median_by(runs, Run::rate);
            let bytes = median_by(runs, |r| r.traffic.total() as f64);
            let lines = median_by(runs, |r| r.traffic.lines as f64);
            let (traffic, ratios) = match label {
                "direct" => (format!("{:>10} {:>7.0}", human(bytes), lines), String::new()),
                "raw" => (format!("{:>10} {:>7}", "n/a", "n/a"), format!("{:>7.2}x", rate / d_rate)),
                _ => (
                    format!("{:>10} {:>7.0}", human(bytes), lines),
                    format!(
                        "{:>7.2}x {:>7.2}% {:>7.1}x {:>7.2}x",
                        rate / d_rate,
                        bytes / d_bytes * 100.0,
                        lines / d_lines,
                        rate / r_rate
                    ),
                ),
            };
            println!(
                "{:<6} {:>4} {:>10.0} {:>8.1} {} {:>7.3}s {:>6.2}s {:>4.0}%  {}",
                label,
                reps,
                rate,
                median_by(runs, Run::mbps),
                traffic,
                median_by(runs, |r| r.client_cpu),
                median_by(runs, |r| r.mailgate_cpu),
                median_by(runs, |r| r.machine_busy * 100.0),
                ratios
            );
        }
    }
    println!();
    for (workload, _, direct, _, cold, _, _, cold_shared, shared) in &results {
        if shared.is_empty() {
            continue;
        }
        let rate = |runs: &Vec<Run>| median_by(runs, Run::rate);
        let bytes = |runs: &Vec<Run>| median_by(runs, |r| r.traffic.total() as f64);
        println!(
            "shared tier ({}): another instance's resync {:.2}x direct at {:.2}% of direct's upstream bytes; \
             a cold sync with the tier on {:.2}x of one without",
            workload.letter(),
            rate(shared) / rate(direct),
            bytes(shared) / bytes(direct) * 100.0,
            rate(cold_shared) / rate(cold)
        );
    }
    println!();
    println!("memory: mailgate's resident growth over the cold run against what its cache says it holds after it");
    for (workload, _, _, _, cold, _, _, _, _) in &results {
        let growth = median_by(cold, |r| r.rss_growth);
        let held = median_by(cold, |r| r.cache_bytes);
        println!(
            "({}) RSS +{}  cache {}  ratio {:.2}",
            workload.letter(),
            human(growth),
            human(held),
            if held > 0.0 { growth / held } else { 0.0 }
        );
    }
    println!();
    if bench.problems.is_empty() {
        println!("verification: every response through mailgate (cold and warm) equals the direct one (size and hash)");
    } else {
        println!("verification FAILED ({} client runs differ from direct):", bench.problems.len());
        for p in &bench.problems {
            println!("  {p}");
        }
    }
    println!("total runtime {:.1}s (mailbox generation {fill_secs:.1}s)", wall.elapsed().as_secs_f64());
    drop(bench);
}
