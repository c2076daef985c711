//! Upstream failures, injected with a scripted fake upstream: every one ends in a clear
//! answer to the client (`NO [UNAVAILABLE]`, `* BYE`, or a bare close mid-literal), never
//! credentials sent where they must not go, and the gateway keeps serving.

mod support;

use std::time::{Duration, Instant};

use support::client::Client;
use support::fake_upstream::{server_tls, FakeConn, FakeUpstream};
use support::gateway::Gateway;
use support::setup::gateway_config;
use support::tls::TestPki;

struct Rig {
    _dir: tempfile::TempDir,
    pki: TestPki,
    gateway: Gateway,
}

/// mailgate in front of `fake`, reached with `upstream_tls`.
fn start_rig(fake: &FakeUpstream, upstream_tls: &str, pki_dir: tempfile::TempDir, pki: TestPki) -> Rig {
    let config = gateway_config(&pki, &fake.addr.to_string(), upstream_tls, Some(&pki.ca), "", "");
    let config = config.replace("login_timeout = \"15s\"", "login_timeout = \"2s\"");
    let gateway = Gateway::start(pki_dir.path(), &config);
    Rig { _dir: pki_dir, pki, gateway }
}

fn new_pki() -> (tempfile::TempDir, TestPki) {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    (dir, pki)
}

impl Rig {
    fn client(&self) -> Client {
        let mut client = Client::tls(self.gateway.addr("imaps"), self.pki.client_config(&[]));
        assert!(client.line().unwrap().starts_with("* OK"));
        client
    }

    fn login(&self) -> Vec<String> {
        self.client().command("a", "LOGIN user secret-pw")
    }
}

#[test]
fn upstream_closing_mid_literal_closes_the_client_without_another_byte() {
    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| {
        conn.accept_login();
        let tag = conn.tag().unwrap();
        let _ = tag;
        conn.send(b"* 1 FETCH (BODY[] {1000}\r\n");
        conn.send(&[b'x'; 100]);
        // Then the connection drops.
    });
    let (dir, pki) = new_pki();
    let rig = start_rig(&fake, "plaintext", dir, pki);
    let mut client = rig.client();
    let lines = client.command("a", "LOGIN user secret-pw");
    assert!(lines.last().unwrap().starts_with("a OK"), "{lines:?}");
    client.send(b"b FETCH 1 BODY[]\r\n");
    assert_eq!(client.line().unwrap(), "* 1 FETCH (BODY[] {1000}");
    let rest = client.rest_bytes();
    assert_eq!(rest, vec![b'x'; 100], "bytes after the truncated literal");
}

#[test]
fn upstream_closing_between_responses_gives_bye() {
    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| {
        conn.accept_login();
        let tag = conn.tag().unwrap();
        conn.send(format!("{tag} OK NOOP done\r\n").as_bytes());
    });
    let (dir, pki) = new_pki();
    let rig = start_rig(&fake, "plaintext", dir, pki);
    let mut client = rig.client();
    assert!(client.command("a", "LOGIN user secret-pw").last().unwrap().starts_with("a OK"));
    assert_eq!(client.command("b", "NOOP"), ["b OK NOOP done"]);
    assert_eq!(client.rest(), ["* BYE Upstream server closed the connection."]);
}

#[test]
fn garbage_greeting_is_unavailable_and_garbage_after_login_is_relayed() {
    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| conn.send(b"HTTP/1.1 400 Bad Request\r\n\r\n"));
    let (dir, pki) = new_pki();
    let rig = start_rig(&fake, "plaintext", dir, pki);
    let lines = rig.login();
    assert!(lines[0].starts_with("a NO [UNAVAILABLE]"), "{lines:?}");

    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| {
        conn.accept_login();
        let tag = conn.tag().unwrap();
        conn.send(b"\x00\xff garbage {not a literal\r\n");
        conn.send(format!("{tag} OK still here\r\n").as_bytes());
    });
    let (dir, pki) = new_pki();
    let rig = start_rig(&fake, "plaintext", dir, pki);
    let mut client = rig.client();
    assert!(client.command("a", "LOGIN user pw").last().unwrap().starts_with("a OK"));
    let lines = client.command("b", "NOOP");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1], "b OK still here");
}

