//! mailgate's plain relay (cache off) against two reference proxies, in the same run, in
//! front of a real Dovecot, with every ratio taken against direct Dovecot:
//!
//! - **direct**: Dovecot's plain IMAP and POP3 ports;
//! - **HAProxy TCP** (`mode tcp`, `option splice-auto`): one hop that parses nothing, the
//!   ceiling for any relay on this machine;
//! - **nginx mail** (`proxy_buffer 64k`, an `auth_http` endpoint in this process that sends
//!   every login to Dovecot): a proxy that, like mailgate, speaks the protocols until login
//!   and then relays;
//! - **mailgate**: release build, `[cache] enabled = false`, plaintext listeners (`plain`,
//!   `pop3-plain`), upstream Dovecot over plain text.
//!
//! Plain text on both legs for every path, all on loopback: the difference between paths
//! is the relay itself. HAProxy and nginx are installed with apt-get when missing
//! (tests/support/peers.rs).
//!
//! Workloads (IMAP on a 10,000-message INBOX, POP3 on a 1,000-message maildrop), each
//! repeated within a timed run until direct takes about `PEERS_TARGET_MS` (1.5 s; a short
//! run ranks the paths by the machine's noise):
//! - login + `SELECT INBOX` + `LOGOUT`, sessions one after the other (at least 50);
//! - 300 bodies one at a time, `UID FETCH n BODY.PEEK[]` for UIDs 1..300, each awaited
//!   (passes over those 300 in one session);
//! - POP3 `RETR 1..1000`, each awaited (passes in one session);
//! - header sync, `UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (From To
//!   Subject Date Message-ID)])`, in one session;
//! - flag sync, `UID FETCH 1:* (UID FLAGS)`, in one session;
//! - 16 concurrent sessions (16 threads, one user) doing header syncs (aggregate: from a
//!   common start to the last one's end).
//!
//! An untimed warm-up runs each workload once on every path (the first session takes the
//! messages' `\Recent`, Dovecot's cache learns the header fields, the mail comes into the
//! page cache) and once more directly, which sets the repetitions.
//!
//! Each workload runs on every path in a round, the paths' order rotating from round to
//! round so that drift hits all alike; figures are medians over the rounds. What a path's
//! answers carry (untagged responses and literals, POP3 bodies) must have the length of the
//! direct answers, or the bench says so and fails.
//!
//! Printed: per workload the median time per unit on each path, the rate ratio against
//! direct (`direct time / path time`: above 1 is faster than direct), mailgate's rate
//! against HAProxy's and nginx's; then each relay's CPU (utime + stime from /proc) per MB
//! and per command it relayed (the client's bytes both ways and its commands, logins and
//! logouts included, over the relay's share of every round).
//!
//! Environment knobs (all optional):
//! - `PEERS_ROUNDS` (default 3): rounds;
//! - `PEERS_MESSAGES` (default 10000): the IMAP INBOX's size (e.g. 100000);
//! - `PEERS_TARGET_MS` (default 1500): how long a timed direct run should take;
//! - `PEERS_ONLY` (e.g. `headers,concurrent`; default all of `login,bodies,retr,headers,
//!   flags,concurrent`);
//! - `PEERS_OUT` (a path): also write the tables there, as markdown.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use memchr::memmem;
use support::dovecot::{Dovecot, Options};
use support::gateway::Gateway;
use support::peers::{self, Haproxy, NginxMail};
use support::setup::{gateway_config_with, BOB};
use support::tls::TestPki;
use support::wire::Wire;

/// The IMAP user, with the big INBOX.
const USER: (&str, &str) = BOB;
/// The POP3 user: a maildrop of its own, since POP3 sessions set `\Seen` at QUIT.
const POP3_USER: (&str, &str) = ("popper", "pop-Pass-7");
const SEED: u64 = 20_261_214;
const LOGINS: usize = 50;
const BODIES: usize = 300;
const RETRS: usize = 1000;
const CONCURRENT: usize = 16;
const HEADER_SYNC: &[u8] =
    b"UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (From To Subject Date Message-ID)])";
const FLAG_SYNC: &[u8] = b"UID FETCH 1:* (UID FLAGS)";

// ---------------------------------------------------------------------------------------
// The load generator's connection: one buffer, lines found with memchr, literals and POP3
// bodies skipped in bulk; counts what goes through.

