//! Reference proxies to compare mailgate's relay with, each a throwaway foreground child on
//! free loopback ports with its configuration, pid and log files in a temp dir, killed on
//! drop:
//!
//! - [`Haproxy`]: HAProxy in TCP mode (`option splice-auto`), plain text both legs
//!   ([`Haproxy::tcp`]) or terminating TLS on both legs ([`Haproxy::tls`]): one hop that
//!   parses nothing, the ceiling for any relay on this machine;
//! - [`NginxMail`]: nginx's mail proxy (IMAP and POP3, plain text both legs) with an
//!   `auth_http` endpoint served by a thread of the calling process that sends every login
//!   to the upstream.
//!
//! [`ensure_installed`] installs Debian's `haproxy`, `nginx-light` and `libnginx-mod-mail`
//! when one is missing (as root, or through sudo), without leaving their system services
//! running.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

use super::process::{run_bounded, tail};

pub const HAPROXY: &str = "/usr/sbin/haproxy";
pub const NGINX: &str = "/usr/sbin/nginx";
/// Debian's `libnginx-mod-mail`.
pub const NGINX_MAIL_MODULE: &str = "/usr/lib/nginx/modules/ngx_mail_module.so";

/// How long a peer may take to listen on all its ports.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts when a port we picked was taken before the peer could bind it.
const START_ATTEMPTS: usize = 5;

