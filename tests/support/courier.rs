//! A throwaway Courier IMAP and Courier POP3 (Debian 12's courier-imap 5.0 / courier-pop
//! 1.0) as a second real upstream next to Dovecot, and mailgate in front of it
//! ([`CourierSetup`]).
//!
//! Installed by `tests/install-courier.sh` (unpacked next to Dovecot: the packages
//! conflict with Dovecot's). Each [`Courier`] owns a temp dir with its users' Maildirs and
//! logs, and runs two `couriertcpd` on free loopback ports: one with `imaplogin` → `imapd`,
//! one with `courierpop3login` → `courierpop3d`, configured by environment variables (the
//! settings of `/etc/courier/imapd` and `pop3d`, without TLS: plain ports only, LOGIN and
//! USER/PASS allowed in clear).
//!
//! Authentication: Courier's login programs ask `authdaemond` over a socket whose path is
//! compiled in (`/run/courier/authdaemon/socket`), so one authdaemond serves every
//! instance of every test process. The first [`Courier`] that finds none running starts it
//! (under a lock file, detached, in its own session) and it stays up for later tests. It
//! uses Debian's default module, `authpam` (PAM service `imap` / `pop3`, i.e. `pam_unix`),
//! so users are real system users: each instance creates its own, named
//! `mgc-<pid>-<n>-<name>` so that parallel test processes never share one, with their home
//! (and `Maildir`) in the instance's temp dir, and deletes them when dropped. Users left
//! behind by a killed test process are deleted by the next start. Tests call users by
//! their short name; [`Courier::login_name`] gives the name to log in with.
//!
//! Courier stores messages with the system's line ends (LF) and adds the CR when it sends
//! them, so [`Courier::fill`] and [`Courier::deliver`] write LF files: a CRLF file would come
//! back with CR CR LF line ends.
//!
//! Courier's ways a test meets (Dovecot's differ):
//! - FETCH echoes header field names quoted and as spelled: `BODY[HEADER.FIELDS ("From")]`.
//! - No LITERAL+ (a `{n+}` literal is taken for the next command), no BINARY; folders live
//!   below `INBOX.` (`CREATE INBOX.Archive`).
//! - Commands pipelined behind LOGIN are lost: `imaplogin` reads them and then executes
//!   `imapd`. Send the next command after LOGIN's OK.
//! - Responses leave in several writes without TCP_NODELAY, so a lone command waiting for
//!   its answer (e.g. `UID FETCH n BODY.PEEK[]`, one at a time) takes about 40 ms (Nagle and
//!   delayed ACK); pipelined commands do not pay it.
//! - A login takes about 100 ms (authdaemond, PAM, yescrypt).
//! - POP3: `+OK headers follow.` for TOP, `+OK POP3 clients that break here, they violate
//!   STD53.` for LIST of an empty maildrop, `LOGIN-DELAY 10` in CAPA.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{chown, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::client::Client;
use super::gateway::Gateway;
use super::mailgen;
use super::setup::gateway_config_with;
use super::tls::TestPki;

/// Where Debian's courier-authlib puts authdaemond's socket (compiled in).
const AUTHDAEMON_DIR: &str = "/run/courier/authdaemon";
const AUTHDAEMOND: &str = "/usr/lib/courier/courier-authlib/authdaemond";
const COURIERTCPD: &str = "/usr/sbin/couriertcpd";
const IMAPLOGIN: &str = "/usr/lib/courier/courier/imaplogin";
const IMAPD: &str = "/usr/bin/imapd";
const POP3LOGIN: &str = "/usr/lib/courier/courier/courierpop3login";
const POP3D: &str = "/usr/lib/courier/courier/courierpop3d";
/// Prefix of the system users instances create.
const USER_PREFIX: &str = "mgc-";