fn literal_len(line: &[u8]) -> Option<usize> {
    let body = line.strip_suffix(b"}\r\n")?;
    let open = memchr::memrchr(b'{', body)?;
    std::str::from_utf8(&body[open + 1..]).ok()?.parse().ok()
}

/// Reads responses until `tag` completes (panics unless OK); returns the length of the
/// untagged responses (lines and literals): the payload, which the tagged completion's
/// text (Dovecot's timings) is not.
fn imap_until(conn: &mut Wire, tag: &[u8]) -> u64 {
    let mut payload = 0;
    loop {
        let line = conn.line();
        if let Some(rest) = line.strip_prefix(tag).and_then(|r| r.strip_prefix(b" ")) {
            assert!(
                rest.starts_with(b"OK"),
                "{} failed: {}",
                String::from_utf8_lossy(tag),
                String::from_utf8_lossy(line)
            );
            return payload;
        }
        payload += line.len() as u64;
        if let Some(n) = literal_len(line) {
            conn.literal(n, |_| {});
            payload += n as u64;
            // The rest of the response follows the literal on a line of its own.
            while let Some(n) = {
                let line = conn.line();
                payload += line.len() as u64;
                literal_len(line)
            } {
                conn.literal(n, |_| {});
                payload += n as u64;
            }
        }
    }
}

fn imap_session(addr: SocketAddr) -> Wire {
    let mut conn = Wire::connect(addr, 1 << 18);
    let greeting = conn.line().to_vec();
    assert!(greeting.starts_with(b"* OK"), "{}", String::from_utf8_lossy(&greeting));
    conn.command(format!("l LOGIN {} {}", USER.0, USER.1).as_bytes());
    imap_until(&mut conn, b"l");
    conn.command(b"s SELECT INBOX");
    imap_until(&mut conn, b"s");
    conn
}

fn imap_logout(conn: &mut Wire) {
    conn.command(b"z LOGOUT");
    imap_until(conn, b"z");
}

fn pop3_session(addr: SocketAddr) -> Wire {
    // Dovecot locks the maildrop per session and releases it just after the last one ends.
    for attempt in 0.. {
        let mut conn = Wire::connect(addr, 1 << 18);
        let greeting = conn.line().to_vec();
        assert!(greeting.starts_with(b"+OK"), "{}", String::from_utf8_lossy(&greeting));
        conn.command(format!("USER {}", POP3_USER.0).as_bytes());
        let user = conn.line().to_vec();
        assert!(user.starts_with(b"+OK"), "{}", String::from_utf8_lossy(&user));
        conn.command(format!("PASS {}", POP3_USER.1).as_bytes());
        let pass = conn.line().to_vec();
        if pass.starts_with(b"+OK") {
            return conn;
        }
        assert!(attempt < 100 && pass.windows(6).any(|w| w == b"IN-USE"), "{}", String::from_utf8_lossy(&pass));
        std::thread::sleep(Duration::from_millis(20));
    }
    unreachable!()
}

fn pop3_quit(conn: &mut Wire) {
    conn.command(b"QUIT");
    let bye = conn.line().to_vec();
    assert!(bye.starts_with(b"+OK"), "{}", String::from_utf8_lossy(&bye));
}

// ---------------------------------------------------------------------------------------
// Paths and workloads

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Direct,
    Haproxy,
    Nginx,
    Mailgate,
}

const PATHS: [Path; 4] = [Path::Direct, Path::Haproxy, Path::Nginx, Path::Mailgate];

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Haproxy => "HAProxy TCP",
            Path::Nginx => "nginx mail",
            Path::Mailgate => "mailgate",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Login,
    Bodies,
    Retr,
    HeaderSync,
    FlagSync,
    Concurrent,
}

const WORKLOADS: [Workload; 6] =
    [Workload::Login, Workload::Bodies, Workload::Retr, Workload::HeaderSync, Workload::FlagSync, Workload::Concurrent];

impl Workload {
    fn key(self) -> &'static str {
        match self {
            Workload::Login => "login",
            Workload::Bodies => "bodies",
            Workload::Retr => "retr",
            Workload::HeaderSync => "headers",
            Workload::FlagSync => "flags",
            Workload::Concurrent => "concurrent",
        }
    }
}

/// One path's run of one workload.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// The timed part.
    secs: f64,
    /// Untagged IMAP responses / POP3 bodies received in the timed part (compared between
    /// paths).
    payload: u64,
    /// Everything the clients sent and received, and their command lines, over the whole
    /// run (logins and logouts included).
    bytes: u64,
    commands: u64,
    /// CPU seconds of the relay (mailgate, HAProxy, nginx) over the whole run.
    cpu: f64,
}

