//! Asking an upstream session for its account's INBOX quota (`[insight] quota`), and what
//! the client is told about it.
//!
//! The question never delays or fails a login: the front answers the login as always, and
//! the relay (`imap::relay`) writes `<own tag> GETQUOTAROOT INBOX` upstream as the first
//! command of the session, in flight like any other but mailgate's own. The client's
//! commands follow it at once (pipelined behind it, nothing waits). The upstream answers in
//! order, so while the question is the oldest command in flight its `* QUOTAROOT` and
//! `* QUOTA` lines and its tagged completion are absorbed ([`Question::take`]); every
//! other response is relayed. At the completion the reading is recorded and, when due, the
//! client gets `* OK [ALERT] ...` in its place, at a response boundary.
//!
//! An upstream that announces neither `QUOTA` (RFC 2087) nor `QUOTA=` (RFC 9208) is never
//! asked. One that never answers leaves the question in flight (the session is then not
//! parked for reuse, and the question is counted `failed` at the session's end); a refusal
//! or an answer without a readable STORAGE is counted `none` and tells the client nothing.

use std::time::SystemTime;

use super::response::{self, Kind, Status};
use crate::quota::{self, Policy, Usage};
use crate::service::Service;

/// The question's tag (a session asks once).
pub const TAG: &[u8] = b"mgq1";
/// Quota lines kept for reading at most; more (a broken upstream) are absorbed unread.
const MAX_LINES: usize = 16;
/// Bytes of them kept at most.
const MAX_BYTES: usize = 16 << 10;

/// Whether the upstream's post-login capabilities announce a quota extension.
pub fn announces_quota(capabilities: &[String]) -> bool {
    capabilities
        .iter()
        .any(|c| c.eq_ignore_ascii_case("QUOTA") || c.get(..6).is_some_and(|head| head.eq_ignore_ascii_case("QUOTA=")))
}

/// The question a session asks, while its answer is awaited.
#[derive(Debug)]
pub struct Question {
    account: String,
    policy: Policy,
    /// The `* QUOTA` lines of the answer so far (bounded).
    lines: Vec<Vec<u8>>,
    bytes: usize,
}

/// What [`Question::take`] makes of a response line.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Not the question's: the client's as usual.
    Relay,
    /// Part of the answer: not for the client.
    Absorbed,
    /// The tagged completion (absorbed too): the STORAGE usage, or `None` when the upstream
    /// refused or said nothing readable.
    Answered(Option<Usage>),
}

impl Question {
    /// The question for `account`'s session, when `[insight] quota` is on, the upstream
    /// announces QUOTA, and the account is due to be asked (noted as asked at once).
    pub fn due(service: &Service, account: &str, capabilities: &[String]) -> Option<Question> {
        let insight = &service.config.insight;
        if !insight.quota || !announces_quota(capabilities) {
            return None;
        }
        let policy = Policy {
            check_every: insight.quota_check_every.0,
            warn_at: insight.quota_warn_at,
            alert_every: insight.quota_alert_every.0,
        };
        service.metrics.quota.due(account, &policy, SystemTime::now()).then(|| Question::new(account, policy))
    }

    pub fn new(account: &str, policy: Policy) -> Question {
        Question { account: account.to_string(), policy, lines: Vec::new(), bytes: 0 }
    }

    /// The command line to write upstream.
    pub fn command() -> Vec<u8> {
        let mut command = TAG.to_vec();
        command.extend_from_slice(b" GETQUOTAROOT INBOX\r\n");
        command
    }

    /// A complete response line (without its line end), seen while the question is the
    /// oldest command in flight.
    pub fn take(&mut self, line: &[u8]) -> Taken {
        match response::kind(line) {
            Kind::Tagged { tag, rest } if tag == TAG => {
                let ok = response::status(rest).is_some_and(|s| s.status == Status::Ok);
                let usage = if ok { quota::parse_answer(self.lines.iter().map(Vec::as_slice)) } else { None };
                self.lines = Vec::new();
                Taken::Answered(usage)
            }
            Kind::Untagged(_) if quota::is_quota_response(line) => {
                if self.lines.len() < MAX_LINES && self.bytes + line.len() <= MAX_BYTES {
                    self.bytes += line.len();
                    self.lines.push(line.to_vec());
                }
                Taken::Absorbed
            }
            _ => Taken::Relay,
        }
    }