/// How long `start` waits for the listeners to greet.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` lets the servers exit after SIGTERM before using SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts when a port we picked got taken before couriertcpd could bind it.
const START_ATTEMPTS: usize = 5;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The environment of Courier's IMAP server: Debian's `/etc/courier/imapd` without TLS.
const IMAP_ENV: &[(&str, &str)] = &[
    ("IMAP_CAPABILITY", "IMAP4rev1 UIDPLUS CHILDREN NAMESPACE THREAD=ORDEREDSUBJECT THREAD=REFERENCES SORT QUOTA IDLE"),
    ("IMAP_KEYWORDS", "1"),
    ("IMAP_ACL", "1"),
    ("IMAP_PROXY", "0"),
    ("IMAP_IDLE_TIMEOUT", "60"),
    ("IMAP_MAILBOX_SANITY_CHECK", "1"),
    ("IMAP_DISABLETHREADSORT", "0"),
    ("IMAP_CHECK_ALL_FOLDERS", "0"),
    ("IMAP_OBSOLETE_CLIENT", "0"),
    ("IMAP_UMASK", "022"),
    ("IMAP_USELOCKS", "1"),
    ("IMAP_ENHANCEDIDLE", "0"),
    ("IMAP_TRASHFOLDERNAME", "Trash"),
    ("IMAP_EMPTYTRASH", "Trash:7"),
    ("IMAP_MOVE_EXPUNGE_TO_TRASH", "0"),
    ("HEADERFROM", "X-IMAP-Sender"),
    ("MAILDIRPATH", "Maildir"),
    // No TLS here: no STARTTLS announced, LOGIN allowed in clear.
    ("IMAP_STARTTLS", "NO"),
    ("IMAP_TLS_REQUIRED", "0"),
];

/// The environment of Courier's POP3 server: Debian's `/etc/courier/pop3d` without TLS.
const POP3_ENV: &[(&str, &str)] = &[
    ("POP3AUTH", ""),
    ("POP3AUTH_TLS", ""),
    ("POP3_PROXY", "0"),
    ("MAILDIRPATH", "Maildir"),
    ("POP3_STARTTLS", "NO"),
    ("POP3_TLS_REQUIRED", "0"),
];

/// A user of one instance.
#[derive(Clone, Debug)]
struct User {
    /// What the test calls the user.
    short: String,
    /// The system user (and login name).
    login: String,
    password: String,
    uid: u32,
    gid: u32,
}

pub struct Courier {
    /// Plain IMAP (LOGIN in clear allowed, no STARTTLS).
    pub imap: SocketAddr,
    /// Plain POP3 (USER/PASS in clear allowed, no STLS).
    pub pop3: SocketAddr,
    imapd: Option<Child>,
    pop3d: Option<Child>,
    dir: tempfile::TempDir,
    users: Vec<User>,
}

enum StartError {
    /// Another process grabbed one of our ports; worth retrying.
    PortTaken(String),
    Fatal(String),
}

impl Courier {
    /// True when the Courier programs this harness runs are installed.
    pub fn installed() -> bool {
        [AUTHDAEMOND, COURIERTCPD, IMAPLOGIN, IMAPD, POP3LOGIN, POP3D, "/etc/pam.d/imap", "/etc/pam.d/pop3"]
            .iter()
            .all(|p| Path::new(p).exists())
    }

    /// Starts a fresh Courier IMAP + POP3 serving `users` (short name, password), each with
    /// an empty Maildir INBOX. Names: 1 to 10 of `a-z0-9`; passwords: no `:`, CR or LF.
    /// Panics with the logs if it does not come up within 10 s, and if Courier is not
    /// installed (`tests/install-courier.sh`).
    pub fn start(users: &[(&str, &str)]) -> Courier {
        assert!(
            Courier::installed(),
            "Courier IMAP/POP3 is not installed: run tests/install-courier.sh (tests/run.sh does)"
        );
        for (user, pass) in users {
            assert!(
                (1..=10).contains(&user.len()) && user.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
                "unsupported user name {user:?} (1-10 of a-z0-9: it becomes part of a system user name)"
            );
            assert!(!pass.is_empty() && !pass.contains([':', '\n', '\r']), "chpasswd can't set password {pass:?}");
        }
        ensure_authdaemond();
        let dir = tempfile::Builder::new().prefix("mailgate-courier.").tempdir().expect("creating temp dir");
        // The users (imapd runs as them) reach their homes below this directory.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        let instance = COUNTER.fetch_add(1, Ordering::Relaxed);
        let users = create_users(dir.path(), instance, users);
        let mut courier = Courier {
            imap: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            pop3: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            imapd: None,
            pop3d: None,
            dir,
            users,
        };
        let mut last = String::new();
        for attempt in 0..START_ATTEMPTS {
            match courier.try_start(attempt) {
                Ok(()) => return courier,
                Err(StartError::PortTaken(report)) => last = report,
                Err(StartError::Fatal(report)) => panic!("courier failed to start\n{report}"),
            }
        }
        panic!("courier failed to bind its ports {START_ATTEMPTS} times; last attempt:\n{last}");
    }

