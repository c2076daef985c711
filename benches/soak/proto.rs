//! An async IMAP/POP3 client for thousands of concurrent sessions: TLS from a chosen
//! loopback source address, whole responses (lines and literals) read under a timeout,
//! and every way a session can end named, so that a soak can count them.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{pki_types::ServerName, ClientConfig};
use tokio_rustls::TlsConnector;

/// How a session (or one step of it) failed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fail {
    /// TCP connect refused or failed.
    Connect(String),
    /// The TLS handshake failed.
    Tls(String),
    /// `* BYE` (greeting or untagged), then the connection closed: a clean end.
    Bye(String),
    /// A tagged NO/BAD or a POP3 -ERR: a clean refusal.
    No(String),
    /// The peer closed between two responses without a word (waiting for `phase`): a
    /// clean close.
    Closed(&'static str),
    /// The peer closed inside a line or a literal (`phase`): a truncated answer.
    Truncated(&'static str),
    /// Connection reset.
    Reset,
    /// No answer in time (`phase`).
    Timeout(&'static str),
    /// Data differs from Dovecot's.
    Mismatch(String),
    /// Anything else (an unexpected answer, an I/O error).
    Other(String),
}

impl Fail {
    /// The outcome's name in reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Fail::Connect(_) => "connect-error",
            Fail::Tls(_) => "tls-error",
            Fail::Bye(_) => "bye",
            Fail::No(_) => "no/-err",
            Fail::Closed(_) => "closed",
            Fail::Truncated(_) => "TRUNCATED",
            Fail::Reset => "RESET",
            Fail::Timeout(_) => "TIMEOUT",
            Fail::Mismatch(_) => "MISMATCH",
            Fail::Other(_) => "OTHER",
        }
    }
}

pub type Result<T> = std::result::Result<T, Fail>;

fn io_fail(e: io::Error) -> Fail {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Fail::Reset,
        _ => Fail::Other(e.to_string()),
    }
}

pub struct Conn {
    io: TlsStream<TcpStream>,
    pending: Vec<u8>,
    start: usize,
    /// Limit for each wait for the peer.
    pub timeout: Duration,
    /// An untagged BYE was seen.
    bye: Option<String>,
    /// This end's address, to find the session in mailgate's log.
    pub local: SocketAddr,
}

/// Timings of a connection's start.
pub struct Opened {
    pub conn: Conn,
    /// From the start of connect() to the greeting's last byte.
    pub to_greeting: Duration,
    pub greeting: String,
}

