//! Soak and fault runs of mailgate against a real Dovecot (issue 12), TLS on both legs,
//! everything on loopback. One mode per run:
//!
//! - `sessions`: N concurrent logged-in sessions held open; RSS per session, connect-to-
//!   greeting latency under that load, refusals (`sessions.rs`);
//! - `churn`: minutes of logins, header syncs, body fetches, POP3 RETRs and logouts through
//!   one process; RSS over time, errors, every byte checked (`churn.rs`);
//! - `faults`: Dovecot killed and restarted, Redis stopped and started, SIGHUP every second,
//!   all under load; how every session ended, and a full check afterwards (`faults.rs`).
//!
//! `cargo bench --bench soak -- MODE`; sizes from `SOAK_*` variables (docs/PERFORMANCE.md,
//! "Soak"). Each mode prints a report and exits non-zero when a check fails.

#[path = "../../tests/support/mod.rs"]
mod support;

mod churn;
mod faults;
mod harness;
mod mail;
mod proto;
mod sessions;

use std::process::ExitCode;
use std::time::Duration;

pub fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

/// mailgate's resident set after a pause for the allocator and the runtime to settle.
pub async fn settle(mailgate: &harness::Mailgate) -> u64 {
    tokio::time::sleep(Duration::from_secs(3)).await;
    mailgate.rss_kib()
}

fn main() -> ExitCode {
    // `cargo bench` adds `--bench`; the mode is the first other argument.
    let mode = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let run: fn() -> bool = match mode.as_deref() {
        Some("sessions") => sessions::run,
        Some("churn") => churn::run,
        Some("faults") => faults::run,
        _ => {
            println!("soak: nothing to do; run `cargo bench --bench soak -- sessions|churn|faults`");
            return ExitCode::SUCCESS;
        }
    };
    harness::raise_nofile();
    let date = std::process::Command::new("date").arg("-u").output().map(|o| o.stdout).unwrap_or_default();
    println!(
        "{} ({} CPUs)",
        String::from_utf8_lossy(&date).trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if run() {
        println!("PASS");
        ExitCode::SUCCESS
    } else {
        println!("FAIL");
        ExitCode::FAILURE
    }
}
