mod support;

// The IMAP message cache under real clients and real mailbox changes: mbsync twice through
// mailgate (cold, then warm from the cache) against a direct sync; a mailbox deleted and
// re-created under the same name never served from old cache entries; a session fetching
// through the cache while another session flags, expunges and appends (checked response by
// response, with the same scenario straight to Dovecot as the control); partial fetches of
// one section with different lengths.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::client::Client;
use support::gateway::Gateway;
use support::mailgen::{self, lf};
use support::mbsync::{self, contents, describe_difference, local_flags, strip_tuid, Account};
use support::process::{show, tail};
use support::setup::*;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// Raw IMAP responses
// ---------------------------------------------------------------------------------------

/// The length of the literal a response line announces at its end (`{n}` / `~{n}`).
fn literal_len(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let digits = &inner[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// One complete response: its lines (with CRLF) and literal data, raw.
fn read_response(client: &mut Client) -> Vec<u8> {
    let mut response = Vec::new();
    loop {
        let line = client.raw_line();
        let literal = literal_len(&line);
        response.extend_from_slice(&line);
        match literal {
            Some(n) => response.extend_from_slice(&client.bytes(n)),
            None => return response,
        }
    }
}

/// Sends `tag command` and reads every response up to the tagged one; returns the untagged
/// responses and the tagged line.
fn exchange(client: &mut Client, tag: &str, command: &str) -> (Vec<Vec<u8>>, String) {
    client.send(format!("{tag} {command}\r\n").as_bytes());
    let mut untagged = Vec::new();
    loop {
        let response = read_response(client);
        if response.starts_with(format!("{tag} ").as_bytes()) {
            return (untagged, show(&response).trim_end().to_string());
        }
        untagged.push(response);
    }
}

fn ok(client: &mut Client, tag: &str, command: &str) -> Vec<Vec<u8>> {
    let (untagged, status) = exchange(client, tag, command);
    assert!(status.starts_with(&format!("{tag} OK")), "{command}: {status}; {:?}", untagged.iter().map(|r| show(r)));
    untagged
}

/// A FETCH response split into items: normalized name -> raw value (literals with their
/// `{n}\r\n` announcement), parsed independently of mailgate's own parser.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fetch {
    seq: u32,
    items: BTreeMap<String, Vec<u8>>,
}

impl Fetch {
    fn uid(&self) -> Option<u32> {
        std::str::from_utf8(self.items.get("UID")?).ok()?.parse().ok()
    }

    /// A string value (quoted or literal) decoded; `None` for NIL or a non-string.
    fn string(&self, name: &str) -> Option<Vec<u8>> {
        string_value(self.items.get(name)?)
    }

    /// FLAGS sorted, without `\Recent` (which belongs to whichever session saw a message
    /// first).
    fn flags(&self) -> Option<String> {
        let raw = show(self.items.get("FLAGS")?);
        let inner = raw.strip_prefix('(')?.strip_suffix(')')?;
        let mut flags: Vec<&str> = inner.split(' ').filter(|f| !f.is_empty() && *f != "\\Recent").collect();
        flags.sort_unstable();
        Some(flags.join(" "))
    }
}

fn string_value(raw: &[u8]) -> Option<Vec<u8>> {
    if let Some(rest) = raw.strip_prefix(b"\"") {
        let mut out = Vec::new();
        let mut i = 0;
        while i < rest.len() {
            match rest[i] {
                b'\\' => {
                    out.push(*rest.get(i + 1)?);
                    i += 2;
                }
                b'"' => return Some(out),
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        return None;
    }
    let rest = raw.strip_prefix(b"~").unwrap_or(raw);
    let rest = rest.strip_prefix(b"{")?;
    let close = rest.iter().position(|&b| b == b'}')?;
    let n: usize = std::str::from_utf8(&rest[..close]).ok()?.parse().ok()?;
    let data = rest[close + 1..].strip_prefix(b"\r\n")?;
    (data.len() == n).then(|| data.to_vec())
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.i += 1)
    }

    /// An item name: an atom, with `[section]` (which may hold spaces and parentheses)
    /// and `<origin>` attached.
    fn name(&mut self) -> Option<String> {
        let start = self.i;
        while let Some(b) = self.peek() {
            match b {
                b'[' => {
                    let close = self.b[self.i..].iter().position(|&c| c == b']')?;
                    self.i += close + 1;
                }
                b'<' => {
                    let close = self.b[self.i..].iter().position(|&c| c == b'>')?;
                    self.i += close + 1;
                }
                b' ' | b'(' | b')' | b'"' | b'{' => break,
                b if b < 0x21 => break,
                _ => self.i += 1,
            }
        }
        (self.i > start).then(|| show(&self.b[start..self.i]).to_ascii_uppercase())
    }

    fn value(&mut self) -> Option<()> {
        match self.peek()? {
            b'(' => {
                self.i += 1;
                loop {
                    match self.peek()? {
                        b')' => {
                            self.i += 1;
                            return Some(());
                        }
                        b' ' => self.i += 1,
                        _ => self.value()?,
                    }
                }
            }
            b'"' => {
                self.i += 1;
                loop {
                    match self.peek()? {
                        b'\\' => self.i += 2,
                        b'"' => {
                            self.i += 1;
                            return Some(());
                        }
                        b'\r' | b'\n' => return None,
                        _ => self.i += 1,
                    }
                }
            }
            b'{' | b'~' => {
                if self.peek()? == b'~' {
                    self.i += 1;
                }
                self.eat(b'{')?;
                let close = self.b[self.i..].iter().position(|&c| c == b'}')?;
                let n: usize = std::str::from_utf8(&self.b[self.i..self.i + close]).ok()?.parse().ok()?;
                self.i += close + 1;
                self.eat(b'\r')?;
                self.eat(b'\n')?;
                self.i = self.i.checked_add(n).filter(|&end| end <= self.b.len())?;
                Some(())
            }
            _ => {
                let start = self.i;
                while let Some(b) = self.peek() {
                    if b == b' ' || b == b')' || b == b'(' || b < 0x21 {
                        break;
                    }
                    self.i += 1;
                }
                (self.i > start).then_some(())
            }
        }
    }
}

/// `* n FETCH (...)\r\n`, or `None` if `response` is something else. Panics on a FETCH
/// response that does not parse (a broken response is exactly what the tests look for).
fn parse_fetch(response: &[u8]) -> Option<Fetch> {
    let rest = response.strip_prefix(b"* ")?;
    let sp = rest.iter().position(|&b| b == b' ')?;
    let seq: u32 = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
    let after = &rest[sp + 1..];
    if after.len() < 6 || !after[..6].eq_ignore_ascii_case(b"FETCH ") {
        return None;
    }
    let broken = |why: &str| -> ! { panic!("malformed FETCH response ({why}): {}", show(response)) };
    let mut p = Parser { b: response, i: response.len() - after.len() + 6 };
    if p.eat(b'(').is_none() {
        broken("no list");
    }
    let mut items = BTreeMap::new();
    loop {
        if p.peek() == Some(b')') {
            p.i += 1;
            break;
        }
        if !items.is_empty() && p.eat(b' ').is_none() {
            broken("no space between items");
        }
        let Some(name) = p.name() else { broken("item name") };
        if p.eat(b' ').is_none() {
            broken("no space after an item name");
        }
        let start = p.i;
        if p.value().is_none() {
            broken("item value");
        }
        if items.insert(name.clone(), response[start..p.i].to_vec()).is_some() {
            broken(&format!("{name} twice"));
        }
    }
    if &response[p.i..] != b"\r\n" {
        broken("trailing bytes");
    }
    Some(Fetch { seq, items })
}

/// Runs a FETCH and returns its FETCH responses keyed by sequence number (panicking on a
/// duplicate), the other untagged responses, and the tagged line.
fn fetch(client: &mut Client, tag: &str, command: &str) -> (BTreeMap<u32, Fetch>, Vec<Vec<u8>>, String) {
    let (untagged, status) = exchange(client, tag, command);
    let mut by_seq = BTreeMap::new();
    let mut other = Vec::new();
    for response in untagged {
        match parse_fetch(&response) {
            Some(f) => {
                let seq = f.seq;
                if let Some(old) = by_seq.insert(seq, f) {
                    panic!("`{command}`: two FETCH responses for {seq}: {old:?}");
                }
            }
            None => other.push(response),
        }
    }
    (by_seq, other, status)
}

/// The number in `[CODE n]` of some untagged OK.
fn response_code(responses: &[Vec<u8>], code: &str) -> Option<u32> {
    let needle = format!("[{code} ");
    responses.iter().find_map(|r| {
        let text = show(r);
        let at = text.find(&needle)? + needle.len();
        text[at..].split(']').next()?.trim().parse().ok()
    })
}

fn exists(responses: &[Vec<u8>]) -> Option<u32> {
    responses.iter().find_map(|r| show(r).strip_prefix("* ")?.trim_end().strip_suffix(" EXISTS")?.parse().ok())
}

/// APPENDs `message` to `mailbox` with a synchronizing literal (waiting for `+`) or a
/// LITERAL+ one; returns the tagged line.
fn append(client: &mut Client, tag: &str, mailbox: &str, message: &[u8], synchronizing: bool) -> String {
    let plus = if synchronizing { "" } else { "+" };
    client.send(format!("{tag} APPEND {mailbox} (\\Seen) {{{}{plus}}}\r\n", message.len()).as_bytes());
    if synchronizing {
        loop {
            let response = read_response(client);
            if response.starts_with(b"+") {
                break;
            }
            assert!(!response.starts_with(format!("{tag} ").as_bytes()), "APPEND refused: {}", show(&response));
        }
    }
    client.send(message);
    client.send(b"\r\n");
    loop {
        let response = read_response(client);
        if response.starts_with(format!("{tag} ").as_bytes()) {
            let status = show(&response).trim_end().to_string();
            assert!(status.starts_with(&format!("{tag} OK")), "APPEND: {status}");
            return status;
        }
    }
}

fn logout(mut client: Client) {
    client.send(b"z LOGOUT\r\n");
    let _ = client.rest();
}

// ---------------------------------------------------------------------------------------
// mailgate's per-session cache totals
// ---------------------------------------------------------------------------------------

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.trim_matches('"').parse().ok())
}

