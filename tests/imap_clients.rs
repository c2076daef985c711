mod support;

// Real IMAP clients (curl, mbsync) as subprocesses, through mailgate and straight to
// Dovecot, with the results compared byte for byte.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::mailgen::{self, lf};
use support::mbsync::{self, add_local_flag, contents, describe_difference, local_flags, strip_tuid, Account, MBSYNC};
use support::process::{curl, run_bounded, show};
use support::setup::*;

// ---------------------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------------------

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
    let gate_acct = Account { name: "gate", port: setup.addr("imaps").port(), ca: &setup.pki.ca };
    let dv_ca = setup.dovecot.ca_pem();
    let direct_acct = Account { name: "direct", port: setup.dovecot.imaps.port(), ca: &dv_ca };

    // Full pull, through mailgate and directly.
    let gate_took =
        mbsync::run(work.path(), &mbsync::config(&gate_acct, BOB, &via_gate, "INBOX", "Pull", "None"), "gate", &log);
    let direct_took =
        mbsync::run(work.path(), &mbsync::config(&direct_acct, BOB, &direct, "INBOX", "Pull", "None"), "direct", &log);

    // mbsync (isync 1.4) turns COMPRESS=DEFLATE on wherever it is offered: the pull went
    // through mailgate's compression, and came out the same.
    let compressed = setup.gateway.metrics();
    assert!(
        compressed.lines().any(|l| l.starts_with("mailgate_imap_compress_sessions_total ") && !l.ends_with(" 0")),
        "mbsync did not compress: {}",
        compressed.lines().filter(|l| l.contains("compress")).collect::<Vec<_>>().join("\n")
    );
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
    let push_took =
        mbsync::run(work.path(), &mbsync::config(&gate_acct, BOB, &via_gate, "INBOX", "Push", "Far"), "gate", &log);

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
