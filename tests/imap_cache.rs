//! The IMAP side of the message cache against Dovecot: FETCH answers through mailgate,
//! cold and warm, equal item by item to the same FETCH sent straight to Dovecot; `\Seen`
//! set exactly when a direct fetch sets it; users isolated; nothing partial ever cached.

mod support;

use std::time::Duration;

use support::answers::{answer, Answer};
use support::client::Client;
use support::fake_upstream::{FakeConn, FakeUpstream};
use support::gateway::Gateway;
use support::setup::*;
use support::tls::TestPki;

const SCRIPT: &[&str] = &[
    "UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE MESSAGE-ID)])",
    "FETCH 1:* (ENVELOPE BODYSTRUCTURE INTERNALDATE)",
    "FETCH 1:120 (BODY.PEEK[HEADER] BODY.PEEK[TEXT])",
    "UID FETCH 1:60 BODY.PEEK[]",
    "UID FETCH 1:60 (FLAGS BODY.PEEK[])",
    "FETCH 3:12 (BODY.PEEK[1] BODY.PEEK[1.MIME] BODY.PEEK[2] BODY.PEEK[2.1])",
    "FETCH 1:40 (BODY.PEEK[]<0.100> BODY.PEEK[TEXT]<10.50>)",
    "UID FETCH 1:30 (RFC822.SIZE RFC822.HEADER BODY)",
    "FETCH * (UID BODY.PEEK[HEADER.FIELDS.NOT (RECEIVED)])",
    "UID FETCH 100:120,7,1999:* (FLAGS BODY.PEEK[HEADER])",
    "fetch 5 (body.peek[header.fields (subject)] uid)",
    "FETCH 1:5 (BINARY.PEEK[1])",
    "UID FETCH 5000 BODY.PEEK[]",
    "FETCH 1:3 (BODY.PEEK[HEADER] FLAGS) (CHANGEDSINCE 1)",
];

#[test]
fn fetch_through_the_cache_equals_direct_cold_and_warm() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 2000, 77);
    let mut direct = setup.direct(BOB);
    direct.command("s", "SELECT INBOX");
    let expected: Vec<Answer> = SCRIPT.iter().map(|c| answer(&mut direct, "d", c)).collect();
    assert!(expected[0].fetch.len() == 2000);
    for round in ["cold", "warm"] {
        let mut via = setup.login(BOB);
        via.command("s", "SELECT INBOX");
        for (command, want) in SCRIPT.iter().zip(&expected) {
            let got = answer(&mut via, "v", command);
            if got != *want {
                let first = want.fetch.iter().find(|(seq, items)| got.fetch.get(seq) != Some(items));
                panic!(
                    "{round}: `{command}` differs (status {} vs {}, {} vs {} messages, other {:?}); first: {:?}",
                    got.status,
                    want.status,
                    got.fetch.len(),
                    want.fetch.len(),
                    got.other.iter().map(|o| String::from_utf8_lossy(o).into_owned()).collect::<Vec<_>>(),
                    first.map(|(seq, items)| (
                        seq,
                        items.keys().collect::<Vec<_>>(),
                        got.fetch.get(seq).map(|g| g.keys().collect::<Vec<_>>())
                    ))
                );
            }
        }
        via.send(b"z LOGOUT\r\n");
        let _ = via.rest();
    }
    // Both sessions' totals (cold, then warm) are logged when they end.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while setup.gateway.log().matches("session ended").count() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", setup.gateway.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = setup.gateway.log();
    let warm = log.lines().rfind(|l| l.contains("session ended")).unwrap().to_string();
    let field =
        |key: &str| -> u64 { warm.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap().parse().unwrap() };
    // (INTERNALDATE is always asked upstream, not cached: see imap::fetch.)
    assert!(field("cache_hits=") > 8_000, "{warm}");
    assert_eq!(field("cache_misses="), 0, "{warm}");
}

