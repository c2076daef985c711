//! The authenticated relay against a real Dovecot: literals in both directions and their
//! limits, IDLE, the idle timeout, disconnects, and graceful shutdown.

mod support;

use std::time::{Duration, Instant};

use support::setup::*;

fn message(subject: &str, body_len: usize) -> Vec<u8> {
    let mut m = format!("From: a@example.org\r\nTo: b@example.org\r\nSubject: {subject}\r\n\r\n").into_bytes();
    while m.len() < body_len {
        m.extend_from_slice(b"Line of the body, 8-bit \xc3\xa4\xc3\xb6 text.\r\n");
    }
    m
}

#[test]
fn append_with_a_synchronizing_literal_waits_for_the_upstream_continuation() {
    let setup = Setup::start();
    let mut client = setup.login(BOB);
    let msg = message("sync literal", 300_000);
    client.send(format!("a APPEND INBOX {{{}}}\r\n", msg.len()).as_bytes());
    let cont = client.line().unwrap();
    assert!(cont.starts_with("+ "), "{cont}");
    client.send(&msg);
    client.send(b"\r\n");
    let lines = client.until_tagged("a");
    assert!(lines.last().unwrap().starts_with("a OK"), "{lines:?}");
    client.command("b", "SELECT INBOX");
    client.send(b"c FETCH 1 BODY.PEEK[]\r\n");
    let header = client.line().unwrap();
    assert!(header.ends_with(&format!("{{{}}}", msg.len())), "{header}");
    assert_eq!(client.bytes(msg.len()), msg);
    let lines = client.until_tagged("c");
    assert_eq!(lines[0], ")");
    assert!(lines[1].starts_with("c OK Fetch completed"), "{lines:?}");
}

#[test]
fn a_literal_refused_by_the_upstream_is_not_read_as_data() {
    let setup = Setup::start();
    let mut client = setup.login(BOB);
    // Dovecot refuses an APPEND to a missing mailbox before sending its continuation: the
    // client never sends the literal, so the next line must be read as a command.
    client.send(b"a APPEND NoSuchBox {5}\r\n");
    let refused = client.line().unwrap();
    assert!(refused.starts_with("a NO [TRYCREATE]"), "{refused}");
    let lines = client.command("b", "NOOP");
    assert!(lines[0].starts_with("b OK NOOP completed"), "{lines:?}");
}

#[test]
fn a_literal_sent_before_the_continuation_cannot_smuggle_commands_past_mailgate() {
    let setup = Setup::start();
    let mut client = setup.login(BOB);
    // The client does not wait for `+`. Dovecot refuses the APPEND without one, so what
    // follows is commands, and mailgate must see them as such: the APPEND hidden in the
    // "literal" is over mailgate's cap and gets mailgate's own refusal, not Dovecot's.
    let hidden = b"z2 APPEND INBOX {999999999}\r\n";
    let mut burst = format!("a APPEND NoSuchBox {{{}}}\r\n", hidden.len()).into_bytes();
    burst.extend_from_slice(hidden);
    client.send(&burst);
    let refused = client.line().unwrap();
    assert!(refused.starts_with("a NO [TRYCREATE]"), "{refused}");
    assert_eq!(client.line().unwrap(), "z2 NO [TOOBIG] Message too large.");
    let lines = client.command("b", "NOOP");
    assert!(lines[0].starts_with("b OK NOOP completed"), "{lines:?}");
}

#[test]
fn literals_over_the_limit_are_refused_before_the_upstream_sees_them() {
    let setup = Setup::start_with("max_literal_bytes = \"1MiB\"", "");
    let mut client = setup.login(BOB);
    client.send(b"a APPEND INBOX {2000000}\r\n");
    assert_eq!(client.line().unwrap(), "a BAD [TOOBIG] Literal too large.");
    assert!(client.command("b", "NOOP")[0].starts_with("b OK NOOP completed"));
    // A non-synchronizing literal is already on its way: the session has to end.
    client.send(b"c APPEND INBOX {2000000+}\r\n");
    let rest = client.rest();
    assert_eq!(rest, ["* BYE Literal too large."]);
    let log = setup.dovecot.log();
    assert!(!log.contains("2000000"), "upstream saw the literal: {log}");
}

