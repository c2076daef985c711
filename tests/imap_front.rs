//! The pre-authentication front over real sockets, with Dovecot as the upstream:
//! TLS enforcement (the NO STARTTLS matrix), ALPN and version policy, login methods,
//! bad input, and what reaches the log.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use support::client::{handshake, Client};
use support::setup::*;

fn starttls_client(setup: &Setup) -> Client {
    let mut client = Client::plain(setup.addr("imap"));
    let greeting = client.line().unwrap();
    assert!(greeting.contains("STARTTLS") && greeting.contains("LOGINDISABLED"), "{greeting}");
    assert!(!greeting.contains("AUTH="), "{greeting}");
    client
}

/// Proves the gateway still serves a normal client after whatever a test did.
fn assert_still_serving(setup: &Setup) {
    let mut client = setup.login(BOB);
    let lines = client.command("z", "SELECT INBOX");
    assert!(lines.last().unwrap().starts_with("z OK"), "{lines:?}");
}

#[test]
fn starttls_discards_pipelined_plaintext() {
    let setup = Setup::start();
    // The classic injection: a command pipelined after STARTTLS in the same segment.
    for (pipelined, tag) in [("b LOGIN bob bob-Pass-42\r\n", "b"), ("XQZJK NOOP\r\n", "XQZJK")] {
        let mut client = starttls_client(&setup);
        client.send(format!("a STARTTLS\r\n{pipelined}").as_bytes());
        let ok = client.line().unwrap();
        assert!(ok.starts_with("a OK"), "{ok}");
        // No plaintext byte follows `OK Begin TLS`: the handshake would fail otherwise.
        client.upgrade(setup.tls_config());
        let lines = client.command("c", "NOOP");
        assert_eq!(lines, ["c OK NOOP completed."], "the pipelined command was executed");
        let caps = client.command("d", "CAPABILITY");
        assert!(caps[0].contains("AUTH=PLAIN") && !caps[0].contains("STARTTLS"), "{caps:?}");
        client.send(b"e LOGOUT\r\n");
        let rest = client.rest();
        assert!(rest.iter().all(|l| !l.starts_with(tag)), "{tag} answered inside TLS: {rest:?}");
    }
    assert!(!setup.gateway.log().contains("logged in"), "the injected LOGIN reached the upstream");
}

#[test]
fn credentials_before_tls_are_refused_without_reading_a_password() {
    let setup = Setup::start();
    let mut client = starttls_client(&setup);
    let caps = client.command("a", "CAPABILITY");
    assert!(caps[0].contains("LOGINDISABLED") && !caps[0].contains("AUTH="), "{caps:?}");
    let login = client.command("b", "LOGIN bob bob-Pass-42");
    assert!(login[0].starts_with("b NO [PRIVACYREQUIRED]"), "{login:?}");
    let auth = client.command("c", "AUTHENTICATE PLAIN AGJvYgBib2ItUGFzcy00Mg==");
    assert!(auth[0].starts_with("c NO [PRIVACYREQUIRED]"), "{auth:?}");
    // A synchronizing literal is refused before the client sends the password.
    client.send(b"d LOGIN bob {12}\r\n");
    let refused = client.line().unwrap();
    assert!(refused.starts_with("d NO [PRIVACYREQUIRED]"), "{refused}");
    // The session is still usable, and STARTTLS then LOGIN works.
    client.starttls(setup.tls_config());
    let login = client.command("e", "LOGIN bob bob-Pass-42");
    assert!(login.last().unwrap().starts_with("e OK [CAPABILITY"), "{login:?}");
    // The log is read by another thread: wait for the line before counting.
    assert!(setup.gateway.wait_for_log("logged in", std::time::Duration::from_secs(5)));
    let log = setup.gateway.log();
    assert_eq!(log.matches("logged in").count(), 1, "{log}");
}

#[test]
fn starttls_is_refused_where_it_makes_no_sense() {
    let setup = Setup::start();
    let mut client = setup.imaps();
    let lines = client.command("a", "STARTTLS");
    assert!(lines[0].starts_with("a BAD"), "{lines:?}");
    let mut client = starttls_client(&setup);
    client.starttls(setup.tls_config());
    let lines = client.command("b", "STARTTLS");
    assert!(lines[0].starts_with("b BAD"), "{lines:?}");
    let mut client = Client::plain(setup.addr("plain"));
    client.line().unwrap();
    let lines = client.command("c", "STARTTLS");
    assert!(lines[0].starts_with("c BAD"), "{lines:?}");
}

#[test]
fn plaintext_to_an_implicit_port_gets_no_greeting() {
    let setup = Setup::start();
    let mut tcp = TcpStream::connect(setup.addr("imaps")).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"a LOGIN bob bob-Pass-42\r\n").unwrap();
    let mut received = Vec::new();
    let _ = tcp.read_to_end(&mut received);
    assert!(!String::from_utf8_lossy(&received).contains("OK"), "{received:?}");
    assert!(!setup.gateway.log().contains("logged in"));
}