/// `(hits, misses)` of every session that ended after log offset `from`, once as many
/// sessions have ended there as logged in (bounded wait).
fn sessions_since(gateway: &Gateway, from: usize) -> Vec<(u64, u64, String)> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = gateway.log();
        let new = &log[from..];
        let logins = new.matches("logged in").count();
        let ended: Vec<(u64, u64, String)> = new
            .lines()
            .filter(|l| l.contains("session ended"))
            .map(|l| (field(l, "cache_hits=").unwrap_or(0), field(l, "cache_misses=").unwrap_or(0), l.to_string()))
            .collect();
        if !ended.is_empty() && ended.len() >= logins {
            return ended;
        }
        assert!(Instant::now() < deadline, "sessions did not end ({logins} logins):\n{}", tail(new, 40));
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// 1. mbsync, cold and warm
// ---------------------------------------------------------------------------------------

#[test]
fn mbsync_twice_through_the_cache_matches_a_direct_sync() {
    let started = Instant::now();
    let setup = Setup::start();
    const SEED: u64 = 4_242;
    const COUNT: usize = 2_000;
    let filled = Instant::now();
    let total = setup.dovecot.fill(BOB.0, COUNT, SEED);
    println!("filled {COUNT} messages, {:.1} MB, in {:?}", total as f64 / 1e6, filled.elapsed());
    let log = || setup.gateway.log();

    let work = tempfile::tempdir().unwrap();
    let (direct, cold, warm) = (work.path().join("direct"), work.path().join("cold"), work.path().join("warm"));
    let gate_acct = Account { name: "gate", port: setup.addr("imaps").port(), ca: &setup.pki.ca };
    let dv_ca = setup.dovecot.ca_pem();
    let direct_acct = Account { name: "direct", port: setup.dovecot.imaps.port(), ca: &dv_ca };

    let direct_took =
        mbsync::run(work.path(), &mbsync::config(&direct_acct, BOB, &direct, "INBOX", "Pull", "None"), "direct", &log);
    // Through mailgate: a fresh Maildir (and so fresh sync state) each time, so the second
    // run fetches every body again.
    let mut totals = Vec::new();
    let mut took = Vec::new();
    for local in [&cold, &warm] {
        let from = log().len();
        took.push(mbsync::run(
            work.path(),
            &mbsync::config(&gate_acct, BOB, local, "INBOX", "Pull", "None"),
            "gate",
            &log,
        ));
        let sessions = sessions_since(&setup.gateway, from);
        for (_, _, line) in &sessions {
            println!("{}: {line}", local.file_name().unwrap().to_string_lossy());
        }
        totals.push(sessions.iter().fold((0, 0), |(h, m), (hits, misses, _)| (h + hits, m + misses)));
    }

    let compared = Instant::now();
    let want = contents(&direct.join("INBOX"), strip_tuid);
    assert_eq!(want.len(), COUNT, "direct sync stored {} messages", want.len());
    let source = contents(&setup.dovecot.maildir(BOB.0), |m| lf(&m));
    assert!(want == source, "direct sync differs from the server's files: {}", describe_difference(&want, &source));
    drop(source);
    for (name, local) in [("cold", &cold), ("warm", &warm)] {
        let got = contents(&local.join("INBOX"), strip_tuid);
        assert!(got == want, "{name} sync through mailgate differs from direct: {}", describe_difference(&got, &want));
        assert_eq!(local_flags(&local.join("INBOX")), local_flags(&direct.join("INBOX")), "{name}: flags differ");
    }
    println!("direct, cold and warm Maildirs identical ({COUNT} messages); compared in {:?}", compared.elapsed());

    let ((cold_hits, cold_misses), (warm_hits, warm_misses)) = (totals[0], totals[1]);
    println!(
        "mbsync direct {direct_took:?}, cold through mailgate {:?} (cache_hits={cold_hits} cache_misses={cold_misses}), \
         warm {:?} (cache_hits={warm_hits} cache_misses={warm_misses}); whole test {:?}",
        took[0],
        took[1],
        started.elapsed()
    );
    assert!(cold_misses >= COUNT as u64, "cold run: only {cold_misses} misses");
    assert!(warm_hits >= COUNT as u64, "warm run: only {warm_hits} cache hits (misses {warm_misses})");
    assert_eq!(warm_misses, 0, "warm run: cache misses");
}

