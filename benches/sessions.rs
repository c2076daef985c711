//! Memory per open session, for sizing (docs/OPERATIONS.md): mailgate's resident memory
//! with many logged-in, idle sessions, against a real Dovecot, over implicit TLS on both
//! legs, cache off; and what idling costs the next command.
//!
//! `cargo bench --bench sessions` opens, one kind after the other, `SESSIONS_PER_KIND`
//! (default 1,000) of each:
//! - IMAP sessions idle in the selected state (logged in, `SELECT INBOX`, then nothing);
//! - IMAP sessions in `IDLE` (RFC 2177: a phone waiting for new mail);
//! - POP3 sessions idle in the TRANSACTION state;
//!
//! and prints the resident set after each kind and the difference per session. Then it
//! times the first command after the idle period (NOOP, IDLE's DONE, POP3 NOOP) on 50
//! sessions of each kind against the same command on a session that is busy (one that
//! just ran a command), medians: a session that gave its buffers back must not answer
//! slower. Dovecot is set up for the count (a process serves many sessions); one user per
//! session (Dovecot locks a maildrop per POP3 session).

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
    let per_kind: usize = std::env::var("SESSIONS_PER_KIND").ok().and_then(|n| n.parse().ok()).unwrap_or(1000);
    // The sessions' users, then the direct control sessions' (their own maildrops).
    let sample = 50.min(per_kind - 1);
    let users: Vec<(String, String)> =
        (0..per_kind + sample).map(|i| (format!("user{i}"), format!("pw-{i}"))).collect();
    let refs: Vec<(&str, &str)> = users.iter().map(|(u, p)| (u.as_str(), p.as_str())).collect();
    // Dovecot's defaults allow 100 processes per service, one session each: here enough
    // for the count (an imap or pop3 process serves one user), and the login processes
    // (which also terminate TLS) run in their high-performance mode.
    let capacity = format!(
        "default_client_limit = {clients}\n\
         service imap-login {{\n  service_count = 0\n  client_limit = {clients}\n  process_min_avail = 2\n}}\n\
         service pop3-login {{\n  service_count = 0\n  client_limit = {clients}\n  process_min_avail = 2\n}}\n\
         service imap {{\n  process_limit = {processes}\n}}\n\
         service pop3 {{\n  process_limit = {processes}\n}}\n\
         service auth {{\n  client_limit = {clients}\n}}\n\
         service anvil {{\n  client_limit = {clients}\n}}\n",
        clients = 4 * per_kind + 1000,
        processes = 2 * (per_kind + sample) + 20,
    );
    let dovecot = Dovecot::start_with(&refs, &Options { extra: capacity, ..Options::default() });
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let config = gateway_config_with(
        &pki,
        Some(&dovecot.imaps.to_string()),
        Some(&dovecot.pop3s.to_string()),
        "implicit",
        Some(&dovecot.ca_pem()),
        "",
        "[cache]\nenabled = false\n[limits]\nmax_connections = 100000\nmax_connections_per_ip = 100000\nmax_connections_per_user = 100000\nmax_connections_per_user_ip = 100000\nconnections_per_ip_per_minute = 0\nlogins_per_ip_per_minute = 0\n",
    );
    let gateway = Gateway::start(dir.path(), &config);
    let pid = gateway.pid();
    let tls = pki.client_config(&[]);

    // One session of each kind first, so that one-time allocations (TLS settings, the
    // runtime's worker stacks, first buffers) are in the baseline.
    // Dovecot's login processes in their high-performance mode come up just after its
    // listeners: the first login may find none yet.
    let mut busy_imap = (0..50)
        .find_map(|_| {
            let mut client = Client::tls(gateway.addr("imaps"), tls.clone());
            client.line().unwrap();
            let (user, password) = refs[0];
            client.send(format!("L LOGIN {user} {password}\r\n").as_bytes());
            let answer = client.until_tagged("L");
            if answer.last().is_some_and(|l| l.starts_with("L OK")) {
                return Some(client);
            }
            std::thread::sleep(Duration::from_millis(100));
            None
        })
        .expect("Dovecot takes logins");
    assert!(busy_imap.command("s", "SELECT INBOX").last().unwrap().starts_with("s OK"));
    let mut busy_pop3 = pop3_session(gateway.addr("pop3s"), &tls, refs[per_kind - 1]);
    // Direct sessions to Dovecot, idle as long as mailgate's: the control for the first
    // command after idling (a Dovecot process idle that long answers slower too).
    let direct_tls = support::tls::client_config_trusting(&dovecot.ca_pem(), &[]);
    let imap_direct = |user: (&str, &str)| {
        let mut client = Client::tls(dovecot.imaps, direct_tls.clone());
        client.line().unwrap();
        client.login(user);
        assert!(client.command("s", "SELECT INBOX").last().unwrap().starts_with("s OK"));
        client
    };
    let mut busy_direct = imap_direct(refs[0]);
    let mut busy_pop3_direct = pop3_session(dovecot.pop3s, &direct_tls, refs[per_kind + sample - 1]);
    let mut selected_direct: Vec<Client> = refs[..sample].iter().map(|&u| imap_direct(u)).collect();
    let mut idling_direct: Vec<Client> = (refs[..sample].iter())
        .map(|&u| {
            let mut client = imap_direct(u);
            client.send(b"i IDLE\r\n");
            assert!(client.line().unwrap().starts_with('+'));
            client
        })
        .collect();
    let mut pop3_direct: Vec<Client> =
        refs[per_kind..per_kind + sample - 1].iter().map(|&u| pop3_session(dovecot.pop3s, &direct_tls, u)).collect();
    let mut rows = Vec::new();
    let mut before = settled_rss(pid);
    let base = before;

    let mut selected = Vec::new();
    for &user in &refs[..per_kind] {
        let mut client = Client::tls(gateway.addr("imaps"), tls.clone());
        client.line().unwrap();
        client.login(user);
        assert!(client.command("s", "SELECT INBOX").last().unwrap().starts_with("s OK"));
        selected.push(client);
    }
    let now = settled_rss(pid);
    rows.push((format!("+ {per_kind} IMAP sessions, selected, idle"), now, now.saturating_sub(before)));
    before = now;

    let mut idling = Vec::new();
    for &user in &refs[..per_kind] {
        let mut client = Client::tls(gateway.addr("imaps"), tls.clone());
        client.line().unwrap();
        client.login(user);
        assert!(client.command("s", "SELECT INBOX").last().unwrap().starts_with("s OK"));
        client.send(b"i IDLE\r\n");
        let ready = client.line().unwrap();
        assert!(ready.starts_with('+'), "{ready}");
        idling.push(client);
    }
    let now = settled_rss(pid);
    rows.push((format!("+ {per_kind} IMAP sessions in IDLE"), now, now.saturating_sub(before)));
    before = now;

    // The last user's maildrop is the busy POP3 session's.
    let mut pop3 = Vec::new();
    for &user in &refs[..per_kind - 1] {
        pop3.push(pop3_session(gateway.addr("pop3s"), &tls, user));
    }
    let now = settled_rss(pid);
    rows.push((format!("+ {} POP3 sessions, idle", per_kind - 1), now, now.saturating_sub(before)));

    println!("mailgate resident memory, cache off, TLS on both legs");
    println!("{:<44} {:>10}", "baseline (one session of each protocol)", format!("{base} KiB"));
    for (name, total, added) in &rows {
        let count = if name.contains("POP3") { per_kind - 1 } else { per_kind };
        println!("{name:<44} {:>10}   {:>6.1} KiB per session", format!("{total} KiB"), *added as f64 / count as f64);
    }

    // The first command after idling (the sessions have been idle for at least the
    // settling time) against the same command on a busy session, through mailgate and
    // direct, interleaved. Only the DONE of an IDLE is timed.
    let mut first = vec![Vec::new(); 6];
    let mut busy = vec![Vec::new(); 6];
    let noop = |c: &mut Client| assert!(c.command("n", "NOOP").last().unwrap().starts_with("n OK"));
    let done = |c: &mut Client| {
        c.send(b"DONE\r\n");
        assert!(c.until_tagged("i").last().unwrap().starts_with("i OK"));
    };
    let idle = |c: &mut Client| {
        c.send(b"i IDLE\r\n");
        assert!(c.line().unwrap().starts_with('+'));
    };
    for i in 0..sample - 1 {
        first[0].push(timed(|| noop(&mut selected[i])));
        first[1].push(timed(|| noop(&mut selected_direct[i])));
        first[2].push(timed(|| done(&mut idling[i])));
        first[3].push(timed(|| done(&mut idling_direct[i])));
        first[4].push(timed(|| pop3_noop(&mut pop3[i])));
        first[5].push(timed(|| pop3_noop(&mut pop3_direct[i])));
        busy[0].push(timed(|| noop(&mut busy_imap)));
        busy[1].push(timed(|| noop(&mut busy_direct)));
        idle(&mut busy_imap);
        busy[2].push(timed(|| done(&mut busy_imap)));
        idle(&mut busy_direct);
        busy[3].push(timed(|| done(&mut busy_direct)));
        busy[4].push(timed(|| pop3_noop(&mut busy_pop3)));
        busy[5].push(timed(|| pop3_noop(&mut busy_pop3_direct)));
    }
    println!("first command after idling ({} sessions each) and on a busy session, medians", sample - 1);
    println!(
        "{:<18} {:>12} {:>12} {:>7}   {:>12} {:>12} {:>7}",
        "", "idle: via", "direct", "ratio", "busy: via", "direct", "ratio"
    );
    for (k, name) in ["IMAP NOOP", "IMAP IDLE's DONE", "POP3 NOOP"].iter().enumerate() {
        let (fv, fd) = (median(&mut first[2 * k]), median(&mut first[2 * k + 1]));
        let (bv, bd) = (median(&mut busy[2 * k]), median(&mut busy[2 * k + 1]));
        println!(
            "{name:<18} {:>10.0}µs {:>10.0}µs {:>6.2}x   {:>10.0}µs {:>10.0}µs {:>6.2}x",
            fv * 1e6,
            fd * 1e6,
            fv / fd,
            bv * 1e6,
            bd * 1e6,
            bv / bd
        );
    }
    drop((selected, idling, pop3, selected_direct, idling_direct, pop3_direct));
}

fn pop3_session(
    address: std::net::SocketAddr,
    tls: &std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
    (user, password): (&str, &str),
) -> Client {
    let mut client = Client::tls(address, tls.clone());
    client.line().unwrap();
    client.send(format!("USER {user}\r\nPASS {password}\r\n").as_bytes());
    client.line().unwrap();
    let answer = client.line().unwrap();
    assert!(answer.starts_with("+OK"), "{answer}");
    client
}

fn pop3_noop(client: &mut Client) {
    client.send(b"NOOP\r\n");
    let answer = client.line().unwrap();
    assert!(answer.starts_with("+OK"), "{answer}");
}

fn timed(f: impl FnOnce()) -> f64 {
    let t = std::time::Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}