#[test]
fn seen_is_set_exactly_when_a_direct_fetch_sets_it() {
    let setup = Setup::start();
    // Identical mailboxes: Alice is fetched directly, Bob through mailgate (twice, so that
    // the second time the bodies come from the cache).
    setup.dovecot.fill(ALICE.0, 40, 9);
    setup.dovecot.fill(BOB.0, 40, 9);
    let script = [
        "FETCH 1:5 RFC822.TEXT",
        "FETCH 6:10 BODY[TEXT]",
        "FETCH 11:15 (FLAGS RFC822)",
        "FETCH 16:20 BODY.PEEK[TEXT]",
        "FETCH 21:25 (RFC822.HEADER BODY[HEADER])",
        "FETCH 1:40 FLAGS",
    ];
    let mut direct = setup.direct(ALICE);
    direct.command("s", "SELECT INBOX");
    let expected: Vec<Answer> = script.iter().map(|c| answer(&mut direct, "d", c)).collect();
    // Warm the cache with peeks of the same items, from another session.
    let mut warm = setup.login(BOB);
    warm.command("s", "EXAMINE INBOX");
    answer(&mut warm, "w", "FETCH 1:25 (BODY.PEEK[TEXT] BODY.PEEK[] BODY.PEEK[HEADER] RFC822.HEADER)");
    let mut via = setup.login(BOB);
    via.command("s", "SELECT INBOX");
    for (command, want) in script.iter().zip(&expected) {
        let got = answer(&mut via, "v", command);
        assert_eq!(got.status, want.status, "{command}");
        assert_eq!(got.fetch.len(), want.fetch.len(), "{command}");
        for (seq, items) in &want.fetch {
            assert_eq!(got.fetch.get(seq), Some(items), "{command}: message {seq}");
        }
    }
}

#[test]
fn users_never_get_each_others_cached_data() {
    let setup = Setup::start();
    setup.dovecot.fill(ALICE.0, 30, 1);
    setup.dovecot.fill(BOB.0, 30, 2);
    let command = "UID FETCH 1:30 (BODY.PEEK[] ENVELOPE BODYSTRUCTURE RFC822.SIZE)";
    let truth = |user| {
        let mut direct = setup.direct(user);
        direct.command("s", "SELECT INBOX");
        answer(&mut direct, "d", command)
    };
    let (alice, bob) = (truth(ALICE), truth(BOB));
    assert_ne!(alice.fetch, bob.fetch);
    for order in [[ALICE, BOB], [BOB, ALICE]] {
        // Both sessions open at once, fetching in turn.
        let mut sessions: Vec<Client> = order.iter().map(|u| setup.login(*u)).collect();
        for round in 0..2 {
            for (user, session) in order.iter().zip(sessions.iter_mut()) {
                session.command("s", "SELECT INBOX");
                let got = answer(session, "v", command);
                let want = if user.0 == ALICE.0 { &alice } else { &bob };
                assert!(got == *want, "{} round {round} got someone else's data", user.0);
            }
        }
    }
}

