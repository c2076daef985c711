//! The message cache's second tier (`[cache.shared]`) with real redis-server processes and
//! Dovecot: a resync through another instance, or through a restarted one, comes from Redis
//! and equals Dovecot's answers while the upstream is asked for mutable items only; a Redis
//! Cluster of three masters, one killed mid-test; Redis stopped and started mid-sync; users
//! with equal UIDs and UIDVALIDITY isolated; values moved under other keys rejected.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::answers::{answer, Answer};
use support::client::Client;
use support::gateway::Gateway;
use support::redis::Redis;
use support::redis_cluster::RedisCluster;
use support::setup::*;

/// A header sync, structure, and whole bodies: what a client's resync asks.
const SCRIPT: &[&str] = &[
    "UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE MESSAGE-ID)])",
    "UID FETCH 1:* (UID FLAGS ENVELOPE BODYSTRUCTURE)",
    "UID FETCH 1:80 (UID FLAGS BODY.PEEK[])",
];
const MESSAGES: usize = 200;

/// `[cache.shared]` on `store` (`url = ...` or `cluster = [...]`), the secret in `dir`.
fn shared_section(dir: &Path, store: &str, encrypt: bool) -> String {
    let secret = dir.join("cache-secret");
    std::fs::write(&secret, "a fleet-wide secret of at least thirty-two bytes\n").unwrap();
    format!(
        "\n[cache]\npop3_mark_seen = false\n\n[cache.shared]\nenabled = true\n{store}\nsecret_file = {:?}\nencrypt = {encrypt}\ntimeout = \"500ms\"\n",
        secret.display().to_string()
    )
}

fn standalone(redis: &Redis) -> String {
    format!("url = \"{}\"", redis.url())
}

fn cluster(nodes: &RedisCluster) -> String {
    let urls: Vec<String> = nodes.urls().iter().map(|u| format!("\"{u}\"")).collect();
    format!("cluster = [{}]", urls.join(", "))
}

/// Dovecot's answers to [`SCRIPT`] for `user`.
fn truth(setup: &Setup, user: (&str, &str)) -> Vec<Answer> {
    let mut direct = setup.direct(user);
    direct.command("s", "SELECT INBOX");
    SCRIPT.iter().map(|c| answer(&mut direct, "d", c)).collect()
}

/// Runs [`SCRIPT`] through `gateway` as `user`; panics where an answer differs from `want`.
fn sync(setup: &Setup, gateway: &Gateway, user: (&str, &str), want: &[Answer], what: &str) {
    let mut client = Client::tls(gateway.addr("imaps"), setup.tls_config());
    client.line();
    client.login(user);
    client.command("s", "SELECT INBOX");
    for (command, want) in SCRIPT.iter().zip(want) {
        let got = answer(&mut client, "v", command);
        assert!(got == *want, "{what}: `{command}` differs from Dovecot's:\n{}", got.diff(want));
    }
    client.command("z", "LOGOUT");
}

fn counter(gateway: &Gateway, series: &str) -> u64 {
    let text = gateway.metrics();
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

fn shared(gateway: &Gateway, kind: &str, result: &str) -> u64 {
    counter(gateway, &format!("mailgate_cache_shared_requests_total{{kind=\"{kind}\",result=\"{result}\"}}"))
}

fn upstream_in(gateway: &Gateway, protocol: &str) -> u64 {
    counter(gateway, &format!("mailgate_upstream_bytes_total{{direction=\"in\",protocol=\"{protocol}\"}}"))
}

/// Waits (bounded) until `gateway`'s writes to Redis have stopped growing for a second
/// (they are gathered and sent in the background: a loaded machine spaces them out).
fn writes_settled(gateway: &Gateway) -> u64 {
    let series = "mailgate_cache_shared_writes_total{result=\"written\"}";
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut last, mut steady) = (u64::MAX, 0);
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = counter(gateway, series);
        steady = if now == last && now > 0 { steady + 1 } else { 0 };
        if steady >= 4 {
            return now;
        }
        assert!(Instant::now() < deadline, "writes never settled: {now}\n{}", gateway.metrics());
        last = now;
    }
}

/// `RETR 1` .. `RETR count` on a logged-in POP3 session: each answer's lines.
fn retr(pop3: &mut Client, count: u32) -> Vec<Vec<u8>> {
    (1..=count)
        .map(|n| {
            pop3.send(format!("RETR {n}\r\n").as_bytes());
            let mut message = Vec::new();
            loop {
                let line = pop3.raw_line();
                if line == b".\r\n" {
                    break message;
                }
                message.extend_from_slice(&line);
            }
        })
        .collect()
}

