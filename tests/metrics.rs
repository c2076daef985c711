//! The admin listener against real traffic: `/metrics` counts what happened (logins,
//! plaintext refusals, TLS failures, cache hits, bytes) with bounded labels only;
//! `/healthz` and `/readyz` tell a prober the truth.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use support::client::{handshake, Client};
use support::setup::*;

fn get(admin: SocketAddr, path: &str) -> (String, String) {
    let mut tcp = TcpStream::connect(admin).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes()).unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no series {series} in:\n{metrics}"))
}

#[test]
fn metrics_count_known_traffic_with_bounded_labels() {
    let setup = Setup::start();
    setup.dovecot.fill(ALICE.0, 5, 3);
    let admin = setup.gateway.admin();

    for _ in 0..3 {
        let mut client = setup.login(ALICE);
        client.command("s", "SELECT INBOX");
        client.command("f", "UID FETCH 1:5 (UID BODY.PEEK[HEADER])");
    }
    let mut plain = Client::plain(setup.addr("imap"));
    plain.line().unwrap();
    assert!(plain.command("a", "LOGIN alice x")[0].contains("PRIVACYREQUIRED"));
    let mut wrong = setup.imaps();
    assert!(wrong.command("a", "LOGIN alice not-the-password")[0].contains("AUTHENTICATIONFAILED"));
    let tcp = TcpStream::connect(setup.addr("imaps")).unwrap();
    assert!(handshake(tcp, setup.pki.client_config(&[b"http/1.1"]), "localhost").is_err());
    std::thread::sleep(Duration::from_millis(300));

    let (status, metrics) = get(admin, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(value(&metrics, "mailgate_logins_total{listener=\"imaps\",protocol=\"imap\",result=\"ok\"}"), 3.0);
    assert_eq!(value(&metrics, "mailgate_logins_total{listener=\"imaps\",protocol=\"imap\",result=\"rejected\"}"), 1.0);
    assert_eq!(value(&metrics, "mailgate_plaintext_auth_refused_total{listener=\"imap\",protocol=\"imap\"}"), 1.0);
    assert_eq!(value(&metrics, "mailgate_tls_handshake_failures_total{listener=\"imaps\",reason=\"alpn\"}"), 1.0);
    assert!(
        value(&metrics, "mailgate_connections_total{listener=\"imaps\",protocol=\"imap\",tls=\"implicit\"}") >= 5.0
    );
    // The first session filled the cache, the next two were served from it.
    assert_eq!(value(&metrics, "mailgate_cache_requests_total{kind=\"header\",result=\"hit\"}"), 10.0);
    assert!(value(&metrics, "mailgate_cache_upstream_bytes_saved_total") > 0.0);
    assert!(value(&metrics, "mailgate_client_bytes_total{direction=\"out\",protocol=\"imap\"}") > 1000.0);
    assert!(value(&metrics, "mailgate_upstream_bytes_total{direction=\"in\",protocol=\"imap\"}") > 1000.0);
    // The snapshot's BODY[HEADER] and RFC822.SIZE columns, its fill and UIDNEXT marks.
    assert!(value(&metrics, "mailgate_cache_entries") >= 3.0);
    assert!(value(&metrics, "mailgate_cache_size_bytes") > 5.0 * 100.0);

    // Commands: three SELECTs and three FETCHes through the cache, with durations.
    assert_eq!(value(&metrics, "mailgate_commands_total{command=\"select\",protocol=\"imap\"}"), 3.0);
    assert_eq!(value(&metrics, "mailgate_commands_total{command=\"uid_fetch\",protocol=\"imap\"}"), 3.0);
    assert_eq!(
        value(&metrics, "mailgate_command_duration_seconds_count{command=\"uid_fetch\",protocol=\"imap\"}"),
        3.0
    );
    assert_eq!(value(&metrics, "mailgate_fetch_messages_sum"), 15.0);
    assert_eq!(value(&metrics, "mailgate_mailbox_messages_count"), 3.0);
    assert_eq!(value(&metrics, "mailgate_mailbox_messages_sum"), 15.0);
    // Four logins reached the upstream (three accepted, one refused).
    assert_eq!(value(&metrics, "mailgate_upstream_connect_duration_seconds_count{protocol=\"imap\"}"), 4.0);
    assert_eq!(value(&metrics, "mailgate_limit_rejections_total{kind=\"connections\"}"), 0.0);

    // Per-account cost goes to the session-end log and the top-K, never to labels.
    assert!(setup.gateway.wait_for_log("sync cost", Duration::from_secs(5)));
    let (status, top) = get(admin, "/debug/top-accounts");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let top: serde_json::Value = serde_json::from_str(&top).unwrap();
    let alice = &top.as_array().unwrap()[0];
    assert_eq!(alice["account"], "alice", "{top}");
    assert!(alice["cost"]["client_bytes"].as_u64().unwrap() > 1000, "{top}");
    assert_eq!(alice["cost"]["messages"].as_u64().unwrap(), 15, "{top}");
    let log = setup.gateway.log();
    let line = log.lines().find(|l| l.contains("sync cost")).unwrap();
    assert!(line.contains("account=\"alice\"") && line.contains("messages=5"), "{line}");

    // No user name, address or mailbox name is a label value.
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let labels = line.split_once('{').map(|(_, l)| l.split_once('}').unwrap().0).unwrap_or("");
        for secret in ["alice", "127.0.0.1", "INBOX", "not-the-password"] {
            assert!(!labels.contains(secret), "{secret} in labels of {line}");
        }
    }
}