/// Installs whichever of HAProxy, nginx and nginx's mail module is missing with apt-get
/// (`apt-get update` first only if the install fails), then panics unless all three are
/// there. Package scripts must not start the system services: a `policy-rc.d` that denies
/// every start is put in place for the install (unless one exists), any haproxy or nginx
/// process that appeared during the install outside this process's tree is terminated,
/// and the units of the packages installed here are disabled where systemctl exists.
pub fn ensure_installed() {
    let missing = missing_packages();
    if !missing.is_empty() {
        eprintln!("peers: installing {}", missing.join(" "));
        let before = processes_named(&["haproxy", "nginx"]);
        let sudo = if is_root() { "" } else { "sudo " };
        let script = format!(
            r#"set -e
export DEBIAN_FRONTEND=noninteractive
policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | {sudo}tee /usr/sbin/policy-rc.d >/dev/null
  {sudo}chmod 755 /usr/sbin/policy-rc.d
  policy=yes
fi
trap 'if [ -n "$policy" ]; then {sudo}rm -f /usr/sbin/policy-rc.d; fi' EXIT
install() {{ {sudo}apt-get install -y -qq --no-install-recommends {packages} >/dev/null; }}
install || {{ {sudo}apt-get update -qq && install; }}
"#,
            packages = missing.join(" ")
        );
        // Two benches installing at once would fight over dpkg's lock: one at a time.
        let lock = std::env::temp_dir().join("mailgate-peers-install.lock");
        let mut cmd = Command::new("flock");
        cmd.arg(&lock).args(["sh", "-c", &script]);
        let run = run_bounded(cmd, Duration::from_secs(900));
        let started: Vec<u32> = processes_named(&["haproxy", "nginx"])
            .into_iter()
            .filter(|pid| !before.contains(pid) && !descends_from(*pid, std::process::id()))
            .collect();
        if !started.is_empty() {
            eprintln!("peers: stopping services the install started: {started:?}");
            signal("TERM", &started);
        }
        if Path::new("/usr/bin/systemctl").exists() || Path::new("/bin/systemctl").exists() {
            let units: Vec<&str> = missing
                .iter()
                .filter_map(|p| match *p {
                    "haproxy" => Some("haproxy.service"),
                    "nginx-light" => Some("nginx.service"),
                    _ => None,
                })
                .collect();
            if !units.is_empty() {
                let _ = Command::new("systemctl")
                    .args(["disable", "--quiet"])
                    .args(&units)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        assert!(
            run.status.success(),
            "installing {} failed ({}):\n{}",
            missing.join(" "),
            run.status,
            tail(&run.output(), 30)
        );
    }
    let still = missing_packages();
    assert!(still.is_empty(), "still missing after apt-get install: {}", still.join(" "));
}

fn missing_packages() -> Vec<&'static str> {
    [(HAPROXY, "haproxy"), (NGINX, "nginx-light"), (NGINX_MAIL_MODULE, "libnginx-mod-mail")]
        .into_iter()
        .filter(|(path, _)| !Path::new(path).exists())
        .map(|(_, package)| package)
        .collect()
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A peer's name and version (`HAProxy 2.6.12-1+deb12u4`, `nginx 1.22.1`), from `-v`.
pub fn version(binary: &str) -> String {
    let Ok(out) = Command::new(binary).arg("-v").output() else {
        return format!("{binary}: not runnable");
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let line = text.lines().next().unwrap_or_default();
    if let Some(version) = line.strip_prefix("HAProxy version ") {
        format!("HAProxy {}", version.split_whitespace().next().unwrap_or("?"))
    } else if let Some((_, version)) = line.split_once("nginx/") {
        format!("nginx {}", version.trim())
    } else {
        line.trim().to_string()
    }
}

// ---------------------------------------------------------------------------------------
// HAProxy

/// HAProxy with one TCP-mode frontend per upstream.
pub struct Haproxy {
    /// Where to connect, one per upstream given, in that order.
    pub addrs: Vec<SocketAddr>,
    peer: Peer,
}

impl Haproxy {
    /// Plain text on both legs: `addrs[i]` forwards to `upstreams[i]`.
    pub fn tcp(upstreams: &[SocketAddr]) -> Haproxy {
        Haproxy::start(upstreams, None)
    }

    /// TLS on both legs: each frontend terminates TLS with `cert`/`key` (PEM), and opens a
    /// TLS connection to its upstream, verified against `upstream_ca` for the name
    /// `localhost` (unverified when `None`).
    pub fn tls(upstreams: &[SocketAddr], cert: &Path, key: &Path, upstream_ca: Option<&Path>) -> Haproxy {
        Haproxy::start(upstreams, Some((cert, key, upstream_ca)))
    }

    fn start(upstreams: &[SocketAddr], tls: Option<(&Path, &Path, Option<&Path>)>) -> Haproxy {
        assert!(!upstreams.is_empty(), "HAProxy needs at least one upstream");
        assert!(Path::new(HAPROXY).exists(), "{HAPROXY} is missing: call peers::ensure_installed() first");
        let dir = temp_dir("mailgate-haproxy.");
        let frontend_pem = dir.path().join("frontend.pem");
        if let Some((cert, key, _)) = tls {
            // HAProxy wants the certificate and its key in one file.
            let mut pem = fs::read(cert).unwrap_or_else(|e| panic!("reading {}: {e}", cert.display()));
            if !pem.ends_with(b"\n") {
                pem.push(b'\n');
            }
            pem.extend(fs::read(key).unwrap_or_else(|e| panic!("reading {}: {e}", key.display())));
            fs::write(&frontend_pem, pem).unwrap();
        }
        let peer = Peer::start("haproxy", dir, upstreams.len(), |dir, ports| {
            let mut config = format!(
                "# Generated by tests/support/peers.rs\n\
                 global\n  maxconn 4096\n  pidfile {pid}\n\n\
                 defaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  \
                 timeout client 10m\n  timeout server 10m\n\n",
                pid = dir.join("haproxy.pid").display(),
            );
            for (i, (port, upstream)) in ports.iter().zip(upstreams).enumerate() {
                let (bind_tls, server_tls) = match tls {
                    None => (String::new(), String::new()),
                    Some((_, _, ca)) => (
                        format!(" ssl crt {}", frontend_pem.display()),
                        match ca {
                            Some(ca) => format!(
                                " ssl verify required ca-file {} verifyhost localhost sni str(localhost)",
                                ca.display()
                            ),
                            None => " ssl verify none".to_string(),
                        },
                    ),
                };
                config.push_str(&format!(
                    "frontend f{i}\n  bind 127.0.0.1:{port}{bind_tls}\n  default_backend b{i}\n\n\
                     backend b{i}\n  server s{i} {upstream}{server_tls}\n\n"
                ));
            }
            let path = dir.join("haproxy.cfg");
            fs::write(&path, config).unwrap();
            let mut cmd = Command::new(HAPROXY);
            // -db: foreground, no daemon; the child is the only process.
            cmd.arg("-db").arg("-f").arg(&path);
            cmd
        });
        let addrs = peer.ports.iter().map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, *p))).collect();
        Haproxy { addrs, peer }
    }

    /// The processes whose CPU time is HAProxy's (one, with threads).
    pub fn pids(&self) -> Vec<u32> {
        self.peer.pids()
    }

    /// HAProxy's output so far.
    pub fn log(&self) -> String {
        self.peer.log()
    }
}

