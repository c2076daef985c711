//! The cache never changes an answer: the defects found from outside by a differential
//! tester, each replayed against a real Dovecot, through mailgate (cache on) and straight to
//! Dovecot, and the answers compared item by item.

mod support;

use support::answers::{answer, Answer};
use support::client::Client;
use support::setup::*;

/// `command` through mailgate (`via`) and directly (`direct`) gives the same answer.
fn same(via: &mut Client, direct: &mut Client, command: &str) -> Answer {
    let got = answer(via, "v", command);
    let want = answer(direct, "d", command);
    assert!(got == want, "`{command}` through mailgate differs from Dovecot's answer:\n{}", got.diff(&want));
    got
}

#[test]
fn two_partials_of_one_section_never_poison_the_cache() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 10, 5);
    let mut direct = setup.direct(BOB);
    direct.command("s", "SELECT INBOX");
    for round in ["cold", "warm"] {
        let mut via = setup.login(BOB);
        via.command("s", "SELECT INBOX");
        for command in [
            "UID FETCH 1:* (UID RFC822.SIZE)",
            "UID FETCH 5 (UID BODY.PEEK[]<0.10> BODY.PEEK[]<0.20>)",
            "UID FETCH 5 (BODY.PEEK[]<0.20>)",
            "UID FETCH 5 (BODY.PEEK[]<0.10>)",
            "UID FETCH 6 (BODY.PEEK[TEXT]<0.20> BODY.PEEK[TEXT]<0.20>)",
            "UID FETCH 6 (BODY.PEEK[TEXT]<0.20>)",
            "FETCH 2 (RFC822.SIZE RFC822.SIZE)",
            "UID FETCH 3 (UID BODY.PEEK[HEADER] BODY.PEEK[HEADER])",
        ] {
            let got = same(&mut via, &mut direct, command);
            assert_eq!(got.status, "OK", "{round}: {command}");
        }
    }
    let mut fresh = setup.login(BOB);
    fresh.command("s", "SELECT INBOX");
    let answer = answer(&mut fresh, "n", "UID FETCH 5 (BODY.PEEK[]<0.20>)");
    let body = answer.fetch.values().next().unwrap().get("BODY[]<0>").unwrap();
    assert!(body.starts_with(b"BODY[]<0> {20}\r\n"), "{}", String::from_utf8_lossy(body));
}

#[test]
fn answers_to_an_old_mailbox_are_never_learned_into_the_new_one() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 12, 21);
    let mut direct = setup.direct(BOB);
    // Sent holds UIDs 1..=10; INBOX loses UIDs 1..=3, so UID 5 is message 2 there.
    direct.command("c", "CREATE Sent");
    direct.command("s", "SELECT INBOX");
    assert!(direct.command("p", "UID COPY 1:10 Sent").last().unwrap().starts_with("p OK"));
    direct.command("x", "UID STORE 1:3 +FLAGS.SILENT (\\Deleted)");
    direct.command("e", "EXPUNGE");
    let mut via = setup.login(BOB);
    // The cache learns Sent's headers, then Sent loses UID 5 (by another session).
    via.command("x", "EXAMINE Sent");
    via.command("f", "UID FETCH 1:* (UID BODY.PEEK[HEADER])");
    direct.command("s", "SELECT Sent");
    direct.command("x", "UID STORE 5 +FLAGS.SILENT (\\Deleted)");
    direct.command("e", "EXPUNGE");
    via.command("s", "SELECT INBOX");
    // One write: INBOX's answers arrive after the EXAMINE was forwarded.
    via.send(b"a UID FETCH 1:* (FLAGS)\r\nb EXAMINE Sent\r\n");
    via.until_tagged("a");
    via.until_tagged("b");
    direct.command("b", "EXAMINE Sent");
    for command in ["UID FETCH 5 (BODY.PEEK[HEADER])", "UID FETCH 6:7 (BODY.PEEK[HEADER])", "UID FETCH 4,8 (UID)"] {
        same(&mut via, &mut direct, command);
    }
}