struct Bench {
    dovecot: Dovecot,
    haproxy: Haproxy,
    nginx: NginxMail,
    gateway: Gateway,
    _dir: tempfile::TempDir,
    /// Repetitions in a timed run, per workload (in [`WORKLOADS`] order): sessions, passes
    /// over the bodies or the maildrop, syncs, syncs per concurrent client.
    reps: [usize; WORKLOADS.len()],
}

impl Bench {
    fn imap(&self, path: Path) -> SocketAddr {
        match path {
            Path::Direct => self.dovecot.imap,
            Path::Haproxy => self.haproxy.addrs[0],
            Path::Nginx => self.nginx.imap,
            Path::Mailgate => self.gateway.addr("plain"),
        }
    }

    fn pop3(&self, path: Path) -> SocketAddr {
        match path {
            Path::Direct => self.dovecot.pop3,
            Path::Haproxy => self.haproxy.addrs[1],
            Path::Nginx => self.nginx.pop3,
            Path::Mailgate => self.gateway.addr("pop3-plain"),
        }
    }

    /// The relay's processes (none for direct).
    fn pids(&self, path: Path) -> Vec<u32> {
        match path {
            Path::Direct => Vec::new(),
            Path::Haproxy => self.haproxy.pids(),
            Path::Nginx => self.nginx.pids(),
            Path::Mailgate => vec![self.gateway.pid()],
        }
    }

    fn reps(&self, workload: Workload) -> usize {
        self.reps[workload as usize]
    }

    /// What a timed run is made of (its time is divided by this): sessions, bodies, POP3
    /// messages, syncs, rounds of concurrent syncs.
    fn units(&self, workload: Workload) -> usize {
        let reps = self.reps(workload);
        match workload {
            Workload::Bodies => BODIES * reps,
            Workload::Retr => RETRS * reps,
            _ => reps,
        }
    }

    fn title(&self, workload: Workload) -> String {
        let units = self.units(workload);
        match workload {
            Workload::Login => format!("login + SELECT INBOX + LOGOUT (per session; {units}/round)"),
            Workload::Bodies => {
                format!("UID FETCH n BODY.PEEK[], one at a time (per body; {BODIES} x {}/round)", self.reps(workload))
            }
            Workload::Retr => {
                format!("POP3 RETR n, one at a time (per message; {RETRS} x {}/round)", self.reps(workload))
            }
            Workload::HeaderSync => format!("header sync UID FETCH 1:* (... HEADER.FIELDS) (per sync; {units}/round)"),
            Workload::FlagSync => format!("flag sync UID FETCH 1:* (UID FLAGS) (per sync; {units}/round)"),
            Workload::Concurrent => {
                format!("{CONCURRENT} concurrent header syncs (per {CONCURRENT} syncs; {units}/round each)")
            }
        }
    }

