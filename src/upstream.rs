//! Reaching an upstream mail server: TCP connect, implicit TLS or a later STARTTLS
//! handshake, each bounded by its own timeout. Protocol dialogues (greeting, login) live with
//! their protocol (`imap::upstream`); this module knows nothing of IMAP.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::{split_host_port, ForwardClient, TlsMode, UpstreamConfig};
use crate::origin::Origin;
use crate::stream::Stream;
use crate::tls::{self, TlsError, UpstreamTls};

/// One upstream for one protocol: a pool of one or more hosts serving the same
/// mailboxes, with its TLS client settings built once. Sessions go to the healthy hosts in
/// turn; a host that refuses a connection is marked down at once and the next one is
/// tried; a health check every `health_check_interval` brings hosts back (pools of two or
/// more hosts only).
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub hosts: Vec<Host>,
    pub tls_mode: TlsMode,
    pub connect_timeout: Duration,
    pub tls_timeout: Duration,
    pub login_timeout: Duration,
    /// How the upstream learns the client's address.
    pub forward: ForwardClient,
    pub health_check_interval: Duration,
    /// The OAuth SASL mechanisms this upstream offered when last asked (what the fronts
    /// announce for it).
    pub oauth: crate::oauth::Offered,
    /// Where the next session starts looking, so that sessions spread over the pool.
    next: AtomicUsize,
}

/// One host of a pool.
#[derive(Debug)]
pub struct Host {
    pub host: String,
    pub port: u16,
    tls: Option<UpstreamTls>,
    healthy: AtomicBool,
}

impl Host {
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// Why an upstream login did not give a session (IMAP and POP3 alike).
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The client gets `NO [UNAVAILABLE]` / `-ERR [SYS/TEMP]`.
    #[error("upstream unavailable: {0}")]
    Unavailable(#[from] UpstreamError),
    /// The upstream refused the credentials; `code` is its response code, if any (RFC 5530
    /// for IMAP; RFC 2449/3206 for POP3: `IN-USE`, `LOGIN-DELAY`, `AUTH`...).
    #[error("upstream refused the credentials ({code:?})")]
    Rejected { code: Option<String> },
}

/// Why the upstream could not be used; the client sees `NO [UNAVAILABLE]` for all of these.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {address}: {source}")]
    Connect { address: String, source: io::Error },
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("upstream closed the connection")]
    Closed,
    #[error("upstream does not offer STARTTLS; credentials not sent")]
    NoStartTls,
    #[error("upstream sent data after its STARTTLS answer (possible injection); aborted")]
    StartTlsInjection,
    #[error("upstream protocol: {0}")]
    Protocol(String),
    #[error("no healthy host in the upstream pool")]
    NoHealthyHost,
    /// The login's route named no usable upstream (see `routing`).
    #[error("{0}")]
    NoRoute(String),
}

impl UpstreamError {
    /// A bounded label for `mailgate_upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Tls(_) => "tls",
            UpstreamError::Closed => "closed",
            UpstreamError::NoStartTls | UpstreamError::StartTlsInjection => "starttls",
            UpstreamError::Io(_) | UpstreamError::Protocol(_) => "protocol",
            UpstreamError::NoHealthyHost => "no_healthy_host",
            UpstreamError::NoRoute(_) => "no_route",
        }
    }
}