#[test]
fn slow_greeting_times_out_as_unavailable() {
    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| {
        std::thread::sleep(Duration::from_secs(4));
        conn.send(b"* OK late\r\n");
    });
    let (dir, pki) = new_pki();
    let rig = start_rig(&fake, "plaintext", dir, pki);
    let started = Instant::now();
    let lines = rig.login();
    assert!(lines[0].starts_with("a NO [UNAVAILABLE]"), "{lines:?}");
    assert!(started.elapsed() < Duration::from_secs(4), "login timeout not applied");
    assert!(rig.gateway.wait_for_log("timed out", Duration::from_secs(5)), "{}", rig.gateway.log());
}

#[test]
fn starttls_answer_with_injected_capability_aborts_before_credentials() {
    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| {
        conn.send(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] fake\r\n");
        let tag = conn.tag().unwrap();
        // The OK and an injected line in one segment.
        conn.send(format!("{tag} OK begin\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n").as_bytes());
        let _ = conn.line();
    });
    let (dir, pki) = new_pki();
    let rig = start_rig(&fake, "starttls", dir, pki);
    let lines = rig.login();
    assert!(lines[0].starts_with("a NO [UNAVAILABLE]"), "{lines:?}");
    let received = fake.received();
    assert!(
        received.contains("STARTTLS") && !received.contains("secret-pw") && !received.contains("LOGIN"),
        "{received}"
    );
    assert!(rig.gateway.wait_for_log("possible injection", Duration::from_secs(5)));
}

#[test]
fn upstream_without_starttls_never_sees_credentials() {
    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| {
        conn.send(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] no tls here\r\n");
        while let Some(line) = conn.line() {
            let tag = line.split(' ').next().unwrap_or_default().to_string();
            conn.send(format!("{tag} NO go away\r\n").as_bytes());
        }
    });
    let (dir, pki) = new_pki();
    let rig = start_rig(&fake, "starttls", dir, pki);
    let lines = rig.login();
    assert!(lines[0].starts_with("a NO [UNAVAILABLE]"), "{lines:?}");
    std::thread::sleep(Duration::from_millis(200));
    let received = fake.received();
    assert!(
        !received.contains("secret-pw") && !received.contains("LOGIN") && !received.contains("AUTHENTICATE"),
        "{received}"
    );
}

#[test]
fn upstream_starttls_then_login_works_and_capabilities_are_reasked() {
    let (dir, pki) = new_pki();
    let tls = server_tls(&pki.cert, &pki.key);
    let fake = FakeUpstream::start(None, move |conn: &mut FakeConn| {
        conn.send(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] fake\r\n");
        let tag = conn.tag().unwrap();
        conn.send(format!("{tag} OK begin TLS\r\n").as_bytes());
        conn.upgrade(tls.clone());
        // After TLS the capabilities must be asked again; LOGINDISABLED is gone.
        let line = conn.line().unwrap();
        let tag = line.split(' ').next().unwrap().to_string();
        assert!(line.ends_with("CAPABILITY"), "{line}");
        conn.send(format!("* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR\r\n{tag} OK\r\n").as_bytes());
        let line = conn.line().unwrap();
        let tag = line.split(' ').next().unwrap().to_string();
        assert!(line.contains("AUTHENTICATE PLAIN"), "{line}");
        conn.send(format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE STARTTLS] hi\r\n").as_bytes());
        while let Some(line) = conn.line() {
            let tag = line.split(' ').next().unwrap_or_default().to_string();
            conn.send(format!("{tag} OK fine\r\n").as_bytes());
        }
    });
    let config = gateway_config(&pki, &format!("localhost:{}", fake.addr.port()), "starttls", Some(&pki.ca), "", "");
    let gateway = Gateway::start(dir.path(), &config);
    let mut client = Client::tls(gateway.addr("imaps"), pki.client_config(&[]));
    client.line().unwrap();
    let lines = client.command("a", "LOGIN user secret-pw");
    assert_eq!(lines, ["a OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE] Logged in"], "{}", gateway.log());
    assert_eq!(client.command("b", "NOOP"), ["b OK fine"]);
}

#[test]
fn wrong_certificate_name_is_unavailable_and_credentials_stay_home() {
    let (dir, pki) = new_pki();
    let (cert, key) = pki.leaf("wrong", &["wrong.example"]);
    let fake = FakeUpstream::start(Some(server_tls(&cert, &key)), |conn: &mut FakeConn| conn.accept_login());
    let rig = start_rig(&fake, "implicit", dir, pki);
    let lines = rig.login();
    assert!(lines[0].starts_with("a NO [UNAVAILABLE]"), "{lines:?}");
    assert!(!fake.received().contains("secret-pw"));
    assert!(rig.gateway.wait_for_log("TLS handshake", Duration::from_secs(5)), "{}", rig.gateway.log());
}