// ---------------------------------------------------------------------------------------
// nginx mail proxy

/// nginx's mail proxy, plain text on both legs, in front of one IMAP and one POP3 upstream.
pub struct NginxMail {
    pub imap: SocketAddr,
    pub pop3: SocketAddr,
    /// Logins nginx asked the auth endpoint about.
    pub auth_requests: Arc<AtomicU64>,
    peer: Peer,
    auth: AuthHttp,
}

impl NginxMail {
    /// Starts nginx (mail module, `proxy_buffer 64k`, `worker_processes auto`) with an
    /// `auth_http` endpoint that answers every login with `Auth-Status: OK` and the
    /// upstream of its protocol. Logins are passed on as they came: the upstream checks
    /// the password.
    pub fn start(imap_upstream: SocketAddr, pop3_upstream: SocketAddr) -> NginxMail {
        assert!(Path::new(NGINX).exists(), "{NGINX} is missing: call peers::ensure_installed() first");
        assert!(
            Path::new(NGINX_MAIL_MODULE).exists(),
            "{NGINX_MAIL_MODULE} is missing (libnginx-mod-mail): call peers::ensure_installed() first"
        );
        let auth = AuthHttp::start(imap_upstream, pop3_upstream);
        let auth_addr = auth.addr;
        let dir = temp_dir("mailgate-nginx.");
        let peer = Peer::start("nginx", dir, 2, |dir, ports| {
            let d = dir.display();
            // Workers switch to an unprivileged user when the master runs as root.
            let user = if is_root() { "user nobody nogroup;\n" } else { "" };
            let config = format!(
                r#"# Generated by tests/support/peers.rs
load_module {NGINX_MAIL_MODULE};
{user}worker_processes auto;
daemon off;
master_process on;
pid {d}/nginx.pid;
lock_file {d}/nginx.lock;
error_log {d}/error.log warn;

events {{
  worker_connections 1024;
}}

mail {{
  server_name localhost;
  auth_http 127.0.0.1:{auth_port}/auth;
  auth_http_pass_client_cert off;
  proxy on;
  proxy_buffer 64k;
  proxy_pass_error_message on;
  proxy_timeout 10m;
  starttls off;
  xclient off;
  imap_capabilities "IMAP4rev1" "LITERAL+" "UIDPLUS" "IDLE";
  imap_auth plain;
  pop3_capabilities "TOP" "USER" "UIDL";
  pop3_auth plain;

  server {{
    listen 127.0.0.1:{imap};
    protocol imap;
  }}
  server {{
    listen 127.0.0.1:{pop3};
    protocol pop3;
  }}
}}
"#,
                auth_port = auth_addr.port(),
                imap = ports[0],
                pop3 = ports[1],
            );
            let path = dir.join("nginx.conf");
            fs::write(&path, config).unwrap();
            let mut cmd = Command::new(NGINX);
            // -p: no default prefix paths; -e: the log before the configuration is read.
            cmd.arg("-p").arg(dir).arg("-e").arg(dir.join("error.log")).arg("-c").arg(&path);
            cmd
        });
        let local = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        NginxMail {
            imap: local(peer.ports[0]),
            pop3: local(peer.ports[1]),
            auth_requests: auth.requests.clone(),
            peer,
            auth,
        }
    }

