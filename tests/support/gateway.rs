//! Runs the real `mailgate` binary with a generated configuration, learns the OS-assigned
//! listener addresses from its "listening" log lines, and keeps its log for assertions
//! (e.g. that no password ever reaches it).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Gateway {
    child: Child,
    addrs: HashMap<String, SocketAddr>,
    log: Arc<Mutex<String>>,
    pub config_path: PathBuf,
}

impl Gateway {
    /// Writes `config` to `dir/mailgate.toml` and starts mailgate with debug logging.
    pub fn start(dir: &Path, config: &str) -> Gateway {
        Gateway::start_logging(dir, config, "debug,mailgate=trace")
    }

    /// Like [`Gateway::start`], with `filter` as `RUST_LOG`.
    pub fn start_logging(dir: &Path, config: &str, filter: &str) -> Gateway {
        let config_path = dir.join(format!("mailgate-{}.toml", std::process::id() as u64 * 1000 + rand_suffix()));
        std::fs::write(&config_path, config).unwrap();
        // Every listener's name (the line after its `[[listener]]` that names it): the admin
        // listener may log before the last of them.
        let expected: Vec<String> = (config.split("[[listener]]").skip(1))
            .filter_map(|block| block.lines().find_map(|l| l.trim().strip_prefix("name = ")))
            .map(|name| name.trim().trim_matches('"').to_string())
            .collect();
        let mut child = Command::new(env!("CARGO_BIN_EXE_mailgate"))
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mailgate");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut gateway = Gateway { child, addrs: HashMap::new(), log, config_path };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !expected.iter().all(|name| gateway.addrs.contains_key(name)) {
            assert!(Instant::now() < deadline, "mailgate did not start:\n{}", gateway.log());
            if let Ok(Some(status)) = gateway.child.try_wait() {
                panic!("mailgate exited with {status}:\n{}", gateway.log());
            }
            gateway.addrs = parse_listening(&gateway.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        gateway
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        *self.addrs.get(listener).unwrap_or_else(|| panic!("no listener {listener}: {:?}", self.addrs))
    }

    /// The admin listener's address (logged as `listener=admin`).
    pub fn admin(&self) -> SocketAddr {
        assert!(
            self.wait_for_log("listener=\"admin\"", Duration::from_secs(10))
                || self.wait_for_log("listener=admin", Duration::from_secs(1)),
            "no admin listener:\n{}",
            self.log()
        );
        *parse_listening(&self.log()).get("admin").expect("admin address")
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The admin listener's answer to `GET /metrics` (headers and body).
    pub fn metrics(&self) -> String {
        self.admin_get("/metrics")
    }

    /// The admin listener's answer to `GET path` (headers and body).
    pub fn admin_get(&self, path: &str) -> String {
        self.admin_get_with(path, "")
    }

    /// [`Gateway::admin_get`] with `Authorization: Bearer <token>`.
    pub fn admin_get_bearer(&self, path: &str, token: &str) -> String {
        self.admin_get_with(path, &format!("Authorization: Bearer {token}\r\n"))
    }

    fn admin_get_with(&self, path: &str, headers: &str) -> String {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(self.admin()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        tcp.write_all(format!("GET {path} HTTP/1.0\r\n{headers}\r\n").as_bytes()).unwrap();
        let mut text = String::new();
        let _ = tcp.read_to_string(&mut text);
        text
    }

    /// Waits (bounded) until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// `... listening listener=NAME address=IP:PORT ...` lines.
pub fn parse_listening(log: &str) -> HashMap<String, SocketAddr> {
    let mut found = HashMap::new();
    for line in log.lines().filter(|l| l.contains(" listening ")) {
        let field = |key: &str| {
            line.split_whitespace().find_map(|w| w.strip_prefix(key)).map(|v| v.trim_matches('"').to_string())
        };
        if let (Some(name), Some(addr)) = (field("listener="), field("address=")) {
            if let Ok(addr) = addr.parse() {
                found.insert(name, addr);
            }
        }
    }
    found
}
