//! Support insight in a fleet: two mailgate processes in front of one Dovecot share the
//! account histories through one real redis-server. A POP3 client deleting through one
//! instance while an IMAP client reads through the other is detected once for the fleet,
//! and either instance's `/debug/accounts/<user>` and `/debug/detections` show it; sessions
//! ending at the same time on both instances all count (the compare-and-set retries);
//! Redis going away costs the history, never a session; and no metric names the account.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::client::Client;
use support::dovecot::{Dovecot, Options};
use support::gateway::Gateway;
use support::redis::Redis;
use support::setup::gateway_config_with;
use support::tls::TestPki;

/// An account whose name (and local part) is nothing a metric could contain by chance.
const USER: (&str, &str) = ("quillfleet@example.net", "fleet-Pass-73");
const LOCAL_PART: &str = "quillfleet";
const TOKEN: &str = "insight-fleet-admin-token-5b2e";
const SOFTWARE: &str = "FleetMail 3.1";

struct Fleet {
    // Dropped last: the gateways stop before their Redis and Dovecot.
    a: Gateway,
    b: Gateway,
    pki: TestPki,
    dovecot: Dovecot,
    redis: Redis,
    _dir: tempfile::TempDir,
}

/// Redis, Dovecot (`options`), and two mailgate instances with the same configuration:
/// limits (and so the histories) in Redis, an admin listener behind a token.
fn fleet(options: &Options) -> Fleet {
    let redis = Redis::start();
    let dovecot = Dovecot::start_with(&[USER], options);
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let extra = format!(
        "\n[limits]\nstore = \"redis\"\n# Logins waiting for the upstream count against the lockout: the concurrent sessions below.\nauth_lockout_failures = 100\nmax_connections_per_user_ip = 100\nmax_connections_per_user = 100\n\n[limits.redis]\nurl = \"{}\"\nlease_ttl = \"2s\"\ntimeout = \"300ms\"\n",
        redis.url()
    );
    let config = gateway_config_with(
        &pki,
        Some(&format!("127.0.0.1:{}", dovecot.imaps.port())),
        Some(&format!("127.0.0.1:{}", dovecot.pop3s.port())),
        "implicit",
        Some(&dovecot.ca_pem()),
        "",
        &extra,
    )
    .replace("[admin]\n", &format!("[admin]\ntoken_file = {:?}\n", token_file.display().to_string()));
    let a = Gateway::start_logging(dir.path(), &config, "info,mailgate=debug");
    let b = Gateway::start_logging(dir.path(), &config, "info,mailgate=debug");
    Fleet { a, b, pki, dovecot, redis, _dir: dir }
}