#[test]
fn a_body_cut_by_the_upstream_is_never_cached() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let sessions = Arc::new(AtomicUsize::new(0));
    let counter = sessions.clone();
    let body = "Subject: whole\r\n\r\nthe complete body\r\n";
    let fake = FakeUpstream::start(None, move |conn: &mut FakeConn| {
        // Sessions are counted at login: mailgate's probe of the upstream's mechanisms
        // connects without one.
        let mut session = usize::MAX;
        conn.send(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] fake\r\n");
        while let Some(line) = conn.line() {
            let tag = line.split(' ').next().unwrap_or_default().to_string();
            let upper = line.to_ascii_uppercase();
            if upper.contains("AUTHENTICATE") {
                session = counter.fetch_add(1, Ordering::SeqCst);
                conn.send(format!("{tag} OK [CAPABILITY IMAP4rev1] in\r\n").as_bytes());
            } else if upper.contains(" SELECT ") {
                conn.send(
                    format!("* 1 EXISTS\r\n* OK [UIDVALIDITY 9] ok\r\n{tag} OK [READ-WRITE] done\r\n").as_bytes(),
                );
            } else if upper.contains("BODY.PEEK[]") {
                conn.send(format!("* 1 FETCH (UID 1 BODY[] {{{}}}\r\n", body.len()).as_bytes());
                if session == 0 {
                    conn.send(&body.as_bytes()[..10]);
                    return;
                }
                conn.send(format!("{body})\r\n{tag} OK done\r\n").as_bytes());
            } else if upper.contains("FETCH 1 (UID") {
                // Phase one: the UID, and the size mailgate checks its cache against.
                let size =
                    if upper.contains("RFC822.SIZE") { format!(" RFC822.SIZE {}", body.len()) } else { String::new() };
                conn.send(format!("* 1 FETCH (UID 1{size})\r\n{tag} OK done\r\n").as_bytes());
            } else {
                conn.send(format!("{tag} OK\r\n").as_bytes());
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let config = gateway_config(&pki, &fake.addr.to_string(), "plaintext", None, "", "");
    let gateway = Gateway::start(dir.path(), &config);
    let session = || {
        let mut client = Client::tls(gateway.addr("imaps"), pki.client_config(&[]));
        client.line().unwrap();
        assert!(client.command("l", "LOGIN u p").last().unwrap().starts_with("l OK"));
        assert!(client.command("s", "SELECT INBOX").last().unwrap().starts_with("s OK"));
        client
    };
    let mut first = session();
    first.send(b"f FETCH 1 BODY.PEEK[]\r\n");
    let cut = first.rest_bytes();
    assert!(!cut.ends_with(b"f OK done\r\n"), "{}", String::from_utf8_lossy(&cut));
    for _ in 0..2 {
        let mut next = session();
        let got = answer(&mut next, "f", "FETCH 1 BODY.PEEK[]");
        assert_eq!(got.status, "OK");
        let item = &got.fetch[&1]["BODY[]"];
        assert!(item.ends_with(body.as_bytes()), "{}", String::from_utf8_lossy(item));
    }
    // The cut body reached nobody's cache: the second session fetched it upstream, the
    // third was served from the cache.
    assert_eq!(fake.received().matches("BODY.PEEK[]").count(), 2, "{}", fake.received());
}

#[test]
fn concurrent_sessions_missing_the_same_items_all_get_exact_answers() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 150, 31);
    let command = "UID FETCH 1:150 (UID BODY.PEEK[] BODYSTRUCTURE)";
    let mut direct = setup.direct(BOB);
    direct.command("s", "SELECT INBOX");
    let want = answer(&mut direct, "d", command);
    // Mark the mailbox as filled from (a few headers), so that the big fetch takes the
    // two-phase path with misses that the concurrent sessions share.
    let mut first = setup.login(BOB);
    first.command("s", "SELECT INBOX");
    answer(&mut first, "h", "UID FETCH 1:3 (UID BODY.PEEK[HEADER])");
    let answers: Vec<Answer> = std::thread::scope(|scope| {
        let sessions: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let mut client = setup.login(BOB);
                    client.command("s", "SELECT INBOX");
                    answer(&mut client, "v", command)
                })
            })
            .collect();
        sessions.into_iter().map(|s| s.join().unwrap()).collect()
    });
    for got in answers {
        assert!(got == want, "a concurrent session got a different answer");
    }
}

#[test]
fn opening_a_large_message_whose_size_is_cached_streams_it() {
    // Small job limits (a cache job may hold 2 × 1 MiB + 1 MiB): a 4 MiB message merged
    // with its cached RFC822.SIZE would not fit, streamed it does.
    let setup = Setup::start_with("max_literal_bytes = \"1MiB\"", "[cache]\nmax_entry_bytes = \"256KiB\"\n");
    let body: String =
        (0..72_000).map(|i| format!("line {i:06} of a four megabyte message, 64 bytes long.....\r\n")).collect();
    let message = format!("From: a@example.org\r\nSubject: large\r\n\r\n{body}");
    assert!(message.len() > 4 << 20);
    let mut direct = setup.direct(BOB);
    direct.send(format!("a APPEND INBOX {{{}}}\r\n", message.len()).as_bytes());
    assert!(direct.line().unwrap().starts_with("+ "));
    direct.send(message.as_bytes());
    direct.send(b"\r\n");
    assert!(direct.until_tagged("a").last().unwrap().starts_with("a OK"));
    direct.command("s", "SELECT INBOX");

    let mut client = setup.login(BOB);
    client.command("s", "SELECT INBOX");
    // The header sync fills the cache (RFC822.SIZE among it).
    let sync = "UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER])";
    assert_eq!(answer(&mut client, "h", sync), answer(&mut direct, "h", sync));
    // Then the client opens the message, asking for its size again with the body.
    let open = "UID FETCH 1 (UID RFC822.SIZE BODY.PEEK[])";
    let through = answer(&mut client, "o", open);
    assert_eq!(through.status, "OK");
    assert_eq!(through, answer(&mut direct, "o", open));
    assert!(client.command("n", "NOOP").last().unwrap().starts_with("n OK"), "the session goes on");
}