    fn run(&self, workload: Workload, path: Path) -> Sample {
        let pids = self.pids(path);
        let cpu = peers::cpu_seconds(&pids);
        let mut sample = match workload {
            Workload::Login => {
                let addr = self.imap(path);
                let (mut bytes, mut commands) = (0, 0);
                let start = Instant::now();
                for _ in 0..self.reps(workload) {
                    let mut conn = imap_session(addr);
                    imap_logout(&mut conn);
                    bytes += conn.rx + conn.tx;
                    commands += conn.commands;
                }
                Sample { secs: start.elapsed().as_secs_f64(), payload: 0, bytes, commands, cpu: 0.0 }
            }
            Workload::Bodies => self.one_session(path, |conn| {
                let mut payload = 0;
                for _ in 0..self.reps(workload) {
                    for uid in 1..=BODIES {
                        conn.command(format!("b UID FETCH {uid} BODY.PEEK[]").as_bytes());
                        payload += imap_until(conn, b"b");
                    }
                }
                payload
            }),
            Workload::HeaderSync => {
                self.one_session(path, |conn| (0..self.reps(workload)).map(|_| header_sync(conn)).sum())
            }
            Workload::FlagSync => self.one_session(path, |conn| {
                let mut payload = 0;
                for _ in 0..self.reps(workload) {
                    conn.command(&[b"f ", FLAG_SYNC].concat());
                    payload += imap_until(conn, b"f");
                }
                payload
            }),
            Workload::Retr => {
                let mut conn = pop3_session(self.pop3(path));
                let finder = memmem::Finder::new(b"\r\n.\r\n");
                let start = Instant::now();
                let mut payload = 0;
                for _ in 0..self.reps(workload) {
                    for n in 1..=RETRS {
                        conn.command(format!("RETR {n}").as_bytes());
                        let status = conn.line();
                        assert!(status.starts_with(b"+OK"), "RETR {n}: {}", String::from_utf8_lossy(status));
                        payload += status.len() as u64;
                        payload += conn.pop3_body(&finder, |_| {});
                    }
                }
                let secs = start.elapsed().as_secs_f64();
                pop3_quit(&mut conn);
                Sample { secs, payload, bytes: conn.rx + conn.tx, commands: conn.commands, cpu: 0.0 }
            }
            Workload::Concurrent => {
                let addr = self.imap(path);
                let barrier = Barrier::new(CONCURRENT + 1);
                std::thread::scope(|s| {
                    let clients: Vec<_> = (0..CONCURRENT)
                        .map(|_| {
                            let barrier = &barrier;
                            s.spawn(move || {
                                let mut conn = imap_session(addr);
                                barrier.wait();
                                let payload: u64 = (0..self.reps(workload)).map(|_| header_sync(&mut conn)).sum();
                                let finished = Instant::now();
                                imap_logout(&mut conn);
                                (payload, finished, conn.rx + conn.tx, conn.commands)
                            })
                        })
                        .collect();
                    barrier.wait();
                    let start = Instant::now();
                    let mut sample = Sample::default();
                    let mut last = start;
                    for client in clients {
                        let (payload, finished, bytes, commands) = client.join().expect("client");
                        last = last.max(finished);
                        sample.payload += payload;
                        sample.bytes += bytes;
                        sample.commands += commands;
                    }
                    sample.secs = (last - start).as_secs_f64();
                    sample
                })
            }
        };
        sample.cpu = peers::cpu_seconds(&pids) - cpu;
        if workload == Workload::Retr {
            // Dovecot releases the maildrop just after the session ends.
            std::thread::sleep(Duration::from_millis(100));
        }
        sample
    }

    /// Login and SELECT (untimed), `work` timed, LOGOUT.
    fn one_session(&self, path: Path, work: impl FnOnce(&mut Wire) -> u64) -> Sample {
        let mut conn = imap_session(self.imap(path));
        let start = Instant::now();
        let payload = work(&mut conn);
        let secs = start.elapsed().as_secs_f64();
        imap_logout(&mut conn);
        Sample { secs, payload, bytes: conn.rx + conn.tx, commands: conn.commands, cpu: 0.0 }
    }
}

fn header_sync(conn: &mut Wire) -> u64 {
    conn.command(&[b"h ", HEADER_SYNC].concat());
    imap_until(conn, b"h")
}

/// Repetitions for a run of `once` to last `target`.
fn repeats(once: Duration, target: Duration) -> usize {
    ((target.as_secs_f64() / once.as_secs_f64().max(1e-6)).ceil() as usize).clamp(1, 500)
}

