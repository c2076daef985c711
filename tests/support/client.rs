//! A blocking, raw-bytes IMAP client for tests: exact bytes out, lines in, every read
//! bounded by a timeout. Plain, implicit TLS, or upgraded with STARTTLS.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls::{pki_types::ServerName, ClientConfig, ClientConnection, StreamOwned};

pub const TIMEOUT: Duration = Duration::from_secs(20);

pub enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
    /// Only while upgrading.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection detached")
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
            Conn::Detached => Err(detached()),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
            Conn::Detached => Err(detached()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
            Conn::Detached => Err(detached()),
        }
    }
}

pub struct Client {
    pub conn: Conn,
    /// Bytes received and not yet returned.
    pending: Vec<u8>,
    /// COMPRESS=DEFLATE (RFC 4978) once [`Client::compress`] turned it on.
    deflate: Option<Box<Deflated>>,
}

/// Both directions of a compressed session, and what went over the wire.
pub struct Deflated {
    compress: flate2::Compress,
    decompress: flate2::Decompress,
    /// Bytes read from the wire (compressed) and what they inflated to.
    pub wire_in: u64,
    pub plain_in: u64,
}

/// `wire` inflated (all of it: the server flushes each burst).
fn inflate(deflated: &mut Deflated, wire: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(wire.len() * 4 + 64);
    let mut input = wire;
    loop {
        let before = (deflated.decompress.total_in(), deflated.decompress.total_out());
        deflated.decompress.decompress_vec(input, &mut out, flate2::FlushDecompress::Sync).expect("inflating");
        input = &input[(deflated.decompress.total_in() - before.0) as usize..];
        let produced = deflated.decompress.total_out() - before.1;
        if input.is_empty() && out.len() < out.capacity() {
            break;
        }
        if produced == 0 && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(4096));
    }
    deflated.wire_in += wire.len() as u64;
    deflated.plain_in += out.len() as u64;
    out
}

/// A TCP connection to `addr` from the loopback address `source` (127.x.y.z), so that a
/// test can tell its client apart from mailgate's own connections in the upstream's logs.
pub fn tcp_from(addr: SocketAddr, source: std::net::IpAddr) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().unwrap();
    let tcp = runtime
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source, 0))?;
            tokio::time::timeout(TIMEOUT, socket.connect(addr)).await.map_err(io::Error::other)?
        })
        .expect("connect");
    let tcp = tcp.into_std().unwrap();
    tcp.set_nonblocking(false).unwrap();
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(TIMEOUT)).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp
}

fn tcp(addr: SocketAddr) -> TcpStream {
    let tcp = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(TIMEOUT)).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp
}

