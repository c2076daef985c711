//! mbsync (isync) as a real IMAP client: its config, a bounded run, and the Maildirs it
//! writes read back as comparable multisets of messages.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::process::{run_bounded, show, tail};

pub const MBSYNC: &str = "/usr/bin/mbsync";

/// mbsync's `PipelineDepth`. `None` keeps its default, unlimited: mbsync then sends one
/// `UID FETCH n (BODY.PEEK[])` per new message without waiting, 2,000 commands in flight
/// in the tests. That is what users run, so that is what is tested; `Some(100)` is the
/// workaround for mailgate's limit of 1,000 commands in flight.
pub const PIPELINE_DEPTH: Option<u32> = None;

/// The far side of a channel: an IMAPS server on loopback.
pub struct Account<'a> {
    pub name: &'a str,
    pub port: u16,
    /// The CA that signed the server's certificate.
    pub ca: &'a Path,
}

/// An mbsync config for one channel syncing mailbox `pattern` of the account with the
/// Maildir store `local` (`Sync {sync}`, `Expunge {expunge}`). Creates `local` (mbsync
/// wants the store's directory to exist).
pub fn config(acct: &Account, user: (&str, &str), local: &Path, pattern: &str, sync: &str, expunge: &str) -> String {
    fs::create_dir_all(local).unwrap();
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
         Patterns {pattern}\n\
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

/// Runs mbsync on `config` (written to a fresh file in `dir`, which is also its HOME) for
/// `channel`; panics (with the mailgate log) if it fails. How long it took.
pub fn run(dir: &Path, config: &str, channel: &str, log: &dyn Fn() -> String) -> Duration {
    static N: AtomicU64 = AtomicU64::new(0);
    let path = dir.join(format!("{channel}-{}.mbsyncrc", N.fetch_add(1, Ordering::Relaxed)));
    fs::write(&path, config).unwrap();
    let mut cmd = Command::new("timeout");
    // Belt and braces: coreutils' timeout in addition to run_bounded's polling.
    cmd.args(["--kill-after=5", "280", MBSYNC, "--verbose", "--config"]).arg(&path).arg(channel).env("HOME", dir);
    let run = run_bounded(cmd, Duration::from_secs(290));
    assert!(
        run.status.success(),
        "mbsync {channel} failed with {} after {:?}\n--- stdout ---\n{}\n--- stderr (tail) ---\n{}\n--- mailgate log (tail) ---\n{}",
        run.status,
        run.took,
        show(&run.stdout),
        tail(&run.stderr(), 40),
        tail(&log(), 60),
    );
    println!("mbsync {channel}: {:?}", run.took);
    run.took
}

// ---------------------------------------------------------------------------------------
// Maildirs
// ---------------------------------------------------------------------------------------

/// Regular files in `maildir`/cur and /new.
pub fn maildir_files(maildir: &Path) -> Vec<PathBuf> {
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
pub fn contents(maildir: &Path, normalize: fn(Vec<u8>) -> Vec<u8>) -> Vec<Vec<u8>> {
    let mut all: Vec<Vec<u8>> = maildir_files(maildir).iter().map(|p| normalize(fs::read(p).unwrap())).collect();
    all.sort_unstable();
    all
}

/// Removes the `X-TUID:` header mbsync adds to every message it stores (a random tag it
/// uses to recognise its own uploads after an interruption), and checks it was there.
pub fn strip_tuid(msg: Vec<u8>) -> Vec<u8> {
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

/// What differs between two sorted multisets of messages (from [`contents`]), for a
/// failure message.
pub fn describe_difference(a: &[Vec<u8>], b: &[Vec<u8>]) -> String {
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
pub fn uid_of(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    let rest = &name[name.find(",U=")? + 3..];
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// UID -> Maildir flags of every message mbsync stored; panics on a file without a UID.
pub fn local_flags(maildir: &Path) -> BTreeMap<u32, String> {
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
pub fn add_local_flag(maildir: &Path, uid: u32, flag: char) {
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