#[test]
fn preauth_greeting_is_refused() {
    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| {
        conn.send(b"* PREAUTH [CAPABILITY IMAP4rev1] you are in\r\n");
        let _ = conn.line();
    });
    let (dir, pki) = new_pki();
    let rig = start_rig(&fake, "plaintext", dir, pki);
    let lines = rig.login();
    assert!(lines[0].starts_with("a NO [UNAVAILABLE]"), "{lines:?}");
    assert!(rig.gateway.wait_for_log("PREAUTH", Duration::from_secs(5)));
}

/// A fake upstream that answers every LOGIN with `refusal` (after the tag).
fn refusing_upstream(refusal: &'static str) -> FakeUpstream {
    FakeUpstream::start(None, move |conn: &mut FakeConn| {
        conn.send(b"* OK [CAPABILITY IMAP4rev1] fake\r\n");
        while let Some(line) = conn.line() {
            let tag = line.split(' ').next().unwrap_or_default().to_string();
            if line.contains("LOGIN") {
                conn.send(format!("{tag} {refusal}\r\n").as_bytes());
            } else {
                conn.send(format!("* CAPABILITY IMAP4rev1\r\n{tag} OK\r\n").as_bytes());
            }
        }
    })
}

#[test]
fn upstream_refusal_is_authenticationfailed_and_unreachable_is_unavailable() {
    let fake = refusing_upstream("NO [AUTHENTICATIONFAILED] nope");
    let (dir, pki) = new_pki();
    let rig = start_rig(&fake, "plaintext", dir, pki);
    let lines = rig.login();
    assert_eq!(lines, ["a NO [AUTHENTICATIONFAILED] Authentication failed."]);

    // Nothing listens on the upstream port any more.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (dir, pki) = new_pki();
    let config = gateway_config(&pki, &format!("127.0.0.1:{port}"), "plaintext", None, "", "");
    let gateway = Gateway::start(dir.path(), &config);
    let mut client = Client::tls(gateway.addr("imaps"), pki.client_config(&[]));
    client.line().unwrap();
    let lines = client.command("a", "LOGIN user pw");
    assert!(lines[0].starts_with("a NO [UNAVAILABLE]"), "{lines:?}");
    // The session lives on.
    assert_eq!(client.command("b", "NOOP"), ["b OK NOOP completed."]);
}

#[test]
fn plaintext_login_before_starttls_opens_no_upstream_connection() {
    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| conn.accept_login());
    let (dir, pki) = new_pki();
    let rig = start_rig(&fake, "plaintext", dir, pki);
    // mailgate's own probe of the upstream's OAuth mechanisms (no credentials) comes first.
    assert!(rig.gateway.wait_for_log("upstream OAuth mechanisms learned", Duration::from_secs(5)));
    let probes = fake.accepted();
    let mut client = Client::plain(rig.gateway.addr("imap"));
    client.line().unwrap();
    let lines = client.command("a", "LOGIN user secret-pw");
    assert!(lines[0].starts_with("a NO [PRIVACYREQUIRED]"), "{lines:?}");
    let lines = client.command("b", "AUTHENTICATE PLAIN AHVzZXIAc2VjcmV0LXB3");
    assert!(lines[0].starts_with("b NO [PRIVACYREQUIRED]"), "{lines:?}");
    client.send(b"c AUTHENTICATE PLAIN\r\n");
    assert!(client.line().unwrap().starts_with("c NO [PRIVACYREQUIRED]"));
    assert_eq!(fake.accepted(), probes);
    assert!(!fake.received().contains("secret-pw"), "{}", fake.received());
}

#[test]
fn upstream_without_auth_plain_gets_login_with_a_synchronizing_literal() {
    // No AUTH=PLAIN and no LITERAL+: LOGIN, the 8-bit password as a literal sent only after
    // the upstream's continuation.
    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| {
        conn.send(b"* OK [CAPABILITY IMAP4rev1] old server\r\n");
        let login = conn.line().unwrap();
        let tag = login.split(' ').next().unwrap().to_string();
        assert!(login.ends_with(" LOGIN \"user\" {9}"), "{login}");
        conn.send(b"+ go ahead\r\n");
        let password = conn.line().unwrap();
        assert_eq!(password, "p\u{e4}ss w\u{f6}");
        conn.send(format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE] hello\r\n").as_bytes());
        while let Some(line) = conn.line() {
            let tag = line.split(' ').next().unwrap_or_default().to_string();
            conn.send(format!("{tag} OK fine\r\n").as_bytes());
        }
    });
    let (dir, pki) = new_pki();
    let rig = start_rig(&fake, "plaintext", dir, pki);
    let mut client = rig.client();
    let password = "p\u{e4}ss w\u{f6}";
    client.send(format!("a LOGIN user {{{}+}}\r\n{password}\r\n", password.len()).as_bytes());
    assert_eq!(client.until_tagged("a"), ["a OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE] Logged in"]);
    assert_eq!(client.command("b", "NOOP"), ["b OK fine"]);
}