    /// Records what the upstream answered (metrics, the account's reading) and returns the
    /// `ALERT` line for the client, when it is due.
    pub fn conclude(self, service: &Service, usage: Option<Usage>) -> Option<Vec<u8>> {
        let metrics = &service.metrics;
        let Some(usage) = usage else {
            metrics.quota_checks.with_label_values(&["none"]).inc();
            return None;
        };
        metrics.quota_checks.with_label_values(&["read"]).inc();
        metrics.quota_usage.observe(usage.share());
        // The account's support history (`crate::insight`): its last reading, and the
        // `quota_nearly_full` detection.
        let reading = crate::insight::Event::Quota { used_kib: usage.used_kib, limit_kib: usage.limit_kib };
        service.insight.record(&self.account, reading);
        if !metrics.quota.record(&self.account, usage, &self.policy, SystemTime::now()) {
            return None;
        }
        metrics.quota_alerts.inc();
        tracing::info!(share = usage.share(), "quota alert sent");
        let text = quota::alert_text(&service.config.insight.quota_alert_text, usage);
        Some(format!("* OK [ALERT] {text}\r\n").into_bytes())
    }

    /// The session ended (or the question's answer could not be read) before it completed.
    pub fn unanswered(self, service: &Service) {
        service.metrics.quota_checks.with_label_values(&["failed"]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn question() -> Question {
        let policy = Policy { check_every: Duration::ZERO, warn_at: 0.9, alert_every: Duration::ZERO };
        Question::new("a@x", policy)
    }

    /// Feeds `script`'s lines to a question (as the relay does while it is the oldest in
    /// flight) until it is answered: the lines relayed and the answer.
    fn run(script: &[u8]) -> (Vec<String>, Option<Taken>) {
        let mut question = question();
        let mut relayed = Vec::new();
        for line in script.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match question.take(line) {
                Taken::Relay => relayed.push(String::from_utf8_lossy(line).into_owned()),
                Taken::Absorbed => {}
                answered @ Taken::Answered(_) => return (relayed, Some(answered)),
            }
        }
        (relayed, None)
    }

    #[test]
    fn the_answer_is_absorbed_and_everything_else_relayed() {
        let script = b"* QUOTAROOT INBOX \"\"\r\n* 3 EXISTS\r\n* QUOTA \"\" (STORAGE 95 100)\r\n\
                       * OK still fine\r\nA1 OK NOOP done\r\nmgq1 OK Getquotaroot completed.\r\n* BYE later\r\n";
        let (relayed, answer) = run(script);
        assert_eq!(relayed, ["* 3 EXISTS", "* OK still fine", "A1 OK NOOP done"]);
        assert_eq!(answer, Some(Taken::Answered(Some(Usage { used_kib: 95, limit_kib: 100 }))));
    }

    #[test]
    fn a_refusal_or_garbage_is_no_quota_and_is_absorbed() {
        let (relayed, answer) = run(b"mgq1 NO Quota not supported\r\n");
        assert!(relayed.is_empty());
        assert_eq!(answer, Some(Taken::Answered(None)));
        let (relayed, answer) = run(b"* QUOTA \"\" (STORAGE lots 2)\r\n* QUOTAROOT\r\nmgq1 OK done\r\n");
        assert!(relayed.is_empty(), "{relayed:?}");
        assert_eq!(answer, Some(Taken::Answered(None)));
        let (relayed, answer) = run(b"* QUOTA \"\" (STORAGE 95 100)\r\nmgq1 BAD what\r\n");
        assert!(relayed.is_empty());
        assert_eq!(answer, Some(Taken::Answered(None)), "a reading with a refusal is none");
    }

    #[test]
    fn silence_leaves_it_unanswered_and_a_flood_is_bounded() {
        let (relayed, answer) = run(b"* QUOTAROOT INBOX \"\"\r\nB OK fine\r\n");
        assert_eq!((relayed, answer), (vec!["B OK fine".to_string()], None));
        let mut question = question();
        for _ in 0..1000 {
            assert_eq!(question.take(b"* QUOTA \"\" (STORAGE 95 100)"), Taken::Absorbed);
        }
        assert_eq!(question.lines.len(), MAX_LINES);
        assert_eq!(question.take(b"mgq1 OK done"), Taken::Answered(Some(Usage { used_kib: 95, limit_kib: 100 })));
    }

    #[test]
    fn quota_is_announced_by_either_rfc() {
        let caps = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(announces_quota(&caps(&["IMAP4rev1", "QUOTA"])));
        assert!(announces_quota(&caps(&["IMAP4rev1", "quota=res-storage"])));
        assert!(!announces_quota(&caps(&["IMAP4rev1", "QUOTAX", "IDLE"])));
    }
}
