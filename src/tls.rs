//! TLS settings, built once at start: the server side per listener protocol, the client
//! side per upstream.
//!
//! - TLS 1.2 and 1.3 only, with rustls' ring provider (no C toolchain beyond `cc`).
//! - ALPN: a listener announces its own protocol (`imap`) only. A client that offers ALPN
//!   without it is refused by rustls with `no_application_protocol` (RFC 7301), which defeats
//!   cross-protocol (ALPACA) redirection; a client that offers no ALPN is served.
//! - Several certificates: the one whose names cover the client's SNI (wildcards included,
//!   checked by `rustls-webpki` exactly as a client would), else the first.
//! - PEM is read with `rustls-pki-types`' `PemObject`, the maintained successor of the
//!   archived `rustls-pemfile`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{CertificatePair, UpstreamConfig};

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
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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
    Ok(Arc::new(Certificates { keys }))
}

/// The server's certificates, chosen by SNI.
#[derive(Debug)]
pub struct Certificates {
    keys: Vec<Arc<rustls::sign::CertifiedKey>>,
}

impl Certificates {
    /// The certificate for `server_name`: the first whose names cover it, else the first.
    pub fn for_name(&self, server_name: Option<&str>) -> Arc<rustls::sign::CertifiedKey> {
        let wanted = server_name.and_then(|name| ServerName::try_from(name).ok());
        let covering = wanted.and_then(|name| {
            self.keys.iter().find(|key| {
                webpki::EndEntityCert::try_from(&key.cert[0])
                    .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
            })
        });
        covering.unwrap_or(&self.keys[0]).clone()
    }
}

impl rustls::server::ResolvesServerCert for Certificates {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.for_name(hello.server_name()))
    }
}

/// Builds the acceptor for one listener protocol; `alpn` is that protocol's ALPN id.
pub fn acceptor(certificates: Arc<Certificates>, alpn: &[u8]) -> Result<TlsAcceptor, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(certificates);
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// How mailgate reaches one upstream over TLS.
#[derive(Clone)]
pub struct UpstreamTls {
    pub connector: TlsConnector,
    /// The name verified in the upstream's certificate (RFC 7817 §3: the configured host).
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls").field("server_name", &self.server_name).finish()
    }
}

pub fn upstream_connector(upstream: &UpstreamConfig, host: &str, alpn: &[u8]) -> Result<UpstreamTls, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider()).with_protocol_versions(VERSIONS)?;
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
    Ok(UpstreamTls { connector: TlsConnector::from(Arc::new(config)), server_name })
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