#[test]
fn a_temporary_upstream_refusal_is_relayed_as_such_and_never_penalized() {
    // Dovecot answers NO [UNAVAILABLE] when its passdb is down: the password may be right.
    let fake = refusing_upstream("NO [UNAVAILABLE] Temporary authentication failure.");
    let (dir, pki) = new_pki();
    let rig = start_rig(&fake, "plaintext", dir, pki);
    let mut client = rig.client();
    for tag in ["a", "b", "c"] {
        // The default penalty would wait 2 s, then 4 s: none here.
        let started = Instant::now();
        let lines = client.command(tag, "LOGIN user secret-pw");
        assert_eq!(lines, [format!("{tag} NO [UNAVAILABLE] Login temporarily unavailable, try again later.")]);
        assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    }
}

/// Responses that arrive in one piece take the relay's one-write path, those it must look
/// into (a CAPABILITY to rewrite, read whole, a literal not yet all read) take the framer: the client
/// gets the upstream's bytes exactly, whichever way they were cut.
#[test]
fn responses_arriving_together_or_cut_anywhere_reach_the_client_byte_for_byte() {
    const TOGETHER: &[u8] = b"* 1 FETCH (UID 1 FLAGS (\\Seen))\r\n\
        * 2 FETCH (UID 2 BODY[HEADER] {5}\r\nhello BODY[TEXT] {0}\r\n)\r\n\
        * 2 EXISTS\r\n\
        * CAPABILITY IMAP4rev1 COMPRESS=DEFLATE IDLE\r\n\
        * 3 FETCH (UID 3 BODY[] {20}\r\n0123456789";
    const LATER: &[u8] = b"0123456789 FLAGS ())\r\n+ a continuation {not a literal}\r\n";
    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| {
        conn.accept_login();
        let tag = conn.tag().unwrap();
        conn.send(TOGETHER);
        std::thread::sleep(Duration::from_millis(100));
        conn.send(LATER);
        conn.send(format!("{tag} OK done\r\n").as_bytes());
        // Every byte in a write of its own: the framer at each step.
        let tag = conn.tag().unwrap();
        for byte in TOGETHER.iter().chain(LATER).chain(format!("{tag} OK done again\r\n").as_bytes()) {
            conn.send(&[*byte]);
        }
        let tag = conn.tag().unwrap();
        conn.send(format!("{tag} OK still here\r\n").as_bytes());
    });
    let (dir, pki) = new_pki();
    let rig = start_rig(&fake, "plaintext", dir, pki);
    let mut client = rig.client();
    assert!(client.command("a", "LOGIN user pw").last().unwrap().starts_with("a OK"));
    let expected = |tag: &str, text: &str| {
        let mut bytes = [TOGETHER, LATER].concat();
        // The upstream's COMPRESS is never relayed; mailgate's own ends the list.
        let compress = b"COMPRESS=DEFLATE ";
        let at = bytes.windows(compress.len()).position(|w| w == compress).expect("in the script");
        bytes.drain(at..at + compress.len());
        let end = at + bytes[at..].iter().position(|&b| b == b'\r').unwrap();
        bytes.splice(end..end, b" COMPRESS=DEFLATE".iter().copied());
        bytes.extend_from_slice(format!("{tag} OK {text}\r\n").as_bytes());
        bytes
    };
    for (tag, text) in [("b", "done"), ("c", "done again")] {
        client.send(format!("{tag} FETCH 1:3 (FLAGS BODY[])\r\n").as_bytes());
        let want = expected(tag, text);
        assert_eq!(String::from_utf8_lossy(&client.bytes(want.len())), String::from_utf8_lossy(&want), "command {tag}");
    }
    assert_eq!(client.command("d", "NOOP"), ["d OK still here"], "the completions were seen");
}

