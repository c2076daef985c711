//! Memory per open session, for sizing (docs/OPERATIONS.md): mailgate's resident memory
//! with many logged-in, idle IMAP and POP3 sessions, against a real Dovecot, over implicit
//! TLS on both legs, cache off.
//!
//! `cargo bench --bench sessions` prints the resident set before and after opening the
//! sessions and the difference per session. The count is `SESSIONS_PER_PROTOCOL` (default
//! 90: the test Dovecot runs at most 100 processes per service), one user per session
//! (Dovecot locks a maildrop per POP3 session).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use support::client::Client;
use support::dovecot::{Dovecot, Options};
use support::gateway::Gateway;
use support::setup::gateway_config_with;
use support::tls::TestPki;

/// mailgate's resident set in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Waits for the allocator and the runtime to settle, then reads the resident set.
fn settled_rss(pid: u32) -> u64 {
    std::thread::sleep(Duration::from_millis(1500));
    rss_kib(pid)
}

fn main() {
    let per_protocol: usize = std::env::var("SESSIONS_PER_PROTOCOL").ok().and_then(|n| n.parse().ok()).unwrap_or(90);
    let users: Vec<(String, String)> = (0..per_protocol).map(|i| (format!("user{i}"), format!("pw-{i}"))).collect();
    let refs: Vec<(&str, &str)> = users.iter().map(|(u, p)| (u.as_str(), p.as_str())).collect();
    let dovecot = Dovecot::start_with(&refs, &Options::default());
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let config = gateway_config_with(
        &pki,
        Some(&dovecot.imaps.to_string()),
        Some(&dovecot.pop3s.to_string()),
        "implicit",
        Some(&dovecot.ca_pem()),
        "",
        "[cache]\nenabled = false\n[limits]\nmax_connections_per_ip = 100000\nmax_connections_per_user = 100000\nmax_connections_per_user_ip = 100000\nconnections_per_ip_per_minute = 0\nlogins_per_ip_per_minute = 0\n",
    );
    let gateway = Gateway::start(dir.path(), &config);
    let pid = gateway.pid();
    let tls = pki.client_config(&[]);

    // One session of each first, so that one-time allocations (TLS settings, the runtime's
    // worker stacks, first buffers) are in the baseline.
    let mut warm_imap = Client::tls(gateway.addr("imaps"), tls.clone());
    warm_imap.line().unwrap();
    warm_imap.login(refs[0]);
    let mut idle = Vec::new();
    let base = settled_rss(pid);

    for &user in &refs {
        let mut client = Client::tls(gateway.addr("imaps"), tls.clone());
        client.line().unwrap();
        client.login(user);
        assert!(client.command("s", "SELECT INBOX").last().unwrap().starts_with("s OK"));
        idle.push(client);
    }
    let imap = settled_rss(pid);

    for &(user, password) in &refs {
        let mut client = Client::tls(gateway.addr("pop3s"), tls.clone());
        client.line().unwrap();
        client.send(format!("USER {user}\r\nPASS {password}\r\n").as_bytes());
        client.line().unwrap();
        let answer = client.line().unwrap();
        assert!(answer.starts_with("+OK"), "{answer}");
        idle.push(client);
    }
    let pop3 = settled_rss(pid);

    println!("mailgate resident memory, cache off, TLS on both legs");
    println!("{:<44} {:>10}", "baseline (1 session)", format!("{base} KiB"));
    println!(
        "{:<44} {:>10}   {:>6.1} KiB per session",
        format!("+ {per_protocol} IMAP sessions (logged in, SELECTed)"),
        format!("{imap} KiB"),
        (imap.saturating_sub(base)) as f64 / per_protocol as f64
    );
    println!(
        "{:<44} {:>10}   {:>6.1} KiB per session",
        format!("+ {per_protocol} POP3 sessions (logged in)"),
        format!("{pop3} KiB"),
        (pop3.saturating_sub(imap)) as f64 / per_protocol as f64
    );
    drop(idle);
}