#[test]
fn idle_receives_exists_from_another_session() {
    let setup = Setup::start();
    let mut idler = setup.login(BOB);
    let lines = idler.command("a", "SELECT INBOX");
    let exists: usize = lines.iter().find_map(|l| l.strip_suffix(" EXISTS")?.strip_prefix("* ")?.parse().ok()).unwrap();
    idler.send(b"b IDLE\r\n");
    assert!(idler.line().unwrap().starts_with("+ "));
    let mut other = setup.login(BOB);
    let msg = message("wake up", 2000);
    other.send(format!("x APPEND INBOX {{{}+}}\r\n", msg.len()).as_bytes());
    other.send(&msg);
    other.send(b"\r\n");
    assert!(other.until_tagged("x").last().unwrap().starts_with("x OK"));
    let line = idler.line().unwrap();
    assert_eq!(line, format!("* {} EXISTS", exists + 1));
    // DONE and the next command in one write: the command is relayed and answered.
    idler.send(b"DONE\r\nc NOOP\r\n");
    let lines = idler.until_tagged("b");
    assert!(lines.last().unwrap().starts_with("b OK"), "{lines:?}");
    let lines = idler.until_tagged("c");
    assert!(lines.last().unwrap().starts_with("c OK"), "{lines:?}");
}

#[test]
fn idle_timeout_logs_out_an_inactive_client_even_in_idle() {
    let setup = Setup::start_with("idle_timeout = \"2s\"", "");
    let mut client = setup.login(BOB);
    client.command("a", "SELECT INBOX");
    client.send(b"b IDLE\r\n");
    assert!(client.line().unwrap().starts_with("+ "));
    let started = Instant::now();
    let rest = client.rest();
    assert!(rest.contains(&"* BYE Autologout; idle for too long.".to_string()), "{rest:?}");
    assert!(started.elapsed() >= Duration::from_millis(1500), "{:?}", started.elapsed());
}

