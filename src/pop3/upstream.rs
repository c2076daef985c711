//! Logging in to the upstream POP3 server with the client's credentials.
//!
//! greeting → (CAPA → STLS → handshake) → CAPA → AUTH PLAIN (RFC 5034, initial response)
//! when the upstream offers `SASL PLAIN`, else USER/PASS; or the client's own OAuth
//! response (`AUTH OAUTHBEARER` / `XOAUTH2`), its error challenge relayed to the client.
//! The steps up to CAPA, then QUIT, are the [`probe`] that learns the upstream's OAuth
//! mechanisms. The same safety rules as IMAP:
//! with `tls = "starttls"` nothing but CAPA and STLS precedes the handshake, an upstream
//! without STLS never sees credentials, bytes after the STLS `+OK` abort the login, and the
//! capabilities are learned again under TLS.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::codec::{LineReader, MAX_STATUS_LINE};
use crate::auth::{encode_plain, Credentials};
use crate::cache::LoginProof;
use crate::config::{ForwardClient, TlsMode};
use crate::oauth::{Bearer, SaslClient, MAX_CHALLENGES, NOT_OFFERED};
use crate::origin::Origin;
use crate::stream::Stream;
use crate::upstream::{Upstream, UpstreamError};

pub struct LoggedIn {
    pub stream: Stream,
    /// The upstream accepts pipelined commands (RFC 2449 `PIPELINING`).
    pub pipelining: bool,
    /// Bytes the upstream sent after its `+OK`; they belong to the relay.
    pub leftover: BytesMut,
    /// The upstream accepted the credentials: what cache keys are built from.
    pub proof: LoginProof,
}

pub use crate::upstream::LoginError;

/// Most CAPA lines an upstream may send.
const MAX_CAPA_LINES: usize = 100;

struct Reader {
    stream: Stream,
    buffer: BytesMut,
    lines: LineReader,
    deadline: Instant,
}

impl Reader {
    async fn line(&mut self) -> Result<Vec<u8>, UpstreamError> {
        loop {
            if !self.buffer.is_empty() {
                let (consumed, line) =
                    self.lines.feed(&self.buffer).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                let _ = self.buffer.split_to(consumed);
                if let Some(line) = line {
                    return Ok(line);
                }
            }
            let read = tokio::time::timeout_at(self.deadline, self.stream.read_buf(&mut self.buffer))
                .await
                .map_err(|_| UpstreamError::Timeout("upstream login"))??;
            if read == 0 {
                return Err(UpstreamError::Closed);
            }
        }
    }

    async fn send(&mut self, line: &str) -> Result<(), UpstreamError> {
        tokio::time::timeout_at(self.deadline, async {
            self.stream.write_all(line.as_bytes()).await?;
            self.stream.write_all(b"\r\n").await?;
            self.stream.flush().await
        })
        .await
        .map_err(|_| UpstreamError::Timeout("upstream login"))??;
        Ok(())
    }

    /// CAPA; an upstream without it (RFC 1939 only) has no capabilities.
    async fn capa(&mut self) -> Result<Vec<String>, UpstreamError> {
        self.send("CAPA").await?;
        if !self.line().await?.starts_with(b"+OK") {
            return Ok(Vec::new());
        }
        let mut capabilities = Vec::new();
        loop {
            let line = self.line().await?;
            if line == b"." {
                return Ok(capabilities);
            }
            if capabilities.len() >= MAX_CAPA_LINES {
                return Err(UpstreamError::Protocol("CAPA list too long".into()));
            }
            capabilities.push(String::from_utf8_lossy(&line).to_ascii_uppercase());
        }
    }
}

/// The response code of a `-ERR [CODE] text` line.
pub fn response_code(line: &[u8]) -> Option<String> {
    let rest = line.strip_prefix(b"-ERR [")?;
    let end = rest.iter().position(|&b| b == b']')?;
    Some(String::from_utf8_lossy(&rest[..end]).to_ascii_uppercase())
}

fn has(capabilities: &[String], line: &str) -> bool {
    capabilities.iter().any(|c| c == line || c.starts_with(&format!("{line} ")))
}