    /// The master and its workers (the CPU time of nginx is theirs together).
    pub fn pids(&self) -> Vec<u32> {
        self.peer.pids()
    }

    /// nginx's output and error log so far.
    pub fn log(&self) -> String {
        format!(
            "{}\n--- error.log ---\n{}",
            self.peer.log(),
            fs::read_to_string(self.peer.dir.path().join("error.log")).unwrap_or_default()
        )
    }

    /// The address of the auth endpoint (for a look at what nginx sends it).
    pub fn auth_addr(&self) -> SocketAddr {
        self.auth.addr
    }
}

/// nginx's `auth_http` endpoint: every request gets `Auth-Status: OK` and the upstream of
/// the protocol in its `Auth-Protocol` header.
struct AuthHttp {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl AuthHttp {
    fn start(imap: SocketAddr, pop3: SocketAddr) -> AuthHttp {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding the auth_http endpoint");
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let (stop2, requests2) = (stop.clone(), requests.clone());
        let thread = std::thread::Builder::new()
            .name("nginx-auth-http".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stop2.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    if answer_auth(stream, imap, pop3).is_ok() {
                        requests2.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .unwrap();
        AuthHttp { addr, stop, requests, thread: Some(thread) }
    }
}

fn answer_auth(stream: TcpStream, imap: SocketAddr, pop3: SocketAddr) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut protocol = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("Auth-Protocol") {
                protocol = value.trim().to_ascii_lowercase();
            }
        }
    }
    let upstream = if protocol == "pop3" { pop3 } else { imap };
    let answer = format!(
        "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: {}\r\nAuth-Port: {}\r\n\r\n",
        upstream.ip(),
        upstream.port()
    );
    let mut stream = stream;
    stream.write_all(answer.as_bytes())?;
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Let nginx close first; it reads the answer to its end.
    let mut rest = [0u8; 256];
    let _ = reader.get_mut().read(&mut rest);
    Ok(())
}

impl Drop for AuthHttp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// A foreground child on free ports

