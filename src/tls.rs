//! TLS settings, built once per configuration generation: the server side per listener,
//! the client side per upstream host.
//!
//! - TLS 1.2 and 1.3 with rustls' ring provider; `tls_min_version = "1.3"` offers 1.3 only.
//!   TLS 1.0 and 1.1, on the listeners and upstreams that ask for them, go through OpenSSL
//!   (`legacy_tls`): rustls does not implement them.
//! - ALPN: a listener announces its own protocol (`imap`) only. A client that offers ALPN
//!   without it is refused by rustls with `no_application_protocol` (RFC 7301), which defeats
//!   cross-protocol (ALPACA) redirection; a client that offers no ALPN is served. A
//!   listener with `alpn = "lenient"` reads the ClientHello first and serves such a client
//!   without ALPN instead (old clients send values strict servers refuse).
//! - Several certificates: the one whose names cover the client's SNI (wildcards included,
//!   checked by `rustls-webpki` exactly as a client would), else the first.
//! - PEM is read with `rustls-pki-types`' `PemObject`, the maintained successor of the
//!   archived `rustls-pemfile`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor, TlsConnector};

use crate::config::{AlpnPolicy, CertificatePair, ListenerConfig, TlsVersion, UpstreamConfig};
use crate::legacy_tls::{LegacyAcceptor, LegacyConnector};
use crate::stream::Stream;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read PEM: {source}")]
    Pem { path: PathBuf, source: rustls_pki_types::pem::Error },
    #[error("{path}: no certificate found")]
    NoCertificate { path: PathBuf },
    #[error("certificate {cert} with key {key}: {source}")]
    KeyMismatch { cert: PathBuf, key: PathBuf, source: rustls::Error },
    #[error("no certificate configured")]
    NoCertificates,
    #[error("system root certificates: {0}")]
    SystemRoots(String),
    #[error("{path}: {source}")]
    BadCa { path: PathBuf, source: rustls::Error },
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("OpenSSL settings for {context}: {source}")]
    OpenSsl { context: String, source: openssl::error::ErrorStack },
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The rustls versions from `min` up (1.0 and 1.1 never reach rustls).
fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    if min == TlsVersion::Tls1_3 {
        &VERSIONS[..1]
    } else {
        VERSIONS
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

pub(crate) fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Pem { path: path.into(), source })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(chain)
}

/// The configured certificates, read and checked (each key matches its certificate).
pub fn load_certificates(certificates: &[CertificatePair]) -> Result<Arc<Certificates>, TlsError> {
    if certificates.is_empty() {
        return Err(TlsError::NoCertificates);
    }
    let provider = provider();
    let mut keys = Vec::new();
    for pair in certificates {
        let chain = read_chain(&pair.cert)?;
        let key = PrivateKeyDer::from_pem_file(&pair.key)
            .map_err(|source| TlsError::Pem { path: pair.key.clone(), source })?;
        let mismatch = |source| TlsError::KeyMismatch { cert: pair.cert.clone(), key: pair.key.clone(), source };
        let certified = rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(mismatch)?;
        certified.keys_match().map_err(mismatch)?;
        webpki::EndEntityCert::try_from(&certified.cert[0])
            .map_err(|e| TlsError::Rustls(rustls::Error::General(format!("{}: {e}", pair.cert.display()))))?;
        keys.push(Arc::new(certified));
    }
    Ok(Arc::new(Certificates { keys, pairs: certificates.to_vec() }))
}

/// The server's certificates, chosen by SNI.
#[derive(Debug)]
pub struct Certificates {
    keys: Vec<Arc<rustls::sign::CertifiedKey>>,
    /// Their files, in the same order: OpenSSL (legacy listeners) loads its own copy.
    pairs: Vec<CertificatePair>,
}

impl Certificates {
    /// The certificate for `server_name`: the first whose names cover it, else the first.
    pub fn for_name(&self, server_name: Option<&str>) -> Arc<rustls::sign::CertifiedKey> {
        self.keys[self.index_for_name(server_name)].clone()
    }

    /// The position of [`Certificates::for_name`]'s choice, for the OpenSSL contexts built
    /// from the same files.
    pub fn index_for_name(&self, server_name: Option<&str>) -> usize {
        let wanted = server_name.and_then(|name| ServerName::try_from(name).ok());
        let covering = wanted.and_then(|name| {
            self.keys.iter().position(|key| {
                webpki::EndEntityCert::try_from(&key.cert[0])
                    .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
            })
        });
        covering.unwrap_or(0)
    }

    pub fn pairs(&self) -> &[CertificatePair] {
        &self.pairs
    }
}

impl rustls::server::ResolvesServerCert for Certificates {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.for_name(hello.server_name()))
    }
}

/// A completed server-side handshake.
pub struct Accepted {
    pub stream: Stream,
    /// The client offered ALPN without our protocol and a lenient listener went on
    /// without ALPN.
    pub alpn_ignored: bool,
}

/// A failed server-side handshake: its `mailgate_tls_handshake_failures_total` reason and
/// the error, for the log.
pub struct Refused {
    pub reason: &'static str,
    pub error: String,
}

/// The server side of one listener's TLS: rustls (TLS 1.2 and 1.3), or OpenSSL for a
/// listener that also serves TLS 1.0/1.1.
pub enum ServerTls {
    Rustls(RustlsAcceptor),
    Legacy(LegacyAcceptor),
}