    fn try_start(&mut self, attempt: usize) -> Result<(), StartError> {
        self.stop();
        let [imap, pop3] = free_ports();
        self.imap = SocketAddr::from((Ipv4Addr::LOCALHOST, imap));
        self.pop3 = SocketAddr::from((Ipv4Addr::LOCALHOST, pop3));
        let imap_log = self.dir.path().join(format!("imap.{attempt}.log"));
        let pop3_log = self.dir.path().join(format!("pop3.{attempt}.log"));
        self.imapd = Some(tcpd(imap, &imap_log, IMAP_ENV, &[IMAPLOGIN, IMAPD, "Maildir"]).map_err(StartError::Fatal)?);
        self.pop3d = Some(tcpd(pop3, &pop3_log, POP3_ENV, &[POP3LOGIN, POP3D, "Maildir"]).map_err(StartError::Fatal)?);
        let deadline = Instant::now() + START_TIMEOUT;
        let mut ready = [false, false];
        loop {
            for (i, (addr, prefix)) in [(self.imap, "* OK"), (self.pop3, "+OK")].into_iter().enumerate() {
                if !ready[i] {
                    ready[i] = greeting(addr).is_some_and(|g| g.starts_with(prefix));
                }
            }
            // couriertcpd binds at once and exits if it cannot: still running after a
            // greeting means the greeting was its own.
            let exited = [&mut self.imapd, &mut self.pop3d]
                .into_iter()
                .any(|child| child.as_mut().is_some_and(|c| !matches!(c.try_wait(), Ok(None))));
            if exited {
                let report = self.report();
                self.stop();
                let lower = report.to_ascii_lowercase();
                return Err(if lower.contains("in use") || lower.contains("bind") {
                    StartError::PortTaken(report)
                } else {
                    StartError::Fatal(report)
                });
            }
            if ready == [true, true] {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let report = format!("courier did not greet within {START_TIMEOUT:?}\n{}", self.report());
                self.stop();
                return Err(StartError::Fatal(report));
            }
            sleep(Duration::from_millis(20));
        }
    }

    fn report(&self) -> String {
        format!("{}\n--- authdaemond log (shared) ---\n{}", self.log(), read_lossy(&authdaemon_log()))
    }

    fn user(&self, user: &str) -> &User {
        self.users.iter().find(|u| u.short == user).unwrap_or_else(|| {
            panic!(
                "{user:?} is not a user of this Courier (users: {:?})",
                self.users.iter().map(|u| &u.short).collect::<Vec<_>>()
            )
        })
    }

    /// The name `user` logs in with (a system user of this instance).
    pub fn login_name(&self, user: &str) -> String {
        self.user(user).login.clone()
    }

    /// `(login name, password)` of `user`.
    pub fn credentials(&self, user: &str) -> (String, String) {
        let u = self.user(user);
        (u.login.clone(), u.password.clone())
    }

    /// The user's Maildir, which is also their INBOX.
    pub fn maildir(&self, user: &str) -> PathBuf {
        self.dir.path().join("mail").join(&self.user(user).login).join("Maildir")
    }