// ---------------------------------------------------------------------------------------
// 2. A mailbox deleted and created again
// ---------------------------------------------------------------------------------------

/// Message `n` of content set `set` ("A" or "B"): the same size in both sets, different
/// subject, Message-ID, charset and body.
fn box_message(set: &str, n: usize) -> Vec<u8> {
    let charset = if set == "A" { "us-ascii" } else { "utf-8" };
    let mut msg = format!(
        "From: Set {set} <set-{set}@example.org>\r\n\
         To: alice@example.org\r\n\
         Subject: Set-{set} message {n:02}\r\n\
         Date: Mon, 1 Jan 2024 10:{n:02}:00 +0000\r\n\
         Message-ID: <set-{set}-{n:02}@example.org>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset={charset}\r\n\
         \r\n"
    )
    .into_bytes();
    let target = 700 + 53 * n;
    let mut line = 0;
    while msg.len() < target {
        msg.extend_from_slice(
            format!("content-{set} of message {n:02}, line {line:03}: {}\r\n", set.repeat(20)).as_bytes(),
        );
        line += 1;
    }
    // Trim to the target inside the last line and end it properly.
    msg.truncate(target - 2);
    while msg.ends_with(b"\r") {
        msg.pop();
        msg.push(b'.');
    }
    msg.extend_from_slice(b"\r\n");
    assert!(mailgen::well_formed(&msg));
    msg
}

const BOX_ITEMS: &str = "(BODY.PEEK[] ENVELOPE BODYSTRUCTURE)";

/// Checks one FETCH of Box: 20 messages, each body, envelope and structure from `set`.
fn check_box(what: &str, got: &BTreeMap<u32, Fetch>, set: &str) {
    assert_eq!(got.len(), 20, "{what}: {} FETCH responses", got.len());
    let other = if set == "A" { "B" } else { "A" };
    for (&seq, f) in got {
        let n = seq as usize;
        let body = f.string("BODY[]").unwrap_or_else(|| panic!("{what}: no BODY[] for {seq}: {f:?}"));
        assert!(body == box_message(set, n), "{what}: message {seq} is not set {set}'s: {}", show(&body[..200]));
        let envelope = f.items.get("ENVELOPE").unwrap_or_else(|| panic!("{what}: no ENVELOPE for {seq}"));
        assert!(contains(envelope, format!("Set-{set} message {n:02}").as_bytes()), "{what}: {}", show(envelope));
        assert!(!contains(envelope, format!("Set-{other}").as_bytes()), "{what}: old envelope {}", show(envelope));
        let structure = f.items.get("BODYSTRUCTURE").unwrap_or_else(|| panic!("{what}: no BODYSTRUCTURE for {seq}"));
        let charset = if set == "A" { "us-ascii" } else { "utf-8" };
        assert!(
            show(structure).to_ascii_lowercase().contains(&format!("\"charset\" \"{charset}\"")),
            "{what}: BODYSTRUCTURE of {seq}: {}",
            show(structure)
        );
    }
}

