mod support;

// Quota awareness (issue 18, `[insight]`): an IMAP account whose INBOX quota is nearly used
// up is told so once per window with `* OK [ALERT]` after its login's OK, before the answer
// to its next command (the relay asks in the session's pipeline: the login waits for
// nothing); the question (`GETQUOTAROOT INBOX` under mailgate's own tag) and its answer
// never reach the client; an upstream without QUOTA is never asked. Dovecot with the `quota` plugin (maildir backend, 100 KiB
// for everyone) is the upstream; alice gets a 95,000-byte message, bob stays empty.

use std::time::Duration;

use support::client::Client;
use support::dovecot::{Dovecot, Options};
use support::setup::*;
use support::tls::client_config_trusting;

const INSIGHT: &str = "[insight]\nquota_check_every = \"0s\"\nquota_alert_every = \"3s\"\n";
/// `/debug/quota` names accounts: it needs the admin token.
const TOKEN: &str = "quota-test-token";

/// mailgate in front of `dovecot` with `[insight]` as above and the admin token.
fn setup(dovecot: Dovecot, imap_section: &str) -> Setup {
    Setup::in_front_of_edited(dovecot, imap_section, INSIGHT, |config, dir| {
        let token_file = dir.join("admin-token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        config.replace("[admin]\n", &format!("[admin]\ntoken_file = {:?}\n", token_file.display().to_string()))
    })
}

fn dovecot(imap_quota: bool) -> Dovecot {
    let options = Options { quota_rule: Some("*:storage=100K".into()), imap_quota, ..Options::default() };
    let dovecot = Dovecot::start_with(&[ALICE, BOB], &options);
    let mut message = b"From: a@example.org\r\nTo: alice@example.org\r\nSubject: big\r\n\r\n".to_vec();
    while message.len() < 95_000 {
        message.extend_from_slice(&[b'x'; 78]);
        message.extend_from_slice(b"\r\n");
    }
    dovecot.deliver(ALICE.0, &message);
    dovecot
}

/// Logs `user` in (pipelining `after`, if any) and returns the lines up to the login's
/// tagged OK (the login's answer: never an ALERT of the quota's).
fn login_lines(client: &mut Client, (user, password): (&str, &str), after: &str) -> Vec<String> {
    let mut bytes = format!("L LOGIN {user} {{{}+}}\r\n", password.len()).into_bytes();
    bytes.extend_from_slice(password.as_bytes());
    bytes.extend_from_slice(b"\r\n");
    bytes.extend_from_slice(after.as_bytes());
    client.send(&bytes);
    let lines = client.until_tagged("L");
    assert!(lines.last().unwrap().starts_with("L OK"), "{lines:?}");
    assert!(alerts(&lines).is_empty(), "the login waits for no quota: {lines:?}");
    lines
}

/// Logs `user` in, then sends NOOP: the lines up to the NOOP's tagged OK, where an ALERT
/// comes (the quota answer comes before the NOOP's).
fn session_lines(client: &mut Client, user: (&str, &str)) -> Vec<String> {
    assert_eq!(login_lines(client, user, "N NOOP\r\n").len(), 1);
    let lines = client.until_tagged("N");
    assert!(lines.last().unwrap().starts_with("N OK"), "{lines:?}");
    lines
}

fn alerts(lines: &[String]) -> Vec<&String> {
    lines.iter().filter(|l| l.starts_with("* OK [ALERT]")).collect()
}

/// A metric's value as exported (`name` with its labels, if any).
fn metric(text: &str, name: &str) -> f64 {
    let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '));
    line.unwrap_or_else(|| panic!("no {name} in\n{text}")).rsplit(' ').next().unwrap().parse().unwrap()
}

/// Dovecot's timing in a completion (`(0.001 + 0.000 secs)`) differs from run to run.
fn untimed(lines: Vec<String>) -> Vec<String> {
    lines.into_iter().map(|l| l.split(" (0.").next().unwrap().to_string()).collect()
}

#[test]
fn a_nearly_full_account_is_alerted_once_per_window_and_an_empty_one_never() {
    let setup = setup(dovecot(true), "");

    let first = session_lines(&mut setup.imaps(), ALICE);
    let alert = alerts(&first);
    assert_eq!(alert.len(), 1, "{first:?}");
    // 95,030 bytes of 100 KiB: Dovecot says 93 KiB (rounded up) of 100 KiB.
    assert_eq!(
        alert[0],
        "* OK [ALERT] Your mailbox is 93 % full (93 KB of 100 KB). Please delete or archive old mail."
    );
    assert_eq!(first.len(), 2, "the ALERT and the NOOP's OK, nothing of the quota answer: {first:?}");

    let second = session_lines(&mut setup.imaps(), ALICE);
    assert_eq!(second.len(), 1, "told once per window: {second:?}");
    let bob = session_lines(&mut setup.imaps(), BOB);
    assert_eq!(bob.len(), 1, "an empty mailbox is never alerted: {bob:?}");

    std::thread::sleep(Duration::from_millis(3_100));
    let third = session_lines(&mut setup.imaps(), ALICE);
    assert_eq!(alerts(&third).len(), 1, "the window passed: {third:?}");

    let metrics = setup.gateway.metrics();
    assert_eq!(metric(&metrics, "mailgate_quota_alerts_total"), 2.0);
    assert_eq!(metric(&metrics, "mailgate_quota_checks_total{result=\"read\"}"), 4.0);
    assert_eq!(metric(&metrics, "mailgate_quota_usage_ratio_count"), 4.0);
    assert_eq!(metric(&metrics, "mailgate_quota_usage_ratio_bucket{le=\"0.5\"}"), 1.0);
    assert_eq!(metric(&metrics, "mailgate_quota_usage_ratio_bucket{le=\"0.9\"}"), 1.0);
    assert_eq!(metric(&metrics, "mailgate_quota_usage_ratio_bucket{le=\"0.95\"}"), 4.0);
    // The reading went to the account's support history too (`crate::insight`): alice's
    // is nearly full (once: a detection repeats after a day), bob's is not.
    assert_eq!(metric(&metrics, "mailgate_insight_detections_total{kind=\"quota_nearly_full\"}"), 1.0);
    let body = metrics.split("\r\n\r\n").nth(1).unwrap();
    assert!(!body.contains("alice") && !body.contains("bob"), "no user name in metrics");

    let report = setup.gateway.admin_get_bearer("/debug/quota", TOKEN);
    let json: serde_json::Value = serde_json::from_str(report.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{report}");
    assert_eq!(rows[0]["account"], "alice", "the fullest first: {report}");
    assert_eq!((rows[0]["used"].as_u64(), rows[0]["limit"].as_u64()), (Some(93 * 1024), Some(100 * 1024)));
    assert_eq!(rows[0]["share"].as_f64(), Some(0.93));
    assert!(rows[0]["read_at"].as_str().unwrap().ends_with('Z'), "{report}");
    assert_eq!((rows[1]["account"].as_str(), rows[1]["used"].as_u64()), (Some("bob"), Some(0)));
}

#[test]
fn the_quota_question_never_reaches_the_client() {
    let setup = setup(dovecot(true), "compress = false");
    // The client's own quota question, pipelined right behind mailgate's, gets its answer.
    let script = "C CAPABILITY\r\nQ GETQUOTAROOT INBOX\r\nS SELECT INBOX\r\n";
    let direct = || {
        let mut client = Client::tls(setup.dovecot.imaps, client_config_trusting(&setup.dovecot.ca_pem(), &[]));
        client.line().expect("greeting");
        login_lines(&mut client, ALICE, script);
        (untimed(client.until_tagged("C")), untimed(client.until_tagged("Q")), untimed(client.until_tagged("S")))
    };
    // A first session takes the message's \Recent: both compared sessions see none.
    direct();

    let mut gateway = setup.imaps();
    login_lines(&mut gateway, ALICE, script);
    let mut capability = untimed(gateway.until_tagged("C"));
    let alert = capability.remove(0);
    assert!(alert.starts_with("* OK [ALERT] Your mailbox is 93 % full"), "the question was asked first: {alert}");
    let via_gateway = (capability, untimed(gateway.until_tagged("Q")), untimed(gateway.until_tagged("S")));

    assert_eq!(via_gateway, direct());
    assert!(via_gateway.0[0].contains(" QUOTA"), "Dovecot announces QUOTA: {via_gateway:?}");
    assert!(via_gateway.1[0].starts_with("* QUOTAROOT INBOX"), "the client's own answer: {via_gateway:?}");
}

#[test]
fn an_upstream_without_quota_is_never_asked() {
    let setup = setup(dovecot(false), "");
    let lines = session_lines(&mut setup.imaps(), ALICE);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let metrics = setup.gateway.metrics();
    for result in ["read", "none", "failed"] {
        assert_eq!(metric(&metrics, &format!("mailgate_quota_checks_total{{result=\"{result}\"}}")), 0.0);
    }
    assert_eq!(metric(&metrics, "mailgate_quota_usage_ratio_count"), 0.0);
    let report = setup.gateway.admin_get_bearer("/debug/quota", TOKEN);
    assert!(report.ends_with("[]\n"), "{report}");
}

#[test]
fn a_session_that_asked_is_parked_and_asks_again_when_reused() {
    let setup = setup(dovecot(true), "reuse_for = \"5m\"");
    let wait_for = |name: &str, value: f64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while metric(&setup.gateway.metrics(), name) != value {
            assert!(std::time::Instant::now() < deadline, "{name} {value}:\n{}", setup.gateway.metrics());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut first = setup.imaps();
    assert_eq!(alerts(&session_lines(&mut first, ALICE)).len(), 1);
    let bye = first.command("Z", "LOGOUT");
    assert!(bye.last().unwrap().starts_with("Z OK"), "{bye:?}");
    // Answered: nothing of mailgate's in flight, so the session is parked.
    wait_for("mailgate_upstream_sessions_parked", 1.0);

    let mut second = setup.imaps();
    let lines = session_lines(&mut second, ALICE);
    assert_eq!(lines.len(), 1, "asked again on the parked session, alerted once per window: {lines:?}");
    assert_eq!(metric(&setup.gateway.metrics(), "mailgate_upstream_sessions_reused_total"), 1.0);
    wait_for("mailgate_quota_checks_total{result=\"read\"}", 2.0);
    assert_eq!(second.command("Q", "GETQUOTAROOT INBOX").len(), 3, "the client's own question is answered");
}
