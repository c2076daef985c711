//! Randomized differential testing of mailgate's message cache against a real Dovecot.
//!
//! Every logical user (`fuzza`, `fuzzb`, one thread each) has two accounts with identical
//! folders, down to UIDVALIDITY, UIDs, flags and INTERNALDATE: `fuzza`, reached through
//! mailgate, and `fuzza-twin`, reached straight at Dovecot. Random steps go to both in
//! lockstep and every answer is compared item by item: FETCH, UID FETCH (sets of every
//! shape, every item, partials, duplicates, macros, lower case, MODSEQ and CHANGEDSINCE),
//! pipelined batches, SELECT/EXAMINE (CONDSTORE, QRESYNC), CLOSE, UNSELECT, IDLE, STORE,
//! EXPUNGE, COPY, MOVE, APPEND, STATUS, SEARCH, reconnects; POP3 sessions (odd spellings
//! included) compared byte for byte. Between steps a mutator changes both accounts alike
//! straight at Dovecot (APPEND, flags, EXPUNGE, MOVE/COPY, DELETE and CREATE again, a
//! folder rebuilt on disk with its old UIDVALIDITY), after which both sessions settle with
//! a NOOP, and the mutator compares the twins' flags (what a POP3 RETR must set). Both users'
//! folders have the same names and UIDVALIDITY but different messages, so a leak between
//! accounts shows too.
//!
//! On the first difference the run stops and prints the seed, the step, both answers item
//! by item, a command to rerun the seed, and a minimised trace (the shortest failing
//! suffix, then ddmin, replayed each time in a fresh Dovecot and mailgate) written next to
//! the full one under `target/tmp/differential/`, with a command to replay it.
//!
//! The `differential` test runs four fixed seeds (CI), `differential_courier` two shorter
//! ones against Courier IMAP/POP3 (tests/install-courier.sh). By hand, the same test reads:
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `MAILGATE_FUZZ_SEEDS` | `1,2,3`, `1..100` (end excluded), `5..=9` | `1,2,3,4` |
//! | `MAILGATE_FUZZ_STEPS` | steps per seed, all users together | `1500` |
//! | `MAILGATE_FUZZ_VIA` | `mailgate`, or `direct` (the "via" accounts straight at Dovecot too: must be clean for every seed, which proves the tester has no false positives) | `mailgate` |
//! | `MAILGATE_FUZZ_PROTOCOLS` | `imap,pop3`, `imap` or `pop3` | `imap,pop3` |
//! | `MAILGATE_FUZZ_AVOID` | constructs not to generate, to look past an open bug: `condstore`, `seen`, `partials2`, `dup`, `macros`, `lowercase`, `beyond`, `pipeline`, `rebuild`, `recreate`, `odd-pop3`; `none` generates everything | `rebuild` |
//! | `MAILGATE_FUZZ_MINIMIZE_SECS` | time for minimising failures, all together | `90` |
//! | `MAILGATE_FUZZ_REPLAY` | a trace file to replay instead (its header names user and content); a failing one is minimised into `target/tmp/differential/NAME.min.trace` | |
//! | `MAILGATE_FUZZ_CACHE` | mailgate's cache: `default`, `small` (1 MiB, entries up to 32 KiB: constant eviction), `expiring` (entries live 2 s), `shared` (`small` in front of the shared tier in a redis-server of its own, encrypted: what memory evicts comes back from Redis), or `mixed`: by seed, in turn | `mixed` |
//! | `MAILGATE_FUZZ_USERS` | logical users (threads) per seed | `2` |
//! | `MAILGATE_FUZZ_SERVER` | the upstream: `dovecot`, or `courier` (mailgate reaches its plain ports with `tls = "plaintext"`; see `differential/server.rs`) | `dovecot` |
//!
//! nextest stops a test after five minutes, so long runs use `cargo test` (see
//! docs/TESTING.md; a million steps):
//!
//! ```sh
//! MAILGATE_FUZZ_SEEDS=1..21 MAILGATE_FUZZ_STEPS=50000 \
//!   cargo test --release --test differential -- --exact differential --nocapture
//! ```

#[allow(dead_code)]
mod support {
    //! Only the harness parts this test needs (not `support/mod.rs`, so that work in
    //! progress elsewhere in it does not stop this test from building).
    #[path = "../support/client.rs"]
    pub mod client;
    #[path = "../support/courier.rs"]
    pub mod courier;
    #[path = "../support/dovecot.rs"]
    pub mod dovecot;
    #[path = "../support/gateway.rs"]
    pub mod gateway;
    #[path = "../support/mailgen.rs"]
    pub mod mailgen;
    #[path = "../support/redis.rs"]
    pub mod redis;
    #[path = "../support/setup.rs"]
    pub mod setup;
    #[path = "../support/tls.rs"]
    pub mod tls;
}

#[path = "differential/mod.rs"]
mod differential;

use std::time::Instant;

use differential::run::{report, run_seed, Settings};
use differential::server::Kind;

#[test]
fn differential() {
    run(Settings::from_env(&[1, 2, 3, 4], 1500));
}

/// The same against Courier (whatever `MAILGATE_FUZZ_SERVER` says): its folders below
/// `INBOX.`, no CONDSTORE, MOVE, UNSELECT nor LITERAL+.
#[test]
fn differential_courier() {
    run(Settings::from_env_for(Kind::Courier, &[1, 2], 600));
}

fn run(settings: Settings) {
    if let Some(path) = &settings.replay {
        match differential::run::replay_and_minimize(&settings, path) {
            Ok(clean) => {
                differential::env::wait_disposed();
                println!("{clean}");
                return;
            }
            Err(report) => {
                differential::env::wait_disposed();
                panic!("{report}")
            }
        }
    }
    let mut reports = Vec::new();
    let mut summary = Vec::new();
    let deadline_budget = settings.minimize;
    let mut deadline: Option<Instant> = None;
    for &seed in &settings.seeds {
        let run = run_seed(&settings, seed);
        let rate = run.steps as f64 / run.elapsed.as_secs_f64().max(0.001);
        summary.push(format!(
            "seed {seed}: {} steps in {:.1} s ({rate:.0} steps/s){}",
            run.steps,
            run.elapsed.as_secs_f64(),
            if run.failures.is_empty() { "" } else { ", MISMATCH" }
        ));
        eprintln!("{}", summary.last().unwrap());
        for failure in &run.failures {
            let mut deadline = *deadline.get_or_insert_with(|| Instant::now() + deadline_budget);
            if let Some(end) = settings.hard_end {
                deadline = deadline.min(end);
            }
            reports.push(report(&settings, failure, deadline));
        }
    }
    eprintln!("{}", summary.join("\n"));
    differential::env::wait_disposed();
    assert!(reports.is_empty(), "{} seed(s) found differences:\n{}", reports.len(), reports.join("\n"));
}

/// Every mismatch the tester ever found, as its minimised trace in
/// `tests/differential/regressions/`: each replays clean (a fresh Dovecot and mailgate per
/// trace). A new finding is kept by copying its `.min.trace` there.
#[test]
fn known_mismatches_stay_fixed() {
    let settings = Settings::from_env(&[], 0);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/differential/regressions");
    let mut traces: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "trace"))
        .collect();
    traces.sort();
    assert!(!traces.is_empty(), "no traces in {}", dir.display());
    let failures: Vec<String> =
        traces.iter().filter_map(|path| differential::run::replay_file(&settings, path).err()).collect();
    differential::env::wait_disposed();
    assert!(
        failures.is_empty(),
        "{} of {} traces differ again:\n{}",
        failures.len(),
        traces.len(),
        failures.join("\n")
    );
}