/// The SASL mechanisms of the `SASL` capability line.
fn sasl_mechanisms(capabilities: &[String]) -> impl Iterator<Item = &str> {
    capabilities.iter().filter_map(|c| c.strip_prefix("SASL ")).flat_map(|m| m.split(' '))
}

fn offers_sasl_plain(capabilities: &[String]) -> bool {
    sasl_mechanisms(capabilities).any(|m| m == "PLAIN")
}

/// Connects for `origin`'s session (`None`: a probe) up to the point where credentials
/// could be sent: greeting, STLS when configured, CAPA under TLS (whose SASL line is also
/// recorded as the upstream's OAuth offer). The reader, the greeting and the capabilities.
async fn open(upstream: &Upstream, origin: Option<&Origin>) -> Result<(Reader, Vec<u8>, Vec<String>), LoginError> {
    let deadline = Instant::now() + upstream.login_timeout;
    let (stream, host) = upstream.connect(origin).await?;
    let mut reader =
        Reader { stream, buffer: BytesMut::with_capacity(4096), lines: LineReader::new(MAX_STATUS_LINE), deadline };

    let greeting = reader.line().await?;
    if !greeting.starts_with(b"+OK") {
        return Err(UpstreamError::Protocol("unexpected greeting".into()).into());
    }
    if upstream.tls_mode == TlsMode::Starttls {
        let before = reader.capa().await?;
        if !has(&before, "STLS") {
            return Err(UpstreamError::NoStartTls.into());
        }
        reader.send("STLS").await?;
        if !reader.line().await?.starts_with(b"+OK") {
            return Err(UpstreamError::Protocol("STLS refused".into()).into());
        }
        if !reader.buffer.is_empty() {
            return Err(UpstreamError::StartTlsInjection.into());
        }
        let Stream::Plain(tcp) = reader.stream else {
            return Err(UpstreamError::Protocol("STLS on a TLS stream".into()).into());
        };
        reader.stream = upstream.handshake(host, tcp).await?;
        reader.lines.reset();
    }
    let capabilities = reader.capa().await?;
    upstream.oauth.learn(sasl_mechanisms(&capabilities));
    Ok((reader, greeting, capabilities))
}

/// Which OAuth mechanisms `upstream` offers, asked on a connection of mailgate's own
/// (greeting, STLS, CAPA, QUIT) and recorded in `upstream.oauth`. QUIT before login
/// commits nothing (RFC 1939 §6 applies to the TRANSACTION state).
pub async fn probe(upstream: &Upstream) -> Result<(), LoginError> {
    let (mut reader, _, _) = open(upstream, None).await?;
    let _ = reader.send("QUIT").await;
    Ok(())
}

