//! Asking an upstream session for its account's INBOX quota, after the login and before
//! the client's `OK` (`[insight] quota`), and what the client is told about it.
//!
//! The command carries a tag of mailgate's own and its whole answer (`* QUOTAROOT`,
//! `* QUOTA`, the tagged completion) is read here and never relayed: the client's view
//! stays the upstream's but for the `* OK [ALERT]` line before its login's `OK`. Any other
//! response the upstream sends meanwhile (an unsolicited `* OK`, a `BYE`) is kept, byte
//! for byte, in the session's `leftover`, which the relay writes first.
//!
//! An upstream that announces neither `QUOTA` (RFC 2087) nor `QUOTA=` (RFC 9208) is never
//! asked. An upstream that does not answer within [`ASK_TIMEOUT`] leaves the session in a
//! state mailgate cannot read (the answer may still come, into the client's view), so
//! the session is dropped and the login answered `NO [UNAVAILABLE]`: a server that takes
//! five seconds over a quota has its sessions in trouble anyway.

use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::framing::{strip_eol, Event, Framer};
use super::response::{self, Kind, Status};
use super::upstream::LoggedIn;
use crate::quota::{self, Policy, Usage};
use crate::service::Service;

/// How long the upstream has to answer.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(5);
const TAG: &[u8] = b"MGQ1";
const MAX_LINE: usize = 64 << 10;
const MAX_LITERAL: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("upstream quota answer timed out")]
    Timeout,
    #[error("upstream closed during the quota question")]
    Closed,
    #[error("upstream quota answer unreadable: {0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Whether the upstream's post-login capabilities announce a quota extension.
pub fn announces_quota(capabilities: &[String]) -> bool {
    capabilities
        .iter()
        .any(|c| c.eq_ignore_ascii_case("QUOTA") || c.get(..6).is_some_and(|head| head.eq_ignore_ascii_case("QUOTA=")))
}

/// The `ALERT` text for `account`'s login, when its quota is due to be asked, the
/// upstream answers, and the account is over `quota_warn_at` and was not told within
/// `quota_alert_every`. `Err`: the session is not to be used.
pub async fn check(service: &Service, account: &str, session: &mut LoggedIn) -> Result<Option<String>, AskError> {
    let insight = &service.config.insight;
    if !insight.quota || !announces_quota(&session.capabilities) {
        return Ok(None);
    }
    let policy = Policy {
        check_every: insight.quota_check_every.0,
        warn_at: insight.quota_warn_at,
        alert_every: insight.quota_alert_every.0,
    };
    let metrics = &service.metrics;
    if !metrics.quota.due(account, &policy, SystemTime::now()) {
        return Ok(None);
    }
    let usage = match ask(session, ASK_TIMEOUT).await {
        Ok(Some(usage)) => usage,
        Ok(None) => {
            metrics.quota_checks.with_label_values(&["none"]).inc();
            return Ok(None);
        }
        Err(e) => {
            metrics.quota_checks.with_label_values(&["failed"]).inc();
            crate::log_budget::warn_limited!(error = %e, "upstream quota question failed: login refused");
            return Err(e);
        }
    };
    metrics.quota_checks.with_label_values(&["read"]).inc();
    metrics.quota_usage.observe(usage.share());
    if !metrics.quota.record(account, usage, &policy, SystemTime::now()) {
        return Ok(None);
    }
    metrics.quota_alerts.inc();
    tracing::info!(share = usage.share(), "quota alert sent");
    Ok(Some(quota::alert_text(&insight.quota_alert_text, usage)))
}

/// Sends `GETQUOTAROOT INBOX` on `session` and reads its answer: the STORAGE usage, or
/// `None` when the upstream says nothing readable (a `NO`, no STORAGE resource).
pub async fn ask(session: &mut LoggedIn, within: Duration) -> Result<Option<Usage>, AskError> {
    tokio::time::timeout(within, exchange(session)).await.map_err(|_| AskError::Timeout)?
}

