mod support;

// Real IMAP clients (curl, mbsync) as subprocesses, through mailgate and straight to
// Dovecot, with the results compared byte for byte.

use std::fs;
use std::io::{Read, Seek, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::mailgen;
use support::setup::*;

const CURL: &str = "/usr/bin/curl";
const MBSYNC: &str = "/usr/bin/mbsync";

// ---------------------------------------------------------------------------------------
// Subprocesses with a bounded runtime
// ---------------------------------------------------------------------------------------

struct Run {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    took: Duration,
}

impl Run {
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Runs `cmd` with stdout and stderr captured in temp files (no pipe to fill up), polling
/// until it exits; kills it and panics once `limit` has passed.
fn run_bounded(mut cmd: Command, limit: Duration) -> Run {
    let mut out = tempfile::tempfile().unwrap();
    let mut err = tempfile::tempfile().unwrap();
    let what = format!("{cmd:?}");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let mut stderr = String::new();
            err.rewind().unwrap();
            let _ = err.read_to_string(&mut stderr);
            panic!("{what} still running after {limit:?}; killed. stderr:\n{stderr}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let took = start.elapsed();
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    out.rewind().unwrap();
    out.read_to_end(&mut stdout).unwrap();
    err.rewind().unwrap();
    err.read_to_end(&mut stderr).unwrap();
    Run { status, stdout, stderr, took }
}

// ---------------------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------------------

/// curl against `url`, trusting `ca`, logging in as `user`; `extra` go before the URL.
fn curl(ca: &Path, user: (&str, &str), url: &str, extra: &[&str]) -> Run {
    let mut cmd = Command::new(CURL);
    cmd.args(["--silent", "--show-error"])
        .args(["--connect-timeout", "10", "--max-time", "60"])
        .arg("--cacert")
        .arg(ca)
        // Passed as one argv element: no shell, so alice's password needs no quoting.
        .arg("--user")
        .arg(format!("{}:{}", user.0, user.1))
        .args(extra)
        .arg(url);
    run_bounded(cmd, Duration::from_secs(90))
}

/// Like [`curl`] but panics unless curl succeeded; returns its output.
fn curl_ok(ca: &Path, user: (&str, &str), url: &str, extra: &[&str], log: &dyn Fn() -> String) -> Vec<u8> {
    let run = curl(ca, user, url, extra);
    assert!(
        run.status.success(),
        "curl {extra:?} {url} failed with {}: {}\n--- mailgate log ---\n{}",
        run.status,
        run.stderr(),
        log()
    );
    run.stdout
}

/// A one-connection TCP relay on loopback that records what the client sends, to prove
/// what did (not) go over the wire.
struct Tap {
    addr: SocketAddr,
    from_client: Arc<Mutex<Vec<u8>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Tap {
    fn to(target: SocketAddr) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let from_client = Arc::new(Mutex::new(Vec::new()));
        let record = from_client.clone();
        let thread = thread::spawn(move || {
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            let client = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return;
                        }
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("tap accept: {e}"),
                }
            };
            client.set_nonblocking(false).unwrap();
            let server = TcpStream::connect_timeout(&target, Duration::from_secs(10)).unwrap();
            for s in [&client, &server] {
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
            }
            let pump = |mut from: TcpStream, mut to: TcpStream, record: Option<Arc<Mutex<Vec<u8>>>>| {
                let mut buf = [0u8; 16384];
                loop {
                    match from.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if let Some(r) = &record {
                                r.lock().unwrap().extend_from_slice(&buf[..n]);
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = to.shutdown(Shutdown::Write);
            };
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let up = thread::spawn(move || pump(c2, s2, Some(record)));
            pump(server, client, None);
            let _ = up.join();
        });
        Tap { addr, from_client, thread: Some(thread) }
    }

    /// Waits for the relay to finish (bounded by its timeouts); what the client sent.
    fn finish(mut self) -> Vec<u8> {
        if let Some(t) = self.thread.take() {
            t.join().expect("tap thread");
        }
        self.from_client.lock().unwrap().clone()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn curl_lists_and_fetches_identically_over_implicit_tls_and_starttls() {
    let started = Instant::now();
    let setup = Setup::start();
    const SEED: u64 = 0xC0FFEE;
    const COUNT: usize = 20;
    setup.dovecot.fill(ALICE.0, COUNT, SEED);
    let log = || setup.gateway.log();

    let imaps = setup.addr("imaps");
    let starttls = setup.addr("imap");
    let dovecot = setup.dovecot.imaps;
    let gw_ca = setup.pki.ca.clone();
    let dv_ca = setup.dovecot.ca_pem();

    // 1. Without --ssl-reqd, curl stays in plaintext on the STARTTLS listener: mailgate
    // announces LOGINDISABLED and no AUTH=, so curl must give up without sending
    // credentials. A recording relay in between proves nothing of them went out.
    // Done first, so that no "logged in" can be in the log yet.
    for user in [ALICE, BOB] {
        let tap = Tap::to(starttls);
        let run = curl(&gw_ca, user, &format!("imap://{}/INBOX;UID=1", tap.addr), &[]);
        let sent = tap.finish();
        println!(
            "plaintext curl as {}: {} ({}); client sent {:?}",
            user.0,
            run.status,
            run.stderr().trim(),
            show(&sent)
        );
        assert!(!run.status.success(), "curl logged in over plaintext: {}\n{}", run.status, show(&run.stdout));
        assert!(!contains(&sent, user.1.as_bytes()), "password went out: {}", show(&sent));
        let plain = format!("\0{}\0{}", user.0, user.1);
        let b64 = base64_encode(plain.as_bytes());
        assert!(!contains(&sent, b64.as_bytes()), "SASL PLAIN went out: {}", show(&sent));
        let upper = show(&sent).to_ascii_uppercase();
        assert!(
            !upper.contains(" LOGIN ") && !upper.contains(" AUTHENTICATE "),
            "credentials attempted in clear: {}",
            show(&sent)
        );
    }
    // Let the log reader catch up before looking.
    thread::sleep(Duration::from_millis(200));
    assert!(!log().contains("logged in"), "a plaintext session logged in:\n{}", log());

    // 2. Mailbox listing: direct, implicit TLS, STARTTLS.
    let direct = curl_ok(&dv_ca, ALICE, &format!("imaps://{dovecot}/"), &[], &log);
    assert!(show(&direct).contains("INBOX"), "{}", show(&direct));
    let via_imaps = curl_ok(&gw_ca, ALICE, &format!("imaps://{imaps}/"), &[], &log);
    let via_starttls = curl_ok(&gw_ca, ALICE, &format!("imap://{starttls}/"), &["--ssl-reqd"], &log);
    assert_eq!(show(&via_imaps), show(&direct), "LIST over imaps differs");
    assert_eq!(show(&via_starttls), show(&direct), "LIST over STARTTLS differs");
    println!("LIST: {}", show(&direct).trim_end());

    // 3. Messages by UID: plain text, 8-bit, multipart, 200 Received: lines (UID 4),
    // a big one (UID 6), and the last. curl authenticates with AUTHENTICATE PLAIN and an
    // initial response, as mailgate announces SASL-IR (checked on the plaintext listener
    // below). curl 7.88 cannot be made to use the IMAP LOGIN command while AUTH=PLAIN is
    // offered (its `AUTH=+LOGIN` login option only exists in later versions).
    for uid in [1usize, 2, 3, 4, 6, 11, 17, 20] {
        let expected = mailgen::message(SEED, uid - 1, mailgen::MAX_BIG);
        let path = format!("INBOX;UID={uid}");
        let direct = curl_ok(&dv_ca, ALICE, &format!("imaps://{dovecot}/{path}"), &[], &log);
        assert!(direct == expected, "UID {uid}: Dovecot/curl gave {} bytes, expected {}", direct.len(), expected.len());
        let variants: [(&str, String, &[&str]); 2] = [
            ("imaps", format!("imaps://{imaps}/{path}"), &[]),
            ("starttls", format!("imap://{starttls}/{path}"), &["--ssl-reqd"]),
        ];
        for (name, url, extra) in variants {
            let got = curl_ok(&gw_ca, ALICE, &url, extra, &log);
            if got != direct {
                let at = got.iter().zip(&direct).position(|(a, b)| a != b).unwrap_or(got.len().min(direct.len()));
                panic!(
                    "UID {uid} over {name}: {} bytes vs {} direct, first difference at {at}: {:?} vs {:?}",
                    got.len(),
                    direct.len(),
                    show(&got[at.saturating_sub(40)..(at + 40).min(got.len())]),
                    show(&direct[at.saturating_sub(40)..(at + 40).min(direct.len())]),
                );
            }
        }
        println!("UID {uid}: {} bytes identical direct, over imaps and over STARTTLS", direct.len());
    }
    // On the plaintext listener the exchange can be watched: curl's login is an
    // AUTHENTICATE PLAIN with initial response (the TLS listeners announce the same
    // capabilities), and the fetch matches too.
    let plain = setup.addr("plain");
    let b64 = base64_encode(format!("\0{}\0{}", ALICE.0, ALICE.1).as_bytes());
    let tap = Tap::to(plain);
    let got = curl_ok(&gw_ca, ALICE, &format!("imap://{}/INBOX;UID=4", tap.addr), &[], &log);
    let sent = tap.finish();
    let expect = format!(" AUTHENTICATE PLAIN {b64}\r\n");
    assert!(contains(&sent, expect.as_bytes()), "curl sent {}", show(&sent));
    assert!(got == mailgen::message(SEED, 3, mailgen::MAX_BIG), "UID 4 over plaintext differs");

    // Every gateway fetch and listing really logged in through mailgate.
    let logins = log().matches("logged in").count();
    // 2 listings, 8 UIDs over 2 listeners, 1 on the plaintext listener.
    let expected = 2 + 8 * 2 + 1;
    assert!(logins >= expected, "only {logins} logins in the mailgate log, expected {expected}");
    println!("curl test took {:?}", started.elapsed());
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

// ---------------------------------------------------------------------------------------
// mbsync
// ---------------------------------------------------------------------------------------

/// mbsync's `PipelineDepth`. `None` keeps its default, unlimited: mbsync then sends one
/// `UID FETCH n (BODY.PEEK[])` per new message without waiting, 2,000 commands in flight
/// here. That is what users run, so that is what is tested; `Some(100)` is the workaround
/// for mailgate's limit of 1,000 commands in flight.
const PIPELINE_DEPTH: Option<u32> = None;

struct Account<'a> {
    name: &'a str,
    port: u16,
    ca: &'a Path,
}

/// An mbsync config for one channel syncing the account's INBOX with `local`.
fn mbsync_config(acct: &Account, user: (&str, &str), local: &Path, sync: &str, expunge: &str) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    // isync 1.4 matches only DNS names (not IP addresses) against the certificate, so
    // the host is `localhost`, which both test certificates name (and which resolves to
    // loopback only; should it give ::1 first, mbsync tries the next address).
    format!(
        "IMAPAccount {name}\n\
         Host localhost\n\
         Port {port}\n\
         User {user}\n\
         Pass {pass}\n\
         SSLType IMAPS\n\
         CertificateFile {ca}\n\
         AuthMechs LOGIN\n\
         Timeout 60\n\
         {pipeline}\
         \n\
         IMAPStore {name}-far\n\
         Account {name}\n\
         \n\
         MaildirStore {name}-near\n\
         Path {local}/\n\
         Inbox {local}/INBOX\n\
         \n\
         Channel {name}\n\
         Far :{name}-far:\n\
         Near :{name}-near:\n\
         Patterns INBOX\n\
         Sync {sync}\n\
         Create Near\n\
         Expunge {expunge}\n\
         SyncState *\n",
        name = acct.name,
        port = acct.port,
        user = user.0,
        pass = quote(user.1),
        ca = quote(&acct.ca.display().to_string()),
        local = local.display(),
        pipeline = PIPELINE_DEPTH.map(|d| format!("PipelineDepth {d}\n")).unwrap_or_default(),
    )
}

/// Runs mbsync on a fresh config file; panics (with the mailgate log) if it fails.
fn mbsync(dir: &Path, config: &str, channel: &str, log: &dyn Fn() -> String) -> Duration {
    let path = dir.join(format!("{channel}-{}.mbsyncrc", rand_id()));
    fs::write(&path, config).unwrap();
    let mut cmd = Command::new("timeout");
    // Belt and braces: coreutils' timeout in addition to run_bounded's polling.
    cmd.args(["--kill-after=5", "280", MBSYNC, "--verbose", "--config"]).arg(&path).arg(channel).env("HOME", dir);
    let run = run_bounded(cmd, Duration::from_secs(290));
    let stderr = run.stderr();
    let tail: String =
        stderr.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    assert!(
        run.status.success(),
        "mbsync {channel} failed with {} after {:?}\n--- stdout ---\n{}\n--- stderr (tail) ---\n{tail}\n--- mailgate log (tail) ---\n{}",
        run.status,
        run.took,
        show(&run.stdout),
        log().lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"),
    );
    println!("mbsync {channel}: {:?}", run.took);
    run.took
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Regular files in `maildir`/cur and /new.
fn maildir_files(maildir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for sub in ["cur", "new"] {
        let Ok(entries) = fs::read_dir(maildir.join(sub)) else {
            continue;
        };
        for entry in entries {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                files.push(entry.path());
            }
        }
    }
    files
}

/// The contents of every message in the Maildir, each passed through `normalize`, sorted
/// (a multiset).
fn contents(maildir: &Path, normalize: fn(Vec<u8>) -> Vec<u8>) -> Vec<Vec<u8>> {
    let mut all: Vec<Vec<u8>> = maildir_files(maildir).iter().map(|p| normalize(fs::read(p).unwrap())).collect();
    all.sort_unstable();
    all
}

/// Removes the `X-TUID:` header mbsync adds to every message it stores (a random tag it
/// uses to recognise its own uploads after an interruption), and checks it was there.
fn strip_tuid(msg: Vec<u8>) -> Vec<u8> {
    let mut at = 0;
    while at < msg.len() {
        let end = memchr::memchr(b'\n', &msg[at..]).map_or(msg.len(), |i| at + i + 1);
        let line = &msg[at..end];
        if line == b"\n" || line == b"\r\n" {
            break; // end of the header
        }
        if line.starts_with(b"X-TUID: ") {
            let mut out = msg[..at].to_vec();
            out.extend_from_slice(&msg[end..]);
            return out;
        }
        at = end;
    }
    panic!("no X-TUID header in a message mbsync stored: {}", show(&msg[..msg.len().min(500)]));
}

/// CRLF to LF, for comparing with a store that keeps native line endings.
fn lf(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len());
    let mut start = 0;
    for i in memchr::memchr_iter(b'\n', msg) {
        let end = if i > start && msg[i - 1] == b'\r' { i - 1 } else { i };
        out.extend_from_slice(&msg[start..end]);
        out.push(b'\n');
        start = i + 1;
    }
    out.extend_from_slice(&msg[start..]);
    out
}

fn describe_difference(a: &[Vec<u8>], b: &[Vec<u8>]) -> String {
    let only_a: Vec<usize> = a.iter().filter(|m| b.binary_search(m).is_err()).map(|m| m.len()).collect();
    let only_b: Vec<usize> = b.iter().filter(|m| a.binary_search(m).is_err()).map(|m| m.len()).collect();
    let first = |ms: &[Vec<u8>]| {
        ms.iter()
            .find(|m| a.binary_search(m).is_err() || b.binary_search(m).is_err())
            .map(|m| show(&m[..m.len().min(300)]))
            .unwrap_or_default()
    };
    format!(
        "{} vs {} messages; {} only in the first (sizes {:?}), {} only in the second (sizes {:?})\nfirst unmatched in first: {}\nfirst unmatched in second: {}",
        a.len(),
        b.len(),
        only_a.len(),
        &only_a[..only_a.len().min(20)],
        only_b.len(),
        &only_b[..only_b.len().min(20)],
        first(a),
        first(b),
    )
}

/// The UID mbsync recorded in a Maildir file name (`...,U=<uid>:2,<flags>`).
fn uid_of(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    let rest = &name[name.find(",U=")? + 3..];
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// UID -> Maildir flags of every message mbsync stored.
fn local_flags(maildir: &Path) -> std::collections::BTreeMap<u32, String> {
    maildir_files(maildir)
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            let uid = uid_of(p).unwrap_or_else(|| panic!("no UID in {name}"));
            (uid, name.split_once(":2,").map(|(_, f)| f.to_string()).unwrap_or_default())
        })
        .collect()
}

/// Adds maildir flag `flag` to the local copy of `uid` (moving it to cur/ if needed).
fn add_local_flag(maildir: &Path, uid: u32, flag: char) {
    let path = maildir_files(maildir)
        .into_iter()
        .find(|p| uid_of(p) == Some(uid))
        .unwrap_or_else(|| panic!("no local file for UID {uid} in {}", maildir.display()));
    let name = path.file_name().unwrap().to_str().unwrap().to_string();
    let (base, flags) = match name.split_once(":2,") {
        Some((base, flags)) => (base.to_string(), flags.to_string()),
        None => (name.clone(), String::new()),
    };
    let mut flags: Vec<char> = flags.chars().chain([flag]).collect();
    flags.sort_unstable();
    flags.dedup();
    let new_name = format!("{base}:2,{}", flags.into_iter().collect::<String>());
    fs::rename(&path, maildir.join("cur").join(new_name)).unwrap();
}

#[test]
fn mbsync_full_sync_matches_a_direct_sync() {
    let started = Instant::now();
    let version = run_bounded(
        {
            let mut c = Command::new(MBSYNC);
            c.arg("--version");
            c
        },
        Duration::from_secs(10),
    );
    println!("{}", show(&version.stdout).trim());

    let setup = Setup::start();
    const SEED: u64 = 2_000;
    const COUNT: usize = 2_000;
    let filled = Instant::now();
    let total = setup.dovecot.fill(BOB.0, COUNT, SEED);
    println!("filled {COUNT} messages, {:.1} MB, in {:?}", total as f64 / 1e6, filled.elapsed());
    let log = || setup.gateway.log();

    let work = tempfile::tempdir().unwrap();
    let via_gate = work.path().join("via-mailgate");
    let direct = work.path().join("direct");
    fs::create_dir_all(&via_gate).unwrap();
    fs::create_dir_all(&direct).unwrap();
    let gate_acct = Account { name: "gate", port: setup.addr("imaps").port(), ca: &setup.pki.ca };
    let dv_ca = setup.dovecot.ca_pem();
    let direct_acct = Account { name: "direct", port: setup.dovecot.imaps.port(), ca: &dv_ca };

    // Full pull, through mailgate and directly.
    let gate_took = mbsync(work.path(), &mbsync_config(&gate_acct, BOB, &via_gate, "Pull", "None"), "gate", &log);
    let direct_took = mbsync(work.path(), &mbsync_config(&direct_acct, BOB, &direct, "Pull", "None"), "direct", &log);

    let compared = Instant::now();
    let got = contents(&via_gate.join("INBOX"), strip_tuid);
    let want = contents(&direct.join("INBOX"), strip_tuid);
    assert!(got.len() >= COUNT, "only {} messages synced through mailgate", got.len());
    assert!(got == want, "mailgate sync differs from direct sync: {}", describe_difference(&got, &want));
    // And both equal what is on the server, but for line endings: mbsync stores LF.
    let source = contents(&setup.dovecot.maildir(BOB.0), |m| lf(&m));
    assert!(got == source, "synced messages differ from the server's: {}", describe_difference(&got, &source));
    let bytes: usize = got.iter().map(Vec::len).sum();
    drop((got, want, source));
    println!("{COUNT} messages ({:.1} MB locally) identical; compared in {:?}", bytes as f64 / 1e6, compared.elapsed());

    // Flags came along too: mailgen marks index % 11 == 6 \Flagged \Seen, other
    // index % 3 == 1 \Seen (UID = index + 1).
    let flags = local_flags(&via_gate.join("INBOX"));
    assert_eq!(flags, local_flags(&direct.join("INBOX")), "flags differ between the two syncs");
    assert_eq!(flags.len(), COUNT);
    for (&uid, got) in &flags {
        let index = uid as usize - 1;
        let want = if index % 11 == 6 {
            "FS"
        } else if index % 3 == 1 {
            "S"
        } else {
            ""
        };
        assert_eq!(got, want, "flags of UID {uid}");
    }

    // Write-back through mailgate: flag one message and trash another locally, then let
    // mbsync push the changes and expunge on the far side.
    let (flag_uid, trash_uid) = (3u32, 8u32);
    let mut c = setup.direct(BOB);
    c.command("s", "EXAMINE INBOX");
    let lines = c.command("f", &format!("UID FETCH {flag_uid},{trash_uid} (FLAGS)"));
    assert!(!lines.iter().any(|l| l.contains("\\Flagged") || l.contains("\\Deleted")), "{lines:?}");
    c.command("z", "LOGOUT");
    drop(c);
    let inbox = via_gate.join("INBOX");
    add_local_flag(&inbox, flag_uid, 'F');
    add_local_flag(&inbox, trash_uid, 'T');
    let push_took = mbsync(work.path(), &mbsync_config(&gate_acct, BOB, &via_gate, "Push", "Far"), "gate", &log);

    let mut c = setup.direct(BOB);
    let lines = c.command("s", "SELECT INBOX");
    let exists = format!("* {} EXISTS", COUNT - 1);
    assert!(lines.contains(&exists), "expected {exists}: {lines:?}");
    let lines = c.command("f", &format!("UID FETCH {flag_uid} (FLAGS)"));
    assert!(
        lines.iter().any(|l| l.contains("FETCH") && l.contains("\\Flagged")),
        "UID {flag_uid} not flagged: {lines:?}"
    );
    let lines = c.command("g", &format!("UID SEARCH UID {trash_uid}"));
    assert!(lines.iter().any(|l| l == "* SEARCH"), "UID {trash_uid} still there: {lines:?}");
    assert!(lines.last().unwrap().starts_with("g OK"), "{lines:?}");
    let lines = c.command("h", "UID SEARCH DELETED");
    assert!(lines.iter().any(|l| l == "* SEARCH"), "messages left \\Deleted: {lines:?}");
    c.command("z", "LOGOUT");
    drop(c);

    println!(
        "mbsync: pull via mailgate {gate_took:?}, pull direct {direct_took:?}, push via mailgate {push_took:?}; whole test {:?}",
        started.elapsed()
    );
}
