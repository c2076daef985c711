//! A throwaway Dovecot 2.3 to use as the real upstream server in tests.
//!
//! Each [`Dovecot`] owns a temp dir holding its config, TLS material,
//! `base_dir`, `state_dir`, log and mail, and listens on four free loopback
//! ports, so any number of instances can run side by side (and next to a
//! system Dovecot) while tests run in parallel.
//!
//! Privileges: as root, Dovecot runs as usual (master as root, `dovecot` and
//! `dovenull` for internal and login processes) and mail belongs to the
//! unprivileged system user `mailgate-test`, created on first use, because
//! Dovecot refuses to access mail as uid 0. As any other user, everything
//! (mail included) runs as that user, which needs the "rootless" settings:
//! no chroot and the internal user/group set to ourselves.
//!
//! Loopback connections count as "secured" to Dovecot (the client IP equals
//! the local IP), so plaintext logins on the plain ports work even before
//! STARTTLS; `disable_plaintext_auth = no` just makes that explicit.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{chown, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::mailgen;

/// How long `start` waits for the listeners to greet before giving up.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` lets the master shut down before using SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts when a port we picked got taken before Dovecot could bind it.
const START_ATTEMPTS: usize = 5;
/// The mail owner when running as root.
const MAIL_USER: &str = "mailgate-test";

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub struct Dovecot {
    /// Plain IMAP (STARTTLS offered).
    pub imap: SocketAddr,
    /// Plain POP3 (STLS offered).
    pub pop3: SocketAddr,
    /// IMAP over implicit TLS.
    pub imaps: SocketAddr,
    /// POP3 over implicit TLS.
    pub pop3s: SocketAddr,
    /// IMAP over implicit TLS behind `haproxy = yes` (PROXY header required), with
    /// [`Options::haproxy`].
    pub imaps_haproxy: Option<SocketAddr>,
    /// POP3 over implicit TLS behind `haproxy = yes`.
    pub pop3s_haproxy: Option<SocketAddr>,
    child: Option<Child>,
    dir: tempfile::TempDir,
    users: Vec<String>,
    ident: &'static Identity,
}

/// Who owns what; resolved once per test process.
#[derive(Debug)]
struct Identity {
    mail_uid: u32,
    mail_gid: u32,
    internal_user: String,
    internal_group: String,
    login_user: String,
    /// Not root: no chroot, no privilege switching.
    rootless: bool,
}

enum StartError {
    /// Another process grabbed one of our ports; worth retrying.
    PortTaken(String),
    Fatal(String),
}

/// Settings beyond the defaults.
#[derive(Clone, Debug)]
pub struct Options {
    /// Dovecot's `login_trusted_networks`: clients there may forward the real client's
    /// address (IMAP `ID x-originating-ip`, POP3 `XCLIENT`). Empty: nobody. By default
    /// 127.0.0.1, the address mailgate connects from: as a deployment should be set up
    /// (docs/OPERATIONS.md), so that Dovecot's per-address rules see each client.
    pub login_trusted_networks: String,
    /// Two more listeners (`imaps_haproxy`, `pop3s_haproxy`) that require a PROXY header
    /// from 127.0.0.0/8.
    pub haproxy: bool,
    /// Dovecot's own failed-login delays as shipped (`auth_failure_delay` 2 s, the anvil
    /// penalty per address); otherwise off, since they only slow a test suite down.
    pub auth_penalties: bool,
    /// IMAP COMPRESS=DEFLATE (RFC 4978, the `imap_zlib` plugin).
    pub compress: bool,
    /// Speaks TLS 1.0 and nothing newer, as an old server does: `ssl_min_protocol` lets
    /// Dovecot down to it, an OpenSSL configuration file (`OPENSSL_CONF`, passed to the
    /// login processes through `import_environment`) caps the maximum, and both cipher
    /// lists lower OpenSSL 3's security level, which refuses TLS 1.0 otherwise. Login lines
    /// then name the negotiated version (`%k`: "TLSv1 with cipher ...").
    pub tls1_only: bool,
    /// The `quota` plugin (maildir backend) with this `quota_rule` (`*:storage=100K`).
    pub quota_rule: Option<String>,
    /// `imap_quota` too: the QUOTA capability and GETQUOTAROOT (RFC 2087).
    pub imap_quota: bool,
    /// More configuration, appended last (later settings and blocks override earlier ones).
    pub extra: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            login_trusted_networks: "127.0.0.1/32".into(),
            haproxy: false,
            auth_penalties: false,
            compress: false,
            tls1_only: false,
            quota_rule: None,
            imap_quota: false,
            extra: String::new(),
        }
    }
}

