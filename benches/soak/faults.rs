//! `faults`: under load, (A) Dovecot killed (SIGKILL, every process) and restarted while
//! 200 sessions sync, (B) Redis killed and restarted while the limits live there, (C) SIGHUP
//! every second for a minute. Every session's end is classified (ok, BYE, NO/-ERR, close,
//! or unclean: truncated, reset, timeout, mismatch...); after (A) and at the end every
//! message is fetched again through mailgate and compared with Dovecot's.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::env_usize;
use crate::harness::{self, Mailgate};
use crate::mail::{self, Mailbox, Outcomes, Target};
use crate::proto::{open, Rng};
use crate::support::redis::Redis;
use crate::support::tls::TestPki;

/// A phase's load: `workers` clients in a loop until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Outcomes>,
    /// Sessions that ended well, with their end time.
    oks: Arc<Mutex<Vec<Instant>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn load(target: &Arc<Target>, mailboxes: &[Arc<Mailbox>], workers: usize, bodies: usize, seed: u64) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Outcomes::default());
    let oks = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (target, outcomes, stop, oks) = (target.clone(), outcomes.clone(), stop.clone(), oks.clone());
        let mailboxes = mailboxes.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(seed * 1000 + w as u64);
            while !stop.load(Relaxed) {
                let mb = &mailboxes[rng.below(mailboxes.len())];
                let source = harness::source(70, w, 250);
                let count = 1 + rng.below(bodies);
                let result = if rng.below(10) < 7 {
                    mail::imap_session(&target, source, mb, &mut rng, count).await
                } else {
                    mail::pop3_session(&target, source, mb, &mut rng, count).await
                };
                if result.is_ok() {
                    oks.lock().unwrap().push(Instant::now());
                } else {
                    // Refused while something is down: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                outcomes.record(&result);
            }
        }));
    }
    Load { stop, outcomes, oks, tasks }
}