/// Greets and accepts the login with `capabilities` after it; then `after_login` gets the
/// connection.
fn upstream_announcing(capabilities: &'static str, after_login: fn(&mut FakeConn)) -> FakeUpstream {
    FakeUpstream::start(None, move |conn: &mut FakeConn| {
        conn.send(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN SASL-IR] fake ready\r\n");
        let Some(tag) = conn.tag() else { return };
        conn.send(format!("{tag} OK [CAPABILITY {capabilities}] Logged in\r\n").as_bytes());
        after_login(conn);
    })
}

/// Answers every command `OK` (IDLE with `+`, then OK at its DONE) until mailgate hangs up;
/// mailgate's quota question never.
fn answer_all_but_the_quota_question(conn: &mut FakeConn) {
    let mut idling = None;
    while let Some(line) = conn.line() {
        let tag = line.split(' ').next().unwrap_or_default().to_string();
        if line.to_ascii_uppercase().ends_with(" GETQUOTAROOT INBOX") && tag.starts_with("mg") {
            continue;
        }
        if line.eq_ignore_ascii_case("DONE") {
            let tag: String = idling.take().unwrap_or_default();
            conn.send(format!("{tag} OK Idle completed.\r\n").as_bytes());
        } else if line.to_ascii_uppercase().contains(" SELECT ") {
            conn.send(
                format!("* 1 EXISTS\r\n* OK [UIDVALIDITY 7] UIDs valid\r\n* OK [UIDNEXT 2] Predicted next UID\r\n{tag} OK [READ-WRITE] SELECT done\r\n")
                    .as_bytes(),
            );
        } else if line.to_ascii_uppercase().contains(" FETCH ") {
            conn.send(
                format!("* 1 FETCH (UID 1 RFC822.SIZE 14 BODY[HEADER] {{14}}\r\nSubject: x\r\n\r\n)\r\n{tag} OK FETCH done\r\n")
                    .as_bytes(),
            );
        } else if line.to_ascii_uppercase().ends_with(" IDLE") {
            conn.send(b"+ idling\r\n");
            idling = Some(tag);
        } else {
            let command = line.split(' ').nth(1).unwrap_or_default().to_ascii_uppercase();
            conn.send(format!("{tag} OK {command} done\r\n").as_bytes());
        }
    }
}

