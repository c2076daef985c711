//! The POP3 TRANSACTION state relayed against a real Dovecot: every command's response
//! byte-identical to a direct session, pipelining, deletion semantics, idle timeout and
//! shutdown.

mod support;

use std::time::Duration;

use support::client::Client;
use support::setup::*;

/// One complete response: the status line and, for `body`, everything through the `.` line.
fn response(client: &mut Client, body: bool) -> Vec<u8> {
    let status = client.line().expect("status line");
    let mut out = format!("{status}\r\n").into_bytes();
    if body && status.starts_with("+OK") {
        loop {
            let line = client.line().expect("body line");
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
            if line == "." {
                break;
            }
        }
    }
    out
}

#[test]
fn every_transaction_command_is_relayed_exactly() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 40, 5);
    let script: &[(&str, bool)] = &[
        ("STAT", false),
        ("LIST", true),
        ("LIST 2", false),
        ("UIDL", true),
        ("UIDL 3", false),
        ("RETR 1", true),
        ("RETR 2", true), // lines starting with '.'
        ("RETR 3", true), // 200 Received: lines
        ("RETR 6", true), // a big message
        ("TOP 4 0", true),
        ("TOP 5 3", true),
        ("RETR 999", true), // -ERR
        ("DELE 7", false),
        ("RETR 7", true), // -ERR: deleted
        ("RSET", false),
        ("NOOP", false),
        ("LIST 7", false),
    ];
    let mut via = setup.pop3_login(BOB);
    let mut transcript_via = Vec::new();
    for (command, body) in script {
        via.send(format!("{command}\r\n").as_bytes());
        transcript_via.push(response(&mut via, *body));
    }
    via.send(b"QUIT\r\n");
    assert!(via.line().unwrap().starts_with("+OK"));
    drop(via);
    std::thread::sleep(Duration::from_millis(300));
    let mut direct = setup.pop3_direct(BOB);
    for (i, (command, body)) in script.iter().enumerate() {
        direct.send(format!("{command}\r\n").as_bytes());
        let expected = response(&mut direct, *body);
        assert!(transcript_via[i] == expected, "{command} differs");
    }
    let big = &transcript_via[8];
    assert!(big.len() > 100_000, "{}", big.len());
}

#[test]
fn pipelined_commands_are_answered_in_order() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 10, 9);
    let mut client = setup.pop3_login(BOB);
    client.send(b"STAT\r\nLIST\r\nRETR 2\r\nUIDL 1\r\nTOP 1 0\r\nNOOP\r\n");
    let answers = [false, true, true, false, true, false].map(|body| response(&mut client, body));
    assert!(answers.iter().all(|a| a.starts_with(b"+OK")));
    assert!(answers[0].starts_with(b"+OK 10 "));
    let listing = String::from_utf8_lossy(&answers[1]);
    assert_eq!(listing.lines().count(), 12, "{listing}"); // status, 10 entries, "."
    assert!(answers[2].ends_with(b"\r\n.\r\n") && answers[2].len() > 500);
    assert!(answers[3].starts_with(b"+OK 1 "));
}

#[test]
fn deletions_happen_only_when_quit_completes() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 5, 3);
    let mut client = setup.pop3_login(BOB);
    client.send(b"DELE 1\r\nDELE 2\r\n");
    assert!(client.line().unwrap().starts_with("+OK"));
    assert!(client.line().unwrap().starts_with("+OK"));
    drop(client); // no QUIT
    std::thread::sleep(Duration::from_millis(500));
    let mut direct = setup.pop3_direct(BOB);
    direct.send(b"STAT\r\n");
    assert!(direct.line().unwrap().starts_with("+OK 5 "), "a cut session deleted mail");
    direct.send(b"QUIT\r\n");
    direct.line();
    drop(direct);
    std::thread::sleep(Duration::from_millis(300));

    let mut client = setup.pop3_login(BOB);
    client.send(b"DELE 1\r\nDELE 2\r\nQUIT\r\n");
    assert!(client.line().unwrap().starts_with("+OK"));
    assert!(client.line().unwrap().starts_with("+OK"));
    assert!(client.line().unwrap().starts_with("+OK"));
    assert!(client.rest().is_empty());
    let mut direct = setup.pop3_direct(BOB);
    direct.send(b"STAT\r\n");
    let stat = direct.line().unwrap();
    assert!(stat.starts_with("+OK 3 "), "{stat}");
}

#[test]
fn command_line_limit_and_idle_timeout() {
    let setup = Setup::start_with("", "[pop3]\nidle_timeout = \"2s\"\n");
    let mut client = setup.pop3_login(BOB);
    client.send(format!("LIST {}\r\n", "1".repeat(300)).as_bytes());
    assert_eq!(client.rest(), ["-ERR Line too long."]);
    let mut client = setup.pop3_login(BOB);
    let started = std::time::Instant::now();
    assert_eq!(client.rest(), ["-ERR Disconnected for inactivity."]);
    assert!(started.elapsed() >= Duration::from_millis(1500));
}

#[test]
fn sigterm_ends_idle_pop3_sessions_without_committing_deletions() {
    let mut setup = Setup::start();
    setup.dovecot.fill(BOB.0, 3, 1);
    let mut client = setup.pop3_login(BOB);
    client.send(b"DELE 1\r\n");
    assert!(client.line().unwrap().starts_with("+OK"));
    let _ = std::process::Command::new("kill").arg("-TERM").arg(setup.gateway.pid().to_string()).status();
    assert_eq!(client.rest(), ["-ERR [SYS/TEMP] Server shutting down."]);
    let status = setup.gateway.terminate(Duration::from_secs(15)).expect("exit");
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(300));
    let mut direct = setup.pop3_direct(BOB);
    direct.send(b"STAT\r\n");
    assert!(direct.line().unwrap().starts_with("+OK 3 "));
}

/// The "session ended" lines of the log, once there are `count` (bounded wait).
fn ended_sessions(setup: &Setup, count: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = setup.gateway.log();
        let ended: Vec<String> = log.lines().filter(|l| l.contains("session ended")).map(str::to_string).collect();
        if ended.len() >= count || std::time::Instant::now() > deadline {
            return ended;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// RFC 1939 §6: the answer to QUIT is the last thing on the connection (a command the client
/// pipelined behind it is not answered, by Dovecot either), and the log calls the end a
/// logout every time, whichever side closed its socket first.
#[test]
fn quit_answer_is_the_last_thing_the_client_reads_and_the_log_says_logout() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 3, 2);
    let scripts: [&[u8]; 3] = [
        b"QUIT\r\n",
        // Message 1 from the cache (after the first round), with mailgate's own RETR upstream.
        b"RETR 1\r\nQUIT\r\n",
        b"QUIT\r\nNOOP\r\nSTAT\r\n",
    ];
    let mut sessions = 0;
    for round in 0..4 {
        for script in scripts {
            let mut client = setup.pop3_login(BOB);
            client.send(script);
            if script.starts_with(b"RETR") {
                assert!(response(&mut client, true).starts_with(b"+OK"));
            }
            let quit = client.line().expect("QUIT answer");
            assert!(quit.starts_with("+OK"), "{quit}");
            let rest = client.rest_bytes();
            assert!(
                rest.is_empty(),
                "round {round}, {:?}: after QUIT's +OK: {:?}",
                String::from_utf8_lossy(script),
                String::from_utf8_lossy(&rest)
            );
            sessions += 1;
        }
    }
    let ended = ended_sessions(&setup, sessions);
    assert_eq!(ended.len(), sessions, "{ended:#?}");
    for line in &ended {
        assert!(line.contains("reason=Logout"), "{line}");
    }
}