impl Load {
    async fn finish(self) -> (Arc<Outcomes>, Vec<Instant>) {
        self.stop.store(true, Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        let oks = self.oks.lock().unwrap().clone();
        (self.outcomes, oks)
    }
}

/// Every mailbox through mailgate, `parallel` at a time: (checked, failures).
async fn verify(target: &Arc<Target>, mailboxes: &[Arc<Mailbox>]) -> (usize, Outcomes) {
    let outcomes = Outcomes::default();
    let mut tasks = Vec::new();
    for (i, mb) in mailboxes.iter().enumerate() {
        let (target, mb) = (target.clone(), mb.clone());
        tasks.push(tokio::spawn(async move { mail::verify_all(&target, harness::source(80, i, 250), &mb).await }));
        if tasks.len() == 8 {
            for task in tasks.drain(..) {
                outcomes.record(&task.await.unwrap());
            }
        }
    }
    for task in tasks {
        outcomes.record(&task.await.unwrap());
    }
    (mailboxes.len(), outcomes)
}

pub fn run() -> bool {
    let users = env_usize("SOAK_USERS", 60);
    let messages = env_usize("SOAK_MESSAGES", 20);
    let syncing = env_usize("SOAK_FAULT_SESSIONS", 200);
    let hup_secs = env_usize("SOAK_HUP_SECONDS", 60);
    let started = Instant::now();
    println!("soak faults: {users} users x {messages} messages; {syncing} sessions syncing through a Dovecot crash");

    let mut dovecot = harness::dovecot(users, syncing * 2 + 64);
    let total = mail::fill(&dovecot, users, messages, 256 << 10);
    let redis = Arc::new(Mutex::new(Redis::start()));
    let url = redis.lock().unwrap().url();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let extra = format!("store = \"redis\"\n\n[limits.redis]\nurl = \"{url}\"\n\n[cache]\nmax_bytes = \"64MiB\"\n");
    let mut mailgate = Mailgate::start(dir.path(), &harness::config(&pki, &dovecot, &extra));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mailboxes = runtime.block_on(mail::references(&dovecot, users, 8));
    println!("setup: {:.1} s ({:.1} MB of mail)", started.elapsed().as_secs_f64(), total as f64 / 1e6);
    let target = Target::new(&mailgate, &pki);
    let sleep = |s: f64| tokio::time::sleep(Duration::from_secs_f64(s));
    let mut pass = true;
    let mut checks = Vec::new();
    let mut check = |ok: bool, what: String| {
        checks.push(format!("  check {}: {what}", if ok { "ok  " } else { "FAIL" }));
        pass &= ok;
    };

    // (A) Dovecot crash under 200 syncing sessions.
    println!("\n(A) Dovecot killed (SIGKILL, master and children) and restarted under {syncing} syncing sessions");
    let (a, a_oks, crash_at, restart_at, a_verify) = runtime.block_on(async {
        let load = load(&target, &mailboxes, syncing, 8, 1);
        sleep(5.0).await;
        let crash_at = Instant::now();
        dovecot.crash();
        eprintln!("  Dovecot killed");
        sleep(5.0).await;
        dovecot.restart();
        let restart_at = Instant::now();
        eprintln!("  Dovecot restarted ({:.1} s after the kill)", (restart_at - crash_at).as_secs_f64());
        sleep(10.0).await;
        let (outcomes, oks) = load.finish().await;
        (outcomes, oks, crash_at, restart_at, verify(&target, &mailboxes).await)
    });
    let recovered = a_oks.iter().filter(|t| **t > restart_at).min().map(|t| (*t - restart_at).as_secs_f64());
    let before = a_oks.iter().filter(|t| **t < crash_at).count();
    println!("  sessions by outcome ({before} completed before the kill):");
    a.print("    ");
    match recovered {
        Some(s) => println!("  first complete session {s:.2} s after Dovecot was back"),
        None => println!("  no session completed after Dovecot was back"),
    }
    println!("  afterwards every message of {} mailboxes through mailgate:", a_verify.0);
    a_verify.1.print("    ");
    check(a.unclean() == 0, format!("(A) {} sessions ended uncleanly", a.unclean()));
    check(recovered.is_some_and(|s| s < 30.0), "(A) mailgate served again within 30 s of Dovecot's return".into());
    check(
        a_verify.1.failed() == 0,
        format!("(A) {} mailboxes differ from Dovecot's after recovery", a_verify.1.failed()),
    );

    // (B) Redis killed and restarted while the limits live there.
    println!("\n(B) Redis killed and restarted under 50 sessions (limits.store = \"redis\", on_error = open)");
    let store_errors = mailgate.metric("mailgate_limit_store_errors_total", &[]);
    let (b, b_oks, back_at, keys) = runtime.block_on(async {
        let load = load(&target, &mailboxes, 50, 4, 2);
        sleep(5.0).await;
        redis.lock().unwrap().stop();
        eprintln!("  Redis killed");
        sleep(10.0).await;
        redis.lock().unwrap().run();
        let back_at = Instant::now();
        eprintln!("  Redis restarted");
        sleep(10.0).await;
        // Limits live in Redis again: an open session holds leases there.
        let keys = async {
            let mut conn = open(target.imap, harness::source(90, 1, 2), &target.tls, target.timeout).await.ok()?.conn;
            let mb = &mailboxes[0];
            conn.command("a", &format!("LOGIN {} \"{}\"", mb.user, mb.password), "login").await.ok()?;
            let keys = redis.lock().unwrap().integer(&["DBSIZE"]);
            conn.command("z", "LOGOUT", "logout").await.ok()?;
            Some(keys)
        }
        .await;
        let (outcomes, oks) = load.finish().await;
        (outcomes, oks, back_at, keys)
    });
    let store_errors = mailgate.metric("mailgate_limit_store_errors_total", &[]) - store_errors;
    println!("  sessions by outcome ({store_errors} limit-store errors counted by mailgate):");
    b.print("    ");
    let after_b = b_oks.iter().filter(|t| **t > back_at).count();
    println!("  {after_b} sessions completed after Redis was back; Redis keys with a session open: {keys:?}");
    check(b.unclean() == 0, format!("(B) {} sessions ended uncleanly", b.unclean()));
    check(keys.is_some_and(|k| k > 0), "(B) limits back in Redis after its restart".into());

    // (C) SIGHUP every second.
    println!("\n(C) SIGHUP every second for {hup_secs} s under 50 sessions");
    let reloads = mailgate.metric("mailgate_config_reloads_total", &["result=\"ok\""]);
    let c = runtime.block_on(async {
        let load = load(&target, &mailboxes, 50, 4, 3);
        for _ in 0..hup_secs {
            sleep(1.0).await;
            mailgate.hup();
        }
        sleep(2.0).await;
        load.finish().await.0
    });
    let reloads = mailgate.metric("mailgate_config_reloads_total", &["result=\"ok\""]) - reloads;
    println!("  sessions by outcome ({reloads} reloads done):");
    c.print("    ");
    check(c.failed() == 0, format!("(C) {} sessions failed across reloads", c.failed()));
    check(reloads as usize == hup_secs, format!("(C) {reloads} of {hup_secs} reloads done"));

    let end_verify = runtime.block_on(verify(&target, &mailboxes));
    println!("\nat the end every message of {} mailboxes through mailgate:", end_verify.0);
    end_verify.1.print("  ");
    check(end_verify.1.failed() == 0, format!("{} mailboxes differ from Dovecot's at the end", end_verify.1.failed()));
    let alive = mailgate.alive();
    check(alive, format!("mailgate still running (RSS {} KiB, {} fds)", mailgate.rss_kib(), mailgate.fds()));
    println!("\nRESULT faults ({:.0} s): {}", started.elapsed().as_secs_f64(), target.ops.summary());
    mailgate.scan_log().print();
    harness::dovecot_problems(&dovecot);
    for line in checks {
        println!("{line}");
    }
    pass
}
