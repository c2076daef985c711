//! Logging in to the upstream IMAP server with the client's credentials.
//!
//! The dialogue: greeting → (STARTTLS → handshake → CAPABILITY again) → LOGIN or
//! AUTHENTICATE PLAIN, or the client's own OAuth response (OAUTHBEARER, XOAUTH2) with its
//! error challenge relayed to the client. The same first steps, then LOGOUT, are the
//! [`probe`] that learns which OAuth mechanisms the upstream offers. Rules that keep
//! credentials safe:
//! - with `tls = "starttls"`, nothing but CAPABILITY and STARTTLS is sent before the
//!   handshake; an upstream that does not offer STARTTLS never sees the credentials;
//! - any byte the upstream sent after its STARTTLS `OK` aborts the login (the injection of
//!   CVE-2011-0411 class); capabilities learned before TLS are thrown away;
//! - a `PREAUTH` greeting means the upstream would let us in without checking the client's
//!   password, so mailgate refuses to use it rather than admit an unverified client.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::framing::{strip_eol, Event, Framer};
use super::response::{self, has_capability, Kind, Status};
use crate::auth::{encode_plain, Credentials};
use crate::cache::LoginProof;
use crate::config::{ForwardClient, TlsMode};
use crate::oauth::{Bearer, SaslClient, MAX_CHALLENGES, NOT_OFFERED};
use crate::origin::Origin;
use crate::stream::Stream;
use crate::upstream::{Upstream, UpstreamError};

/// An upstream session that accepted the client's credentials.
pub struct LoggedIn {
    pub stream: Stream,
    /// Post-login capabilities as the upstream announced them.
    pub capabilities: Vec<String>,
    /// Bytes the upstream sent after its tagged OK; they belong to the relay.
    pub leftover: BytesMut,
    /// The upstream accepted the credentials: what cache keys are built from.
    pub proof: LoginProof,
    /// Where the session may be parked when its client logs out (`[imap] reuse_for`).
    pub reuse: Option<Box<super::reuse::Ticket>>,
    /// When the upstream accepted the credentials (a reused session keeps its login's time:
    /// reuse never outlives `reuse_for` past the upstream's last check of the password).
    pub logged_in: tokio::time::Instant,
}

pub use crate::upstream::LoginError;

const MAX_LINE: usize = 64 << 10;
const MAX_LITERAL: u64 = 1 << 20;

/// Response lines of the login dialogue; literals in them are skipped.
struct Reader {
    stream: Stream,
    buffer: BytesMut,
    framer: Framer,
    deadline: Instant,
}

impl Reader {
    async fn fill(&mut self) -> Result<(), UpstreamError> {
        let read = tokio::time::timeout_at(self.deadline, self.stream.read_buf(&mut self.buffer))
            .await
            .map_err(|_| UpstreamError::Timeout("upstream login"))??;
        if read == 0 {
            return Err(UpstreamError::Closed);
        }
        Ok(())
    }

