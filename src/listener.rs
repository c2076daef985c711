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
use tracing::{debug, field, info, info_span, warn, Instrument};

use crate::config::Protocol;
use crate::config::TlsMode;
use crate::service::Service;
use crate::stream::Stream;
use crate::{imap, pop3};

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

pub struct Listener {
    pub name: String,
    pub tcp: TcpListener,
    pub service: Arc<Service>,
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
                    let span = info_span!("session", listener = %self.name, protocol = self.service.protocol.name(), client = %peer, session = id, user = field::Empty);
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

/// Keeps `mailgate_connections_active` right however a session ends.
struct Active(prometheus::IntGauge);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn session(tcp: TcpStream, peer: SocketAddr, service: Arc<Service>) {
    debug!(%peer, "connected");
    let labels = [service.protocol.name(), service.listener.as_str(), service.listener_tls.name()];
    service.metrics.connections_total.with_label_values(&labels).inc();
    let active = service.metrics.connections_active.with_label_values(&labels);
    active.inc();
    let _active = Active(active);
    let _ = tcp.set_nodelay(true);
    let stream = match service.listener_tls {
        TlsMode::Implicit => match service.accept_tls(tcp).await {
            Some(stream) => stream,
            None => return,
        },
        TlsMode::Starttls | TlsMode::Plaintext => Stream::Plain(tcp),
    };
    let _lease = match service.limits.connect(peer.ip()).await {
        Ok(lease) => lease,
        Err(refused) => {
            info!(?refused, "connection refused by a limit");
            match refused {
                crate::limits::Refused::Rate => service.limited("rate"),
                // Counted in mailgate_limit_store_errors_total.
                crate::limits::Refused::Unavailable => {}
                _ => service.limited("connections"),
            }
            let mut stream = stream;
            let why = match refused {
                crate::limits::Refused::Unavailable => "Service temporarily unavailable",
                _ => "Too many connections",
            };
            let refusal = match service.protocol {
                Protocol::Imap => format!("* BYE [UNAVAILABLE] {why}, try again later.\r\n"),
                Protocol::Pop3 => format!("-ERR [SYS/TEMP] {why}, try again later.\r\n"),
            };
            if tokio::io::AsyncWriteExt::write_all(&mut stream, refusal.as_bytes()).await.is_ok() {
                stream.linger_close().await;
            }
            return;
        }
    };
    match service.protocol {
        Protocol::Imap => imap::front::serve(stream, &service, peer).await,
        Protocol::Pop3 => pop3::front::serve(stream, &service, peer).await,
    }
    debug!("disconnected");
}