impl Dovecot {
    /// Starts a fresh Dovecot serving `users` (name, password), each with an
    /// empty Maildir INBOX. Panics with Dovecot's log if it does not come up
    /// within 10 s.
    pub fn start(users: &[(&str, &str)]) -> Dovecot {
        Dovecot::start_with(users, &Options::default())
    }

    /// As [`Dovecot::start`], with `options`.
    pub fn start_with(users: &[(&str, &str)], options: &Options) -> Dovecot {
        for (user, pass) in users {
            // Names become path components and passwd-file fields.
            assert!(
                !user.is_empty() && user.chars().all(|c| c.is_ascii_alphanumeric() || "._-@+".contains(c)),
                "unsupported user name {user:?}"
            );
            assert!(!pass.contains([':', '\n', '\r']), "passwd-file can't hold password {pass:?}");
        }
        let ident = identity();
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            match Dovecot::try_start(users, ident, options) {
                Ok(dovecot) => return dovecot,
                Err(StartError::PortTaken(report)) => last = report,
                Err(StartError::Fatal(report)) => panic!("dovecot failed to start\n{report}"),
            }
        }
        panic!("dovecot failed to bind its ports {START_ATTEMPTS} times; last attempt:\n{last}");
    }

    fn try_start(users: &[(&str, &str)], ident: &'static Identity, options: &Options) -> Result<Dovecot, StartError> {
        let dir = tempfile::Builder::new()
            .prefix("mailgate-dovecot.")
            .tempdir()
            .map_err(|e| StartError::Fatal(format!("creating temp dir: {e}")))?;
        // The auth process (user `dovecot`) reads the passwd-file and the
        // mail user needs to reach its home, both below this directory.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .map_err(|e| StartError::Fatal(format!("chmod temp dir: {e}")))?;
        let root = dir.path();

        let [imap, pop3, imaps, pop3s, imaps_haproxy, pop3s_haproxy] = free_ports();
        let instance = format!("mailgate-test-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));

        make_tls(&root.join("tls")).map_err(StartError::Fatal)?;

        let mut passwd = String::new();
        for (user, pass) in users {
            let home = root.join("mail").join(user);
            for sub in ["cur", "new", "tmp"] {
                fs::create_dir_all(home.join("Maildir").join(sub))
                    .map_err(|e| StartError::Fatal(format!("creating maildir: {e}")))?;
            }
            fs::set_permissions(&home, fs::Permissions::from_mode(0o700))
                .and_then(|()| chown_tree(&home, ident.mail_uid, ident.mail_gid))
                .map_err(|e| StartError::Fatal(format!("preparing {}: {e}", home.display())))?;
            passwd.push_str(&format!(
                "{user}:{{PLAIN}}{pass}:{}:{}::{}::\n",
                ident.mail_uid,
                ident.mail_gid,
                home.display()
            ));
        }
        write_file(&root.join("passwd"), passwd.as_bytes(), 0o644).map_err(StartError::Fatal)?;

        let mut config = config(root, &instance, ident, [imap, pop3, imaps, pop3s]);
        config = config.replace(
            "login_trusted_networks =\n",
            &format!("login_trusted_networks = {}\n", options.login_trusted_networks),
        );
        if options.auth_penalties {
            config = config.replace(AUTH_PENALTIES_OFF, "");
        }
        if options.compress {
            config.push_str("protocol imap {\n  mail_plugins = $mail_plugins imap_zlib\n}\n");
        }
        if let Some(rule) = &options.quota_rule {
            let imap = if options.imap_quota { " imap_quota" } else { "" };
            config.push_str(&format!(
                "mail_plugins = $mail_plugins quota\n\
                 protocol imap {{\n  mail_plugins = $mail_plugins quota{imap}\n}}\n\
                 plugin {{\n  quota = maildir:User quota\n  quota_rule = {rule}\n}}\n"
            ));
        }
        if options.haproxy {
            config.push_str(&format!(
                "haproxy_trusted_networks = 127.0.0.0/8\n\
                 service imap-login {{\n  inet_listener imaps_haproxy {{\n    port = {imaps_haproxy}\n    ssl = yes\n    haproxy = yes\n  }}\n}}\n\
                 service pop3-login {{\n  inet_listener pop3s_haproxy {{\n    port = {pop3s_haproxy}\n    ssl = yes\n    haproxy = yes\n  }}\n}}\n"
            ));
        }
        if options.tls1_only {
            let openssl_conf = root.join("openssl-tls1.cnf");
            write_file(&openssl_conf, TLS1_ONLY_OPENSSL_CONF.as_bytes(), 0o644).map_err(StartError::Fatal)?;
            config.push_str(&format!(
                "ssl_min_protocol = TLSv1\n\
                 ssl_cipher_list = DEFAULT:@SECLEVEL=0\n\
                 import_environment = TZ CORE_OUTOFMEM CORE_ERROR LISTEN_PID LISTEN_FDS NOTIFY_SOCKET OPENSSL_CONF={}\n\
                 login_log_format_elements = user=<%u> method=%m rip=%r lip=%l mpid=%e %c %k session=<%{{session}}>\n",
                openssl_conf.display()
            ));
        }
        config.push_str(&options.extra);
        let config_path = root.join("dovecot.conf");
        write_file(&config_path, config.as_bytes(), 0o644).map_err(StartError::Fatal)?;

        // Output before the log process is up (e.g. config errors) lands here.
        let stdio = fs::File::create(root.join("stdio.log"))
            .map_err(|e| StartError::Fatal(format!("creating stdio.log: {e}")))?;
        let child = spawn(&config_path, stdio).map_err(|e| StartError::Fatal(format!("spawning dovecot: {e}")))?;

        let mut dovecot = Dovecot {
            imap: SocketAddr::from((Ipv4Addr::LOCALHOST, imap)),
            pop3: SocketAddr::from((Ipv4Addr::LOCALHOST, pop3)),
            imaps: SocketAddr::from((Ipv4Addr::LOCALHOST, imaps)),
            pop3s: SocketAddr::from((Ipv4Addr::LOCALHOST, pop3s)),
            imaps_haproxy: options.haproxy.then(|| SocketAddr::from((Ipv4Addr::LOCALHOST, imaps_haproxy))),
            pop3s_haproxy: options.haproxy.then(|| SocketAddr::from((Ipv4Addr::LOCALHOST, pop3s_haproxy))),
            child: Some(child),
            dir,
            users: users.iter().map(|(u, _)| u.to_string()).collect(),
            ident,
        };
        match dovecot.wait_ready(&instance) {
            Ok(()) => Ok(dovecot),
            Err(port_taken) => {
                dovecot.stop();
                let report = dovecot.report();
                Err(if port_taken { StartError::PortTaken(report) } else { StartError::Fatal(report) })
            }
        }
    }

    /// Waits until plain IMAP greets with our instance's greeting.
    /// On failure says whether a port clash is the likely cause.
    fn wait_ready(&mut self, instance: &str) -> Result<(), bool> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("child present while starting");
            if let Ok(Some(_)) = child.try_wait() {
                return Err(self.report().contains("Address already in use"));
            }
            // The greeting names the instance, so another server that got
            // hold of the port can't fool us. The master binds every
            // listener before it starts serving, so IMAP answering means the
            // others are bound too.
            if greeting(self.imap).is_some_and(|g| g.starts_with("* OK") && g.contains(instance)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                eprintln!("dovecot did not greet within {START_TIMEOUT:?}");
                return Err(false);
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Log plus early stdout/stderr, for panic messages.
    fn report(&self) -> String {
        let stdio = fs::read(self.dir.path().join("stdio.log")).unwrap_or_default();
        format!(
            "--- dovecot stdout/stderr ---\n{}\n--- dovecot log ---\n{}",
            String::from_utf8_lossy(&stdio),
            self.log()
        )
    }

    /// CA certificate that issued Dovecot's server certificate (for
    /// `localhost` and 127.0.0.1); point clients' trust store at it.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("tls").join("ca.pem")
    }

    /// The user's Maildir, which is also their INBOX.
    pub fn maildir(&self, user: &str) -> PathBuf {
        assert!(
            self.users.iter().any(|u| u == user),
            "{user:?} is not a user of this Dovecot (users: {:?})",
            self.users
        );
        self.dir.path().join("mail").join(user).join("Maildir")
    }

    /// Dovecot's log so far; with `auth_verbose`, logins and auth failures
    /// show up here. It starts with one "no auth attempts" disconnect from
    /// `start`'s readiness probe.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.dir.path().join("dovecot.log")).unwrap_or_default()).into_owned()
    }

    /// The instance's temp dir (config, TLS files, mail, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Drops `message` into the user's Maildir/new, as an MDA would. Dovecot
    /// notices it on its next sync (e.g. NOOP, SELECT or a new POP3 session).
    pub fn deliver(&self, user: &str, message: &[u8]) {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let maildir = self.maildir(user);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let name = format!(
            "{}.M{}P{}Q{}.mailgate-test",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        // Write in tmp/ and rename, so Dovecot never sees a partial file.
        let tmp = maildir.join("tmp").join(&name);
        write_file(&tmp, message, 0o600).unwrap_or_else(|e| panic!("{e}"));
        chown(&tmp, Some(self.ident.mail_uid), Some(self.ident.mail_gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", tmp.display()));
        fs::rename(&tmp, maildir.join("new").join(&name))
            .unwrap_or_else(|e| panic!("moving {} to new/: {e}", tmp.display()));
    }

    /// Adds `count` generated messages (see [`mailgen::fill_maildir`]) to the
    /// user's INBOX and returns their total size. UID n of a fresh INBOX
    /// holds `mailgen::message(seed, n - 1, mailgen::MAX_BIG)`.
    pub fn fill(&self, user: &str, count: usize, seed: u64) -> u64 {
        let maildir = self.maildir(user);
        let total = mailgen::fill_maildir(&maildir, count, seed);
        chown_tree(&maildir, self.ident.mail_uid, self.ident.mail_gid)
            .unwrap_or_else(|e| panic!("chown {}: {e}", maildir.display()));
        total
    }

    /// Replaces the user's INBOX with `count` other messages under the same UIDVALIDITY,
    /// their UIDs starting again at 1: what a restore or a rebuilt store does (a server-side
    /// violation of RFC 9051 §2.3.1.1 that legacy servers commit). Returns the UIDVALIDITY.
    pub fn rebuild_keeping_uid_validity(&self, user: &str, count: usize, seed: u64) -> u32 {
        let maildir = self.maildir(user);
        // A maildrop only ever read over POP3 may have no UIDVALIDITY yet (then 0).
        let uidlist = fs::read_to_string(maildir.join("dovecot-uidlist")).unwrap_or_default();
        let header = uidlist.lines().next().unwrap_or_default();
        let uid_validity: u32 =
            header.split(' ').find_map(|w| w.strip_prefix('V')).and_then(|v| v.parse().ok()).unwrap_or(0);
        for entry in fs::read_dir(&maildir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("dovecot") {
                fs::remove_file(entry.path()).unwrap();
            }
        }
        for sub in ["cur", "new", "tmp"] {
            let _ = fs::remove_dir_all(maildir.join(sub));
        }
        let total = self.fill(user, count, seed);
        assert!(total > 0);
        if uid_validity != 0 {
            write_file(&maildir.join("dovecot-uidlist"), format!("3 V{uid_validity} N1\n").as_bytes(), 0o600)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        chown_tree(&maildir, self.ident.mail_uid, self.ident.mail_gid)
            .unwrap_or_else(|e| panic!("chown {}: {e}", maildir.display()));
        uid_validity
    }

    /// Kills the master and every process below it with SIGKILL, as a crash would: open
    /// connections are cut without a word. [`Dovecot::restart`] brings it back.
    pub fn crash(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mut pids = vec![child.id()];
        let mut next = 0;
        while next < pids.len() {
            pids.extend(children_of(pids[next]));
            next += 1;
        }
        signal("KILL", &pids);
        let _ = child.wait();
    }

    /// Starts the stopped (or crashed) instance again on the same ports, with its mail and
    /// configuration; panics with its log if it does not greet within 10 s (a few attempts
    /// while the killed processes' listening sockets go away).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "dovecot is running");
        let config_path = self.dir.path().join("dovecot.conf");
        let config = fs::read_to_string(&config_path).expect("dovecot.conf");
        let instance = config
            .lines()
            .find_map(|l| l.strip_prefix("instance_name = "))
            .expect("instance_name in dovecot.conf")
            .to_string();
        for _ in 0..START_ATTEMPTS {
            let stdio = fs::OpenOptions::new().append(true).open(self.dir.path().join("stdio.log")).unwrap();
            let child = spawn(&config_path, stdio).expect("spawning dovecot");
            self.child = Some(child);
            match self.wait_ready(&instance) {
                Ok(()) => return,
                Err(_) => {
                    self.stop();
                    sleep(Duration::from_millis(500));
                }
            }
        }
        panic!("dovecot did not restart\n{}", self.report());
    }

    /// Stops Dovecot (idempotent). The temp dir, log included, stays until
    /// the value is dropped. Takes about 1.1 s: the 2.3 master always
    /// sleeps a second after telling its children to close their listeners.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        if let Ok(None) = child.try_wait() {
            // On SIGTERM the master stops all its children and waits for them.
            signal("TERM", &[pid]);
            if !wait_exit(&mut child, STOP_TIMEOUT) {
                // Collect the children before killing the master: once it is
                // gone they are reparented and can't be found this way.
                let mut pids = children_of(pid);
                pids.push(pid);
                eprintln!("dovecot (pid {pid}) ignored SIGTERM; killing {pids:?}");
                signal("KILL", &pids);
            }
        }
        let _ = child.wait();
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Failed logins normally take 2 s and repeated ones from one IP get up to 15 s; neither
/// helps a test suite ([`Options::auth_penalties`] keeps them).
const AUTH_PENALTIES_OFF: &str = "auth_failure_delay = 0
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
";

/// OpenSSL's defaults for every context a process makes ([`Options::tls1_only`]): at most
/// TLS 1.0, at the security level that allows it.
const TLS1_ONLY_OPENSSL_CONF: &str = "openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MaxProtocol = TLSv1
CipherString = DEFAULT:@SECLEVEL=0
";

fn config(root: &Path, instance: &str, ident: &Identity, ports: [u16; 4]) -> String {
    let [imap, pop3, imaps, pop3s] = ports;
    let root = root.display();
    let mut conf = format!(
        r#"# Generated by tests/support/dovecot.rs
instance_name = {instance}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
auth_verbose = yes
# Tests look for the instance name to know they reached this server.
login_greeting = Dovecot ready ({instance}).

protocols = imap pop3
listen = 127.0.0.1
ssl = yes
ssl_cert = <{root}/tls/server.pem
ssl_key = <{root}/tls/server.key
disable_plaintext_auth = no
auth_mechanisms = plain login
login_trusted_networks =

{AUTH_PENALTIES_OFF}
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
first_valid_uid = {mail_uid}
first_valid_gid = 1
mail_location = maildir:~/Maildir
mail_fsync = never
# UID only: two users then have the same UIDLs, the hard case for cache isolation.
pop3_uidl_format = %08Xu

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/passwd
}}

service imap-login {{
  inet_listener imap {{
    port = {imap}
  }}
  inet_listener imaps {{
    port = {imaps}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = {pop3s}
    ssl = yes
  }}
}}
protocol imap {{
  mail_max_userip_connections = 50
}}
protocol pop3 {{
  mail_max_userip_connections = 50
  # One POP3 session per maildrop, as RFC 1939 describes: the second gets [IN-USE].
  pop3_lock_session = yes
}}
"#,
        internal_user = ident.internal_user,
        internal_group = ident.internal_group,
        login_user = ident.login_user,
        mail_uid = ident.mail_uid,
    );
    if ident.rootless {
        conf.push_str("\n# Unprivileged: chroot(2) needs root.\n");
        for service in ["anvil", "imap-login", "pop3-login", "ipc", "old-stats", "imap-urlauth-login"] {
            conf.push_str(&format!("service {service} {{\n  chroot =\n}}\n"));
        }
    }
    conf
}

