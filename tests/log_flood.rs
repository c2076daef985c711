//! What a peer can make mailgate log is bounded: many connections that each trigger a
//! warning (a client sending an IP address as SNI, logins while the upstream is down) give
//! a bounded number of WARN lines in the real process's log, however many connections.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use support::client::Client;
use support::gateway::Gateway;
use support::setup::gateway_config_with;
use support::tls::TestPki;
use tokio_rustls::rustls::{pki_types::ServerName, ClientConfig, ClientConnection};

const CONNECTIONS: usize = 200;

/// A loopback address where nothing listens (bound by the OS, then released).
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// A mailgate with the IMAP listeners in front of an upstream that is down.
fn gateway(dir: &std::path::Path, pki: &TestPki, filter: &str) -> Gateway {
    let config = gateway_config_with(pki, Some(&closed_port()), None, "plaintext", None, "", "");
    Gateway::start_logging(dir, &config, filter)
}

/// A ClientHello naming `127.0.0.1` as its SNI host name, as some clients send (RFC 6066
/// forbids it). rustls will not write one, so it writes one for `localhost` (as long as
/// `127.0.0.1`) and the name is swapped in the bytes: every length stays right.
fn client_hello_with_ip_sni(config: Arc<ClientConfig>) -> Vec<u8> {
    let mut conn = ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    let at = hello.windows(9).position(|w| w == b"localhost").expect("SNI in the ClientHello");
    hello[at..at + 9].copy_from_slice(b"127.0.0.1");
    hello
}

/// Sends the ClientHello and waits for the server's first answer (it has read the hello
/// then), then drops the connection.
fn hello_with_ip_sni(addr: SocketAddr, hello: &[u8]) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(hello).unwrap();
    let n = tcp.read(&mut [0u8; 5]).unwrap();
    assert!(n > 0, "no answer to the ClientHello");
}

fn warn_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect()
}

#[test]
fn clients_sending_an_ip_address_as_sni_cannot_flood_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let hello = client_hello_with_ip_sni(pki.client_config(&[]));

    // The operator who asks for rustls's warnings gets them: the hello does trigger one.
    let asked = gateway(dir.path(), &pki, "info,rustls=warn");
    for _ in 0..20 {
        hello_with_ip_sni(asked.addr("imaps"), &hello);
    }
    assert!(asked.wait_for_log("Illegal SNI", Duration::from_secs(5)), "{}", asked.log());
    drop(asked);

    // Even at debug level, CONNECTIONS such clients write no WARN line.
    let gateway = gateway(dir.path(), &pki, "debug,mailgate=trace");
    let before = gateway.log().len();
    for _ in 0..CONNECTIONS {
        hello_with_ip_sni(gateway.addr("imaps"), &hello);
    }
    // A normal client afterwards: every earlier connection has been handled (and logged).
    let mut client = Client::tls(gateway.addr("imaps"), pki.client_config(&[]));
    assert!(client.line().unwrap().starts_with("* OK"));
    let log = gateway.log();
    let warned = warn_lines(&log[before..]);
    assert!(warned.is_empty(), "{} WARN lines, e.g. {:?}", warned.len(), warned.first());
}

#[test]
fn logins_while_the_upstream_is_down_write_a_bounded_number_of_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let gateway = gateway(dir.path(), &pki, "info");
    let before = gateway.log().len();
    let attempts = 40;
    for i in 0..attempts {
        let mut client = Client::plain(gateway.addr("plain"));
        assert!(client.line().unwrap().starts_with("* OK"));
        let answer = client.command("a", &format!("LOGIN user{i} password"));
        assert!(answer.last().unwrap().starts_with("a NO [UNAVAILABLE]"), "{answer:?}");
    }
    let log = gateway.log();
    let warned = warn_lines(&log[before..]);
    let unavailable = warned.iter().filter(|l| l.contains("upstream unavailable")).count();
    // Ten per call site and ten seconds (the test takes far less than twenty).
    assert!((1..=20).contains(&unavailable), "{unavailable} of {attempts}: {warned:#?}");
    assert!(warned.len() <= 20, "{} WARN lines: {warned:#?}", warned.len());
}
