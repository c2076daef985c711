//! POP3 through the cache has the upstream's answers and the upstream's effects: a RETR from
//! memory still marks the message `\Seen` as a direct RETR does, only the upstream's answers
//! change what the session knows is deleted, odd spellings are the upstream's to judge, and
//! a maildrop numbered again is never served stale. Each case replayed against Dovecot.

mod support;

use support::client::Client;
use support::pop3::{quit, response, response_of};
use support::setup::*;

/// `command` (multi-line when `multi`) through mailgate and directly: byte for byte equal.
fn same(via: &mut Client, direct: &mut Client, command: &str, multi: bool) {
    via.send(format!("{command}\r\n").as_bytes());
    direct.send(format!("{command}\r\n").as_bytes());
    let (got, want) = (response_of(via, multi), response_of(direct, multi));
    assert!(
        got == want,
        "`{command:?}` through mailgate:\n{}\ndirect:\n{}",
        String::from_utf8_lossy(&got[..got.len().min(300)]),
        String::from_utf8_lossy(&want[..want.len().min(300)])
    );
}

/// `UID FETCH 1:* FLAGS` of the user's INBOX, straight from Dovecot, `\Recent` aside.
fn flags(setup: &Setup, user: (&str, &str)) -> Vec<String> {
    let mut imap = setup.direct(user);
    imap.command("s", "EXAMINE INBOX");
    let lines = imap.command("f", "UID FETCH 1:* (FLAGS)");
    lines
        .into_iter()
        .filter(|l| l.starts_with("* "))
        .map(|l| l.replace("\\Recent", "").replace("( ", "(").replace(" )", ")"))
        .collect()
}

/// Every message RETRieved once through mailgate (and a TOP), then the session reset (RSET clears
/// Dovecot's \Seen marks too): the cache holds them, the maildrop is as it was.
fn warm_up(setup: &Setup, user: (&str, &str), count: usize) {
    let mut via = setup.pop3_login(user);
    for n in 1..=count {
        via.send(format!("RETR {n}\r\n").as_bytes());
        assert!(response(&mut via).starts_with(b"+OK"));
    }
    // And one TOP: a TOP from the cache says what the upstream's own TOP says.
    via.send(b"TOP 1 0\r\n");
    assert!(response(&mut via).starts_with(b"+OK"));
    via.send(b"RSET\r\n");
    assert!(via.line().unwrap().starts_with("+OK"));
    quit(via);
}

#[test]
fn a_retr_from_the_cache_marks_the_message_seen_like_a_direct_retr() {
    let setup = twins(40, 12);
    assert_eq!(flags(&setup, ALICE), flags(&setup, BOB), "the warm-up left no trace");
    let unseen_before = flags(&setup, BOB).iter().filter(|l| !l.contains("\\Seen")).count();
    assert!(unseen_before >= 6, "{:?}", flags(&setup, BOB));

    // A session that retrieves, another that retrieves then resets, one that retrieves and
    // drops the connection without QUIT (Dovecot still records \Seen then), and TOP (which
    // sets nothing).
    let scripts: [(&[&str], bool); 4] = [
        (&["RETR 1", "RETR 2", "RETR 3", "TOP 4 2"], true),
        (&["RETR 5", "RETR 6", "RSET", "RETR 7"], true),
        (&["RETR 8", "RETR 9"], false),
        (&["TOP 10 0", "TOP 11 5", "LIST 12"], true),
    ];
    for (script, quits) in scripts {
        let mut via = setup.pop3_login(BOB);
        let mut direct = setup.pop3_direct(ALICE);
        for command in script {
            let multi = command.starts_with("RETR") || command.starts_with("TOP");
            same(&mut via, &mut direct, command, multi);
        }
        if quits {
            quit(via);
            quit(direct);
        } else {
            drop(via);
            drop(direct);
            // Dovecot records the flags when it notices the disconnect, which through
            // mailgate is one hop later (and on a loaded machine, later still): wait for it,
            // boundedly.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while flags(&setup, BOB) != flags(&setup, ALICE) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        assert_eq!(flags(&setup, BOB), flags(&setup, ALICE), "after {script:?}");
    }
    let seen_after = flags(&setup, BOB).iter().filter(|l| !l.contains("\\Seen")).count();
    assert!(seen_after < unseen_before, "the scripts set \\Seen somewhere");
    let log = setup.gateway.log();
    assert!(log.contains("cache_hits=4"), "the first script came from the cache: {log}");
}

/// Dovecot locks a maildrop per POP3 session: the comparisons run on twins, Bob through
/// mailgate (his cache warmed up) and Alice straight to Dovecot, with the same messages.
fn twins(seed: u64, count: usize) -> Setup {
    let setup = Setup::start();
    setup.dovecot.fill(ALICE.0, count, seed);
    setup.dovecot.fill(BOB.0, count, seed);
    warm_up(&setup, BOB, count);
    setup
}

#[test]
fn only_the_upstreams_answers_change_what_is_deleted() {
    let setup = twins(41, 6);
    let mut via = setup.pop3_login(BOB);
    let mut direct = setup.pop3_direct(ALICE);
    for (command, multi) in [
        ("DELE 2", false),
        ("DELE 2", false), // -ERR Message is deleted.
        ("RETR 2", true),  // still deleted: -ERR
        ("TOP 2 1", true),
        ("DELE 9", false), // no such message
        ("RETR 3", true),
        ("RSET", false),
        ("RETR 2", true), // undeleted by the upstream's +OK to RSET
        ("DELE +3", false),
        ("RETR 3", true),
    ] {
        same(&mut via, &mut direct, command, multi);
    }
    // Neither session quits: nothing is deleted.
    drop(via);
    drop(direct);
}

#[test]
fn odd_spellings_are_the_upstreams_to_judge() {
    let setup = twins(42, 4);
    let mut via = setup.pop3_login(BOB);
    let mut direct = setup.pop3_direct(ALICE);
    for command in ["RETR +1", "RETR 1 ", "RETR  1", "RETR 01", "TOP 1 0 junk", "TOP 01 1", "TOP 1 +1", "RETR 0"] {
        same(&mut via, &mut direct, command, true);
    }
    same(&mut via, &mut direct, "retr 2", true);
    same(&mut via, &mut direct, "top 2 1", true);
    drop(via);
    drop(direct);
}

#[test]
fn a_maildrop_numbered_again_is_not_served_stale() {
    let setup = twins(43, 8);
    // Restored from elsewhere: UIDs (and so, with `%08Xu`, UIDLs) start again at 1.
    for user in [ALICE, BOB] {
        setup.dovecot.rebuild_keeping_uid_validity(user.0, 8, 44);
    }
    let mut via = setup.pop3_login(BOB);
    let mut direct = setup.pop3_direct(ALICE);
    same(&mut via, &mut direct, "UIDL", true);
    for n in 1..=8 {
        same(&mut via, &mut direct, &format!("RETR {n}"), true);
        same(&mut via, &mut direct, &format!("TOP {n} 1"), true);
    }
    drop(via);
    drop(direct);
}