/// A second instance of `setup`'s gateway (same configuration, its own empty memory).
fn another(setup: &Setup) -> Gateway {
    let text = std::fs::read_to_string(&setup.gateway.config_path).unwrap();
    Gateway::start(setup.dir.path(), &text)
}

#[test]
fn a_resync_through_another_instance_comes_from_redis_and_equals_dovecot() {
    let redis = Redis::start();
    let setup = Setup::start_edited("", "", |config, dir| config + &shared_section(dir, &standalone(&redis), false));
    setup.dovecot.fill(BOB.0, MESSAGES, 41);
    let want = truth(&setup, BOB);
    sync(&setup, &setup.gateway, BOB, &want, "A, cold");
    let written = writes_settled(&setup.gateway);
    // A range value each of headers, sizes, envelopes and structures (200 UIDs are one
    // range), every body, and the marks.
    assert!(written as usize > 4 + 80, "{written}");
    assert!((written as usize) < 4 * MESSAGES, "{written}: items went one by one, not as ranges");
    let cold = upstream_in(&setup.gateway, "imap");

    let b = another(&setup);
    sync(&setup, &b, BOB, &want, "B, memory cold, Redis warm");
    let warm = upstream_in(&b, "imap");
    // Bodies one by one; headers as one range value per column (a lookup each).
    assert!(shared(&b, "body", "hit") >= 80 && shared(&b, "header", "hit") >= 1, "{}", b.metrics());
    assert_eq!(shared(&b, "header", "miss"), 0, "{}", b.metrics());
    assert_eq!(shared(&b, "body", "rejected") + shared(&b, "header", "rejected"), 0);
    // The upstream sent B the mutable items (and sizes) only.
    let metrics = b.metrics();
    let lines: Vec<&str> =
        metrics.lines().filter(|l| l.contains("cache_requests") || l.contains("commands_total")).collect();
    assert!(warm * 10 < cold, "B read {warm} bytes from the upstream, A {cold}: {lines:#?}");
    assert!(counter(&b, "mailgate_cache_shared_saved_bytes_total") > cold / 2);

    // POP3 likewise: B finds what A retrieved.
    let retr_all = |gateway: &Gateway| -> Vec<Vec<u8>> {
        let mut pop3 = Client::tls(gateway.addr("pop3s"), setup.tls_config());
        pop3.line();
        pop3.send(format!("USER {}\r\nPASS {}\r\n", BOB.0, BOB.1).as_bytes());
        pop3.line();
        assert!(pop3.line().unwrap().starts_with("+OK"));
        let messages = retr(&mut pop3, 20);
        pop3.send(b"QUIT\r\n");
        messages
    };
    let direct = retr(&mut setup.pop3_direct(BOB), 20);
    assert_eq!(retr_all(&setup.gateway), direct, "A, cold");
    let a_read = upstream_in(&setup.gateway, "pop3");
    writes_settled(&setup.gateway);
    assert_eq!(retr_all(&b), direct, "B, from Redis");
    assert_eq!(shared(&b, "pop3", "hit"), 20, "{}", b.metrics());
    // B read the listings (UIDL, LIST), not the messages.
    let b_read = upstream_in(&b, "pop3");
    assert!(b_read * 10 < a_read, "B read {b_read} bytes from the upstream, A {a_read}");
}

#[test]
fn another_instance_takes_the_fleets_flags_and_asks_only_what_changed_since() {
    let redis = Redis::start();
    let setup = Setup::start_edited("", "", |config, dir| config + &shared_section(dir, &standalone(&redis), true));
    setup.dovecot.fill(BOB.0, MESSAGES, 47);
    // Dovecot keeps modification sequences of a mailbox once a client used CONDSTORE on it.
    setup.direct(BOB).command("c", "SELECT INBOX (CONDSTORE)");
    let want = truth(&setup, BOB);
    sync(&setup, &setup.gateway, BOB, &want, "A, cold");
    writes_settled(&setup.gateway);
    let cold = upstream_in(&setup.gateway, "imap");

    // B asks no message's flags again: one CHANGEDSINCE (empty) and a sample of sizes per
    // command. Asking every message's flags and size would cost 200 lines per command.
    let b = another(&setup);
    sync(&setup, &b, BOB, &want, "B, unchanged");
    let unchanged = upstream_in(&b, "imap");
    assert!(unchanged < 3000, "B read {unchanged} bytes from the upstream, A {cold}:\n{}", b.log());

    // Another client changes flags and a message arrives: C, with the same column from
    // Redis, learns exactly those and answers as Dovecot does.
    let mut other = setup.direct(BOB);
    other.command("s", "SELECT INBOX");
    other.command("f", "UID STORE 3,7 +FLAGS.SILENT (\\Flagged)");
    other.command("a", "UID STORE 9 +FLAGS.SILENT (\\Answered $Important)");
    other.command("z", "LOGOUT");
    setup.dovecot.fill(BOB.0, 1, 48);
    let want = truth(&setup, BOB);
    assert!(want[0].describe(3).contains("\\Flagged") && want[0].describe(9).contains("$Important"));
    let c = another(&setup);
    sync(&setup, &c, BOB, &want, "C, after changes elsewhere");
    let changed = upstream_in(&c, "imap");
    assert!(changed < unchanged + 20_000, "C read {changed} bytes from the upstream, B {unchanged}");
    assert_eq!(shared(&c, "header", "rejected") + shared(&c, "body", "rejected"), 0);
}

