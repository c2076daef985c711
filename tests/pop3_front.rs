//! The POP3 AUTHORIZATION state over real sockets, Dovecot as the upstream: STLS
//! enforcement, login methods, refusal codes, bad input and what reaches the log.

mod support;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use support::client::Client;
use support::setup::*;

fn stls_client(setup: &Setup) -> Client {
    let mut client = Client::plain(setup.addr("pop3"));
    let greeting = client.line().unwrap();
    assert!(greeting.starts_with("+OK") && !greeting.contains('<'), "APOP timestamp in {greeting}");
    client
}

/// Lines of a multi-line response, up to and including the `.` line.
fn multiline(client: &mut Client) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let line = client.line().expect("multi-line response");
        let done = line == ".";
        lines.push(line);
        if done {
            return lines;
        }
    }
}

fn assert_still_serving(setup: &Setup) {
    let mut client = setup.pop3_login(BOB);
    client.send(b"STAT\r\n");
    assert!(client.line().unwrap().starts_with("+OK"));
}

#[test]
fn stls_discards_pipelined_plaintext() {
    let setup = Setup::start();
    let mut client = stls_client(&setup);
    // CAPA pipelined after STLS must not be answered inside TLS.
    client.send(b"STLS\r\nCAPA\r\n");
    assert!(client.line().unwrap().starts_with("+OK"));
    client.upgrade(setup.tls_config());
    client.send(b"NOOP\r\n");
    // NOOP before login is an error; the first line inside TLS must answer it, not CAPA.
    let line = client.line().unwrap();
    assert!(line.starts_with("-ERR"), "{line}");
    client.send(b"CAPA\r\n");
    assert_eq!(client.line().unwrap(), "+OK Capability list follows");
    let capa = multiline(&mut client);
    for cap in ["USER", "SASL PLAIN", "UIDL", "TOP", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"] {
        assert!(capa.iter().any(|c| c == cap), "{cap} missing: {capa:?}");
    }
    assert!(!capa.iter().any(|c| c == "STLS"), "{capa:?}");
    client.send(b"STLS\r\n");
    assert!(client.line().unwrap().starts_with("-ERR"), "second STLS");
}

#[test]
fn credentials_before_stls_are_refused_without_an_upstream_connection() {
    let setup = Setup::start();
    let mut client = stls_client(&setup);
    client.send(b"CAPA\r\n");
    assert!(client.line().unwrap().starts_with("+OK"));
    let capa = multiline(&mut client);
    assert!(capa.contains(&"STLS".to_string()), "{capa:?}");
    assert!(!capa.iter().any(|c| c == "USER" || c.starts_with("SASL")), "{capa:?}");
    for command in ["USER bob", "PASS bob-Pass-42", "AUTH PLAIN AGJvYgBib2ItUGFzcy00Mg==", "AUTH PLAIN"] {
        client.send(format!("{command}\r\n").as_bytes());
        let line = client.line().unwrap();
        assert!(line.starts_with("-ERR [AUTH]") && line.contains("STLS"), "{command}: {line}");
    }
    // After STLS the same login works.
    client.send(b"STLS\r\n");
    assert!(client.line().unwrap().starts_with("+OK"));
    client.upgrade(setup.tls_config());
    client.send(b"USER bob\r\nPASS bob-Pass-42\r\n");
    assert!(client.line().unwrap().starts_with("+OK"));
    assert_eq!(client.line().unwrap(), "+OK Logged in.");
    // The log is read by another thread: wait for the line before counting.
    assert!(setup.gateway.wait_for_log("logged in", std::time::Duration::from_secs(5)));
    let log = setup.gateway.log();
    assert_eq!(log.matches("logged in").count(), 1, "{log}");
}

#[test]
fn apop_is_refused_clearly() {
    let setup = Setup::start();
    let mut client = setup.pop3s();
    client.send(b"APOP bob c4c9334bac560ecc979e58001b3e22fb\r\n");
    let line = client.line().unwrap();
    assert!(line.starts_with("-ERR") && line.contains("APOP is not supported"), "{line}");
}

