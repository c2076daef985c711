//! The mailgate binary for long differential runs: like `support::gateway::Gateway`, but
//! its log is kept as a bounded tail (a million steps at trace level would not fit in
//! memory) and it can say whether the process is still alive.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TAIL_LINES: usize = 400;

pub struct Mailgate {
    child: Child,
    addrs: HashMap<String, SocketAddr>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Mailgate {
    /// Writes `config` into `dir` and starts mailgate, waiting for all its listeners.
    pub fn start(dir: &std::path::Path, config: &str) -> Mailgate {
        let path = dir.join("mailgate-fuzz.toml");
        std::fs::write(&path, config).unwrap();
        let expected: Vec<String> = config
            .lines()
            .filter_map(|l| l.trim().strip_prefix("name = \"").and_then(|n| n.strip_suffix('"')))
            .map(str::to_string)
            .collect();
        let mut child = Command::new(env!("CARGO_BIN_EXE_mailgate"))
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info,mailgate=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mailgate");
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (sink, stderr) = (tail.clone(), child.stderr.take().unwrap());
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(found) = listening(&line) {
                    let _ = addr_tx.send(found);
                }
                let mut tail = sink.lock().unwrap();
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let mut mailgate = Mailgate { child, addrs: HashMap::new(), tail };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !expected.iter().all(|name| mailgate.addrs.contains_key(name)) {
            if let Ok((name, addr)) = addr_rx.recv_timeout(Duration::from_millis(50)) {
                mailgate.addrs.insert(name, addr);
            }
            if let Ok(Some(status)) = mailgate.child.try_wait() {
                panic!("mailgate exited with {status}:\n{}", mailgate.log_tail());
            }
            assert!(Instant::now() < deadline, "mailgate did not start:\n{}", mailgate.log_tail());
        }
        mailgate
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        *self.addrs.get(listener).unwrap_or_else(|| panic!("no listener {listener}: {:?}", self.addrs))
    }

    pub fn log_tail(&self) -> String {
        self.tail.lock().unwrap().iter().map(|l| format!("{l}\n")).collect()
    }

    /// None while running, else how it ended.
    pub fn exited(&mut self) -> Option<String> {
        self.child.try_wait().ok().flatten().map(|s| s.to_string())
    }
}

impl Drop for Mailgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(listener, address)` of a `... listening listener=NAME address=IP:PORT ...` line.
fn listening(line: &str) -> Option<(String, SocketAddr)> {
    if !line.contains(" listening") {
        return None;
    }
    let field = |key: &str| line.split_whitespace().find_map(|w| w.strip_prefix(key)).map(|v| v.trim_matches('"'));
    Some((field("listener=")?.to_string(), field("address=")?.parse().ok()?))
}