/// Connects from `source` to `addr`, completes TLS and reads the greeting line.
pub async fn open(addr: SocketAddr, source: IpAddr, tls: &Arc<ClientConfig>, timeout: Duration) -> Result<Opened> {
    let began = Instant::now();
    let socket = TcpSocket::new_v4().map_err(|e| Fail::Connect(e.to_string()))?;
    socket.bind(SocketAddr::new(source, 0)).map_err(|e| Fail::Connect(format!("bind {source}: {e}")))?;
    let tcp = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| Fail::Timeout("connect"))?
        .map_err(|e| Fail::Connect(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().map_err(|e| Fail::Connect(e.to_string()))?;
    let name = ServerName::try_from("localhost").unwrap();
    let io = tokio::time::timeout(timeout, TlsConnector::from(tls.clone()).connect(name, tcp))
        .await
        .map_err(|_| Fail::Timeout("tls"))?
        .map_err(|e| Fail::Tls(e.to_string()))?;
    let mut conn = Conn { io, pending: Vec::new(), start: 0, timeout, bye: None, local };
    let greeting = conn.line("greeting").await?;
    let greeting = String::from_utf8_lossy(&greeting).into_owned();
    if greeting.starts_with("* BYE") {
        return Err(Fail::Bye(greeting));
    }
    if greeting.starts_with("-ERR") {
        return Err(Fail::No(greeting));
    }
    if !(greeting.starts_with("* OK") || greeting.starts_with("+OK")) {
        return Err(Fail::Other(format!("greeting {greeting:?}")));
    }
    Ok(Opened { conn, to_greeting: began.elapsed(), greeting })
}

impl Conn {
    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        let write = async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(self.timeout, write).await {
            Err(_) => Err(Fail::Timeout("write")),
            Ok(Err(e)) => Err(io_fail(e)),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Reads more; Ok(false) at the end of the stream.
    async fn fill(&mut self, phase: &'static str) -> Result<bool> {
        if self.start > 0 {
            self.pending.drain(..self.start);
            self.start = 0;
        }
        self.pending.reserve(16 << 10);
        match tokio::time::timeout(self.timeout, self.io.read_buf(&mut self.pending)).await {
            Err(_) => Err(Fail::Timeout(phase)),
            Ok(Ok(0)) => Ok(false),
            Ok(Ok(_)) => Ok(true),
            // A peer that closes without TLS close_notify: the end of the stream all the same.
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
            Ok(Err(e)) => Err(io_fail(e)),
        }
    }

    /// The end of the stream where a line was expected: a clean close (after a BYE, a BYE)
    /// unless part of a line was read.
    fn eof(&self, phase: &'static str) -> Fail {
        if self.start < self.pending.len() {
            Fail::Truncated(phase)
        } else if let Some(bye) = &self.bye {
            Fail::Bye(bye.clone())
        } else {
            Fail::Closed(phase)
        }
    }

    /// The next line with its CRLF.
    pub async fn line(&mut self, phase: &'static str) -> Result<Vec<u8>> {
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.pending[self.start..]) {
                let line = self.pending[self.start..self.start + i + 1].to_vec();
                self.start += i + 1;
                return Ok(line);
            }
            if !self.fill(phase).await? {
                return Err(self.eof(phase));
            }
        }
    }

    /// Exactly `n` bytes; the end of the stream before them is a truncation.
    pub async fn exact(&mut self, n: usize, phase: &'static str) -> Result<&[u8]> {
        while self.pending.len() - self.start < n {
            if !self.fill(phase).await? {
                return Err(Fail::Truncated(phase));
            }
        }
        let at = self.start;
        self.start += n;
        Ok(&self.pending[at..at + n])
    }

    /// One IMAP response: its text (literals replaced by `{}`) and its literals' hashes and
    /// sizes.
    pub async fn response(&mut self, phase: &'static str) -> Result<Response> {
        let mut response = Response::default();
        loop {
            let line = match self.line(phase).await {
                Ok(line) => line,
                // A response left half-way is truncated even if it ended at a line end.
                Err(Fail::Closed(_) | Fail::Bye(_)) if !response.text.is_empty() => return Err(Fail::Truncated(phase)),
                Err(e) => return Err(e),
            };
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\r', '\n']);
            let literal = text
                .strip_suffix('}')
                .and_then(|l| l.rsplit_once('{'))
                .and_then(|(head, n)| Some((head.len(), n.trim_end_matches('+').parse::<usize>().ok()?)));
            match literal {
                Some((head, n)) => {
                    response.text.push_str(&text[..head]);
                    response.text.push_str("{}");
                    let data = self.exact(n, phase).await?;
                    response.literals.push((n, hash(data)));
                }
                None => {
                    response.text.push_str(text);
                    if response.text.starts_with("* BYE") {
                        self.bye = Some(response.text.clone());
                    }
                    return Ok(response);
                }
            }
        }
    }

    /// Sends `tag command` and reads the responses up to its tagged completion; a NO or
    /// BAD is `Fail::No`.
    pub async fn command(&mut self, tag: &str, command: &str, phase: &'static str) -> Result<Vec<Response>> {
        self.send(format!("{tag} {command}\r\n").as_bytes()).await?;
        self.until_tagged(tag, phase).await
    }

    pub async fn until_tagged(&mut self, tag: &str, phase: &'static str) -> Result<Vec<Response>> {
        let mut responses = Vec::new();
        loop {
            let response = self.response(phase).await?;
            if let Some(status) = response.text.strip_prefix(tag).and_then(|t| t.strip_prefix(' ')) {
                if status.starts_with("OK") {
                    return Ok(responses);
                }
                return Err(Fail::No(response.text));
            }
            responses.push(response);
        }
    }

    /// A POP3 single-line answer; -ERR is `Fail::No`.
    pub async fn pop3(&mut self, command: &str, phase: &'static str) -> Result<String> {
        self.send(format!("{command}\r\n").as_bytes()).await?;
        self.pop3_status(phase).await
    }

    pub async fn pop3_status(&mut self, phase: &'static str) -> Result<String> {
        let line = self.line(phase).await?;
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if text.starts_with("+OK") {
            Ok(text)
        } else if text.starts_with("-ERR") {
            Err(Fail::No(text))
        } else {
            Err(Fail::Other(format!("POP3 answer {text:?}")))
        }
    }

    /// The rest of a POP3 multi-line answer, up to `.`: its size and hash (dot-stuffing
    /// and line ends included, the terminator not).
    pub async fn pop3_multiline(&mut self, phase: &'static str) -> Result<(usize, u64)> {
        let mut hasher = Fnv::default();
        let mut size = 0;
        loop {
            let line = match self.line(phase).await {
                Ok(line) => line,
                Err(Fail::Closed(_) | Fail::Bye(_)) => return Err(Fail::Truncated(phase)),
                Err(e) => return Err(e),
            };
            if line == b".\r\n" {
                return Ok((size, hasher.0));
            }
            size += line.len();
            hasher.write(&line);
        }
    }

    /// Waits for the peer to close (after LOGOUT/QUIT); anything but the end is an error.
    pub async fn expect_close(&mut self) -> Result<()> {
        match self.line("close").await {
            Err(Fail::Closed(_) | Fail::Bye(_)) => Ok(()),
            Err(e) => Err(e),
            Ok(line) => Err(Fail::Other(format!("after logout: {:?}", String::from_utf8_lossy(&line)))),
        }
    }
}

/// One IMAP response: `text` with `{}` where each literal was.
#[derive(Default, Debug)]
pub struct Response {
    pub text: String,
    /// (size, hash) of each literal.
    pub literals: Vec<(usize, u64)>,
}

impl Response {
    /// The number after `name ` in the text (`UID`, `RFC822.SIZE`), as an item name.
    pub fn number(&self, name: &str) -> Option<u64> {
        let mut from = 0;
        while let Some(at) = self.text[from..].find(name) {
            let at = from + at;
            let before = self.text[..at].chars().last();
            let rest = &self.text[at + name.len()..];
            if matches!(before, Some('(' | ' ')) && rest.starts_with(' ') {
                let digits: String = rest[1..].chars().take_while(char::is_ascii_digit).collect();
                return digits.parse().ok();
            }
            from = at + name.len();
        }
        None
    }
}

/// FNV-1a, 64 bits: enough to tell two bodies apart in a soak.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

pub fn hash(bytes: &[u8]) -> u64 {
    let mut h = Fnv::default();
    h.write(bytes);
    h.0
}

/// A small deterministic generator for picking users and messages.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}
