//! TLS 1.0 and 1.1 through the system's OpenSSL, for the listeners and upstreams that ask
//! for them (`tls_min_version = "1.0"` or `"1.1"`). rustls does not implement these
//! versions, and some clients still in use (old phones, Outlook on old Windows) speak
//! nothing newer; every other listener and upstream stays on rustls (see `tls`).
//!
//! - The security level is lowered (`DEFAULT:@SECLEVEL=0`) in these contexts only: OpenSSL 3
//!   refuses TLS 1.0/1.1 at its default level, whatever the minimum version says. The
//!   process-wide OpenSSL configuration is never changed.
//! - The same certificates as rustls, the one for the client's SNI chosen by
//!   `Certificates::index_for_name` (a servername callback switches the context), so both
//!   stacks serve the same certificate to the same name.
//! - ALPN as in rustls: our protocol id or, for a client that offers ALPN without it, a
//!   fatal `no_application_protocol`; a lenient listener answers without ALPN instead.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::ssl::{
    AlpnError, NameType, SniError, Ssl, SslConnector, SslContext, SslContextBuilder, SslFiletype, SslMethod,
    SslOptions, SslVerifyMode, SslVersion,
};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;
use tokio::net::TcpStream;

use crate::config::{AlpnPolicy, TlsVersion, UpstreamConfig};
use crate::stream::Stream;
use crate::tls::{Accepted, Certificates, Refused, TlsError};

/// Lowers OpenSSL 3's security level so that TLS 1.0/1.1 (and their SHA-1 handshake
/// signatures) are possible at all; set on legacy contexts only.
const LEGACY_CIPHERS: &str = "DEFAULT:@SECLEVEL=0";

fn openssl_error(context: &str) -> impl FnOnce(ErrorStack) -> TlsError + '_ {
    move |source| TlsError::OpenSsl { context: context.to_string(), source }
}

fn min_protocol(version: TlsVersion) -> SslVersion {
    match version {
        TlsVersion::Tls1_0 => SslVersion::TLS1,
        TlsVersion::Tls1_1 => SslVersion::TLS1_1,
        TlsVersion::Tls1_2 => SslVersion::TLS1_2,
        TlsVersion::Tls1_3 => SslVersion::TLS1_3,
    }
}

/// ALPN ids in their wire form: each preceded by its length.
fn wire_alpn(alpn: &[u8]) -> Vec<u8> {
    let mut wire = Vec::with_capacity(alpn.len() + 1);
    wire.push(u8::try_from(alpn.len()).expect("an ALPN id is at most 255 bytes"));
    wire.extend_from_slice(alpn);
    wire
}

/// `ours` in the client's wire-form ALPN list, as a slice of that list (what OpenSSL
/// requires of the selection).
fn find_alpn<'a>(offered: &'a [u8], ours: &[u8]) -> Option<&'a [u8]> {
    let mut rest = offered;
    while let Some((&len, tail)) = rest.split_first() {
        let (id, next) = tail.split_at_checked(usize::from(len))?;
        if id == ours {
            return Some(id);
        }
        rest = next;
    }
    None
}

/// Marks a connection whose client's ALPN list was ignored (lenient listeners).
fn alpn_ignored_index() -> Index<Ssl, ()> {
    static INDEX: OnceLock<Index<Ssl, ()>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("an OpenSSL ex_data index"))
}

/// The server side of one legacy listener: one OpenSSL context per certificate, the first
/// one's servername callback switching to the others.
pub struct LegacyAcceptor {
    context: SslContext,
}

impl LegacyAcceptor {
    pub fn new(
        certificates: &Arc<Certificates>,
        alpn: &[u8],
        min_version: TlsVersion,
        policy: AlpnPolicy,
    ) -> Result<LegacyAcceptor, TlsError> {
        let mut builders = Vec::new();
        for pair in certificates.pairs() {
            let what = format!("certificate {}", pair.cert.display());
            let mut builder = server_context(alpn, min_version, policy).map_err(openssl_error(&what))?;
            builder.set_certificate_chain_file(&pair.cert).map_err(openssl_error(&what))?;
            builder.set_private_key_file(&pair.key, SslFiletype::PEM).map_err(openssl_error(&what))?;
            builder.check_private_key().map_err(openssl_error(&what))?;
            builders.push(builder);
        }
        let mut builders = builders.into_iter();
        let mut first = builders.next().ok_or(TlsError::NoCertificates)?;
        let others: Vec<SslContext> = builders.map(SslContextBuilder::build).collect();
        let chooser = certificates.clone();
        first.set_servername_callback(move |ssl, _alert| {
            let index = chooser.index_for_name(ssl.servername(NameType::HOST_NAME));
            if let Some(context) = index.checked_sub(1).and_then(|i| others.get(i)) {
                ssl.set_ssl_context(context).map_err(|_| SniError::ALERT_FATAL)?;
            }
            Ok(())
        });
        Ok(LegacyAcceptor { context: first.build() })
    }