#[test]
fn snapshots_of_two_users_never_mix_under_concurrency() {
    let setup = Setup::start();
    // Filled in the same second: the two INBOXes may well share a UIDVALIDITY, and they
    // share every UID; only the account tells their snapshots apart.
    setup.dovecot.fill(ALICE.0, 60, 21);
    setup.dovecot.fill(BOB.0, 60, 22);
    let commands = [
        "UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])",
        "UID FETCH 1:60 (ENVELOPE BODYSTRUCTURE)",
        "UID FETCH 5,17,33 BODY.PEEK[]",
    ];
    let truth = |user| {
        let mut direct = setup.direct(user);
        direct.command("s", "SELECT INBOX");
        commands.iter().map(|c| answer(&mut direct, "d", c)).collect::<Vec<Answer>>()
    };
    let (alice, bob) = (truth(ALICE), truth(BOB));
    assert_ne!(alice[0].fetch, bob[0].fetch);
    std::thread::scope(|s| {
        for (user, want) in [(ALICE, &alice), (BOB, &bob), (ALICE, &alice), (BOB, &bob)] {
            let setup = &setup;
            s.spawn(move || {
                for round in 0..4 {
                    let mut session = setup.login(user);
                    session.command("s", "SELECT INBOX");
                    for (command, want) in commands.iter().zip(want) {
                        let got = answer(&mut session, "v", command);
                        assert!(got == *want, "{} round {round}: `{command}` differs:\n{}", user.0, got.diff(want));
                    }
                }
            });
        }
    });
}

#[test]
fn answers_of_a_fetch_the_upstream_never_completed_are_not_kept() {
    // Complete FETCH responses, then the upstream goes away before the tagged completion:
    // nothing says they were content (a `NO` or `[EXPUNGEISSUED]` would have taken them
    // back), so the session's end takes them back too.
    let body = "Subject: whole\r\n\r\nthe complete body\r\n";
    let fake = FakeUpstream::start(None, move |conn: &mut FakeConn| {
        conn.send(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] fake\r\n");
        while let Some(line) = conn.line() {
            let tag = line.split(' ').next().unwrap_or_default().to_string();
            let upper = line.to_ascii_uppercase();
            if upper.contains("AUTHENTICATE") {
                conn.send(format!("{tag} OK [CAPABILITY IMAP4rev1] in\r\n").as_bytes());
            } else if upper.contains(" SELECT ") {
                conn.send(
                    format!("* 2 EXISTS\r\n* OK [UIDVALIDITY 9] ok\r\n{tag} OK [READ-WRITE] done\r\n").as_bytes(),
                );
            } else if upper.contains("BODY.PEEK[]") {
                for n in 1..=2 {
                    conn.send(format!("* {n} FETCH (UID {n} BODY[] {{{}}}\r\n{body})\r\n", body.len()).as_bytes());
                }
                return;
            } else {
                conn.send(format!("{tag} OK\r\n").as_bytes());
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let config = gateway_config(&pki, &fake.addr.to_string(), "plaintext", None, "", "");
    let gateway = Gateway::start(dir.path(), &config);
    let mut client = Client::tls(gateway.addr("imaps"), pki.client_config(&[]));
    client.line().unwrap();
    assert!(client.command("l", "LOGIN u p").last().unwrap().starts_with("l OK"));
    assert!(client.command("s", "SELECT INBOX").last().unwrap().starts_with("s OK"));
    client.send(b"f UID FETCH 1:2 BODY.PEEK[]\r\n");
    let relayed = client.rest_bytes();
    let text = String::from_utf8_lossy(&relayed);
    assert!(
        text.contains("* 2 FETCH (UID 2 BODY[] {37}\r\nSubject: whole\r\n\r\nthe complete body\r\n)\r\n"),
        "{text}"
    );
    assert!(gateway.wait_for_log("session ended", Duration::from_secs(10)), "{}", gateway.log());
    let metrics = gateway.metrics();
    let entries: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mailgate_cache_entries "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    // The mailbox's UIDNEXT mark alone (the UIDs it saw are real); no body.
    assert_eq!(entries, 1, "{metrics}");
}
