//! The two directions of a relay session, driven to one end.
//!
//! Each relay (IMAP, POP3) runs an *upstream pump* (upstream → client, the only writer to
//! the client) and a *client pump* (client → upstream). Both are polled in place and never
//! re-created: dropping a pump in the middle of a write would lose the bytes it had taken
//! from its buffer. When the client side ends first (the client closed, or mailgate queued
//! its own closing line), the upstream pump still gets [`DRAIN`] to deliver what is owed:
//! answers to commands already sent, or that closing line.

use std::future::Future;
use std::time::Duration;

/// How long the upstream pump may finish its work once the client side has ended.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Runs both pumps until the session ends; returns the first end seen.
pub async fn drive<E>(upstream_side: impl Future<Output = E>, client_side: impl Future<Output = E>) -> E {
    tokio::pin!(upstream_side);
    tokio::pin!(client_side);
    tokio::select! {
        end = &mut upstream_side => end,
        end = &mut client_side => {
            let _ = tokio::time::timeout(DRAIN, &mut upstream_side).await;
            end
        }
    }
}
