//! A reconnecting client (a phone at every wake-up, webmail per request) against a real
//! Dovecot: straight to Dovecot, through mailgate, and through mailgate with upstream
//! session reuse (`[imap] reuse_for`).
//!
//! `cargo bench --bench reuse` runs, one after the other on one connection at a time,
//! `REUSE_BENCH_N` (default 200) times: connect, greeting, `LOGIN`, `SELECT INBOX`,
//! `FETCH 1 (FLAGS)`, `LOGOUT`, close. It reports logins per second (whole cycles), the
//! median time from connect to the FETCH's completion, and how many logins Dovecot logged
//! for the work (its `Login:` lines), with ratios against direct.
//!
//! A last row runs reuse with the support histories off (`[insight] history = false`): the
//! fastest login path, where what a history costs per session (an event at login, one at the
//! end, in memory) shows most.
//!
//! Everything is plaintext on loopback (mailgate's `plain` listener, its upstream Dovecot's
//! plain port), so that neither path pays TLS and the difference is mailgate and the
//! upstream's login. Limits on logins per address are off for the run.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::client::Client;
use support::dovecot::Dovecot;
use support::gateway::Gateway;
use support::setup::{gateway_config_with, BOB};
use support::tls::TestPki;

const USER: (&str, &str) = BOB;

struct Row {
    name: &'static str,
    logins_per_sec: f64,
    median: Duration,
    upstream_logins: usize,
}

fn upstream_logins(dovecot: &Dovecot) -> usize {
    dovecot.log().matches("imap-login: Info: Login:").count()
}

/// `n` reconnecting sessions to `addr`: (elapsed, per-session connect-to-FETCH times).
fn reconnect(addr: SocketAddr, n: usize) -> (Duration, Vec<Duration>) {
    let mut latencies = Vec::with_capacity(n);
    let started = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let mut client = Client::plain(addr);
        let greeting = client.line().expect("greeting");
        assert!(greeting.starts_with("* OK"), "{greeting}");
        client.login(USER);
        let select = client.command("a", "SELECT INBOX");
        assert!(select.last().unwrap().starts_with("a OK"), "{select:?}");
        let fetch = client.command("b", "FETCH 1 (FLAGS)");
        assert!(fetch.last().unwrap().starts_with("b OK"), "{fetch:?}");
        latencies.push(t.elapsed());
        let bye = client.command("z", "LOGOUT");
        assert!(bye.last().unwrap().starts_with("z OK"), "{bye:?}");
        assert!(client.closed());
    }
    (started.elapsed(), latencies)
}

fn measure(name: &'static str, dovecot: &Dovecot, addr: SocketAddr, n: usize) -> Row {
    // One untimed session first: a connection pool, a parked session, caches warmed.
    reconnect(addr, 1);
    std::thread::sleep(Duration::from_millis(300));
    let before = upstream_logins(dovecot);
    let (elapsed, mut latencies) = reconnect(addr, n);
    std::thread::sleep(Duration::from_millis(300));
    latencies.sort();
    Row {
        name,
        logins_per_sec: n as f64 / elapsed.as_secs_f64(),
        median: latencies[latencies.len() / 2],
        upstream_logins: upstream_logins(dovecot) - before,
    }
}

fn gateway(dir: &std::path::Path, pki: &TestPki, dovecot: &Dovecot, imap_section: &str, extra: &str) -> Gateway {
    let config = gateway_config_with(
        pki,
        Some(&dovecot.imap.to_string()),
        None,
        "plaintext",
        None,
        imap_section,
        &format!("\n[limits]\nlogins_per_ip_per_minute = 0\nconnections_per_ip_per_minute = 0\n{extra}"),
    );
    Gateway::start_logging(dir, &config, "info")
}

fn main() {
    let n: usize = std::env::var("REUSE_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let dovecot = Dovecot::start(&[USER]);
    dovecot.fill(USER.0, 20, 1);

    let mut rows = vec![measure("direct", &dovecot, dovecot.imap, n)];
    let plain = gateway(dir.path(), &pki, &dovecot, "", "");
    rows.push(measure("mailgate", &dovecot, plain.addr("plain"), n));
    drop(plain);
    let reusing = gateway(dir.path(), &pki, &dovecot, "reuse_for = \"5m\"", "");
    rows.push(measure("mailgate+reuse", &dovecot, reusing.addr("plain"), n));
    let reused = reusing.metrics();
    let reused = reused.lines().find(|l| l.starts_with("mailgate_upstream_sessions_reused_total ")).unwrap_or("");
    drop(reusing);
    let quiet = gateway(dir.path(), &pki, &dovecot, "reuse_for = \"5m\"", "\n[insight]\nhistory = false\n");
    rows.push(measure("reuse, no history", &dovecot, quiet.addr("plain"), n));
    drop(quiet);

    println!("{n} reconnects (connect, LOGIN, SELECT INBOX, FETCH 1 (FLAGS), LOGOUT), one at a time");
    println!(
        "{:<18} {:>10} {:>8} {:>14} {:>8} {:>16}",
        "", "logins/s", "x direct", "median to FETCH", "x direct", "upstream logins"
    );
    let direct = (rows[0].logins_per_sec, rows[0].median);
    for row in &rows {
        println!(
            "{:<18} {:>10.0} {:>8.2} {:>12.2}ms {:>8.2} {:>16}",
            row.name,
            row.logins_per_sec,
            row.logins_per_sec / direct.0,
            row.median.as_secs_f64() * 1000.0,
            row.median.as_secs_f64() / direct.1.as_secs_f64(),
            row.upstream_logins,
        );
    }
    println!("{reused}");
}
