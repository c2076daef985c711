//! mailgate in front of Courier IMAP and Courier POP3, the second real upstream next to
//! Dovecot (tests/support/courier.rs; installed by tests/install-courier.sh). Each test
//! starts a fresh Courier with mailgate (message cache on) in front and compares what a
//! client gets through mailgate with what the same commands get straight from Courier:
//! FETCH variants cold and warm item by item, mbsync cold and warm, POP3 RETR/TOP cold and
//! warm byte for byte, and the commands mailgate only relays.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mailgate::imap::fetch::parse_response;
use support::client::Client;
use support::courier::CourierSetup;
use support::gateway::Gateway;
use support::mbsync::{self, contents, describe_difference, local_flags, strip_tuid, Account};
use support::process::{show, tail};

/// Users of every test: one password that needs quoting (a space, a quote), one plain.
const USERS: &[(&str, &str)] = &[("bob", "bob-Pass-42"), ("alice", "c0urier pw\"x")];

// ---------------------------------------------------------------------------------------
// FETCH answers, item by item
// ---------------------------------------------------------------------------------------

/// FETCH data by sequence number: item name (by meaning: see [`item_key`]) → raw value
/// bytes; other untagged responses in order; and the tagged status word.
#[derive(Debug, PartialEq, Eq, Default)]
struct Answer {
    fetch: BTreeMap<u32, BTreeMap<String, Vec<u8>>>,
    other: Vec<Vec<u8>>,
    status: String,
}

/// Splits a raw FETCH item (`NAME value`) at the space ending its name; a section's
/// brackets (`BODY[HEADER.FIELDS ("FROM" "TO")]<0>`) may hold spaces and quoted strings.
fn split_item(raw: &[u8]) -> (&[u8], &[u8]) {
    let (mut depth, mut quoted, mut escaped) = (0usize, false, false);
    for (i, &b) in raw.iter().enumerate() {
        if quoted {
            match (escaped, b) {
                (false, b'\\') => escaped = true,
                (false, b'"') => quoted = false,
                _ => escaped = false,
            }
            continue;
        }
        match b {
            b'"' => quoted = true,
            b'[' => depth += 1,
            b']' => depth = depth.saturating_sub(1),
            b' ' if depth == 0 => return (&raw[..i], &raw[i + 1..]),
            _ => {}
        }
    }
    (raw, &[])
}

/// An item name by meaning, for the test's map keys only: upper case, single spaces,
/// header field names unquoted. Courier echoes `BODY[HEADER.FIELDS ("FROM" "TO")]` for
/// `BODY.PEEK[HEADER.FIELDS (FROM TO)]`; a field name is an astring (RFC 9051), so both
/// name the same item. Written here rather than taken from mailgate: the test must not
/// trust the code it checks.
fn item_key(name: &[u8]) -> String {
    let text = String::from_utf8_lossy(name);
    let mut out = String::with_capacity(text.len());
    let (mut quoted, mut escaped, mut space) = (false, false, false);
    for c in text.chars() {
        if quoted {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => quoted = false,
                _ => {
                    escaped = false;
                    out.push(c.to_ascii_uppercase());
                }
            }
            continue;
        }
        if c.is_whitespace() {
            space = !out.is_empty();
            continue;
        }
        if space && !out.ends_with('(') && c != ')' {
            out.push(' ');
        }
        space = false;
        if c == '"' {
            quoted = true;
        } else {
            out.push(c.to_ascii_uppercase());
        }
    }
    out
}

/// Sends `tag command` and collects the answer. FLAGS are compared without `\Recent`
/// (it belongs to whichever session saw a message first).
fn answer(client: &mut Client, tag: &str, command: &str) -> Answer {
    client.send(format!("{tag} {command}\r\n").as_bytes());
    let mut answer = Answer::default();
    for response in client.responses(tag) {
        if response.starts_with(format!("{tag} ").as_bytes()) {
            answer.status = show(&response[tag.len() + 1..]).split(' ').next().unwrap().to_string();
        } else if let Some(parsed) = parse_response(&response) {
            let items = answer.fetch.entry(parsed.seq).or_default();
            for item in &parsed.items {
                let (name, value) = split_item(&response[item.range.clone()]);
                let key = item_key(name);
                let mut value = value.to_vec();
                if key == "FLAGS" {
                    let text = show(&value).replace("\\Recent ", "").replace(" \\Recent", "").replace("\\Recent", "");
                    value = text.into_bytes();
                }
                assert!(
                    items.insert(key.clone(), value).is_none(),
                    "`{command}`: item {key} twice for message {}",
                    parsed.seq
                );
            }
        } else {
            answer.other.push(response);
        }
    }
    answer
}

