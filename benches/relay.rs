//! Relay cost against the direct upstream, measured in the same run: a real Dovecot, and
//! mailgate (release build, message cache off) in front of it over implicit TLS on both legs.
//!
//! `cargo bench --bench relay` prints medians and the ratio mailgate / direct for:
//! - login (TLS handshake + greeting + LOGIN),
//! - a NOOP round trip on an open session,
//! - a full-mailbox `UID FETCH 1:* BODY.PEEK[]` (throughput),
//! - POP3: login (TLS + USER/PASS) and `RETR` of every message (throughput);
//! - login through a second mailgate whose limits live in a real redis-server
//!   (`limits.store = "redis"`): what the shared leases, rates and lockout check cost.
//!
//! Machines are noisy: each figure is the median of several rounds, direct and mailgate
//! interleaved so that drift hits both alike.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::client::Client;
use support::gateway::Gateway;
use support::redis::Redis;
use support::setup::{Setup, BOB};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn fetch_all(client: &mut Client) -> usize {
    client.send(b"f UID FETCH 1:* BODY.PEEK[]\r\n");
    let mut bytes = 0;
    loop {
        let line = client.line().expect("fetch response");
        if line.starts_with("f ") {
            // The completion's text carries the upstream's timings: not part of the data.
            assert!(line.starts_with("f OK"), "{line}");
            return bytes;
        }
        bytes += line.len() + 2;
        if let Some(n) =
            line.strip_suffix('}').and_then(|l| l.rsplit_once('{')).and_then(|(_, n)| n.parse::<usize>().ok())
        {
            bytes += client.bytes(n).len();
        }
    }
}

/// RETR 1..=count on a logged-in POP3 session; returns the bytes received.
fn retr_all(client: &mut Client, count: usize) -> usize {
    let mut bytes = 0;
    for n in 1..=count {
        client.send(format!("RETR {n}\r\n").as_bytes());
        let status = client.line().expect("RETR status");
        assert!(status.starts_with("+OK"), "{status}");
        loop {
            let line = client.line().expect("RETR body");
            bytes += line.len() + 2;
            if line == "." {
                break;
            }
        }
    }
    bytes
}

fn main() {
    // The cache is off: this measures the relay itself (benches/sync_load.rs measures the cache).
    let setup = Setup::start_with("", "[cache]\nenabled = false\n");
    let total = setup.dovecot.fill(BOB.0, 300, 42);
    println!("mailbox: 300 messages, {:.1} MB", total as f64 / 1e6);

    // The same gateway with its limits in Redis.
    let redis = Redis::start();
    let text = std::fs::read_to_string(&setup.gateway.config_path).unwrap();
    let shared = Gateway::start(
        setup.dir.path(),
        &format!("{text}\n[limits]\nstore = \"redis\"\n[limits.redis]\nurl = \"{}\"\n", redis.url()),
    );
    let shared_login = || {
        let mut client = Client::tls(shared.addr("imaps"), setup.tls_config());
        client.line().unwrap();
        client.login(BOB);
        client
    };

    let rounds = 15;
    let mut login = (Vec::new(), Vec::new());
    let mut redis_login = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        drop(setup.direct(BOB));
        let direct = t.elapsed();
        login.0.push(direct);
        redis_login.0.push(direct);
        let t = Instant::now();
        drop(setup.login(BOB));
        login.1.push(t.elapsed());
        let t = Instant::now();
        drop(shared_login());
        redis_login.1.push(t.elapsed());
    }

    let mut direct = setup.direct(BOB);
    let mut via = setup.login(BOB);
    direct.command("s", "SELECT INBOX");
    via.command("s", "SELECT INBOX");
    let mut noop = (Vec::new(), Vec::new());
    for _ in 0..500 {
        let t = Instant::now();
        direct.command("n", "NOOP");
        noop.0.push(t.elapsed());
        let t = Instant::now();
        via.command("n", "NOOP");
        noop.1.push(t.elapsed());
    }

    let mut fetch = (Vec::new(), Vec::new());
    let mut size = 0;
    for _ in 0..7 {
        let t = Instant::now();
        size = fetch_all(&mut direct);
        fetch.0.push(t.elapsed());
        let t = Instant::now();
        assert_eq!(fetch_all(&mut via), size);
        fetch.1.push(t.elapsed());
    }

    drop((direct, via));
    let mut pop3_login = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        drop(setup.pop3_direct(BOB));
        pop3_login.0.push(t.elapsed());
        // Dovecot keeps the POP3 lock briefly after a session: let it go between rounds.
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        drop(setup.pop3_login(BOB));
        pop3_login.1.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut retr = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let mut direct = setup.pop3_direct(BOB);
        let t = Instant::now();
        let size = retr_all(&mut direct, 300);
        retr.0.push(t.elapsed());
        direct.send(b"QUIT\r\n");
        let _ = direct.line();
        drop(direct);
        std::thread::sleep(Duration::from_millis(50));
        let mut via = setup.pop3_login(BOB);
        let t = Instant::now();
        assert_eq!(retr_all(&mut via, 300), size);
        retr.1.push(t.elapsed());
        via.send(b"QUIT\r\n");
        let _ = via.line();
        drop(via);
        std::thread::sleep(Duration::from_millis(50));
    }

    let (fetch_direct, fetch_via) = (median(fetch.0.clone()), median(fetch.1.clone()));
    println!("{:<28} {:>12} {:>12} {:>8}", "median", "direct", "mailgate", "ratio");
    for (name, (d, m)) in [
        ("IMAP login (TLS + LOGIN)", login),
        ("IMAP login, limits in Redis", redis_login),
        ("IMAP NOOP round trip", noop),
        ("IMAP UID FETCH 1:* BODY[]", fetch),
        ("POP3 login (TLS + USER/PASS)", pop3_login),
        ("POP3 RETR 1..300", retr),
    ] {
        let (d, m) = (median(d), median(m));
        println!(
            "{name:<28} {:>10.3}ms {:>10.3}ms {:>7.2}x",
            d.as_secs_f64() * 1e3,
            m.as_secs_f64() * 1e3,
            m.as_secs_f64() / d.as_secs_f64()
        );
    }
    let (d, m) = (fetch_direct, fetch_via);
    println!(
        "FETCH throughput: direct {:.0} MB/s, mailgate {:.0} MB/s ({} bytes per fetch)",
        size as f64 / d.as_secs_f64() / 1e6,
        size as f64 / m.as_secs_f64() / 1e6,
        size
    );
}
