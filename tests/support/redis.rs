//! A throwaway `redis-server` on a free loopback port, without persistence, for the tests
//! of limits shared by several mailgate instances; and a few raw RESP commands to look at
//! what they stored (`send`, shared with the cluster in `redis_cluster.rs`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REDIS_SERVER: &str = "/usr/bin/redis-server";

pub struct Redis {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    /// Starts redis-server; panics (with its output) if it does not answer PING within 10 s.
    pub fn start() -> Redis {
        assert!(
            std::path::Path::new(REDIS_SERVER).exists(),
            "{REDIS_SERVER} is missing: tests/run.sh installs redis-server"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut redis = Redis { addr: SocketAddr::from(([127, 0, 0, 1], port)), child: None, dir };
        redis.run();
        redis
    }

    /// (Re)starts the server on the same port. While the server was down, the port was
    /// free for anyone: another test's outgoing connection may have been given it as its
    /// ephemeral source port (the port came from that range). So a server that cannot bind
    /// is started again until the port is free, within 20 s.
    pub fn run(&mut self) {
        let log = self.dir.path().join("redis.log");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut child = spawn(self.addr.port(), self.dir.path(), &log, &[]);
            loop {
                if self.try_command(&["PING"]).is_ok_and(|reply| reply == "+PONG") {
                    self.child = Some(child);
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "redis-server did not start:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                if child.try_wait().expect("redis-server status").is_some() {
                    break; // it could not bind: try again
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Kills the server (as a crash or a network cut would look to mailgate).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends one command; the reply's first line (`:3`, `+OK`, `$-1`, ...), or a bulk
    /// string's content.
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args).unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    fn try_command(&self, args: &[&str]) -> std::io::Result<String> {
        send(self.addr, args)
    }

    /// An integer reply (`ZCARD`, `DBSIZE`, ...).
    pub fn integer(&self, args: &[&str]) -> i64 {
        let reply = self.command(args);
        reply.strip_prefix(':').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{args:?}: {reply}"))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A redis-server on 127.0.0.1:`port`, without persistence, its files in `dir`, its log
/// in `log`, with `extra` arguments (a cluster node's).
pub fn spawn(port: u16, dir: &std::path::Path, log: &std::path::Path, extra: &[&str]) -> Child {
    Command::new(REDIS_SERVER)
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(extra)
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "yes"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server")
}

/// Sends one command to the server at `addr` on a connection of its own; the reply's first
/// line (`:3`, `+OK`, `-MOVED 866 127.0.0.1:40001`, `$-1`, `*3`, ...), or a bulk string's
/// whole content. Whole, because `CLUSTER INFO` and `CLUSTER NODES` answer with one bulk
/// string of many lines; its length is read from the header, not guessed from line ends.
pub fn send(addr: SocketAddr, args: &[&str]) -> std::io::Result<String> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    tcp.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(tcp);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let line = line.trim_end();
    match line.strip_prefix('$').and_then(|len| len.parse::<usize>().ok()) {
        Some(len) => {
            let mut content = vec![0; len + 2]; // and its CRLF
            reader.read_exact(&mut content)?;
            content.truncate(len);
            Ok(String::from_utf8_lossy(&content).into_owned())
        }
        None => Ok(line.to_string()),
    }
}
