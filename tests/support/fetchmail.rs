//! fetchmail as a test client: a poll of one maildrop through a given port, every file in
//! a work directory of the test's, delivered by a small MDA into a directory.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::process::{run_bounded, tail, Run};
use super::setup::BOB;

pub const FETCHMAIL: &str = "fetchmail";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tls {
    /// `ssl`: TLS from the first byte (POP3S).
    Implicit,
    /// No `ssl`, but `sslproto 'tls1.2+'`: fetchmail must upgrade with STLS and refuses to
    /// go on in plaintext (fetchmail(1), --sslproto).
    Stls,
}

/// One fetchmail poll of a maildrop.
pub struct Poll<'a> {
    pub port: u16,
    pub ca: &'a Path,
    pub tls: Tls,
    pub keep: bool,
    /// Where the MDA stores each message, as a file of its own.
    pub out: &'a Path,
    /// The MDA blocks (without storing) once `out` holds this many messages, after
    /// touching `marker`: a way to cut fetchmail off mid-run at a known point.
    pub block_after: Option<(usize, &'a Path)>,
}

/// The MDA: stores the message on stdin as a new file in $1. With $2 and $3, once $1 holds
/// $2 messages it touches $3 and sleeps instead (the test then kills fetchmail's process
/// group, this sleep included). A nonzero exit makes fetchmail keep the message.
const MDA: &str = r#"#!/bin/sh
set -eu
if [ "$#" -ge 3 ] && [ "$(ls "$1" | wc -l)" -ge "$2" ]; then
  : > "$3"
  exec sleep 60
fi
file=$(mktemp "$1/msg.XXXXXXXXXX")
cat > "$file"
"#;

pub fn write_private(path: &Path, contents: &str, mode: u32) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.write_all(contents.as_bytes()).unwrap();
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A fetchmail command for `poll`, everything in `work` (used as HOME, so no user
/// configuration interferes): rcfile (0600, or fetchmail refuses it), a fresh idfile per
/// run (so no run knows what an earlier one saw), a pidfile of its own (as root the
/// default is /var/run/fetchmail.pid, shared by parallel tests), no syslog, no daemon.
pub fn fetchmail_command(work: &Path, poll: &Poll, (user, password): (&str, &str)) -> Command {
    let n = unique();
    let mda = work.join("deliver.sh");
    if !mda.exists() {
        write_private(&mda, MDA, 0o755);
    }
    assert!(!password.contains(['"', '\\', '\'']) && !user.contains(['"', '\\', '\'']));
    let mut mda_command = format!("'{}' '{}'", mda.display(), poll.out.display());
    if let Some((count, marker)) = poll.block_after {
        mda_command.push_str(&format!(" {count} '{}'", marker.display()));
    }
    // fetchmail 6.4 matches only DNS names (CN and dNSName SANs), never IP addresses,
    // against the host it was told to poll: both test certificates name `localhost` and
    // 127.0.0.1, so `sslcommonname localhost` keeps the host an IP (loopback only) and
    // the check strict (`sslcertck` against the given CA file alone).
    // `no rewrite`: fetchmail would otherwise append "@127.0.0.1" to addresses without a
    // domain in To/From/Cc/...; mailgen's all have one, but the check would then depend
    // on that.
    let rc = format!(
        "set no syslog\n\
         set no bouncemail\n\
         set postmaster \"postmaster\"\n\
         poll 127.0.0.1 protocol pop3 port {port} timeout 60:\n  \
           user \"{user}\" there with password \"{password}\"\n  \
           {ssl}sslproto \"tls1.2+\" sslcertck sslcertfile \"{ca}\" sslcommonname \"localhost\"\n  \
           {keep} fetchall no rewrite\n  \
           mda \"{mda_command}\"\n",
        port = poll.port,
        ssl = if poll.tls == Tls::Implicit { "ssl " } else { "" },
        ca = poll.ca.display(),
        keep = if poll.keep { "keep" } else { "no keep" },
    );
    let rc_path = work.join(format!("run{n}.fetchmailrc"));
    write_private(&rc_path, &rc, 0o600);
    let mut cmd = Command::new(FETCHMAIL);
    cmd.args(["--nosyslog", "-N", "-v", "-f"])
        .arg(&rc_path)
        .arg("--idfile")
        .arg(work.join(format!("run{n}.fetchids")))
        .arg("--pidfile")
        .arg(work.join(format!("run{n}.pid")))
        .env("HOME", work)
        .env("FETCHMAILHOME", work)
        .env("LC_ALL", "C")
        .env_remove("FETCHMAILUSER");
    cmd
}

/// Runs fetchmail to the end; panics (with the mailgate log) unless it exits 0 ("mail
/// retrieved").
pub fn fetchmail(work: &Path, poll: &Poll, log: &dyn Fn() -> String) -> Run {
    fetchmail_as(work, poll, BOB, log)
}

/// [`fetchmail`] for `user`.
pub fn fetchmail_as(work: &Path, poll: &Poll, user: (&str, &str), log: &dyn Fn() -> String) -> Run {
    // Dovecot serves a maildrop to one session at a time; should the previous session's
    // lock still be held, fetchmail gets `-ERR [IN-USE]` at login and exits with
    // PS_LOCKBUSY (8) having fetched nothing, so that is retried for a while.
    let deadline = Instant::now() + Duration::from_secs(20);
    let run = loop {
        let fetchmail = fetchmail_command(work, poll, user);
        let mut cmd = Command::new("timeout");
        // Belt and braces: coreutils' timeout (which signals fetchmail's whole process
        // group, MDAs included) in addition to run_bounded's polling.
        cmd.args(["--kill-after=5", "100"]).arg(fetchmail.get_program()).args(fetchmail.get_args());
        for (key, value) in fetchmail.get_envs() {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        let run = run_bounded(cmd, Duration::from_secs(110));
        if run.status.code() == Some(8) && Instant::now() < deadline {
            println!("fetchmail: lock busy on the server, retrying");
            thread::sleep(Duration::from_millis(100));
            continue;
        }
        break run;
    };
    assert!(
        run.status.success(),
        "fetchmail ({:?} on port {}) failed with {} after {:?}\n--- output (tail) ---\n{}\n--- mailgate log (tail) ---\n{}",
        poll.tls,
        poll.port,
        run.status,
        run.took,
        tail(&run.output(), 40),
        tail(&log(), 60),
    );
    run
}
