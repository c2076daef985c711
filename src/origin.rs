//! Where a session comes from: the client's address (the socket's, or a trusted load
//! balancer's PROXY header), the address it connected to, a session id, and its TLS. The
//! upstream is told these when `forward_client` asks for it ([`Origin::imap_id`],
//! [`Origin::pop3_xclient`], [`Origin::proxy_v2`]), so that its logs, its own limits and
//! its `login_trusted_networks` logic see the real client, and both logs share the id.

use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;

use crate::proxy_header::{self, TlsFacts};

/// What Dovecot's proxies send as `x-proxy-ttl` / `TTL=` (its default `proxy_ttl` is 5):
/// each proxy hop lowers it, and a loop ends when it reaches 0.
pub const PROXY_TTL: u32 = 5;

#[derive(Clone, Debug)]
pub struct Origin {
    /// The client: the socket's peer, or the address a trusted PROXY header gave.
    pub client: SocketAddr,
    /// The address the client connected to (mailgate's, or the balancer's).
    pub local: SocketAddr,
    /// The session id in mailgate's logs, handed to the upstream as its session id.
    pub session: String,
    /// The client's TLS, filled in when the session logs in.
    pub tls: Option<TlsFacts>,
}

static SESSIONS: AtomicU64 = AtomicU64::new(0);

/// A new session id: 16 characters, unique per process and (from a random per-process
/// key) across a fleet, in the alphabet Dovecot's own ids use.
pub fn session_id() -> String {
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(std::collections::hash_map::RandomState::new);
    let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
    let mut bytes = [0u8; 12];
    bytes[..8].copy_from_slice(&key.hash_one(n).to_le_bytes());
    bytes[8..].copy_from_slice(&(key.hash_one(!n) as u32).to_le_bytes());
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

impl Origin {
    /// The arguments of an IMAP `ID` command with Dovecot's forwarding fields.
    pub fn imap_id(&self) -> String {
        format!(
            "(\"x-originating-ip\" \"{}\" \"x-originating-port\" \"{}\" \"x-connected-ip\" \"{}\" \"x-connected-port\" \"{}\" \"x-session-id\" \"{}\" \"x-proxy-ttl\" \"{PROXY_TTL}\")",
            self.client.ip().to_canonical(),
            self.client.port(),
            self.local.ip().to_canonical(),
            self.local.port(),
            self.session,
        )
    }

    /// A POP3 `XCLIENT` command line (without CRLF).
    pub fn pop3_xclient(&self) -> String {
        format!(
            "XCLIENT ADDR={} PORT={} SESSION={} TTL={PROXY_TTL}",
            self.client.ip().to_canonical(),
            self.client.port(),
            self.session
        )
    }

    /// A PROXY v2 header for the upstream connection.
    pub fn proxy_v2(&self) -> Vec<u8> {
        proxy_header::encode_v2(self.client, self.local, self.tls.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_carry_the_client_and_the_session() {
        let origin = Origin {
            client: "[::ffff:192.0.2.7]:40000".parse().unwrap(),
            local: "198.51.100.1:993".parse().unwrap(),
            session: "abcDEF0123456789".into(),
            tls: None,
        };
        assert_eq!(
            origin.imap_id(),
            r#"("x-originating-ip" "192.0.2.7" "x-originating-port" "40000" "x-connected-ip" "198.51.100.1" "x-connected-port" "993" "x-session-id" "abcDEF0123456789" "x-proxy-ttl" "5")"#
        );
        assert_eq!(origin.pop3_xclient(), "XCLIENT ADDR=192.0.2.7 PORT=40000 SESSION=abcDEF0123456789 TTL=5");
    }

    #[test]
    fn session_ids_are_distinct_and_safe_to_quote() {
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| session_id()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids
            .iter()
            .all(|id| id.len() == 16 && id.chars().all(|c| c.is_ascii_alphanumeric() || "+/".contains(c))));
    }
}