async fn exchange(session: &mut LoggedIn) -> Result<Option<Usage>, AskError> {
    let mut command = TAG.to_vec();
    command.extend_from_slice(b" GETQUOTAROOT INBOX\r\n");
    session.stream.write_all(&command).await?;
    session.stream.flush().await?;

    let mut buffer = std::mem::take(&mut session.leftover);
    let mut framer = Framer::new(MAX_LINE);
    // Responses not ours, as sent: they go to the client after all.
    let mut kept = BytesMut::new();
    // The response being read, whole (`raw`) and without its literals (`head`).
    let (mut raw, mut head) = (Vec::new(), Vec::new());
    let mut quota_lines: Vec<Vec<u8>> = Vec::new();
    loop {
        if buffer.is_empty() && session.stream.read_buf(&mut buffer).await? == 0 {
            return Err(AskError::Closed);
        }
        if let Some(announce) = framer.pending_literal() {
            if announce.len > MAX_LITERAL {
                return Err(AskError::Protocol("oversized literal".into()));
            }
            framer.accept_literal();
        }
        let step = framer.feed(&buffer).map_err(|e| AskError::Protocol(e.to_string()))?;
        let taken = buffer.split_to(step.consumed);
        raw.extend_from_slice(&taken);
        if !framer.in_literal() && !matches!(step.event, Some(Event::LiteralEnd)) {
            head.extend_from_slice(&taken);
        }
        let Some(Event::Line(line)) = step.event else { continue };
        if line.announce.is_some() {
            continue;
        }
        let text = strip_eol(&head);
        match response::kind(text) {
            Kind::Tagged { tag, rest } if tag == TAG => {
                let status = response::status(rest).map(|s| s.status);
                // What came after the completion belongs to the relay, after what was kept.
                kept.extend_from_slice(&buffer);
                session.leftover = kept;
                if status != Some(Status::Ok) {
                    return Ok(None);
                }
                return Ok(quota::parse_answer(quota_lines.iter().map(Vec::as_slice)));
            }
            _ if quota::is_quota_response(text) => quota_lines.push(text.to_vec()),
            _ => kept.extend_from_slice(&raw),
        }
        raw.clear();
        head.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ask` on a loopback connection whose other end plays the upstream's `script` after
    /// reading the question, then closes; `leftover`: what the login left unread.
    async fn ask_scripted(leftover: &[u8], script: &'static [u8]) -> (Result<Option<Usage>, AskError>, Vec<u8>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut question = vec![0; 25];
            tcp.read_exact(&mut question).await.unwrap();
            assert_eq!(question, b"MGQ1 GETQUOTAROOT INBOX\r\n");
            // Then the upstream hangs up.
            tcp.write_all(script).await.unwrap();
        });
        let stream = crate::stream::Stream::Plain(tokio::net::TcpStream::connect(addr).await.unwrap());
        let mut session = LoggedIn {
            stream,
            capabilities: vec!["QUOTA".into()],
            leftover: BytesMut::from(leftover),
            proof: crate::cache::LoginProof::upstream_accepted(),
            reuse: None,
        };
        let answer = ask(&mut session, Duration::from_secs(2)).await;
        upstream.await.unwrap();
        (answer, session.leftover.to_vec())
    }

    #[tokio::test]
    async fn the_answer_is_taken_and_everything_else_kept_for_the_relay() {
        let script = b"* QUOTAROOT INBOX \"\"\r\n* 3 EXISTS\r\n* QUOTA \"\" (STORAGE 95 100)\r\n\
                       * OK {5}\r\nab\r\nc\r\nMGQ1 OK Getquotaroot completed.\r\n* BYE later\r\n";
        let (answer, leftover) = ask_scripted(b"* OK [ALERT] before\r\n", script).await;
        assert_eq!(answer.unwrap(), Some(Usage { used_kib: 95, limit_kib: 100 }));
        assert_eq!(leftover, b"* OK [ALERT] before\r\n* 3 EXISTS\r\n* OK {5}\r\nab\r\nc\r\n* BYE later\r\n");
    }

    #[tokio::test]
    async fn a_refusal_is_no_quota_and_silence_is_an_error() {
        let (answer, leftover) = ask_scripted(b"", b"MGQ1 NO Quota not supported\r\n").await;
        assert_eq!(answer.unwrap(), None);
        assert!(leftover.is_empty());
        let (answer, _) = ask_scripted(b"", b"* QUOTAROOT INBOX \"\"\r\n").await;
        assert!(matches!(answer, Err(AskError::Closed)), "{answer:?}");
    }

    #[test]
    fn quota_is_announced_by_either_rfc() {
        let caps = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(announces_quota(&caps(&["IMAP4rev1", "QUOTA"])));
        assert!(announces_quota(&caps(&["IMAP4rev1", "quota=res-storage"])));
        assert!(!announces_quota(&caps(&["IMAP4rev1", "QUOTAX", "IDLE"])));
    }
}