    /// The instance's temp dir (homes, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What couriertcpd and the login and mail programs wrote (IMAP, then POP3): logins,
    /// disconnects with byte counts, errors.
    pub fn log(&self) -> String {
        let mut logs: Vec<PathBuf> = fs::read_dir(self.dir.path())
            .map(|d| {
                d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension() == Some("log".as_ref())).collect()
            })
            .unwrap_or_default();
        logs.sort();
        logs.iter()
            .map(|p| format!("--- {} ---\n{}", p.file_name().unwrap().to_string_lossy(), read_lossy(p)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Drops `message` into the user's Maildir/new, as an MDA would, with LF line ends
    /// (how Courier stores mail; it sends CRLF). Courier notices it on its next scan
    /// (e.g. NOOP, SELECT or a new POP3 session).
    pub fn deliver(&self, user: &str, message: &[u8]) {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let u = self.user(user).clone();
        let maildir = self.maildir(user);
        let data = mailgen::lf(message);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let name = format!(
            "{}.M{}P{}Q{}.mailgate-test,S={}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            data.len()
        );
        // Written in tmp/ and renamed, so Courier never sees a partial file.
        let tmp = maildir.join("tmp").join(&name);
        write_file(&tmp, &data, 0o600).unwrap_or_else(|e| panic!("{e}"));
        chown(&tmp, Some(u.uid), Some(u.gid)).unwrap_or_else(|e| panic!("chown {}: {e}", tmp.display()));
        fs::rename(&tmp, maildir.join("new").join(&name))
            .unwrap_or_else(|e| panic!("moving {} to new/: {e}", tmp.display()));
    }

    /// Adds `count` generated messages to the user's INBOX (in `cur/`, some `\Seen` or
    /// `\Flagged \Seen`, as [`mailgen::fill_maildir`] does, but with LF line ends; message
    /// i's INTERNALDATE is 1,600,000,000 + i seconds after the epoch) and
    /// returns their total size as Courier reports it (CRLF). Then logs in once and selects
    /// INBOX, so that Courier assigns the UIDs (in file name order) before any test
    /// session: UID n of a fresh INBOX holds `mailgen::message(seed, n - 1,
    /// mailgen::MAX_BIG)`.
    pub fn fill(&self, user: &str, count: usize, seed: u64) -> u64 {
        static BATCH: AtomicU64 = AtomicU64::new(0);
        let batch = BATCH.fetch_add(1, Ordering::Relaxed);
        let u = self.user(user).clone();
        let cur = self.maildir(user).join("cur");
        let mut total = 0u64;
        for index in 0..count {
            let msg = mailgen::message(seed, index, mailgen::MAX_BIG);
            let data = mailgen::lf(&msg);
            let flags = if index % 11 == 6 {
                "FS"
            } else if index % 3 == 1 {
                "S"
            } else {
                ""
            };
            // Courier gives new messages UIDs in file name order; the names start with a
            // ten-digit time increasing with the index.
            let name = format!(
                "{}.M{index}P{}Q{batch}.mailgen,S={}:2,{flags}",
                1_600_000_000 + index as u64,
                std::process::id(),
                data.len()
            );
            let path = cur.join(name);
            write_file(&path, &data, 0o600).unwrap_or_else(|e| panic!("{e}"));
            // Courier's INTERNALDATE is the file's mtime: the same for every fill.
            fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(UNIX_EPOCH + Duration::from_secs(1_600_000_000 + index as u64)))
                .unwrap_or_else(|e| panic!("setting the mtime of {}: {e}", path.display()));
            chown(&path, Some(u.uid), Some(u.gid)).unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
            total += msg.len() as u64;
        }
        // Let Courier number them now.
        let mut client = self.direct(user);
        let lines = client.command("f", "SELECT INBOX");
        assert!(lines.last().unwrap().starts_with("f OK"), "{lines:?}\n{}", self.log());
        client.send(b"z LOGOUT\r\n");
        let _ = client.rest();
        total
    }

    /// A plain IMAP client straight to Courier, logged in as `user` (LOGIN with the
    /// password as a synchronizing literal: Courier has no LITERAL+).
    pub fn direct(&self, user: &str) -> Client {
        let (login, password) = self.credentials(user);
        let mut client = Client::plain(self.imap);
        let greeting = client.line().expect("greeting");
        assert!(greeting.starts_with("* OK"), "{greeting}");
        client.send(format!("L LOGIN {login} {{{}}}\r\n", password.len()).as_bytes());
        let go = client.line().expect("continuation");
        assert!(go.starts_with('+'), "{go}");
        client.send(password.as_bytes());
        client.send(b"\r\n");
        let lines = client.until_tagged("L");
        assert!(lines.last().unwrap().starts_with("L OK"), "{lines:?}\n{}", self.log());
        client
    }

    /// A plain POP3 client straight to Courier, logged in as `user` with USER/PASS.
    pub fn pop3_direct(&self, user: &str) -> Client {
        let (login, password) = self.credentials(user);
        let mut client = Client::plain(self.pop3);
        let greeting = client.line().expect("greeting");
        assert!(greeting.starts_with("+OK"), "{greeting}");
        client.send(format!("USER {login}\r\n").as_bytes());
        let ok = client.line().expect("USER answer");
        assert!(ok.starts_with("+OK"), "{ok}");
        client.send(format!("PASS {password}\r\n").as_bytes());
        let ok = client.line().expect("PASS answer");
        assert!(ok.starts_with("+OK"), "{ok}\n{}", self.log());
        client
    }

    /// Stops both servers and every session they started (idempotent). The temp dir, logs
    /// included, and the users stay until the value is dropped.
    pub fn stop(&mut self) {
        for child in [self.imapd.take(), self.pop3d.take()].into_iter().flatten() {
            stop_tree(child);
        }
    }
}

impl Drop for Courier {
    fn drop(&mut self) {
        self.stop();
        delete_users(&self.users.iter().map(|u| u.login.clone()).collect::<Vec<_>>());
    }
}

// ---------------------------------------------------------------------------------------
// mailgate in front of Courier
// ---------------------------------------------------------------------------------------

/// Courier with mailgate in front: the standard six listeners (IMAP `imaps`, `imap`,
/// `plain`; POP3 `pop3s`, `pop3`, `pop3-plain`), whose upstream is Courier in plaintext.
pub struct CourierSetup {
    pub gateway: Gateway,
    pub courier: Courier,
    pub pki: TestPki,
    pub dir: tempfile::TempDir,
}

impl CourierSetup {
    /// Courier serving `users`, mailgate with its defaults (cache on) in front.
    pub fn start(users: &[(&str, &str)]) -> CourierSetup {
        CourierSetup::start_with(users, "", "")
    }