/// What differs between two answers, for a failure message: the first message whose items
/// differ, with the items missing, extra, or with other values (excerpts).
fn describe(got: &Answer, want: &Answer) -> String {
    let excerpt = |v: &[u8]| {
        let text = show(&v[..v.len().min(160)]);
        format!("{text:?}{}", if v.len() > 160 { format!(" ... ({} bytes)", v.len()) } else { String::new() })
    };
    let mut out = format!(
        "status {} (direct {}), {} messages (direct {}), other responses {:?} (direct {:?})",
        got.status,
        want.status,
        got.fetch.len(),
        want.fetch.len(),
        got.other.iter().map(|o| show(o)).collect::<Vec<_>>(),
        want.other.iter().map(|o| show(o)).collect::<Vec<_>>(),
    );
    let seqs: std::collections::BTreeSet<&u32> = got.fetch.keys().chain(want.fetch.keys()).collect();
    let mut differing = seqs.iter().filter(|seq| got.fetch.get(seq) != want.fetch.get(seq));
    let count = differing.clone().count();
    if let Some(seq) = differing.next() {
        let empty = BTreeMap::new();
        let (g, w) = (got.fetch.get(seq).unwrap_or(&empty), want.fetch.get(seq).unwrap_or(&empty));
        out.push_str(&format!("\n{count} messages differ; first: message {seq}"));
        for (key, value) in w {
            match g.get(key) {
                None => out.push_str(&format!("\n  missing through mailgate: {key} = {}", excerpt(value))),
                Some(v) if v != value => out.push_str(&format!(
                    "\n  {key} differs:\n    through mailgate: {}\n    direct:           {}",
                    excerpt(v),
                    excerpt(value)
                )),
                Some(_) => {}
            }
        }
        for (key, value) in g.iter().filter(|(k, _)| !w.contains_key(*k)) {
            out.push_str(&format!("\n  only through mailgate: {key} = {}", excerpt(value)));
        }
    }
    out
}

/// A FETCH script in the spirit of tests/imap_cache.rs, for 300 messages, led by what
/// Thunderbird sends to resync headers.
const SCRIPT: &[&str] = &[
    "UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE)])",
    "UID FETCH 1:* (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (From To Cc Bcc Subject Date Message-ID \
     Priority X-Priority References Newsgroups In-Reply-To Content-Type Reply-To)])",
    "FETCH 1:* (INTERNALDATE RFC822.SIZE)",
    "FETCH 1:* (ENVELOPE BODYSTRUCTURE INTERNALDATE)",
    "FETCH 1:100 (BODY.PEEK[HEADER] BODY.PEEK[TEXT])",
    "UID FETCH 1:60 BODY.PEEK[]",
    "UID FETCH 1:60 (FLAGS BODY.PEEK[])",
    "FETCH 3:12 (BODY.PEEK[1] BODY.PEEK[1.MIME] BODY.PEEK[2] BODY.PEEK[2.1])",
    "FETCH 1:40 (BODY.PEEK[]<0.100> BODY.PEEK[TEXT]<10.50>)",
    "UID FETCH 1:30 (RFC822.SIZE RFC822.HEADER BODY)",
    "FETCH * (UID BODY.PEEK[HEADER.FIELDS.NOT (RECEIVED)])",
    "UID FETCH 100:120,7,290:* (FLAGS BODY.PEEK[HEADER])",
    "fetch 5 (body.peek[header.fields (subject)] uid)",
    "FETCH 1:10 FULL",
    "UID FETCH 5000 BODY.PEEK[]",
];

const FETCH_COUNT: usize = 300;