fn identity() -> &'static Identity {
    static IDENTITY: OnceLock<Identity> = OnceLock::new();
    IDENTITY.get_or_init(|| {
        if run(&["id", "-u"]).trim() == "0" {
            root_identity()
        } else {
            let num = |flag: &str| -> u32 { run(&["id", flag]).trim().parse().expect("numeric output from id") };
            let user = run(&["id", "-un"]).trim().to_string();
            Identity {
                mail_uid: num("-u"),
                mail_gid: num("-g"),
                internal_group: run(&["id", "-gn"]).trim().to_string(),
                login_user: user.clone(),
                internal_user: user,
                rootless: true,
            }
        }
    })
}

fn root_identity() -> Identity {
    let (mail_name, mail_uid, mail_gid) = ensure_mail_user();
    // Debian's package creates dovecot/dovenull; fall back to the mail user
    // for a Dovecot installed without them.
    let (internal_user, internal_gid) = match getent_passwd("dovecot") {
        Some((_, gid)) => ("dovecot".to_string(), gid),
        None => (mail_name.clone(), mail_gid),
    };
    let internal_group =
        getent_group_name(internal_gid).unwrap_or_else(|| panic!("no group name for gid {internal_gid}"));
    let login_user = if getent_passwd("dovenull").is_some() { "dovenull".to_string() } else { internal_user.clone() };
    Identity { mail_uid, mail_gid, internal_user, internal_group, login_user, rootless: false }
}