/// Completes a TLS handshake over `tcp`; the error is the handshake failure.
pub fn handshake(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
    name: &str,
) -> io::Result<StreamOwned<ClientConnection, TcpStream>> {
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    let conn = ClientConnection::new(config, server_name).map_err(io::Error::other)?;
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// Whether the server closes `tcp` before a TLS handshake completes (how an implicit-TLS
/// port refuses a connection over a limit); a completed handshake is `false`.
pub fn closed_before_tls(tcp: TcpStream, config: Arc<ClientConfig>) -> bool {
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    handshake(tcp, config, "localhost").is_err()
}

impl Client {
    pub fn plain(addr: SocketAddr) -> Client {
        Client::plain_over(tcp(addr))
    }

    /// A plaintext client over a connection the test opened itself.
    pub fn plain_over(tcp: TcpStream) -> Client {
        Client { conn: Conn::Plain(tcp), pending: Vec::new(), deflate: None }
    }

    pub fn tls(addr: SocketAddr, config: Arc<ClientConfig>) -> Client {
        Client::tls_over(tcp(addr), config)
    }

    /// TLS over a connection the test opened itself (from another address, or after a
    /// PROXY header it wrote).
    pub fn tls_over(tcp: TcpStream, config: Arc<ClientConfig>) -> Client {
        let stream = handshake(tcp, config, "localhost").expect("TLS handshake");
        Client { conn: Conn::Tls(Box::new(stream)), pending: Vec::new(), deflate: None }
    }

    /// Sends `STARTTLS` as tag `S` and upgrades; panics if refused.
    pub fn starttls(&mut self, config: Arc<ClientConfig>) {
        self.send(b"S STARTTLS\r\n");
        let lines = self.until_tagged("S");
        assert!(lines.last().unwrap().starts_with("S OK"), "{lines:?}");
        assert!(self.pending.is_empty(), "bytes after STARTTLS OK: {:?}", self.pending);
        self.upgrade(config);
    }

    pub fn upgrade(&mut self, config: Arc<ClientConfig>) {
        let Conn::Plain(tcp) = std::mem::replace(&mut self.conn, Conn::Detached) else {
            panic!("not a plaintext connection")
        };
        self.conn = Conn::Tls(Box::new(handshake(tcp, config, "localhost").expect("STARTTLS handshake")));
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes).expect("send");
    }

    /// Sends what the peer may refuse half-way (it may close while we write).
    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let bytes = match self.deflate.as_mut() {
            // Each send ends with a sync flush, as interactive clients do.
            Some(deflated) => {
                let mut out = Vec::with_capacity(bytes.len() + 64);
                let mut input = bytes;
                loop {
                    out.reserve(input.len() + 1024);
                    let before = deflated.compress.total_in();
                    deflated.compress.compress_vec(input, &mut out, flate2::FlushCompress::Sync).unwrap();
                    input = &input[(deflated.compress.total_in() - before) as usize..];
                    if input.is_empty() && out.len() < out.capacity() {
                        break;
                    }
                }
                out
            }
            None => bytes.to_vec(),
        };
        self.send_raw(&bytes)
    }

    /// Sends bytes as they are, compression or not (a test's corrupt DEFLATE data).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.conn.write_all(bytes)?;
        self.conn.flush()
    }

    /// Turns COMPRESS=DEFLATE on, both ways, from the next byte: call it after reading
    /// the tagged OK of `COMPRESS DEFLATE` (bytes already read after it are compressed).
    pub fn compress(&mut self) {
        let mut deflated = Box::new(Deflated {
            compress: flate2::Compress::new(flate2::Compression::default(), false),
            decompress: flate2::Decompress::new(false),
            wire_in: 0,
            plain_in: 0,
        });
        let early = std::mem::take(&mut self.pending);
        self.pending = inflate(&mut deflated, &early);
        self.deflate = Some(deflated);
    }

    /// Compressed and inflated byte counts so far (`None` without compression).
    pub fn deflated(&self) -> Option<&Deflated> {
        self.deflate.as_deref()
    }

    /// Reads more bytes; Ok(0) at EOF (with compression: bytes read from the wire, which
    /// may inflate to nothing yet).
    fn fill(&mut self) -> io::Result<usize> {
        let mut buf = [0u8; 16384];
        let n = self.conn.read(&mut buf)?;
        match self.deflate.as_mut() {
            Some(deflated) => {
                let plain = inflate(deflated, &buf[..n]);
                self.pending.extend_from_slice(&plain);
            }
            None => self.pending.extend_from_slice(&buf[..n]),
        }
        Ok(n)
    }

    /// The next line without CRLF, or None at EOF.
    pub fn line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                let text = String::from_utf8_lossy(&line);
                return Some(text.trim_end_matches(['\r', '\n']).to_string());
            }
            match self.fill() {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset || e.kind() == io::ErrorKind::UnexpectedEof => {
                    return None
                }
                Err(e) => panic!("read: {e} (pending {:?})", String::from_utf8_lossy(&self.pending)),
            }
        }
    }

    /// The next line with its line ending, raw; panics at EOF.
    pub fn raw_line(&mut self) -> Vec<u8> {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                return self.pending.drain(..=i).collect();
            }
            assert!(self.fill().expect("read") > 0, "EOF inside a line");
        }
    }

    /// Complete responses (lines with their literals, raw bytes) up to and including the
    /// tagged completion of `tag`.
    pub fn responses(&mut self, tag: &str) -> Vec<Vec<u8>> {
        let mut responses = Vec::new();
        loop {
            let mut response = Vec::new();
            loop {
                let line = self.raw_line();
                response.extend_from_slice(&line);
                let text = String::from_utf8_lossy(&line);
                let literal = text
                    .trim_end()
                    .strip_suffix('}')
                    .and_then(|l| l.rsplit_once('{'))
                    .and_then(|(_, n)| n.trim_end_matches('+').parse::<usize>().ok());
                match literal {
                    Some(n) => response.extend_from_slice(&self.bytes(n)),
                    None => break,
                }
            }
            let done = response.starts_with(format!("{tag} ").as_bytes());
            responses.push(response);
            if done {
                return responses;
            }
        }
    }

    /// Exactly `n` bytes (a literal).
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        while self.pending.len() < n {
            assert!(self.fill().expect("read") > 0, "EOF inside a literal");
        }
        self.pending.drain(..n).collect()
    }

    /// Lines up to and including the tagged completion of `tag`; panics at EOF.
    pub fn until_tagged(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().unwrap_or_else(|| panic!("EOF before {tag} completed; got {lines:?}"));
            let done = line.starts_with(&format!("{tag} "));
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    /// Sends a command and returns its response lines.
    pub fn command(&mut self, tag: &str, command: &str) -> Vec<String> {
        self.send(format!("{tag} {command}\r\n").as_bytes());
        self.until_tagged(tag)
    }

    /// LOGIN with the password as a LITERAL+ literal (any bytes pass); panics unless OK.
    pub fn login(&mut self, (user, password): (&str, &str)) {
        self.send(format!("L LOGIN {user} {{{}+}}\r\n", password.len()).as_bytes());
        self.send(password.as_bytes());
        self.send(b"\r\n");
        let lines = self.until_tagged("L");
        assert!(lines.last().unwrap().starts_with("L OK"), "{lines:?}");
    }

    /// Everything until the peer closes (bounded by the read timeout).
    pub fn rest(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some(line) = self.line() {
            lines.push(line);
        }
        lines
    }

    /// Every byte until the peer closes (bounded by the read timeout).
    pub fn rest_bytes(&mut self) -> Vec<u8> {
        while let Ok(1..) = self.fill() {}
        std::mem::take(&mut self.pending)
    }

    /// True if the peer closed without sending anything more.
    pub fn closed(&mut self) -> bool {
        self.pending.is_empty() && matches!(self.fill(), Ok(0) | Err(_)) && self.pending.is_empty()
    }
}