impl ServerTls {
    /// The acceptor for `listener`'s protocol, minimum version and ALPN policy.
    pub fn for_listener(certificates: &Arc<Certificates>, listener: &ListenerConfig) -> Result<ServerTls, TlsError> {
        let alpn = listener.protocol.alpn();
        let (min_version, policy) = (listener.min_version(), listener.alpn_policy());
        Ok(if min_version.is_legacy() {
            ServerTls::Legacy(LegacyAcceptor::new(certificates, alpn, min_version, policy)?)
        } else {
            ServerTls::Rustls(RustlsAcceptor::new(certificates, alpn, min_version, policy)?)
        })
    }

    /// The server side of a handshake over `tcp` (the caller bounds it in time).
    pub async fn accept(&self, tcp: TcpStream) -> Result<Accepted, Refused> {
        match self {
            ServerTls::Rustls(rustls) => rustls.accept(tcp).await,
            ServerTls::Legacy(legacy) => legacy.accept(tcp).await,
        }
    }
}

/// rustls' side of a listener: the configuration with our ALPN id, and for a lenient
/// listener the same without ALPN, chosen after reading the ClientHello.
pub struct RustlsAcceptor {
    strict: Arc<ServerConfig>,
    lenient: Option<Arc<ServerConfig>>,
    alpn: Vec<u8>,
}

impl RustlsAcceptor {
    fn new(
        certificates: &Arc<Certificates>,
        alpn: &[u8],
        min_version: TlsVersion,
        policy: AlpnPolicy,
    ) -> Result<RustlsAcceptor, TlsError> {
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions(min_version))?
            .with_no_client_auth()
            .with_cert_resolver(certificates.clone());
        let lenient = (policy == AlpnPolicy::Lenient).then(|| Arc::new(config.clone()));
        let mut strict = config;
        strict.alpn_protocols = vec![alpn.to_vec()];
        Ok(RustlsAcceptor { strict: Arc::new(strict), lenient, alpn: alpn.to_vec() })
    }

    async fn accept(&self, tcp: TcpStream) -> Result<Accepted, Refused> {
        let refused =
            |e: std::io::Error| Refused { reason: crate::metrics::handshake_failure_reason(&e), error: e.to_string() };
        let Some(lenient) = &self.lenient else {
            let tls = TlsAcceptor::from(self.strict.clone()).accept(tcp).await.map_err(refused)?;
            return Ok(Accepted {
                stream: Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls))),
                alpn_ignored: false,
            });
        };
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await.map_err(refused)?;
        let alpn_ignored = start.client_hello().alpn().is_some_and(|mut offered| !offered.any(|id| id == self.alpn));
        let config = if alpn_ignored { lenient.clone() } else { self.strict.clone() };
        let tls = start.into_stream(config).await.map_err(refused)?;
        Ok(Accepted { stream: Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls))), alpn_ignored })
    }
}

/// How mailgate reaches one upstream host over TLS: rustls, or OpenSSL for an upstream
/// with `tls_min_version` 1.0 or 1.1.
#[derive(Debug)]
pub enum UpstreamTls {
    Rustls(RustlsConnector),
    Legacy(LegacyConnector),
}

impl UpstreamTls {
    /// The client side of a handshake over `tcp` (the caller bounds it in time).
    pub async fn connect(&self, tcp: TcpStream) -> std::io::Result<Stream> {
        match self {
            UpstreamTls::Rustls(rustls) => {
                let tls = rustls.connector.connect(rustls.server_name.clone(), tcp).await?;
                Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(tls))))
            }
            UpstreamTls::Legacy(legacy) => legacy.connect(tcp).await,
        }
    }
}

pub struct RustlsConnector {
    connector: TlsConnector,
    /// The name verified in the upstream's certificate (RFC 7817 §3: the configured host).
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for RustlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RustlsConnector").field("server_name", &self.server_name).finish()
    }
}

pub fn upstream_connector(upstream: &UpstreamConfig, host: &str, alpn: &[u8]) -> Result<UpstreamTls, TlsError> {
    if upstream.min_version().is_legacy() {
        return Ok(UpstreamTls::Legacy(LegacyConnector::new(upstream, host, alpn)?));
    }
    let builder =
        ClientConfig::builder_with_provider(provider()).with_protocol_versions(versions(upstream.min_version()))?;
    let mut config = if upstream.insecure_skip_verify {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerification(provider()))).with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        match &upstream.ca_file {
            Some(path) => {
                for cert in read_chain(path)? {
                    roots.add(cert).map_err(|source| TlsError::BadCa { path: path.clone(), source })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                if found.certs.is_empty() {
                    return Err(TlsError::SystemRoots(format!("none found ({:?})", found.errors)));
                }
                roots.add_parsable_certificates(found.certs);
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    let name = upstream.server_name.as_deref().unwrap_or(host);
    let server_name = ServerName::try_from(name.to_string())
        .map_err(|_| TlsError::Rustls(rustls::Error::General(format!("`{name}` is not a valid server name"))))?;
    Ok(UpstreamTls::Rustls(RustlsConnector { connector: TlsConnector::from(Arc::new(config)), server_name }))
}

/// Accepts any certificate: only behind `insecure_skip_verify = true`, warned about at start.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