/// Finds or creates the system user owning mail; falls back to `nobody`.
fn ensure_mail_user() -> (String, u32, u32) {
    if let Some((uid, gid)) = getent_passwd(MAIL_USER) {
        return (MAIL_USER.to_string(), uid, gid);
    }
    // Test binaries may run in parallel (nextest), and concurrent useradd
    // runs for one name were seen to briefly expose a uid that was then
    // rolled back, so check-and-create runs under a lock (flock(1), as std
    // has no file locking at our MSRV).
    let script = format!(
        "getent passwd {MAIL_USER} >/dev/null || useradd --system --no-create-home \
         --user-group --home-dir /nonexistent --shell /usr/sbin/nologin {MAIL_USER}"
    );
    let lock = std::env::temp_dir().join("mailgate-test-useradd.lock");
    let locked = Command::new("flock").arg(&lock).args(["sh", "-c", &script]).stdout(Stdio::null()).status();
    if locked.is_err() {
        // No flock(1): take our chances.
        let _ = Command::new("sh").args(["-c", &script]).status();
    }
    if let Some((uid, gid)) = getent_passwd(MAIL_USER) {
        return (MAIL_USER.to_string(), uid, gid);
    }
    eprintln!("could not create user {MAIL_USER}; mail will belong to nobody");
    let (uid, gid) =
        getent_passwd("nobody").unwrap_or_else(|| panic!("can't create {MAIL_USER} and there is no nobody user"));
    ("nobody".to_string(), uid, gid)
}

