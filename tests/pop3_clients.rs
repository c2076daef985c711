mod support;

// Real POP3 clients (fetchmail, curl) as subprocesses, through mailgate and straight to
// Dovecot, with the results compared byte for byte.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::client::Client;
use support::fetchmail::*;
use support::gateway::Gateway;
use support::mailgen::{self, lf};
use support::process::{curl, read_all, run_bounded, show, tail};
use support::setup::*;
use support::tls::client_config_trusting;

/// Kills a process group (by its id) when dropped.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let pgid = self.0.id();
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).stderr(Stdio::null()).status();
        let _ = self.0.wait();
    }
}

/// Starts fetchmail in a process group of its own, waits (bounded) until the MDA blocks
/// (`poll.block_after`), then SIGKILLs the group: fetchmail dies mid-session, after some
/// deliveries, without QUIT. Returns fetchmail's output so far.
fn fetchmail_cut(work: &Path, poll: &Poll, log: &dyn Fn() -> String) -> String {
    let (_, marker) = poll.block_after.expect("a cut run needs block_after");
    let mut out = tempfile::tempfile().unwrap();
    let mut cmd = fetchmail_command(work, poll, BOB);
    cmd.process_group(0).stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out.try_clone().unwrap());
    let mut group = Group(cmd.spawn().expect("spawning fetchmail"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !marker.exists() {
        if let Ok(Some(status)) = group.0.try_wait() {
            panic!(
                "fetchmail exited ({status}) before the MDA blocked\n{}\n--- mailgate log (tail) ---\n{}",
                show(&read_all(&mut out)),
                tail(&log(), 40)
            );
        }
        assert!(Instant::now() < deadline, "the MDA did not block within 60 s\n{}", show(&read_all(&mut out)));
        thread::sleep(Duration::from_millis(10));
    }
    drop(group);
    show(&read_all(&mut out))
}

/// fetchmail lines that complain about something: warnings, errors, mismatches... (not
/// the protocol trace, checked separately, nor the warning about running as root).
fn complaints(output: &str) -> Vec<String> {
    const WORDS: &str = "warn|error|fail|mismatch|bogus|unexpected|refused|timeout|timed out|strange|invalid|mangled|\
                         truncat|lock busy|malformed|not support";
    output
        .lines()
        .filter(|l| !l.contains("POP3< ") && !l.contains("POP3> "))
        .filter(|l| !l.contains("Running as root is discouraged"))
        .filter(|l| {
            let low = l.to_ascii_lowercase();
            WORDS.split('|').any(|w| low.contains(w))
        })
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Messages and maildrops
// ---------------------------------------------------------------------------------------

/// Regular files in `dir`, or in `dir`/cur and /new for a Maildir.
fn files(dir: &Path, maildir: bool) -> Vec<PathBuf> {
    let dirs = if maildir { vec![dir.join("cur"), dir.join("new")] } else { vec![dir.to_path_buf()] };
    let mut files = Vec::new();
    for dir in dirs {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                files.push(entry.path());
            }
        }
    }
    files
}

/// The messages on the server, as fetchmail should deliver them, sorted: with LF line
/// endings, as fetchmail hands messages to an MDA (`stripcr` is its default with `mda`).
fn maildrop_contents(maildir: &Path) -> Vec<Vec<u8>> {
    let mut all: Vec<Vec<u8>> = files(maildir, true).iter().map(|p| lf(&fs::read(p).unwrap())).collect();
    all.sort_unstable();
    all
}