/// `GET path` on `gateway`'s admin listener with the token: the status line and the body.
fn get(gateway: &Gateway, path: &str) -> (String, String) {
    let mut tcp = TcpStream::connect(gateway.admin()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    tcp.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// The account's support view on `gateway`, when it has one.
fn account(gateway: &Gateway) -> Option<Value> {
    let (status, body) = get(gateway, &format!("/debug/accounts/{}", USER.0));
    status.contains("200").then(|| serde_json::from_str(&body).expect("account JSON"))
}

fn detections(gateway: &Gateway) -> Vec<Value> {
    let (status, body) = get(gateway, "/debug/detections");
    assert!(status.contains("200"), "{status}: {body}");
    serde_json::from_str(&body).expect("detections JSON")
}

/// The value of `series` (exact name and labels) in `gateway`'s /metrics, 0 when absent.
fn metric(gateway: &Gateway, series: &str) -> u64 {
    let (_, text) = get(gateway, "/metrics");
    (text.lines())
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

fn fleet_metric(fleet: &Fleet, series: &str) -> u64 {
    metric(&fleet.a, series) + metric(&fleet.b, series)
}

const DELETES_SHARED: &str = "mailgate_insight_detections_total{kind=\"pop3_deletes_shared\"}";
const UPDATES_OK: &str = "mailgate_insight_updates_total{result=\"ok\"}";
const UPDATES_ERROR: &str = "mailgate_insight_updates_total{result=\"error\"}";

/// Polls `check` every 100 ms for at most `limit`; the last value it returned.
fn wait_until<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn devices<'a>(view: &'a Value, protocol: &str) -> Vec<&'a Value> {
    (view["devices"].as_array().unwrap().iter()).filter(|d| d["protocol"] == protocol).collect()
}

/// A POP3 session through `gateway`, logged in as USER (greeting and login read).
fn pop3(fleet: &Fleet, gateway: &Gateway) -> Client {
    let mut client = Client::tls(gateway.addr("pop3s"), fleet.pki.client_config(&[]));
    let greeting = client.line().expect("greeting");
    assert!(greeting.starts_with("+OK"), "{greeting}");
    client.send(format!("USER {}\r\n", USER.0).as_bytes());
    assert!(client.line().unwrap().starts_with("+OK"));
    client.send(format!("PASS {}\r\n", USER.1).as_bytes());
    let ok = client.line().unwrap();
    assert!(ok.starts_with("+OK"), "{ok}");
    client
}

/// `+OK n size` of STAT: n.
fn stat(client: &mut Client) -> u64 {
    client.send(b"STAT\r\n");
    let line = client.line().unwrap();
    assert!(line.starts_with("+OK "), "{line}");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn retr(client: &mut Client, n: u64) {
    client.send(format!("RETR {n}\r\n").as_bytes());
    let response = support::pop3::response(client);
    assert!(response.starts_with(b"+OK"), "{}", String::from_utf8_lossy(&response));
}

fn quit(mut client: Client) {
    client.send(b"QUIT\r\n");
    let line = client.line().unwrap_or_default();
    assert!(line.starts_with("+OK"), "QUIT: {line}");
    let _ = client.rest();
}

/// An IMAP session through `gateway`, logged in as USER, that named its software with ID.
fn imap(fleet: &Fleet, gateway: &Gateway) -> Client {
    let mut client = Client::tls(gateway.addr("imaps"), fleet.pki.client_config(&[]));
    let greeting = client.line().expect("greeting");
    assert!(greeting.starts_with("* OK"), "{greeting}");
    client.login(USER);
    let id = client.command("i", "ID (\"name\" \"FleetMail\" \"version\" \"3.1\" \"os\" \"Linux\")");
    assert!(id.last().unwrap().starts_with("i OK"), "{id:?}");
    client
}

fn message(n: usize) -> Vec<u8> {
    format!("From: sender{n}@example.org\r\nTo: {}\r\nSubject: message {n}\r\n\r\nbody {n}\r\n", USER.0).into_bytes()
}

/// Neither instance's metrics name the account, in a label or anywhere else.
fn assert_no_account_in_metrics(fleet: &Fleet) {
    for (name, gateway) in [("A", &fleet.a), ("B", &fleet.b)] {
        let (status, text) = get(gateway, "/metrics");
        assert!(status.contains("200"), "{status}");
        assert!(text.contains("mailgate_insight_updates_total"), "no insight metrics on {name}:\n{text}");
        for needle in [USER.0, LOCAL_PART, "example.net"] {
            let line = text.lines().find(|l| l.contains(needle));
            assert!(line.is_none(), "instance {name}'s /metrics names the account ({needle}): {line:?}");
        }
    }
}

#[test]
fn a_pop3_client_deleting_through_one_instance_while_imap_reads_through_the_other_is_detected_once() {
    let fleet = fleet(&Options::default());
    for n in 0..3 {
        fleet.dovecot.deliver(USER.0, &message(n));
    }
    // The IMAP client (B) reads INBOX, and stays while the POP3 client (A) takes the mail.
    let mut reader = imap(&fleet, &fleet.b);
    let select = reader.command("s", "SELECT INBOX");
    assert!(select.iter().any(|l| l == "* 3 EXISTS"), "{select:?}");
    assert!(select.last().unwrap().starts_with("s OK"), "{select:?}");

    let mut poller = pop3(&fleet, &fleet.a);
    assert_eq!(stat(&mut poller), 3);
    for n in 1..=3 {
        retr(&mut poller, n);
        poller.send(format!("DELE {n}\r\n").as_bytes());
        assert!(poller.line().unwrap().starts_with("+OK"));
    }
    quit(poller);
    let logout = reader.command("z", "LOGOUT");
    assert!(logout.last().unwrap().starts_with("z OK"), "{logout:?}");
    let _ = reader.rest();

    // Either instance's view: both devices, the deletion, the detection (the updates go
    // to Redis in tasks of their own: waited for).
    let complete = |view: &Value| {
        let pop3 = devices(view, "pop3");
        let imap = devices(view, "imap");
        pop3.len() == 1
            && pop3[0]["deleted"] == 3
            && imap.len() == 1
            && imap[0]["software"] == SOFTWARE
            && imap[0]["connected"] == false
            && view["deletions"].as_array().unwrap().iter().any(|d| d["count"] == 3)
            && (view["detections"].as_array().unwrap().iter()).any(|d| d["detection"] == "pop3_deletes_shared")
    };
    for (name, gateway) in [("A", &fleet.a), ("B", &fleet.b)] {
        let view = wait_until(Duration::from_secs(15), || account(gateway).filter(complete));
        assert!(view.is_some(), "instance {name}'s view of the account is incomplete: {:#?}", account(gateway));
        let view = view.unwrap();
        assert_eq!(view["account"], USER.0);
        let deletions = view["deletions"].as_array().unwrap();
        assert_eq!(deletions.len(), 1, "{deletions:?}");
        assert!(deletions[0]["client"].as_str().unwrap().starts_with("POP3 "), "{deletions:?}");
        let found =
            (view["detections"].as_array().unwrap().iter()).filter(|d| d["detection"] == "pop3_deletes_shared").count();
        assert_eq!(found, 1, "{view:#}");
    }
    // Counted once across the fleet (the instance whose update made it fire), and listed
    // once on either instance.
    let counted = wait_until(Duration::from_secs(10), || {
        let n = fleet_metric(&fleet, DELETES_SHARED);
        (n >= 1).then_some(n)
    });
    assert_eq!(counted, Some(1));
    for (name, gateway) in [("A", &fleet.a), ("B", &fleet.b)] {
        let listed = wait_until(Duration::from_secs(10), || {
            let list = detections(gateway);
            let ours: Vec<Value> = (list.into_iter())
                .filter(|d| d["account"] == USER.0 && d["detection"] == "pop3_deletes_shared")
                .collect();
            (!ours.is_empty()).then_some(ours)
        });
        let listed = listed.unwrap_or_else(|| panic!("instance {name} lists no detection"));
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert!(listed[0]["text"].as_str().unwrap().contains("3 messages"), "{listed:?}");
    }
    // Nothing fires late: the count stays at one.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fleet_metric(&fleet, DELETES_SHARED), 1);
    assert_eq!(fleet_metric(&fleet, UPDATES_ERROR), 0);
    assert_no_account_in_metrics(&fleet);
    let text = fleet.a.log() + &fleet.b.log();
    assert!(!text.contains(USER.1), "a password reached the log");
}

#[test]
fn sessions_ending_at_once_on_both_instances_all_count() {
    const SESSIONS: usize = 24;
    // Dovecot lets several POP3 sessions of one maildrop in at once (the support setup
    // forbids it, as RFC 1939 describes).
    let options = Options { extra: "protocol pop3 {\n  pop3_lock_session = no\n}\n".into(), ..Options::default() };
    let fleet = Arc::new(fleet(&options));
    for n in 0..SESSIONS {
        fleet.dovecot.deliver(USER.0, &message(n));
    }
    let logged_in = Arc::new(Barrier::new(SESSIONS));
    let ending = Arc::new(Barrier::new(SESSIONS));
    let threads: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let (fleet, logged_in, ending) = (fleet.clone(), logged_in.clone(), ending.clone());
            std::thread::spawn(move || {
                let gateway = if i % 2 == 0 { &fleet.a } else { &fleet.b };
                let mut client = pop3(&fleet, gateway);
                logged_in.wait();
                assert_eq!(stat(&mut client), SESSIONS as u64);
                retr(&mut client, i as u64 + 1);
                ending.wait();
                quit(client);
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let counted = |view: &Value| {
        let pop3 = devices(view, "pop3");
        pop3.len() == 1
            && pop3[0]["sessions"] == SESSIONS
            && pop3[0]["messages"] == SESSIONS
            && pop3[0]["connected"] == false
    };
    for (name, gateway) in [("A", &fleet.a), ("B", &fleet.b)] {
        let view = wait_until(Duration::from_secs(20), || account(gateway).filter(counted));
        assert!(
            view.is_some(),
            "instance {name}: not every session counted (errors: {}): {:#?}",
            fleet_metric(&fleet, UPDATES_ERROR),
            account(gateway)
        );
    }
    // Two updates per session (its login and its end), none lost nor failed.
    assert_eq!(fleet_metric(&fleet, UPDATES_ERROR), 0);
    assert_eq!(fleet_metric(&fleet, UPDATES_OK), 2 * SESSIONS as u64);
    assert_no_account_in_metrics(&fleet);
}

#[test]
fn redis_stopped_costs_the_history_not_the_sessions_and_recording_resumes() {
    let mut fleet = fleet(&Options::default());
    fleet.dovecot.deliver(USER.0, &message(0));
    let mut client = pop3(&fleet, &fleet.a);
    assert_eq!(stat(&mut client), 1);
    quit(client);
    let recorded = wait_until(Duration::from_secs(10), || {
        account(&fleet.b).filter(|view| devices(view, "pop3").first().is_some_and(|d| d["sessions"] == 1))
    });
    assert!(recorded.is_some(), "{:#?}", account(&fleet.b));
    assert_eq!(fleet_metric(&fleet, UPDATES_ERROR), 0);

    // Redis goes away: sessions on both instances go on as if nothing happened.
    fleet.redis.stop();
    for gateway in [&fleet.a, &fleet.b] {
        let mut client = pop3(&fleet, gateway);
        assert_eq!(stat(&mut client), 1);
        retr(&mut client, 1);
        quit(client);
        let mut reader = imap(&fleet, gateway);
        let select = reader.command("s", "SELECT INBOX");
        assert!(select.last().unwrap().starts_with("s OK"), "{select:?}");
        assert!(reader.command("z", "LOGOUT").last().unwrap().starts_with("z OK"));
    }
    let errors = wait_until(Duration::from_secs(10), || {
        let n = fleet_metric(&fleet, UPDATES_ERROR);
        (n >= 4).then_some(n)
    });
    assert!(errors.is_some(), "errors counted: {}", fleet_metric(&fleet, UPDATES_ERROR));
    // The history is not readable meanwhile; the page says so (503: the store is away, not
    // "no activity", which a help desk would take for a fact) instead of failing.
    let (status, _) = get(&fleet.a, &format!("/debug/accounts/{}", USER.0));
    assert!(status.contains("503"), "{status}");

    // Redis is back (empty: no persistence): the next sessions are recorded again.
    fleet.redis.run();
    let ok_before = fleet_metric(&fleet, UPDATES_OK);
    let resumed = wait_until(Duration::from_secs(20), || {
        let mut client = pop3(&fleet, &fleet.b);
        stat(&mut client);
        quit(client);
        std::thread::sleep(Duration::from_millis(200));
        account(&fleet.a).filter(|view| !devices(view, "pop3").is_empty())
    });
    assert!(resumed.is_some(), "nothing recorded after Redis came back");
    assert!(fleet_metric(&fleet, UPDATES_OK) > ok_before);
    assert_no_account_in_metrics(&fleet);
}
