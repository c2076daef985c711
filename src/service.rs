//! What every session of one listener shares, whatever its protocol: settings, the TLS
//! acceptor, the upstream, the shutdown signal; and the TLS steps both protocols take the
//! same way (implicit TLS at accept, STARTTLS/STLS later).

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::auth::Credentials;
use crate::cache::{Account, LoginProof, MessageCache, Scope};
use crate::config::{Config, Protocol, TlsMode};
use crate::stream::Stream;
use crate::upstream::Upstream;

pub struct Service {
    pub config: Arc<Config>,
    pub protocol: Protocol,
    pub listener_tls: TlsMode,
    /// For implicit TLS and STARTTLS; `None` on a plaintext listener.
    pub tls: Option<TlsAcceptor>,
    pub upstream: Arc<Upstream>,
    /// Cancelled when the process starts its graceful shutdown.
    pub shutdown: CancellationToken,
    /// The process-wide message cache, when enabled.
    pub cache: Option<Arc<MessageCache>>,
}

impl Service {
    /// Credentials may be accepted on this connection: it is TLS, or the listener is not
    /// a STARTTLS one (implicit TLS, or plaintext by explicit configuration).
    pub fn login_allowed(&self, stream: &Stream) -> bool {
        self.listener_tls != TlsMode::Starttls || stream.is_tls()
    }

    /// The cache scope of a session that just logged in: keys for `credentials`' identity
    /// (the SASL authorization identity when given) at this upstream. `None` without a cache.
    pub fn cache_scope(&self, credentials: &Credentials, proof: &LoginProof) -> Option<Scope> {
        let cache = self.cache.clone()?;
        let identity = credentials.authzid.as_deref().unwrap_or(&credentials.user);
        Some(Scope { account: Account::new(&self.upstream.identity(), identity, proof), cache })
    }

    /// STARTTLS/STLS may be started now.
    pub fn starttls_available(&self, stream: &Stream) -> bool {
        self.listener_tls == TlsMode::Starttls && !stream.is_tls() && self.tls.is_some()
    }

    /// STARTTLS/STLS after the `OK`: the handshake over the plain connection. `None` when
    /// the connection is not plain or the handshake fails (the session then ends).
    pub async fn start_tls(&self, stream: Stream) -> Option<Stream> {
        match stream {
            Stream::Plain(tcp) => self.accept_tls(tcp).await,
            Stream::Tls(_) => None,
        }
    }

    /// The server side of a TLS handshake within the handshake timeout; `None` (logged at
    /// debug: a client's failure, not ours) when it fails.
    pub async fn accept_tls(&self, tcp: TcpStream) -> Option<Stream> {
        let acceptor = self.tls.clone()?;
        match tokio::time::timeout(self.config.tls.handshake_timeout.0, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                let stream = Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls)));
                debug!(tls = stream.tls_summary(), "TLS established");
                Some(stream)
            }
            Ok(Err(e)) => {
                debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                debug!("TLS handshake timed out");
                None
            }
        }
    }
}
