//! Connection caps with the exact answers clients see, against Dovecot: per client address
//! (before the greeting: `* BYE` / `-ERR [SYS/TEMP]`), per user across IMAP and POP3 (at
//! login: `NO [LIMIT]` / `-ERR [IN-USE]`), global; slots come back when sessions end.

mod support;

use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

use support::client::{closed_before_tls, Client};
use support::gateway::Gateway;
use support::redis::Redis;
use support::setup::*;

/// Whether a new connection to the implicit-TLS IMAP port is refused (closed before any
/// handshake).
fn imaps_refused(setup: &Setup) -> bool {
    closed_before_tls(TcpStream::connect(setup.addr("imaps")).unwrap(), setup.tls_config())
}

fn metric(setup: &Setup, series: &str) -> String {
    gateway_metric(&setup.gateway, series)
}

fn gateway_metric(gateway: &Gateway, series: &str) -> String {
    let text = http_get(gateway, "/metrics");
    text.lines().find(|l| l.starts_with(series)).unwrap_or_default().to_string()
}

#[test]
fn per_address_cap_answers_before_the_greeting_and_frees_slots() {
    let setup = Setup::start_with("", "[limits]\nmax_connections_per_ip = 2\n");
    let first = setup.imaps();
    let mut second = Client::plain(setup.addr("pop3"));
    assert!(second.line().unwrap().starts_with("+OK"));
    // In clear text on a plaintext or STLS port; closed before any handshake on an
    // implicit-TLS port.
    let mut imap = Client::plain(setup.addr("imap"));
    assert_eq!(imap.rest(), ["* BYE [UNAVAILABLE] Too many connections, try again later."]);
    assert!(imaps_refused(&setup));
    let tcp = TcpStream::connect(setup.addr("pop3s")).unwrap();
    assert!(closed_before_tls(tcp, setup.tls_config()));
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    let mut again = setup.imaps();
    assert!(again.command("n", "NOOP")[0].starts_with("n OK"));
    assert_eq!(
        metric(&setup, "mailgate_limit_rejections_total{kind=\"connections\"}"),
        "mailgate_limit_rejections_total{kind=\"connections\"} 3"
    );
}

