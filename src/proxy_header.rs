//! The HAProxy PROXY protocol, versions 1 and 2, without I/O: decoding the header a load
//! balancer puts in front of a client's connection, and encoding the v2 header mailgate
//! sends to an upstream so that it sees the real client.
//!
//! Decoding is incremental and never asks for a byte past the header: [`parse`] says how
//! many more bytes it needs at least, so the caller can read exactly that many. A client's
//! first bytes (a TLS ClientHello right behind the header) stay in the socket for the TLS
//! handshake.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::network::Network;

/// Who may put a PROXY header in front of a connection, and how long it has to (a
/// listener's `proxy_protocol` settings).
pub struct ProxyPolicy {
    pub trusted: Vec<Network>,
    pub timeout: Duration,
}

/// The v2 signature.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included (the specification's figure).
const V1_MAX: usize = 107;
/// The longest v2 header accepted: addresses and TLVs of any real balancer fit easily.
const V2_MAX: usize = 16 + 1024;

const PP2_TYPE_ALPN: u8 = 0x01;
const PP2_TYPE_AUTHORITY: u8 = 0x02;
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_CLIENT_SSL: u8 = 0x01;

/// What a header says about the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Header {
    /// The balancer's own connection (a health check), or a client whose address the
    /// balancer does not know (v1 `UNKNOWN`, v2 unspecified family): use the socket's
    /// addresses.
    Local,
    /// A relayed client: its address and the address it connected to.
    Proxied { source: SocketAddr, destination: SocketAddr },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    #[error("PROXY header too long")]
    TooLong,
}

/// The result of looking at the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// At least this many more bytes are needed.
    Incomplete(usize),
    /// The header and its length in bytes.
    Done(Header, usize),
}

/// Decodes a v1 or v2 header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    // Both versions are at least 15 bytes long, so the first 12 can always be read at once.
    if buf.len() < SIGNATURE.len() {
        let v2 = SIGNATURE.starts_with(buf);
        let v1 = b"PROXY ".starts_with(&buf[..buf.len().min(6)]);
        return if v1 || v2 { Ok(Parsed::Incomplete(SIGNATURE.len() - buf.len())) } else { Err(ProxyError::NotProxy) };
    }
    if buf.starts_with(&SIGNATURE) {
        parse_v2(buf)
    } else if buf.starts_with(b"PROXY ") {
        parse_v1(buf)
    } else {
        Err(ProxyError::NotProxy)
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    // The line ends within V1_MAX bytes or never: the answer must not depend on how much
    // of what follows is already in `buf`.
    let Some(end) = buf[..buf.len().min(V1_MAX)].windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX { Err(ProxyError::TooLong) } else { Ok(Parsed::Incomplete(1)) };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError::Malformed("v1 header is not text"))?;
    let fields: Vec<&str> = line.split(' ').collect();
    let header = match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Header::Local,
        ["PROXY", family @ ("TCP4" | "TCP6"), source, destination, source_port, destination_port] => {
            let ip = |text: &str| -> Result<IpAddr, ProxyError> {
                let ip: IpAddr = text.parse().map_err(|_| ProxyError::Malformed("v1 address"))?;
                if ip.is_ipv4() != (*family == "TCP4") {
                    return Err(ProxyError::Malformed("v1 address does not match its family"));
                }
                Ok(ip)
            };
            let port = |text: &str| -> Result<u16, ProxyError> {
                // Decimal without leading zeros, as the specification writes them.
                if text.len() > 1 && text.starts_with('0') {
                    return Err(ProxyError::Malformed("v1 port"));
                }
                text.parse().map_err(|_| ProxyError::Malformed("v1 port"))
            };
            Header::Proxied {
                source: SocketAddr::new(ip(source)?, port(source_port)?),
                destination: SocketAddr::new(ip(destination)?, port(destination_port)?),
            }
        }
        _ => return Err(ProxyError::Malformed("v1 fields")),
    };
    Ok(Parsed::Done(header, end + 2))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete(16 - buf.len()));
    }
    let total = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if total > V2_MAX {
        return Err(ProxyError::TooLong);
    }
    if buf.len() < total {
        return Ok(Parsed::Incomplete(total - buf.len()));
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err(ProxyError::Malformed("v2 version"));
    }
    let body = &buf[16..total];
    let header = match command {
        0 => Header::Local,
        1 => match buf[13] {
            // TCP over IPv4 or IPv6; anything else (UDP, UNIX, unspecified) carries no
            // address mailgate can use.
            0x11 if body.len() >= 12 => {
                let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(body[at], body[at + 1], body[at + 2], body[at + 3]));
                let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
                Header::Proxied {
                    source: SocketAddr::new(ip(0), port(8)),
                    destination: SocketAddr::new(ip(4), port(10)),
                }
            }
            0x21 if body.len() >= 36 => {
                let ip = |at: usize| {
                    let octets: [u8; 16] = body[at..at + 16].try_into().expect("16 bytes");
                    IpAddr::V6(Ipv6Addr::from(octets))
                };
                let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
                Header::Proxied {
                    source: SocketAddr::new(ip(0), port(32)),
                    destination: SocketAddr::new(ip(16), port(34)),
                }
            }
            0x11 | 0x21 => return Err(ProxyError::Malformed("v2 addresses too short")),
            _ => Header::Local,
        },
        _ => return Err(ProxyError::Malformed("v2 command")),
    };
    Ok(Parsed::Done(header, total))
}