    /// The next response line (without line ending).
    async fn line(&mut self) -> Result<Vec<u8>, UpstreamError> {
        let mut line = Vec::new();
        loop {
            if self.buffer.is_empty() {
                self.fill().await?;
            }
            if let Some(announce) = self.framer.pending_literal() {
                if announce.len > MAX_LITERAL {
                    return Err(UpstreamError::Protocol("oversized literal during login".into()));
                }
                self.framer.accept_literal();
            }
            let step = self.framer.feed(&self.buffer).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
            let taken = self.buffer.split_to(step.consumed);
            if !self.framer.in_literal() && !matches!(step.event, Some(Event::LiteralEnd)) {
                line.extend_from_slice(&taken);
            }
            if let Some(Event::Line(l)) = step.event {
                if l.announce.is_none() {
                    return Ok(strip_eol(&line).to_vec());
                }
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), UpstreamError> {
        tokio::time::timeout_at(self.deadline, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        .map_err(|_| UpstreamError::Timeout("upstream login"))??;
        Ok(())
    }

    /// Reads until the tagged completion of `tag`, collecting capabilities on the way.
    async fn complete(
        &mut self,
        tag: &str,
        capabilities: &mut Option<Vec<String>>,
    ) -> Result<(Status, Option<String>), UpstreamError> {
        loop {
            let line = self.line().await?;
            if let Some(caps) = response::capabilities_in(&line) {
                *capabilities = Some(caps);
            }
            match response::kind(&line) {
                Kind::Tagged { tag: t, rest } if t == tag.as_bytes() => {
                    let status = response::status(rest)
                        .ok_or_else(|| UpstreamError::Protocol(format!("bad completion for {tag}")))?;
                    return Ok((status.status, status.code.map(|(c, _)| c)));
                }
                Kind::Untagged(rest) if response::status(rest).is_some_and(|s| s.status == Status::Bye) => {
                    return Err(UpstreamError::Closed);
                }
                _ => {}
            }
        }
    }

    async fn capability(&mut self) -> Result<Vec<String>, UpstreamError> {
        self.send(b"M0 CAPABILITY\r\n").await?;
        let mut caps = None;
        match self.complete("M0", &mut caps).await? {
            (Status::Ok, _) => caps.ok_or_else(|| UpstreamError::Protocol("CAPABILITY without capabilities".into())),
            (status, _) => Err(UpstreamError::Protocol(format!("CAPABILITY answered {status:?}"))),
        }
    }
}

/// Tells the upstream who the client is with `ID` (Dovecot's `x-originating-ip` and
/// friends), before the login. An upstream that does not trust mailgate just records them
/// as the client's ID; one without ID is logged in without them. The command is returned,
/// not sent: it goes out in one write with the login's first line (pipelined, RFC 9051
/// §5.5: the upstream takes it first), which saves the login a round trip.
fn forward_client(capabilities: &[String], origin: &Origin) -> Option<Vec<u8>> {
    if !has_capability(capabilities, "ID") {
        tracing::debug!("upstream has no ID capability: the client's address is not forwarded");
        return None;
    }
    Some(format!("M0 ID {}\r\n", origin.imap_id()).into_bytes())
}

/// Sends the login's first line after a pipelined `ID` (if any), then takes the ID's
/// answer, which comes first.
async fn send_first(reader: &mut Reader, id: Option<Vec<u8>>, first: &[u8]) -> Result<(), UpstreamError> {
    let Some(mut bytes) = id else { return reader.send(first).await };
    bytes.extend_from_slice(first);
    reader.send(&bytes).await?;
    let mut ignored = None;
    let (status, _) = reader.complete("M0", &mut ignored).await?;
    if status != Status::Ok {
        crate::log_budget::warn_limited!(?status, "upstream refused the forwarded client identity (ID)");
    }
    Ok(())
}

/// Connects for `origin`'s session (`None`: a probe) up to the point where credentials
/// could be sent: greeting, STARTTLS when configured, the capabilities under TLS (also
/// recorded as the upstream's OAuth offer).
async fn open(upstream: &Upstream, origin: Option<&Origin>) -> Result<(Reader, Vec<String>), LoginError> {
    let deadline = Instant::now() + upstream.login_timeout;
    let (stream, host) = upstream.connect(origin).await?;
    let mut reader = Reader { stream, buffer: BytesMut::with_capacity(4096), framer: Framer::new(MAX_LINE), deadline };

    let greeting = reader.line().await?;
    let mut capabilities = match response::kind(&greeting) {
        Kind::Untagged(rest) => match response::status(rest).map(|s| s.status) {
            Some(Status::Ok) => response::capabilities_in(&greeting),
            Some(Status::Preauth) => {
                return Err(UpstreamError::Protocol(
                    "upstream greets with PREAUTH: it would not verify the client's password".into(),
                )
                .into())
            }
            Some(Status::Bye) => return Err(UpstreamError::Closed.into()),
            _ => return Err(UpstreamError::Protocol("unexpected greeting".into()).into()),
        },
        _ => return Err(UpstreamError::Protocol("unexpected greeting".into()).into()),
    };

    if upstream.tls_mode == TlsMode::Starttls {
        let before = match capabilities.take() {
            Some(caps) => caps,
            None => reader.capability().await?,
        };
        if !has_capability(&before, "STARTTLS") {
            return Err(UpstreamError::NoStartTls.into());
        }
        reader.send(b"M1 STARTTLS\r\n").await?;
        let mut ignored = None;
        let (status, _) = reader.complete("M1", &mut ignored).await?;
        if status != Status::Ok {
            return Err(UpstreamError::Protocol(format!("STARTTLS answered {status:?}")).into());
        }
        if !reader.buffer.is_empty() {
            return Err(UpstreamError::StartTlsInjection.into());
        }
        let Stream::Plain(tcp) = reader.stream else {
            return Err(UpstreamError::Protocol("STARTTLS on a TLS stream".into()).into());
        };
        reader.stream = upstream.handshake(host, tcp).await?;
        reader.framer.reset();
    }

    let capabilities = match capabilities {
        Some(caps) => caps,
        None => reader.capability().await?,
    };
    // Capabilities are case-insensitive (RFC 9051 §7.2.2): `auth=xoauth2` counts too.
    let mechanisms =
        capabilities.iter().filter_map(|c| c.get(..5).filter(|p| p.eq_ignore_ascii_case("AUTH=")).map(|_| &c[5..]));
    upstream.oauth.learn(mechanisms);
    Ok((reader, capabilities))
}

/// Which OAuth mechanisms `upstream` offers, asked on a connection of mailgate's own
/// (greeting, STARTTLS, CAPABILITY, LOGOUT) and recorded in `upstream.oauth`.
pub async fn probe(upstream: &Upstream) -> Result<(), LoginError> {
    let (mut reader, _) = open(upstream, None).await?;
    // A courtesy: the answer does not matter.
    let _ = reader.send(b"M9 LOGOUT\r\n").await;
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
    let (mut reader, capabilities) = open(upstream, Some(origin)).await?;
    let id = if upstream.forward == ForwardClient::Commands { forward_client(&capabilities, origin) } else { None };
    let mut after = None;
    let (status, code) = if let Some(bearer) = &credentials.oauth {
        authenticate_oauth(&mut reader, id, &capabilities, bearer, client, &mut after).await?
    } else if has_capability(&capabilities, "AUTH=PLAIN") {
        authenticate_plain(&mut reader, id, &capabilities, credentials, &mut after).await?
    } else if credentials.authzid.is_some() {
        return Err(LoginError::Rejected { code: Some("AUTHORIZATIONFAILED".into()) });
    } else if has_capability(&capabilities, "LOGINDISABLED") {
        return Err(UpstreamError::Protocol("upstream has LOGINDISABLED and no AUTH=PLAIN".into()).into());
    } else {
        login_command(&mut reader, id, &capabilities, credentials, &mut after).await?
    };
    match status {
        Status::Ok => {}
        Status::No => return Err(LoginError::Rejected { code }),
        other => return Err(UpstreamError::Protocol(format!("login answered {other:?}")).into()),
    }
    let capabilities = match after {
        Some(caps) => caps,
        None => reader.capability().await?,
    };
    Ok(LoggedIn {
        stream: reader.stream,
        capabilities,
        leftover: reader.buffer,
        proof: LoginProof::upstream_accepted(),
        reuse: None,
        logged_in: tokio::time::Instant::now(),
    })
}

async fn authenticate_plain(
    reader: &mut Reader,
    id: Option<Vec<u8>>,
    capabilities: &[String],
    credentials: &Credentials,
    after: &mut Option<Vec<String>>,
) -> Result<(Status, Option<String>), UpstreamError> {
    let payload = encode_plain(credentials);
    if has_capability(capabilities, "SASL-IR") {
        send_first(reader, id, format!("M2 AUTHENTICATE PLAIN {}\r\n", payload.expose()).as_bytes()).await?;
    } else {
        send_first(reader, id, b"M2 AUTHENTICATE PLAIN\r\n").await?;
        let line = reader.line().await?;
        if response::kind(&line) != Kind::Continuation {
            return tagged_without_continuation(&line, "M2", after);
        }
        reader.send(format!("{}\r\n", payload.expose()).as_bytes()).await?;
    }
    reader.complete("M2", after).await
}

/// The client's OAuth response, unchanged, under the client's mechanism; a challenge the
/// upstream sends (the error of RFC 7628 §3.2.3) goes to the client and its answer back.
/// A failure the client sees through is a refusal, whatever the status: an upstream that
/// does not offer the mechanism (`CANNOT`), a client gone or cancelling.
async fn authenticate_oauth(
    reader: &mut Reader,
    id: Option<Vec<u8>>,
    capabilities: &[String],
    bearer: &Bearer,
    client: &mut impl SaslClient,
    after: &mut Option<Vec<String>>,
) -> Result<(Status, Option<String>), LoginError> {
    let name = bearer.mechanism.name();
    if !has_capability(capabilities, &format!("AUTH={name}")) {
        return Err(LoginError::Rejected { code: Some(NOT_OFFERED.into()) });
    }
    let response = bearer.response.expose();
    if has_capability(capabilities, "SASL-IR") {
        let response = if response.is_empty() { &b"="[..] } else { response };
        let mut line = format!("M2 AUTHENTICATE {name} ").into_bytes();
        line.extend_from_slice(response);
        line.extend_from_slice(b"\r\n");
        send_first(reader, id, &line).await?;
    } else {
        send_first(reader, id, format!("M2 AUTHENTICATE {name}\r\n").as_bytes()).await?;
        let line = reader.line().await?;
        if response::kind(&line) != Kind::Continuation {
            return Ok(tagged_without_continuation(&line, "M2", after)?);
        }
        reader.send(&[response.as_slice(), b"\r\n"].concat()).await?;
    }
    let mut challenges = 0;
    loop {
        let line = reader.line().await?;
        if let Some(caps) = response::capabilities_in(&line) {
            *after = Some(caps);
        }
        match response::kind(&line) {
            Kind::Continuation if challenges < MAX_CHALLENGES => {
                challenges += 1;
                let challenge = line[1..].strip_prefix(b" ").unwrap_or(&line[1..]);
                let Some(answer) = client.respond(challenge).await else {
                    return Err(LoginError::Rejected { code: None });
                };
                reader.send(&[answer.as_slice(), b"\r\n"].concat()).await?;
            }
            Kind::Tagged { tag, rest } if tag == b"M2" => {
                let status = response::status(rest).ok_or_else(|| UpstreamError::Protocol("bad completion".into()))?;
                let code = status.code.map(|(c, _)| c);
                return match status.status {
                    Status::Ok | Status::No => Ok((status.status, code)),
                    // A client's `*` cancels with BAD: a failed login all the same.
                    _ => Err(LoginError::Rejected { code }),
                };
            }
            Kind::Untagged(rest) if response::status(rest).is_some_and(|s| s.status == Status::Bye) => {
                return Err(UpstreamError::Closed.into());
            }
            Kind::Continuation => return Err(UpstreamError::Protocol("too many SASL challenges".into()).into()),
            _ => {}
        }
    }
}

async fn login_command(
    reader: &mut Reader,
    mut id: Option<Vec<u8>>,
    capabilities: &[String],
    credentials: &Credentials,
    after: &mut Option<Vec<String>>,
) -> Result<(Status, Option<String>), UpstreamError> {
    let non_sync = has_capability(capabilities, "LITERAL+");
    let mut pieces = vec![b"M2 LOGIN ".to_vec()];
    for (i, value) in [credentials.user.as_bytes(), credentials.password.expose().as_bytes()].into_iter().enumerate() {
        if i == 1 {
            pieces.last_mut().expect("pieces is never empty").push(b' ');
        }
        match quote(value) {
            Some(quoted) => pieces.last_mut().expect("pieces is never empty").extend_from_slice(&quoted),
            None => {
                let last = pieces.last_mut().expect("pieces is never empty");
                last.extend_from_slice(
                    format!("{{{}{}}}\r\n", value.len(), if non_sync { "+" } else { "" }).as_bytes(),
                );
                pieces.push(value.to_vec());
            }
        }
    }
    pieces.last_mut().expect("pieces is never empty").extend_from_slice(b"\r\n");
    // With synchronizing literals, each piece after the first waits for the upstream's `+`.
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 && !non_sync {
            let line = reader.line().await?;
            if response::kind(&line) != Kind::Continuation {
                return tagged_without_continuation(&line, "M2", after);
            }
        }
        if i == 0 {
            send_first(reader, id.take(), piece).await?;
        } else {
            reader.send(piece).await?;
        }
    }
    reader.complete("M2", after).await
}

/// The upstream answered with a completion where a continuation was expected.
fn tagged_without_continuation(
    line: &[u8],
    tag: &str,
    after: &mut Option<Vec<String>>,
) -> Result<(Status, Option<String>), UpstreamError> {
    if let Some(caps) = response::capabilities_in(line) {
        *after = Some(caps);
    }
    match response::kind(line) {
        Kind::Tagged { tag: t, rest } if t == tag.as_bytes() => {
            let status = response::status(rest).ok_or_else(|| UpstreamError::Protocol("bad completion".into()))?;
            Ok((status.status, status.code.map(|(c, _)| c)))
        }
        _ => Err(UpstreamError::Protocol("expected a continuation".into())),
    }
}

/// A quoted string when the value can be one (7-bit text without CR/LF), else `None`
/// (send a literal).
pub fn quote(value: &[u8]) -> Option<Vec<u8>> {
    if value.iter().any(|&b| b >= 0x80 || b == b'\r' || b == b'\n' || b == 0) {
        return None;
    }
    let mut out = Vec::with_capacity(value.len() + 2);
    out.push(b'"');
    for &b in value {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_or_defers_to_a_literal() {
        assert_eq!(quote(b"alice").unwrap(), b"\"alice\"");
        assert_eq!(quote(br#"p"w\"#).unwrap(), br#""p\"w\\""#);
        assert_eq!(quote("pässword".as_bytes()), None);
        assert_eq!(quote(b"a\r\nb"), None);
    }
}