    /// `imap_section` lines go under `[imap]`; `extra` is appended to the config.
    pub fn start_with(users: &[(&str, &str)], imap_section: &str, extra: &str) -> CourierSetup {
        let courier = Courier::start(users);
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::generate(dir.path());
        let config = gateway_config_with(
            &pki,
            Some(&courier.imap.to_string()),
            Some(&courier.pop3.to_string()),
            "plaintext",
            None,
            imap_section,
            extra,
        );
        let gateway = Gateway::start(dir.path(), &config);
        CourierSetup { gateway, courier, pki, dir }
    }

    /// An IMAP client on mailgate's implicit-TLS listener, greeting consumed.
    pub fn imaps(&self) -> Client {
        let mut client = Client::tls(self.gateway.addr("imaps"), self.pki.client_config(&[]));
        let greeting = client.line().expect("greeting");
        assert!(greeting.starts_with("* OK"), "{greeting}");
        client
    }

    /// An IMAP client logged in through mailgate (implicit TLS) as `user`.
    pub fn login(&self, user: &str) -> Client {
        let (login, password) = self.courier.credentials(user);
        let mut client = self.imaps();
        client.send(format!("L LOGIN {login} {{{}+}}\r\n", password.len()).as_bytes());
        client.send(password.as_bytes());
        client.send(b"\r\n");
        let lines = client.until_tagged("L");
        assert!(
            lines.last().unwrap().starts_with("L OK"),
            "{lines:?}\n--- mailgate log (tail) ---\n{}\n{}",
            tail(&self.gateway.log(), 40),
            self.courier.log()
        );
        client
    }

    /// An IMAP client straight to Courier, logged in as `user`.
    pub fn direct(&self, user: &str) -> Client {
        self.courier.direct(user)
    }

    /// A POP3 client logged in through mailgate (implicit TLS) with USER/PASS.
    pub fn pop3_login(&self, user: &str) -> Client {
        let (login, password) = self.courier.credentials(user);
        let mut client = Client::tls(self.gateway.addr("pop3s"), self.pki.client_config(&[]));
        let greeting = client.line().expect("greeting");
        assert!(greeting.starts_with("+OK"), "{greeting}");
        client.send(format!("USER {login}\r\nPASS {password}\r\n").as_bytes());
        let ok = client.line().expect("USER answer");
        assert!(ok.starts_with("+OK"), "{ok}");
        let ok = client.line().expect("PASS answer");
        assert!(
            ok.starts_with("+OK"),
            "{ok}\n--- mailgate log (tail) ---\n{}\n{}",
            tail(&self.gateway.log(), 40),
            self.courier.log()
        );
        client
    }

