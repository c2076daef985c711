//! Certificates chosen by SNI, and SIGHUP: new connections get the reloaded certificate
//! and configuration while open sessions (an IDLE among them) carry on; a broken
//! certificate or configuration keeps the running one, logged and counted.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use support::client::handshake;
use support::setup::*;

/// The DER of the certificate `addr` serves to a client asking for `name` (SNI; an IP
/// address sends none).
fn served_certificate(setup: &Setup, addr: std::net::SocketAddr, name: &str) -> Vec<u8> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let stream = handshake(tcp, setup.tls_config(), name).expect("handshake");
    stream.conn.peer_certificates().unwrap()[0].as_ref().to_vec()
}

fn der(pem_path: &std::path::Path) -> Vec<u8> {
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::from_pem_file(pem_path).unwrap().as_ref().to_vec()
}

fn hangup(setup: &Setup) {
    assert!(Command::new("kill").arg("-HUP").arg(setup.gateway.pid().to_string()).status().unwrap().success());
}

fn metric(setup: &Setup, series: &str) -> String {
    let mut tcp = TcpStream::connect(setup.gateway.admin()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = tcp.read_to_string(&mut text);
    text.lines().find(|l| l.starts_with(series)).unwrap_or_default().to_string()
}

/// Waits (bounded) until the gateway has logged `needle` `n` times.
fn wait_for_count(setup: &Setup, needle: &str, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while setup.gateway.log().matches(needle).count() < n {
        assert!(std::time::Instant::now() < deadline, "no {n}× {needle:?}:\n{}", setup.gateway.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_certificate_follows_the_clients_sni_with_the_first_as_the_default() {
    let setup = Setup::start();
    let (other_cert, other_key) = setup.pki.leaf("other", &["mail.example.test", "*.pop.example.test"]);
    // The same gateway configuration with two certificates.
    let text = std::fs::read_to_string(&setup.gateway.config_path).unwrap();
    let line = text.lines().find(|l| l.starts_with("certificates = ")).unwrap();
    let two = format!(
        "certificates = [{{ cert = {:?}, key = {:?} }}, {{ cert = {:?}, key = {:?} }}]",
        setup.pki.cert.display().to_string(),
        setup.pki.key.display().to_string(),
        other_cert.display().to_string(),
        other_key.display().to_string()
    );
    let gateway = support::gateway::Gateway::start(setup.dir.path(), &text.replace(line, &two));
    let Setup { dir, pki, dovecot, gateway: first } = setup;
    drop(first);
    let setup = Setup { dir, pki, dovecot, gateway };

    let imaps = setup.addr("imaps");
    let (default, other) = (der(&setup.pki.cert), der(&other_cert));
    assert_eq!(served_certificate(&setup, imaps, "localhost"), default);
    assert_eq!(served_certificate(&setup, imaps, "mail.example.test"), other);
    assert_eq!(served_certificate(&setup, setup.addr("pop3s"), "x.pop.example.test"), other, "wildcard");
    assert_eq!(served_certificate(&setup, imaps, "127.0.0.1"), default, "no SNI");
    // A name no certificate covers gets the default (and the client's own check fails).
    let tcp = TcpStream::connect(imaps).unwrap();
    assert!(handshake(tcp, setup.tls_config(), "unknown.example.test").is_err());
}

#[test]
fn sighup_reloads_the_certificate_for_new_connections_while_an_idle_session_stays() {
    let setup = Setup::start();
    let before = der(&setup.pki.cert);
    let mut idler = setup.login(BOB);
    idler.command("s", "SELECT INBOX");
    idler.send(b"i IDLE\r\n");
    assert!(idler.line().unwrap().starts_with("+ "));

    // A renewed certificate at the same paths.
    let (renewed_cert, renewed_key) = setup.pki.leaf("renewed", &["localhost", "127.0.0.1"]);
    std::fs::copy(&renewed_cert, &setup.pki.cert).unwrap();
    std::fs::copy(&renewed_key, &setup.pki.key).unwrap();
    let renewed = der(&renewed_cert);
    assert_ne!(before, renewed);
    hangup(&setup);
    wait_for_count(&setup, "configuration reloaded", 1);
    assert_eq!(served_certificate(&setup, setup.addr("imaps"), "localhost"), renewed);
    assert_eq!(served_certificate(&setup, setup.addr("pop3s"), "localhost"), renewed);
    let mut fresh = setup.login(ALICE);
    assert!(fresh.command("n", "NOOP").last().unwrap().starts_with("n OK"));

    // The IDLE session never noticed: it sees new mail and ends its IDLE normally.
    setup.dovecot.deliver(BOB.0, b"From: a@example.org\r\nSubject: during reload\r\n\r\nhello\r\n");
    assert_eq!(idler.line().unwrap(), "* 1 EXISTS");
    idler.send(b"DONE\r\n");
    assert!(idler.until_tagged("i").last().unwrap().starts_with("i OK"));

    // A broken certificate: refused, logged, counted; the renewed one stays in use.
    std::fs::write(&setup.pki.cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n").unwrap();
    hangup(&setup);
    wait_for_count(&setup, "reload refused", 1);
    assert_eq!(served_certificate(&setup, setup.addr("imaps"), "localhost"), renewed);
    assert!(idler.command("n", "NOOP").last().unwrap().starts_with("n OK"));
    assert_eq!(
        metric(&setup, "mailgate_config_reloads_total{result=\"ok\"}"),
        "mailgate_config_reloads_total{result=\"ok\"} 1"
    );
    assert_eq!(
        metric(&setup, "mailgate_config_reloads_total{result=\"failed\"}"),
        "mailgate_config_reloads_total{result=\"failed\"} 1"
    );
}

#[test]
fn sighup_applies_a_new_configuration_and_refuses_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let overrides = dir.path().join("overrides.toml");
    std::fs::write(&overrides, "").unwrap();
    let setup = Setup::start_with("", &format!("[limits]\noverrides_file = {:?}\n", overrides.display().to_string()));
    let mut open = setup.login(BOB);

    // The overrides file now caps bob at one session: new logins see it, the open one stays.
    std::fs::write(&overrides, "[users.bob]\nmax_connections_per_user = 1\n").unwrap();
    hangup(&setup);
    wait_for_count(&setup, "configuration reloaded", 1);
    let mut second = setup.imaps();
    assert_eq!(
        second.command("a", "LOGIN bob bob-Pass-42"),
        ["a NO [LIMIT] Too many sessions for this user, try again later."]
    );
    assert!(open.command("n", "NOOP").last().unwrap().starts_with("n OK"));

    // A configuration with an error anywhere changes nothing.
    let path = &setup.gateway.config_path;
    let good = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, good.replace("[imap]\n", "[imap]\nmax_bad_commands = 0\n")).unwrap();
    hangup(&setup);
    wait_for_count(&setup, "reload refused", 1);
    assert!(setup.gateway.log().contains("imap.max_bad_commands: must be at least 1"));
    // Moving a listener needs a restart.
    std::fs::write(path, good.replacen("address = \"127.0.0.1:0\"", "address = \"127.0.0.1:1\"", 1)).unwrap();
    hangup(&setup);
    wait_for_count(&setup, "reload refused", 2);
    assert!(setup.gateway.log().contains("restart to apply"));
    let mut alice = setup.login(ALICE);
    assert!(alice.command("n", "NOOP").last().unwrap().starts_with("n OK"));
}

#[test]
fn a_renewed_certificate_is_picked_up_without_a_signal_when_files_are_watched() {
    let setup = Setup::start_with("", "[reload]\nwatch_files = true\nwatch_interval = \"1s\"\n");
    let mut open = setup.login(BOB);
    // As an ACME client or a Kubernetes Secret update would: new files, no SIGHUP.
    let (renewed_cert, renewed_key) = setup.pki.leaf("renewed", &["localhost", "127.0.0.1"]);
    std::fs::copy(&renewed_key, &setup.pki.key).unwrap();
    std::fs::copy(&renewed_cert, &setup.pki.cert).unwrap();
    wait_for_count(&setup, "configuration reloaded", 1);
    assert!(setup.gateway.log().contains("watched files changed"));
    assert_eq!(served_certificate(&setup, setup.addr("imaps"), "localhost"), der(&renewed_cert));
    assert!(open.command("n", "NOOP").last().unwrap().starts_with("n OK"));
    // Nothing changes: no further reload.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(setup.gateway.log().matches("configuration reloaded").count(), 1);

    // The configuration names a certificate that is not there yet: refused, and loaded as
    // soon as the files appear.
    let later = (setup.dir.path().join("later.pem"), setup.dir.path().join("later.key"));
    let text = std::fs::read_to_string(&setup.gateway.config_path).unwrap();
    let line = text.lines().find(|l| l.starts_with("certificates = ")).unwrap();
    let moved = format!(
        "certificates = [{{ cert = {:?}, key = {:?} }}]",
        later.0.display().to_string(),
        later.1.display().to_string()
    );
    std::fs::write(&setup.gateway.config_path, text.replace(line, &moved)).unwrap();
    wait_for_count(&setup, "reload refused", 1);
    let (cert, key) = setup.pki.leaf("later", &["localhost", "127.0.0.1"]);
    assert_eq!((cert.clone(), key), later);
    wait_for_count(&setup, "configuration reloaded", 2);
    assert_eq!(served_certificate(&setup, setup.addr("imaps"), "localhost"), der(&cert));
}
