//! A throwaway Redis Cluster on loopback for integration tests: three masters, no replicas,
//! no persistence, each `redis-server` with its own directory and log in one tempdir, joined
//! by `redis-cli --cluster create`. It owns the processes (a killed master stays dead; drop
//! kills the rest) and the map of which node serves which slot; raw commands go through
//! `redis::send`, the RESP code the standalone server uses.
//!
//! Every wait is bounded; on failure the panic carries every node's log.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::{send, spawn, REDIS_SERVER};

pub const REDIS_CLI: &str = "/usr/bin/redis-cli";
/// The key space of every Redis Cluster.
pub const SLOTS: u16 = 16384;
const MASTERS: usize = 3;
/// A node's cluster bus listens on its port + 10000 (Redis's default `cluster-port`).
const BUS_OFFSET: u16 = 10000;

pub struct RedisCluster {
    nodes: Vec<Node>,
    /// `(first slot, last slot, node)`, read once from `CLUSTER NODES` when the cluster was up.
    /// Never stale: without replicas nothing fails over, and the tests do not reshard.
    slots: Vec<(u16, u16, usize)>,
    dir: tempfile::TempDir,
}

struct Node {
    addr: SocketAddr,
    /// `None` once killed.
    child: Option<Child>,
    log: PathBuf,
}