/// Logs `credentials` in at `upstream` for a session from `origin`; `client` answers an
/// OAuth error challenge.
pub async fn login(
    upstream: &Upstream,
    credentials: &Credentials,
    origin: &Origin,
    client: &mut impl SaslClient,
) -> Result<LoggedIn, LoginError> {
    let (mut reader, greeting, capabilities) = open(upstream, Some(origin)).await?;
    if upstream.forward == ForwardClient::Commands {
        // Dovecot offers XCLIENT to the networks it trusts, with `[XCLIENT]` in its
        // greeting; an upstream that does not just sees mailgate's address.
        if greeting.windows(9).any(|w| w == b"[XCLIENT]") || has(&capabilities, "XCLIENT") {
            reader.send(&origin.pop3_xclient()).await?;
            let answer = reader.line().await?;
            if !answer.starts_with(b"+OK") {
                crate::log_budget::warn_limited!("upstream refused the forwarded client identity (XCLIENT)");
            }
        } else {
            tracing::debug!("upstream offers no XCLIENT: the client's address is not forwarded");
        }
    }

    let answer = if let Some(bearer) = &credentials.oauth {
        authenticate_oauth(&mut reader, &capabilities, bearer, client).await?
    } else if offers_sasl_plain(&capabilities) {
        reader.send(&format!("AUTH PLAIN {}", encode_plain(credentials).expose())).await?;
        reader.line().await?
    } else if credentials.authzid.is_some() {
        return Err(LoginError::Rejected { code: Some("AUTH".into()) });
    } else {
        let (user, password) = (&credentials.user, credentials.password.expose());
        // Both must fit a command line, and neither may carry a line break.
        if user.len() + 7 > 255
            || password.len() + 7 > 255
            || user.contains(['\r', '\n'])
            || password.contains(['\r', '\n'])
        {
            return Err(LoginError::Rejected { code: Some("AUTH".into()) });
        }
        reader.send(&format!("USER {user}")).await?;
        let answer = reader.line().await?;
        if answer.starts_with(b"+OK") {
            reader.send(&format!("PASS {password}")).await?;
            reader.line().await?
        } else {
            answer
        }
    };
    if answer.starts_with(b"+OK") {
        Ok(LoggedIn {
            stream: reader.stream,
            pipelining: has(&capabilities, "PIPELINING"),
            leftover: reader.buffer,
            proof: LoginProof::upstream_accepted(),
        })
    } else if answer.starts_with(b"-ERR") {
        Err(LoginError::Rejected { code: response_code(&answer) })
    } else {
        Err(UpstreamError::Protocol("unexpected answer to the login".into()).into())
    }
}

/// `AUTH <mechanism>` with the client's OAuth response unchanged: as an initial response
/// when the command fits a POP3 line (RFC 5034 §4), else after the upstream's `+`. A
/// challenge (RFC 7628 §3.2.3's error) goes to the client and its answer back; the
/// upstream's final answer is returned.
async fn authenticate_oauth(
    reader: &mut Reader,
    capabilities: &[String],
    bearer: &Bearer,
    client: &mut impl SaslClient,
) -> Result<Vec<u8>, LoginError> {
    let name = bearer.mechanism.name();
    if !sasl_mechanisms(capabilities).any(|m| m == name) {
        return Err(LoginError::Rejected { code: Some(NOT_OFFERED.into()) });
    }
    // Base64: ASCII, as the front checked by decoding it.
    let response = String::from_utf8_lossy(bearer.response.expose());
    let response = if response.is_empty() { "=".into() } else { response };
    let mut answer = if "AUTH ".len() + name.len() + 1 + response.len() + 2 <= super::codec::MAX_COMMAND_LINE {
        reader.send(&format!("AUTH {name} {response}")).await?;
        reader.line().await?
    } else {
        reader.send(&format!("AUTH {name}")).await?;
        let line = reader.line().await?;
        if !line.starts_with(b"+ ") && line != b"+" {
            return Ok(line);
        }
        reader.send(&response).await?;
        reader.line().await?
    };
    for _ in 0..MAX_CHALLENGES {
        if !answer.starts_with(b"+ ") && answer != b"+" {
            return Ok(answer);
        }
        let challenge = answer.get(2..).unwrap_or_default();
        let Some(reply) = client.respond(challenge).await else {
            return Err(LoginError::Rejected { code: None });
        };
        if reply.contains(&b'\n') {
            return Err(LoginError::Rejected { code: None });
        }
        reader.send(&String::from_utf8_lossy(&reply)).await?;
        answer = reader.line().await?;
    }
    Err(UpstreamError::Protocol("too many SASL challenges".into()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_capabilities() {
        assert_eq!(response_code(b"-ERR [IN-USE] Mailbox locked"), Some("IN-USE".into()));
        assert_eq!(response_code(b"-ERR [SYS/TEMP] later"), Some("SYS/TEMP".into()));
        assert_eq!(response_code(b"-ERR nope"), None);
        let caps: Vec<String> = ["TOP", "SASL PLAIN LOGIN", "PIPELINING", "STLS"].map(String::from).to_vec();
        assert!(offers_sasl_plain(&caps) && has(&caps, "PIPELINING") && has(&caps, "STLS"));
        assert!(!offers_sasl_plain(&["SASL LOGIN".to_string()]));
    }
}
