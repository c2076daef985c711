//! Reaching an upstream mail server: TCP connect, implicit TLS or a later STARTTLS
//! handshake, each bounded by its own timeout. Protocol dialogues (greeting, login) live with
//! their protocol (`imap::upstream`); this module knows nothing of IMAP.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::{split_host_port, ForwardClient, TlsMode, UpstreamConfig};
use crate::origin::Origin;
use crate::stream::Stream;
use crate::tls::{self, TlsError, UpstreamTls};

/// One upstream endpoint for one protocol, with its TLS client settings built once.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub tls_mode: TlsMode,
    tls: Option<UpstreamTls>,
    pub connect_timeout: Duration,
    pub tls_timeout: Duration,
    pub login_timeout: Duration,
    /// How the upstream learns the client's address.
    pub forward: ForwardClient,
}

/// Why the upstream could not be used; the client sees `NO [UNAVAILABLE]` for all of these.
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
        }
    }
}

impl Upstream {
    /// `address` is the configured `host:port` for this protocol; `alpn` its ALPN id.
    pub fn new(name: &str, config: &UpstreamConfig, address: &str, alpn: &[u8]) -> Result<Upstream, TlsError> {
        let (host, port) =
            split_host_port(address).map_err(|e| TlsError::Rustls(tokio_rustls::rustls::Error::General(e)))?;
        let tls = match config.tls {
            TlsMode::Plaintext => None,
            TlsMode::Implicit | TlsMode::Starttls => Some(tls::upstream_connector(config, &host, alpn)?),
        };
        if config.insecure_skip_verify {
            tracing::warn!(upstream = name, "insecure_skip_verify is set: the upstream's certificate is NOT verified");
        }
        if config.tls == TlsMode::Plaintext {
            tracing::warn!(upstream = name, "upstream tls = plaintext: credentials travel to it unencrypted");
        }
        Ok(Upstream {
            name: name.to_string(),
            host,
            port,
            tls_mode: config.tls,
            tls,
            connect_timeout: config.connect_timeout.0,
            tls_timeout: config.tls_timeout.0,
            login_timeout: config.login_timeout.0,
            forward: config.forward_client,
        })
    }

    /// Names the upstream server for cache keys: the configured name and its address, so
    /// that two upstreams never share cached mail even if they share user names.
    pub fn identity(&self) -> String {
        format!("{}@{}:{}", self.name, self.host, self.port)
    }

    /// Opens the TCP connection for `origin`'s session (`None`: mailgate's own, such as a
    /// health check): a PROXY v2 header first when `forward_client = "proxy_v2"`, then the
    /// TLS handshake when TLS is implicit.
    pub async fn connect(&self, origin: Option<&Origin>) -> Result<Stream, UpstreamError> {
        let address = format!("{}:{}", self.host, self.port);
        let mut tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect((self.host.as_str(), self.port)))
            .await
            .map_err(|_| UpstreamError::Timeout("upstream connect"))?
            .map_err(|source| UpstreamError::Connect { address, source })?;
        tcp.set_nodelay(true)?;
        if self.forward == ForwardClient::ProxyV2 {
            let header = origin.map_or_else(crate::proxy_header::encode_v2_local, Origin::proxy_v2);
            tokio::time::timeout(self.connect_timeout, tokio::io::AsyncWriteExt::write_all(&mut tcp, &header))
                .await
                .map_err(|_| UpstreamError::Timeout("upstream PROXY header"))??;
        }
        match self.tls_mode {
            TlsMode::Implicit => self.handshake(tcp).await,
            TlsMode::Starttls | TlsMode::Plaintext => Ok(Stream::Plain(tcp)),
        }
    }

    /// The TLS handshake over an established connection (implicit TLS or after STARTTLS).
    pub async fn handshake(&self, tcp: TcpStream) -> Result<Stream, UpstreamError> {
        let tls = self.tls.as_ref().ok_or(UpstreamError::Protocol("TLS is not configured for this upstream".into()))?;
        let stream = tokio::time::timeout(self.tls_timeout, tls.connector.connect(tls.server_name.clone(), tcp))
            .await
            .map_err(|_| UpstreamError::Timeout("upstream TLS handshake"))?
            .map_err(UpstreamError::Tls)?;
        Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(stream))))
    }
}
