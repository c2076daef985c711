//! `churn`: sessions come and go through one mailgate for minutes (IMAP: login, SELECT,
//! header sync, bodies, LOGOUT; POP3: USER/PASS, STAT, RETRs, QUIT), every answer checked
//! against Dovecot's; mailgate's resident set sampled every few seconds.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::env_usize;
use crate::harness::{self, Mailgate};
use crate::mail::{self, latency_line, Outcomes, Target, KNOWN_QUIT_ERR};
use crate::proto::Rng;
use crate::support::tls::TestPki;

/// Seconds between two samples of the resident set.
const SAMPLE_EVERY: u64 = 5;

pub fn run() -> bool {
    let secs = match std::env::var("SOAK_SECONDS") {
        Ok(_) => env_usize("SOAK_SECONDS", 60),
        Err(_) => env_usize("SOAK_MINUTES", 30) * 60,
    } as u64;
    let users = env_usize("SOAK_USERS", 100);
    let messages = env_usize("SOAK_MESSAGES", 30);
    let workers = env_usize("SOAK_WORKERS", 48);
    let cache = std::env::var("SOAK_CACHE").unwrap_or_else(|_| "32MiB".into());
    let started = Instant::now();
    println!("soak churn: {secs} s, {workers} clients at once, {users} users x {messages} messages, cache {cache}");

    let dovecot = harness::dovecot(users, workers * 2 + 64);
    let total = mail::fill(&dovecot, users, messages, 256 << 10);
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let config = harness::config(&pki, &dovecot, &format!("[cache]\nmax_bytes = \"{cache}\"\n"));
    let mut mailgate = Mailgate::start(dir.path(), &config);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mailboxes = runtime.block_on(mail::references(&dovecot, users, 8));
    println!(
        "setup: {:.1} s ({:.1} MB of mail, references fetched from Dovecot)",
        started.elapsed().as_secs_f64(),
        total as f64 / 1e6
    );

    let target = Target::new(&mailgate, &pki);
    let outcomes = Arc::new(Outcomes::default());
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (target, outcomes, stop, mailboxes) =
                (target.clone(), outcomes.clone(), stop.clone(), mailboxes.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng::new(w as u64 + 7);
                while !stop.load(Relaxed) {
                    let mb = &mailboxes[rng.below(mailboxes.len())];
                    let source = harness::source(60, rng.below(500), 500);
                    let count = 1 + rng.below(4);
                    let result = if rng.below(10) < 6 {
                        mail::imap_session(&target, source, mb, &mut rng, count).await
                    } else {
                        mail::pop3_session(&target, source, mb, &mut rng, count).await
                    };
                    outcomes.record(&result);
                }
            }));
        }
        let mut tick = tokio::time::interval(Duration::from_secs(SAMPLE_EVERY));
        let mut last_print = 0.0;
        while began.elapsed().as_secs() < secs {
            tick.tick().await;
            let t = began.elapsed().as_secs_f64();
            samples.push((t, mailgate.rss_kib(), target.ops.total()));
            if t - last_print >= 60.0 || samples.len() == 1 {
                last_print = t;
                eprintln!(
                    "  {:>5.0} s  mailgate {} KiB, {} fds, {} ops, {} failed sessions",
                    t,
                    mailgate.rss_kib(),
                    mailgate.fds(),
                    target.ops.total(),
                    outcomes.failed()
                );
            }
        }
        stop.store(true, Relaxed);
        for task in tasks {
            let _ = task.await;
        }
    });
    let elapsed = began.elapsed().as_secs_f64();
    let fds_end = mailgate.fds();
    let alive = mailgate.alive();
    let log = mailgate.scan_log();

    // Flat after warm-up: every sample after it within 10 % of their median.
    let warmup = (secs as f64 / 6.0).clamp(30.0, 300.0);
    let mut after: Vec<u64> = samples.iter().filter(|s| s.0 >= warmup).map(|s| s.1).collect();
    let first_after = after.first().copied().unwrap_or(0);
    let last = samples.last().map_or(0, |s| s.1);
    after.sort_unstable();
    let median = after.get(after.len() / 2).copied().unwrap_or(0) as f64;
    let (lo, hi) = (after.first().copied().unwrap_or(0), after.last().copied().unwrap_or(0));
    let spread = |v: u64| (v as f64 - median) / median * 100.0;
    let flat = !after.is_empty() && spread(lo) >= -10.0 && spread(hi) <= 10.0;
    let slope = slope_kib_per_min(samples.iter().filter(|s| s.0 >= warmup).map(|s| (s.0, s.1 as f64)));

    println!();
    println!("RESULT churn ({elapsed:.0} s, {workers} clients at once, TLS on both legs)");
    let ops = target.ops.total();
    let sessions: u64 = target.ops.logins.load(Relaxed);
    println!(
        "  {} ({:.0} operations/s, {:.1} logins/s)",
        target.ops.summary(),
        ops as f64 / elapsed,
        sessions as f64 / elapsed
    );
    println!("  connect-to-greeting: {}", latency_line(&mut target.greetings.lock().unwrap()));
    println!("  sessions by outcome:");
    outcomes.print("    ");
    println!("  mailgate RSS (KiB), every {SAMPLE_EVERY} s; warm-up {warmup:.0} s:");
    let step = (samples.len() / 15).max(1);
    for s in samples.iter().step_by(step).chain(samples.last()) {
        println!("    t={:>6.0} s  {:>8} KiB  {:>9} ops", s.0, s.1, s.2);
    }
    println!(
        "  after warm-up: first {first_after}, min {lo} ({:+.1} %), median {median:.0}, max {hi} ({:+.1} %), last {last}; trend {slope:+.1} KiB/min",
        spread(lo),
        spread(hi)
    );
    println!("  mailgate file descriptors at the end (idle): {fds_end}");
    log.print();
    harness::dovecot_problems(&dovecot);
    let known = outcomes.count(KNOWN_QUIT_ERR);
    let unexpected = outcomes.failed() - known;
    let mut pass = true;
    let mut check = |ok: bool, what: String| {
        println!("  check {}: {what}", if ok { "ok  " } else { "FAIL" });
        pass &= ok;
    };
    check(
        flat,
        format!("RSS flat after warm-up (within ±10 % of the median: {:+.1} % .. {:+.1} %)", spread(lo), spread(hi)),
    );
    check(unexpected == 0, format!("{unexpected} sessions failed (mismatches {})", outcomes.count("MISMATCH")));
    check(
        log.error == 0 && log.warn == 0,
        format!("{} WARN and {} ERROR lines in mailgate's log", log.warn, log.error),
    );
    check(alive, "mailgate still running".to_string());
    if known > 0 {
        println!("  note: {known} POP3 sessions got -ERR after QUIT's +OK (issue 12, defect 12; not counted above)");
    }
    pass
}

/// Least-squares slope of (seconds, KiB), in KiB per minute.
fn slope_kib_per_min(points: impl Iterator<Item = (f64, f64)>) -> f64 {
    let points: Vec<(f64, f64)> = points.collect();
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx * 60.0
    }
}