/// Splits what fetchmail delivered into the message as it was on the server and the one
/// header fetchmail added, with its run-dependent part blanked.
///
/// fetchmail adds exactly one header (after `Return-Path:`), e.g. (continuation lines
/// start with a tab)
///
/// ```text
/// Received: from 127.0.0.1 [127.0.0.1]
///     by HOSTNAME with POP3 (fetchmail-6.4.37)
///     for <LOCALUSER@localhost> (single-drop); Fri, 27 Nov 2026 14:15:12 +0000 (UTC)
/// ```
///
/// It names the server by the address polled (127.0.0.1 in every run: the port is not
/// part of it, so Dovecot and both mailgate listeners give the same text), this host,
/// fetchmail's version and the local recipient, all fixed, and the delivery time, the
/// only part that differs between runs. So the time is cut off (everything after
/// "(single-drop); " up to the end of the header) and the rest must be identical for every
/// message of every run; the header itself is removed from the message, which must then
/// equal the server's copy. mailgen's own `Received:` headers all come `from mx…`, so the
/// match is unambiguous. Nothing else is touched: with `no rewrite` and no `mimedecode`
/// fetchmail changes nothing else.
fn split_fetchmail_header(msg: &[u8]) -> (Vec<u8>, String) {
    const START: &[u8] = b"Received: from 127.0.0.1 [127.0.0.1]\n";
    const WHEN: &[u8] = b"(single-drop); ";
    let header_end = memchr::memmem::find(msg, b"\n\n").unwrap_or_else(|| panic!("no header end: {}", preview(msg)));
    let at = memchr::memmem::find_iter(&msg[..header_end], START)
        .filter(|&i| i == 0 || msg[i - 1] == b'\n')
        .collect::<Vec<_>>();
    assert_eq!(at.len(), 1, "expected one fetchmail Received: header: {}", preview(msg));
    let at = at[0];
    // The field ends at the first line that is not a continuation (tab or space).
    let mut end = at;
    loop {
        end += memchr::memchr(b'\n', &msg[end..]).expect("header line end") + 1;
        if !matches!(msg.get(end), Some(b'\t' | b' ')) {
            break;
        }
    }
    let field = &msg[at..end];
    let when = memchr::memmem::find(field, WHEN).unwrap_or_else(|| panic!("no date in {}", show(field)));
    let normalized = format!("{}<time>", show(&field[..when + WHEN.len()]));
    let mut message = msg[..at].to_vec();
    message.extend_from_slice(&msg[end..]);
    (message, normalized)
}

fn preview(msg: &[u8]) -> String {
    show(&msg[..msg.len().min(400)])
}

/// What fetchmail stored in `dir`: the messages without fetchmail's header (sorted), and
/// that header's run-independent part (which must be the same for all).
fn delivered(dir: &Path) -> (Vec<Vec<u8>>, String) {
    let mut messages = Vec::new();
    let mut headers = std::collections::BTreeSet::new();
    for path in files(dir, false) {
        let (message, header) = split_fetchmail_header(&fs::read(&path).unwrap());
        messages.push(message);
        headers.insert(header);
    }
    messages.sort_unstable();
    assert_eq!(headers.len(), 1, "fetchmail's header varies beyond the time: {headers:#?}");
    (messages, headers.into_iter().next().unwrap())
}

fn describe_difference(a: &[Vec<u8>], b: &[Vec<u8>]) -> String {
    let only_a: Vec<&Vec<u8>> = a.iter().filter(|m| b.binary_search(m).is_err()).collect();
    let only_b: Vec<&Vec<u8>> = b.iter().filter(|m| a.binary_search(m).is_err()).collect();
    format!(
        "{} vs {} messages; {} only in the first (sizes {:?}), {} only in the second (sizes {:?})\nfirst unmatched in first: {}\nfirst unmatched in second: {}",
        a.len(),
        b.len(),
        only_a.len(),
        only_a.iter().take(20).map(|m| m.len()).collect::<Vec<_>>(),
        only_b.len(),
        only_b.iter().take(20).map(|m| m.len()).collect::<Vec<_>>(),
        only_a.first().map(|m| preview(m)).unwrap_or_default(),
        only_b.first().map(|m| preview(m)).unwrap_or_default(),
    )
}