#[test]
fn a_uid_range_beyond_the_highest_uid_still_answers_the_last_message() {
    let setup = Setup::start();
    // Twins: Alice straight to Dovecot, Bob through mailgate (\Seen must match too).
    setup.dovecot.fill(ALICE.0, 30, 8);
    setup.dovecot.fill(BOB.0, 30, 8);
    let mut direct = setup.direct(ALICE);
    direct.command("s", "SELECT INBOX");
    let mut via = setup.login(BOB);
    via.command("s", "SELECT INBOX");
    for command in [
        "UID FETCH 1:* (UID RFC822.SIZE BODY.PEEK[HEADER])",
        "UID FETCH 400:* (UID RFC822.SIZE)",
        "UID FETCH 400:* (RFC822.SIZE BODY.PEEK[HEADER])",
        "UID FETCH 31:* (FLAGS RFC822.SIZE)",
        "UID FETCH 400:* (FLAGS BODY[HEADER])",
        "UID FETCH 400:*,2 (FLAGS BODY[HEADER])",
        "FETCH 29:* (FLAGS RFC822.SIZE)",
        "FETCH 400:* (RFC822.SIZE)",
        "UID FETCH 1:* (FLAGS)",
    ] {
        same(&mut via, &mut direct, command);
    }
}

#[test]
fn under_qresync_every_fetch_response_carries_its_uid_and_a_body_is_sent_once() {
    let setup = Setup::start();
    setup.dovecot.fill(ALICE.0, 20, 12);
    setup.dovecot.fill(BOB.0, 20, 12);
    let mut direct = setup.direct(ALICE);
    let mut via = setup.login(BOB);
    for command in [
        "ENABLE QRESYNC",
        "SELECT INBOX",
        "UID FETCH 1:* (BODY.PEEK[] BODY.PEEK[HEADER])",
        "FETCH 3 BODY[]",
        "FETCH 4:6 (BODY[HEADER] FLAGS)",
        "FETCH 7 (RFC822)",
        "UID FETCH 8 (BODY[])",
        "FETCH 1:10 (FLAGS MODSEQ)",
    ] {
        same(&mut via, &mut direct, command);
    }
    // Response by response (not only merged per message), the same items as Dovecot's:
    // the body once, UID where Dovecot puts it.
    let shapes = |client: &mut Client, tag: &str| -> Vec<Vec<String>> {
        client.send(format!("{tag} FETCH 9:10 (BODY[] BODY[HEADER])\r\n").as_bytes());
        let responses = client.responses(tag);
        responses[..responses.len() - 1]
            .iter()
            .map(|r| {
                let parsed = mailgate::imap::fetch::parse_response(r).expect("a FETCH response");
                let mut names: Vec<String> = parsed.items.iter().map(|i| i.name.to_string()).collect();
                names.sort();
                names.insert(0, parsed.seq.to_string());
                names
            })
            .collect()
    };
    let (mut got, mut want) = (shapes(&mut via, "r"), shapes(&mut direct, "r"));
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn answers_for_messages_expunged_under_the_session_are_not_cached() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 10, 3);
    let items = "(RFC822.SIZE INTERNALDATE ENVELOPE BODYSTRUCTURE BODY.PEEK[HEADER] BODY.PEEK[TEXT])";
    // Two sessions that still have message 7 in their view when another session expunges it.
    let mut first = setup.login(BOB);
    first.command("s", "SELECT INBOX");
    first.command("w", "UID FETCH 1:5 (UID RFC822.SIZE)");
    let mut second = setup.direct(BOB);
    second.command("s", "SELECT INBOX");
    let mut other = setup.direct(BOB);
    other.command("s", "SELECT INBOX");
    other.command("x", "UID STORE 7 +FLAGS.SILENT (\\Deleted)");
    other.command("e", "EXPUNGE");
    same(&mut first, &mut second, &format!("UID FETCH 7 {items}"));
    // Whatever Dovecot says of a message that is gone, none of it was stored: a new
    // session, and the metrics, show no entry for UID 7.
    let metrics = setup.gateway.metrics();
    let entries: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mailgate_cache_entries "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    // The snapshot's RFC822.SIZE column (five values), the mailbox's fill mark and its
    // highest UIDNEXT: no column for any other item, no entry for the body.
    assert_eq!(entries, 3, "{metrics}");
}

