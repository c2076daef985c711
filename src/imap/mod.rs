//! IMAP: the pre-authentication front, the upstream login and the relay.
//!
//! - [`framing`]: sans-I/O lines-and-literals framer with limits (both directions).
//! - [`command`]: the commands mailgate answers before login.
//! - [`front`]: the not-authenticated state, STARTTLS and login.
//! - [`upstream`]: logging in to the upstream with the client's credentials.
//! - [`relay`]: the authenticated session, relayed with framing.

pub mod capabilities;
pub mod command;
pub mod framing;
pub mod front;
pub mod relay;
pub mod response;
pub mod upstream;

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, TlsMode};
use crate::upstream::Upstream;

/// Everything a session of one IMAP listener needs; shared by its sessions.
pub struct Service {
    pub config: Arc<Config>,
    pub listener_tls: TlsMode,
    /// For implicit TLS and STARTTLS; `None` on a plaintext listener.
    pub tls: Option<TlsAcceptor>,
    pub upstream: Arc<Upstream>,
    /// Cancelled when the process starts its graceful shutdown.
    pub shutdown: CancellationToken,
}

/// The ALPN protocol id of IMAP (RFC 9051 / IANA registry).
pub const ALPN: &[u8] = b"imap";
