mod support;

// Python's imaplib against mailgate (tests/clients/imaplib_suite.py), over implicit TLS
// and over STARTTLS, followed by a scan of mailgate's debug/trace log for the
// credentials the suite sent.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use support::setup::*;

/// The suite's own watchdog fires earlier (`--deadline`); this one covers a hung
/// interpreter.
const SUITE_TIMEOUT: Duration = Duration::from_secs(180);
const SUITE_DEADLINE_SECS: u64 = 150;
/// A wrong password the suite tries (LOGIN and AUTHENTICATE); it must not be logged either.
const WRONG_PASSWORD: &str = "wr0ng-Guess-7731";

struct SuiteRun {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/imaplib_suite.py")
}

/// Runs the suite as a subprocess, killing it if it overruns [`SUITE_TIMEOUT`].
fn run_suite(setup: &Setup, listener: &str, mode: &str) -> SuiteRun {
    let addr = setup.addr(listener);
    let out_path = setup.dir.path().join(format!("imaplib-{mode}.stdout"));
    let err_path = setup.dir.path().join(format!("imaplib-{mode}.stderr"));
    let started = Instant::now();
    let mut child = Command::new("python3")
        .arg(script())
        .args(["--host", &addr.ip().to_string()])
        .args(["--port", &addr.port().to_string()])
        .arg("--cafile")
        .arg(&setup.pki.ca)
        .args(["--mode", mode])
        .args(["--user", ALICE.0, "--password", ALICE.1])
        .args(["--user2", BOB.0, "--password2", BOB.1])
        .args(["--wrong-password", WRONG_PASSWORD])
        .args(["--deadline", &SUITE_DEADLINE_SECS.to_string()])
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .expect("running python3 (is it installed?)");
    let read = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for python3") {
            break status;
        }
        if started.elapsed() > SUITE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "imaplib suite ({mode}) did not finish within {SUITE_TIMEOUT:?}; killed\n\
                 --- stdout ---\n{}\n--- stderr ---\n{}\n--- mailgate log (tail) ---\n{}",
                read(&out_path),
                read(&err_path),
                tail(&setup.gateway.log(), 200)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    SuiteRun { status, stdout: read(&out_path), stderr: read(&err_path), elapsed: started.elapsed() }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Every form in which a credential could leak into the log.
fn forbidden() -> Vec<(String, String)> {
    let mut needles = Vec::new();
    let mut add = |what: String, needle: String| needles.push((what, needle));
    for (user, password) in [ALICE, BOB, (ALICE.0, WRONG_PASSWORD), (BOB.0, WRONG_PASSWORD)] {
        add(format!("{user}'s password"), password.to_string());
        // As `Debug` (tracing's `?field`) would print it: quotes and backslashes escaped.
        let debug = format!("{password:?}");
        add(format!("{user}'s password (Debug-escaped)"), debug[1..debug.len() - 1].to_string());
        add(format!("{user}'s password (base64)"), STANDARD.encode(password.as_bytes()));
        for authzid in ["", user] {
            let plain = format!("{authzid}\0{user}\0{password}");
            add(format!("SASL PLAIN of {user} (authzid {authzid:?}, base64)"), STANDARD.encode(plain.as_bytes()));
        }
    }
    // Fragments, in case a password is logged cut at a space or at a literal.
    add("a fragment of alice's password".into(), "s3cret".into());
    add("a fragment of alice's password".into(), r#"pw"\{5}"#.into());
    needles
}

/// Stops mailgate so that its whole log has been read, and returns it.
fn final_log(setup: &mut Setup) -> String {
    let status = setup.gateway.terminate(Duration::from_secs(20));
    assert!(status.is_some(), "mailgate did not stop within 20 s");
    // The reader thread may still be appending the last lines.
    let _ = setup.gateway.wait_for_log(" stopped", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    setup.gateway.log()
}

fn assert_no_credentials(log: &str) {
    assert!(log.contains("logged in"), "mailgate's log shows no login: was it captured?\n{}", tail(log, 100));
    assert!(
        log.contains("DEBUG") || log.contains("TRACE"),
        "mailgate's log has no debug lines; the scan would prove little\n{}",
        tail(log, 50)
    );
    let mut leaks = Vec::new();
    for (what, needle) in forbidden() {
        for (n, line) in log.lines().enumerate() {
            if line.contains(&needle) {
                leaks.push(format!("{what} ({needle:?}) on log line {}: {line}", n + 1));
            }
        }
    }
    assert!(leaks.is_empty(), "credentials in mailgate's log:\n{}", leaks.join("\n"));
}

fn suite(listener: &str, mode: &str) {
    let t0 = Instant::now();
    let mut setup = Setup::start();
    let started = t0.elapsed();
    let run = run_suite(&setup, listener, mode);
    println!(
        "--- imaplib suite ({mode}, listener {listener}): {} in {:.1}s (setup {:.1}s) ---\n{}{}",
        run.status,
        run.elapsed.as_secs_f64(),
        started.as_secs_f64(),
        run.stdout,
        run.stderr
    );
    if !run.status.success() {
        panic!(
            "imaplib suite ({mode}) failed: {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n\
             --- mailgate log (tail) ---\n{}\n--- dovecot log (tail) ---\n{}",
            run.status,
            run.stdout,
            run.stderr,
            tail(&setup.gateway.log(), 300),
            tail(&setup.dovecot.log(), 60),
        );
    }
    assert!(
        run.stdout.contains(&format!("all checks passed [{mode}]")),
        "suite exited 0 without finishing:\n{}",
        run.stdout
    );
    let log = final_log(&mut setup);
    assert_no_credentials(&log);
    println!(
        "--- {mode}: mailgate log ({} lines) free of credentials; total {:.1}s ---",
        log.lines().count(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn imaplib_over_implicit_tls() {
    suite("imaps", "implicit");
}

#[test]
fn imaplib_over_starttls() {
    suite("imap", "starttls");
}

/// The scan itself: a log line with alice's SASL PLAIN message must be caught.
#[test]
#[should_panic(expected = "credentials in mailgate's log")]
fn log_scan_catches_a_leak() {
    let plain = STANDARD.encode(format!("\0{}\0{}", ALICE.0, ALICE.1).as_bytes());
    assert_no_credentials(&format!(
        "x INFO session: logged in\nx DEBUG session: sending M2 AUTHENTICATE PLAIN {plain}\n"
    ));
}
