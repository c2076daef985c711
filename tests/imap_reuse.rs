//! Upstream session reuse (`[imap] reuse_for`) against a real Dovecot: a session parked at
//! LOGOUT is taken by the next login with the same credentials from the same address
//! (no upstream login, the same answers as a fresh one, its mailbox left with UNSELECT and
//! not expunged), and by nobody else; sessions whose state changed are not parked; a dead
//! or expired parked session means a fresh login (expired `reuse_for` after its upstream
//! login, however often reused); a reload closes them.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::client::{tcp_from, Client};
use support::fake_upstream::{FakeConn, FakeUpstream};
use support::gateway::Gateway;
use support::setup::*;

const REUSE: &str = "reuse_for = \"5m\"";

/// Upstream IMAP logins so far (Dovecot logs one line per accepted login).
fn upstream_logins(setup: &Setup) -> usize {
    setup.dovecot.log().matches("imap-login: Info: Login:").count()
}

/// Waits until Dovecot has logged `n` IMAP logins (its log is written asynchronously).
fn wait_logins(setup: &Setup, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream_logins(setup) < n {
        assert!(Instant::now() < deadline, "{n} logins expected:\n{}", setup.dovecot.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of a metric series line (`name{labels}`), 0 when absent.
fn metric(setup: &Setup, series: &str) -> f64 {
    let text = setup.gateway.metrics();
    let line = text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '));
    line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

/// Waits until the parked gauge shows `n`.
fn wait_parked(setup: &Setup, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(setup, "mailgate_upstream_sessions_parked") != n {
        assert!(Instant::now() < deadline, "{n} parked expected:\n{}", setup.gateway.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Logs in over `client` and returns the tagged answer line.
fn login_line(client: &mut Client, (user, password): (&str, &str)) -> String {
    client.send(format!("L LOGIN {user} {{{}+}}\r\n", password.len()).as_bytes());
    client.send(password.as_bytes());
    client.send(b"\r\n");
    client.until_tagged("L").pop().unwrap()
}

/// LOGOUT answered as Dovecot would (BYE, tagged OK), then the connection closes.
fn log_out(client: &mut Client) {
    let lines = client.command("Z", "LOGOUT");
    assert!(lines[0].starts_with("* BYE"), "{lines:?}");
    assert!(lines.last().unwrap().starts_with("Z OK"), "{lines:?}");
    assert!(client.closed(), "closed after LOGOUT");
}

/// Response lines without the timing Dovecot adds to completions.
fn normalized(lines: Vec<String>) -> Vec<String> {
    let tagged = |l: &str| !l.starts_with("* ");
    lines.into_iter().map(|l| if tagged(&l) { l.split(" (").next().unwrap().to_string() } else { l }).collect()
}

#[test]
fn a_logged_out_session_serves_the_next_login_with_the_same_credentials() {
    let setup = Setup::start_with(REUSE, "");
    setup.dovecot.fill("alice", 3, 7);
    let mut first = setup.imaps();
    let first_ok = login_line(&mut first, ALICE);
    assert!(first_ok.starts_with("L OK [CAPABILITY "), "{first_ok}");
    first.command("a", "SELECT INBOX");
    let stored = first.command("b", "STORE 1 +FLAGS (\\Deleted)");
    assert!(stored.last().unwrap().starts_with("b OK"), "{stored:?}");
    first.command("c", "FETCH 1:* (FLAGS)");
    log_out(&mut first);
    wait_parked(&setup, 1.0);
    wait_logins(&setup, 1);
    let logins = upstream_logins(&setup);

    let mut second = setup.imaps();
    assert_eq!(login_line(&mut second, ALICE), first_ok, "the capabilities of the first login");
    let select = normalized(second.command("a", "SELECT INBOX"));
    let fetch = normalized(second.command("b", "FETCH 1:* (FLAGS UID)"));
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_reused_total"), 1.0);
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_parked"), 0.0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(upstream_logins(&setup), logins, "no upstream login:\n{}", setup.dovecot.log());

    // The same commands straight to Dovecot (after the reused session: its RECENT is 0 too).
    let mut direct = setup.direct(ALICE);
    assert_eq!(select, normalized(direct.command("a", "SELECT INBOX")));
    assert_eq!(fetch, normalized(direct.command("b", "FETCH 1:* (FLAGS UID)")));
    assert!(fetch.len() == 4 && fetch[0].contains("\\Deleted"), "UNSELECT, not CLOSE: nothing expunged: {fetch:?}");
}

#[test]
fn a_wrong_password_does_not_get_the_parked_session_and_the_right_one_still_does() {
    let setup = Setup::start_with(REUSE, "");
    let mut first = setup.login(ALICE);
    log_out(&mut first);
    wait_parked(&setup, 1.0);
    wait_logins(&setup, 1);

    let mut wrong = setup.imaps();
    let refused = login_line(&mut wrong, (ALICE.0, "not the password"));
    assert!(refused.starts_with("L NO"), "{refused}");
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_parked"), 1.0, "still parked");

    let mut right = setup.imaps();
    assert!(login_line(&mut right, ALICE).starts_with("L OK"));
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_reused_total"), 1.0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(upstream_logins(&setup), 1, "{}", setup.dovecot.log());
}

#[test]
fn another_user_or_another_address_logs_in_upstream() {
    let setup = Setup::start_with(REUSE, "");
    let mut first = setup.login(ALICE);
    log_out(&mut first);
    wait_parked(&setup, 1.0);

    let _bob = setup.login(BOB);
    let tcp = tcp_from(setup.addr("imaps"), "127.0.0.2".parse().unwrap());
    let mut elsewhere = Client::tls_over(tcp, setup.tls_config());
    elsewhere.line().expect("greeting");
    assert!(login_line(&mut elsewhere, ALICE).starts_with("L OK"));
    wait_logins(&setup, 3);
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_reused_total"), 0.0);
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_parked"), 1.0, "alice's session waits for her address");
}

#[test]
fn a_session_that_enabled_condstore_is_not_parked() {
    let setup = Setup::start_with(REUSE, "");
    for command in ["ENABLE CONDSTORE", "SELECT INBOX (CONDSTORE)", "ENABLE UTF8=ACCEPT"] {
        let mut client = setup.login(ALICE);
        let lines = client.command("a", command);
        assert!(lines.last().unwrap().starts_with("a OK"), "{lines:?}");
        log_out(&mut client);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_parked"), 0.0);
    let mut next = setup.login(ALICE);
    next.command("a", "NOOP");
    wait_logins(&setup, 4);
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_reused_total"), 0.0);
}

#[test]
fn a_command_that_turns_condstore_on_after_a_literal_is_not_parked() {
    // Only a command's first line is read for what it does: `MODSEQ` after a literal turns
    // CONDSTORE on upstream all the same (RFC 7162 §3.1.5), and the session must not serve
    // another login.
    let setup = Setup::start_with(REUSE, "");
    let mut client = setup.login(ALICE);
    client.command("s", "SELECT INBOX");
    client.send(b"a UID SEARCH TEXT {5+}\r\nhello MODSEQ 1\r\n");
    let lines = client.until_tagged("a");
    assert!(lines.last().unwrap().starts_with("a OK"), "{lines:?}");
    log_out(&mut client);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_parked"), 0.0);
    let mut next = setup.login(ALICE);
    next.command("a", "NOOP");
    wait_logins(&setup, 2);
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_reused_total"), 0.0);
}

#[test]
fn a_parked_session_killed_upstream_means_a_fresh_login() {
    let mut setup = Setup::start_with(REUSE, "");
    setup.dovecot.fill("alice", 2, 3);
    let mut first = setup.login(ALICE);
    log_out(&mut first);
    wait_parked(&setup, 1.0);
    setup.dovecot.crash();
    setup.dovecot.restart();

    let mut next = setup.login(ALICE);
    let lines = next.command("a", "SELECT INBOX");
    assert!(lines.last().unwrap().starts_with("a OK"), "{lines:?}");
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_dropped_total{reason=\"dead\"}"), 1.0);
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_reused_total"), 0.0);
}

#[test]
fn a_parked_session_expires_after_reuse_for() {
    let setup = Setup::start_with("reuse_for = \"300ms\"", "");
    let mut first = setup.login(ALICE);
    log_out(&mut first);
    wait_parked(&setup, 1.0);
    wait_parked(&setup, 0.0);
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_dropped_total{reason=\"expired\"}"), 1.0);
    let _next = setup.login(ALICE);
    wait_logins(&setup, 2);
}

/// COMPRESS is answered by mailgate on the client leg and never reaches the upstream: a
/// compressing client's session is parked and reused like any other.
#[test]
fn a_compressing_clients_session_is_parked_and_reused() {
    let setup = Setup::start_with(REUSE, "");
    setup.dovecot.fill("alice", 3, 8);
    let mut first = setup.login(ALICE);
    let compress = first.command("c", "COMPRESS DEFLATE");
    assert!(compress.last().unwrap().starts_with("c OK"), "{compress:?}");
    first.compress();
    first.command("a", "SELECT INBOX");
    let fetch = first.command("b", "FETCH 1:* (FLAGS)");
    assert!(fetch.last().unwrap().starts_with("b OK"), "{fetch:?}");
    log_out(&mut first);
    wait_parked(&setup, 1.0);
    wait_logins(&setup, 1);
    let logins = upstream_logins(&setup);
    let mut second = setup.login(ALICE);
    let select = second.command("a", "SELECT INBOX");
    assert!(select.iter().any(|l| l == "* 3 EXISTS"), "{select:?}");
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_reused_total"), 1.0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(upstream_logins(&setup), logins, "no upstream login:\n{}", setup.dovecot.log());
}

/// A session reused again and again is still bound to its one upstream login: after
/// `reuse_for` from that login the next login goes upstream, so a password changed or an
/// account locked there takes effect within `reuse_for`, however often the client returns.
#[test]
fn reuse_never_outlives_reuse_for_past_the_upstream_login() {
    let setup = Setup::start_with("reuse_for = \"2s\"", "");
    let started = Instant::now();
    let mut client = setup.login(ALICE);
    log_out(&mut client);
    wait_parked(&setup, 1.0);
    // Reconnecting well within reuse_for of each parking, for longer than reuse_for.
    let mut rounds = 0;
    while started.elapsed() < Duration::from_millis(3_500) {
        std::thread::sleep(Duration::from_millis(250));
        let mut client = setup.login(ALICE);
        log_out(&mut client);
        rounds += 1;
    }
    assert!(rounds >= 8, "{rounds}");
    wait_logins(&setup, 2);
    let logins = upstream_logins(&setup);
    assert!(logins <= 3, "one login per reuse_for, not one ever: {logins}");
    assert!(metric(&setup, "mailgate_upstream_sessions_dropped_total{reason=\"expired\"}") >= 1.0);
}

#[test]
fn a_reload_closes_the_parked_sessions() {
    let setup = Setup::start_with(REUSE, "");
    let mut first = setup.login(ALICE);
    log_out(&mut first);
    wait_parked(&setup, 1.0);
    assert!(Command::new("kill").arg("-HUP").arg(setup.gateway.pid().to_string()).status().unwrap().success());
    wait_parked(&setup, 0.0);
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_dropped_total{reason=\"reload\"}"), 1.0);
    let _next = setup.login(ALICE);
    wait_logins(&setup, 2);
}

#[test]
fn shutdown_logs_the_parked_sessions_out() {
    let mut setup = Setup::start_with(REUSE, "");
    let mut first = setup.login(ALICE);
    log_out(&mut first);
    wait_parked(&setup, 1.0);
    let status = setup.gateway.terminate(Duration::from_secs(15)).expect("mailgate exits");
    assert!(status.success(), "{status:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !setup.dovecot.log().contains("Logged out") {
        assert!(Instant::now() < deadline, "a LOGOUT upstream, not a cut:\n{}", setup.dovecot.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_users_oldest_parked_session_makes_room_for_the_newest() {
    let setup = Setup::start_with("reuse_for = \"5m\"\nreuse_per_user = 1", "");
    let (mut one, mut two) = (setup.login(ALICE), setup.login(ALICE));
    log_out(&mut one);
    wait_parked(&setup, 1.0);
    log_out(&mut two);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&setup, "mailgate_upstream_sessions_dropped_total{reason=\"evicted\"}") != 1.0 {
        assert!(Instant::now() < deadline, "{}", setup.gateway.metrics());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_parked"), 1.0);
}

#[test]
fn pop3_sessions_are_never_parked() {
    let setup = Setup::start_with(REUSE, "");
    for _ in 0..2 {
        let mut client = setup.pop3_login(BOB);
        client.send(b"QUIT\r\n");
        assert!(client.line().unwrap().starts_with("+OK"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while setup.dovecot.log().matches("pop3-login: Info: Login:").count() < 2 {
        assert!(Instant::now() < deadline, "two POP3 logins upstream:\n{}", setup.dovecot.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_parked"), 0.0);
}

#[test]
fn without_reuse_for_nothing_is_parked() {
    let setup = Setup::start();
    let mut first = setup.login(ALICE);
    log_out(&mut first);
    let _next = setup.login(ALICE);
    wait_logins(&setup, 2);
    assert_eq!(metric(&setup, "mailgate_upstream_sessions_parked"), 0.0);
}

/// A fake upstream without UNSELECT (its post-login capabilities are `IMAP4rev1 IDLE
/// LITERAL+`) answering SELECT, NOOP and LOGOUT.
fn without_unselect(conn: &mut FakeConn) {
    conn.accept_login();
    while let Some(line) = conn.line() {
        let tag = line.split(' ').next().unwrap_or_default().to_string();
        let upper = line.to_ascii_uppercase();
        if upper.contains(" SELECT ") {
            conn.send(format!("* 0 EXISTS\r\n{tag} OK [READ-WRITE] Select completed.\r\n").as_bytes());
        } else if upper.ends_with(" NOOP") {
            conn.send(format!("{tag} OK NOOP completed.\r\n").as_bytes());
        } else if upper.ends_with(" LOGOUT") {
            conn.send(format!("* BYE Logging out\r\n{tag} OK Logout completed.\r\n").as_bytes());
            return;
        } else {
            conn.send(format!("{tag} BAD unexpected\r\n").as_bytes());
        }
    }
}

/// mailgate with reuse in front of `fake` (plaintext upstream).
fn in_front_of_fake(fake: &FakeUpstream, dir: &tempfile::TempDir) -> (Gateway, support::tls::TestPki) {
    let pki = support::tls::TestPki::generate(dir.path());
    let config = gateway_config(&pki, &fake.addr.to_string(), "plaintext", Some(&pki.ca), REUSE, "");
    (Gateway::start(dir.path(), &config), pki)
}

#[test]
fn a_session_with_a_mailbox_is_not_parked_where_the_upstream_has_no_unselect() {
    let fake = FakeUpstream::start(None, without_unselect);
    let dir = tempfile::tempdir().unwrap();
    let (gateway, pki) = in_front_of_fake(&fake, &dir);
    let session = |commands: &[&str]| {
        let mut client = Client::tls(gateway.addr("imaps"), pki.client_config(&[]));
        client.line().expect("greeting");
        assert!(client.command("L", "LOGIN user secret-pw").last().unwrap().starts_with("L OK"));
        for (i, command) in commands.iter().enumerate() {
            let tag = format!("c{i}");
            assert!(client.command(&tag, command).last().unwrap().starts_with(&format!("{tag} OK")));
        }
        log_out(&mut client);
    };
    let parked = || {
        let text = gateway.metrics();
        text.lines().find(|l| l.starts_with("mailgate_upstream_sessions_parked ")).map(str::to_string)
    };

    // A SELECT could only be left with CLOSE, which expunges: the LOGOUT goes upstream.
    session(&["SELECT INBOX"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fake.received().contains("Z LOGOUT") {
        assert!(Instant::now() < deadline, "LOGOUT relayed: {}", fake.received());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!fake.received().contains("CLOSE") && !fake.received().contains("UNSELECT"), "{}", fake.received());
    assert_eq!(parked().as_deref(), Some("mailgate_upstream_sessions_parked 0"));

    // Without a mailbox nothing needs leaving: parked, the client's LOGOUT kept from it.
    session(&["NOOP"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while parked().as_deref() != Some("mailgate_upstream_sessions_parked 1") {
        assert!(Instant::now() < deadline, "{:?}", parked());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fake.received().matches("Z LOGOUT").count(), 1, "{}", fake.received());
}