#[test]
fn courier_fetch_through_the_cache_equals_direct_cold_and_warm() {
    let started = Instant::now();
    let setup = CourierSetup::start(USERS);
    setup.courier.fill("bob", FETCH_COUNT, 77);
    let mut direct = setup.direct("bob");
    direct.command("s", "SELECT INBOX");
    let expected: Vec<Answer> = SCRIPT.iter().map(|c| answer(&mut direct, "d", c)).collect();
    assert_eq!(expected[0].fetch.len(), FETCH_COUNT, "direct header resync");
    assert!(
        expected[0].fetch[&1].keys().any(|k| k == "BODY[HEADER.FIELDS (FROM TO SUBJECT DATE)]"),
        "the keys are compared by meaning: {:?}",
        expected[0].fetch[&1].keys().collect::<Vec<_>>()
    );
    println!("direct answers in {:?}", started.elapsed());

    let mut failures = Vec::new();
    for round in ["cold", "warm", "warm again"] {
        let round_started = Instant::now();
        let mut via = setup.login("bob");
        via.command("s", "SELECT INBOX");
        for (command, want) in SCRIPT.iter().zip(&expected) {
            let got = answer(&mut via, "v", command);
            if got != *want {
                failures.push(format!("{round}: `{command}` differs: {}", describe(&got, want)));
            }
        }
        via.send(b"z LOGOUT\r\n");
        let _ = via.rest();
        println!("{round} in {:?}", round_started.elapsed());
    }
    assert!(
        failures.is_empty(),
        "{} of {} answers through mailgate differ from Courier's own:\n{}",
        failures.len(),
        SCRIPT.len() * 3,
        failures.join("\n")
    );
    // The sessions' totals (cold, warm, warm again) are logged when they end.
    let sessions = ended_sessions(&setup.gateway, 3);
    for line in &sessions {
        println!("{line}");
    }
    for (round, line) in ["warm", "warm again"].iter().zip(&sessions[1..]) {
        assert!(field(line, "cache_hits=").unwrap_or(0) > 2 * FETCH_COUNT as u64, "{round}: {line}");
        assert_eq!(field(line, "cache_misses="), Some(0), "{round}: {line}");
    }
    println!("whole test {:?}", started.elapsed());
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.trim_matches('"').parse().ok())
}

