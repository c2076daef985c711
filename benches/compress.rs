//! COMPRESS=DEFLATE on the client leg (RFC 4978): bytes on the client wire and mailgate's
//! CPU for a header sync with and without it, and what a compressed session holds.
//!
//! `cargo bench --bench compress` fills one mailbox of a real Dovecot (10,000 mailgen
//! messages; `COMPRESS_MESSAGES` to change it), puts mailgate (release build) in front of
//! it over TLS on both legs, and runs sync_load's header sync (a): `UID FETCH 1:* (UID FLAGS
//! RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE MESSAGE-ID)])` through its
//! implicit-TLS listener, plain and after `COMPRESS DEFLATE`, alternately
//! (`COMPRESS_REPS` each, default 5) after one untimed sync that warms the cache: both modes
//! are answered from the same warm cache. Reported: medians of the bytes mailgate wrote to
//! the client (`mailgate_client_bytes_total{direction="out"}`: under TLS, after compression),
//! mailgate's CPU (on-CPU time of all its threads, from schedstat) and the wall time of the
//! sync.
//!
//! First, before the syncs leave freed memory behind, the memory of idle sessions
//! (`COMPRESS_SESSIONS`, default and at most 20: one user's sessions): RSS growth for that
//! many plain sessions (logged in, INBOX examined), then for as many that turned COMPRESS on
//! and fetched a few headers (both streams used; the compressor given back as they rest,
//! two seconds after their last answer).
//!
//! Last, a client sending one command at a time (`COMPRESS_ROUNDS`, default 500, `UID
//! FETCH n (UID FLAGS RFC822.SIZE)` each, waiting for each answer), plain and compressed:
//! the wire bytes and mailgate's CPU per command, where the compressor is kept between
//! commands.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::client::Client;
use support::setup::{Setup, BOB};

const SYNC: &str = "UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE MESSAGE-ID)])";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// On-CPU seconds of a process's threads (schedstat, nanoseconds; mailgate's runtime
/// threads live as long as it does).
fn process_cpu(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    let nanos: u64 = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    nanos as f64 / 1e9
}

fn process_rss(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
    kib.unwrap_or(0.0) * 1024.0
}

