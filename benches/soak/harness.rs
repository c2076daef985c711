//! The peers of a soak run: a Dovecot tuned for thousands of sessions, mailgate started
//! with its log in a file (a soak writes too much to keep in memory), and what is read
//! from them: mailgate's resident set, its log's warnings and refusals, its metrics.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::dovecot::{Dovecot, Options};
use crate::support::tls::TestPki;

/// The file-descriptor limit the bench asks for itself; Dovecot, mailgate and Redis
/// inherit it.
pub const NOFILE: u64 = 262_144;

/// Raises RLIMIT_NOFILE of this process (and so of every child) with prlimit(1): the std
/// library has no setrlimit and the bench takes no new dependency for one call.
pub fn raise_nofile() {
    let pid = std::process::id().to_string();
    let limit = format!("--nofile={NOFILE}:{NOFILE}");
    let raised = Command::new("prlimit").args(["--pid", &pid, &limit]).status();
    if !raised.is_ok_and(|s| s.success()) {
        // Without CAP_SYS_RESOURCE the hard limit stays: raise the soft limit to it.
        let hard = std::fs::read_to_string("/proc/self/limits")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
            .unwrap_or_default();
        let _ = Command::new("prlimit").args(["--pid", &pid, &format!("--nofile={hard}:{hard}")]).status();
        eprintln!("note: RLIMIT_NOFILE could not be raised to {NOFILE}; it is {}", nofile());
    }
}

/// This process's RLIMIT_NOFILE (soft), from /proc; its children inherit it.
pub fn nofile() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or_default();
    line.split_whitespace().nth(3).and_then(|n| n.parse().ok()).unwrap_or(1024)
}

/// Test user `i`: name and password.
pub fn user(i: usize) -> (String, String) {
    (format!("soak{i}"), format!("pw-{i}-soak"))
}

/// Dovecot for `sessions` concurrent sessions: login and mail processes that serve many
/// clients each (`client_limit`), per-user-and-address caps out of the way, POP3 without
/// the maildrop lock (churn opens POP3 sessions of one user concurrently).
pub fn dovecot(users: usize, sessions: usize) -> Dovecot {
    let names: Vec<(String, String)> = (0..users).map(user).collect();
    let refs: Vec<(&str, &str)> = names.iter().map(|(u, p)| (u.as_str(), p.as_str())).collect();
    // Both protocols' sessions go through each login service's processes (TLS proxying
    // keeps them there); 4 processes per login service, mail processes of 500 clients.
    let login_clients = (sessions / 4 + 500).max(1000);
    let mail_processes = sessions / 500 + 8;
    let extra = format!(
        r#"
# Soak: many sessions (benches/soak/harness.rs)
default_vsz_limit = 2G
service imap-login {{
  service_count = 0
  client_limit = {login_clients}
  process_min_avail = 4
  process_limit = 8
}}
service pop3-login {{
  service_count = 0
  client_limit = {login_clients}
  process_min_avail = 4
  process_limit = 8
}}
service imap {{
  service_count = 0
  client_limit = 500
  process_limit = {mail_processes}
}}
service pop3 {{
  service_count = 0
  client_limit = 500
  process_limit = {mail_processes}
}}
service auth {{
  client_limit = {auth_clients}
}}
service anvil {{
  client_limit = {auth_clients}
}}
protocol imap {{
  mail_max_userip_connections = 1000000
}}
protocol pop3 {{
  mail_max_userip_connections = 1000000
  pop3_lock_session = no
}}
"#,
        auth_clients = 10_000,
    );
    Dovecot::start_with(&refs, &Options { extra, ..Options::default() })
}

/// The clients' TLS settings: trusting the test CA, and a full handshake for every
/// connection (no session resumption, what a client connecting for the first time costs)
/// unless `SOAK_TLS_RESUME=1`.
pub fn client_tls(pki: &TestPki) -> std::sync::Arc<tokio_rustls::rustls::ClientConfig> {
    let mut config = (*pki.client_config(&[])).clone();
    if std::env::var("SOAK_TLS_RESUME").as_deref() != Ok("1") {
        config.resumption = tokio_rustls::rustls::client::Resumption::disabled();
    }
    std::sync::Arc::new(config)
}

/// A mailgate configuration: implicit-TLS IMAP and POP3 listeners on an OS-assigned port,
/// upstream Dovecot over implicit TLS, limits that admit the whole load, then `extra`.
pub fn config(pki: &TestPki, dovecot: &Dovecot, extra: &str) -> String {
    format!(
        r#"
[[listener]]
name = "imaps"
protocol = "imap"
address = "127.0.0.1:0"
tls = "implicit"

[[listener]]
name = "pop3s"
protocol = "pop3"
address = "127.0.0.1:0"
tls = "implicit"

[tls]
certificates = [{{ cert = {cert:?}, key = {key:?} }}]
handshake_timeout = "30s"

[upstream.default]
imap = "{imap}"
pop3 = "{pop3}"
tls = "implicit"
ca_file = {ca:?}
connect_timeout = "10s"
tls_timeout = "20s"
login_timeout = "30s"

[pop3]
idle_timeout = "60m"

[admin]
address = "127.0.0.1:0"

[shutdown]
grace = "5s"

[limits]
max_connections = 1000000
max_connections_per_ip = 1000000
max_connections_per_user = 1000000
max_connections_per_user_ip = 1000000
connections_per_ip_per_minute = 0
logins_per_ip_per_minute = 0
{extra}
"#,
        cert = pki.cert.display().to_string(),
        key = pki.key.display().to_string(),
        imap = dovecot.imaps,
        pop3 = dovecot.pop3s,
        ca = dovecot.ca_pem().display().to_string(),
    )
}