#[test]
fn alpn_other_than_imap_is_refused() {
    let setup = Setup::start();
    let tcp = TcpStream::connect(setup.addr("imaps")).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let refused = handshake(tcp, setup.pki.client_config(&[b"http/1.1"]), "localhost");
    assert!(refused.is_err(), "ALPN http/1.1 was accepted");
    let tcp = TcpStream::connect(setup.addr("imaps")).unwrap();
    let accepted = handshake(tcp, setup.pki.client_config(&[b"imap"]), "localhost").expect("ALPN imap");
    assert_eq!(accepted.conn.alpn_protocol(), Some(&b"imap"[..]));
    // The same policy after STARTTLS.
    let mut client = starttls_client(&setup);
    client.send(b"a STARTTLS\r\n");
    assert!(client.line().unwrap().starts_with("a OK"));
    let support::client::Conn::Plain(tcp) = std::mem::replace(&mut client.conn, support::client::Conn::Detached) else {
        panic!()
    };
    assert!(handshake(tcp, setup.pki.client_config(&[b"pop3"]), "localhost").is_err());
}

#[test]
fn tls_1_1_is_refused_and_1_2_and_1_3_work() {
    let setup = Setup::start();
    let port = setup.addr("imaps").port();
    let s_client = |args: &[&str]| {
        let mut child = Command::new("timeout")
            .args([
                "20",
                "openssl",
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-crlf",
                "-ign_eof",
                "-CAfile",
            ])
            .arg(&setup.pki.ca)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl");
        child.stdin.take().unwrap().write_all(b"a LOGOUT\n").unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    let old = s_client(&["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]);
    assert!(!old.contains("* OK"), "TLS 1.1 got a greeting: {old}");
    for version in ["-tls1_2", "-tls1_3"] {
        let out = s_client(&[version]);
        assert!(out.contains("* OK [CAPABILITY"), "{version}: {out}");
    }
}

#[test]
fn login_with_quoted_strings_literals_and_literal_plus() {
    let setup = Setup::start();
    // ALICE's password needs a literal; BOB's is an atom, sent quoted here.
    let mut client = setup.imaps();
    let lines = client.command("a", "LOGIN \"bob\" \"bob-Pass-42\"");
    assert!(lines.last().unwrap().starts_with("a OK [CAPABILITY IMAP4rev1"), "{lines:?}");
    let caps = lines.last().unwrap();
    for hidden in ["STARTTLS", "AUTH=", "LOGINDISABLED", "COMPRESS="] {
        assert!(!caps.contains(hidden), "{hidden} relayed: {caps}");
    }

    let mut client = setup.imaps();
    let password = ALICE.1.as_bytes();
    client.send(b"b LOGIN {5}\r\n");
    assert!(client.line().unwrap().starts_with("+ "));
    client.send(format!("alice {{{}}}\r\n", password.len()).as_bytes());
    assert!(client.line().unwrap().starts_with("+ "));
    client.send(password);
    client.send(b"\r\n");
    let lines = client.until_tagged("b");
    assert!(lines.last().unwrap().starts_with("b OK"), "{lines:?}");

    // LITERAL+ is what Setup::login uses.
    let mut client = setup.login(ALICE);
    assert!(client.command("c", "NOOP").last().unwrap().starts_with("c OK"));

    let mut client = setup.imaps();
    let lines = client.command("d", "LOGIN bob wrong-password");
    assert!(lines[0].starts_with("d NO [AUTHENTICATIONFAILED]"), "{lines:?}");
    assert_no_secret_in_log(&setup);
}

#[test]
fn authenticate_plain_with_and_without_initial_response() {
    let setup = Setup::start();
    let plain = STANDARD.encode(format!("\0{}\0{}", ALICE.0, ALICE.1));
    let mut client = setup.imaps();
    let lines = client.command("a", &format!("AUTHENTICATE PLAIN {plain}"));
    assert!(lines.last().unwrap().starts_with("a OK [CAPABILITY"), "{lines:?}");

    let mut client = setup.imaps();
    client.send(b"b AUTHENTICATE PLAIN\r\n");
    assert_eq!(client.line().unwrap(), "+ ");
    client.send(format!("{plain}\r\n").as_bytes());
    let lines = client.until_tagged("b");
    assert!(lines.last().unwrap().starts_with("b OK"), "{lines:?}");

    let mut client = setup.imaps();
    client.send(b"c AUTHENTICATE PLAIN\r\n");
    assert_eq!(client.line().unwrap(), "+ ");
    client.send(b"*\r\n");
    assert!(client.line().unwrap().starts_with("c BAD"), "cancel");
    let lines = client.command("d", "AUTHENTICATE PLAIN !!notbase64");
    assert!(lines[0].starts_with("d BAD"), "{lines:?}");
    let lines = client.command("e", "AUTHENTICATE CRAM-MD5");
    assert!(lines[0].starts_with("e NO"), "{lines:?}");
    let wrong = STANDARD.encode("\0alice\0not-it");
    let lines = client.command("f", &format!("AUTHENTICATE PLAIN {wrong}"));
    assert!(lines[0].starts_with("f NO [AUTHENTICATIONFAILED]"), "{lines:?}");
    assert_no_secret_in_log(&setup);
}

fn assert_no_secret_in_log(setup: &Setup) {
    assert!(setup.gateway.wait_for_log("logged in", Duration::from_secs(5)), "trace log was not captured");
    let log = setup.gateway.log();
    for (user, password) in [ALICE, BOB] {
        for secret in
            [password.to_string(), STANDARD.encode(password), STANDARD.encode(format!("\0{user}\0{password}"))]
        {
            assert!(!log.contains(&secret), "log contains a secret ({secret})");
        }
    }
    for secret in ["wrong-password", "not-it"] {
        assert!(!log.contains(secret), "log contains {secret}");
    }
}

#[test]
fn bad_input_gets_protocol_answers_and_others_are_still_served() {
    let setup = Setup::start();

    // 100 KiB without a line ending.
    let mut client = setup.imaps();
    let _ = client.try_send(&vec![b'a'; 100 * 1024]);
    let rest = client.rest();
    assert!(rest.iter().any(|l| l.starts_with("* BYE")), "{rest:?}");
    assert_still_serving(&setup);

    // A literal size that does not fit in 64 bits.
    let mut client = setup.imaps();
    client.send(b"a LOGIN {99999999999999999999}\r\n");
    let line = client.line().unwrap();
    assert!(line.starts_with("a BAD"), "{line}");
    assert_still_serving(&setup);

    // A NUL byte.
    let mut client = setup.imaps();
    let lines = client.command("a", "LOGIN bob b\0b");
    assert!(lines.last().unwrap().contains("BAD"), "{lines:?}");
    assert_still_serving(&setup);

    // A literal too large before authentication: BAD, and never a continuation.
    let mut client = setup.imaps();
    client.send(b"a LOGIN {100000}\r\n");
    let line = client.line().unwrap();
    assert!(line.starts_with("a BAD [TOOBIG]"), "{line}");
    let lines = client.command("b", "NOOP");
    assert_eq!(lines, ["b OK NOOP completed."]);

    // Three bad commands: BYE and close.
    let mut client = setup.imaps();
    client.send(b"1 FROB\r\n2 SELECT INBOX\r\nGET / HTTP/1.1\r\n");
    let rest = client.rest();
    assert_eq!(rest.len(), 4, "{rest:?}");
    assert!(rest[..3].iter().all(|l| l.contains(" BAD ")), "{rest:?}");
    assert!(rest[3].starts_with("* BYE"), "{rest:?}");
    assert_still_serving(&setup);
}

#[test]
fn bad_command_limit_is_configurable() {
    let setup = Setup::start_with("max_bad_commands = 1", "");
    let mut client = setup.imaps();
    client.send(b"1 FROB\r\n");
    let rest = client.rest();
    assert!(rest[0].starts_with("1 BAD") && rest[1].starts_with("* BYE"), "{rest:?}");
}

#[test]
fn login_timeout_says_bye() {
    let setup = Setup::start_with("login_timeout = \"1s\"", "");
    let mut client = setup.imaps();
    let rest = client.rest();
    assert_eq!(rest, ["* BYE Login timeout, disconnecting."]);
}

#[test]
fn preauth_commands_are_answered_by_the_gateway() {
    let setup = Setup::start();
    let mut client = setup.imaps();
    let caps = client.command("a", "CAPABILITY");
    assert_eq!(caps[0], "* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN");
    let id = client.command("b", "ID (\"name\" \"test\")");
    assert!(id[0].starts_with("* ID"), "{id:?}");
    assert_eq!(client.command("c", "NOOP"), ["c OK NOOP completed."]);
    client.send(b"d LOGOUT\r\n");
    assert_eq!(client.rest(), ["* BYE Logging out.", "d OK LOGOUT completed."]);
}

#[test]
fn a_silent_client_is_cut_at_the_tls_handshake_timeout() {
    let setup = Setup::start();
    let started = std::time::Instant::now();
    let mut tcp = TcpStream::connect(setup.addr("imaps")).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut received = Vec::new();
    let _ = tcp.read_to_end(&mut received);
    let elapsed = started.elapsed();
    assert!(received.is_empty(), "{received:?}");
    // The test configuration sets handshake_timeout = "5s".
    assert!(elapsed >= Duration::from_secs(4) && elapsed < Duration::from_secs(15), "{elapsed:?}");
}
