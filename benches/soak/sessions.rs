//! `sessions`: N concurrent logged-in TLS sessions held open (half IMAP in IDLE, half POP3
//! idle), each user its own, from many loopback addresses. Reports mailgate's resident set
//! per session, connect-to-greeting latency while they are held, and every refusal.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::rustls::ClientConfig;

use crate::harness::{self, user, Mailgate};
use crate::mail::{latency_line, Outcomes};
use crate::proto::{open, Fail, Result};
use crate::support::tls::TestPki;
use crate::{env_usize, settle};

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Imap,
    Pop3,
}

pub fn run() -> bool {
    let mut n = env_usize("SOAK_SESSIONS", 10_000);
    // mailgate holds two descriptors per session (client and upstream) and a few more.
    let fit = (harness::nofile() as usize).saturating_sub(64) / 2;
    if n > fit {
        println!("NOTE: RLIMIT_NOFILE {} lets mailgate hold {fit} sessions, not {n}: running {fit}", harness::nofile());
        n = fit;
    }
    let probes = env_usize("SOAK_PROBES", 200);
    let parallel = env_usize("SOAK_OPEN_PARALLEL", 32);
    let n_imap = n / 2;
    let started = Instant::now();
    println!("soak sessions: {n} sessions ({n_imap} IMAP in IDLE, {} POP3), {parallel} opening at a time", n - n_imap);

    // Users 0..n hold the sessions, n and n + 1 the warm-up sessions.
    let dovecot = harness::dovecot(n + 2, n + probes + 16);
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let mut mailgate = Mailgate::start(dir.path(), &harness::config(&pki, &dovecot, "[cache]\nenabled = false\n"));
    let tls = harness::client_tls(&pki);
    println!(
        "setup: {:.1} s (Dovecot with {} users, mailgate pid {})",
        started.elapsed().as_secs_f64(),
        n + 2,
        mailgate.pid()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let report = runtime.block_on(held(&mailgate, &tls, n, n_imap, probes, parallel));
    runtime.shutdown_timeout(Duration::from_secs(5));

    let alive = mailgate.alive();
    let log = mailgate.scan_log();
    println!();
    println!("RESULT sessions (N = {n}, TLS on both legs, cache off)");
    println!("  baseline (1 IMAP + 1 POP3 session)   {:>9} KiB", report.base);
    println!(
        "  + {n_imap} IMAP in IDLE                {:>9} KiB   {:>6.1} KiB per session",
        report.imap,
        (report.imap as f64 - report.base as f64) / n_imap as f64
    );
    println!(
        "  + {} POP3 logged in                {:>9} KiB   {:>6.1} KiB per session",
        n - n_imap,
        report.all,
        (report.all as f64 - report.imap as f64) / (n - n_imap) as f64
    );
    println!(
        "  all {n} sessions: {:.1} KiB per session; mailgate holds {} file descriptors",
        (report.all as f64 - report.base as f64) / n as f64,
        report.fds
    );
    println!("  opened {} of {n} in {:.1} s", report.opened, report.open_secs);
    println!("  connect-to-greeting while opening:        {}", report.ramp_latency);
    println!("  connect-to-greeting while {n} are held: {}", report.probe_latency);
    println!("  opening outcomes:");
    report.open_outcomes.print("    ");
    println!("  held sessions at the end (DONE/NOOP answered, LOGOUT/QUIT clean):");
    report.close_outcomes.print("    ");
    println!("  probe outcomes:");
    report.probe_outcomes.print("    ");
    let refusals = report.open_outcomes.failed() + report.probe_outcomes.failed();
    log.print();
    harness::dovecot_problems(&dovecot);
    let mut pass = true;
    let mut check = |ok: bool, what: String| {
        println!("  check {}: {what}", if ok { "ok  " } else { "FAIL" });
        pass &= ok;
    };
    check(report.opened == n, format!("{} of {n} sessions opened", report.opened));
    check(refusals == 0, format!("{refusals} refusals or failures while opening and probing (expected 0)"));
    check(
        log.refused_by_limit == 0,
        format!("{} connections refused by a limit (limits set above the load)", log.refused_by_limit),
    );
    check(report.close_outcomes.failed() == 0, format!("{} held sessions lost", report.close_outcomes.failed()));
    check(alive, "mailgate still running".to_string());
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    pass
}

struct Report {
    base: u64,
    imap: u64,
    all: u64,
    fds: usize,
    opened: usize,
    open_secs: f64,
    ramp_latency: String,
    probe_latency: String,
    open_outcomes: Outcomes,
    close_outcomes: Outcomes,
    probe_outcomes: Outcomes,
}

async fn held(
    mailgate: &Mailgate,
    tls: &Arc<ClientConfig>,
    n: usize,
    n_imap: usize,
    probes: usize,
    parallel: usize,
) -> Report {
    let open_outcomes = Outcomes::default();
    // One session of each first, so that one-time allocations are in the baseline.
    let (release_tx, release) = watch::channel(false);
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(parallel));
    let mut tasks = Vec::new();
    let mut spawn = |kind: Kind, i: usize, source: IpAddr| {
        let addr = if kind == Kind::Imap { mailgate.imaps } else { mailgate.pop3s };
        let (tls, gate, opened_tx, release) = (tls.clone(), gate.clone(), opened_tx.clone(), release.clone());
        tasks.push(tokio::spawn(async move { hold(kind, addr, source, i, tls, gate, opened_tx, release).await }));
    };
    spawn(Kind::Imap, n, harness::source(30, 0, 1));
    spawn(Kind::Pop3, n + 1, harness::source(30, 1, 2));
    let mut ramp = Vec::new();
    for _ in 0..2 {
        let opened: Result<Duration> = opened_rx.recv().await.unwrap();
        open_outcomes.record(&opened.map(drop));
    }
    let base = settle(mailgate).await;

    let began = Instant::now();
    let mut opened = 0;
    let mut rss = Vec::new();
    for (kind, range) in [(Kind::Imap, 0..n_imap), (Kind::Pop3, n_imap..n)] {
        let count = range.len();
        for i in range {
            // 1,000 source addresses: ten sessions each at 10,000.
            spawn(kind, i, harness::source(40, i, 1000));
        }
        for done in 0..count {
            let result = opened_rx.recv().await.unwrap();
            if let Ok(latency) = &result {
                ramp.push(*latency);
                opened += 1;
            }
            open_outcomes.record(&result.map(drop));
            if (done + 1) % 1000 == 0 {
                eprintln!(
                    "  {} sessions open, {:.0} s, mailgate {} KiB",
                    opened,
                    began.elapsed().as_secs_f64(),
                    mailgate.rss_kib()
                );
            }
        }
        rss.push(settle(mailgate).await);
    }
    let open_secs = began.elapsed().as_secs_f64();
    let fds = mailgate.fds();

    // Latency while everything is held: probes one at a time, IMAP and POP3 in turn.
    let probe_outcomes = Outcomes::default();
    let mut probe_latency = Vec::new();
    for p in 0..probes {
        let source = harness::source(50, p, 250);
        let result = probe(if p % 2 == 0 { mailgate.imaps } else { mailgate.pop3s }, source, tls).await;
        if let Ok(latency) = &result {
            probe_latency.push(*latency);
        }
        probe_outcomes.record(&result.map(drop));
    }

    // Every held session must still be there: it answers, then ends cleanly.
    release_tx.send(true).unwrap();
    let close_outcomes = Outcomes::default();
    for task in tasks {
        if let Ok(Some(result)) = task.await {
            close_outcomes.record(&result);
        }
    }
    Report {
        base,
        imap: rss[0],
        all: rss[1],
        fds,
        opened,
        open_secs,
        ramp_latency: latency_line(&mut ramp),
        probe_latency: latency_line(&mut probe_latency),
        open_outcomes,
        close_outcomes,
        probe_outcomes,
    }
}