fn client_bytes_out(setup: &Setup) -> f64 {
    let metrics = setup.gateway.metrics();
    let name = "mailgate_client_bytes_total{direction=\"out\",protocol=\"imap\"} ";
    metrics.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

fn session(setup: &Setup, compress: bool) -> Client {
    let mut client = setup.login(BOB);
    if compress {
        assert_eq!(client.command("z", "COMPRESS DEFLATE"), ["z OK DEFLATE active"]);
        client.compress();
    }
    assert!(client.command("s", "EXAMINE INBOX").last().unwrap().starts_with("s OK"));
    client
}

/// One header sync: (bytes mailgate wrote to the client, its CPU seconds, wall seconds).
fn sync(setup: &Setup, client: &mut Client, messages: usize) -> (f64, f64, f64) {
    let pid = setup.gateway.pid();
    let (bytes, cpu, started) = (client_bytes_out(setup), process_cpu(pid), Instant::now());
    client.send(format!("h {SYNC}\r\n").as_bytes());
    let responses = client.responses("h");
    let wall = started.elapsed().as_secs_f64();
    assert!(responses.last().unwrap().starts_with(b"h OK"));
    assert_eq!(responses.len(), messages + 1, "a response per message");
    (client_bytes_out(setup) - bytes, process_cpu(pid) - cpu, wall)
}

/// `rounds` single-message FETCHes, one at a time: (bytes to the client, mailgate CPU).
fn one_at_a_time(setup: &Setup, client: &mut Client, rounds: usize, messages: usize) -> (f64, f64) {
    let pid = setup.gateway.pid();
    let (bytes, cpu) = (client_bytes_out(setup), process_cpu(pid));
    for round in 0..rounds {
        let uid = round % messages + 1;
        let answer = client.command("r", &format!("UID FETCH {uid} (UID FLAGS RFC822.SIZE)"));
        assert!(answer.last().unwrap().starts_with("r OK"), "{answer:?}");
    }
    (client_bytes_out(setup) - bytes, process_cpu(pid) - cpu)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn main() {
    let messages = env_usize("COMPRESS_MESSAGES", 10_000);
    let reps = env_usize("COMPRESS_REPS", 5);
    // Dovecot's test setup takes 50 sessions per user and address.
    let sessions = env_usize("COMPRESS_SESSIONS", 20).min(24);
    let setup = Setup::start_with(
        "",
        "[limits]\nmax_connections_per_ip = 10000\nmax_connections_per_user = 10000\n\
         max_connections_per_user_ip = 10000\nconnections_per_ip_per_minute = 0\nlogins_per_ip_per_minute = 0\n",
    );
    let filled = Instant::now();
    let total = setup.dovecot.fill(BOB.0, messages, 4_978);
    println!("filled {messages} messages ({:.1} MB) in {:?}", total as f64 / 1e6, filled.elapsed());

    // Idle sessions first (before the syncs leave freed memory behind): plain ones, then
    // compressed ones that fetched a few headers, so that both streams were used.
    let mut warm_up = session(&setup, true);
    warm_up.command("f", "UID FETCH 1:20 (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])");
    let pid = setup.gateway.pid();
    std::thread::sleep(Duration::from_millis(500));
    let base = process_rss(pid);
    // Both kinds fetch the same few headers, so that they differ by compression alone.
    let used = |compress: bool| {
        let mut client = session(&setup, compress);
        let fetch = client.command("f", "UID FETCH 1:20 (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])");
        assert!(fetch.last().unwrap().starts_with("f OK"));
        client
    };
    let plain: Vec<Client> = (0..sessions).map(|_| used(false)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let with_plain = process_rss(pid);
    let compressed: Vec<Client> = (0..sessions).map(|_| used(true)).collect();
    // Past the two seconds a waiting session keeps its compressor.
    std::thread::sleep(Duration::from_millis(2_500));
    let with_compressed = process_rss(pid);
    let per = |bytes: f64| bytes / sessions as f64 / 1024.0;
    println!("\nidle sessions ({sessions} each, RSS):");
    println!("| kind | per session |");
    println!("|---|---:|");
    println!("| logged in, examined, 20 headers fetched, plain | {:.0} KiB |", per(with_plain - base));
    println!("| the same, COMPRESS on and used | {:.0} KiB |", per(with_compressed - with_plain));
    drop((warm_up, plain, compressed));

    let mut warm = session(&setup, false);
    let (cold_bytes, cold_cpu, cold_wall) = sync(&setup, &mut warm, messages);
    println!("\nwarm-up (cold cache, plain): {cold_bytes:.0} B, CPU {cold_cpu:.3} s, {cold_wall:.3} s");
    drop(warm);

    let mut rows: [(Vec<f64>, Vec<f64>, Vec<f64>); 2] = Default::default();
    for _ in 0..reps {
        for (i, compress) in [false, true].into_iter().enumerate() {
            let mut client = session(&setup, compress);
            let (bytes, cpu, wall) = sync(&setup, &mut client, messages);
            rows[i].0.push(bytes);
            rows[i].1.push(cpu);
            rows[i].2.push(wall);
            assert!(client.command("l", "LOGOUT").last().unwrap().starts_with("l OK"));
        }
    }
    println!("\nheader sync of {messages} messages (warm cache, TLS), medians of {reps}:");
    println!("| mode | client wire bytes | per message | mailgate CPU | wall |");
    println!("|---|---:|---:|---:|---:|");
    let plain_bytes = median(rows[0].0.clone());
    for (name, (bytes, cpu, wall)) in ["plain", "COMPRESS=DEFLATE"].iter().zip(rows.iter()) {
        let bytes = median(bytes.clone());
        println!(
            "| {name} | {bytes:.0} ({:.1} %) | {:.0} B | {:.3} s | {:.3} s |",
            100.0 * bytes / plain_bytes,
            bytes / messages as f64,
            median(cpu.clone()),
            median(wall.clone())
        );
    }

    let rounds = env_usize("COMPRESS_ROUNDS", 500);
    println!("\none command at a time ({rounds} single-message FETCHes, each answer awaited):");
    println!("| mode | client wire bytes | per command | mailgate CPU per command |");
    println!("|---|---:|---:|---:|");
    let mut plain_bytes = 0.0;
    for (name, compress) in [("plain", false), ("COMPRESS=DEFLATE", true)] {
        let mut client = session(&setup, compress);
        let (bytes, cpu) = one_at_a_time(&setup, &mut client, rounds, messages);
        if !compress {
            plain_bytes = bytes;
        }
        println!(
            "| {name} | {bytes:.0} ({:.1} %) | {:.0} B | {:.1} µs |",
            100.0 * bytes / plain_bytes,
            bytes / rounds as f64,
            cpu / rounds as f64 * 1e6
        );
    }
}
