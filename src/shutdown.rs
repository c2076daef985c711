//! Process signals and the graceful drain.
//!
//! SIGTERM or SIGINT cancels the shared token: listeners stop accepting, sessions with
//! nothing in flight (or only IDLE) get `* BYE` at once, busy ones after their last tagged
//! completion. [`drain`] waits for them up to the configured grace period.

use std::time::Duration;

use tokio_util::task::TaskTracker;

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
}

/// Waits until every tracked session has ended or `grace` has passed; true if all ended.
pub async fn drain(tracker: &TaskTracker, grace: Duration) -> bool {
    tracker.close();
    let remaining = tracker.len();
    tracing::info!(sessions = remaining, grace_secs = grace.as_secs_f64(), "draining sessions");
    let done = tokio::time::timeout(grace, tracker.wait()).await.is_ok();
    if !done {
        tracing::warn!(sessions = tracker.len(), "grace period over: cutting the remaining sessions");
    }
    done
}