#[test]
fn a_connection_stalling_its_tls_handshake_holds_its_slot() {
    let setup = Setup::start_with("", "[limits]\nmax_connections_per_ip = 1\n");
    // TCP to the implicit-TLS port, and not a byte of TLS.
    let stalled = TcpStream::connect(setup.addr("imaps")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(imaps_refused(&setup));
    drop(stalled);
    std::thread::sleep(Duration::from_millis(300));
    let mut again = setup.imaps();
    assert!(again.command("n", "NOOP")[0].starts_with("n OK"));
}

#[test]
fn over_the_cap_an_implicit_tls_port_closes_a_connection_at_accept_without_a_handshake() {
    let setup = Setup::start_with("", "[limits]\nmax_connections_per_ip = 1\n");
    let _first = setup.imaps();
    // Connect and never send a ClientHello: a refusal said over TLS would wait for it, and
    // hold the socket for the whole handshake timeout (10 s).
    let mut stalled = TcpStream::connect(setup.addr("imaps")).unwrap();
    stalled.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let started = std::time::Instant::now();
    let read = stalled.read(&mut [0u8; 1]);
    let waited = started.elapsed();
    let closed = match &read {
        Ok(n) => *n == 0,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    };
    assert!(closed, "not closed: {read:?} after {waited:?}");
    assert!(waited < Duration::from_secs(2), "closed only after {waited:?}");
    assert_eq!(
        metric(&setup, "mailgate_limit_rejections_total{kind=\"connections\"}"),
        "mailgate_limit_rejections_total{kind=\"connections\"} 1"
    );
}

#[test]
fn per_user_cap_spans_imap_and_pop3() {
    let setup = Setup::start_with("", "[limits]\nmax_connections_per_user = 1\n");
    let mut first = setup.login(BOB);
    let mut second = setup.imaps();
    let lines = second.command("a", "LOGIN bob bob-Pass-42");
    assert_eq!(lines, ["a NO [LIMIT] Too many sessions for this user, try again later."]);
    let mut pop3 = setup.pop3s();
    pop3.send(b"USER bob\r\nPASS bob-Pass-42\r\n");
    assert!(pop3.line().unwrap().starts_with("+OK"));
    assert_eq!(pop3.line().unwrap(), "-ERR [IN-USE] Too many sessions for this user, try again later.");
    // Another user is not affected.
    let _alice = setup.login(ALICE);
    // The slot comes back when the first session ends.
    first.send(b"z LOGOUT\r\n");
    let _ = first.rest();
    std::thread::sleep(Duration::from_millis(300));
    let lines = second.command("b", "LOGIN bob bob-Pass-42");
    assert!(lines.last().unwrap().starts_with("b OK"), "{lines:?}");
}

#[test]
fn global_cap_holds() {
    let setup = Setup::start_with("", "[limits]\nmax_connections = 2\n");
    let _a = setup.imaps();
    let _b = setup.pop3s();
    assert!(imaps_refused(&setup));
    let mut imap = Client::plain(setup.addr("imap"));
    assert_eq!(imap.rest(), ["* BYE [UNAVAILABLE] Too many connections, try again later."]);
}

#[test]
fn append_over_the_size_cap_is_refused_with_toobig_and_the_session_goes_on() {
    let setup = Setup::start_with("", "[limits]\nmax_append_bytes = \"1MiB\"\n");
    let mut client = setup.login(BOB);
    client.send(b"a APPEND INBOX {2000000}\r\n");
    assert_eq!(client.line().unwrap(), "a NO [TOOBIG] Message too large.");
    let message = b"From: a@example.org\r\nSubject: small\r\n\r\nfits\r\n";
    client.send(format!("b APPEND INBOX {{{}}}\r\n", message.len()).as_bytes());
    assert!(client.line().unwrap().starts_with("+ "));
    client.send(message);
    client.send(b"\r\n");
    assert!(client.until_tagged("b").last().unwrap().starts_with("b OK"));
    assert!(metric(&setup, "mailgate_limit_rejections_total{kind=\"append_size\"}").ends_with(" 1"));
}

#[test]
fn every_literal_of_an_append_counts_against_the_size_cap() {
    let setup = Setup::start_with("", "[limits]\nmax_append_bytes = \"1MiB\"\nmax_append_command_bytes = \"3MiB\"\n");
    let mut client = setup.login(BOB);
    let small = b"From: a@example.org\r\nSubject: small\r\n\r\nfits\r\n";
    // MULTIAPPEND (RFC 3502): a small first message, then one over the cap. The command is
    // half sent when the second literal is announced: the session ends without it.
    client.send(format!("a APPEND INBOX {{{}}}\r\n", small.len()).as_bytes());
    assert!(client.line().unwrap().starts_with("+ "));
    client.send(small);
    client.send(b" {2000000}\r\n");
    let rest = client.rest();
    assert_eq!(rest.last().map(String::as_str), Some("* BYE Literal too large."), "{rest:?}");
    // Messages each under the cap, together over the command's bound.
    let mut client = setup.login(BOB);
    let part = vec![b'x'; 900_000];
    client.send(b"b APPEND INBOX {900000+}\r\n");
    client.send(&part);
    client.send(b" {900000+}\r\n");
    client.send(&part);
    client.send(b" {900000+}\r\n");
    client.send(&part);
    client.send(b" {900000}\r\n");
    let rest = client.rest();
    assert_eq!(rest.last().map(String::as_str), Some("* BYE Literal too large."), "{rest:?}");
    // Nothing of either reached the mailbox, and a small APPEND still works.
    let mut client = setup.login(BOB);
    let lines = client.command("s", "STATUS INBOX (MESSAGES)");
    assert!(lines.iter().any(|l| l.contains("(MESSAGES 0)")), "{lines:?}");
    assert_eq!(
        metric(&setup, "mailgate_limit_rejections_total{kind=\"append_size\"}"),
        "mailgate_limit_rejections_total{kind=\"append_size\"} 2"
    );
}

fn timed_login(client: &mut Client, tag: &str, password: &str) -> (String, Duration) {
    let started = std::time::Instant::now();
    let lines = client.command(tag, &format!("LOGIN bob {password}"));
    (lines.last().unwrap().clone(), started.elapsed())
}

#[test]
fn failed_logins_are_delayed_escalating_then_locked_out_without_blocking_others() {
    let setup = Setup::start_with(
        "",
        "[limits]\nauth_base_delay = \"300ms\"\nauth_max_delay = \"1s\"\nauth_lockout_failures = 3\n",
    );
    let mut client = setup.imaps();
    let (answer, first) = timed_login(&mut client, "a", "wrong-1");
    assert!(answer.starts_with("a NO [AUTHENTICATIONFAILED]"), "{answer}");
    // The same wrong password again does not escalate.
    let (_, again) = timed_login(&mut client, "b", "wrong-1");
    // While this session waits, another is served at once.
    let waiting = std::thread::spawn({
        let addr = setup.addr("imaps");
        let config = setup.tls_config();
        move || {
            let mut other = Client::tls(addr, config);
            other.line().unwrap();
            let started = std::time::Instant::now();
            other.command("n", "NOOP");
            started.elapsed()
        }
    });
    let (_, second) = timed_login(&mut client, "c", "wrong-2");
    assert!(waiting.join().unwrap() < Duration::from_millis(300), "a delay blocked another session");
    let (_, third) = timed_login(&mut client, "d", "wrong-3");
    assert!(first >= Duration::from_millis(300) && again < Duration::from_millis(600 + 500), "{first:?} {again:?}");
    assert!(second >= Duration::from_millis(600), "{second:?}");
    assert!(third >= Duration::from_millis(1000), "{third:?}");
    // Three distinct failures: bob is locked out at this address, even with the right password.
    let (answer, _) = timed_login(&mut client, "e", "bob-Pass-42");
    assert_eq!(answer, "e NO [LIMIT] Too many failed logins, try again later.");
    let mut pop3 = setup.pop3s();
    pop3.send(b"USER bob\r\nPASS bob-Pass-42\r\n");
    pop3.line().unwrap();
    assert_eq!(pop3.line().unwrap(), "-ERR [SYS/TEMP] Too many failed logins, try again later.");
    // Another user is not locked out.
    let _alice = setup.login(ALICE);
    assert!(metric(&setup, "mailgate_limit_rejections_total{kind=\"auth\"}").ends_with(" 2"));
}

#[test]
fn trusted_networks_are_exempt_from_penalties() {
    let setup = Setup::start_with(
        "",
        "[limits]\nauth_base_delay = \"2s\"\nauth_lockout_failures = 1\ntrusted_networks = [\"127.0.0.0/8\"]\n",
    );
    let mut client = setup.imaps();
    for tag in ["a", "b", "c"] {
        let (answer, took) = timed_login(&mut client, tag, &format!("wrong-{tag}"));
        assert!(answer.contains("AUTHENTICATIONFAILED") && took < Duration::from_millis(1900), "{answer} {took:?}");
    }
    let (answer, _) = timed_login(&mut client, "d", "bob-Pass-42");
    assert!(answer.starts_with("d OK"), "{answer}");
}

#[test]
fn rates_refuse_bursts_of_connections_and_logins_and_slow_commands() {
    let setup = Setup::start_with(
        "",
        "[limits]\nconnections_per_ip_per_minute = 4\nlogins_per_ip_per_minute = 2\ncommands_per_user_per_second = 20\n",
    );
    // Logins: two per minute from this address.
    let mut first = setup.login(BOB);
    let mut client = setup.imaps();
    assert!(client.command("a", "LOGIN bob wrong-x")[0].contains("AUTHENTICATIONFAILED"));
    let lines = client.command("b", "LOGIN bob bob-Pass-42");
    assert_eq!(lines, ["b NO [LIMIT] Too many logins from your address, slow down."]);
    // Connections: the fourth this minute was the last.
    let _third = setup.imaps();
    let _fourth = setup.imaps();
    assert!(imaps_refused(&setup));
    assert!(metric(&setup, "mailgate_limit_rejections_total{kind=\"rate\"}").ends_with(" 2"));
    // Commands: 60 pipelined NOOPs at 20 per second take about 2 seconds, all answered.
    let started = std::time::Instant::now();
    let batch: String = (0..60).map(|i| format!("n{i} NOOP\r\n")).collect();
    first.send(batch.as_bytes());
    for i in 0..60 {
        let lines = first.until_tagged(&format!("n{i}"));
        assert!(lines.last().unwrap().starts_with(&format!("n{i} OK")));
    }
    assert!(started.elapsed() >= Duration::from_millis(1500), "{:?}", started.elapsed());
}

#[test]
fn downloads_over_the_user_bandwidth_are_slowed_across_imap_and_pop3_and_arrive_whole() {
    let setup = Setup::start_with("", "[limits]\ndownload_bytes_per_user_per_second = \"64KiB\"\n");
    let message = append_large_message(&setup);

    // IMAP: one second's budget goes at once, the rest at 64 KiB/s: at least ~3 seconds.
    let mut client = setup.login(BOB);
    client.command("s", "SELECT INBOX");
    let took = fetch_last(&mut client, "f", &message);
    assert!(took >= Duration::from_millis(2500), "{took:?}");

    // POP3 for the same user shares the budget, now spent: the RETR is slowed from the start.
    let mut pop3 = setup.pop3_login(BOB);
    let (received, took) = retr_last(&mut pop3);
    assert_eq!(received, message, "the message arrives whole");
    assert!(took >= Duration::from_millis(2500), "{took:?}");
    assert!(counter(&setup, "mailgate_limit_rejections_total{kind=\"bandwidth\"}") > 0);
}

/// Appends a 256 KiB message straight to Dovecot (bob's INBOX); the message.
fn append_large_message(setup: &Setup) -> String {
    let body: String =
        (0..4096).map(|i| format!("line {i:05} {:<51}\r\n", "of a large message, 64 bytes a line")).collect();
    assert_eq!(body.len(), 256 * 1024);
    let message = format!("From: a@example.org\r\nSubject: large\r\n\r\n{body}");
    let mut direct = setup.direct(BOB);
    direct.send(format!("a APPEND INBOX {{{}}}\r\n", message.len()).as_bytes());
    assert!(direct.line().unwrap().starts_with("+ "));
    direct.send(message.as_bytes());
    direct.send(b"\r\n");
    assert!(direct.until_tagged("a").last().unwrap().starts_with("a OK"));
    message
}

/// FETCHes the last message's full text through `client` and checks it arrives whole; how
/// long that took.
fn fetch_last(client: &mut Client, tag: &str, message: &str) -> Duration {
    let started = std::time::Instant::now();
    client.send(format!("{tag} FETCH * BODY.PEEK[]\r\n").as_bytes());
    let responses = client.responses(tag);
    let took = started.elapsed();
    assert!(responses.last().unwrap().starts_with(format!("{tag} OK").as_bytes()));
    let fetched = &responses[0];
    assert!(fetched.windows(message.len()).any(|w| w == message.as_bytes()), "the message arrives whole");
    took
}

fn counter(setup: &Setup, series: &str) -> u64 {
    metric(setup, series).rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn past_a_throttle_download_quota_a_session_is_held_near_the_over_quota_rate() {
    let setup = Setup::start_with(
        "",
        "[limits]\ndownload_quota = \"16KiB\"\ndownload_quota_window = \"1h\"\ndownload_quota_action = \"throttle\"\nover_quota_bytes_per_second = \"32KiB\"\n",
    );
    let message = append_large_message(&setup);
    let mut client = setup.login(BOB);
    client.command("s", "SELECT INBOX");
    // 16 KiB free, then one second's worth (32 KiB) at once, the other 208 KiB at 32 KiB/s:
    // 6.5 s. Generous bounds: the machine may be slow, the rate must hold.
    let took = fetch_last(&mut client, "f", &message);
    assert!(took >= Duration::from_millis(5200) && took <= Duration::from_secs(20), "{took:?}");
    assert!(counter(&setup, "mailgate_limit_rejections_total{kind=\"bandwidth\"}") > 0);
    // Another user is not slowed.
    let mut alice = setup.login(ALICE);
    assert!(alice.command("n", "NOOP").last().unwrap().starts_with("n OK"));
}

#[test]
fn past_a_reject_download_quota_fetch_and_retr_are_refused_until_the_window_rolls_over() {
    let setup = Setup::start_with(
        "",
        "[limits]\ndownload_quota = \"64KiB\"\ndownload_quota_window = \"4s\"\ndownload_quota_action = \"reject\"\n",
    );
    let message = append_large_message(&setup);
    let mut client = setup.login(BOB);
    client.command("s", "SELECT INBOX");
    let window = std::time::Instant::now();
    // The download that crosses the quota is never cut.
    fetch_last(&mut client, "f", &message);
    assert_eq!(client.command("g", "FETCH * BODY.PEEK[]"), ["g NO [LIMIT] Download quota used up, try again later."]);
    assert_eq!(client.command("u", "UID FETCH 1:* RFC822"), ["u NO [LIMIT] Download quota used up, try again later."]);
    // A FETCH whose header list carries a literal is judged on the line before it.
    client.send(b"v FETCH * (BODY.PEEK[HEADER.FIELDS ({7}\r\n");
    assert_eq!(client.line().unwrap(), "v NO [LIMIT] Download quota used up, try again later.");
    // Flags and sizes still sync; the session goes on.
    assert!(client.command("h", "FETCH * (FLAGS RFC822.SIZE)").last().unwrap().starts_with("h OK"));
    let mut pop3 = setup.pop3_login(BOB);
    pop3.send(b"RETR 1\r\n");
    assert_eq!(pop3.line().unwrap(), "-ERR [SYS/TEMP] Download quota used up, try again later.");
    pop3.send(b"STAT\r\n");
    assert!(pop3.line().unwrap().starts_with("+OK "));
    assert_eq!(counter(&setup, "mailgate_limit_rejections_total{kind=\"quota\"}"), 4);
    // A new window: downloads again.
    std::thread::sleep(Duration::from_millis(4300).saturating_sub(window.elapsed()));
    fetch_last(&mut client, "i", &message);
}

#[test]
fn a_pop3_session_is_held_near_the_session_rate() {
    let setup = Setup::start_with("", "[limits]\ndownload_bytes_per_session_per_second = \"40KiB\"\n");
    let message = append_large_message(&setup);
    let mut pop3 = setup.pop3_login(BOB);
    // One second's worth (40 KiB) at once, the other 216 KiB at 40 KiB/s: 5.4 s.
    let (received, took) = retr_last(&mut pop3);
    assert_eq!(received, message, "the message arrives whole");
    assert!(took >= Duration::from_millis(4300) && took <= Duration::from_secs(16), "{took:?}");
    // The session goes on.
    pop3.send(b"NOOP\r\n");
    assert_eq!(pop3.line().unwrap(), "+OK");
}

/// RETRs the last message in `pop3`'s mailbox: its text (unstuffed) and how long it took.
fn retr_last(pop3: &mut Client) -> (String, Duration) {
    pop3.send(b"STAT\r\n");
    let count: usize = pop3.line().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let started = std::time::Instant::now();
    pop3.send(format!("RETR {count}\r\n").as_bytes());
    assert!(pop3.line().unwrap().starts_with("+OK"));
    let mut received = String::new();
    loop {
        let line = pop3.line().expect("the message to its end");
        if line == "." {
            break;
        }
        received.push_str(line.strip_prefix('.').unwrap_or(&line));
        received.push_str("\r\n");
    }
    (received, started.elapsed())
}

#[test]
fn the_overrides_file_gives_one_user_other_caps() {
    let dir = tempfile::tempdir().unwrap();
    let overrides = dir.path().join("overrides.toml");
    std::fs::write(&overrides, "[users.bob]\nmax_connections_per_user = 1\n").unwrap();
    let setup = Setup::start_with("", &format!("[limits]\noverrides_file = {:?}\n", overrides.display().to_string()));
    let _first = setup.login(BOB);
    let mut second = setup.imaps();
    assert_eq!(
        second.command("a", "LOGIN bob bob-Pass-42"),
        ["a NO [LIMIT] Too many sessions for this user, try again later."]
    );
    let mut pop3 = setup.pop3s();
    pop3.send(b"USER bob\r\nPASS bob-Pass-42\r\n");
    assert!(pop3.line().unwrap().starts_with("+OK"));
    assert_eq!(pop3.line().unwrap(), "-ERR [IN-USE] Too many sessions for this user, try again later.");
    // Everyone else keeps the default (50).
    let _alice = setup.login(ALICE);
    let mut alice = setup.login(ALICE);
    assert!(alice.command("n", "NOOP").last().unwrap().starts_with("n OK"));
}

// Limits shared by a fleet: two mailgate processes in front of one Dovecot, sharing one
// real redis-server.

/// Redis, Dovecot and mailgate A (`setup.gateway`), then mailgate B with the same
/// configuration: `[limits]` with `limits` and the shared store (2 s lease TTL).
fn fleet(limits: &str) -> (Redis, Setup, Gateway) {
    let redis = Redis::start();
    let config = format!(
        "[limits]\nstore = \"redis\"\n{limits}\n[limits.redis]\nurl = \"{}\"\nlease_ttl = \"2s\"\ntimeout = \"300ms\"\n",
        redis.url()
    );
    let setup = Setup::start_with("", &config);
    let text = std::fs::read_to_string(&setup.gateway.config_path).unwrap();
    let b = Gateway::start(setup.dir.path(), &text);
    (redis, setup, b)
}

/// A client on `gateway`'s implicit-TLS `listener`, greeting read.
fn connect(setup: &Setup, gateway: &Gateway, listener: &str) -> (Client, String) {
    let mut client = Client::tls(gateway.addr(listener), setup.tls_config());
    let greeting = client.line().unwrap_or_default();
    (client, greeting)
}

/// IMAP LOGIN as bob through `gateway`: the tagged answer, and the client.
fn imap_login(setup: &Setup, gateway: &Gateway, password: &str) -> (String, Client) {
    let (mut client, greeting) = connect(setup, gateway, "imaps");
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let answer = client.command("a", &format!("LOGIN bob {password}")).pop().unwrap();
    (answer, client)
}

const TOO_MANY_SESSIONS: &str = "a NO [LIMIT] Too many sessions for this user, try again later.";

#[test]
fn a_per_user_cap_holds_across_two_instances_and_a_killed_instance_releases_its_leases() {
    let (redis, setup, b) = fleet("max_connections_per_user = 2\n");
    let (ok, _a1) = imap_login(&setup, &setup.gateway, BOB.1);
    assert!(ok.starts_with("a OK"), "{ok}");
    let (mut pop3_b, greeting) = connect(&setup, &b, "pop3s");
    assert!(greeting.starts_with("+OK"));
    pop3_b.send(b"USER bob\r\nPASS bob-Pass-42\r\n");
    assert!(pop3_b.line().unwrap().starts_with("+OK"));
    assert_eq!(pop3_b.line().unwrap(), "+OK Logged in.");
    assert_eq!(redis.integer(&["ZCARD", "mailgate:conn:user:bob"]), 2);

    // The third session is refused on either instance, in either protocol.
    assert_eq!(imap_login(&setup, &b, BOB.1).0, TOO_MANY_SESSIONS);
    let (mut pop3_a, _) = connect(&setup, &setup.gateway, "pop3s");
    pop3_a.send(b"USER bob\r\nPASS bob-Pass-42\r\n");
    assert!(pop3_a.line().unwrap().starts_with("+OK"));
    assert_eq!(pop3_a.line().unwrap(), "-ERR [IN-USE] Too many sessions for this user, try again later.");
    assert_eq!(counter(&setup, "mailgate_limit_rejections_total{kind=\"connections\"}"), 1);
    assert_eq!(
        gateway_metric(&b, "mailgate_limit_rejections_total{kind=\"connections\"}"),
        "mailgate_limit_rejections_total{kind=\"connections\"} 1"
    );

    // A session that ends gives its slot back to the fleet at once.
    pop3_b.send(b"QUIT\r\n");
    assert!(pop3_b.line().unwrap().starts_with("+OK"));
    let (ok, _a2) = retry_login(&setup, &setup.gateway, Duration::from_secs(2));
    assert!(ok.starts_with("a OK"), "{ok}");

    // Mailgate A dies holding both of bob's sessions: its leases still count on B until
    // their TTL (2 s) runs out, then B lets bob in.
    let _ = std::process::Command::new("kill").arg("-KILL").arg(setup.gateway.pid().to_string()).status();
    let killed = std::time::Instant::now();
    assert_eq!(imap_login(&setup, &b, BOB.1).0, TOO_MANY_SESSIONS, "the dead instance's leases still count");
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let (ok, client) = retry_login(&setup, &b, Duration::from_secs(6));
        assert!(ok.starts_with("a OK"), "{ok}");
        sessions.push(client);
    }
    let took = killed.elapsed();
    assert!(took <= Duration::from_millis(3500), "both released after {took:?}, TTL 2 s");
    assert_eq!(redis.integer(&["ZCARD", "mailgate:conn:user:bob"]), 2, "B's two sessions");
    assert_eq!(imap_login(&setup, &b, BOB.1).0, TOO_MANY_SESSIONS);
    eprintln!("a killed instance's leases were released after {took:?} (TTL 2 s)");

    // A graceful stop gives the leases back before the process exits.
    let mut b = b;
    assert!(b.terminate(Duration::from_secs(15)).is_some_and(|status| status.success()));
    assert_eq!(redis.integer(&["ZCARD", "mailgate:conn:user:bob"]), 0);
    assert_eq!(redis.integer(&["EXISTS", "mailgate:conn"]), 0, "no connection lease left either");
}

/// Logs bob in through `gateway`, retrying while the cap refuses, for at most `limit`.
fn retry_login(setup: &Setup, gateway: &Gateway, limit: Duration) -> (String, Client) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let (answer, client) = imap_login(setup, gateway, BOB.1);
        if answer != TOO_MANY_SESSIONS || std::time::Instant::now() >= deadline {
            return (answer, client);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn connection_caps_per_address_and_in_all_hold_across_instances() {
    let (_redis, setup, b) = fleet("max_connections_per_ip = 2\nmax_connections = 3\n");
    let (_one, greeting) = connect(&setup, &setup.gateway, "imaps");
    assert!(greeting.starts_with("* OK"));
    let (_two, greeting) = connect(&setup, &b, "pop3s");
    assert!(greeting.starts_with("+OK"));
    let mut three = Client::plain(b.addr("imap"));
    assert_eq!(three.line().unwrap(), "* BYE [UNAVAILABLE] Too many connections, try again later.");
    assert!(three.closed());
    let mut four = Client::plain(setup.gateway.addr("pop3"));
    assert_eq!(four.line().unwrap(), "-ERR [SYS/TEMP] Too many connections, try again later.");
    let tcp = TcpStream::connect(setup.gateway.addr("pop3s")).unwrap();
    assert!(closed_before_tls(tcp, setup.tls_config()));
}

#[test]
fn failed_logins_lock_a_user_out_across_instances_and_a_repeated_password_does_not_count() {
    let (redis, setup, b) = fleet(
        "auth_base_delay = \"50ms\"\nauth_max_delay = \"100ms\"\nauth_lockout_failures = 3\nauth_window = \"3s\"\n",
    );
    let failed = "a NO [AUTHENTICATIONFAILED] Authentication failed.";
    assert_eq!(imap_login(&setup, &setup.gateway, "wrong-1").0, failed);
    assert_eq!(imap_login(&setup, &setup.gateway, "wrong-1").0, failed, "a repeat");
    assert_eq!(imap_login(&setup, &b, "wrong-2").0, failed);
    assert_eq!(redis.command(&["GET", "mailgate:authfail:user:127.0.0.1:bob"]), "2");
    assert_eq!(imap_login(&setup, &setup.gateway, "wrong-3").0, failed);
    let last_failure = std::time::Instant::now();
    // Three distinct failures, on two instances: locked out on both, even with the right
    // password.
    assert_eq!(imap_login(&setup, &b, BOB.1).0, "a NO [LIMIT] Too many failed logins, try again later.");
    assert_eq!(imap_login(&setup, &setup.gateway, BOB.1).0, "a NO [LIMIT] Too many failed logins, try again later.");
    // Another user at the same address is not locked out.
    let (mut alice, greeting) = connect(&setup, &b, "imaps");
    assert!(greeting.starts_with("* OK"));
    alice.login(ALICE);
    assert!(!setup.gateway.log().contains("wrong-1") && !b.log().contains("wrong-2"), "no password in a log");
    // The window (3 s after the last failure) ends the lockout on every instance.
    std::thread::sleep(Duration::from_millis(3300).saturating_sub(last_failure.elapsed()));
    assert!(imap_login(&setup, &b, BOB.1).0.starts_with("a OK"));
    assert_eq!(redis.command(&["EXISTS", "mailgate:authfail:user:127.0.0.1:bob"]), ":0", "a success clears it");
}

#[test]
fn the_login_rate_per_address_is_shared_by_the_fleet() {
    let (_redis, setup, b) = fleet("logins_per_ip_per_minute = 4\n");
    for gateway in [&setup.gateway, &b, &setup.gateway, &b] {
        assert!(imap_login(&setup, gateway, BOB.1).0.starts_with("a OK"));
    }
    assert_eq!(imap_login(&setup, &b, BOB.1).0, "a NO [LIMIT] Too many logins from your address, slow down.");
    assert_eq!(
        imap_login(&setup, &setup.gateway, BOB.1).0,
        "a NO [LIMIT] Too many logins from your address, slow down."
    );
}

#[test]
fn a_download_quota_counts_the_whole_fleet_and_rolls_over() {
    let (_redis, setup, b) =
        fleet("download_quota = \"400KiB\"\ndownload_quota_window = \"5s\"\ndownload_quota_action = \"reject\"\n");
    let message = append_large_message(&setup);
    let (ok, mut imap_a) = imap_login(&setup, &setup.gateway, BOB.1);
    assert!(ok.starts_with("a OK"));
    imap_a.command("s", "SELECT INBOX");
    let window = std::time::Instant::now();
    fetch_last(&mut imap_a, "f", &message);
    let (mut pop3_b, _) = connect(&setup, &b, "pop3s");
    pop3_b.send(b"USER bob\r\nPASS bob-Pass-42\r\n");
    assert!(pop3_b.line().unwrap().starts_with("+OK"));
    assert!(pop3_b.line().unwrap().starts_with("+OK"));
    // 256 KiB on each instance: neither is over 400 KiB alone.
    assert_eq!(retr_last(&mut pop3_b).0, message);
    // Each instance adds its bytes to the fleet's count about once a second.
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(imap_a.command("g", "FETCH * BODY.PEEK[]"), ["g NO [LIMIT] Download quota used up, try again later."]);
    pop3_b.send(b"RETR 1\r\n");
    assert_eq!(pop3_b.line().unwrap(), "-ERR [SYS/TEMP] Download quota used up, try again later.");
    // The window (5 s from the counter's first bytes, which reach Redis within a second)
    // rolls over for the whole fleet; each instance reads the total back every second.
    std::thread::sleep(Duration::from_millis(5000).saturating_sub(window.elapsed()));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while imap_a.command("p", "FETCH * BODY.PEEK[]<0.10>").last().unwrap().starts_with("p NO [LIMIT]") {
        assert!(std::time::Instant::now() < deadline, "the window never rolled over");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(window.elapsed() >= Duration::from_secs(5), "{:?}", window.elapsed());
    fetch_last(&mut imap_a, "i", &message);
    assert_eq!(retr_last(&mut pop3_b).0, message);
}

#[test]
fn redis_unreachable_fails_open_or_closed_as_configured_and_recovers() {
    let (mut redis, setup, _) = fleet("max_connections_per_user = 1\n");
    let open = &setup.gateway;
    let text = std::fs::read_to_string(&open.config_path).unwrap();
    let closed = Gateway::start(setup.dir.path(), &format!("{text}on_error = \"closed\"\n"));
    redis.stop();

    // Open: the limits are blind, mail flows (two sessions over a cap of one).
    let (ok, _first) = imap_login(&setup, open, BOB.1);
    assert!(ok.starts_with("a OK"), "{ok}");
    let (ok, _second) = imap_login(&setup, open, BOB.1);
    assert!(ok.starts_with("a OK"), "{ok}");
    assert!(counter(&setup, "mailgate_limit_store_errors_total{operation=\"connect\",outcome=\"allowed\"}") >= 2);
    assert!(open.wait_for_log("shared limits unavailable", Duration::from_secs(5)));

    // Closed: clients are told to come back later, in both protocols (in clear text on
    // the STARTTLS ports; implicit-TLS ports close before any handshake).
    let mut imap = Client::plain(closed.addr("imap"));
    assert_eq!(imap.line().unwrap(), "* BYE [UNAVAILABLE] Service temporarily unavailable, try again later.");
    let mut pop3 = Client::plain(closed.addr("pop3"));
    assert_eq!(pop3.line().unwrap(), "-ERR [SYS/TEMP] Service temporarily unavailable, try again later.");
    for listener in ["imaps", "pop3s"] {
        let tcp = TcpStream::connect(closed.addr(listener)).unwrap();
        assert!(closed_before_tls(tcp, setup.tls_config()), "{listener}");
    }
    assert_eq!(
        gateway_metric(&closed, "mailgate_limit_store_errors_total{operation=\"connect\",outcome=\"refused\"}"),
        "mailgate_limit_store_errors_total{operation=\"connect\",outcome=\"refused\"} 4"
    );

    // Not ready while it refuses everyone; the open instance stays ready.
    assert!(http_get(&closed, "/readyz").starts_with("HTTP/1.1 503"), "{}", http_get(&closed, "/readyz"));
    assert!(http_get(open, "/readyz").starts_with("HTTP/1.1 200"));

    // Redis back: the closed instance serves again ...
    redis.run();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while closed_before_tls(TcpStream::connect(closed.addr("imaps")).unwrap(), setup.tls_config()) {
        assert!(std::time::Instant::now() < deadline, "{}", closed.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(http_get(&closed, "/readyz").starts_with("HTTP/1.1 200"));
    // ... and the two sessions let in blind are counted as soon as the open instance's
    // refresh reaches Redis, so the cap of one holds against them.
    while redis.integer(&["ZCARD", "mailgate:conn:user:bob"]) < 2 {
        assert!(std::time::Instant::now() < deadline, "the blind sessions were never counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(imap_login(&setup, &closed, BOB.1).0, TOO_MANY_SESSIONS);
    drop((_first, _second));
    let (answer, _third) = retry_login(&setup, &closed, Duration::from_secs(5));
    assert!(answer.starts_with("a OK"), "{answer}: {}", closed.log());
}

/// The whole answer of the admin listener to `GET path`.
fn http_get(gateway: &Gateway, path: &str) -> String {
    gateway.admin_get(path)
}

// One canonical identity, and a lockout that counts every attempt (issue 12, defects 2-4, 7).

/// `LOGIN user password` on a fresh implicit-TLS session: the tagged answer.
fn login_as(setup: &Setup, gateway: &Gateway, user: &str, password: &str) -> (String, Client) {
    let (mut client, greeting) = connect(setup, gateway, "imaps");
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let answer = client.command("a", &format!("LOGIN {user} {password}")).pop().unwrap();
    (answer, client)
}

const LOCKED_OUT: &str = "a NO [LIMIT] Too many failed logins, try again later.";

#[test]
fn another_spelling_of_a_name_is_the_same_user_for_the_lockout_the_caps_and_the_top_accounts() {
    let setup = Setup::start_with(
        "",
        "[limits]\nauth_base_delay = \"10ms\"\nauth_max_delay = \"20ms\"\nauth_lockout_failures = 3\nmax_connections_per_user_ip = 2\n",
    );
    let gateway = &setup.gateway;
    // Dovecot folds the case of user names: `BOB` logs into bob's mailbox.
    let (answer, upper) = login_as(&setup, gateway, "BOB", BOB.1);
    assert!(answer.starts_with("a OK"), "{answer}");
    let (answer, lower) = login_as(&setup, gateway, "bob", BOB.1);
    assert!(answer.starts_with("a OK"), "{answer}");
    assert_eq!(login_as(&setup, gateway, "Bob", BOB.1).0, TOO_MANY_SESSIONS, "a third session, however spelt");
    drop((upper, lower));

    // Failures under three spellings lock out a fourth. (The two sessions just closed are
    // released when mailgate sees them close: until then the cap still refuses, before any
    // password is checked.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for (user, guess) in [("bob", "wrong-1"), ("BOB", "wrong-2"), ("bOb", "wrong-3")] {
        let answer = loop {
            let (answer, _) = login_as(&setup, gateway, user, guess);
            if answer != TOO_MANY_SESSIONS || std::time::Instant::now() >= deadline {
                break answer;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(answer.contains("AUTHENTICATIONFAILED"), "{answer}");
    }
    assert_eq!(login_as(&setup, gateway, "Bob", BOB.1).0, LOCKED_OUT);
    assert_eq!(login_as(&setup, gateway, "bob", BOB.1).0, LOCKED_OUT);

    // The top accounts know one bob.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let top = loop {
        let top = http_get(gateway, "/debug/top-accounts");
        if top.contains("\"bob\"") || std::time::Instant::now() >= deadline {
            break top;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(top.contains("\"bob\"") && !top.contains("BOB"), "{top}");
}

#[test]
fn a_password_tried_on_decoy_names_first_still_counts_towards_the_lockout() {
    let setup = Setup::start_with(
        "",
        "[limits]\nauth_base_delay = \"10ms\"\nauth_max_delay = \"20ms\"\nauth_lockout_failures = 3\n",
    );
    for i in 0..3 {
        let guess = format!("guess-{i}");
        assert!(login_as(&setup, &setup.gateway, &format!("decoy{i}"), &guess).0.contains("AUTHENTICATIONFAILED"));
        assert!(login_as(&setup, &setup.gateway, "bob", &guess).0.contains("AUTHENTICATIONFAILED"));
    }
    assert_eq!(login_as(&setup, &setup.gateway, "bob", BOB.1).0, LOCKED_OUT);
}

/// `n` sessions from this address send `LOGIN bob wrong-i` at the same moment (across
/// `gateways`, round robin): their answers.
fn concurrent_guesses(setup: &Setup, gateways: &[&Gateway], n: usize) -> Vec<String> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (addr, config, barrier) =
                (gateways[i % gateways.len()].addr("imaps"), setup.tls_config(), barrier.clone());
            std::thread::spawn(move || {
                let mut client = Client::tls(addr, config);
                let greeting = client.line().unwrap_or_default();
                barrier.wait();
                assert!(greeting.starts_with("* OK"), "{greeting}");
                client.command("a", &format!("LOGIN bob wrong-{i}")).pop().unwrap()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// How many of `answers` came from the upstream (a wrong password) and from the lockout.
fn tally(answers: &[String]) -> (usize, usize) {
    let failed = answers.iter().filter(|a| a.contains("AUTHENTICATIONFAILED")).count();
    let locked = answers.iter().filter(|a| *a == LOCKED_OUT).count();
    assert_eq!(failed + locked, answers.len(), "{answers:?}");
    (failed, locked)
}

#[test]
fn concurrent_wrong_passwords_reach_the_upstream_no_more_often_than_the_lockout_allows() {
    let setup = Setup::start_with(
        "",
        "[limits]\nauth_base_delay = \"10ms\"\nauth_max_delay = \"20ms\"\nauth_lockout_failures = 10\n",
    );
    let (failed, locked) = tally(&concurrent_guesses(&setup, &[&setup.gateway], 30));
    assert_eq!((failed, locked), (10, 20));
    assert_eq!(login_as(&setup, &setup.gateway, "bob", BOB.1).0, LOCKED_OUT);
}

#[test]
fn concurrent_wrong_passwords_on_two_instances_reach_the_upstream_no_more_often_than_the_lockout_allows() {
    let (_redis, setup, b) = fleet(
        "auth_base_delay = \"10ms\"\nauth_max_delay = \"20ms\"\nauth_lockout_failures = 10\nauth_window = \"60s\"\n",
    );
    let (failed, locked) = tally(&concurrent_guesses(&setup, &[&setup.gateway, &b], 30));
    assert_eq!((failed, locked), (10, 20));
    assert_eq!(login_as(&setup, &b, "bob", BOB.1).0, LOCKED_OUT);
    assert_eq!(login_as(&setup, &setup.gateway, "bob", BOB.1).0, LOCKED_OUT);
}

#[test]
fn credentials_longer_than_an_upstream_takes_are_a_failed_login_not_an_upstream_error() {
    let setup = Setup::start_with(
        "",
        "[limits]\nauth_base_delay = \"10ms\"\nauth_max_delay = \"20ms\"\nauth_lockout_failures = 2\n",
    );
    let (user, password) = ("u".repeat(4000), "p".repeat(4000));
    let too_long = "a NO [AUTHENTICATIONFAILED] User name or password too long.";
    for password in [password.as_str(), "wrong-2"] {
        let mut client = setup.imaps();
        let answer =
            client.command("a", &format!("LOGIN {{{}+}}\r\n{user} {{{}+}}\r\n{password}", user.len(), password.len()));
        assert_eq!(answer.last().unwrap(), too_long);
        assert_eq!(client.command("b", "NOOP").pop().unwrap(), "b OK NOOP completed.", "the session goes on");
    }
    // POP3 AUTH PLAIN likewise.
    let mut pop3 = setup.pop3s();
    let plain = base64_plain(&format!("\0bob\0{}", "p".repeat(2000)));
    pop3.send(b"AUTH PLAIN\r\n");
    assert_eq!(pop3.line().unwrap(), "+ ");
    pop3.send(format!("{plain}\r\n").as_bytes());
    assert_eq!(pop3.line().unwrap(), "-ERR [AUTH] User name or password too long.");
    // They count as failed logins of that name (two: locked out), never as an upstream error.
    let mut client = setup.imaps();
    let answer = client.command("a", &format!("LOGIN {{{}+}}\r\n{user} right", user.len()));
    assert_eq!(answer.last().unwrap(), LOCKED_OUT);
    let metrics = http_get(&setup.gateway, "/metrics");
    let errors: Vec<&str> = metrics.lines().filter(|l| l.starts_with("mailgate_upstream_errors_total{")).collect();
    assert!(!errors.is_empty() && errors.iter().all(|l| l.ends_with(" 0")), "{errors:?}");
    let log = setup.gateway.log();
    assert!(!log.lines().any(|l| l.contains("WARN") && l.contains("upstream")), "{log}");
    assert!(!log.contains(&password), "a password in the log");
}

fn base64_plain(raw: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(raw)
}