#[test]
fn pop3_commands_and_unreachable_upstreams_are_counted() {
    let mut setup = Setup::start();
    setup.dovecot.fill(BOB.0, 3, 8);
    let admin = setup.gateway.admin();
    let mut client = setup.pop3_login(BOB);
    client.send(b"STAT\r\nRETR 1\r\n");
    client.line().unwrap();
    while client.line().unwrap() != "." {}
    client.send(b"QUIT\r\n");
    let _ = client.rest();
    setup.dovecot.stop();
    let mut refused = setup.pop3s();
    refused.send(b"USER bob\r\nPASS bob-Pass-42\r\n");
    refused.line().unwrap();
    assert!(refused.line().unwrap().starts_with("-ERR [SYS/TEMP]"));
    std::thread::sleep(Duration::from_millis(300));
    let (_, metrics) = get(admin, "/metrics");
    assert_eq!(value(&metrics, "mailgate_commands_total{command=\"retr\",protocol=\"pop3\"}"), 1.0);
    assert_eq!(value(&metrics, "mailgate_commands_total{command=\"stat\",protocol=\"pop3\"}"), 1.0);
    assert_eq!(value(&metrics, "mailgate_command_duration_seconds_count{command=\"retr\",protocol=\"pop3\"}"), 1.0);
    assert_eq!(value(&metrics, "mailgate_upstream_errors_total{kind=\"connect\",protocol=\"pop3\"}"), 1.0);
    assert_eq!(
        value(&metrics, "mailgate_logins_total{listener=\"pop3s\",protocol=\"pop3\",result=\"unavailable\"}"),
        1.0
    );
}

#[test]
fn health_and_readiness_tell_the_truth() {
    let mut setup = Setup::start();
    let admin = setup.gateway.admin();
    assert_eq!(get(admin, "/healthz"), ("HTTP/1.1 200 OK".to_string(), "ok\n".to_string()));
    assert_eq!(get(admin, "/readyz").0, "HTTP/1.1 200 OK");
    assert_eq!(get(admin, "/nothing").0, "HTTP/1.1 404 Not Found");
    setup.dovecot.stop();
    let (status, body) = get(admin, "/readyz");
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{body}");
    assert_eq!(get(admin, "/healthz").0, "HTTP/1.1 200 OK");
}

#[test]
fn distinctive_names_addresses_and_mailboxes_never_become_labels() {
    let setup = Setup::start();
    let admin = setup.gateway.admin();
    setup.dovecot.fill(BOB.0, 3, 4);
    // A distinctive client address: one login comes from 127.0.0.77 (curl binds it).
    let curl = std::process::Command::new("timeout")
        .args(["30", "curl", "-s", "--interface", "127.0.0.77", "--cacert"])
        .arg(&setup.pki.ca)
        .args(["-u", &format!("{}:{}", BOB.0, BOB.1)])
        .arg(format!("imaps://localhost:{}/INBOX;UID=1", setup.addr("imaps").port()))
        .output()
        .unwrap();
    assert!(curl.status.success(), "{}", String::from_utf8_lossy(&curl.stderr));
    assert!(setup.gateway.wait_for_log("client=127.0.0.77", Duration::from_secs(5)));
    let mut client = setup.login(BOB);
    assert!(client.command("c", "CREATE Zanzibar-Quarterly-77").last().unwrap().contains("OK"));
    client.command("s", "SELECT Zanzibar-Quarterly-77");
    client.command("u", "SELECT INBOX");
    client.command("f", "UID FETCH 1:* (UID BODY.PEEK[HEADER])");
    client.send(b"z LOGOUT\r\n");
    let _ = client.rest();
    let mut wrong = setup.imaps();
    wrong.command("a", "LOGIN Xerxes-Distinctive-User guess");
    std::thread::sleep(Duration::from_millis(300));
    let (_, metrics) = get(admin, "/metrics");
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        for secret in ["bob", "Zanzibar", "Xerxes", "127.0.0", "INBOX", "guess"] {
            // (127.0.0.77 and 127.0.0.1 both contain "127.0.0".)
            assert!(!line.contains(secret), "{secret} in {line}");
        }
    }
}
