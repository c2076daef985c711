//! Bounds on what a peer can make mailgate write to its log.
//!
//! A WARN or ERROR that a client (or a broken upstream) can trigger once per connection
//! would let it write as many lines as it opens connections: log volume, disk and the
//! operator's attention are then the attacker's. Two guards:
//!
//! - Library noise is filtered ([`filter_directives`]): rustls warns about what a peer
//!   sent (an IP address as SNI, an unexpected message, an alert) at the peer's will, so
//!   its warnings are dropped unless the operator's `RUST_LOG` names rustls.
//! - mailgate's own per-connection warnings go through [`warn_limited!`] or
//!   [`error_limited!`]: each call site may write [`BURST`] lines per [`WINDOW`]; beyond that
//!   lines are counted, not written, and the next line that site writes carries
//!   `suppressed=N`, how many it held back since the last.
//!
//! The budget is per call site, not per message text or user: bounded memory, and one
//! noisy cause cannot hide another site's lines.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one call site may write per window.
pub const BURST: u32 = 10;
/// The window over which [`BURST`] lines may be written.
pub const WINDOW: Duration = Duration::from_secs(10);

/// The log budget of one call site (a `static` in [`warn_limited!`]).
pub struct LogBudget {
    window: Mutex<Option<Window>>,
}

struct Window {
    started: Instant,
    written: u32,
    /// Lines held back since the last one written.
    suppressed: u64,
}

impl LogBudget {
    pub const fn new() -> LogBudget {
        LogBudget { window: Mutex::new(None) }
    }

    /// Whether a line may be written at `now`: `Some` with how many lines were suppressed
    /// since the last one written, or `None` to suppress this one.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let window = window.get_or_insert(Window { started: now, written: 0, suppressed: 0 });
        if now.saturating_duration_since(window.started) >= WINDOW {
            window.started = now;
            window.written = 0;
        }
        if window.written < BURST {
            window.written += 1;
            Some(std::mem::take(&mut window.suppressed))
        } else {
            window.suppressed += 1;
            None
        }
    }
}

impl Default for LogBudget {
    fn default() -> Self {
        LogBudget::new()
    }
}

/// The log filter from the operator's `RUST_LOG` (`None` or empty: `info`), with rustls
/// held to errors unless the operator's filter names it.
pub fn filter_directives(operator: Option<&str>) -> String {
    const RUSTLS: &str = "rustls=error";
    let operator = operator.map(str::trim).filter(|f| !f.is_empty()).unwrap_or("info");
    let names_rustls = operator.split(',').any(|directive| {
        let target = directive.trim().split(['=', '[']).next().unwrap_or("");
        target == "rustls" || target.starts_with("rustls::")
    });
    if names_rustls {
        operator.to_string()
    } else {
        format!("{operator},{RUSTLS}")
    }
}

/// Writes at `$level` within the call site's [`LogBudget`].
macro_rules! within_budget {
    ($level:ident, $($arg:tt)+) => {{
        static BUDGET: $crate::log_budget::LogBudget = $crate::log_budget::LogBudget::new();
        match BUDGET.admit(std::time::Instant::now()) {
            Some(0) => tracing::$level!($($arg)+),
            Some(suppressed) => tracing::$level!(suppressed, $($arg)+),
            None => {}
        }
    }};
}

/// `tracing::warn!` for a line a peer can trigger per connection: at most [`BURST`] lines
/// per [`WINDOW`] from this call site, the next one written saying how many were held back.
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::log_budget::within_budget!(warn, $($arg)+) };
}

/// `tracing::error!` within the call site's budget, like [`warn_limited!`].
macro_rules! error_limited {
    ($($arg:tt)+) => { $crate::log_budget::within_budget!(error, $($arg)+) };
}

pub(crate) use {error_limited, warn_limited, within_budget};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_writes_its_burst_then_counts_and_reports_the_suppressed_in_the_next_window() {
        let budget = LogBudget::new();
        let start = Instant::now();
        for _ in 0..BURST {
            assert_eq!(budget.admit(start), Some(0));
        }
        for i in 0..25 {
            assert_eq!(budget.admit(start + Duration::from_millis(i)), None);
        }
        assert_eq!(budget.admit(start + WINDOW - Duration::from_millis(1)), None);
        assert_eq!(budget.admit(start + WINDOW), Some(26), "the first line of a new window reports them");
        assert_eq!(budget.admit(start + WINDOW), Some(0), "and only once");
    }

    #[test]
    fn a_quiet_site_is_never_held_back() {
        let budget = LogBudget::new();
        let start = Instant::now();
        for i in 0..100u32 {
            assert_eq!(budget.admit(start + WINDOW * i), Some(0));
        }
    }

    #[test]
    fn the_macros_write_at_most_a_burst_per_call_site() {
        use std::io::Write;
        #[derive(Clone, Default)]
        struct Sink(std::sync::Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
        tracing::subscriber::with_default(subscriber, || {
            for connection in 0..100 {
                warn_limited!(connection, "a warning a client can trigger");
                error_limited!(connection, "an error an upstream can trigger");
            }
        });
        let log = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
        assert_eq!(count("WARN") + count("ERROR"), 2 * BURST as usize, "{log}");
        assert_eq!(count("a warning a client can trigger"), BURST as usize);
        assert_eq!(count("an error an upstream can trigger"), BURST as usize);
    }

    #[test]
    fn rustls_is_held_to_errors_unless_the_operator_names_it() {
        assert_eq!(filter_directives(None), "info,rustls=error");
        assert_eq!(filter_directives(Some(" ")), "info,rustls=error");
        assert_eq!(filter_directives(Some("debug,mailgate=trace")), "debug,mailgate=trace,rustls=error");
        assert_eq!(filter_directives(Some("tokio_rustls=debug")), "tokio_rustls=debug,rustls=error");
        assert_eq!(filter_directives(Some("info,rustls=warn")), "info,rustls=warn");
        assert_eq!(filter_directives(Some("rustls::server=debug")), "rustls::server=debug");
        assert_eq!(filter_directives(Some("rustls[handshake]=trace")), "rustls[handshake]=trace");
    }
}
