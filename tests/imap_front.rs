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
    for hidden in ["STARTTLS", "AUTH=", "LOGINDISABLED"] {
        assert!(!caps.contains(hidden), "{hidden} relayed: {caps}");
    }
    assert!(caps.ends_with(" COMPRESS=DEFLATE] Logged in"), "mailgate's own COMPRESS: {caps}");

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

// ---------------------------------------------------------------------------------------
// Pre-login commands longer than a line limit (issue 12, defect 6)
// ---------------------------------------------------------------------------------------

/// An OAuth access token of several KB (as PLAIN's password, which Dovecot's oauth2 passdb
/// takes, or in OAUTHBEARER): over the 8 KiB line limit in base64.
fn token() -> String {
    (0..7000).map(|i| b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[i * 7 % 64] as char).collect()
}

#[derive(Clone, Copy, Debug)]
enum IdForm {
    Quoted,
    /// Every field and value a synchronizing literal.
    Literals,
    /// LITERAL+.
    NonSyncLiterals,
}

/// Sends `tag ID (...)` with RFC 2971's maximum: 30 pairs, 30-octet fields, 1024-octet
/// values; returns the answer.
fn send_maximal_id(client: &mut Client, tag: &str, form: IdForm) -> Vec<String> {
    let pairs: Vec<(String, String)> = (0..30)
        .map(|i| {
            let field = format!("x-field-{i:02}-{}", "f".repeat(19));
            let value = format!("{i:02}{}", "v".repeat(1022));
            assert_eq!((field.len(), value.len()), (30, 1024));
            (field, value)
        })
        .collect();
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    match form {
        IdForm::Quoted => {
            let list: Vec<String> = pairs.iter().map(|(f, v)| format!("{} {}", quote(f), quote(v))).collect();
            let line = format!("{tag} ID ({})\r\n", list.join(" "));
            assert!(line.len() > 30_000, "{}", line.len());
            client.send(line.as_bytes());
        }
        IdForm::Literals | IdForm::NonSyncLiterals => {
            let plus = if matches!(form, IdForm::NonSyncLiterals) { "+" } else { "" };
            let mut pending = format!("{tag} ID (");
            for (i, (field, value)) in pairs.iter().enumerate() {
                for (j, text) in [field, value].into_iter().enumerate() {
                    if i > 0 || j > 0 {
                        pending.push(' ');
                    }
                    pending.push_str(&format!("{{{}{plus}}}\r\n", text.len()));
                    client.send(pending.as_bytes());
                    if plus.is_empty() {
                        let go = client.line().unwrap();
                        assert!(go.starts_with("+"), "{form:?}: {go}");
                    }
                    client.send(text.as_bytes());
                    pending.clear();
                }
            }
            client.send(b")\r\n");
        }
    }
    client.until_tagged(tag)
}

/// The answer's shape: untagged response names and the tagged status (the server's own
/// ID fields and texts differ).
fn shape(lines: &[String]) -> Vec<String> {
    lines.iter().map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" ")).collect()
}

#[test]
fn a_maximal_id_is_answered_as_dovecot_answers_it() {
    let setup = Setup::start();
    for form in [IdForm::Quoted, IdForm::Literals, IdForm::NonSyncLiterals] {
        let mut direct =
            Client::tls(setup.dovecot.imaps, support::tls::client_config_trusting(&setup.dovecot.ca_pem(), &[]));
        direct.line().unwrap();
        let want = send_maximal_id(&mut direct, "i", form);
        let mut via = setup.imaps();
        let got = send_maximal_id(&mut via, "i", form);
        assert_eq!(shape(&got), shape(&want), "{form:?}: through mailgate {got:?}, direct {want:?}");
        assert_eq!(shape(&got), ["* ID", "i OK"], "{form:?}");
        // The session goes on: the ID cost it nothing.
        via.login(BOB);
        assert!(via.command("s", "SELECT INBOX").last().unwrap().starts_with("s OK"));
    }
}

/// mailgate admits an AUTHENTICATE of OAuth size, as SASL-IR and as the response line, and
/// its answer is a tagged one: the upstream's to give (Dovecot's own limit for SASL data
/// is about 8 KB, and it drops such a login: see defect 7 of issue 12 for how that is
/// answered), or mailgate's NO for a mechanism it does not offer. No BYE for the size.
#[test]
fn an_oauth_sized_authenticate_gets_a_tagged_answer_not_a_bye() {
    let setup = Setup::start();
    let token = token();
    let plain = STANDARD.encode(format!("\0bob\0{token}"));
    assert!(plain.len() > 9000, "{}", plain.len());

    let mut client = setup.imaps();
    let lines = client.command("a", &format!("AUTHENTICATE PLAIN {plain}"));
    assert!(lines.last().unwrap().starts_with("a NO "), "SASL-IR: {lines:?}");
    client.send(b"b AUTHENTICATE PLAIN\r\n");
    assert_eq!(client.line().unwrap(), "+ ");
    client.send(format!("{plain}\r\n").as_bytes());
    let lines = client.until_tagged("b");
    assert!(lines.last().unwrap().starts_with("b NO "), "response line: {lines:?}");
    // A mechanism mailgate does not offer: a clear NO, whatever the size.
    let bearer = STANDARD.encode(format!("n,a=bob,\x01auth=Bearer {token}\x01\x01"));
    let lines = client.command("c", &format!("AUTHENTICATE OAUTHBEARER {bearer}"));
    assert_eq!(lines, ["c NO [CANNOT] Unsupported authentication mechanism."]);
    // The same session still logs in.
    client.login(BOB);
    let log = setup.gateway.log();
    assert!(!log.contains(&token[..100]) && !log.contains(&plain[..100]), "the token reached the log");
}

#[test]
fn commands_over_the_pre_login_bounds_are_refused_clearly_and_logged() {
    let setup = Setup::start();
    // Any other command keeps the line limit (8 KiB).
    let mut client = setup.imaps();
    let _ = client.try_send(format!("a LOGIN bob {}\r\n", "x".repeat(9000)).as_bytes());
    assert_eq!(client.rest(), ["* BYE Command line too long."]);
    // An ID line over the long bound (64 KiB).
    let mut client = setup.imaps();
    let _ = client.try_send(format!("b ID (\"name\" \"{}\")\r\n", "x".repeat(70_000)).as_bytes());
    assert_eq!(client.rest(), ["* BYE Command line too long."]);
    // An ID whose literals together pass it (30 pairs of 4 KiB values, LITERAL+).
    let mut client = setup.imaps();
    let mut id = b"c ID (".to_vec();
    for i in 0..30 {
        id.extend_from_slice(format!("{}\"f{i}\" {{4096+}}\r\n", if i > 0 { " " } else { "" }).as_bytes());
        id.extend_from_slice(&[b'v'; 4096]);
    }
    id.extend_from_slice(b")\r\n");
    let _ = client.try_send(&id);
    assert_eq!(client.rest(), ["* BYE Command too long."]);
    assert_still_serving(&setup);
    let log = setup.gateway.log();
    let refusals: Vec<&str> =
        log.lines().filter(|l| l.contains(" INFO ") && l.contains("too long before login")).collect();
    assert_eq!(refusals.len(), 3, "{refusals:#?}");
    assert!(refusals.iter().any(|l| l.contains("command=\"ID\"") || l.contains("command=ID")), "{refusals:#?}");
}
