//! Flags remembered and checked with CONDSTORE (RFC 7162): a resync asks the upstream only
//! what changed, and nothing of the modification sequences mailgate turns on for that ever
//! reaches a client that did not ask for them. Each step runs through mailgate (as bob) and
//! straight at Dovecot for a twin account (alice) holding the same mail, and the answers are
//! compared item by item.

mod support;

use support::answers::{answer, Answer};
use support::client::Client;
use support::setup::*;

/// The header resync of a client that does not use CONDSTORE (mbsync, offlineimap, Outlook).
const SYNC: &str = "UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])";

fn same(via: &mut Client, twin: &mut Client, command: &str) -> Answer {
    let got = answer(via, "v", command);
    let want = answer(twin, "d", command);
    assert!(got == want, "`{command}` through mailgate differs from Dovecot's answer:\n{}", got.diff(&want));
    got
}

/// Bytes mailgate has received from upstreams so far.
fn received_upstream(setup: &Setup) -> u64 {
    let metrics = setup.gateway.metrics();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("mailgate_upstream_bytes_total{direction=\"in\",protocol=\"imap\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"))
}

/// Bob through mailgate and his twin alice straight at Dovecot, INBOX selected.
fn pair(setup: &Setup) -> (Client, Client) {
    let mut via = setup.login(BOB);
    let mut twin = setup.direct(ALICE);
    for client in [&mut via, &mut twin] {
        client.command("s", "SELECT INBOX");
    }
    (via, twin)
}

/// Runs `command` straight at Dovecot for both accounts (another client of each).
fn elsewhere(setup: &Setup, commands: &[&str]) {
    for user in [BOB, ALICE] {
        let mut other = setup.direct(user);
        for (i, command) in commands.iter().enumerate() {
            other.command(&format!("o{i}"), command);
        }
        other.command("z", "LOGOUT");
    }
}

/// Both accounts' INBOX: the same messages, opened once by a CONDSTORE client (Dovecot
/// keeps modification sequences for it from then on).
fn twins(setup: &Setup, messages: usize) {
    for user in [BOB, ALICE] {
        setup.dovecot.fill(user.0, messages, 31);
    }
    elsewhere(setup, &["SELECT INBOX (CONDSTORE)"]);
}

#[test]
fn a_resync_asks_only_what_changed_and_answers_as_dovecot_does() {
    let setup = Setup::start();
    twins(&setup, 60);
    // Cold: relayed as it is (mailgate asks MODSEQ besides, and learns every message's flags).
    let (mut via, mut twin) = pair(&setup);
    let before = received_upstream(&setup);
    same(&mut via, &mut twin, SYNC);
    let full = received_upstream(&setup) - before;
    // Unchanged: one CHANGEDSINCE round trip answers nothing but the sizes of a sample of
    // eight messages (the rebuilt-mailbox check), everything comes from memory.
    let (mut via, mut twin) = pair(&setup);
    let before = received_upstream(&setup);
    same(&mut via, &mut twin, SYNC);
    let unchanged = received_upstream(&setup) - before;
    assert!(unchanged < 600, "an unchanged mailbox cost {unchanged} bytes from the upstream (a full resync {full})");
    // Another client flags two messages and a message arrives: only those come upstream.
    elsewhere(&setup, &["SELECT INBOX", "UID STORE 3,7 +FLAGS.SILENT (\\Flagged)"]);
    for user in [BOB, ALICE] {
        setup.dovecot.fill(user.0, 1, 32);
    }
    let (mut via, mut twin) = pair(&setup);
    let before = received_upstream(&setup);
    let answer = same(&mut via, &mut twin, SYNC);
    let changed = received_upstream(&setup) - before;
    assert_eq!(answer.fetch.len(), 61);
    assert!(answer.describe(3).contains("\\Flagged"), "{}", answer.describe(3));
    assert!(changed < full / 4, "a changed mailbox cost {changed} bytes from the upstream (a full resync {full})");
    // And in a session where the client changes flags itself, the next resync sees them.
    same(&mut via, &mut twin, "UID STORE 4 +FLAGS (\\Answered)");
    same(&mut via, &mut twin, SYNC);
}