/// Opens one session and holds it until `release`; sends the connect-to-greeting time (or
/// the failure) once logged in and idle; returns how it ended (None: it never opened).
#[allow(clippy::too_many_arguments)]
async fn hold(
    kind: Kind,
    addr: std::net::SocketAddr,
    source: IpAddr,
    i: usize,
    tls: Arc<ClientConfig>,
    gate: Arc<Semaphore>,
    opened: mpsc::UnboundedSender<Result<Duration>>,
    mut release: watch::Receiver<bool>,
) -> Option<Result<()>> {
    let timeout = Duration::from_secs(60);
    let permit = gate.acquire().await.unwrap();
    let (name, password) = user(i);
    let start = async {
        let o = open(addr, source, &tls, timeout).await?;
        let mut conn = o.conn;
        match kind {
            Kind::Imap => {
                conn.command("a", &format!("LOGIN {name} \"{password}\""), "login").await?;
                conn.command("s", "SELECT INBOX", "select").await?;
                conn.send(b"i IDLE\r\n").await?;
                loop {
                    let response = conn.response("idle").await?;
                    if response.text.starts_with('+') {
                        break;
                    }
                    if response.text.starts_with("i ") {
                        return Err(Fail::No(response.text));
                    }
                }
            }
            Kind::Pop3 => {
                conn.pop3(&format!("USER {name}"), "user").await?;
                conn.pop3(&format!("PASS {password}"), "pass").await?;
            }
        }
        Ok((conn, o.to_greeting))
    };
    let result = start.await;
    drop(permit);
    let mut conn = match result {
        Ok((conn, latency)) => {
            opened.send(Ok(latency)).unwrap();
            conn
        }
        Err(e) => {
            opened.send(Err(e)).unwrap();
            return None;
        }
    };
    let _ = release.wait_for(|r| *r).await;
    let end = async {
        match kind {
            Kind::Imap => {
                conn.send(b"DONE\r\n").await?;
                conn.until_tagged("i", "done").await?;
                conn.command("z", "LOGOUT", "logout").await?;
            }
            Kind::Pop3 => {
                conn.pop3("NOOP", "noop").await?;
                conn.pop3("QUIT", "quit").await?;
            }
        }
        conn.expect_close().await
    };
    Some(end.await)
}

/// connect() to greeting of one new session, then LOGOUT/QUIT at once.
async fn probe(addr: std::net::SocketAddr, source: IpAddr, tls: &Arc<ClientConfig>) -> Result<Duration> {
    let o = open(addr, source, tls, Duration::from_secs(30)).await?;
    let mut conn = o.conn;
    if o.greeting.starts_with('*') {
        conn.command("z", "LOGOUT", "logout").await?;
    } else {
        conn.pop3("QUIT", "quit").await?;
    }
    conn.expect_close().await?;
    Ok(o.to_greeting)
}
