//! A TCP connection that may have been upgraded to TLS (implicit or by STARTTLS), on either
//! side of mailgate. The protocol code is written once against this type.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    /// TLS through OpenSSL, either side: legacy listeners and upstreams (TLS 1.0 and 1.1
    /// allowed, see `legacy_tls`), whatever version was negotiated.
    Legacy(Box<tokio_openssl::SslStream<TcpStream>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// Closes our side after a final message, then reads (and drops) what the client is
    /// still sending for a moment: closing a socket with unread input resets the
    /// connection, and the reset can destroy that last message before the client reads it.
    pub async fn linger_close(&mut self) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            let _ = self.shutdown().await;
            // On the heap: inline, the buffer would be part of every session's future.
            let mut sink = vec![0u8; 4096];
            let mut budget = 1usize << 20;
            while let Ok(n @ 1..) = self.read(&mut sink).await {
                budget = budget.saturating_sub(n);
                if budget == 0 {
                    break;
                }
            }
        })
        .await;
    }

    /// The negotiated TLS version as OpenSSL names it (`TLSv1`, `TLSv1.1`, `TLSv1.2`,
    /// `TLSv1.3`): a metric label, a log field, a census key. `None` on a plain connection.
    pub fn tls_version(&self) -> Option<&'static str> {
        use openssl::ssl::SslVersion;
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(tls) => Some(match tls.get_ref().1.protocol_version() {
                Some(tokio_rustls::rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                Some(tokio_rustls::rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "TLS",
            }),
            Stream::Legacy(tls) => Some(match tls.ssl().version2() {
                Some(SslVersion::TLS1_3) => "TLSv1.3",
                Some(SslVersion::TLS1_2) => "TLSv1.2",
                Some(SslVersion::TLS1_1) => "TLSv1.1",
                Some(SslVersion::TLS1) => "TLSv1",
                _ => "TLS",
            }),
        }
    }

    /// What an upstream may be told about the client's TLS (PROXY v2 TLVs).
    pub fn tls_facts(&self) -> Option<crate::proxy_header::TlsFacts> {
        let version = self.tls_version()?.to_string();
        let (alpn, server_name) = match self {
            Stream::Plain(_) => return None,
            Stream::Tls(tls) => {
                let server_name = match tls.as_ref() {
                    tokio_rustls::TlsStream::Server(server) => server.get_ref().1.server_name().map(str::to_string),
                    tokio_rustls::TlsStream::Client(_) => None,
                };
                (tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec), server_name)
            }
            Stream::Legacy(tls) => {
                let ssl = tls.ssl();
                let server_name = (ssl.is_server())
                    .then(|| ssl.servername(openssl::ssl::NameType::HOST_NAME).map(str::to_string))
                    .flatten();
                (ssl.selected_alpn_protocol().map(<[u8]>::to_vec), server_name)
            }
        };
        Some(crate::proxy_header::TlsFacts { version, alpn, server_name })
    }

    /// The negotiated TLS version and cipher suite, for logs.
    pub fn tls_summary(&self) -> Option<String> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(tls) => {
                let (_, conn) = tls.get_ref();
                let version = conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
                let suite = conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
                Some(format!("{version} {suite}"))
            }
            Stream::Legacy(tls) => {
                let ssl = tls.ssl();
                let suite = ssl.current_cipher().map(|c| c.name()).unwrap_or_default();
                Some(format!("{} {suite} (OpenSSL)", ssl.version_str()))
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Legacy(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Legacy(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Legacy(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Legacy(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Legacy(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Legacy(s) => s.is_write_vectored(),
        }
    }
}