fn wait_for_metric(rig: &Rig, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !rig.gateway.metrics().contains(line) {
        assert!(Instant::now() < deadline, "no {line} in\n{}", rig.gateway.metrics());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_upstream_silent_on_the_quota_question_delays_no_login_and_no_command() {
    let fake = upstream_announcing("IMAP4rev1 IDLE QUOTA", |conn| {
        let question = conn.line().unwrap_or_default();
        assert!(question.ends_with(" GETQUOTAROOT INBOX"), "the question comes first: {question}");
        answer_all_but_the_quota_question(conn);
    });
    let (dir, pki) = new_pki();
    let rig = start_rig(&fake, "plaintext", dir, pki);
    let mut client = rig.client();
    let started = Instant::now();
    assert_eq!(
        client.command("a", "LOGIN user pw"),
        ["a OK [CAPABILITY IMAP4rev1 IDLE QUOTA COMPRESS=DEFLATE] Logged in"]
    );
    assert_eq!(client.command("b", "NOOP"), ["b OK NOOP done"]);
    assert!(started.elapsed() < Duration::from_secs(2), "nothing waited: {:?}", started.elapsed());
    // IDLE, and COMPRESS (which waits for the commands before it, not for mailgate's own).
    client.send(b"c IDLE\r\n");
    assert_eq!(client.line().unwrap(), "+ idling");
    client.send(b"DONE\r\n");
    assert_eq!(client.until_tagged("c"), ["c OK Idle completed."]);
    assert_eq!(client.command("d", "COMPRESS DEFLATE"), ["d OK DEFLATE active"]);
    client.compress();
    let selected = client.command("e", "SELECT INBOX");
    assert_eq!(selected.last().unwrap(), "e OK [READ-WRITE] SELECT done", "{selected:?}");
    // A FETCH the cache could answer goes upstream behind the question (a cache job would
    // wait for it): twice, cold then warm.
    for tag in ["g", "h"] {
        let fetched = client.command(tag, "UID FETCH 1 (UID RFC822.SIZE BODY.PEEK[HEADER])");
        assert_eq!(fetched.last().unwrap(), &format!("{tag} OK FETCH done"), "{fetched:?}");
        assert!(fetched[0].starts_with("* 1 FETCH (UID 1 "), "{fetched:?}");
    }
    assert_eq!(client.command("f", "GETQUOTAROOT INBOX"), ["f OK GETQUOTAROOT done"]);
    let metrics = rig.gateway.metrics();
    assert!(metrics.contains("mailgate_commands_total{command=\"noop\",protocol=\"imap\"} 1"), "{metrics}");
    drop(client);
    // The question was never answered: counted when the session ended.
    wait_for_metric(&rig, "mailgate_quota_checks_total{result=\"failed\"} 1");
}

#[test]
fn a_garbage_quota_answer_is_no_quota_and_the_session_goes_on() {
    let fake = upstream_announcing("IMAP4rev1 IDLE QUOTA", |conn| {
        let question = conn.line().unwrap_or_default();
        let tag = question.split(' ').next().unwrap();
        conn.send(
            format!("* QUOTAROOT INBOX \"\"\r\n* QUOTA \"\" (STORAGE lots 2)\r\n* OK still fine\r\n{tag} OK done\r\n")
                .as_bytes(),
        );
        answer_all_but_the_quota_question(conn);
    });
    let (dir, pki) = new_pki();
    let rig = start_rig(&fake, "plaintext", dir, pki);
    let mut client = rig.client();
    assert_eq!(
        client.command("a", "LOGIN user pw"),
        ["a OK [CAPABILITY IMAP4rev1 IDLE QUOTA COMPRESS=DEFLATE] Logged in"]
    );
    // The unsolicited response came with the quota answer: the client gets it, as it came,
    // and nothing of the answer itself.
    assert_eq!(client.command("b", "NOOP"), ["* OK still fine", "b OK NOOP done"]);
    assert_eq!(client.command("c", "NOOP"), ["c OK NOOP done"]);
    wait_for_metric(&rig, "mailgate_quota_checks_total{result=\"none\"} 1");
    let metrics = rig.gateway.metrics();
    assert!(metrics.contains("mailgate_quota_checks_total{result=\"failed\"} 0"), "{metrics}");
    assert!(!metrics.contains("command=\"getquotaroot\""), "not a client's command: {metrics}");
}

#[test]
fn an_upstream_without_quota_is_never_asked() {
    let fake = upstream_announcing("IMAP4rev1 IDLE", |conn| {
        let first = conn.line().unwrap_or_default();
        assert!(first.starts_with("b NOOP"), "the client's command first: {first}");
        conn.send(b"b OK NOOP done\r\n");
        answer_all_but_the_quota_question(conn);
    });
    let (dir, pki) = new_pki();
    let rig = start_rig(&fake, "plaintext", dir, pki);
    let mut client = rig.client();
    client.command("a", "LOGIN user pw");
    assert_eq!(client.command("b", "NOOP"), ["b OK NOOP done"]);
    let metrics = rig.gateway.metrics();
    for result in ["read", "none", "failed"] {
        assert!(metrics.contains(&format!("mailgate_quota_checks_total{{result=\"{result}\"}} 0")), "{metrics}");
    }
}

/// With mailgate's quota question unanswered (the client owes nothing and is owed nothing):
/// the idle timer still logs the client out, and a shutdown ends the session with its BYE
/// at once, not at the end of the grace period.
#[test]
fn an_unanswered_quota_question_holds_neither_the_idle_timer_nor_a_shutdown() {
    let fake = upstream_announcing("IMAP4rev1 IDLE QUOTA", answer_all_but_the_quota_question);
    let (dir, pki) = new_pki();
    let config = gateway_config(&pki, &fake.addr.to_string(), "plaintext", Some(&pki.ca), "idle_timeout = \"2s\"", "");
    let mut gateway = Gateway::start(dir.path(), &config);
    let client_for = |gateway: &Gateway| {
        let mut client = Client::tls(gateway.addr("imaps"), pki.client_config(&[]));
        assert!(client.line().unwrap().starts_with("* OK"));
        assert!(client.command("a", "LOGIN user pw")[0].starts_with("a OK"));
        client
    };

    let mut idle = client_for(&gateway);
    let started = Instant::now();
    assert_eq!(idle.line().as_deref(), Some("* BYE Autologout; idle for too long."));
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

    let mut client = client_for(&gateway);
    assert_eq!(client.command("b", "NOOP"), ["b OK NOOP done"]);
    let started = Instant::now();
    let status = gateway.terminate(Duration::from_secs(10)).expect("exited");
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "no drain for the question: {:?}", started.elapsed());
    assert_eq!(client.line().as_deref(), Some("* BYE Server shutting down."));
}