#[test]
fn what_mailgates_condstore_adds_never_reaches_the_client() {
    let setup = Setup::start();
    twins(&setup, 20);
    let (mut via, mut twin) = pair(&setup);
    same(&mut via, &mut twin, SYNC);
    // This session's resync turns CONDSTORE on upstream; the client never did.
    let (mut via, mut twin) = pair(&setup);
    same(&mut via, &mut twin, SYNC);
    for command in [
        "STORE 5 +FLAGS (\\Answered)",
        "STORE 6 +FLAGS.SILENT (\\Answered)",
        "UID STORE 8 +FLAGS.SILENT (\\Draft)",
        "UID STORE 9 +FLAGS (\\Draft)",
        "FETCH 2 (FLAGS BODY[TEXT])",
        "NOOP",
    ] {
        same(&mut via, &mut twin, command);
    }
    // Another client's change reaches the session as Dovecot reports it, MODSEQ aside.
    elsewhere(&setup, &["SELECT INBOX", "UID STORE 4 +FLAGS.SILENT ($Label1)"]);
    let noop = same(&mut via, &mut twin, "NOOP");
    assert!(noop.describe(4).contains("$Label1"), "{noop:?}");
    // The client's own first CONDSTORE command is answered with the [HIGHESTMODSEQ] Dovecot
    // gives a session's first, which mailgate's took.
    let enabled = same(&mut via, &mut twin, "ENABLE CONDSTORE");
    let announced = enabled.other.iter().any(|line| line.starts_with(b"* OK [HIGHESTMODSEQ "));
    assert!(announced, "{enabled:?}");
    same(&mut via, &mut twin, "UID FETCH 1:* (UID FLAGS) (CHANGEDSINCE 1)");
    same(&mut via, &mut twin, "STORE 5 -FLAGS.SILENT (\\Answered)");
}

/// The `[HIGHESTMODSEQ]` lines of a SELECT's answer.
fn announced(client: &mut Client, mailbox: &str) -> usize {
    let lines = client.command("s", &format!("SELECT {mailbox}"));
    lines.iter().filter(|line| line.starts_with("* OK [HIGHESTMODSEQ ")).count()
}

#[test]
fn a_mailbox_opened_in_a_session_with_mailgates_condstore_keeps_modification_sequences_from_then_on() {
    let setup = Setup::start();
    twins(&setup, 10);
    // A folder no CONDSTORE client ever opened: Dovecot keeps no modification sequences
    // for it, says nothing of them when it is selected, and mailgate asks the full flags.
    elsewhere(&setup, &["CREATE Quiet", "APPEND Quiet {14+}\r\nSubject: x\r\n\r\n"]);
    let (mut via, mut twin) = pair(&setup);
    assert_eq!(announced(&mut via, "Quiet"), 0);
    assert_eq!(announced(&mut twin, "Quiet"), 0);
    // In a session where mailgate turned CONDSTORE on (an INBOX resync), opening the folder
    // makes Dovecot keep them, as after any CONDSTORE client, and say so, to mailgate and
    // to bob's direct sessions alike: the client sees Dovecot's own answer.
    let (mut via, mut twin) = pair(&setup);
    same(&mut via, &mut twin, SYNC);
    let (mut via, mut twin) = pair(&setup);
    same(&mut via, &mut twin, SYNC);
    assert_eq!(announced(&mut via, "Quiet"), 1);
    assert_eq!(announced(&mut twin, "Quiet"), 0);
    let mut bob = setup.direct(BOB);
    assert_eq!(announced(&mut bob, "Quiet"), 1);
    // From then on its resyncs are checked with them too.
    let (mut via, mut twin) = pair(&setup);
    for client in [&mut via, &mut twin] {
        client.command("q", "SELECT Quiet");
    }
    same(&mut via, &mut twin, SYNC);
    let before = received_upstream(&setup);
    let (mut via, mut twin) = pair(&setup);
    for client in [&mut via, &mut twin] {
        client.command("q", "SELECT Quiet");
    }
    same(&mut via, &mut twin, SYNC);
    assert!(received_upstream(&setup) - before < 1500);
}

#[test]
fn remembered_flags_of_two_users_never_mix_under_concurrency() {
    let setup = Setup::start();
    // The same UIDs in both INBOXes, both keeping modification sequences, different flags:
    // only the account tells their remembered flags apart.
    for (user, seed) in [(ALICE, 41), (BOB, 42)] {
        setup.dovecot.fill(user.0, 40, seed);
    }
    elsewhere(&setup, &["SELECT INBOX (CONDSTORE)"]);
    let mut alice = setup.direct(ALICE);
    alice.command("s", "SELECT INBOX");
    alice.command("f", "UID STORE 1:20 +FLAGS.SILENT (\\Flagged $Alice)");
    let truth = |user| {
        let mut direct = setup.direct(user);
        direct.command("s", "SELECT INBOX");
        answer(&mut direct, "d", SYNC)
    };
    let (alice, bob) = (truth(ALICE), truth(BOB));
    assert_ne!(alice.fetch, bob.fetch);
    std::thread::scope(|s| {
        for (user, want) in [(ALICE, &alice), (BOB, &bob), (ALICE, &alice), (BOB, &bob)] {
            let setup = &setup;
            s.spawn(move || {
                // The first round learns (cold), the later ones answer from the flags.
                for round in 0..4 {
                    let mut session = setup.login(user);
                    session.command("s", "SELECT INBOX");
                    let got = answer(&mut session, "v", SYNC);
                    assert!(got == *want, "{} round {round} differs:\n{}", user.0, got.diff(want));
                }
            });
        }
    });
}