#[test]
fn cold_syncs_count_their_misses_in_the_metrics() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 50, 4);
    let mut via = setup.login(BOB);
    via.command("s", "SELECT INBOX");
    let got = answer(&mut via, "f", "UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])");
    assert_eq!(got.fetch.len(), 50);
    answer(&mut via, "g", "UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])");
    let metrics = setup.gateway.metrics();
    let value = |line: &str| -> u64 {
        metrics.lines().find_map(|l| l.strip_prefix(line)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    assert_eq!(value("mailgate_cache_requests_total{kind=\"structure\",result=\"miss\"} "), 50, "{metrics}");
    assert_eq!(value("mailgate_cache_requests_total{kind=\"header\",result=\"miss\"} "), 50, "{metrics}");
    assert_eq!(value("mailgate_cache_requests_total{kind=\"header\",result=\"hit\"} "), 50, "{metrics}");
}

#[test]
fn a_mailbox_rebuilt_with_the_same_uidvalidity_is_not_served_stale() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 10, 31);
    let mut via = setup.login(BOB);
    via.command("s", "SELECT INBOX");
    let first = answer(&mut via, "f", "UID FETCH 1:* (UID RFC822.SIZE INTERNALDATE BODY.PEEK[HEADER])");
    assert_eq!(first.fetch.len(), 10);
    via.send(b"z LOGOUT\r\n");
    let _ = via.rest();
    // A restore: the same UIDVALIDITY, the same UIDs, other messages.
    let uid_validity = setup.dovecot.rebuild_keeping_uid_validity(BOB.0, 10, 32);
    let mut direct = setup.direct(BOB);
    let mut via = setup.login(BOB);
    for client in [&mut direct, &mut via] {
        let lines = client.command("s", "SELECT INBOX");
        assert!(lines.iter().any(|l| l.contains(&format!("[UIDVALIDITY {uid_validity}]"))), "{lines:?}");
    }
    for command in [
        "UID FETCH 1:* (UID RFC822.SIZE INTERNALDATE BODY.PEEK[HEADER])",
        "UID FETCH 3 (BODY.PEEK[HEADER])",
        "UID FETCH 1:* (UID RFC822.SIZE INTERNALDATE BODY.PEEK[HEADER])",
    ] {
        same(&mut via, &mut direct, command);
    }
    let stale = setup.gateway.metrics();
    assert!(stale.lines().any(|l| l.starts_with("mailgate_cache_stale_total ") && !l.ends_with(" 0")), "{stale}");
}

#[test]
fn a_mailbox_restored_from_an_older_copy_is_not_served_stale_even_without_asking_upstream() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 12, 33);
    let mut via = setup.login(BOB);
    via.command("s", "SELECT INBOX");
    answer(&mut via, "f", "UID FETCH 1:* (UID BODY.PEEK[])");
    // Warm: explicit UIDs of cached bodies are answered without the upstream.
    answer(&mut via, "g", "UID FETCH 4 (BODY.PEEK[])");
    via.send(b"z LOGOUT\r\n");
    let _ = via.rest();
    // An older copy comes back: fewer messages, UIDNEXT lower, the same UIDVALIDITY.
    setup.dovecot.rebuild_keeping_uid_validity(BOB.0, 6, 34);
    let mut direct = setup.direct(BOB);
    let mut via = setup.login(BOB);
    direct.command("s", "SELECT INBOX");
    via.command("s", "SELECT INBOX");
    for command in ["UID FETCH 4 (BODY.PEEK[])", "UID FETCH 2,5 (BODY.PEEK[])", "UID FETCH 1:* (UID BODY.PEEK[])"] {
        same(&mut via, &mut direct, command);
    }
}

#[test]
fn messages_answered_after_a_relayed_expunge_carry_their_new_numbers() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 12, 35);
    let mut via = setup.login(BOB);
    via.command("s", "SELECT INBOX");
    answer(&mut via, "w", "UID FETCH 1:* (UID BODY.PEEK[HEADER])");
    // Another session expunges UID 3; the next UID command may report it.
    let mut other = setup.direct(BOB);
    other.command("s", "SELECT INBOX");
    other.command("x", "UID STORE 3 +FLAGS.SILENT (\\Deleted)");
    other.command("e", "EXPUNGE");
    // `*:1` is answered only once the upstream has finished (membership needs the last
    // UID): every answer goes out after the EXPUNGE, so it must use the new numbers.
    via.send(b"h UID FETCH *:1 (UID BODY.PEEK[HEADER])\r\n");
    let mut numbers = Vec::new();
    let mut expunged = false;
    for response in via.responses("h") {
        let text = String::from_utf8_lossy(&response[..response.len().min(60)]).into_owned();
        if text.starts_with("* 3 EXPUNGE") {
            expunged = true;
        } else if let Some(parsed) = mailgate::imap::fetch::parse_response(&response) {
            numbers.push((expunged, parsed.seq, parsed.uid(&response).unwrap()));
        }
    }
    // The truth after the expunge: message n is the n-th remaining UID.
    let now = answer(&mut via, "n", "UID FETCH 1:* (UID)");
    let truth: std::collections::BTreeMap<u32, u32> = now
        .fetch
        .iter()
        .map(|(seq, items)| (*seq, String::from_utf8_lossy(&items["UID"])[4..].parse().unwrap()))
        .collect();
    assert_eq!(numbers.len(), 11, "{numbers:?}");
    assert!(numbers.iter().all(|n| n.0), "Dovecot reported the EXPUNGE first: {numbers:?}");
    for (after_expunge, seq, uid) in numbers {
        if after_expunge {
            assert_eq!(truth.get(&seq), Some(&uid), "UID {uid} answered as message {seq} after the EXPUNGE");
        }
    }
}

