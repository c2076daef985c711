//! OAuth 2.0 pass-through (OAUTHBEARER, RFC 7628, and XOAUTH2) over IMAP and POP3, with a
//! Dovecot whose `oauth2` passdb asks a token introspection endpoint the test runs: valid
//! tokens log in, failed ones get the upstream's error challenge and count as failed
//! logins, a token for another user than the envelope's is refused, nothing is offered or
//! taken before TLS, and no token reaches mailgate's log.

mod support;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use support::client::Client;
use support::oauth::{oauthbearer, xoauth2, Introspection};
use support::setup::*;

/// Tokens and their users; any other token is inactive (expired, revoked).
const TOKENS: [(&str, &str); 2] = [("tok-alice-0f3c9a1d", "alice"), ("tok-bob-77e1b2c4", "bob")];
const ALICE_TOKEN: &str = "tok-alice-0f3c9a1d";
const BOB_TOKEN: &str = "tok-bob-77e1b2c4";
const EXPIRED_TOKEN: &str = "tok-expired-5d2e8b90";

/// Short failed-login delays, so that failures go quickly.
const LIMITS: &str = "[limits]\nauth_base_delay = \"10ms\"\nauth_max_delay = \"20ms\"\n";

struct OAuthSetup {
    setup: Setup,
    introspection: Introspection,
}

/// mailgate in front of a Dovecot taking tokens, once mailgate has learned that it does
/// (its probe at start).
fn start() -> OAuthSetup {
    start_with(&TOKENS)
}