/// FETCH `command` through `via` and straight from Dovecot: identical item by item.
fn fetch_both(setup: &Setup, via: &mut Client, command: &str, examine: &str) -> BTreeMap<u32, Fetch> {
    let (got, other, status) = fetch(via, "f", command);
    assert!(status.starts_with("f OK"), "{command}: {status}; {other:?}");
    let mut direct = setup.direct(ALICE);
    ok(&mut direct, "s", examine);
    let (want, _, status) = fetch(&mut direct, "f", command);
    assert!(status.starts_with("f OK"), "direct {command}: {status}");
    logout(direct);
    assert_eq!(got.len(), want.len(), "{command}: message count through mailgate vs direct");
    for (seq, w) in &want {
        let g = got.get(seq).unwrap_or_else(|| panic!("{command}: no FETCH response for {seq} through mailgate"));
        for (name, value) in &w.items {
            let mine = g.items.get(name).unwrap_or_else(|| panic!("{command}: {seq} lacks {name} through mailgate"));
            assert!(
                mine == value,
                "{command}: {name} of {seq} differs:\nmailgate: {}\ndirect:   {}",
                show(&mine[..mine.len().min(300)]),
                show(&value[..value.len().min(300)])
            );
        }
        assert_eq!(
            g.items.keys().collect::<Vec<_>>(),
            w.items.keys().collect::<Vec<_>>(),
            "{command}: items of {seq} differ"
        );
    }
    got
}

#[test]
fn a_recreated_mailbox_never_serves_old_content() {
    let started = Instant::now();
    let setup = Setup::start();
    let log = || setup.gateway.log();
    let work = tempfile::tempdir().unwrap();
    let gate_acct = Account { name: "gate", port: setup.addr("imaps").port(), ca: &setup.pki.ca };
    let dv_ca = setup.dovecot.ca_pem();
    let direct_acct = Account { name: "direct", port: setup.dovecot.imaps.port(), ca: &dv_ca };

    let mut via = setup.login(ALICE);
    ok(&mut via, "c", "CREATE Box");
    for n in 1..=20 {
        append(&mut via, "a", "Box", &box_message("A", n), n % 2 == 0);
    }
    let selected = ok(&mut via, "s", "SELECT Box");
    let first_validity = response_code(&selected, "UIDVALIDITY").expect("UIDVALIDITY");
    assert_eq!(exists(&selected), Some(20));
    // Twice: the second answer comes from the cache.
    for round in ["cold", "warm"] {
        let got = fetch_both(&setup, &mut via, &format!("FETCH 1:* {BOX_ITEMS}"), "EXAMINE Box");
        check_box(&format!("set A {round}"), &got, "A");
        let got = fetch_both(&setup, &mut via, &format!("UID FETCH 1:* {BOX_ITEMS}"), "EXAMINE Box");
        check_box(&format!("set A {round} by UID"), &got, "A");
    }
    // mbsync warms the cache with its own `UID FETCH n (BODY.PEEK[])` too.
    let a_sync = work.path().join("a-sync");
    mbsync::run(work.path(), &mbsync::config(&gate_acct, ALICE, &a_sync, "Box", "Pull", "None"), "gate", &log);
    let a_files = contents(&a_sync.join("Box"), strip_tuid);
    assert_eq!(a_files, (1..=20).map(|n| lf(&box_message("A", n))).collect::<Vec<_>>().tap_sort());

    // Gone, and back under the same name with other content of the same sizes, at once
    // (within the same second).
    let recreate = Instant::now();
    ok(&mut via, "u", "CLOSE");
    ok(&mut via, "d", "DELETE Box");
    ok(&mut via, "c", "CREATE Box");
    for n in 1..=20 {
        append(&mut via, "b", "Box", &box_message("B", n), n % 2 == 1);
    }
    let selected = ok(&mut via, "s", "SELECT Box");
    let second_validity = response_code(&selected, "UIDVALIDITY").expect("UIDVALIDITY");
    let first_uid = {
        let (got, _, _) = fetch(&mut via, "u", "FETCH 1 (UID)");
        got[&1].uid().unwrap()
    };
    println!(
        "UIDVALIDITY {first_validity} before, {second_validity} after re-creating Box ({:?} later); first UID again {first_uid}",
        recreate.elapsed()
    );
    assert_ne!(first_validity, second_validity, "Dovecot reused the UIDVALIDITY of a re-created mailbox");
    for round in ["first", "second"] {
        let got = fetch_both(&setup, &mut via, &format!("FETCH 1:* {BOX_ITEMS}"), "EXAMINE Box");
        check_box(&format!("set B {round}"), &got, "B");
        let got = fetch_both(&setup, &mut via, &format!("UID FETCH 1:* {BOX_ITEMS}"), "EXAMINE Box");
        check_box(&format!("set B {round} by UID"), &got, "B");
    }
    logout(via);
    // A new session, with the cache warm for both generations.
    let mut fresh = setup.login(ALICE);
    ok(&mut fresh, "s", "EXAMINE Box");
    let got = fetch_both(&setup, &mut fresh, &format!("FETCH 1:* {BOX_ITEMS}"), "EXAMINE Box");
    check_box("set B, new session", &got, "B");
    logout(fresh);

    // And mbsync into fresh Maildirs, through mailgate and directly.
    let (b_gate, b_direct) = (work.path().join("b-gate"), work.path().join("b-direct"));
    mbsync::run(work.path(), &mbsync::config(&gate_acct, ALICE, &b_gate, "Box", "Pull", "None"), "gate", &log);
    mbsync::run(work.path(), &mbsync::config(&direct_acct, ALICE, &b_direct, "Box", "Pull", "None"), "direct", &log);
    let got = contents(&b_gate.join("Box"), strip_tuid);
    let want = contents(&b_direct.join("Box"), strip_tuid);
    assert!(got == want, "mbsync of the new Box differs: {}", describe_difference(&got, &want));
    assert_eq!(got, (1..=20).map(|n| lf(&box_message("B", n))).collect::<Vec<_>>().tap_sort());

    let ended = sessions_since(&setup.gateway, 0);
    for (_, _, line) in &ended {
        println!("{line}");
    }
    println!("recreated-mailbox test took {:?}", started.elapsed());
}