impl Upstream {
    /// `addresses` are the configured `host:port`s for this protocol; `alpn` its ALPN id.
    pub fn new(name: &str, config: &UpstreamConfig, addresses: &[&str], alpn: &[u8]) -> Result<Upstream, TlsError> {
        let mut hosts = Vec::new();
        for address in addresses {
            let (host, port) =
                split_host_port(address).map_err(|e| TlsError::Rustls(tokio_rustls::rustls::Error::General(e)))?;
            let tls = match config.tls {
                TlsMode::Plaintext => None,
                TlsMode::Implicit | TlsMode::Starttls => Some(tls::upstream_connector(config, &host, alpn)?),
            };
            hosts.push(Host { host, port, tls, healthy: AtomicBool::new(true) });
        }
        if config.insecure_skip_verify {
            tracing::warn!(upstream = name, "insecure_skip_verify is set: the upstream's certificate is NOT verified");
        }
        if config.tls != TlsMode::Plaintext && config.min_version().is_legacy() {
            tracing::warn!(
                upstream = name,
                "tls_min_version below 1.2: TLS 1.0/1.1 through OpenSSL, at security level 0"
            );
        }
        if config.tls == TlsMode::Plaintext {
            tracing::warn!(upstream = name, "upstream tls = plaintext: credentials travel to it unencrypted");
        }
        Ok(Upstream {
            name: name.to_string(),
            hosts,
            tls_mode: config.tls,
            connect_timeout: config.connect_timeout.0,
            tls_timeout: config.tls_timeout.0,
            login_timeout: config.login_timeout.0,
            forward: config.forward_client,
            health_check_interval: config.health_check_interval.0,
            oauth: crate::oauth::Offered::default(),
            next: AtomicUsize::new(0),
        })
    }

    /// Names the upstream for cache keys: the configured name and its hosts, so that two
    /// upstreams never share cached mail even if they share user names, while the hosts of
    /// one pool (which serve the same mailboxes) do.
    pub fn identity(&self) -> String {
        let hosts: Vec<String> = self.hosts.iter().map(Host::address).collect();
        format!("{}@{}", self.name, hosts.join(","))
    }

    /// Opens a connection for `origin`'s session (`None`: mailgate's own, such as a probe)
    /// to the next healthy host: a PROXY v2 header first when `forward_client = "proxy_v2"`,
    /// then the TLS handshake when TLS is implicit. A host that cannot be reached is marked
    /// down and the next one tried; no healthy host left is an error.
    pub async fn connect(&self, origin: Option<&Origin>) -> Result<(Stream, &Host), UpstreamError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // With every host marked down (a network blip can do that between two checks),
        // try them all rather than refuse on stale news.
        let all_down = !self.hosts.iter().any(Host::healthy);
        let mut last = None;
        for i in 0..self.hosts.len() {
            let host = &self.hosts[(start + i) % self.hosts.len()];
            if !host.healthy() && !all_down {
                continue;
            }
            match self.connect_to(host, origin).await {
                Ok(stream) => return Ok((stream, host)),
                Err(e @ (UpstreamError::Connect { .. } | UpstreamError::Timeout(_))) if self.hosts.len() > 1 => {
                    crate::log_budget::warn_limited!(upstream = %self.name, host = %host.address(), error = %e, "upstream host down; trying the next");
                    host.healthy.store(false, Ordering::Relaxed);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(UpstreamError::NoHealthyHost))
    }

    async fn connect_to(&self, host: &Host, origin: Option<&Origin>) -> Result<Stream, UpstreamError> {
        let mut tcp = self.tcp(host).await?;
        if self.forward == ForwardClient::ProxyV2 {
            let header = origin.map_or_else(crate::proxy_header::encode_v2_local, Origin::proxy_v2);
            tokio::time::timeout(self.connect_timeout, tokio::io::AsyncWriteExt::write_all(&mut tcp, &header))
                .await
                .map_err(|_| UpstreamError::Timeout("upstream PROXY header"))??;
        }
        match self.tls_mode {
            TlsMode::Implicit => self.handshake(host, tcp).await,
            TlsMode::Starttls | TlsMode::Plaintext => Ok(Stream::Plain(tcp)),
        }
    }

    async fn tcp(&self, host: &Host) -> Result<TcpStream, UpstreamError> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect((host.host.as_str(), host.port)))
            .await
            .map_err(|_| UpstreamError::Timeout("upstream connect"))?
            .map_err(|source| UpstreamError::Connect { address: host.address(), source })?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    /// The TLS handshake with `host` over an established connection (implicit TLS or after
    /// STARTTLS).
    pub async fn handshake(&self, host: &Host, tcp: TcpStream) -> Result<Stream, UpstreamError> {
        let tls = host.tls.as_ref().ok_or(UpstreamError::Protocol("TLS is not configured for this upstream".into()))?;
        let stream = tokio::time::timeout(self.tls_timeout, tls.connect(tcp))
            .await
            .map_err(|_| UpstreamError::Timeout("upstream TLS handshake"))?
            .map_err(UpstreamError::Tls)?;
        tracing::debug!(upstream = %self.name, host = %host.address(), tls = stream.tls_summary(), "upstream TLS established");
        Ok(stream)
    }