fn start_with(tokens: &[(&str, &str)]) -> OAuthSetup {
    let introspection = Introspection::start(tokens);
    let dovecot = introspection.dovecot(&[ALICE, BOB]);
    let setup = Setup::in_front_of(dovecot, "", LIMITS);
    let deadline = Instant::now() + Duration::from_secs(10);
    while setup.gateway.log().matches("upstream OAuth mechanisms learned").count() < 2 {
        assert!(Instant::now() < deadline, "no OAuth probe result:\n{}", setup.gateway.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    OAuthSetup { setup, introspection }
}

fn metric(setup: &Setup, series: &str) -> f64 {
    let text = setup.gateway.metrics();
    (text.lines()).find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// Neither a token nor any response carrying one is in mailgate's log.
fn assert_no_token_logged(setup: &Setup, responses: &[String]) {
    let log = setup.gateway.log();
    for secret in
        [ALICE_TOKEN, BOB_TOKEN, EXPIRED_TOKEN, "tok-"].iter().map(|s| s.to_string()).chain(responses.iter().cloned())
    {
        assert!(!log.contains(&secret), "{secret} in the log:\n{log}");
    }
}

/// The JSON of an error challenge line (`+ base64`).
fn challenge_json(line: &str) -> String {
    let encoded = line.strip_prefix("+ ").unwrap_or_else(|| panic!("not a challenge: {line}"));
    if encoded.is_empty() {
        return String::new();
    }
    String::from_utf8(STANDARD.decode(encoded).expect("base64 challenge")).unwrap()
}

#[test]
fn imap_offers_oauth_under_tls_only_and_only_for_an_upstream_that_takes_it() {
    let OAuthSetup { setup, introspection } = start();
    let mut client = setup.imaps();
    let caps = client.command("a", "CAPABILITY");
    assert!(caps[0].contains("AUTH=PLAIN AUTH=OAUTHBEARER AUTH=XOAUTH2"), "{caps:?}");

    // STARTTLS listener: neither offered nor taken before TLS, the upstream never asked.
    let mut client = Client::plain(setup.addr("imap"));
    let greeting = client.line().unwrap();
    assert!(!greeting.contains("AUTH="), "{greeting}");
    let caps = client.command("a", "CAPABILITY");
    assert!(!caps[0].contains("OAUTH"), "{caps:?}");
    for (tag, mechanism, response) in
        [("b", "OAUTHBEARER", oauthbearer("alice", ALICE_TOKEN)), ("c", "XOAUTH2", xoauth2("alice", ALICE_TOKEN))]
    {
        let refused = client.command(tag, &format!("AUTHENTICATE {mechanism} {response}"));
        assert!(refused[0].starts_with(&format!("{tag} NO [PRIVACYREQUIRED]")), "{refused:?}");
    }
    // Without SASL-IR: refused before the client sends its token.
    let refused = client.command("d", "AUTHENTICATE XOAUTH2");
    assert!(refused[0].starts_with("d NO [PRIVACYREQUIRED]"), "{refused:?}");
    // A plaintext listener (no TLS at all) does not take them either.
    let mut plain = Client::plain(setup.addr("plain"));
    let greeting = plain.line().unwrap();
    assert!(!greeting.contains("OAUTH"), "{greeting}");
    let refused = plain.command("a", &format!("AUTHENTICATE XOAUTH2 {}", xoauth2("alice", ALICE_TOKEN)));
    assert!(refused[0].starts_with("a NO [PRIVACYREQUIRED]"), "{refused:?}");
    // After STARTTLS they are.
    client.starttls(setup.tls_config());
    let caps = client.command("e", "CAPABILITY");
    assert!(caps[0].contains("AUTH=OAUTHBEARER AUTH=XOAUTH2"), "{caps:?}");
    let ok = client.command("f", &format!("AUTHENTICATE XOAUTH2 {}", xoauth2("alice", ALICE_TOKEN)));
    assert!(ok.last().unwrap().starts_with("f OK"), "{ok:?}");
    assert_eq!(introspection.count(), 1, "only the login after STARTTLS reached the upstream");
    assert!(!setup.dovecot.log().contains("plaintext"), "{}", setup.dovecot.log());
    assert_no_token_logged(&setup, &[]);

    // An upstream without an oauth2 passdb: not offered, not taken.
    let plain = Setup::start();
    assert!(plain.gateway.wait_for_log("upstream OAuth mechanisms learned", Duration::from_secs(10)));
    let mut client = plain.imaps();
    let caps = client.command("a", "CAPABILITY");
    assert!(caps[0].contains("AUTH=PLAIN") && !caps[0].contains("OAUTH"), "{caps:?}");
    let refused = client.command("b", &format!("AUTHENTICATE XOAUTH2 {}", xoauth2("alice", ALICE_TOKEN)));
    assert!(refused[0].starts_with("b NO [CANNOT]"), "{refused:?}");
}

#[test]
fn imap_valid_tokens_log_in_as_the_envelope_user_with_sasl_ir_and_continuation() {
    let OAuthSetup { setup, introspection: _introspection } = start();
    setup.dovecot.fill("alice", 3, 7);
    // A password session fills the cache for alice.
    let mut client = setup.login(ALICE);
    client.command("s", "SELECT INBOX");
    let direct = client.command("f", "FETCH 1 (BODY.PEEK[])");
    assert!(direct.last().unwrap().starts_with("f OK"), "{direct:?}");
    client.command("z", "LOGOUT");
    let hits = "mailgate_cache_requests_total{kind=\"body\",result=\"hit\"}";
    let before = metric(&setup, hits);

    // OAUTHBEARER with SASL-IR: the same account, so the cache answers.
    let bearer = oauthbearer("alice", ALICE_TOKEN);
    let mut client = setup.imaps();
    let ok = client.command("a", &format!("AUTHENTICATE OAUTHBEARER {bearer}"));
    assert!(
        ok.last().unwrap().starts_with("a OK [CAPABILITY"),
        "{ok:?}\n{}\n{}",
        setup.gateway.log(),
        setup.dovecot.log()
    );
    client.command("s", "SELECT INBOX");
    let fetched = client.command("f", "FETCH 1 (BODY.PEEK[])");
    assert_eq!(fetched, direct, "the same message through the token's session");
    client.command("z", "LOGOUT");
    assert!(metric(&setup, hits) > before, "the token's session used alice's cache");

    // XOAUTH2 with a continuation, the user spelled otherwise: the canonical account.
    let xoauth = xoauth2("ALICE", ALICE_TOKEN);
    let mut client = setup.imaps();
    client.send(b"b AUTHENTICATE XOAUTH2\r\n");
    assert_eq!(client.line().unwrap(), "+ ");
    client.send(format!("{xoauth}\r\n").as_bytes());
    let ok = client.until_tagged("b");
    assert!(ok.last().unwrap().starts_with("b OK"), "{ok:?}");
    let status = client.command("s", "STATUS INBOX (MESSAGES)");
    assert!(status[0].contains("MESSAGES 3"), "{status:?}");
    client.command("z", "LOGOUT");
    assert!(setup.gateway.wait_for_log("account=\"alice\"", Duration::from_secs(5)));
    let log = setup.gateway.log();
    assert!(!log.contains("account=\"ALICE\""), "{log}");
    assert_eq!(metric(&setup, "mailgate_logins_total{listener=\"imaps\",protocol=\"imap\",result=\"ok\"}"), 3.0);
    assert_no_token_logged(&setup, &[bearer, xoauth]);
}

#[test]
fn imap_failed_tokens_relay_the_error_challenge_and_count_as_failed_logins() {
    let OAuthSetup { setup, introspection: _introspection } = start();
    let rejected = "mailgate_logins_total{listener=\"imaps\",protocol=\"imap\",result=\"rejected\"}";
    let mut responses = Vec::new();

    // An expired token, OAUTHBEARER with SASL-IR: the upstream's JSON error, the client's
    // %x01 goes through, then NO.
    let bearer = oauthbearer("alice", EXPIRED_TOKEN);
    let mut client = setup.imaps();
    client.send(format!("a AUTHENTICATE OAUTHBEARER {bearer}\r\n").as_bytes());
    let json = challenge_json(&client.line().unwrap());
    assert!(json.contains("invalid_token"), "{json}");
    client.send(b"AQ==\r\n");
    let no = client.until_tagged("a");
    assert!(no.last().unwrap().starts_with("a NO [AUTHENTICATIONFAILED]"), "{no:?}");
    responses.push(bearer);
    // The session goes on: a password login after it.
    client.login(BOB);
    client.command("z", "LOGOUT");

    // XOAUTH2 by continuation: the error, then the client's empty line.
    let xoauth = xoauth2("bob", EXPIRED_TOKEN);
    let mut client = setup.imaps();
    client.send(b"b AUTHENTICATE XOAUTH2\r\n");
    assert_eq!(client.line().unwrap(), "+ ");
    client.send(format!("{xoauth}\r\n").as_bytes());
    let json = challenge_json(&client.line().unwrap());
    assert!(json.starts_with('{') && json.contains("\"status\""), "the upstream's JSON error: {json}");
    client.send(b"\r\n");
    let no = client.until_tagged("b");
    assert!(no.last().unwrap().starts_with("b NO [AUTHENTICATIONFAILED]"), "{no:?}");
    responses.push(xoauth);

    // Bob's valid token under alice's name: the upstream refuses it.
    for (tag, response) in [("c", oauthbearer("alice", BOB_TOKEN)), ("d", xoauth2("alice", BOB_TOKEN))] {
        client.send(
            format!("{tag} AUTHENTICATE {} {response}\r\n", if tag == "c" { "OAUTHBEARER" } else { "XOAUTH2" })
                .as_bytes(),
        );
        let mut line = client.line().unwrap();
        if line.starts_with('+') {
            client.send(if tag == "c" { b"AQ==\r\n" } else { b"\r\n" });
            line = client.line().unwrap();
        }
        assert!(line.starts_with(&format!("{tag} NO [AUTHENTICATIONFAILED]")), "{line}");
        responses.push(response);
    }
    assert_eq!(metric(&setup, rejected), 4.0, "each failed token is a failed login");

    // No user in the envelope: refused by mailgate, clearly, without the upstream.
    let anonymous = STANDARD.encode(format!("n,,\x01auth=Bearer {ALICE_TOKEN}\x01\x01"));
    let refused = client.command("e", &format!("AUTHENTICATE OAUTHBEARER {anonymous}"));
    assert!(refused[0].starts_with("e NO [AUTHENTICATIONFAILED]") && refused[0].contains("a="), "{refused:?}");
    assert_eq!(metric(&setup, rejected), 4.0);
    responses.push(anonymous);
    assert_no_token_logged(&setup, &responses);
}

fn pop3_multiline(client: &mut Client) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let line = client.line().expect("multi-line response");
        if line == "." {
            return lines;
        }
        lines.push(line);
    }
}

#[test]
fn pop3_oauth_logs_in_fails_with_the_challenge_and_waits_for_tls() {
    // A token longer than a POP3 command line (255 octets) as an initial response.
    let long_token = format!("{BOB_TOKEN}{}", "x".repeat(400));
    let OAuthSetup { setup, introspection } = start_with(&[(long_token.as_str(), "bob"), (BOB_TOKEN, "bob")]);
    setup.dovecot.fill("bob", 2, 11);
    let mut responses = Vec::new();

    // Offered under TLS.
    let mut client = setup.pop3s();
    client.send(b"CAPA\r\n");
    assert!(client.line().unwrap().starts_with("+OK"));
    let capa = pop3_multiline(&mut client);
    assert!(capa.contains(&"SASL PLAIN OAUTHBEARER XOAUTH2".to_string()), "{capa:?}");
    client.send(b"AUTH\r\n");
    assert!(client.line().unwrap().starts_with("+OK"));
    assert_eq!(pop3_multiline(&mut client), ["PLAIN", "OAUTHBEARER", "XOAUTH2"]);

    let xoauth = xoauth2("bob", &long_token);
    let mut client = setup.pop3s();
    client.send(format!("AUTH XOAUTH2 {xoauth}\r\n").as_bytes());
    let ok = client.line().unwrap();
    assert!(ok.starts_with("+OK"), "{ok}");
    client.send(b"STAT\r\n");
    assert!(client.line().unwrap().starts_with("+OK 2 "));
    client.send(b"QUIT\r\n");
    assert!(client.line().unwrap().starts_with("+OK"));
    responses.push(xoauth);

    // OAUTHBEARER by continuation with an expired token: the error challenge, AQ==, -ERR.
    let bearer = oauthbearer("bob", EXPIRED_TOKEN);
    let mut client = setup.pop3s();
    client.send(b"AUTH OAUTHBEARER\r\n");
    assert_eq!(client.line().unwrap(), "+ ");
    client.send(format!("{bearer}\r\n").as_bytes());
    let json = challenge_json(&client.line().unwrap());
    assert!(json.contains("invalid_token"), "{json}");
    client.send(b"AQ==\r\n");
    let err = client.line().unwrap();
    assert!(err.starts_with("-ERR [AUTH]"), "{err}");
    responses.push(bearer);
    // A token for bob under alice's name.
    let mismatch = xoauth2("alice", BOB_TOKEN);
    client.send(format!("AUTH XOAUTH2 {mismatch}\r\n").as_bytes());
    let mut line = client.line().unwrap();
    if line.starts_with('+') {
        client.send(b"\r\n");
        line = client.line().unwrap();
    }
    assert!(line.starts_with("-ERR [AUTH]"), "{line}");
    responses.push(mismatch);
    let rejected = "mailgate_logins_total{listener=\"pop3s\",protocol=\"pop3\",result=\"rejected\"}";
    assert_eq!(metric(&setup, rejected), 2.0);

    // The STLS listener: not offered, refused, the upstream not asked.
    let asked = introspection.count();
    let mut client = Client::plain(setup.addr("pop3"));
    assert!(client.line().unwrap().starts_with("+OK"));
    client.send(b"CAPA\r\n");
    assert!(client.line().unwrap().starts_with("+OK"));
    let capa = pop3_multiline(&mut client);
    assert!(!capa.iter().any(|l| l.contains("OAUTH")), "{capa:?}");
    client.send(format!("AUTH XOAUTH2 {}\r\n", xoauth2("bob", BOB_TOKEN)).as_bytes());
    let err = client.line().unwrap();
    assert!(err.starts_with("-ERR"), "{err}");
    assert_eq!(introspection.count(), asked);
    assert_no_token_logged(&setup, &responses);
}

/// The exchange byte by byte, against a scripted upstream without SASL-IR: the client's
/// response reaches it unchanged after its `+`, its challenge reaches the client and the
/// client's answer goes back; an upstream that stops offering the mechanism refuses it
/// (no guess) and is no longer announced.
#[test]
fn the_exchange_passes_unchanged_and_follows_what_the_upstream_offers() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use support::fake_upstream::{FakeConn, FakeUpstream};
    use support::gateway::Gateway;
    use support::setup::gateway_config;
    use support::tls::TestPki;

    const CHALLENGE: &str = "eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiQmVhcmVyIn0=";
    let good = xoauth2("carol@example.org", "tok-carol-9a8b7c");
    let offer = Arc::new(AtomicBool::new(true));
    let (offering, accepted) = (offer.clone(), good.clone());
    let fake = FakeUpstream::start(None, move |conn: &mut FakeConn| {
        let mechanism = if offering.load(Ordering::SeqCst) { " AUTH=XOAUTH2" } else { "" };
        conn.send(format!("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN{mechanism}] fake\r\n").as_bytes());
        while let Some(line) = conn.line() {
            let tag = line.split(' ').next().unwrap_or_default().to_string();
            if line.ends_with(" AUTHENTICATE XOAUTH2") {
                conn.send(b"+ \r\n");
                let Some(response) = conn.line() else { return };
                if response == accepted {
                    conn.send(format!("{tag} OK [CAPABILITY IMAP4rev1] in\r\n").as_bytes());
                } else {
                    conn.send(format!("+ {CHALLENGE}\r\n").as_bytes());
                    let Some(_dummy) = conn.line() else { return };
                    conn.send(format!("{tag} NO [AUTHENTICATIONFAILED] bad token\r\n").as_bytes());
                }
            } else {
                conn.send(format!("{tag} OK\r\n").as_bytes());
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let config = gateway_config(&pki, &fake.addr.to_string(), "plaintext", None, "", LIMITS);
    let gateway = Gateway::start(dir.path(), &config);
    assert!(gateway.wait_for_log("upstream OAuth mechanisms learned", Duration::from_secs(10)));
    let client = || {
        let mut client = Client::tls(gateway.addr("imaps"), pki.client_config(&[]));
        let greeting = client.line().unwrap();
        assert!(greeting.starts_with("* OK"), "{greeting}");
        client
    };

    let mut carol = client();
    let caps = carol.command("a", "CAPABILITY");
    assert!(caps[0].ends_with("AUTH=PLAIN AUTH=XOAUTH2"), "only what the upstream offers: {caps:?}");
    let ok = carol.command("b", &format!("AUTHENTICATE XOAUTH2 {good}"));
    assert!(ok.last().unwrap().starts_with("b OK"), "{ok:?}");
    assert!(fake.received().contains(&format!("M2 AUTHENTICATE XOAUTH2\r\n{good}\r\n")), "{}", fake.received());

    let bad = xoauth2("carol@example.org", "tok-revoked");
    let mut client_b = client();
    client_b.send(format!("c AUTHENTICATE XOAUTH2 {bad}\r\n").as_bytes());
    assert_eq!(client_b.line().unwrap(), format!("+ {CHALLENGE}"), "the upstream's challenge, unchanged");
    client_b.send(b"\r\n");
    let no = client_b.until_tagged("c");
    assert!(no.last().unwrap().starts_with("c NO [AUTHENTICATIONFAILED]"), "{no:?}");
    assert!(fake.received().contains(&format!("{bad}\r\n\r\n")), "the client's empty answer went through");

    // The upstream stops offering XOAUTH2: the next login learns it.
    offer.store(false, Ordering::SeqCst);
    let no = client_b.command("d", &format!("AUTHENTICATE XOAUTH2 {good}"));
    assert!(no.last().unwrap().starts_with("d NO [AUTHENTICATIONFAILED]"), "{no:?}");
    let mut later = client();
    let caps = later.command("e", "CAPABILITY");
    assert!(!caps[0].contains("XOAUTH2"), "{caps:?}");
    let no = later.command("f", &format!("AUTHENTICATE XOAUTH2 {good}"));
    assert!(no[0].starts_with("f NO [CANNOT]"), "{no:?}");
    let text = gateway.metrics();
    let rejected = "mailgate_logins_total{listener=\"imaps\",protocol=\"imap\",result=\"rejected\"}";
    let value = text.lines().find_map(|l| l.strip_prefix(rejected)).map(str::trim);
    assert_eq!(value, Some("2"), "the revoked token and the mechanism no longer offered");
    let log = gateway.log();
    assert!(!log.contains("tok-") && !log.contains(&good) && !log.contains(&bad), "{log}");
}
