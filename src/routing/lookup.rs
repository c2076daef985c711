//! The routing lookup service's client: one HTTP/1.1 `GET` over plain TCP, answered with a
//! small JSON object. Deliberately minimal (no TLS, no redirects, no keep-alive): the
//! service sits next to mailgate on a private network, the way nginx's `auth_http` and
//! Dovecot's HTTP passdb lookups are deployed.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most a lookup answer may weigh.
pub(crate) const MAX_RESPONSE: usize = 64 * 1024;

/// An `http://host:port/path?query` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub target: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| format!("`{url}`: only http:// URLs are supported"))?;
        let (authority, target) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                (host, port.parse::<u16>().map_err(|_| format!("`{url}`: bad port"))?)
            }
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || target.contains(['\r', '\n', ' ']) {
            return Err(format!("`{url}`: not a usable URL"));
        }
        Ok(HttpUrl { host: host.to_string(), port, target: target.to_string() })
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `GET url` with `query` appended: the status and the body.
pub async fn get(url: &HttpUrl, query: &[(&str, &str)], timeout: Duration) -> Result<(u16, Vec<u8>), String> {
    tokio::time::timeout(timeout, async {
        let mut tcp = TcpStream::connect((url.host.as_str(), url.port)).await.map_err(|e| e.to_string())?;
        let separator = if url.target.contains('?') { '&' } else { '?' };
        let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
        let request = format!(
            "GET {}{separator}{} HTTP/1.1\r\nHost: {}:{}\r\nAccept: application/json\r\nConnection: close\r\nUser-Agent: mailgate\r\n\r\n",
            url.target,
            query.join("&"),
            url.host,
            url.port
        );
        tcp.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            response.extend_from_slice(&chunk[..n]);
            if response.len() > MAX_RESPONSE {
                return Err("answer too large".to_string());
            }
            if let Some(done) = complete(&response) {
                return done;
            }
        }
        complete(&response).unwrap_or_else(|| parse(&response, true))
    })
    .await
    .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// The response once it is complete by its own framing (`Content-Length` or chunked).
pub(crate) fn complete(response: &[u8]) -> Option<Result<(u16, Vec<u8>), String>> {
    let end = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
    let body = &response[end + 4..];
    if let Some(length) = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        return (body.len() >= length).then(|| parse(response, false));
    }
    if header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return dechunk(body).map(|_| parse(response, false));
    }
    None
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == name).then(|| value.trim())
    })
}

/// A chunked body decoded, once the last chunk has arrived.
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        // A chunk larger than any whole answer may be never completes (and cannot overflow).
        if size > MAX_RESPONSE || body.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// Status and body of a whole response; `closed`: the body runs to the end of the stream.
pub(crate) fn parse(response: &[u8], closed: bool) -> Result<(u16, Vec<u8>), String> {
    let end = response.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no HTTP header")?;
    let head = String::from_utf8_lossy(&response[..end]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| head.starts_with("HTTP/1."))
        .ok_or("not an HTTP response")?;
    let lower = head.to_ascii_lowercase();
    let body = &response[end + 4..];
    let body = if let Some(length) = header(&lower, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.get(..length).ok_or("answer cut short")?.to_vec()
    } else if header(&lower, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(body).ok_or("chunked answer cut short")?
    } else if closed {
        body.to_vec()
    } else {
        return Err("answer without a length".into());
    };
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            HttpUrl::parse("http://127.0.0.1:8080/route?site=a").unwrap(),
            HttpUrl { host: "127.0.0.1".into(), port: 8080, target: "/route?site=a".into() }
        );
        assert_eq!(HttpUrl::parse("http://lookup.internal").unwrap().port, 80);
        assert_eq!(HttpUrl::parse("http://[::1]:81/x").unwrap().host, "::1");
        assert!(HttpUrl::parse("https://a/").is_err());
        assert!(HttpUrl::parse("http://:80/").is_err());
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("bob@example.com"), "bob%40example.com");
        assert_eq!(encode("a b&c=d"), "a%20b%26c%3Dd");
    }

    #[test]
    fn responses_framed_every_way() {
        let sized = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(complete(sized), Some(Ok((200, b"hello".to_vec()))));
        assert_eq!(complete(&sized[..sized.len() - 1]), None);
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n";
        assert_eq!(complete(chunked), Some(Ok((200, b"hello".to_vec()))));
        assert_eq!(complete(&chunked[..20]), None);
        let closed = b"HTTP/1.0 404 Not Found\r\n\r\nnothing";
        assert_eq!(complete(closed), None);
        assert_eq!(parse(closed, true), Ok((404, b"nothing".to_vec())));
        assert!(parse(b"SSH-2.0-OpenSSH\r\n\r\n", true).is_err());
        let huge = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nx";
        assert_eq!(complete(huge), None);
        assert!(parse(huge, true).is_err());
    }
}
