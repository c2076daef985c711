//! Relay cost against the direct upstream, measured in the same run: a real Dovecot, and
//! mailgate (release build, message cache off) in front of it over implicit TLS on both legs;
//! and, as a reference, HAProxy in TCP mode terminating TLS on both legs the same way (its
//! frontend certificate from the same test CA, its backend connection verified against
//! Dovecot's CA): one hop that parses nothing. HAProxy is installed with apt-get when
//! missing (tests/support/peers.rs).
//!
//! `cargo bench --bench relay` prints medians and the time ratios mailgate / direct,
//! HAProxy / direct and mailgate / HAProxy (above 1: slower) for:
//! - login (TLS handshake + greeting + LOGIN),
//! - a NOOP round trip on an open session,
//! - a full-mailbox `UID FETCH 1:* BODY.PEEK[]` (throughput),
//! - POP3: login (TLS + USER/PASS) and `RETR` of every message (throughput);
//! - login through a second mailgate whose limits live in a real redis-server
//!   (`limits.store = "redis"`): what the shared leases, rates and lockout check cost
//!   (no HAProxy figure).
//!
//! Machines are noisy: each figure is the median of several rounds, direct, mailgate and
//! HAProxy interleaved so that drift hits all alike.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::client::Client;
use support::gateway::Gateway;
use support::peers::{self, Haproxy};
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    peers::ensure_installed();
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

    // HAProxy terminating TLS on both legs, in front of the same Dovecot ports as mailgate.
    let haproxy = Haproxy::tls(
        &[setup.dovecot.imaps, setup.dovecot.pop3s],
        &setup.pki.cert,
        &setup.pki.key,
        Some(&setup.dovecot.ca_pem()),
    );
    let (haproxy_imaps, haproxy_pop3s) = (haproxy.addrs[0], haproxy.addrs[1]);
    let haproxy_login = || {
        let mut client = Client::tls(haproxy_imaps, setup.tls_config());
        let greeting = client.line().expect("greeting");
        assert!(greeting.starts_with("* OK"), "{greeting}");
        client.login(BOB);
        client
    };
    let haproxy_pop3_login = || {
        let mut client = Client::tls(haproxy_pop3s, setup.tls_config());
        assert!(client.line().unwrap().starts_with("+OK"));
        client.send(format!("USER {}\r\nPASS {}\r\n", BOB.0, BOB.1).as_bytes());
        assert!(client.line().unwrap().starts_with("+OK"));
        let ok = client.line().unwrap();
        assert!(ok.starts_with("+OK"), "{ok}");
        client
    };

    // (direct, mailgate, HAProxy) samples of each row.
    type Samples = (Vec<Duration>, Vec<Duration>, Vec<Duration>);
    let rounds = 15;
    let mut login: Samples = Default::default();
    let mut redis_login: Samples = Default::default();
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
        let t = Instant::now();
        drop(haproxy_login());
        login.2.push(t.elapsed());
    }

    let mut direct = setup.direct(BOB);
    let mut via = setup.login(BOB);
    let mut hap = haproxy_login();
    for client in [&mut direct, &mut via, &mut hap] {
        client.command("s", "SELECT INBOX");
    }
    let mut noop: Samples = Default::default();
    for _ in 0..500 {
        let t = Instant::now();
        direct.command("n", "NOOP");
        noop.0.push(t.elapsed());
        let t = Instant::now();
        via.command("n", "NOOP");
        noop.1.push(t.elapsed());
        let t = Instant::now();
        hap.command("n", "NOOP");
        noop.2.push(t.elapsed());
    }

    let mut fetch: Samples = Default::default();
    let mut size = 0;
    for _ in 0..7 {
        let t = Instant::now();
        size = fetch_all(&mut direct);
        fetch.0.push(t.elapsed());
        let t = Instant::now();
        assert_eq!(fetch_all(&mut via), size);
        fetch.1.push(t.elapsed());
        let t = Instant::now();
        assert_eq!(fetch_all(&mut hap), size);
        fetch.2.push(t.elapsed());
    }

    drop((direct, via, hap));
    let mut pop3_login: Samples = Default::default();
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
        let t = Instant::now();
        drop(haproxy_pop3_login());
        pop3_login.2.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    let quit = |mut client: Client| {
        client.send(b"QUIT\r\n");
        let _ = client.line();
        drop(client);
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut retr: Samples = Default::default();
    for _ in 0..5 {
        let mut direct = setup.pop3_direct(BOB);
        let t = Instant::now();
        let size = retr_all(&mut direct, 300);
        retr.0.push(t.elapsed());
        quit(direct);
        let mut via = setup.pop3_login(BOB);
        let t = Instant::now();
        assert_eq!(retr_all(&mut via, 300), size);
        retr.1.push(t.elapsed());
        quit(via);
        let mut hap = haproxy_pop3_login();
        let t = Instant::now();
        assert_eq!(retr_all(&mut hap, 300), size);
        retr.2.push(t.elapsed());
        quit(hap);
    }

    let fetch_medians = (median(fetch.0.clone()), median(fetch.1.clone()), median(fetch.2.clone()));
    println!(
        "{:<28} {:>11} {:>11} {:>11} {:>16} {:>15} {:>17}",
        "median", "direct", "mailgate", "HAProxy", "mailgate/direct", "HAProxy/direct", "mailgate/HAProxy"
    );
    for (name, (d, m, h)) in [
        ("IMAP login (TLS + LOGIN)", login),
        ("IMAP login, limits in Redis", redis_login),
        ("IMAP NOOP round trip", noop),
        ("IMAP UID FETCH 1:* BODY[]", fetch),
        ("POP3 login (TLS + USER/PASS)", pop3_login),
        ("POP3 RETR 1..300", retr),
    ] {
        let (d, m) = (median(d), median(m));
        let (h, hr, mh) = if h.is_empty() {
            ("-".to_string(), "-".to_string(), "-".to_string())
        } else {
            let h = median(h);
            (
                format!("{:.3}ms", ms(h)),
                format!("{:.2}x", h.as_secs_f64() / d.as_secs_f64()),
                format!("{:.2}x", m.as_secs_f64() / h.as_secs_f64()),
            )
        };
        println!(
            "{name:<28} {:>9.3}ms {:>9.3}ms {h:>11} {:>15.2}x {hr:>15} {mh:>17}",
            ms(d),
            ms(m),
            m.as_secs_f64() / d.as_secs_f64()
        );
    }
    let (d, m, h) = fetch_medians;
    println!(
        "FETCH throughput: direct {:.0} MB/s, mailgate {:.0} MB/s, HAProxy {:.0} MB/s ({} bytes per fetch)",
        size as f64 / d.as_secs_f64() / 1e6,
        size as f64 / m.as_secs_f64() / 1e6,
        size as f64 / h.as_secs_f64() / 1e6,
        size
    );
    let log = haproxy.log();
    if !log.trim().is_empty() {
        eprintln!("HAProxy's output:\n{log}");
    }
}