#[test]
fn client_disconnect_closes_the_upstream_session() {
    let setup = Setup::start();
    let mut client = setup.login(BOB);
    client.command("a", "SELECT INBOX");
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !setup.dovecot.log().contains("imap(bob)") || !setup.dovecot.log().contains("Disconnected") {
        assert!(Instant::now() < deadline, "upstream session still open:\n{}", setup.dovecot.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn large_fetch_is_relayed_byte_for_byte() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 30, 11);
    let mut via = setup.login(BOB);
    let mut direct = setup.direct(BOB);
    for c in [&mut via, &mut direct] {
        c.command("s", "SELECT INBOX");
        c.send(b"f UID FETCH 1:* (UID RFC822.SIZE BODY.PEEK[] BODYSTRUCTURE)\r\n");
    }
    let read_all = |c: &mut support::client::Client| {
        let mut out = Vec::new();
        loop {
            let line = c.line().unwrap();
            out.extend_from_slice(line.as_bytes());
            if let Some(n) =
                line.strip_suffix('}').and_then(|l| l.rsplit_once('{')).and_then(|(_, n)| n.parse::<usize>().ok())
            {
                out.extend_from_slice(&c.bytes(n));
            }
            if line.starts_with("f ") {
                // Dovecot's completion text carries timings; the status is what must match.
                out.truncate(out.len() - line.len());
                assert!(line.starts_with("f OK"), "{line}");
                return out;
            }
        }
    };
    let a = read_all(&mut via);
    let b = read_all(&mut direct);
    assert!(a.len() > 100_000, "{}", a.len());
    assert!(a == b, "responses differ ({} vs {} bytes)", a.len(), b.len());
}

#[test]
fn sigterm_says_bye_to_idle_sessions_and_lets_busy_ones_finish() {
    let mut setup = Setup::start();
    let mut idle = setup.login(BOB);
    idle.command("a", "SELECT INBOX");
    let mut idling = setup.login(BOB);
    idling.command("a", "SELECT INBOX");
    idling.send(b"b IDLE\r\n");
    assert!(idling.line().unwrap().starts_with("+ "));
    let mut busy = setup.login(BOB);
    let msg = message("in flight", 50_000);
    busy.send(format!("c APPEND INBOX {{{}}}\r\n", msg.len()).as_bytes());
    assert!(busy.line().unwrap().starts_with("+ "));
    busy.send(&msg[..10_000]);

    let started = Instant::now();
    let _ = std::process::Command::new("kill").arg("-TERM").arg(setup.gateway.pid().to_string()).status();
    assert_eq!(idle.rest(), ["* BYE Server shutting down."]);
    assert_eq!(idling.rest(), ["* BYE Server shutting down."]);
    // The busy session finishes its APPEND, then gets BYE.
    std::thread::sleep(Duration::from_millis(300));
    busy.send(&msg[10_000..]);
    busy.send(b"\r\n");
    let lines = busy.until_tagged("c");
    assert!(lines.last().unwrap().starts_with("c OK"), "{lines:?}");
    assert_eq!(busy.rest(), ["* BYE Server shutting down."]);
    let status = setup.gateway.terminate(Duration::from_secs(15)).expect("mailgate did not exit");
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

#[test]
fn pipelining_beyond_the_in_flight_cap_is_slowed_not_refused() {
    let setup = Setup::start();
    let mut client = setup.login(BOB);
    let mut batch = Vec::new();
    for i in 0..2500 {
        batch.extend_from_slice(format!("t{i} NOOP\r\n").as_bytes());
    }
    client.send(&batch);
    for i in 0..2500 {
        let lines = client.until_tagged(&format!("t{i}"));
        assert!(lines.last().unwrap().starts_with(&format!("t{i} OK")), "{lines:?}");
    }
}

/// A normal LOGOUT ends the session as a logout in the log, every time: not as whichever
/// of "client closed" and "upstream closed" happened to be seen first.
#[test]
fn logout_is_logged_as_a_logout_every_time() {
    let setup = Setup::start();
    const SESSIONS: usize = 12;
    for i in 0..SESSIONS {
        let mut client = setup.login(BOB);
        if i % 2 == 1 {
            // Pipelined behind a command, as clients do when they are done.
            client.send(b"n NOOP\r\n");
        }
        client.send(b"z LOGOUT\r\n");
        let lines = client.until_tagged("z");
        assert!(lines.iter().any(|l| l.starts_with("* BYE")), "{lines:?}");
        assert!(lines.last().unwrap().starts_with("z OK"), "{lines:?}");
        assert!(client.rest().is_empty());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let ended = loop {
        let log = setup.gateway.log();
        let ended: Vec<String> = log.lines().filter(|l| l.contains("session ended")).map(str::to_string).collect();
        if ended.len() >= SESSIONS || Instant::now() > deadline {
            break ended;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(ended.len(), SESSIONS, "{ended:#?}");
    for line in &ended {
        assert!(line.contains("reason=Logout"), "{line}");
    }
}

/// The capabilities in LOGIN's tagged `OK [CAPABILITY ...]` are exactly what `CAPABILITY`
/// answers through mailgate afterwards (RFC 9051 §7.1: a client may take either).
#[test]
fn capabilities_after_login_equal_those_capability_answers() {
    let setup = Setup::start();
    for login in ["a LOGIN bob bob-Pass-42", "a AUTHENTICATE PLAIN AGJvYgBib2ItUGFzcy00Mg=="] {
        let mut client = setup.imaps();
        let lines = client.command("a", login.strip_prefix("a ").unwrap());
        let ok = lines.last().unwrap();
        let in_ok = ok
            .strip_prefix("a OK [CAPABILITY ")
            .and_then(|rest| rest.split_once(']'))
            .unwrap_or_else(|| panic!("{ok}"))
            .0
            .to_string();
        let caps = client.command("b", "CAPABILITY");
        let listed = caps[0].strip_prefix("* CAPABILITY ").unwrap_or_else(|| panic!("{caps:?}"));
        assert_eq!(in_ok, listed, "{login}: tagged OK vs CAPABILITY");
        assert!(listed.split(' ').any(|c| c == "SASL-IR"), "Dovecot lists SASL-IR after login: {listed}");
    }
}

/// An upstream offering COMPRESS=DEFLATE (RFC 4978): relayed, the client's COMPRESS would
/// turn the upstream's answers into a DEFLATE stream the relay cannot frame. With
/// `compress = false` mailgate neither offers nor accepts it (a NO, which the RFC allows),
/// and the session goes on; with it on (the default), tests/imap_compress.rs.
#[test]
fn compress_off_is_refused_and_the_session_goes_on() {
    use support::dovecot::{Dovecot, Options};
    let dovecot = Dovecot::start_with(&[ALICE, BOB], &Options { compress: true, ..Options::default() });
    let setup = Setup::in_front_of(dovecot, "compress = false", "");
    let mut direct = setup.direct(BOB);
    let caps = direct.command("c", "CAPABILITY");
    assert!(caps[0].contains("COMPRESS=DEFLATE"), "the upstream offers it: {caps:?}");

    let mut client = setup.login(BOB);
    // Not offered: the upstream's list without it, nothing else changed.
    let through = client.command("c", "CAPABILITY");
    assert_eq!(through[0], caps[0].replace(" COMPRESS=DEFLATE", ""), "{through:?}");
    let answer = client.command("z", "COMPRESS DEFLATE");
    assert_eq!(answer, ["z NO [CANNOT] COMPRESS is not available through this gateway."]);
    let select = client.command("s", "SELECT INBOX");
    assert!(select.last().unwrap().starts_with("s OK"), "{select:?}");
    assert!(client.command("n", "NOOP").pop().unwrap().starts_with("n OK NOOP completed"));
}
