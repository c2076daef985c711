//! Accepting connections: one accept loop per configured listener, one task per session,
//! with a tracing span that carries the listener, the client address and a session id.
//! Implicit TLS is completed here, within the handshake timeout, before any greeting: a
//! plaintext client on an implicit-TLS port gets nothing but a closed connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{debug, field, info_span, warn, Instrument};

use crate::config::TlsMode;
use crate::imap;
use crate::stream::Stream;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

pub struct Listener {
    pub name: String,
    pub tcp: TcpListener,
    pub service: Arc<imap::Service>,
}

impl Listener {
    /// Accepts until shutdown; sessions are spawned on `tracker` so that shutdown can wait
    /// for them.
    pub async fn serve(self, tracker: TaskTracker) {
        let shutdown = self.service.shutdown.clone();
        loop {
            let accepted = tokio::select! {
                accepted = self.tcp.accept() => accepted,
                _ = shutdown.cancelled() => return,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
                    let span =
                        info_span!("session", listener = %self.name, client = %peer, session = id, user = field::Empty);
                    let service = self.service.clone();
                    tracker.spawn(session(tcp, peer, service).instrument(span));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(listener = %self.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn session(tcp: TcpStream, peer: SocketAddr, service: Arc<imap::Service>) {
    debug!(%peer, "connected");
    let _ = tcp.set_nodelay(true);
    let stream = match service.listener_tls {
        TlsMode::Implicit => {
            let Some(acceptor) = service.tls.clone() else {
                return;
            };
            match tokio::time::timeout(service.config.tls.handshake_timeout.0, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls))),
                Ok(Err(e)) => {
                    debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!("TLS handshake timed out");
                    return;
                }
            }
        }
        TlsMode::Starttls | TlsMode::Plaintext => Stream::Plain(tcp),
    };
    if let Some(tls) = stream.tls_summary() {
        debug!(%tls, "TLS established");
    }
    imap::front::serve(stream, &service).await;
    debug!("disconnected");
}
