//! Accepting connections: one accept loop per configured listener, one task per session,
//! with a tracing span that carries the listener, the client address and a session id.
//! Implicit TLS is completed here, within the handshake timeout, before any greeting: a
//! plaintext client on an implicit-TLS port gets nothing but a closed connection, and so
//! does a connection over a limit there (closed at accept, before any handshake).
//!
//! On a listener behind a load balancer (`proxy_protocol`), the PROXY header is read first,
//! within `proxy_timeout`, and only from `proxy_trusted` peers: anyone else, or a
//! connection without a valid header, is closed before any greeting. From then on the
//! header's client address is the session's: in the span, the limits and what the upstream
//! is told.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{debug, field, info, info_span, Instrument};

use crate::config::Protocol;
use crate::config::TlsMode;
use crate::origin::{session_id, Origin};
use crate::proxy_header::{self, Header, Parsed, ProxyError};
use crate::service::Service;
use crate::stream::Stream;
use crate::{imap, pop3};

pub struct Listener {
    pub name: String,
    pub tcp: TcpListener,
    /// The settings new connections get; a reload replaces them, sessions keep theirs.
    pub service: Arc<std::sync::RwLock<Arc<Service>>>,
}

impl Listener {
    /// Accepts until shutdown; sessions are spawned on `tracker` so that shutdown can wait
    /// for them.
    pub async fn serve(self, tracker: TaskTracker) {
        let current = || self.service.read().unwrap_or_else(|p| p.into_inner()).clone();
        let shutdown = current().shutdown.clone();
        loop {
            let accepted = tokio::select! {
                accepted = self.tcp.accept() => accepted,
                _ = shutdown.cancelled() => return,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let id = session_id();
                    let service = current();
                    let span = info_span!("session", listener = %self.name, protocol = service.protocol.name(), client = %peer, session = %id, user = field::Empty, tls = field::Empty);
                    tracker.spawn(session(tcp, peer, id, service).instrument(span));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    crate::log_budget::warn_limited!(listener = %self.name, error = %e, "accept failed");
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

/// Reads a PROXY header from a trusted balancer, exactly (the client's first bytes stay
/// in the socket): `None` for `LOCAL` (a health check) or an unknown client.
async fn proxy_header(tcp: &mut TcpStream) -> Result<Option<(SocketAddr, SocketAddr)>, ProxyError> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(64);
    loop {
        match proxy_header::parse(&buf)? {
            Parsed::Done(Header::Local, _) => return Ok(None),
            Parsed::Done(Header::Proxied { source, destination }, _) => return Ok(Some((source, destination))),
            Parsed::Incomplete(more) => {
                let start = buf.len();
                buf.resize(start + more, 0);
                if tcp.read_exact(&mut buf[start..]).await.is_err() {
                    return Err(ProxyError::Malformed("connection closed within the header"));
                }
            }
        }
    }
}

async fn session(mut tcp: TcpStream, socket_peer: SocketAddr, id: String, service: Arc<Service>) {
    debug!(peer = %socket_peer, "connected");
    let mut peer = socket_peer;
    let mut local = tcp.local_addr().unwrap_or(socket_peer);
    if let Some(policy) = &service.proxy {
        if !policy.trusted.iter().any(|n| n.contains(socket_peer.ip())) {
            info!(peer = %socket_peer, "closed: not a trusted PROXY protocol sender");
            return;
        }
        match tokio::time::timeout(policy.timeout, proxy_header(&mut tcp)).await {
            Ok(Ok(Some((source, destination)))) => {
                tracing::Span::current().record("client", field::display(source));
                debug!(balancer = %socket_peer, client = %source, "PROXY header");
                (peer, local) = (source, destination);
            }
            Ok(Ok(None)) => debug!("PROXY LOCAL: the balancer's own connection"),
            Ok(Err(error)) => {
                info!(%error, "closed: bad PROXY header");
                return;
            }
            Err(_) => {
                info!("closed: no PROXY header in time");
                return;
            }
        }
    }
    let labels = [service.protocol.name(), service.listener.as_str(), service.listener_tls.name()];
    service.metrics.connections_total.with_label_values(&labels).inc();
    let active = service.metrics.connections_active.with_label_values(&labels);
    active.inc();
    let _active = Active(active);
    let _ = tcp.set_nodelay(true);
    // The caps and the connection rate count a connection from its first byte: a client
    // stalling its TLS handshake holds a slot like any other.
    let admitted = service.limits.connect(peer.ip()).await;
    let stream = match (service.listener_tls, &admitted) {
        // Refused on an implicit-TLS port: closed at once, without a word. A refusal said
        // over TLS would first cost a handshake, and a client that stalls it would hold the
        // socket for the whole handshake timeout: the cap would then bound nothing.
        (TlsMode::Implicit, Err(refused)) => return count_refusal(&service, *refused),
        (TlsMode::Implicit, Ok(_)) => match Box::pin(service.accept_tls(tcp)).await {
            Some(stream) => stream,
            None => return,
        },
        (TlsMode::Starttls | TlsMode::Plaintext, _) => Stream::Plain(tcp),
    };
    let _lease = match admitted {
        Ok(lease) => lease,
        Err(refused) => return refuse(&service, stream, refused).await,
    };
    let origin = Origin { client: peer, local, session: id, tls: None };
    // The front (not-authenticated state) ends before the relay begins: the session's
    // future holds one or the other.
    match service.protocol {
        Protocol::Imap => {
            if let Some(handover) = imap::front::serve(stream, &service, origin).await {
                imap::relay::run(handover, &service).await;
            }
        }
        Protocol::Pop3 => {
            if let Some(handover) = pop3::front::serve(stream, &service, origin).await {
                pop3::relay::run(handover, &service).await;
            }
        }
    }
    debug!("disconnected");
}

/// Logs and counts a connection a limit refused.
fn count_refusal(service: &Service, refused: crate::limits::Refused) {
    use crate::limits::Refused;
    info!(?refused, "connection refused by a limit");
    match refused {
        Refused::Rate => service.limited("rate"),
        // Counted in mailgate_limit_store_errors_total.
        Refused::Unavailable => {}
        _ => service.limited("connections"),
    }
}

/// Answers a connection a limit refused (in clear text: a plaintext or STARTTLS port),
/// and closes it.
async fn refuse(service: &Service, mut stream: Stream, refused: crate::limits::Refused) {
    use crate::limits::Refused;
    count_refusal(service, refused);
    let why = match refused {
        Refused::Unavailable => "Service temporarily unavailable",
        _ => "Too many connections",
    };
    let refusal = match service.protocol {
        Protocol::Imap => format!("* BYE [UNAVAILABLE] {why}, try again later.\r\n"),
        Protocol::Pop3 => format!("-ERR [SYS/TEMP] {why}, try again later.\r\n"),
    };
    if tokio::io::AsyncWriteExt::write_all(&mut stream, refusal.as_bytes()).await.is_ok() {
        stream.linger_close().await;
    }
}
