//! POP3 upstream failures injected with the scripted fake upstream.

mod support;

use std::time::{Duration, Instant};

use support::client::Client;
use support::fake_upstream::{FakeConn, FakeUpstream};
use support::gateway::Gateway;
use support::setup::gateway_config_with;
use support::tls::TestPki;

struct Rig {
    _dir: tempfile::TempDir,
    pki: TestPki,
    gateway: Gateway,
}

fn start_rig(fake: &FakeUpstream, upstream_tls: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    // The cache is off: its own UIDL at session start would be part of every script.
    let config = gateway_config_with(
        &pki,
        None,
        Some(&fake.addr.to_string()),
        upstream_tls,
        Some(&pki.ca),
        "",
        "[cache]\nenabled = false\n",
    )
    .replace("login_timeout = \"15s\"", "login_timeout = \"2s\"");
    let gateway = Gateway::start(dir.path(), &config);
    Rig { _dir: dir, pki, gateway }
}

impl Rig {
    fn client(&self) -> Client {
        let mut client = Client::tls(self.gateway.addr("pop3s"), self.pki.client_config(&[]));
        assert!(client.line().unwrap().starts_with("+OK"));
        client
    }

    /// USER/PASS; returns the answer to PASS.
    fn login(&self, client: &mut Client) -> String {
        client.send(b"USER user\r\nPASS secret-pw\r\n");
        assert!(client.line().unwrap().starts_with("+OK"));
        client.line().unwrap()
    }
}

/// Greets and accepts USER/PASS (answering CAPA without SASL).
fn accept_login(conn: &mut FakeConn) {
    conn.send(b"+OK fake POP3\r\n");
    while let Some(line) = conn.line() {
        match line.split(' ').next().unwrap_or_default() {
            "CAPA" => conn.send(b"+OK\r\nUSER\r\nUIDL\r\n.\r\n"),
            "USER" => conn.send(b"+OK\r\n"),
            "PASS" => {
                conn.send(b"+OK logged in\r\n");
                return;
            }
            _ => conn.send(b"-ERR what\r\n"),
        }
    }
}

#[test]
fn upstream_disconnect_mid_retr_never_completes_the_message() {
    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| {
        accept_login(conn);
        let _ = conn.line(); // RETR 1
        conn.send(b"+OK 5000 octets\r\nSubject: cut\r\n\r\n..a dot line\r\npartial body");
    });
    let rig = start_rig(&fake, "plaintext");
    let mut client = rig.client();
    assert_eq!(rig.login(&mut client), "+OK Logged in.");
    client.send(b"RETR 1\r\n");
    let rest = client.rest_bytes();
    assert_eq!(rest, b"+OK 5000 octets\r\nSubject: cut\r\n\r\n..a dot line\r\npartial body".to_vec());
    assert!(!rest.ends_with(b".\r\n"));
}

#[test]
fn upstream_closing_between_responses_gives_sys_temp() {
    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| {
        accept_login(conn);
        let _ = conn.line(); // STAT: no answer, the connection drops
    });
    let rig = start_rig(&fake, "plaintext");
    let mut client = rig.client();
    rig.login(&mut client);
    client.send(b"STAT\r\n");
    assert_eq!(client.rest(), ["-ERR [SYS/TEMP] Mail server closed the connection."]);
}

#[test]
fn garbage_and_slow_greetings_are_sys_temp() {
    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| conn.send(b"\x00\xffSSH-2.0-OpenSSH\r\n"));
    let rig = start_rig(&fake, "plaintext");
    let mut client = rig.client();
    assert_eq!(rig.login(&mut client), "-ERR [SYS/TEMP] Mail server unavailable, try again later.");

    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| {
        std::thread::sleep(Duration::from_secs(4));
        conn.send(b"+OK late\r\n");
    });
    let rig = start_rig(&fake, "plaintext");
    let mut client = rig.client();
    let started = Instant::now();
    assert_eq!(rig.login(&mut client), "-ERR [SYS/TEMP] Mail server unavailable, try again later.");
    assert!(started.elapsed() < Duration::from_secs(4));
    // The session survives; another attempt gets a clear answer too.
    client.send(b"QUIT\r\n");
    assert_eq!(client.line().unwrap(), "+OK Bye.");
}

#[test]
fn stls_injection_and_missing_stls_never_expose_credentials() {
    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| {
        conn.send(b"+OK fake\r\n");
        let _ = conn.line(); // CAPA
        conn.send(b"+OK\r\nSTLS\r\nUSER\r\n.\r\n");
        let _ = conn.line(); // STLS
        conn.send(b"+OK begin\r\n+OK injected\r\n");
        let _ = conn.line();
    });
    let rig = start_rig(&fake, "starttls");
    let mut client = rig.client();
    assert_eq!(rig.login(&mut client), "-ERR [SYS/TEMP] Mail server unavailable, try again later.");
    assert!(!fake.received().contains("secret-pw") && !fake.received().contains("USER"), "{}", fake.received());

    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| {
        conn.send(b"+OK fake\r\n");
        while let Some(line) = conn.line() {
            if line == "CAPA" {
                conn.send(b"+OK\r\nUSER\r\n.\r\n");
            } else {
                conn.send(b"-ERR no\r\n");
            }
        }
    });
    let rig = start_rig(&fake, "starttls");
    let mut client = rig.client();
    assert_eq!(rig.login(&mut client), "-ERR [SYS/TEMP] Mail server unavailable, try again later.");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!fake.received().contains("secret-pw") && !fake.received().contains("USER"), "{}", fake.received());
}

#[test]
fn upstream_codes_reach_the_client() {
    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| {
        conn.send(b"+OK fake\r\n");
        while let Some(line) = conn.line() {
            match line.split(' ').next().unwrap_or_default() {
                "CAPA" => conn.send(b"+OK\r\nUSER\r\nRESP-CODES\r\n.\r\n"),
                "USER" => conn.send(b"+OK\r\n"),
                _ => conn.send(b"-ERR [LOGIN-DELAY] wait 10 minutes\r\n"),
            }
        }
    });
    let rig = start_rig(&fake, "plaintext");
    let mut client = rig.client();
    assert_eq!(rig.login(&mut client), "-ERR [LOGIN-DELAY] Login refused by the mail server.");
}

#[test]
fn upstream_without_pipelining_gets_one_command_at_a_time() {
    let fake = FakeUpstream::start(None, |conn: &mut FakeConn| {
        accept_login(conn);
        // A strict server: it answers each command, and fails the session if a second
        // command arrives before its answer was sent.
        for n in 0..3 {
            let _ = conn.line();
            std::thread::sleep(Duration::from_millis(100));
            assert!(conn.pending_is_empty(), "pipelined to a server without PIPELINING");
            conn.send(format!("+OK answer {n}\r\n").as_bytes());
        }
    });
    let rig = start_rig(&fake, "plaintext");
    let mut client = rig.client();
    rig.login(&mut client);
    client.send(b"NOOP\r\nNOOP\r\nNOOP\r\n");
    for n in 0..3 {
        assert_eq!(client.line().unwrap(), format!("+OK answer {n}"));
    }
}