/// STAT straight to Dovecot: (messages, octets). Dovecot locks a maildrop for one session
/// at a time (`pop3_lock_session`), and a session mailgate just closed may still hold the
/// lock for a moment, so `[IN-USE]` is retried for up to 20 s.
fn direct_stat(setup: &Setup) -> (usize, u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let config = client_config_trusting(&setup.dovecot.ca_pem(), &[]);
    loop {
        let mut client = Client::tls(setup.dovecot.pop3s, config.clone());
        assert!(client.line().unwrap().starts_with("+OK"));
        client.send(format!("USER {}\r\nPASS {}\r\n", BOB.0, BOB.1).as_bytes());
        assert!(client.line().unwrap().starts_with("+OK"));
        let answer = client.line().unwrap();
        if answer.starts_with("-ERR [IN-USE]") && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        assert!(answer.starts_with("+OK"), "direct login: {answer}");
        client.send(b"STAT\r\n");
        let stat = client.line().unwrap();
        let fields: Vec<&str> = stat.split(' ').collect();
        assert!(fields.len() >= 3 && fields[0] == "+OK", "{stat}");
        client.send(b"QUIT\r\n");
        assert!(client.line().unwrap().starts_with("+OK"));
        return (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    }
}

/// The last of bob's sessions Dovecot logged as ended, once there are more than `before`
/// (its log is written asynchronously: waits up to 5 s).
fn last_session_after(setup: &Setup, before: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let sessions = dovecot_sessions(setup);
        if sessions.len() > before || Instant::now() >= deadline {
            return sessions.last().cloned().unwrap_or_default();
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A client logged in to mailgate's pop3s listener as bob, retrying `[IN-USE]` (see
/// [`direct_stat`]) for up to 20 s.
fn login_via_mailgate(setup: &Setup) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut client = setup.pop3s();
        client.send(format!("USER {}\r\nPASS {}\r\n", BOB.0, BOB.1).as_bytes());
        assert!(client.line().unwrap().starts_with("+OK"));
        let answer = client.line().unwrap();
        if answer.starts_with("-ERR [IN-USE]") && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        assert_eq!(answer, "+OK Logged in.");
        return client;
    }
}

/// Dovecot's log lines for bob's POP3 sessions ending (they count RETRs and DELEs).
fn dovecot_sessions(setup: &Setup) -> Vec<String> {
    setup
        .dovecot
        .log()
        .lines()
        .filter(|l| l.contains("pop3(bob)") && l.contains("Disconnected"))
        .map(String::from)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn fetchmail_keep_mode_retrieves_every_message_identically_over_tls_and_stls() {
    let started = Instant::now();
    let version = run_bounded(
        {
            let mut c = Command::new(FETCHMAIL);
            c.arg("--version").env("LC_ALL", "C");
            c
        },
        Duration::from_secs(10),
    );
    println!("{}", show(&version.stdout).lines().next().unwrap_or_default());

    let setup = Setup::start();
    const SEED: u64 = 0xF37C;
    const COUNT: usize = 500;
    let filled = Instant::now();
    let total = setup.dovecot.fill(BOB.0, COUNT, SEED);
    println!("filled {COUNT} messages, {:.1} MB, in {:?}", total as f64 / 1e6, filled.elapsed());
    let log = || setup.gateway.log();
    let maildir = setup.dovecot.maildir(BOB.0);

    let work = tempfile::tempdir().unwrap();
    let dv_ca = setup.dovecot.ca_pem();
    // mailgate's message cache (on by default) answers a RETR it has seen before without
    // asking Dovecot, so the STLS run through `setup.gateway`, after the pop3s run, is
    // served from the cache. A second mailgate with the cache off, on the same Dovecot,
    // adds an STLS run that goes through the relay.
    let uncached = Gateway::start(
        work.path(),
        &gateway_config_with(
            &setup.pki,
            None,
            Some(&setup.dovecot.pop3s.to_string()),
            "implicit",
            Some(&dv_ca),
            "",
            "[cache]\nenabled = false\n",
        ),
    );
    let runs = [
        ("direct", setup.dovecot.pop3s.port(), dv_ca.as_path(), Tls::Implicit),
        ("pop3s", setup.addr("pop3s").port(), setup.pki.ca.as_path(), Tls::Implicit),
        ("stls", setup.addr("pop3").port(), setup.pki.ca.as_path(), Tls::Stls),
        ("stls-uncached", uncached.addr("pop3").port(), setup.pki.ca.as_path(), Tls::Stls),
    ];

    let source = maildrop_contents(&maildir);
    assert_eq!(source.len(), COUNT);
    assert!(source.iter().any(|m| m.len() > 1_000_000), "no big message");
    assert!(source.iter().any(|m| memchr::memmem::find(m, b"\n.\n").is_some()), "no lone-dot line");
    let mut header = None::<String>;
    for (name, port, ca, tls) in runs {
        let out = work.path().join(name);
        fs::create_dir(&out).unwrap();
        let poll = Poll { port, ca, tls, keep: true, out: &out, block_after: None };
        let sessions_before = dovecot_sessions(&setup).len();
        let run = fetchmail(work.path(), &poll, &log);
        let output = run.output();
        let session = last_session_after(&setup, sessions_before);

        // The session went as it should: STLS exactly when asked for, every message
        // retrieved with RETR, none deleted, a clean QUIT.
        assert_eq!(output.contains("POP3> STLS"), tls == Tls::Stls, "{name}: STLS use\n{}", tail(&output, 40));
        if tls == Tls::Stls {
            assert!(output.contains("upgrade to TLS succeeded"), "{name}:\n{}", tail(&output, 40));
        }
        assert_eq!(output.matches("POP3> RETR ").count(), COUNT, "{name}: RETRs");
        assert!(!output.contains("POP3> DELE"), "{name}: fetchmail deleted in keep mode");
        assert!(output.contains("POP3> QUIT"), "{name}: no QUIT\n{}", tail(&output, 20));
        assert!(!output.contains("POP3< -ERR"), "{name}: an -ERR reached fetchmail\n{output}");
        assert!(
            output.contains(&format!("{COUNT} messages for bob at 127.0.0.1 ({total} octets)")),
            "{name}: STAT as fetchmail saw it\n{}",
            tail(&output, 20)
        );
        let complaints = complaints(&output);
        assert!(complaints.is_empty(), "{name}: fetchmail complained: {complaints:#?}");
        if name == "pop3s" {
            // What fetchmail made of mailgate's greeting and CAPA.
            let capa: Vec<&str> = output.lines().filter(|l| l.contains("POP3<")).take(12).collect();
            println!("fetchmail via mailgate, first lines read: {capa:#?}");
        }

        let compared = Instant::now();
        let (got, fetchmail_header) = delivered(&out);
        assert_eq!(got.len(), COUNT, "{name}: delivered {} messages", got.len());
        // Each run equals the server's copy, hence all runs equal each other.
        assert!(
            got == source,
            "{name}: delivered messages differ from the maildrop: {}",
            describe_difference(&got, &source)
        );
        drop(got);
        match &header {
            None => header = Some(fetchmail_header),
            Some(first) => assert_eq!(&fetchmail_header, first, "{name}: fetchmail's own header differs"),
        }
        if name == "stls-uncached" {
            // Without the cache, every RETR of this run reached Dovecot.
            assert!(session.contains(&format!("retr={COUNT}/")), "{name}: Dovecot says {session}");
        }
        if name == "stls" {
            // The second run through mailgate (keep mode, same messages) came from the cache,
            // as mailgate's session totals say; Dovecot still saw each RETR, sent by mailgate
            // after answering, for the \Seen a RETR sets (`cache.pop3_mark_seen`).
            assert!(session.contains(&format!("retr={COUNT}/")), "{name}: Dovecot says {session}");
            let deadline = Instant::now() + Duration::from_secs(10);
            while !setup.gateway.log().contains(&format!("cache_hits={COUNT} cache_misses=0")) {
                assert!(
                    Instant::now() < deadline,
                    "{name}: no session served from the cache:\n{}",
                    setup.gateway.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        println!(
            "fetchmail {name}: {COUNT} messages in {:?}, identical (compared in {:?}); Dovecot: {}",
            run.took,
            compared.elapsed(),
            session.split("Disconnected: ").nth(1).unwrap_or(&session),
        );
    }
    println!("fetchmail's header, time cut off: {:?}", header.unwrap());

    // Keep mode: the maildrop still holds everything.
    assert_eq!(direct_stat(&setup), (COUNT, total), "maildrop after the keep runs");
    assert_eq!(files(&maildir, true).len(), COUNT);
    drop(uncached);
    println!("fetchmail keep test took {:?}", started.elapsed());
}

#[test]
fn fetchmail_deleting_run_empties_the_maildrop_only_after_quit() {
    let started = Instant::now();
    let setup = Setup::start();
    const SEED: u64 = 0xDE1E7E;
    const COUNT: usize = 60;
    let total = setup.dovecot.fill(BOB.0, COUNT, SEED);
    let log = || setup.gateway.log();
    let maildir = setup.dovecot.maildir(BOB.0);
    let work = tempfile::tempdir().unwrap();
    let source = maildrop_contents(&maildir);

    // 1. fetchmail without keep, killed (SIGKILL, no QUIT) while the MDA takes the 6th
    // message: it has already sent DELE for the 5 delivered ones. Nothing is deleted.
    let cut_out = work.path().join("cut");
    fs::create_dir(&cut_out).unwrap();
    let marker = work.path().join("mda-blocked");
    let poll = Poll {
        port: setup.addr("pop3").port(),
        ca: &setup.pki.ca,
        tls: Tls::Stls,
        keep: false,
        out: &cut_out,
        block_after: Some((5, &marker)),
    };
    let output = fetchmail_cut(work.path(), &poll, &log);
    assert_eq!(files(&cut_out, false).len(), 5);
    // fetchmail had upgraded with STLS, and Dovecot (through mailgate) had accepted the
    // DELE of each delivered message.
    assert!(output.contains("POP3> STLS"), "{output}");
    let lines: Vec<&str> = output.lines().collect();
    for n in 1..=5 {
        let dele = format!("POP3> DELE {n}");
        let at = lines.iter().position(|l| l.ends_with(&dele)).unwrap_or_else(|| panic!("no {dele}:\n{output}"));
        let answer = lines.get(at + 1).copied().unwrap_or_default();
        assert!(answer.contains("POP3< +OK"), "DELE {n} answered {answer:?}");
    }
    assert!(!output.contains("POP3> DELE 6") && !output.contains("POP3> QUIT"), "{output}");
    assert_eq!(direct_stat(&setup), (COUNT, total), "a fetchmail session cut before QUIT deleted messages");
    println!("fetchmail cut after 5 deliveries (DELE 1-5 accepted, no QUIT): all {COUNT} messages still there");

    // 2. The raw client: DELE every message through mailgate (pipelined), then drop the
    // connection without QUIT. Nothing is deleted.
    let mut client = login_via_mailgate(&setup);
    let mut deles = String::new();
    for n in 1..=COUNT {
        deles.push_str(&format!("DELE {n}\r\n"));
    }
    client.send(deles.as_bytes());
    for n in 1..=COUNT {
        let line = client.line().unwrap_or_else(|| panic!("EOF before the answer to DELE {n}"));
        assert!(line.starts_with("+OK"), "DELE {n}: {line}");
    }
    client.send(b"STAT\r\n");
    assert_eq!(client.line().unwrap(), "+OK 0 0", "STAT after deleting all in the session");
    drop(client);
    assert_eq!(direct_stat(&setup), (COUNT, total), "DELEs without QUIT deleted messages");
    assert_eq!(files(&maildir, true).len(), COUNT);

    // 3. A complete fetchmail run without keep: every message delivered, then gone.
    let out = work.path().join("full");
    fs::create_dir(&out).unwrap();
    let poll = Poll {
        port: setup.addr("pop3s").port(),
        ca: &setup.pki.ca,
        tls: Tls::Implicit,
        keep: false,
        out: &out,
        block_after: None,
    };
    let run = fetchmail(work.path(), &poll, &log);
    let output = run.output();
    assert_eq!(output.matches("POP3> DELE ").count(), COUNT, "{}", tail(&output, 20));
    // All DELEs precede the QUIT that commits them.
    let last_dele = output.rfind("POP3> DELE ").unwrap();
    let quit = output.find("POP3> QUIT").expect("QUIT");
    assert!(last_dele < quit);
    assert!(!output.contains("POP3< -ERR"), "{output}");
    let complaints = complaints(&output);
    assert!(complaints.is_empty(), "fetchmail complained: {complaints:#?}");
    let (got, _) = delivered(&out);
    assert!(got == source, "delivered messages differ from the maildrop: {}", describe_difference(&got, &source));
    assert_eq!(direct_stat(&setup), (0, 0), "maildrop after a deleting run");
    assert!(files(&maildir, true).is_empty(), "files left in the Maildir: {:?}", files(&maildir, true));
    println!("fetchmail deleting run: {COUNT} messages in {:?}", run.took);

    // 4. The raw client again, this time DELE + QUIT through mailgate.
    const MORE: usize = 12;
    let more_total = setup.dovecot.fill(BOB.0, MORE, SEED + 1);
    assert_eq!(direct_stat(&setup), (MORE, more_total));
    let mut client = login_via_mailgate(&setup);
    client.send(b"STAT\r\n");
    assert_eq!(client.line().unwrap(), format!("+OK {MORE} {more_total}"));
    for n in 1..=MORE {
        client.send(format!("DELE {n}\r\n").as_bytes());
        assert!(client.line().unwrap().starts_with("+OK"), "DELE {n}");
    }
    client.send(b"QUIT\r\n");
    let bye = client.rest();
    assert!(bye.len() == 1 && bye[0].starts_with("+OK"), "QUIT: {bye:?}");
    assert_eq!(direct_stat(&setup), (0, 0), "maildrop after DELE + QUIT");
    assert!(files(&maildir, true).is_empty());

    // Dovecot's account agrees: the two cut sessions ended with "Connection closed" and
    // deleted nothing ("del=0/60": its count of deletions it committed), the two that
    // QUIT through mailgate deleted everything. (Every other session is a direct STAT.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while !dovecot_sessions(&setup).iter().any(|l| l.contains("del=12/12")) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let sessions = dovecot_sessions(&setup);
    println!("Dovecot's account of bob's sessions:\n{}", sessions.join("\n"));
    let closed: Vec<&String> = sessions.iter().filter(|l| l.contains("Connection closed")).collect();
    assert_eq!(closed.len(), 2, "{sessions:#?}");
    assert!(closed.iter().all(|l| l.contains("del=0/60")), "{closed:#?}");
    let deleting: Vec<&String> = sessions.iter().filter(|l| !l.contains(" del=0/")).collect();
    assert_eq!(deleting.len(), 2, "{sessions:#?}");
    // (Its retr= count may be below 60: mailgate's message cache can answer RETR of the
    // messages the cut fetchmail session already retrieved.)
    assert!(deleting[0].contains("Logged out") && deleting[0].contains("del=60/60"), "{deleting:#?}");
    assert!(deleting[1].contains("Logged out") && deleting[1].contains("del=12/12"), "{deleting:#?}");
    println!("fetchmail deleting test took {:?}", started.elapsed());
}

/// [`curl`] as bob; panics unless it succeeded; returns its output.
fn curl_ok(ca: &Path, url: &str, extra: &[&str], log: &dyn Fn() -> String) -> Vec<u8> {
    let run = curl(ca, BOB, url, extra);
    assert!(
        run.status.success(),
        "curl {extra:?} {url} failed with {}: {}\n--- mailgate log (tail) ---\n{}",
        run.status,
        run.stderr(),
        tail(&log(), 40)
    );
    run.stdout
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: {} bytes vs {} direct, first difference at {at}: {:?} vs {:?}",
            got.len(),
            want.len(),
            show(&got[at.saturating_sub(40)..(at + 40).min(got.len())]),
            show(&want[at.saturating_sub(40)..(at + 40).min(want.len())]),
        );
    }
}

#[test]
fn curl_pop3s_list_and_retr_match_a_direct_fetch() {
    let started = Instant::now();
    let setup = Setup::start();
    const SEED: u64 = 0xC0A1;
    const COUNT: usize = 30;
    setup.dovecot.fill(BOB.0, COUNT, SEED);
    let log = || setup.gateway.log();
    let dovecot = setup.dovecot.pop3s;
    let dv_ca = setup.dovecot.ca_pem();
    let gw_ca = setup.pki.ca.clone();
    let pop3s = setup.addr("pop3s");
    let stls = setup.addr("pop3");

    // The same request directly, over mailgate's pop3s, and over its STLS listener. (The
    // STLS RETRs, coming second, may be answered from mailgate's message cache: what the
    // client gets must be the same either way.)
    let three = |path: &str, extra: &[&str]| -> [(String, Vec<u8>); 3] {
        let with_stls: Vec<&str> = extra.iter().copied().chain(["--ssl-reqd"]).collect();
        [
            ("direct".to_string(), curl_ok(&dv_ca, &format!("pop3s://{dovecot}/{path}"), extra, &log)),
            ("pop3s".to_string(), curl_ok(&gw_ca, &format!("pop3s://{pop3s}/{path}"), extra, &log)),
            ("stls".to_string(), curl_ok(&gw_ca, &format!("pop3://{stls}/{path}"), &with_stls, &log)),
        ]
    };

    // LIST, and UIDL and TOP as custom requests (curl prints their multi-line bodies).
    for (path, extra, what) in [
        ("", &[][..], "LIST"),
        ("", &["--request", "UIDL"][..], "UIDL"),
        ("", &["--request", "TOP 4 5"][..], "TOP 4 5"),
    ] {
        let [(_, direct), via @ ..] = three(path, extra);
        assert!(!direct.is_empty(), "{what}: nothing from Dovecot");
        for (name, got) in via {
            assert_same(&format!("{what} over {name}"), &got, &direct);
        }
        println!("{what}: {} bytes identical direct, over pop3s and over STLS", direct.len());
    }
    let list = curl_ok(&dv_ca, &format!("pop3s://{dovecot}/"), &[], &log);
    assert_eq!(show(&list).lines().count(), COUNT, "{}", show(&list));

    // RETR: plain text (1), dot-lines (2, 8; curl undoes the dot-stuffing), 200
    // Received: lines (4), big (6 and 22), the last (30).
    for n in [1usize, 2, 4, 6, 8, 22, 30] {
        let expected = mailgen::message(SEED, n - 1, mailgen::MAX_BIG);
        if (n - 1) % 3 == 1 {
            assert!(memchr::memmem::find(&expected, b"\r\n.").is_some(), "message {n} has no dot-line");
        }
        let [(_, direct), via @ ..] = three(&n.to_string(), &[]);
        assert_same(&format!("message {n} from Dovecot vs mailgen"), &direct, &expected);
        for (name, got) in via {
            assert_same(&format!("message {n} over {name}"), &got, &direct);
        }
        println!("message {n}: {} bytes identical direct, over pop3s and over STLS", direct.len());
    }
    // mailgate's log is read as it is written: the last session's line may still be coming.
    let deadline = Instant::now() + Duration::from_secs(5);
    while log().matches("logged in").count() < 3 * 2 + 7 * 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let logins = log().matches("logged in").count();
    assert!(logins >= 3 * 2 + 7 * 2, "only {logins} logins in the mailgate log");
    println!("curl test took {:?}", started.elapsed());
}
