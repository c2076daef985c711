//! A blocking connection for the differential tester: exact bytes out, IMAP responses
//! (lines with their literals) and POP3 lines in, every operation bounded by a timeout and
//! every failure an error rather than a panic (a peer closing or stalling is a finding).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls::ClientConfig;

use crate::support::client::{handshake, Conn};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for any single read or write.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// A literal announced larger than this is taken as garbage.
const MAX_LITERAL: usize = 64 << 20;

/// Where to connect: plain TCP, or implicit TLS trusting `tls`'s roots (name `localhost`).
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub tls: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", if self.tls.is_some() { "tls://" } else { "tcp://" }, self.addr)
    }
}

pub struct Wire {
    conn: Conn,
    pending: Vec<u8>,
}

impl Wire {
    pub fn connect(endpoint: &Endpoint) -> io::Result<Wire> {
        let tcp = TcpStream::connect_timeout(&endpoint.addr, CONNECT_TIMEOUT)?;
        tcp.set_read_timeout(Some(IO_TIMEOUT))?;
        tcp.set_write_timeout(Some(IO_TIMEOUT))?;
        tcp.set_nodelay(true)?;
        let conn = match &endpoint.tls {
            Some(config) => Conn::Tls(Box::new(handshake(tcp, config.clone(), "localhost")?)),
            None => Conn::Plain(tcp),
        };
        Ok(Wire { conn, pending: Vec::new() })
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.conn.write_all(bytes)?;
        self.conn.flush()
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 32 * 1024];
        match self.conn.read(&mut buf)? {
            0 => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed")),
            n => {
                let before = self.pending.len();
                self.pending.extend_from_slice(&buf[..n]);
                scrub_clientbug(&mut self.pending, before);
                Ok(())
            }
        }
    }

    /// The next line with its line ending.
    pub fn line(&mut self) -> io::Result<Vec<u8>> {
        let mut scanned = 0;
        loop {
            if let Some(i) = self.pending[scanned..].iter().position(|&b| b == b'\n') {
                return Ok(self.pending.drain(..=scanned + i).collect());
            }
            scanned = self.pending.len();
            self.fill()?;
        }
    }

    /// Exactly `n` bytes.
    pub fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.pending.len() < n {
            self.fill()?;
        }
        Ok(self.pending.drain(..n).collect())
    }

    /// One IMAP response: a line and, for every literal it announces, the literal and the
    /// line that follows it.
    pub fn imap_response(&mut self) -> io::Result<Vec<u8>> {
        let mut response = Vec::new();
        loop {
            let line = self.line()?;
            response.extend_from_slice(&line);
            match literal_announced(&line) {
                Some(n) if n > MAX_LITERAL => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, format!("literal of {n} bytes")))
                }
                Some(n) => response.extend_from_slice(&self.take(n)?),
                None => return Ok(response),
            }
        }
    }
}

/// Drops Dovecot's pipelining warning from `pending`, looking at what arrived since `before`. Dovecot sends
/// it when it parses a command that arrived while another one is answering, and can
/// write it in the middle of that answer's literal (seen: `BODY[]<0> {10}\r\n* BAD
/// [CLIENTBUG] ...\r\nReturn-Pat`). Where it lands depends on when each command
/// reached Dovecot and how fast its answers are read, so it differs between the two
/// sessions for reasons that are Dovecot's; the comparison ignores these lines anyway.
fn scrub_clientbug(pending: &mut Vec<u8>, before: usize) {
    const WARNING: &[u8] = b"* BAD [CLIENTBUG] Command pipelining results in ambiguity.\r\n";
    let mut from = before.saturating_sub(WARNING.len() - 1);
    while let Some(i) = memchr::memmem::find(&pending[from..], WARNING) {
        pending.drain(from + i..from + i + WARNING.len());
        from += i;
    }
}

#[test]
fn a_pipelining_warning_is_dropped_even_inside_a_literal_and_across_reads() {
    let warning = b"* BAD [CLIENTBUG] Command pipelining results in ambiguity.\r\n";
    let mut pending = b"* 18 FETCH (BODY[]<0> {10}\r\n".to_vec();
    let before = pending.len();
    pending.extend_from_slice(&warning[..20]);
    scrub_clientbug(&mut pending, before);
    let before = pending.len();
    pending.extend_from_slice(&warning[20..]);
    pending.extend_from_slice(b"Return-Pat)\r\n");
    pending.extend_from_slice(warning);
    scrub_clientbug(&mut pending, before);
    assert_eq!(pending, b"* 18 FETCH (BODY[]<0> {10}\r\nReturn-Pat)\r\n");
}

/// `n` for a line ending in `{n}` (or `{n+}`, `~{n}`) before its CRLF.
pub fn literal_announced(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let digits = &inner[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || digits.len() > 12 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Bytes as readable text: printable ASCII as is, CR LF as `\r\n`, the rest `\xNN`.
pub fn show(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\\' => out.push('\\'),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// [`show`], cut to about `max` characters with the total length noted.
pub fn show_cut(bytes: &[u8], max: usize) -> String {
    if bytes.len() <= max {
        return show(bytes);
    }
    let head = max * 2 / 3;
    let tail = max - head;
    format!(
        "{}…[{} bytes, fnv {:016x}]…{}",
        show(&bytes[..head]),
        bytes.len(),
        fnv(bytes),
        show(&bytes[bytes.len() - tail..])
    )
}

/// FNV-1a, to tell long values apart in reports.
pub fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_found_at_line_ends_only() {
        assert_eq!(literal_announced(b"* 1 FETCH (BODY[] {12}\r\n"), Some(12));
        assert_eq!(literal_announced(b"a APPEND x {3+}\r\n"), Some(3));
        assert_eq!(literal_announced(b"* 1 FETCH (BINARY[1] ~{7}\r\n"), Some(7));
        assert_eq!(literal_announced(b"* OK {x}\r\n"), None);
        assert_eq!(literal_announced(b"* OK {}\r\n"), None);
        assert_eq!(literal_announced(b"* OK {12} done\r\n"), None);
    }
}