    /// Whether this upstream can take sessions now (for `/readyz`): for a pool, what its
    /// health checks last found (any host up); for a single host, a TCP connect within a
    /// second, so that a probe answers well within a load balancer's timeout even when a
    /// host drops packets.
    pub async fn ready(&self) -> bool {
        if self.hosts.len() >= 2 {
            return self.hosts.iter().any(Host::healthy);
        }
        let Some(host) = self.hosts.first() else { return false };
        let budget = self.connect_timeout.min(Duration::from_secs(1));
        tokio::time::timeout(budget, TcpStream::connect((host.host.as_str(), host.port)))
            .await
            .is_ok_and(|connected| connected.is_ok())
    }

    /// Checks every host of a pool of two or more every `health_check_interval`, until
    /// `stop` (or the upstream is dropped). A check waits
    /// for the host's greeting (see `connect_probe`); `up` shows each
    /// host's state (configured addresses, so the label set is bounded by the configuration).
    /// The checks stop when `stop` is cancelled (a reload replaced this configuration).
    pub fn watch(
        self: &Arc<Self>,
        up: prometheus::IntGaugeVec,
        protocol: &'static str,
        stop: tokio_util::sync::CancellationToken,
    ) {
        if self.hosts.len() < 2 {
            return;
        }
        for host in &self.hosts {
            up.with_label_values(&[&self.name, protocol, &host.address()]).set(i64::from(host.healthy()));
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(interval) = pool.upgrade().map(|p| p.health_check_interval) else { return };
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.cancelled() => return,
                }
                let Some(pool) = pool.upgrade() else { return };
                for host in &pool.hosts {
                    let ok = pool.connect_probe(host).await;
                    let was = host.healthy.swap(ok, Ordering::Relaxed);
                    match (was, ok) {
                        (true, false) => {
                            tracing::warn!(upstream = %pool.name, host = %host.address(), "upstream host down")
                        }
                        (false, true) => {
                            tracing::info!(upstream = %pool.name, host = %host.address(), "upstream host up")
                        }
                        _ => {}
                    }
                    up.with_label_values(&[&pool.name, protocol, &host.address()]).set(i64::from(ok));
                }
            }
        });
    }

    /// A health check: the host must greet (`* OK` / `+OK`, over TLS when TLS is implicit,
    /// after a PROXY `LOCAL` header when one is expected) within the connect timeout. A
    /// host that accepts connections but hangs is as down as one that refuses them.
    async fn connect_probe(&self, host: &Host) -> bool {
        let probe = async {
            let mut stream = self.connect_to(host, None).await.ok()?;
            let mut greeting = Vec::with_capacity(128);
            let mut byte = [0u8; 1];
            while !greeting.ends_with(b"\n") && greeting.len() < 1024 {
                match tokio::io::AsyncReadExt::read(&mut stream, &mut byte).await {
                    Ok(1) => greeting.push(byte[0]),
                    _ => return None,
                }
            }
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
            Some(greeting.starts_with(b"* OK") || greeting.starts_with(b"+OK"))
        };
        tokio::time::timeout(self.connect_timeout + self.tls_timeout, probe).await.ok().flatten().unwrap_or(false)
    }
}