    /// A POP3 client straight to Courier, logged in as `user`.
    pub fn pop3_direct(&self, user: &str) -> Client {
        self.courier.pop3_direct(user)
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// authdaemond (one per machine)
// ---------------------------------------------------------------------------------------

fn authdaemon_log() -> PathBuf {
    std::env::temp_dir().join("mailgate-courier-authdaemond.log")
}

fn authdaemon_up() -> bool {
    UnixStream::connect(Path::new(AUTHDAEMON_DIR).join("socket")).is_ok()
}

/// Starts the machine's shared authdaemond unless it answers on its socket. Test
/// processes run in parallel, so this runs under a lock file (flock(1)); the daemon runs
/// in its own session (setsid(1)), detached from the test's output and process group, and
/// outlives the test process for the next ones.
fn ensure_authdaemond() {
    if authdaemon_up() {
        return;
    }
    let lock = std::env::temp_dir().join("mailgate-courier-authdaemond.lock");
    let log = authdaemon_log();
    // In the locked shell: check again (whoever held the lock may have started it), clear
    // a stale socket, start, wait for the socket. `flock -o`: the daemon must not inherit
    // the lock.
    let script = format!(
        "sock={dir}/socket\n\
         up() {{ python3 -c 'import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' \"$sock\" 2>/dev/null; }}\n\
         up && exit 0\n\
         set -e\n\
         mkdir -p {dir}\n\
         chmod 750 {dir}\n\
         rm -f \"$sock\" {dir}/socket.lock {dir}/pid\n\
         env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin setsid {daemon} </dev/null >>{log} 2>&1 &\n\
         i=0\n\
         while ! up && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n",
        dir = AUTHDAEMON_DIR,
        daemon = AUTHDAEMOND,
        log = log.display(),
    );
    let status = Command::new("flock")
        .arg("-o")
        .arg(&lock)
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .unwrap_or_else(|e| panic!("running flock: {e}"));
    assert!(status.success(), "starting authdaemond failed ({status}):\n{}", read_lossy(&log));
    let deadline = Instant::now() + START_TIMEOUT;
    while !authdaemon_up() {
        assert!(Instant::now() < deadline, "authdaemond does not answer on its socket:\n{}", read_lossy(&log));
        sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// System users
// ---------------------------------------------------------------------------------------

/// The lock dovecot.rs takes around useradd too: concurrent useradd runs clash.
fn useradd_lock() -> PathBuf {
    std::env::temp_dir().join("mailgate-test-useradd.lock")
}

/// Creates the system users of one instance (homes `root/mail/<login>` with an empty
/// Maildir), deleting first any users left by test processes that are gone.
fn create_users(root: &Path, instance: u64, users: &[(&str, &str)]) -> Vec<User> {
    let pid = std::process::id();
    let logins: Vec<String> = users.iter().map(|(u, _)| format!("{USER_PREFIX}{pid}-{instance}-{u}")).collect();
    let mut script = String::from("set -e\n");
    // Leftovers of killed test processes: mgc-<pid>-... whose pid no longer runs.
    script.push_str(&format!(
        "getent passwd | cut -d: -f1 | grep '^{USER_PREFIX}[0-9]*-' | while read -r name; do\n\
         \x20 p=${{name#{USER_PREFIX}}}; p=${{p%%-*}}\n\
         \x20 [ -d /proc/$p ] || userdel -f \"$name\" 2>/dev/null || true\n\
         done\n"
    ));
    for login in &logins {
        assert!(login.len() <= 32, "system user name {login:?} too long");
        let home = root.join("mail").join(login);
        script.push_str(&format!(
            "getent passwd {login} >/dev/null && userdel -f {login}\n\
             useradd --no-create-home --home-dir {home} --shell /usr/sbin/nologin --user-group {login}\n",
            home = home.display(),
        ));
    }
    script.push_str("chpasswd\n");
    let mut child = Command::new("flock")
        .arg("-o")
        .arg(useradd_lock())
        .args(["sh", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running flock: {e}"));
    {
        let mut stdin = child.stdin.take().unwrap();
        for (login, (_, password)) in logins.iter().zip(users) {
            stdin.write_all(format!("{login}:{password}\n").as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "creating users {logins:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    logins
        .into_iter()
        .zip(users)
        .map(|(login, (short, password))| {
            let (uid, gid) = getent_passwd(&login).unwrap_or_else(|| panic!("user {login} was not created"));
            let home = root.join("mail").join(&login);
            for sub in ["cur", "new", "tmp"] {
                fs::create_dir_all(home.join("Maildir").join(sub)).unwrap();
            }
            fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
            chown_tree(&home, uid, gid).unwrap_or_else(|e| panic!("chown {}: {e}", home.display()));
            User { short: short.to_string(), login, password: password.to_string(), uid, gid }
        })
        .collect()
}

fn delete_users(logins: &[String]) {
    if logins.is_empty() {
        return;
    }
    let script: String = logins.iter().map(|l| format!("userdel -f {l} 2>/dev/null || true\n")).collect();
    let _ = Command::new("flock").arg(useradd_lock()).args(["sh", "-c", &script]).stdin(Stdio::null()).status();
}

fn getent_passwd(name: &str) -> Option<(u32, u32)> {
    let out = Command::new("getent").args(["passwd", name]).output().ok()?;
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let fields: Vec<&str> = line.trim().split(':').collect();
    Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?))
}

// ---------------------------------------------------------------------------------------
// Processes and files
// ---------------------------------------------------------------------------------------

/// couriertcpd on 127.0.0.1:`port` running `program` (login program, mail program,
/// maildir) per connection, with `env` only, its output (and its children's) to `log`.
fn tcpd(port: u16, log: &Path, env: &[(&str, &str)], program: &[&str]) -> Result<Child, String> {
    let out = fs::File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    // Deliberately no separate process group: Ctrl-C on `cargo test` reaches it too.
    Command::new(COURIERTCPD)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().copied())
        .args(["-address=127.0.0.1", "-maxprocs=100", "-maxperip=100", "-nodnslookup", "-noidentlookup"])
        .arg(port.to_string())
        .args(program)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("spawning {COURIERTCPD}: {e}"))
}

/// Stops couriertcpd and the sessions it forked (login and mail programs, which do not
/// always exit with it): SIGTERM to all, SIGKILL to what is left after a while.
fn stop_tree(mut child: Child) {
    let pid = child.id();
    let mut pids = descendants(pid);
    pids.push(pid);
    signal("TERM", &pids);
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        let parent_gone = !matches!(child.try_wait(), Ok(None));
        let alive: Vec<u32> =
            pids.iter().copied().filter(|p| *p != pid && Path::new(&format!("/proc/{p}")).exists()).collect();
        if parent_gone && alive.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let mut left = alive;
            if !parent_gone {
                left.push(pid);
            }
            signal("KILL", &left);
            break;
        }
        sleep(Duration::from_millis(10));
    }
    let _ = child.wait();
}

/// Every process below `pid`, from /proc.
fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| {
                    let e = e.ok()?;
                    let child: u32 = e.file_name().to_str()?.parse().ok()?;
                    let stat = fs::read_to_string(e.path().join("stat")).ok()?;
                    let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
                    Some((child, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    // Bounded: a process tree has no cycles, and there are only so many processes.
    while let Some(parent) = frontier.pop() {
        let children: Vec<u32> =
            parents.iter().filter(|(c, p)| *p == parent && !found.contains(c)).map(|(c, _)| *c).collect();
        found.extend(&children);
        frontier.extend(children);
    }
    found
}

fn signal(name: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ =
        Command::new("kill").arg("-s").arg(name).args(pids.iter().map(u32::to_string)).stderr(Stdio::null()).status();
}

/// Distinct free loopback ports; only free when we look, so the caller retries.
fn free_ports() -> [u16; 2] {
    // Hold both listeners at once so the kernel can't hand out a port twice.
    let listeners: Vec<TcpListener> =
        (0..2).map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0")).collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

/// First line the server sends, or None if it doesn't (yet).
fn greeting(addr: SocketAddr) -> Option<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    Some(line)
}

fn read_lossy(path: &Path) -> String {
    String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned()
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    chown(path, Some(uid), Some(gid))?;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}