#[test]
fn a_restarted_instance_serves_the_second_sync_from_redis() {
    let redis = Redis::start();
    let mut setup = Setup::start_edited("", "", |config, dir| config + &shared_section(dir, &standalone(&redis), true));
    setup.dovecot.fill(BOB.0, MESSAGES, 42);
    let want = truth(&setup, BOB);
    sync(&setup, &setup.gateway, BOB, &want, "before the restart");
    writes_settled(&setup.gateway);
    let before = upstream_in(&setup.gateway, "imap");
    assert!(setup.gateway.terminate(Duration::from_secs(10)).is_some());
    setup.gateway = another(&setup);
    sync(&setup, &setup.gateway, BOB, &want, "after the restart");
    assert!(shared(&setup.gateway, "header", "hit") >= 1, "{}", setup.gateway.metrics());
    let after = upstream_in(&setup.gateway, "imap");
    assert!(after * 10 < before, "after the restart {after} bytes from the upstream, before {before}");
    assert_eq!(shared(&setup.gateway, "header", "rejected"), 0);
}

#[test]
fn redis_stopped_mid_sync_costs_nothing_but_speed_and_recovers() {
    let mut redis = Redis::start();
    let setup = Setup::start_edited("", "", |config, dir| config + &shared_section(dir, &standalone(&redis), false));
    setup.dovecot.fill(BOB.0, MESSAGES, 43);
    setup.dovecot.fill(ALICE.0, 20, 3);
    let want = truth(&setup, BOB);
    let alice = truth(&setup, ALICE);
    sync(&setup, &setup.gateway, BOB, &want, "with Redis");
    writes_settled(&setup.gateway);
    let b = another(&setup);
    redis.stop();
    sync(&setup, &b, BOB, &want, "Redis down");
    assert_eq!(counter(&b, "mailgate_cache_shared_up"), 0, "{}", b.metrics());
    assert!(b.log().matches("shared cache tier unavailable").count() == 1, "logged once:\n{}", b.log());
    // Back (empty): B serves as ever and says so once.
    redis.run();
    let c = another(&setup);
    sync(&setup, &c, BOB, &want, "Redis back, empty");
    // B's memory answers bob now; alice needs the tier again.
    sync(&setup, &b, ALICE, &alice, "B, another user");
    assert!(b.wait_for_log("shared cache tier reachable again", Duration::from_secs(10)), "{}", b.log());
    assert_eq!(counter(&b, "mailgate_cache_shared_up"), 1);
}

/// Gives `user`'s INBOX a fixed UIDVALIDITY before Dovecot first opens it.
fn fix_uid_validity(setup: &Setup, user: &str) {
    let uidlist = setup.dovecot.maildir(user).join("dovecot-uidlist");
    std::fs::write(&uidlist, "3 V1700000000 N1\n").unwrap();
}