#[test]
fn user_pass_and_auth_plain_log_in_and_failures_carry_codes() {
    let setup = Setup::start();
    // USER/PASS with a password full of special characters (PASS takes the rest of the line).
    let mut client = setup.pop3s();
    client.send(format!("USER {}\r\nPASS {}\r\n", ALICE.0, ALICE.1).as_bytes());
    assert!(client.line().unwrap().starts_with("+OK"));
    assert_eq!(client.line().unwrap(), "+OK Logged in.");

    // AUTH PLAIN with an initial response, and with a continuation.
    let plain = STANDARD.encode(format!("\0{}\0{}", BOB.0, BOB.1));
    let mut client = setup.pop3s();
    client.send(format!("AUTH PLAIN {plain}\r\n").as_bytes());
    assert_eq!(client.line().unwrap(), "+OK Logged in.");
    // Dovecot locks a maildrop per POP3 session: end this one before the next login.
    quit(client);
    let mut client = setup.pop3s();
    client.send(b"AUTH PLAIN\r\n");
    assert_eq!(client.line().unwrap(), "+ ");
    client.send(format!("{plain}\r\n").as_bytes());
    assert_eq!(client.line().unwrap(), "+OK Logged in.");

    // Cancel, a wrong password, an unsupported mechanism.
    let mut client = setup.pop3s();
    client.send(b"AUTH PLAIN\r\n");
    assert_eq!(client.line().unwrap(), "+ ");
    client.send(b"*\r\n");
    assert!(client.line().unwrap().starts_with("-ERR"));
    client.send(b"USER bob\r\nPASS wrong-password\r\n");
    assert!(client.line().unwrap().starts_with("+OK"));
    assert_eq!(client.line().unwrap(), "-ERR [AUTH] Authentication failed.");
    client.send(b"AUTH CRAM-MD5\r\n");
    assert!(client.line().unwrap().starts_with("-ERR [AUTH]"));
    client.send(b"AUTH\r\n");
    assert_eq!(multiline_after_ok(&mut client), ["PLAIN", "."]);
    client.send(b"QUIT\r\n");
    assert_eq!(client.rest(), ["+OK Bye."]);

    assert!(setup.gateway.wait_for_log("logged in", Duration::from_secs(5)));
    let log = setup.gateway.log();
    for secret in [ALICE.1.to_string(), BOB.1.to_string(), plain, "wrong-password".to_string(), STANDARD.encode(BOB.1)]
    {
        assert!(!log.contains(&secret), "log contains a secret ({secret})");
    }
}

fn quit(mut client: Client) {
    client.send(b"QUIT\r\n");
    let _ = client.rest();
    std::thread::sleep(Duration::from_millis(100));
}

fn multiline_after_ok(client: &mut Client) -> Vec<String> {
    assert!(client.line().unwrap().starts_with("+OK"));
    multiline(client)
}

#[test]
fn upstream_in_use_code_reaches_the_client() {
    let setup = Setup::start();
    // Dovecot locks the maildrop for the first session; the second gets [IN-USE].
    let _first = setup.pop3_login(BOB);
    let mut second = setup.pop3s();
    second.send(b"USER bob\r\nPASS bob-Pass-42\r\n");
    assert!(second.line().unwrap().starts_with("+OK"));
    let line = second.line().unwrap();
    assert!(line.starts_with("-ERR [IN-USE]"), "{line}");
}

#[test]
fn bad_input_gets_err_and_others_are_still_served() {
    let setup = Setup::start();
    let mut client = setup.pop3s();
    let _ = client.try_send(&vec![b'A'; 10 * 1024]);
    let rest = client.rest();
    assert_eq!(rest, ["-ERR Line too long."]);
    assert_still_serving(&setup);

    let mut client = setup.pop3s();
    client.send(b"AUTH PLAIN !!!notbase64\r\n");
    assert!(client.line().unwrap().starts_with("-ERR [AUTH] Invalid SASL PLAIN"));
    client.send(b"FROB\r\n");
    assert_eq!(client.line().unwrap(), "-ERR Unknown command.");
    client.send(b"USER b\0b\r\n");
    assert_eq!(client.line().unwrap(), "-ERR NUL byte in command.");
    assert_eq!(client.rest(), ["-ERR Too many invalid commands, closing."]);
    assert_still_serving(&setup);
}

#[test]
fn login_timeout_closes_with_sys_temp() {
    let setup = Setup::start_with("", "[pop3]\nlogin_timeout = \"1s\"\n");
    let mut client = setup.pop3s();
    let started = std::time::Instant::now();
    assert_eq!(client.rest(), ["-ERR [SYS/TEMP] Login timeout, disconnecting."]);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn alpn_pop3_is_accepted_and_imap_refused_on_pop3_ports() {
    let setup = Setup::start();
    let tcp = std::net::TcpStream::connect(setup.addr("pop3s")).unwrap();
    assert!(support::client::handshake(tcp, setup.pki.client_config(&[b"imap"]), "localhost").is_err());
    let tcp = std::net::TcpStream::connect(setup.addr("pop3s")).unwrap();
    let tls = support::client::handshake(tcp, setup.pki.client_config(&[b"pop3"]), "localhost").unwrap();
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"pop3"[..]));
}