pub struct Mailgate {
    child: Child,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
    pub imaps: SocketAddr,
    pub pop3s: SocketAddr,
    pub admin: SocketAddr,
    scan: LogScan,
}

impl Mailgate {
    /// Starts the release binary with `config` (in `dir`), its log (info) in `dir/mailgate.log`.
    pub fn start(dir: &Path, config: &str) -> Mailgate {
        let config_path = dir.join("mailgate.toml");
        let log_path = dir.join("mailgate.log");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mailgate"))
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", std::env::var("SOAK_RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mailgate");
        let unset = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut mailgate = Mailgate {
            child,
            log_path,
            config_path,
            imaps: unset,
            pop3s: unset,
            admin: unset,
            scan: LogScan::default(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = std::fs::read_to_string(&mailgate.log_path).unwrap_or_default();
            let found = crate::support::gateway::parse_listening(&log);
            if let (Some(i), Some(p), Some(a)) = (found.get("imaps"), found.get("pop3s"), found.get("admin")) {
                (mailgate.imaps, mailgate.pop3s, mailgate.admin) = (*i, *p, *a);
                return mailgate;
            }
            if let Ok(Some(status)) = mailgate.child.try_wait() {
                panic!("mailgate exited with {status}:\n{log}");
            }
            assert!(Instant::now() < deadline, "mailgate did not start:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident set in KiB (`VmRSS`), 0 once the process is gone.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap_or("VmRSS: 0 kB");
        line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
    }

    /// Open file descriptors.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    pub fn hup(&self) {
        let _ = Command::new("kill").args(["-HUP", &self.pid().to_string()]).status();
    }

    /// Reads the log written since the last call and returns the totals so far.
    pub fn scan_log(&mut self) -> &LogScan {
        self.scan.update(&self.log_path);
        &self.scan
    }

    /// `GET /metrics` from the admin listener: the body.
    pub fn metrics(&self) -> String {
        let Ok(mut tcp) = std::net::TcpStream::connect_timeout(&self.admin, Duration::from_secs(5)) else {
            return String::new();
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
        let mut text = String::new();
        let _ = tcp.read_to_string(&mut text);
        text
    }

    /// The sum of a metric's samples whose line contains every one of `labels`.
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Mailgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // SOAK_KEEP_LOG=path: keep mailgate's log (the temp dir goes).
        if let Ok(keep) = std::env::var("SOAK_KEEP_LOG") {
            let _ = std::fs::copy(&self.log_path, keep);
        }
    }
}

/// What mailgate's log said, read incrementally.
#[derive(Default)]
pub struct LogScan {
    offset: u64,
    partial: String,
    pub warn: usize,
    pub error: usize,
    /// `connection refused by a limit` lines.
    pub refused_by_limit: usize,
    /// WARN and ERROR lines grouped by their text (numbers blanked), with counts.
    pub groups: BTreeMap<String, usize>,
}

impl LogScan {
    fn update(&mut self, path: &Path) {
        let Ok(mut file) = std::fs::File::open(path) else { return };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut chunk = Vec::new();
        let Ok(n) = file.take(256 << 20).read_to_end(&mut chunk) else { return };
        self.offset += n as u64;
        self.partial.push_str(&String::from_utf8_lossy(&chunk));
        let Some(end) = self.partial.rfind('\n') else { return };
        let complete: String = self.partial.drain(..=end).collect();
        for line in complete.lines() {
            let level = if line.contains(" WARN ") {
                self.warn += 1;
                "WARN"
            } else if line.contains(" ERROR ") {
                self.error += 1;
                "ERROR"
            } else {
                if line.contains("connection refused by a limit") {
                    self.refused_by_limit += 1;
                }
                continue;
            };
            // The target and message, without the timestamp, the span and the fields, so
            // that one kind of warning is one group.
            let text = line.split_once(&format!(" {level} ")).map_or(line, |(_, t)| t);
            let text = text.rsplit_once("}: ").map_or(text, |(_, t)| t);
            let mut key = String::new();
            for word in text.split(' ') {
                if word.contains('=') && !key.is_empty() {
                    break;
                }
                key.push_str(word);
                key.push(' ');
            }
            *self.groups.entry(format!("{level} {key}")).or_default() += 1;
        }
    }

    pub fn print(&self) {
        println!(
            "mailgate log: {} WARN, {} ERROR, {} connections refused by a limit",
            self.warn, self.error, self.refused_by_limit
        );
        for (text, count) in &self.groups {
            println!("  {count:>7} x {text}");
        }
    }
}

/// Dovecot's errors, warnings and fatal lines, grouped like mailgate's.
pub fn dovecot_problems(dovecot: &Dovecot) {
    let mut groups: BTreeMap<String, usize> = BTreeMap::new();
    for line in dovecot.log().lines().filter(|l| l.contains("Error:") || l.contains("Warning:") || l.contains("Fatal:"))
    {
        let text = line.split_once(": ").map_or(line, |(_, t)| t);
        let key: String = text.chars().map(|c| if c.is_ascii_digit() { '#' } else { c }).take(150).collect();
        *groups.entry(key).or_default() += 1;
    }
    println!("Dovecot log: {} error/warning/fatal lines", groups.values().sum::<usize>());
    for (text, count) in groups.iter().take(20) {
        println!("  {count:>7} x {text}");
    }
}

/// The `k`-th of `spread` loopback source addresses (127.x.y.z, away from 127.0.0.1 where
/// mailgate and Dovecot live): per-address caps and ephemeral ports are then not the limit.
pub fn source(base: u8, k: usize, spread: usize) -> IpAddr {
    let k = k % spread.max(1);
    IpAddr::V4(Ipv4Addr::new(127, base, (k / 250) as u8, (k % 250 + 1) as u8))
}