trait TapSort {
    fn tap_sort(self) -> Self;
}

impl<T: Ord> TapSort for Vec<T> {
    fn tap_sort(mut self) -> Self {
        self.sort_unstable();
        self
    }
}

// ---------------------------------------------------------------------------------------
// 3. Expunges and appends from another session while fetching through the cache
// ---------------------------------------------------------------------------------------

/// What a message looks like to the test: (flags, header bytes, size).
type Seen = (String, Vec<u8>, u32);

fn seen(f: &Fetch) -> Seen {
    let header = f.string("BODY[HEADER]").unwrap_or_else(|| panic!("no BODY[HEADER]: {f:?}"));
    let size = show(f.items.get("RFC822.SIZE").unwrap_or_else(|| panic!("no RFC822.SIZE: {f:?}"))).parse().unwrap();
    (f.flags().unwrap_or_else(|| panic!("no FLAGS: {f:?}")), header, size)
}

const LOOP_ITEMS: &str = "(UID FLAGS BODY.PEEK[HEADER] RFC822.SIZE)";

/// A fresh direct session's view of bob's INBOX: UIDs in sequence order and what each is.
fn direct_view(setup: &Setup, user: (&str, &str)) -> (Vec<u32>, BTreeMap<u32, Seen>) {
    let mut direct = setup.direct(user);
    ok(&mut direct, "s", "EXAMINE INBOX");
    let (got, _, status) = fetch(&mut direct, "f", &format!("FETCH 1:* {LOOP_ITEMS}"));
    assert!(status.starts_with("f OK"), "{status}");
    logout(direct);
    let order: Vec<u32> = got.values().map(|f| f.uid().unwrap()).collect();
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), (1..=got.len() as u32).collect::<Vec<_>>());
    (order, got.values().map(|f| (f.uid().unwrap(), seen(f))).collect())
}

/// Session A's mailbox as the responses it received describe it, in the order received:
/// the UID and the latest FLAGS at each sequence number (`None` until a response names
/// them). Every inconsistency is noted.
#[derive(Default)]
struct View {
    uids: Vec<Option<u32>>,
    flags: Vec<Option<String>>,
    problems: Vec<String>,
    expunges: usize,
    exists: usize,
    /// Unsolicited FETCH (FLAGS) updates without UID.
    updates: usize,
    /// Sequence numbers that got a FLAGS-only update during the current command, with the
    /// flags it announced.
    updated: BTreeMap<usize, String>,
}

impl View {
    /// Starts a new command (for the per-command checks).
    fn begin(&mut self) {
        self.updated.clear();
    }

    /// Applies one untagged response received while `command` ran; the FETCH responses
    /// that carry a UID are returned.
    fn apply(&mut self, command: &str, response: &[u8]) -> Option<Fetch> {
        let text = show(response);
        let non_uid_fetch = command.contains(" FETCH ") && !command.contains(" UID FETCH ");
        if let Some(n) = text.strip_prefix("* ").and_then(|t| t.trim_end().strip_suffix(" EXPUNGE")) {
            let n: usize = n.parse().unwrap();
            self.expunges += 1;
            if non_uid_fetch {
                self.problems.push(format!("`{command}`: `* {n} EXPUNGE` while answering a FETCH (RFC 9051 §7.5.1)"));
            }
            if n == 0 || n > self.uids.len() {
                self.problems.push(format!("`{command}`: EXPUNGE {n} with {} messages", self.uids.len()));
            } else {
                self.uids.remove(n - 1);
                self.flags.remove(n - 1);
            }
            self.updated = std::mem::take(&mut self.updated)
                .into_iter()
                .filter(|(seq, _)| *seq != n)
                .map(|(seq, f)| (if seq > n { seq - 1 } else { seq }, f))
                .collect();
            return None;
        }
        if let Some(n) = text.strip_prefix("* ").and_then(|t| t.trim_end().strip_suffix(" EXISTS")) {
            let n: usize = n.parse().unwrap();
            self.exists += 1;
            if n < self.uids.len() {
                self.problems.push(format!("`{command}`: EXISTS {n} shrinks {} messages", self.uids.len()));
            }
            self.uids.resize(n, None);
            self.flags.resize(n, None);
            return None;
        }
        let f = parse_fetch(response)?;
        let seq = f.seq as usize;
        if seq == 0 || seq > self.uids.len() {
            self.problems.push(format!(
                "`{command}`: FETCH {seq} beyond {} messages: {}",
                self.uids.len(),
                text.trim_end()
            ));
            return None;
        }
        let flags = f.flags();
        let Some(uid) = f.uid() else {
            // An unsolicited flag update (RFC 9051 §7.5.2): only FLAGS, no UID needed.
            if f.items.keys().any(|k| k != "FLAGS" && k != "MODSEQ") || flags.is_none() {
                self.problems.push(format!("`{command}`: FETCH without UID: {}", text.trim_end()));
                return None;
            }
            self.updates += 1;
            self.flags[seq - 1] = flags.clone();
            self.updated.insert(seq, flags.unwrap());
            return None;
        };
        match self.uids[seq - 1] {
            Some(known) if known != uid => self.problems.push(format!(
                "`{command}`: FETCH {seq} says UID {uid}, but {seq} is UID {known} in the client's view"
            )),
            _ => self.uids[seq - 1] = Some(uid),
        }
        let known: Vec<u32> = self.uids.iter().flatten().copied().collect();
        if known.windows(2).any(|w| w[0] >= w[1]) {
            self.problems.push(format!("`{command}`: UIDs no longer ascending after FETCH {seq} UID {uid}"));
        }
        if let Some(flags) = flags {
            if let Some(newer) = self.updated.get(&seq) {
                if *newer != flags {
                    self.problems.push(format!(
                        "`{command}`: FETCH {seq} (UID {uid}) says FLAGS ({flags}) after an update to ({newer}) \
                         in the same command: the client is left with the older flags"
                    ));
                }
            }
            self.flags[seq - 1] = Some(flags);
        }
        Some(f)
    }
}