/// The "session ended" lines, once there are `count` (bounded wait).
fn ended_sessions(gateway: &Gateway, count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = gateway.log();
        let ended: Vec<String> = log.lines().filter(|l| l.contains("session ended")).map(str::to_string).collect();
        if ended.len() >= count {
            return ended;
        }
        assert!(Instant::now() < deadline, "{} of {count} sessions ended:\n{}", ended.len(), tail(&log, 40));
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// mbsync
// ---------------------------------------------------------------------------------------

/// mbsync's configuration for a plaintext IMAP account (Courier's port: no TLS there).
fn plaintext(config: String) -> String {
    config
        .lines()
        .filter(|l| !l.starts_with("CertificateFile "))
        .map(|l| if l.starts_with("SSLType ") { "SSLType None" } else { l })
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn courier_mbsync_sync_through_mailgate_equals_direct() {
    const COUNT: usize = 300;
    let started = Instant::now();
    let setup = CourierSetup::start(USERS);
    let total = setup.courier.fill("bob", COUNT, 4_242);
    println!("filled {COUNT} messages, {:.1} MB", total as f64 / 1e6);
    let log = || format!("{}\n--- courier ---\n{}", setup.gateway.log(), tail(&setup.courier.log(), 20));
    let (login, password) = setup.courier.credentials("bob");
    let user = (login.as_str(), password.as_str());

    let work = tempfile::tempdir().unwrap();
    let (direct, cold, warm) = (work.path().join("direct"), work.path().join("cold"), work.path().join("warm"));
    let gate_acct = Account { name: "gate", port: setup.gateway.addr("imaps").port(), ca: &setup.pki.ca };
    let direct_acct = Account { name: "direct", port: setup.courier.imap.port(), ca: &setup.pki.ca };
    let direct_config = plaintext(mbsync::config(&direct_acct, user, &direct, "INBOX", "Pull", "None"));
    let direct_took = mbsync::run(work.path(), &direct_config, "direct", &log);

    // Through mailgate, into a fresh Maildir each time: the second run fetches every body
    // again, from the cache.
    let mut took = Vec::new();
    for local in [&cold, &warm] {
        took.push(mbsync::run(
            work.path(),
            &mbsync::config(&gate_acct, user, local, "INBOX", "Pull", "None"),
            "gate",
            &log,
        ));
    }
    let want = contents(&direct.join("INBOX"), strip_tuid);
    assert_eq!(want.len(), COUNT, "direct sync stored {} messages", want.len());
    // Courier's files have LF line ends already, as mbsync's.
    let source = contents(&setup.courier.maildir("bob"), |m| m);
    assert!(want == source, "direct sync differs from Courier's files: {}", describe_difference(&want, &source));
    for (name, local) in [("cold", &cold), ("warm", &warm)] {
        let got = contents(&local.join("INBOX"), strip_tuid);
        assert!(got == want, "{name} sync through mailgate differs from direct: {}", describe_difference(&got, &want));
        assert_eq!(local_flags(&local.join("INBOX")), local_flags(&direct.join("INBOX")), "{name}: flags differ");
    }
    let sessions = ended_sessions(&setup.gateway, 2);
    for line in &sessions {
        println!("{line}");
    }
    let warm_line = &sessions[1];
    assert!(field(warm_line, "cache_hits=").unwrap_or(0) >= COUNT as u64, "warm run: {warm_line}");
    assert_eq!(field(warm_line, "cache_misses="), Some(0), "warm run: {warm_line}");
    println!(
        "mbsync direct {direct_took:?}, cold {:?}, warm {:?}; whole test {:?}",
        took[0],
        took[1],
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// POP3
// ---------------------------------------------------------------------------------------

/// One complete response, raw: the status line and, after `+OK` to a command with a
/// multi-line answer, every line up to the terminating `.`.
fn pop3_response(client: &mut Client, multiline: bool) -> Vec<u8> {
    let status = client.raw_line();
    let mut out = status.clone();
    if multiline && status.starts_with(b"+OK") {
        // Bounded by the client's read timeout and the message sizes.
        loop {
            let line = client.raw_line();
            out.extend_from_slice(&line);
            if line == b".\r\n" {
                break;
            }
        }
    }
    out
}

fn pop3_script(client: &mut Client, commands: &[String]) -> Vec<Vec<u8>> {
    commands
        .iter()
        .map(|c| {
            client.send(format!("{c}\r\n").as_bytes());
            let multiline = c == "LIST" || c == "UIDL" || c.starts_with("RETR ") || c.starts_with("TOP ");
            pop3_response(client, multiline)
        })
        .collect()
}

fn pop3_quit(mut client: Client) {
    client.send(b"QUIT\r\n");
    let _ = client.rest();
}

#[test]
fn courier_pop3_retr_and_top_equal_direct_cold_and_warm() {
    const COUNT: usize = 40;
    let setup = CourierSetup::start(USERS);
    setup.courier.fill("bob", COUNT, 21);
    let mut commands: Vec<String> = ["STAT", "LIST", "UIDL", "LIST 3", "UIDL 7"].map(String::from).to_vec();
    for n in [1, 2, 5, 6, 4, 13, 21, 37, 40] {
        commands.push(format!("RETR {n}"));
    }
    for (n, k) in [(2, 0), (2, 3), (6, 10), (21, 0), (40, 1000), (5, 5)] {
        commands.push(format!("TOP {n} {k}"));
    }
    commands.extend(["RETR 41", "TOP 41 0", "RETR 2"].map(String::from));

    let mut direct = setup.pop3_direct("bob");
    let expected = pop3_script(&mut direct, &commands);
    pop3_quit(direct);
    assert!(expected.iter().filter(|r| r.starts_with(b"+OK")).count() >= commands.len() - 2);

    let mut failures = Vec::new();
    for round in ["cold", "warm"] {
        let mut via = setup.pop3_login("bob");
        let got = pop3_script(&mut via, &commands);
        pop3_quit(via);
        for ((command, got), want) in commands.iter().zip(&got).zip(&expected) {
            if got != want {
                let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
                let from = at.saturating_sub(40);
                failures.push(format!(
                    "{round}: `{command}` differs ({} vs {} bytes), first at byte {at}:\n  through mailgate: {:?}\n  direct:           {:?}",
                    got.len(),
                    want.len(),
                    show(&got[from..got.len().min(at + 80)]),
                    show(&want[from..want.len().min(at + 80)])
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} POP3 answers through mailgate differ from Courier's own:\n{}",
        failures.len(),
        2 * commands.len(),
        failures.join("\n")
    );
    let sessions = ended_sessions(&setup.gateway, 2);
    for line in &sessions {
        println!("{line}");
    }
    let retrs = commands.iter().filter(|c| c.starts_with("RETR ") || c.starts_with("TOP ")).count() as u64;
    let warm = &sessions[1];
    // Every RETR and TOP of an existing message from the cache (the two of message 41 are
    // refused by Courier).
    assert!(field(warm, "cache_hits=").unwrap_or(0) >= retrs - 2, "warm: {warm}");
    assert_eq!(field(warm, "cache_misses="), Some(0), "warm: {warm}");
}

/// RFC 2449: after login, CAPA lists what the upstream's own CAPA lists in the
/// TRANSACTION state, `LOGIN-DELAY 10` included (clients space their polls by it); and
/// QUIT's `+OK` is the last thing the client reads (RFC 1939 §6).
#[test]
fn courier_pop3_capa_after_login_keeps_login_delay_and_quit_is_the_last_answer() {
    let setup = CourierSetup::start(USERS);
    let mut direct = setup.pop3_direct("bob");
    direct.send(b"CAPA\r\n");
    let want = pop3_response(&mut direct, true);
    pop3_quit(direct);
    assert!(show(&want).contains("LOGIN-DELAY 10"), "Courier's own CAPA: {}", show(&want));

    let mut via = setup.pop3_login("bob");
    via.send(b"CAPA\r\n");
    let got = pop3_response(&mut via, true);
    assert!(show(&got).contains("LOGIN-DELAY 10"), "CAPA through mailgate: {}", show(&got));
    via.send(b"QUIT\r\n");
    let quit = via.raw_line();
    assert!(quit.starts_with(b"+OK"), "{}", show(&quit));
    let rest = via.rest_bytes();
    assert!(rest.is_empty(), "after QUIT's +OK mailgate wrote {}", show(&rest));
}

// ---------------------------------------------------------------------------------------
// Relayed commands
// ---------------------------------------------------------------------------------------

/// Untagged responses raw, and the tagged line's status word and response code, with every
/// UIDVALIDITY value (`[UIDVALIDITY n]`, `STATUS (... UIDVALIDITY n)`, `[APPENDUID n ...]`,
/// `[COPYUID n ...]`) replaced: the two users' mailboxes compared were created apart.
fn relay_answer(client: &mut Client, tag: &str, command: &[u8], literal: Option<&[u8]>) -> Vec<String> {
    client.send(command);
    if let Some(data) = literal {
        let go = client.line().expect("continuation");
        assert!(go.starts_with('+'), "no continuation for the literal: {go}");
        client.send(data);
        client.send(b"\r\n");
    }
    let mut out = Vec::new();
    for response in client.responses(tag) {
        let text = show(&response);
        if let Some(rest) = text.strip_prefix(&format!("{tag} ")) {
            let word = rest.split(' ').next().unwrap_or_default();
            let code = rest.find('[').and_then(|s| rest[s..].find(']').map(|e| &rest[s..=s + e])).unwrap_or("");
            out.push(format!("tagged {word} {}", hide_uidvalidity(code)));
        } else {
            out.push(hide_uidvalidity(&text));
        }
    }
    out
}

fn hide_uidvalidity(text: &str) -> String {
    let mut out = text.to_string();
    for key in ["UIDVALIDITY ", "APPENDUID ", "COPYUID "] {
        let mut from = 0;
        // Bounded: each pass moves past one occurrence.
        while let Some(at) = out[from..].find(key).map(|i| from + i + key.len()) {
            let end = out[at..].find(|c: char| !c.is_ascii_digit()).map_or(out.len(), |i| at + i);
            out.replace_range(at..end, "N");
            from = at + 1;
        }
    }
    out
}

#[test]
fn courier_relay_commands_equal_direct() {
    let setup = CourierSetup::start(USERS);
    // Identical mailboxes: alice is driven directly, bob through mailgate.
    setup.courier.fill("alice", 30, 5);
    setup.courier.fill("bob", 30, 5);
    let message = b"From: relay@example.org\r\nTo: bob@example.org\r\nSubject: appended\r\n\
        Message-ID: <appended@example.org>\r\n\r\nAppended through the relay.\r\n.\r\nEnd.\r\n";
    let script: Vec<(String, Option<&[u8]>)> = vec![
        ("SELECT INBOX".into(), None),
        ("NOOP".into(), None),
        ("SEARCH ALL".into(), None),
        ("SEARCH UNSEEN".into(), None),
        ("UID SEARCH FLAGGED".into(), None),
        ("SEARCH SUBJECT \"e\" NOT SEEN".into(), None),
        ("STORE 1:3 +FLAGS (\\Flagged)".into(), None),
        ("UID STORE 4 +FLAGS.SILENT (\\Seen)".into(), None),
        ("STORE 5 FLAGS (\\Answered $Label1)".into(), None),
        ("FETCH 1:6 (UID FLAGS)".into(), None),
        ("STORE 2:4 +FLAGS (\\Deleted)".into(), None),
        ("EXPUNGE".into(), None),
        ("CREATE INBOX.Archive".into(), None),
        ("UID COPY 1:3 INBOX.Archive".into(), None),
        (
            format!("APPEND INBOX (\\Seen) \"01-Jan-2024 10:00:00 +0000\" {{{}}}", message.len()),
            Some(message.as_slice()),
        ),
        ("NOOP".into(), None),
        ("LIST \"\" \"*\"".into(), None),
        ("LSUB \"\" \"*\"".into(), None),
        ("STATUS INBOX (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)".into(), None),
        ("STATUS INBOX.Archive (MESSAGES UIDNEXT UNSEEN)".into(), None),
        ("EXAMINE INBOX.Archive".into(), None),
        ("FETCH 1:* (UID FLAGS RFC822.SIZE)".into(), None),
        ("SELECT INBOX".into(), None),
        ("UID SEARCH ALL".into(), None),
        ("FETCH 27 (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])".into(), None),
        ("NOOP".into(), None),
    ];
    let run = |client: &mut Client| -> Vec<Vec<String>> {
        script
            .iter()
            .enumerate()
            .map(|(i, (command, literal))| {
                let tag = format!("r{i}");
                relay_answer(client, &tag, format!("{tag} {command}\r\n").as_bytes(), *literal)
            })
            .collect()
    };
    let mut direct = setup.direct("alice");
    let want = run(&mut direct);
    let mut via = setup.login("bob");
    let got = run(&mut via);
    let excerpt = |r: &str| format!("{:?}", r.chars().take(300).collect::<String>());
    let mut failures = Vec::new();
    for (((command, _), got), want) in script.iter().zip(&got).zip(&want) {
        assert!(want.last().is_some_and(|t| t.starts_with("tagged OK")), "direct `{command}` failed: {want:?}");
        if got != want {
            let at = got.iter().zip(want).position(|(g, w)| g != w).unwrap_or(got.len().min(want.len()));
            failures.push(format!(
                "`{command}`: {} vs {} responses, first difference at response {at}:\n  through mailgate: {}\n  direct:           {}",
                got.len(),
                want.len(),
                got.get(at).map_or("(none)".into(), |r| excerpt(r)),
                want.get(at).map_or("(none)".into(), |r| excerpt(r)),
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} relayed commands answered differently through mailgate:\n{}",
        failures.len(),
        script.len(),
        failures.join("\n")
    );
}

/// Courier echoes header field names as the client spelled them: an answer cached for
/// `(date to)` must not answer `(DATE TO)`.
#[test]
fn courier_header_fields_spelled_otherwise_are_not_answered_from_each_other() {
    let setup = CourierSetup::start(USERS);
    setup.courier.fill("bob", 6, 78);
    let mut direct = setup.direct("bob");
    let mut via = setup.login("bob");
    // Every item of every FETCH response, raw (name as echoed, value), by message.
    let raw = |client: &mut Client, command: &str| -> Vec<(u32, Vec<Vec<u8>>)> {
        client.send(format!("r {command}\r\n").as_bytes());
        let mut out = Vec::new();
        for response in client.responses("r") {
            if let Some(parsed) = parse_response(&response) {
                let mut items: Vec<Vec<u8>> = parsed.items.iter().map(|i| response[i.range.clone()].to_vec()).collect();
                items.sort();
                out.push((parsed.seq, items));
            }
        }
        out
    };
    for client in [&mut direct, &mut via] {
        client.command("s", "SELECT INBOX");
    }
    for command in [
        "UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (date to)])",
        "UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (DATE TO)])",
        "UID FETCH 2 (BODY.PEEK[HEADER.FIELDS (Date To)])",
        "UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (date to)])",
    ] {
        let (got, want) = (raw(&mut via, command), raw(&mut direct, command));
        assert!(
            got == want,
            "`{command}`: through mailgate {:?}\ndirect {:?}",
            show(&got.concat_items()),
            show(&want.concat_items())
        );
    }
}

trait ConcatItems {
    fn concat_items(&self) -> Vec<u8>;
}

impl ConcatItems for Vec<(u32, Vec<Vec<u8>>)> {
    fn concat_items(&self) -> Vec<u8> {
        self.iter().flat_map(|(_, items)| items.iter().flat_map(|i| i.iter().take(60).copied())).collect()
    }
}