struct Peer {
    name: &'static str,
    ports: Vec<u16>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Peer {
    /// Picks `count` free ports, has `command` make the configuration (in the temp dir) and
    /// the command line for them, starts it and waits until every port accepts; retries
    /// with other ports if one was taken in between. Panics with the peer's output otherwise.
    fn start(
        name: &'static str,
        mut dir: tempfile::TempDir,
        count: usize,
        command: impl Fn(&Path, &[u16]) -> Command,
    ) -> Peer {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let ports = free_ports(count);
            let output = dir.path().join("output.log");
            let stdio = fs::File::create(&output).unwrap();
            let mut cmd = command(dir.path(), &ports);
            // No process group of its own: Ctrl-C on the bench reaches the peer too.
            let child = cmd
                .stdin(Stdio::null())
                .stdout(stdio.try_clone().unwrap())
                .stderr(stdio)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {name}: {e}"));
            let mut peer = Peer { name, ports, child: Some(child), dir };
            match peer.wait_listening() {
                Ok(()) => return peer,
                Err(report) => {
                    peer.stop();
                    let clash =
                        ["Address already in use", "cannot bind", "Cannot bind"].iter().any(|s| report.contains(s));
                    if !clash {
                        panic!("{name} did not start:\n{report}");
                    }
                    last = report;
                    dir = std::mem::replace(&mut peer.dir, temp_dir("mailgate-peer-spare."));
                }
            }
        }
        panic!("{name} failed to bind its ports {START_ATTEMPTS} times; last attempt:\n{last}");
    }

    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut pending: Vec<u16> = self.ports.clone();
        loop {
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                return Err(format!("{} exited with {status}:\n{}", self.name, self.log()));
            }
            pending.retain(|port| {
                TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, *port)), Duration::from_millis(200))
                    .is_err()
            });
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} not listening on {pending:?} after {START_TIMEOUT:?}:\n{}",
                    self.name,
                    self.log()
                ));
            }
            sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        let text = fs::read_to_string(self.dir.path().join("output.log")).unwrap_or_default();
        let mut report = tail(&text, 40);
        if self.name == "nginx" {
            let errors = fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default();
            report.push_str(&format!("\n--- error.log ---\n{}", tail(&errors, 40)));
        }
        report
    }

    fn pids(&self) -> Vec<u32> {
        let Some(child) = &self.child else { return Vec::new() };
        let mut pids = vec![child.id()];
        pids.extend(children_of(child.id()));
        pids
    }

    /// SIGTERM (nginx's master then stops its workers), SIGKILL for whatever is left after
    /// 5 s; the workers are collected first, since a killed master's orphans cannot be
    /// found by their parent any more.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pid = child.id();
        let workers = children_of(pid);
        signal("TERM", &[pid]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            sleep(Duration::from_millis(10));
        }
        if matches!(child.try_wait(), Ok(None)) {
            eprintln!("{} (pid {pid}) ignored SIGTERM; killing it", self.name);
            let _ = child.kill();
        }
        let _ = child.wait();
        let left: Vec<u32> = workers.into_iter().filter(|w| Path::new(&format!("/proc/{w}")).exists()).collect();
        if !left.is_empty() {
            signal("KILL", &left);
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().expect("creating a temp dir");
    // nginx's workers (an unprivileged user when run as root) need nothing in it, but
    // reading it does no harm.
    let _ = fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755));
    dir
}

/// Distinct free loopback ports (held together, so none is handed out twice, then let go
/// for the peer to bind).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> =
        (0..count).map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0")).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

fn signal(name: &str, pids: &[u32]) {
    let _ =
        Command::new("kill").arg("-s").arg(name).args(pids.iter().map(u32::to_string)).stderr(Stdio::null()).status();
}

/// (pid, parent pid, command name) of every process, from /proc.
fn processes() -> Vec<(u32, u32, String)> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid ..."; comm may contain spaces and parens.
            let (head, rest) = stat.rsplit_once(')')?;
            let comm = head.split_once('(')?.1.to_string();
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid, comm))
        })
        .collect()
}

/// Direct children of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    processes().into_iter().filter(|(_, ppid, _)| *ppid == pid).map(|(p, _, _)| p).collect()
}

fn processes_named(names: &[&str]) -> HashSet<u32> {
    processes().into_iter().filter(|(_, _, comm)| names.contains(&comm.as_str())).map(|(p, _, _)| p).collect()
}

/// Whether `ancestor` is `pid` or one of its ancestors.
fn descends_from(pid: u32, ancestor: u32) -> bool {
    let parents: std::collections::HashMap<u32, u32> = processes().into_iter().map(|(p, pp, _)| (p, pp)).collect();
    let mut at = pid;
    for _ in 0..64 {
        if at == ancestor {
            return true;
        }
        match parents.get(&at) {
            Some(&parent) if parent != 0 && parent != at => at = parent,
            _ => return false,
        }
    }
    false
}

/// utime + stime of the processes, in seconds (`/proc/<pid>/stat`, fields 14 and 15,
/// divided by the clock ticks per second); a process that is gone counts nothing.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .map(|pid| {
            let text = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let fields: Vec<&str> = after.split_whitespace().collect();
            // After the comm: state is [0], utime (field 14 overall) [11], stime [12].
            let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            field(11) + field(12)
        })
        .sum();
    ticks as f64 / clock_ticks() as f64
}

/// `sysconf(_SC_CLK_TCK)`, from `getconf CLK_TCK` (100 if that fails).
pub fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}