/// A response for a report: literal data replaced by its length.
fn sketch(response: &[u8]) -> String {
    let mut out = String::new();
    let mut rest = response;
    while !rest.is_empty() {
        let end = rest.iter().position(|&b| b == b'\n').map_or(rest.len(), |i| i + 1);
        let line = &rest[..end];
        out.push_str(show(line).trim_end_matches(['\r', '\n']));
        rest = &rest[end..];
        if let Some(n) = literal_len(line) {
            out.push_str(&format!("<{n} bytes>"));
            rest = &rest[n.min(rest.len())..];
        }
    }
    out
}

/// The responses of one command around what went wrong: every response that is not a
/// FETCH with a UID, each FETCH response for a sequence number a problem names, and one
/// response either side of those; the rest elided.
fn excerpt(responses: &[Vec<u8>], problems: &[String]) -> String {
    let named: Vec<String> = problems
        .iter()
        .filter_map(|p| p.split("`: FETCH ").nth(1)?.split(' ').next().map(|n| format!("* {n} FETCH ")))
        .collect();
    let interesting: Vec<bool> = responses
        .iter()
        .map(|r| {
            let text = sketch(r);
            !(text.contains(" FETCH (UID ")) || named.iter().any(|n| text.starts_with(n.as_str()))
        })
        .collect();
    let mut out = Vec::new();
    let mut elided = false;
    for (i, r) in responses.iter().enumerate() {
        let near = interesting[i.saturating_sub(1)..(i + 2).min(responses.len())].iter().any(|&b| b);
        if near {
            out.push(format!("  {}", sketch(r)));
            elided = false;
        } else if !elided {
            out.push("  ...".to_string());
            elided = true;
        }
    }
    out.join("\n")
}

/// What one run of the concurrent scenario saw.
struct Outcome {
    /// Invalid responses A received (protocol and content), in order.
    problems: Vec<String>,
    /// The complete responses of the first commands that had problems, sketched.
    evidence: Vec<String>,
    summary: String,
    /// A's sequence -> UID view after the final NOOP, and a fresh direct session's.
    a_order: Vec<u32>,
    final_order: Vec<u32>,
    /// (UID, A's flags from the responses it got, direct flags) where they differ after
    /// the final NOOP.
    stale_flags: Vec<(u32, Option<String>, String)>,
    /// UIDs where A's final FETCH 1:* differs from a fresh direct session's.
    differing: Vec<u32>,
}

