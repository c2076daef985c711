//! A scripted fake upstream for fault injection only (disconnects, garbage, slowness,
//! STARTTLS injection, a wrong certificate). Real behaviour is always tested against Dovecot.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig, ServerConnection, StreamOwned};

trait Duplex: Read + Write + Send {}
impl<T: Read + Write + Send> Duplex for T {}

pub struct FakeConn {
    stream: Box<dyn Duplex>,
    pending: Vec<u8>,
    received: Arc<Mutex<Vec<u8>>>,
    /// The plain TCP socket, kept for STARTTLS.
    tcp: Option<TcpStream>,
}

impl FakeConn {
    pub fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
        let _ = self.stream.flush();
    }

    /// The next line from mailgate without CRLF; None at EOF or timeout.
    pub fn line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                return Some(String::from_utf8_lossy(&line).trim_end().to_string());
            }
            let mut buf = [0u8; 8192];
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    self.received.lock().unwrap().extend_from_slice(&buf[..n]);
                    self.pending.extend_from_slice(&buf[..n]);
                }
            }
        }
    }

    /// Nothing received beyond the lines already read, the socket's buffer included
    /// (checked for plaintext connections).
    pub fn pending_is_empty(&mut self) -> bool {
        if !self.pending.is_empty() {
            return false;
        }
        let Some(tcp) = &self.tcp else { return true };
        tcp.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let waiting = matches!(tcp.peek(&mut byte), Ok(n) if n > 0);
        tcp.set_nonblocking(false).unwrap();
        !waiting
    }

    /// Reads a command line and returns its tag.
    pub fn tag(&mut self) -> Option<String> {
        self.line().map(|l| l.split(' ').next().unwrap_or_default().to_string())
    }

    /// Greets, then accepts any login (answering CAPABILITY on the way).
    pub fn accept_login(&mut self) {
        self.send(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN SASL-IR] fake ready\r\n");
        while let Some(line) = self.line() {
            let tag = line.split(' ').next().unwrap_or_default().to_string();
            let upper = line.to_ascii_uppercase();
            if upper.contains(" CAPABILITY") {
                self.send(
                    format!("* CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN SASL-IR\r\n{tag} OK done\r\n").as_bytes(),
                );
            } else if upper.contains(" LOGIN ") || upper.contains(" AUTHENTICATE ") {
                self.send(format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE LITERAL+] Logged in\r\n").as_bytes());
                return;
            } else {
                self.send(format!("{tag} BAD unexpected\r\n").as_bytes());
            }
        }
    }

    /// Switches to TLS as the server side (after answering STARTTLS).
    pub fn upgrade(&mut self, config: Arc<ServerConfig>) {
        let tcp = self.tcp.take().expect("plain connection");
        let conn = ServerConnection::new(config).unwrap();
        self.stream = Box::new(StreamOwned::new(conn, tcp));
        self.pending.clear();
    }
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl FakeUpstream {
    /// Serves every connection with `script` in its own thread; `tls` makes it implicit TLS.
    pub fn start<F>(tls: Option<Arc<ServerConfig>>, script: F) -> FakeUpstream
    where
        F: Fn(&mut FakeConn) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let script = Arc::new(script);
        let (count, bytes, stopping) = (accepted.clone(), received.clone(), stop.clone());
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(tcp) = tcp else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let (script, bytes, tls) = (script.clone(), bytes.clone(), tls.clone());
                std::thread::spawn(move || {
                    let mut conn = match tls {
                        Some(config) => FakeConn {
                            stream: Box::new(StreamOwned::new(ServerConnection::new(config).unwrap(), tcp)),
                            pending: Vec::new(),
                            received: bytes,
                            tcp: None,
                        },
                        None => FakeConn {
                            stream: Box::new(tcp.try_clone().unwrap()),
                            pending: Vec::new(),
                            received: bytes,
                            tcp: Some(tcp),
                        },
                    };
                    script(&mut conn);
                });
            }
        });
        FakeUpstream { addr, accepted, received, stop }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Everything mailgate sent to the fake (decrypted), across connections.
    pub fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).to_string()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// A TLS server config presenting `cert`/`key` (PEM files).
pub fn server_tls(cert: &std::path::Path, key: &std::path::Path) -> Arc<ServerConfig> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).unwrap().map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    Arc::new(config)
}

pub fn io_error_is_eof(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
}