    /// The server side of a handshake over `tcp` (the caller bounds it in time).
    pub async fn accept(&self, tcp: TcpStream) -> Result<Accepted, Refused> {
        let refused = |error: String| Refused { reason: crate::metrics::handshake_failure_reason(&error), error };
        let ssl = Ssl::new(&self.context).map_err(|e| refused(e.to_string()))?;
        let mut stream = tokio_openssl::SslStream::new(ssl, tcp).map_err(|e| refused(e.to_string()))?;
        Pin::new(&mut stream).accept().await.map_err(|e| refused(e.to_string()))?;
        let alpn_ignored = stream.ssl().ex_data(alpn_ignored_index()).is_some();
        Ok(Accepted { stream: Stream::Legacy(Box::new(stream)), alpn_ignored })
    }
}

/// A server context's settings, certificates aside. Every context of a listener gets them
/// all: after an SNI switch OpenSSL reads some (ALPN) from the new context.
fn server_context(alpn: &[u8], min_version: TlsVersion, policy: AlpnPolicy) -> Result<SslContextBuilder, ErrorStack> {
    let mut builder = SslContextBuilder::new(SslMethod::tls_server())?;
    builder.set_min_proto_version(Some(min_protocol(min_version)))?;
    builder.set_cipher_list(LEGACY_CIPHERS)?;
    // No compression (CRIME), no client-initiated renegotiation (a CPU lever for clients),
    // the server's cipher order (the client's may put export-grade ones first).
    builder
        .set_options(SslOptions::NO_COMPRESSION | SslOptions::NO_RENEGOTIATION | SslOptions::CIPHER_SERVER_PREFERENCE);
    // Resumed sessions may cross SNI contexts; OpenSSL requires an id context then.
    builder.set_session_id_context(b"mailgate")?;
    let ours = alpn.to_vec();
    builder.set_alpn_select_callback(move |ssl, offered| match find_alpn(offered, &ours) {
        Some(chosen) => Ok(chosen),
        None if policy == AlpnPolicy::Lenient => {
            ssl.set_ex_data(alpn_ignored_index(), ());
            Err(AlpnError::NOACK)
        }
        None => Err(AlpnError::ALERT_FATAL),
    });
    Ok(builder)
}

/// The client side towards one legacy upstream host.
pub struct LegacyConnector {
    connector: SslConnector,
    /// The name verified in the upstream's certificate (and sent as SNI unless an address).
    name: String,
    verify: bool,
}

impl std::fmt::Debug for LegacyConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyConnector").field("name", &self.name).field("verify", &self.verify).finish()
    }
}

impl LegacyConnector {
    /// Verification as rustls does it: `ca_file` alone when given, else the system roots;
    /// the host name (or `server_name`) checked unless `insecure_skip_verify`.
    pub fn new(upstream: &UpstreamConfig, host: &str, alpn: &[u8]) -> Result<LegacyConnector, TlsError> {
        let name = upstream.server_name.as_deref().unwrap_or(host).to_string();
        let what = format!("upstream {name}");
        let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(openssl_error(&what))?;
        builder.set_min_proto_version(Some(min_protocol(upstream.min_version()))).map_err(openssl_error(&what))?;
        builder.set_cipher_list(LEGACY_CIPHERS).map_err(openssl_error(&what))?;
        builder.set_alpn_protos(&wire_alpn(alpn)).map_err(openssl_error(&what))?;
        if upstream.insecure_skip_verify {
            builder.set_verify(SslVerifyMode::NONE);
        } else if let Some(path) = &upstream.ca_file {
            let mut store = X509StoreBuilder::new().map_err(openssl_error(&what))?;
            for der in crate::tls::read_chain(path)? {
                let cert = X509::from_der(&der).map_err(openssl_error(&what))?;
                store.add_cert(cert).map_err(openssl_error(&what))?;
            }
            builder.set_cert_store(store.build());
        }
        // Otherwise `SslConnector::builder` has loaded the system's default roots.
        Ok(LegacyConnector { connector: builder.build(), name, verify: !upstream.insecure_skip_verify })
    }

    /// The client side of a handshake over `tcp` (the caller bounds it in time).
    pub async fn connect(&self, tcp: TcpStream) -> io::Result<Stream> {
        let ssl = (self.connector.configure())
            .and_then(|c| c.verify_hostname(self.verify).into_ssl(&self.name))
            .map_err(io::Error::other)?;
        let mut stream = tokio_openssl::SslStream::new(ssl, tcp).map_err(io::Error::other)?;
        Pin::new(&mut stream).connect().await.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Stream::Legacy(Box::new(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_alpn_id_is_found_in_the_clients_list_and_nothing_else_is() {
        let offered = [&wire_alpn(b"http/1.1")[..], &wire_alpn(b"imap"), &wire_alpn(b"pop3")].concat();
        assert_eq!(find_alpn(&offered, b"imap"), Some(&b"imap"[..]));
        assert_eq!(find_alpn(&offered, b"pop3"), Some(&b"pop3"[..]));
        assert_eq!(find_alpn(&wire_alpn(b"http/1.1"), b"imap"), None);
        // A length running past the end is no match, not a panic.
        assert_eq!(find_alpn(b"\x09imap", b"imap"), None);
        assert_eq!(find_alpn(b"", b"imap"), None);
    }
}