/// `Dovecot 2.3.19.1`.
fn dovecot_version() -> String {
    let out = std::process::Command::new("/usr/sbin/dovecot").arg("--version").output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    format!("Dovecot {}", text.split_whitespace().next().unwrap_or("?"))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

// ---------------------------------------------------------------------------------------
// Tables, printed aligned and written as markdown

struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn text(&self) -> String {
        let widths: Vec<usize> = (0..self.head.len())
            .map(|i| self.rows.iter().chain([&self.head]).map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for row in [&self.head].into_iter().chain(&self.rows) {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(
                    |(i, c)| if i == 0 { format!("{c:<w$}", w = widths[i]) } else { format!("{c:>w$}", w = widths[i]) },
                )
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out
    }

    fn markdown(&self) -> String {
        let mut out = format!("| {} |\n|", self.head.join(" | "));
        for i in 0..self.head.len() {
            out.push_str(if i == 0 { "---|" } else { "---:|" });
        }
        out.push('\n');
        for row in &self.rows {
            out.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        out
    }
}

fn time(secs: f64) -> String {
    if secs >= 1.0 {
        format!("{secs:.2} s")
    } else if secs >= 1e-3 {
        format!("{:.3} ms", secs * 1e3)
    } else {
        format!("{:.1} µs", secs * 1e6)
    }
}

fn main() {
    let rounds = env_number("PEERS_ROUNDS", 3).max(1);
    let messages = env_number("PEERS_MESSAGES", 10_000).max(BODIES);
    let target = Duration::from_millis(env_number("PEERS_TARGET_MS", 1500) as u64);
    let only = std::env::var("PEERS_ONLY").unwrap_or_else(|_| WORKLOADS.map(Workload::key).join(","));
    let workloads: Vec<Workload> =
        WORKLOADS.into_iter().filter(|w| only.split(',').any(|o| o.trim() == w.key())).collect();
    assert!(!workloads.is_empty(), "PEERS_ONLY={only}: none of {:?}", WORKLOADS.map(Workload::key));
    let wall = Instant::now();

    peers::ensure_installed();

    let dovecot = Dovecot::start_with(&[USER, POP3_USER], &Options::default());
    let t = Instant::now();
    let imap_total = dovecot.fill(USER.0, messages, SEED);
    let pop3_total = dovecot.fill(POP3_USER.0, RETRS, SEED + 1);
    eprintln!(
        "mailboxes: INBOX {messages} messages, {:.1} MB; POP3 maildrop {RETRS} messages, {:.1} MB ({:.1}s to generate)",
        imap_total as f64 / 1e6,
        pop3_total as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    let haproxy = Haproxy::tcp(&[dovecot.imap, dovecot.pop3]);
    let nginx = NginxMail::start(dovecot.imap, dovecot.pop3);
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let config = gateway_config_with(
        &pki,
        Some(&dovecot.imap.to_string()),
        Some(&dovecot.pop3.to_string()),
        "plaintext",
        None,
        "",
        // One client address logs in hundreds of times a minute here: the address rates
        // are off (HAProxy and nginx have none either); the rest as shipped.
        "\n[cache]\nenabled = false\n[limits]\nconnections_per_ip_per_minute = 0\nlogins_per_ip_per_minute = 0\n",
    );
    // As deployed: info, not the tests' per-connection debug lines.
    let gateway = Gateway::start_logging(dir.path(), &config, "info");

    let mut bench = Bench { dovecot, haproxy, nginx, gateway, _dir: dir, reps: [1; WORKLOADS.len()] };

    // Warm-up, untimed, one repetition of each workload on every path: the first session
    // takes the messages' \Recent (which would show in FLAGS), Dovecot learns to cache the
    // header fields, the mail comes into the page cache, and every path is tried. Then one
    // more direct run sets the workload's repetitions, for a timed direct run to last about
    // PEERS_TARGET_MS (and at least LOGINS logins).
    let t = Instant::now();
    for &workload in &workloads {
        for path in PATHS {
            bench.run(workload, path);
        }
        let once = bench.run(workload, Path::Direct);
        let mut reps = repeats(Duration::from_secs_f64(once.secs), target);
        if workload == Workload::Login {
            reps = reps.max(LOGINS);
        }
        bench.reps[workload as usize] = reps;
    }
    eprintln!(
        "warm-up {:.1}s; repetitions per timed run: {}",
        t.elapsed().as_secs_f64(),
        workloads.iter().map(|w| format!("{} {}", w.key(), bench.reps(*w))).collect::<Vec<_>>().join(", ")
    );

    // samples[workload][path][round]
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); PATHS.len()]; workloads.len()];
    let mut problems = Vec::new();
    for round in 0..rounds {
        for (w, &workload) in workloads.iter().enumerate() {
            for k in 0..PATHS.len() {
                let p = (k + round) % PATHS.len();
                let path = PATHS[p];
                let sample = bench.run(workload, path);
                eprintln!(
                    "  round {} {:<10} {:<11} {:>10}  {:>8.1} MB  {:>6} cmds  relay cpu {:.2}s",
                    round + 1,
                    workload.key(),
                    path.name(),
                    time(sample.secs),
                    sample.bytes as f64 / 1e6,
                    sample.commands,
                    sample.cpu
                );
                samples[w][p].push(sample);
            }
            let direct = samples[w][0][round].payload;
            for (p, path) in PATHS.iter().enumerate().skip(1) {
                let got = samples[w][p][round].payload;
                if got != direct {
                    problems.push(format!(
                        "round {} {}: {} answered {got} bytes, direct {direct}",
                        round + 1,
                        workload.key(),
                        path.name()
                    ));
                }
            }
        }
    }

    // Times and rate ratios.
    let mut times = Table {
        head: [
            "workload (time per unit)",
            "direct",
            "HAProxy TCP",
            "nginx mail",
            "mailgate",
            "HAProxy/direct",
            "nginx/direct",
            "mailgate/direct",
            "mailgate vs HAProxy",
            "mailgate vs nginx",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    // CPU of each relay per relayed MB and per command, over all rounds.
    let mut cpu = Table {
        head: [
            "relay CPU (MB and cmds: client traffic per round)",
            "MB",
            "cmds",
            "mailgate ms/MB",
            "mailgate µs/cmd",
            "HAProxy ms/MB",
            "HAProxy µs/cmd",
            "nginx ms/MB",
            "nginx µs/cmd",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    for (w, &workload) in workloads.iter().enumerate() {
        let units = bench.units(workload) as f64;
        let med: Vec<f64> = (0..PATHS.len()).map(|p| median(samples[w][p].iter().map(|s| s.secs).collect())).collect();
        let ratio = |a: f64, b: f64| format!("{:.2}x", a / b);
        let mut row = vec![bench.title(workload)];
        row.extend(med.iter().map(|s| time(s / units)));
        row.extend([ratio(med[0], med[1]), ratio(med[0], med[2]), ratio(med[0], med[3])]);
        row.extend([ratio(med[1], med[3]), ratio(med[2], med[3])]);
        times.rows.push(row);

        let per_round = |p: usize| {
            let s = &samples[w][p];
            let bytes: u64 = s.iter().map(|s| s.bytes).sum();
            let commands: u64 = s.iter().map(|s| s.commands).sum();
            (bytes as f64 / 1e6, commands as f64, s.iter().map(|s| s.cpu).sum::<f64>())
        };
        let (mb, commands, _) = per_round(3);
        let mut row = vec![
            bench.title(workload),
            if mb / (rounds as f64) < 1.0 {
                format!("{:.3}", mb / rounds as f64)
            } else {
                format!("{:.1}", mb / rounds as f64)
            },
            format!("{:.0}", commands / rounds as f64),
        ];
        for p in [3, 1, 2] {
            let (mb, commands, secs) = per_round(p);
            row.push(format!("{:.2}", secs * 1e3 / mb));
            row.push(format!("{:.1}", secs * 1e6 / commands));
        }
        cpu.rows.push(row);
    }

    let header = format!(
        "{}; {}; {}\nIMAP INBOX {messages} messages ({:.1} MB), POP3 maildrop {RETRS} ({:.1} MB); plain text both legs, \
         loopback, {} cores; medians of {rounds} rounds, paths interleaved; mailgate cache off\n\
         ratios are rates: direct time / path time (above 1 is faster than direct); mailgate vs X: X's time / mailgate's\n\
         CPU: utime + stime per relayed MB (client bytes both ways) and per client command, over all rounds \
         (clock ticks of 1/{} s)",
        dovecot_version(),
        peers::version(peers::HAPROXY),
        peers::version(peers::NGINX),
        imap_total as f64 / 1e6,
        pop3_total as f64 / 1e6,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        peers::clock_ticks()
    );
    println!("{header}\n");
    println!("{}", times.text());
    println!("{}", cpu.text());
    println!("nginx auth_http requests: {}", bench.nginx.auth_requests.load(std::sync::atomic::Ordering::Relaxed));
    println!("total runtime {:.1}s", wall.elapsed().as_secs_f64());
    if let Ok(out) = std::env::var("PEERS_OUT") {
        let text = format!(
            "{}\n\n{}\n{}",
            header.lines().map(|l| format!("{l}  ")).collect::<Vec<_>>().join("\n"),
            times.markdown(),
            cpu.markdown()
        );
        std::fs::write(&out, text).unwrap_or_else(|e| panic!("writing {out}: {e}"));
        println!("tables written to {out}");
    }
    // Whatever the peers complained about (warnings at start included).
    for (name, log) in [("HAProxy", bench.haproxy.log()), ("nginx", bench.nginx.log())] {
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("---")).collect();
        if !lines.is_empty() {
            eprintln!("{name}'s output and log:\n{}", lines.join("\n"));
        }
    }
    if !problems.is_empty() {
        eprintln!("PROBLEMS:\n{}", problems.join("\n"));
        std::process::exit(1);
    }
}