/// What mailgate tells an upstream about the client's TLS.
#[derive(Clone, Debug, Default)]
pub struct TlsFacts {
    /// `TLSv1.3`, `TLSv1.2`.
    pub version: String,
    /// The negotiated ALPN protocol, if any.
    pub alpn: Option<Vec<u8>>,
    /// The server name the client asked for (SNI), if any.
    pub server_name: Option<String>,
}

/// A v2 `PROXY` header for a TCP connection from `source` to `destination`, with the SSL
/// TLV (and the version sub-TLV) and the ALPN and authority TLVs when the client used TLS.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr, tls: Option<&TlsFacts>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&SIGNATURE);
    out.push(0x21);
    let (family, addresses) = match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            let mut a = Vec::with_capacity(12);
            a.extend_from_slice(&s.ip().octets());
            a.extend_from_slice(&d.ip().octets());
            a.extend_from_slice(&s.port().to_be_bytes());
            a.extend_from_slice(&d.port().to_be_bytes());
            (0x11, a)
        }
        // Mixed families: both as IPv6 (IPv4-mapped), the only common form.
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            let mut a = Vec::with_capacity(36);
            a.extend_from_slice(&v6(s).octets());
            a.extend_from_slice(&v6(d).octets());
            a.extend_from_slice(&s.port().to_be_bytes());
            a.extend_from_slice(&d.port().to_be_bytes());
            (0x21, a)
        }
    };
    out.push(family);
    let mut body = addresses;
    if let Some(tls) = tls {
        if let Some(alpn) = &tls.alpn {
            tlv(&mut body, PP2_TYPE_ALPN, alpn);
        }
        if let Some(name) = &tls.server_name {
            tlv(&mut body, PP2_TYPE_AUTHORITY, name.as_bytes());
        }
        // client: PP2_CLIENT_SSL; verify: non-zero, no client certificate was verified.
        let mut ssl = vec![PP2_CLIENT_SSL, 0, 0, 0, 1];
        tlv(&mut ssl, PP2_SUBTYPE_SSL_VERSION, tls.version.as_bytes());
        tlv(&mut body, PP2_TYPE_SSL, &ssl);
    }
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// A v2 `LOCAL` header: the connection is mailgate's own (a health check), not a client's.
pub fn encode_v2_local() -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    out
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found while writing the `proxy_header` fuzz harness (its property: the whole input
    /// and the bytes read as asked give one answer): a v1 line longer than 107 bytes was
    /// refused when read as asked but accepted from a buffer holding all of it.
    #[test]
    fn a_v1_line_longer_than_the_maximum_is_refused_whatever_the_buffer_holds() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.extend_from_slice(&[b'x'; 120]);
        line.extend_from_slice(b"\r\n");
        assert_eq!(parse(&line), Err(ProxyError::TooLong));
        assert_eq!(parse(&line[..V1_MAX]), Err(ProxyError::TooLong));
        let mut fits = b"PROXY UNKNOWN ".to_vec();
        fits.resize(V1_MAX - 2, b'x');
        fits.extend_from_slice(b"\r\nclient bytes");
        assert_eq!(parse(&fits), Ok(Parsed::Done(Header::Local, V1_MAX)));
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// Feeds `bytes` the way the listener reads them: exactly what the parser asks for.
    fn feed(bytes: &[u8]) -> Result<(Header, usize), ProxyError> {
        let mut have = 0;
        loop {
            match parse(&bytes[..have])? {
                Parsed::Done(header, len) => return Ok((header, len)),
                Parsed::Incomplete(more) => {
                    assert!(have + more <= bytes.len(), "asked for bytes past the header");
                    have += more;
                }
            }
        }
    }

    #[test]
    fn v1_headers() {
        let line = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 993\r\n";
        let mut stream = line.to_vec();
        stream.extend_from_slice(b"\x16\x03\x01 ClientHello");
        assert_eq!(
            feed(&stream),
            Ok((
                Header::Proxied { source: addr("192.0.2.7:56324"), destination: addr("198.51.100.1:993") },
                line.len()
            ))
        );
        assert_eq!(
            feed(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 143\r\n").unwrap().0,
            Header::Proxied { source: addr("[2001:db8::1]:4000"), destination: addr("[2001:db8::2]:143") }
        );
        assert_eq!(feed(b"PROXY UNKNOWN\r\n").unwrap(), (Header::Local, 15));
        assert_eq!(feed(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").unwrap().0, Header::Local);
        for bad in [
            &b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n"[..],
            b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 0993 2\r\n",
            b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
        ] {
            assert!(matches!(feed(bad), Err(ProxyError::Malformed(_))), "{}", String::from_utf8_lossy(bad));
        }
        let endless = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(feed(&endless), Err(ProxyError::TooLong));
    }

    #[test]
    fn anything_else_is_refused_from_the_first_bytes() {
        assert_eq!(parse(b"a1 LOGIN"), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00"), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"PROX"), Ok(Parsed::Incomplete(8)));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::NotProxy));
    }

    #[test]
    fn v2_round_trips_with_tlvs_and_leaves_the_client_bytes_alone() {
        let tls = TlsFacts {
            version: "TLSv1.3".into(),
            alpn: Some(b"imap".to_vec()),
            server_name: Some("mail.example.net".into()),
        };
        for (source, destination) in [
            (addr("192.0.2.7:56324"), addr("198.51.100.1:993")),
            (addr("[2001:db8::7]:1000"), addr("[2001:db8::1]:995")),
        ] {
            let header = encode_v2(source, destination, Some(&tls));
            let mut stream = header.clone();
            stream.extend_from_slice(b"\x16\x03\x01");
            assert_eq!(feed(&stream), Ok((Header::Proxied { source, destination }, header.len())));
        }
        let header = encode_v2(addr("192.0.2.7:1"), addr("198.51.100.1:2"), Some(&tls));
        // Signature, PROXY, TCP4, length, 12 address bytes, then the TLVs.
        assert_eq!(&header[12..14], &[0x21, 0x11]);
        let tlvs = &header[28..];
        assert_eq!(&tlvs[..7], b"\x01\x00\x04imap");
        assert_eq!(tlvs[7], PP2_TYPE_AUTHORITY);
        let ssl = &tlvs[7 + 3 + 16..];
        assert_eq!(ssl[0], PP2_TYPE_SSL);
        assert_eq!(&ssl[3..8], &[PP2_CLIENT_SSL, 0, 0, 0, 1]);
        assert_eq!(&ssl[8..], b"\x21\x00\x07TLSv1.3");
        // Mixed families go as IPv6.
        let mixed = encode_v2(addr("192.0.2.7:1"), addr("[2001:db8::1]:2"), None);
        assert_eq!(mixed[13], 0x21);
        assert_eq!(
            feed(&mixed).unwrap().0,
            Header::Proxied { source: addr("[::ffff:192.0.2.7]:1"), destination: addr("[2001:db8::1]:2") }
        );
    }

    #[test]
    fn random_input_never_panics_nor_reads_past_its_bound() {
        // A deterministic generator; inputs start like a header often, so that the deeper
        // paths are reached, not only the first-bytes refusal.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..50_000 {
            let mut bytes = match next() % 3 {
                0 => SIGNATURE.to_vec(),
                1 => b"PROXY ".to_vec(),
                _ => Vec::new(),
            };
            let extra = (next() % 120) as usize;
            bytes.extend((0..extra).map(|_| match next() % 4 {
                0 => b"0123456789.: TCP46\r\n"[(next() % 20) as usize],
                _ => next() as u8,
            }));
            let mut have = 0;
            loop {
                match parse(&bytes[..have]) {
                    Ok(Parsed::Done(_, len)) => {
                        assert!(len <= have);
                        break;
                    }
                    Ok(Parsed::Incomplete(more)) => {
                        assert!(more > 0 && have + more <= V2_MAX.max(V1_MAX));
                        if have + more > bytes.len() {
                            break;
                        }
                        have += more;
                    }
                    Err(_) => break,
                }
            }
        }
    }

    #[test]
    fn v2_local_unspecified_and_broken_headers() {
        assert_eq!(feed(&encode_v2_local()), Ok((Header::Local, 16)));
        let unix = [&SIGNATURE[..], &[0x21, 0x31, 0x00, 0x04], b"abcd"].concat();
        assert_eq!(feed(&unix).unwrap().0, Header::Local);
        let short = [&SIGNATURE[..], &[0x21, 0x11, 0x00, 0x04], b"abcd"].concat();
        assert!(matches!(feed(&short), Err(ProxyError::Malformed(_))));
        let version = [&SIGNATURE[..], &[0x31, 0x11, 0x00, 0x00]].concat();
        assert!(matches!(feed(&version), Err(ProxyError::Malformed(_))));
        let huge = [&SIGNATURE[..], &[0x21, 0x11, 0xff, 0xff]].concat();
        assert_eq!(feed(&huge), Err(ProxyError::TooLong));
    }
}