impl RedisCluster {
    /// Starts three masters, joins them and waits until every node says `cluster_state:ok`
    /// with all 16384 slots assigned (within 20 s in all, else a panic with the logs).
    ///
    /// The nodes run with `cluster-require-full-coverage no`: after `kill(n)` the other
    /// masters go on serving their own slots (what a client library must cope with), where
    /// Redis's default would take the whole cluster down until the dead master came back.
    pub fn start() -> RedisCluster {
        for tool in [REDIS_SERVER, REDIS_CLI] {
            assert!(Path::new(tool).exists(), "{tool} is missing: tests/run.sh installs redis-server and redis-tools");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut cluster = RedisCluster { nodes: Vec::new(), slots: Vec::new(), dir: tempfile::tempdir().unwrap() };
        for n in 0..MASTERS {
            let node = cluster.spawn(n, deadline);
            cluster.nodes.push(node);
        }
        cluster.create(deadline);
        cluster.await_ok(deadline);
        cluster.slots = cluster.slot_owners();
        cluster
    }

    /// Starts node `n` on a free port pair. Ports are picked just before the start, one node
    /// at a time, so the nodes already running hold theirs; should another process take the
    /// pair in between (the server then exits, unable to bind), a new pair is picked.
    fn spawn(&self, n: usize, deadline: Instant) -> Node {
        let dir = self.dir.path().join(format!("node-{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("redis.log");
        let config = self.dir.path().join(format!("nodes-{n}.conf"));
        loop {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port_pair()));
            // A failed attempt may have written its node id; this attempt is a new node.
            let _ = std::fs::remove_file(&config);
            let config_file = config.display().to_string();
            let cluster = [
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "2000",
                "--cluster-require-full-coverage",
                "no",
                "--cluster-config-file",
                &config_file,
            ];
            let mut child = spawn(addr.port(), &dir, &log, &cluster);
            loop {
                if send(addr, &["PING"]).is_ok_and(|reply| reply == "+PONG") {
                    return Node { addr, child: Some(child), log };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("cluster node {n} did not start:\n{}", read(&log));
                }
                if child.try_wait().expect("redis-server status").is_some() {
                    break; // it could not bind: another pair
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// `redis-cli --cluster create`, killed at the deadline: it waits for the nodes to agree
    /// with no limit of its own.
    fn create(&self, deadline: Instant) {
        let out = self.dir.path().join("cluster-create.log");
        // To a file: a pipe nobody reads while waiting could fill and block it.
        let file = std::fs::File::create(&out).unwrap();
        let mut cli = Command::new(REDIS_CLI)
            .args(["--cluster", "create"])
            .args(self.nodes.iter().map(|node| node.addr.to_string()))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start redis-cli");
        let status = loop {
            if let Some(status) = cli.try_wait().expect("redis-cli status") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = cli.kill();
                let _ = cli.wait();
                panic!("redis-cli --cluster create did not finish:\n{}\n{}", read(&out), self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "redis-cli --cluster create: {status}\n{}\n{}", read(&out), self.logs());
    }

    /// Until every node sees the whole cluster: `redis-cli` returns when the nodes agree on
    /// the configuration, which can be before each one has marked the cluster ok.
    fn await_ok(&self, deadline: Instant) {
        loop {
            let ready = (0..MASTERS).all(|n| {
                self.try_command(n, &["CLUSTER", "INFO"]).is_ok_and(|info| {
                    field(&info, "cluster_state") == Some("ok")
                        && field(&info, "cluster_slots_assigned") == Some("16384")
                        && field(&info, "cluster_known_nodes") == Some("3")
                })
            });
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not come up:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Who serves which slots, by `CLUSTER NODES` on node 0 (lines `id ip:port@bus flags
    /// master ping pong epoch link slot...`); nodes told apart by port, all being 127.0.0.1.
    fn slot_owners(&self) -> Vec<(u16, u16, usize)> {
        let table = self.command(0, &["CLUSTER", "NODES"]);
        let mut owners = Vec::new();
        for line in table.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields[1].split('@').next().and_then(|a| a.rsplit(':').next()).and_then(|p| p.parse().ok());
            let node = self.nodes.iter().position(|node| Some(node.addr.port()) == port);
            let node = node.unwrap_or_else(|| panic!("unknown node in CLUSTER NODES: {line}"));
            // `[slot->-id]` entries are migrations; none here, and they own nothing yet.
            for range in fields[8..].iter().filter(|range| !range.starts_with('[')) {
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                owners.push((first.parse().unwrap(), last.parse().unwrap(), node));
            }
        }
        let covered: usize = owners.iter().map(|(first, last, _)| usize::from(last - first) + 1).sum();
        assert_eq!(covered, usize::from(SLOTS), "CLUSTER NODES:\n{table}");
        owners
    }

    /// `redis://127.0.0.1:P/` of each node, in node order (killed ones included).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|node| format!("redis://{}/", node.addr)).collect()
    }

    pub fn addr(&self, n: usize) -> SocketAddr {
        self.nodes[n].addr
    }

    /// The node serving `slot`.
    pub fn node_of_slot(&self, slot: u16) -> usize {
        let owner = self.slots.iter().find(|(first, last, _)| (*first..=*last).contains(&slot));
        owner.unwrap_or_else(|| panic!("slot {slot} out of range")).2
    }

    /// The node serving `key` (its hash tag's slot, if it has one).
    pub fn node_of_key(&self, key: &str) -> usize {
        self.node_of_slot(key_slot(key))
    }

    /// Kills master `n` with SIGKILL, as a crash. Its slots have no replica to fail over
    /// to: they stay assigned to the dead node, which the others mark `fail` after
    /// `cluster-node-timeout` (2 s, see `await_failed`), and keys there are unreachable
    /// (the others answer `-MOVED` to the dead address) while the rest are served.
    pub fn kill(&mut self, n: usize) {
        if let Some(mut child) = self.nodes[n].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Until every live node has flagged the killed node `n` as `fail` (not just `fail?`,
    /// suspected), within 20 s: from then on the cluster's answers no longer change.
    pub fn await_failed(&self, n: usize) {
        let port = format!(":{}@", self.nodes[n].addr.port());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let failed = self.live().all(|live| {
                self.try_command(live, &["CLUSTER", "NODES"]).is_ok_and(|table| {
                    table.lines().filter(|line| line.contains(&port)).any(|line| {
                        let flags = line.split_whitespace().nth(2).unwrap_or_default();
                        flags.split(',').any(|flag| flag == "fail")
                    })
                })
            });
            if failed {
                return;
            }
            assert!(Instant::now() < deadline, "node {n} was not marked failed:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One raw command to node `n` (see `redis::send` for the reply); panics with the logs
    /// if the node cannot be reached.
    pub fn command(&self, n: usize, args: &[&str]) -> String {
        self.try_command(n, args).unwrap_or_else(|e| panic!("cluster node {n} {args:?}: {e}\n{}", self.logs()))
    }

    /// As `command`, the connection error returned (a killed node refuses connections).
    pub fn try_command(&self, n: usize, args: &[&str]) -> std::io::Result<String> {
        send(self.nodes[n].addr, args)
    }

    /// An integer reply from node `n` (`DBSIZE`, `CLUSTER KEYSLOT`, ...).
    pub fn integer(&self, n: usize, args: &[&str]) -> i64 {
        let reply = self.command(n, args);
        reply.strip_prefix(':').and_then(|i| i.parse().ok()).unwrap_or_else(|| panic!("node {n} {args:?}: {reply}"))
    }

    /// Keys stored in the whole cluster, over the nodes still alive.
    pub fn dbsize_total(&self) -> i64 {
        self.live().map(|n| self.integer(n, &["DBSIZE"])).sum()
    }

    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&n| self.nodes[n].child.is_some())
    }

    fn logs(&self) -> String {
        let logs = self.nodes.iter().enumerate();
        logs.map(|(n, node)| format!("--- node {n} ({}) ---\n{}", node.addr, read(&node.log))).collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in 0..self.nodes.len() {
            self.kill(n);
        }
    }
}

/// The slot Redis Cluster puts `key` in: CRC16 (XMODEM) of the key, or of its hash tag,
/// the part between the first `{` and the next `}` when that part is not empty, mod 16384.
/// Computed here so a test can place keys without asking a node (or with it dead).
pub fn key_slot(key: &str) -> u16 {
    let key = key.as_bytes();
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let close = key[open + 1..].iter().position(|&b| b == b'}')?;
            Some(&key[open + 1..open + 1 + close])
        })
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key);
    crc16_xmodem(hashed) % SLOTS
}

/// CRC16-CCITT as XMODEM computes it: polynomial 0x1021, initial value 0, no reflection.
fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc = 0u16;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// A port P, free now, with P + 10000 (the node's cluster bus) free too and in range;
/// both probed by binding them.
fn free_port_pair() -> u16 {
    for _ in 0..1000 {
        let client = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = client.local_addr().unwrap().port();
        let Some(bus) = port.checked_add(BUS_OFFSET) else { continue };
        if TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port P with P + {BUS_OFFSET} free too");
}

/// `value` of the `name:value` line in `CLUSTER INFO`.
fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