/// Session A (from `connect`) selects `user`'s INBOX of 200 messages, warms the cache with
/// the headers, then loops over FETCH 1:* and NOOP while session B (also from `connect`)
/// flags, expunges and appends; finally A's view is compared with a fresh direct session.
fn concurrent_scenario(setup: &Setup, user: (&'static str, &str), connect: &dyn Fn() -> Client) -> Outcome {
    const SEED: u64 = 303;
    setup.dovecot.fill(user.0, 200, SEED);
    let (initial_order, mut reference) = direct_view(setup, user);
    assert_eq!(initial_order.len(), 200);

    // A: selects and warms the cache with the headers.
    let mut a = connect();
    let mut view = View::default();
    for response in ok(&mut a, "s", "SELECT INBOX") {
        view.apply("SELECT INBOX", &response);
    }
    assert_eq!(view.uids.len(), 200);
    let (untagged, status) = exchange(&mut a, "w", "UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER])");
    assert!(status.starts_with("w OK"), "{status}");
    for response in &untagged {
        let f = view.apply("w UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER])", response).expect("FETCH");
        let uid = f.uid().unwrap();
        assert!(f.string("BODY[HEADER]") == Some(reference[&uid].1.clone()), "warming: header of UID {uid}");
    }
    assert!(view.problems.is_empty(), "{:?}", view.problems);

    // A's loop, in a thread: FETCH 1:* and NOOP. Odd rounds add an item never cached before
    // (a header field no message has, a new one each round), so that every message goes
    // through phase two, in two batches, with B's changes landing in between.
    let b_done = Arc::new(AtomicBool::new(false));
    let b_started = Arc::new(AtomicBool::new(false));
    let (done, go) = (b_done.clone(), b_started.clone());
    let looping = thread::spawn(move || {
        let mut observed: Vec<(u32, Fetch, String)> = Vec::new();
        let mut statuses: Vec<String> = Vec::new();
        let mut evidence: Vec<String> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut round = 0u32;
        // One more round once B is done: a FETCH that began before B's last APPENDs were
        // visible would leave their UIDs unknown to A (a race of the test, not of mailgate).
        let mut last_rounds = 1;
        loop {
            if round >= 20 && done.load(Ordering::SeqCst) {
                if last_rounds == 0 {
                    break;
                }
                last_rounds -= 1;
            }
            if round == 2 {
                go.store(true, Ordering::SeqCst);
            }
            if round >= 400 || Instant::now() > deadline {
                view.problems.push(format!("loop still running after {round} rounds"));
                break;
            }
            let command = if round % 2 == 0 {
                format!("FETCH 1:* {LOOP_ITEMS}")
            } else {
                format!(
                    "FETCH 1:* (UID FLAGS BODY.PEEK[HEADER] RFC822.SIZE BODY.PEEK[HEADER.FIELDS (X-ROUND-{round})])"
                )
            };
            for (tag, command) in [(format!("f{round}"), command.as_str()), (format!("n{round}"), "NOOP")] {
                let (untagged, status) = exchange(&mut a, &tag, command);
                let label = format!("{tag} {command}");
                let before = view.problems.len();
                view.begin();
                for response in &untagged {
                    if let Some(f) = view.apply(&label, response) {
                        observed.push((round, f, label.clone()));
                    }
                }
                if view.problems.len() > before && evidence.len() < 4 {
                    evidence.push(format!("{label}\n{}\n  {status}", excerpt(&untagged, &view.problems[before..])));
                }
                statuses.push(status);
            }
            round += 1;
        }
        (a, view, observed, statuses, evidence, round)
    });

    // B: flags, expunges and appends meanwhile.
    let wait = Instant::now();
    while !b_started.load(Ordering::SeqCst) {
        assert!(wait.elapsed() < Duration::from_secs(60), "session A's loop did not start");
        thread::sleep(Duration::from_millis(5));
    }
    let mut b = connect();
    ok(&mut b, "s", "SELECT INBOX");
    let mut appended = 0;
    let mut expunged = Vec::new();
    let join = |uids: &[u32]| uids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    for k in 0..5u32 {
        // Flagged and kept: A must end up seeing the flag.
        let flag: Vec<u32> = (1..=200).filter(|u| u % 25 == k * 5 + 4).collect();
        ok(&mut b, "g", &format!("UID STORE {} +FLAGS.SILENT (\\Flagged)", join(&flag)));
        let uids: Vec<u32> = (1..=200).filter(|u| u % 25 == k * 5 + 3).collect();
        ok(&mut b, "t", &format!("UID STORE {} +FLAGS.SILENT (\\Deleted)", join(&uids)));
        thread::sleep(Duration::from_millis(40));
        ok(&mut b, "e", "EXPUNGE");
        expunged.extend(uids);
        for i in 0..6 {
            let msg = mailgen::message(SEED + 1, appended, 0);
            append(&mut b, "a", "INBOX", &msg, i % 2 == 0);
            appended += 1;
        }
        ok(&mut b, "n", "NOOP");
        thread::sleep(Duration::from_millis(150));
    }
    logout(b);
    b_done.store(true, Ordering::SeqCst);
    let b_took = wait.elapsed();

    let (mut a, mut view, observed, statuses, evidence, rounds) = looping.join().expect("session A's thread panicked");
    let (final_order, final_reference) = direct_view(setup, user);
    assert_eq!(final_order.len(), 200 - expunged.len() + appended, "direct view after B");
    reference.extend(final_reference.clone());

    // Converge: after a NOOP, what A learnt from the responses (not fetched again) is the
    // mailbox as it is: the same UIDs in the same order, the same flags.
    view.begin();
    for response in ok(&mut a, "n", "NOOP") {
        view.apply("final NOOP", &response);
    }
    let a_order: Vec<u32> = view.uids.iter().map(|u| u.unwrap_or(0)).collect();
    let stale_flags: Vec<(u32, Option<String>, String)> = a_order
        .iter()
        .zip(&view.flags)
        .filter(|(uid, flags)| final_reference.get(uid).map(|s| &s.0) != flags.as_ref())
        .map(|(uid, flags)| (*uid, flags.clone(), final_reference.get(uid).map(|s| s.0.clone()).unwrap_or_default()))
        .collect();
    // Then the whole mailbox once more.
    let label = format!("F FETCH 1:* {LOOP_ITEMS}");
    let (untagged, status) = exchange(&mut a, "F", &format!("FETCH 1:* {LOOP_ITEMS}"));
    assert!(status.starts_with("F OK"), "{status}");
    let mut last: BTreeMap<u32, Seen> = BTreeMap::new();
    view.begin();
    for response in &untagged {
        if let Some(f) = view.apply(&label, response) {
            last.insert(f.uid().unwrap(), seen(&f));
        }
    }
    logout(a);

    // Every response A got during the loop: a UID, and that UID's header and size.
    let (mut checked, mut placeholders) = (0, 0);
    let mut problems = view.problems.clone();
    for (_, f, label) in &observed {
        let uid = f.uid().unwrap();
        let Some((_, header, size)) = reference.get(&uid) else {
            problems.push(format!("`{label}`: UID {uid} never existed"));
            continue;
        };
        // Dovecot's placeholders for a message another session expunged meanwhile (RFC 2180
        // §4.1.3), straight from Dovecot too: NIL sections and RFC822.SIZE 0.
        let placeholder = |name: &str, value: &[u8]| {
            expunged.contains(&uid) && (value == b"NIL" || (name == "RFC822.SIZE" && value == b"0"))
        };
        if f.items.iter().any(|(name, value)| placeholder(name, value)) {
            placeholders += 1;
        }
        if let Some(raw) = f.items.get("BODY[HEADER]").filter(|raw| !placeholder("BODY[HEADER]", raw)) {
            if string_value(raw).as_ref() != Some(header) {
                problems.push(format!("`{label}`: BODY[HEADER] of UID {uid} differs: {}", sketch(raw)));
            }
            checked += 1;
        }
        if let Some(raw) = f.items.get("RFC822.SIZE") {
            if !placeholder("RFC822.SIZE", raw) && show(raw).parse::<u32>().ok() != Some(*size) {
                problems.push(format!("`{label}`: RFC822.SIZE of UID {uid} is {}", show(raw)));
            }
        }
        if let Some((name, raw)) = f.items.iter().find(|(name, _)| name.starts_with("BODY[HEADER.FIELDS")) {
            if !placeholder(name, raw) && string_value(raw).as_deref() != Some(&b"\r\n"[..]) {
                problems.push(format!("`{label}`: {name} of UID {uid} is {}", sketch(raw)));
            }
        }
    }
    let nos = statuses.iter().filter(|s| s.split(' ').nth(1).is_none_or(|w| w != "OK")).collect::<Vec<_>>();
    let incomplete = observed
        .iter()
        .filter(|(_, f, label)| label.contains("FETCH 1:*") && !f.items.contains_key("RFC822.SIZE"))
        .count();
    let summary = format!(
        "A: {rounds} rounds, {} FETCH responses ({checked} headers checked, {incomplete} without all items), \
         {} EXPUNGE, {} EXISTS and {} flag updates seen, {placeholders} responses with placeholders (NIL, size 0) for expunged UIDs, \
         non-OK completions {nos:?}; B: {} expunged, {appended} appended in {b_took:?}",
        observed.len(),
        view.expunges,
        view.exists,
        view.updates,
        expunged.len(),
    );
    let differing: Vec<u32> =
        final_reference.keys().chain(last.keys()).filter(|u| last.get(u) != final_reference.get(u)).copied().collect();
    Outcome { problems, evidence, summary, a_order, final_order, stale_flags, differing }
}

/// Problems by kind (the words after the command), for a short report.
fn kinds(problems: &[String]) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for p in problems {
        let rest = p.split("`: ").nth(1).unwrap_or(p);
        let kind = if rest.starts_with("`*") {
            "EXPUNGE while answering a FETCH".to_string()
        } else if rest.contains("after an update to") {
            "older FLAGS after a flag update".to_string()
        } else {
            rest.split(' ').take(4).collect::<Vec<_>>().join(" ")
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

#[test]
fn concurrent_expunge_and_append_while_fetching_through_the_cache() {
    let started = Instant::now();
    let setup = Setup::start();
    // The control: the same scenario straight to Dovecot (alice), proving the checks
    // themselves accept what a real server says.
    let control = concurrent_scenario(&setup, ALICE, &|| {
        let mut c = setup.direct(ALICE);
        c.command("c", "CAPABILITY");
        c
    });
    println!("direct (control): {}", control.summary);
    println!("direct (control): problems {:?}", kinds(&control.problems));
    let through = concurrent_scenario(&setup, BOB, &|| setup.login(BOB));
    println!("through mailgate: {}", through.summary);
    println!("through mailgate: problems {:?}", kinds(&through.problems));
    for e in &through.evidence {
        println!("--- evidence ---\n{e}");
    }
    for (_, _, line) in sessions_since(&setup.gateway, 0) {
        println!("{line}");
    }
    println!("concurrent test took {:?}", started.elapsed());

    let mut failures = Vec::new();
    for (name, o) in [("direct (control)", &control), ("through mailgate", &through)] {
        if !o.problems.is_empty() {
            failures.push(format!(
                "{name}: session A received {} invalid responses {:?}:\n{}\n--- first commands with problems ---\n{}",
                o.problems.len(),
                kinds(&o.problems),
                o.problems.iter().take(20).cloned().collect::<Vec<_>>().join("\n"),
                o.evidence.iter().map(|e| e.chars().take(5000).collect::<String>()).collect::<Vec<_>>().join("\n\n"),
            ));
        }
        if o.a_order != o.final_order {
            failures.push(format!("{name}: A's sequence -> UID view after NOOP differs from a direct session's"));
        }
        if !o.stale_flags.is_empty() {
            failures.push(format!("{name}: A's flags after NOOP differ (uid, A, direct): {:?}", o.stale_flags));
        }
        if !o.differing.is_empty() {
            failures.push(format!("{name}: A's final FETCH differs from direct for UIDs {:?}", o.differing));
        }
        println!(
            "{name}: converged after NOOP: order {}, flags {}; final FETCH equal to direct: {}",
            o.a_order == o.final_order,
            o.stale_flags.is_empty(),
            o.differing.is_empty()
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// ---------------------------------------------------------------------------------------
// 4. Partial fetches of different lengths (found while writing test 3)
// ---------------------------------------------------------------------------------------

#[test]
fn partial_fetches_of_different_lengths_are_not_confused() {
    let setup = Setup::start();
    setup.dovecot.fill(ALICE.0, 5, 55);
    let commands =
        ["FETCH 1:5 BODY.PEEK[]<0.100>", "FETCH 1:5 BODY.PEEK[]<0.200>", "FETCH 1:5 (BODY.PEEK[HEADER]<0.50>)"];
    let mut direct = setup.direct(ALICE);
    ok(&mut direct, "s", "EXAMINE INBOX");
    let mut via = setup.login(ALICE);
    ok(&mut via, "s", "EXAMINE INBOX");
    let mut wrong = Vec::new();
    for command in commands {
        let (want, _, _) = fetch(&mut direct, "f", command);
        let (got, _, _) = fetch(&mut via, "f", command);
        for (seq, w) in &want {
            let g = got.get(seq).map(|g| &g.items);
            if g != Some(&w.items) {
                wrong.push(format!(
                    "`{command}` message {seq}: mailgate {:?}, direct {:?}",
                    g.map(|i| i.iter().map(|(k, v)| format!("{k} {}", sketch(v))).collect::<Vec<_>>()),
                    w.items.iter().map(|(k, v)| format!("{k} {}", sketch(v))).collect::<Vec<_>>()
                ));
            }
        }
    }
    logout(via);
    logout(direct);
    assert!(wrong.is_empty(), "partial fetches through mailgate differ from direct:\n{}", wrong.join("\n"));
}