fn getent_passwd(name: &str) -> Option<(u32, u32)> {
    let out = Command::new("getent").args(["passwd", name]).output().ok()?;
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let fields: Vec<&str> = line.trim().split(':').collect();
    Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?))
}

fn getent_group_name(gid: u32) -> Option<String> {
    let out = Command::new("getent").args(["group", &gid.to_string()]).output().ok()?;
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let name = line.split(':').next()?.trim();
    (!name.is_empty()).then(|| name.to_string())
}

fn dovecot_binary() -> &'static str {
    // /usr/sbin is often not in a normal user's PATH.
    if Path::new("/usr/sbin/dovecot").exists() {
        "/usr/sbin/dovecot"
    } else {
        "dovecot"
    }
}

/// Distinct free loopback ports. They are only free when we look, so the
/// caller retries if Dovecot then fails to bind one.
fn free_ports() -> [u16; 6] {
    // Hold all listeners at once so the kernel can't hand out a port twice.
    let listeners: Vec<TcpListener> =
        (0..6).map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0")).collect();
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

/// A private CA and a server certificate it signed, for `localhost` and
/// 127.0.0.1. Not a single self-signed certificate: webpki (rustls) rejects
/// a CA certificate used as the server's end-entity certificate, and
/// `openssl req -x509` marks what it makes as a CA.
fn make_tls(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let path = |name: &str| dir.join(name).display().to_string();
    let (ca_key, ca_pem) = (path("ca.key"), path("ca.pem"));
    let (key, csr, ext, pem) = (path("server.key"), path("server.csr"), path("server.ext"), path("server.pem"));
    // P-256 keys are generated instantly, unlike RSA.
    let new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

    let mut args = vec!["req", "-x509", "-days", "365", "-subj", "/CN=mailgate test CA"];
    args.extend(new_key);
    args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    args.extend(["-keyout", &ca_key, "-out", &ca_pem]);
    openssl(&args)?;

    let mut args = vec!["req", "-new", "-subj", "/CN=localhost"];
    args.extend(new_key);
    args.extend(["-keyout", &key, "-out", &csr]);
    openssl(&args)?;

    write_file(
        Path::new(&ext),
        b"basicConstraints=critical,CA:FALSE\n\
          keyUsage=critical,digitalSignature\n\
          extendedKeyUsage=serverAuth\n\
          subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        0o644,
    )?;
    // Every instance's CA has the same name; distinct serials keep clients
    // that key certificates by issuer and serial (NSS) from seeing a clash.
    let serial = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos().to_string();
    openssl(&[
        "x509",
        "-req",
        "-days",
        "365",
        "-set_serial",
        &serial,
        "-in",
        &csr,
        "-CA",
        &ca_pem,
        "-CAkey",
        &ca_key,
        "-extfile",
        &ext,
        "-out",
        &pem,
    ])
}

fn openssl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running openssl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("openssl {} failed ({}):\n{}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr)))
    }
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

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn signal(name: &str, pids: &[u32]) {
    let _ =
        Command::new("kill").arg("-s").arg(name).args(pids.iter().map(u32::to_string)).stderr(Stdio::null()).status();
}

fn wait_exit(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return true;
        }
        sleep(Duration::from_millis(10));
    }
    false
}

/// Direct children of `pid`, from /proc (Linux only; empty elsewhere).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid ..."; comm may contain spaces and parens.
            let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}

/// Dovecot in the foreground with `config`, its output to `stdio`. Deliberately no
/// separate process group: then Ctrl-C on `cargo test` reaches Dovecot too instead of
/// leaving it running.
fn spawn(config: &Path, stdio: fs::File) -> std::io::Result<std::process::Child> {
    let stderr = stdio.try_clone()?;
    Command::new(dovecot_binary())
        .arg("-F")
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(stdio)
        .stderr(stderr)
        .spawn()
}
