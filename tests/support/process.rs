//! Subprocesses (real clients: curl, mbsync, fetchmail) with a bounded runtime, and the
//! small text helpers their reports are read with.

use std::fs::File;
use std::io::{Read, Seek};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub const CURL: &str = "/usr/bin/curl";

/// How a subprocess ended, with everything it wrote.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub took: Duration,
}

impl Run {
    /// stderr as text.
    pub fn stderr(&self) -> String {
        show(&self.stderr)
    }

    /// stdout and stderr together (fetchmail splits its report between them).
    pub fn output(&self) -> String {
        format!("{}{}", show(&self.stdout), show(&self.stderr))
    }
}

/// Runs `cmd` (stdin from /dev/null) with stdout and stderr captured in temp files (no
/// pipe to fill up), polling until it exits; kills it and panics, with what it wrote to
/// stderr, once `limit` has passed.
pub fn run_bounded(cmd: Command, limit: Duration) -> Run {
    run_bounded_fed(cmd, b"", limit)
}

/// Like [`run_bounded`], with `input` as the whole of `cmd`'s stdin (from a temp file:
/// nothing to write while the child runs).
pub fn run_bounded_fed(mut cmd: Command, input: &[u8], limit: Duration) -> Run {
    let mut stdin = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut stdin, input).unwrap();
    stdin.rewind().unwrap();
    let mut out = tempfile::tempfile().unwrap();
    let mut err = tempfile::tempfile().unwrap();
    let what = format!("{cmd:?}");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::from(stdin))
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
            // Whatever can be read, as text even if it is not UTF-8: the panic is the point.
            let mut stderr = Vec::new();
            let _ = err.rewind().and_then(|()| err.read_to_end(&mut stderr));
            panic!("{what} still running after {limit:?}; killed. stderr:\n{}", show(&stderr));
        }
        thread::sleep(Duration::from_millis(20));
    };
    let took = start.elapsed();
    Run { status, stdout: read_all(&mut out), stderr: read_all(&mut err), took }
}

/// curl against `url`, trusting `ca`, logging in as `user`; `extra` go before the URL.
/// Bounded twice: curl's own `--max-time 60`, and 90 s of [`run_bounded`].
pub fn curl(ca: &Path, user: (&str, &str), url: &str, extra: &[&str]) -> Run {
    let mut cmd = Command::new(CURL);
    cmd.args(["--silent", "--show-error"])
        .args(["--connect-timeout", "10", "--max-time", "60"])
        .arg("--cacert")
        .arg(ca)
        // Passed as one argv element: no shell, so a password needs no quoting.
        .arg("--user")
        .arg(format!("{}:{}", user.0, user.1))
        .args(extra)
        .arg(url);
    run_bounded(cmd, Duration::from_secs(90))
}

/// Everything in `file` from its start (panics if it cannot be read).
pub fn read_all(file: &mut File) -> Vec<u8> {
    let mut bytes = Vec::new();
    file.rewind().unwrap();
    file.read_to_end(&mut bytes).unwrap();
    bytes
}

/// Bytes as text, invalid UTF-8 replaced.
pub fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