/// Bytes mailgate has sent to upstreams so far (counted as they go).
fn sent_upstream(setup: &Setup) -> u64 {
    let metrics = setup.gateway.metrics();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("mailgate_upstream_bytes_total{direction=\"out\",protocol=\"imap\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"))
}

#[test]
fn the_snapshot_gives_a_fresh_session_its_message_numbers_until_a_message_comes_or_goes() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 40, 9);
    let mut direct = setup.direct(BOB);
    direct.command("s", "SELECT INBOX");
    let bodies = "UID FETCH 3,17,40 BODY.PEEK[]";
    // Filled; then answered from memory in a fresh session, which learns the message
    // numbers upstream (one `UID SEARCH ALL`) and keeps them in the snapshot.
    let mut filler = setup.login(BOB);
    filler.command("s", "SELECT INBOX");
    same(&mut filler, &mut direct, bodies);
    let mut first = setup.login(BOB);
    first.command("s", "SELECT INBOX");
    same(&mut first, &mut direct, bodies);
    // Another session, and the same one after selecting the mailbox again: the mailbox is
    // as it was, so the numbers come from the snapshot and nothing goes upstream.
    let mut second = setup.login(BOB);
    second.command("s", "SELECT INBOX");
    for (client, again) in [(&mut second, "SELECT INBOX"), (&mut first, "EXAMINE INBOX")] {
        client.command("r", again);
        let before = sent_upstream(&setup);
        same(client, &mut direct, bodies);
        assert_eq!(sent_upstream(&setup), before, "answered without the upstream");
    }
    // A message goes (another session expunges it): the numbers move, the snapshot's no
    // longer apply, and the answers still equal Dovecot's.
    let mut other = setup.direct(BOB);
    other.command("s", "SELECT INBOX");
    other.command("x", "UID STORE 2 +FLAGS.SILENT (\\Deleted)");
    other.command("e", "EXPUNGE");
    direct.command("n", "NOOP");
    for client in [&mut first, &mut second] {
        client.command("n", "NOOP");
        same(client, &mut direct, bodies);
    }
    let mut third = setup.login(BOB);
    third.command("s", "SELECT INBOX");
    let before = sent_upstream(&setup);
    same(&mut third, &mut direct, bodies);
    assert!(sent_upstream(&setup) > before, "the numbers were asked again");
    // And a message arrives: the same.
    setup.dovecot.fill(BOB.0, 1, 10);
    direct.command("n", "NOOP");
    let mut fourth = setup.login(BOB);
    fourth.command("s", "SELECT INBOX");
    same(&mut fourth, &mut direct, bodies);
    third.command("n", "NOOP");
    same(&mut third, &mut direct, bodies);
}

#[test]
fn a_fetch_after_enable_qresync_carries_the_upstreams_highestmodseq_code() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 10, 11);
    let mut direct = setup.direct(BOB);
    let mut via = setup.login(BOB);
    let items = "UID FETCH 4 (UID ENVELOPE BODY.PEEK[])";
    for client in [&mut direct, &mut via] {
        client.command("s", "SELECT INBOX");
        answer(client, "w", items);
    }
    // Cached, and its number known: mailgate could answer from memory, but Dovecot answers
    // the first command after ENABLE QRESYNC (in the selected state) with
    // `OK [HIGHESTMODSEQ n]`, which only the upstream knows.
    same(&mut via, &mut direct, items);
    for client in [&mut direct, &mut via] {
        client.command("e", "ENABLE CONDSTORE QRESYNC");
    }
    // The tagged line's response code (its text may differ).
    let code = |client: &mut Client| {
        let lines = client.command("c", items);
        let tagged = lines.last().expect("a tagged line").clone();
        tagged.split_once(']').map(|(code, _)| code.to_string()).unwrap_or_default()
    };
    let want = code(&mut direct);
    assert!(want.contains("HIGHESTMODSEQ"), "Dovecot's answer: {want}");
    assert_eq!(code(&mut via), want);
    same(&mut via, &mut direct, items);
}