#[test]
fn users_with_equal_uids_never_see_each_other_and_moved_values_are_rejected() {
    let redis = Redis::start();
    let setup = Setup::start_edited("", "", |config, dir| config + &shared_section(dir, &standalone(&redis), true));
    setup.dovecot.fill(ALICE.0, 60, 1);
    setup.dovecot.fill(BOB.0, 60, 2);
    fix_uid_validity(&setup, ALICE.0);
    fix_uid_validity(&setup, BOB.0);
    let (alice, bob) = (truth(&setup, ALICE), truth(&setup, BOB));
    assert_ne!(alice[2].fetch, bob[2].fetch);
    let validity = |user| {
        let mut direct = setup.direct(user);
        direct.command("s", "SELECT INBOX").into_iter().find(|l| l.contains("UIDVALIDITY")).unwrap()
    };
    assert_eq!(validity(ALICE), validity(BOB), "the same UIDVALIDITY");
    sync(&setup, &setup.gateway, ALICE, &alice, "alice through A");
    sync(&setup, &setup.gateway, BOB, &bob, "bob through A");
    writes_settled(&setup.gateway);
    let b = another(&setup);
    sync(&setup, &b, BOB, &bob, "bob through B");
    sync(&setup, &b, ALICE, &alice, "alice through B");
    assert!(shared(&b, "body", "hit") >= 120, "{}", b.metrics());
    writes_settled(&b);

    // Every value moved under another key (a rotation of all of them): none opens.
    let keys: Vec<String> = {
        let port = redis.addr.port().to_string();
        let out = std::process::Command::new(support::redis_cluster::REDIS_CLI)
            .args(["-h", "127.0.0.1", "-p", &port, "--scan", "--pattern", "mailgate:cache:*"])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    };
    assert!(keys.len() > 100, "{}", keys.len());
    let first = keys[0].clone();
    redis.command(&["RENAME", &first, "mailgate:parked"]);
    for pair in keys.windows(2) {
        redis.command(&["RENAME", &pair[1], &pair[0]]);
    }
    redis.command(&["RENAME", "mailgate:parked", keys.last().unwrap()]);
    let c = another(&setup);
    sync(&setup, &c, ALICE, &alice, "alice through C after the rotation");
    sync(&setup, &c, BOB, &bob, "bob through C after the rotation");
    // (C's own writes of the sessions above are found again: the sizes of one command
    // check the next; every value that was there before is rejected.)
    let rejected: u64 = ["body", "header", "structure"].iter().map(|k| shared(&c, k, "rejected")).sum();
    assert!(rejected >= keys.len() as u64 / 2, "rejected {rejected} of {} moved values", keys.len());
}

#[test]
fn a_redis_cluster_shares_the_cache_and_a_dead_master_only_costs_misses() {
    let mut nodes = RedisCluster::start();
    let setup = Setup::start_edited("", "", |config, dir| config + &shared_section(dir, &cluster(&nodes), false));
    setup.dovecot.fill(BOB.0, MESSAGES, 44);
    let want = truth(&setup, BOB);
    sync(&setup, &setup.gateway, BOB, &want, "A, cold");
    let written = writes_settled(&setup.gateway);
    assert!(nodes.dbsize_total() as u64 >= written / 2, "{} keys, {written} writes", nodes.dbsize_total());
    let b = another(&setup);
    sync(&setup, &b, BOB, &want, "B, from the cluster");
    assert!(shared(&b, "header", "hit") >= 1, "{}", b.metrics());
    assert!(upstream_in(&b, "imap") * 10 < upstream_in(&setup.gateway, "imap"));
    // A master dies: its slots' items become misses; nothing wrong is served.
    nodes.kill(1);
    nodes.await_failed(1);
    let c = another(&setup);
    sync(&setup, &c, BOB, &want, "C, one master dead");
    sync(&setup, &c, BOB, &want, "C again");
}

#[test]
fn a_mailbox_rebuilt_under_its_uidvalidity_is_never_served_from_redis() {
    let redis = Redis::start();
    let setup = Setup::start_edited("", "", |config, dir| config + &shared_section(dir, &standalone(&redis), false));
    setup.dovecot.fill(BOB.0, MESSAGES, 45);
    setup.direct(BOB).command("c", "SELECT INBOX (CONDSTORE)");
    let before = truth(&setup, BOB);
    sync(&setup, &setup.gateway, BOB, &before, "A, before the rebuild");
    writes_settled(&setup.gateway);
    // Other messages, as many (so UIDNEXT is the same), under the same UIDVALIDITY: only the
    // sizes tell, and what Redis holds of the old ones must not be served. The rebuilt
    // index's MODSEQs pass the old mark, so the flags the fleet shares look current too:
    // the sample of sizes checked with the changes is what tells there.
    setup.dovecot.rebuild_keeping_uid_validity(BOB.0, MESSAGES, 46);
    let mut other = setup.direct(BOB);
    other.command("c", "SELECT INBOX (CONDSTORE)");
    for uid in 1..=20 {
        other.command("f", &format!("UID STORE {uid} +FLAGS.SILENT (\\Flagged)"));
    }
    other.command("z", "LOGOUT");
    let after = truth(&setup, BOB);
    assert_ne!(before[0].fetch, after[0].fetch);
    let b = another(&setup);
    sync(&setup, &b, BOB, &after, "B, after the rebuild");
    assert!(b.log().contains("forgetting what is cached of the mailbox"), "{}", b.log());
    // B raised the mailbox's generation: another instance finds nothing of the old either.
    let c = another(&setup);
    sync(&setup, &c, BOB, &after, "C, after B forgot");
}
