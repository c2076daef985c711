//! Moving clients off logins without TLS, the way an ISP has to: warn with a date, watch
//! who is left, then refuse. Sans-I/O: what a login sent in clear text gets is decided
//! here from the listener's settings, the exception that covers the user or network, and
//! the time, which the caller gives (the tests move it; nothing sleeps).
//!
//! A login "in clear text" is one on a STARTTLS listener before STARTTLS/STLS, or on a
//! plaintext listener. Whatever the verdict, the upstream is reached only over its own
//! configured TLS: a warned login's credentials cross one network in clear, never two.

use std::time::SystemTime;

use crate::config::{ListenerConfig, PlaintextAuth, Protocol, TlsMode};
use crate::units::Moment;

/// What a login sent without TLS gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Refused: IMAP `NO [PRIVACYREQUIRED]`, POP3 `-ERR [AUTH]`.
    Refuse,
    /// Let in and told that it will stop: at `until` when known. `exception`: the
    /// listener refuses, but a user's or network's exception lets it in until then.
    Warn { until: Option<Moment>, exception: bool },
    /// Let in silently.
    Allow,
}

impl Verdict {
    /// The `mode` label of `mailgate_plaintext_logins_total`.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Refuse => "refuse",
            Verdict::Warn { exception: false, .. } => "warn",
            Verdict::Warn { exception: true, .. } => "exception",
            Verdict::Allow => "allow",
        }
    }
}

/// One listener's plaintext settings.
#[derive(Clone, Debug)]
pub struct Policy {
    mode: PlaintextAuth,
    enforce_after: Option<Moment>,
    warning: Option<String>,
    /// What `{tls_ports}` says.
    tls_ports: String,
}

impl Policy {
    /// The policy of `listener` (`listeners`: all of them, for the TLS ports a warning
    /// names); `None` for an implicit-TLS listener, which sees no login in clear text.
    pub fn new(listener: &ListenerConfig, listeners: &[ListenerConfig]) -> Option<Policy> {
        let default = match listener.tls {
            TlsMode::Implicit => return None,
            TlsMode::Starttls => PlaintextAuth::Refuse,
            TlsMode::Plaintext => PlaintextAuth::Allow,
        };
        Some(Policy {
            mode: listener.plaintext_auth.unwrap_or(default),
            enforce_after: listener.enforce_after,
            warning: listener.plaintext_warning.clone(),
            tls_ports: tls_ports(listener.protocol, listeners),
        })
    }

    /// The verdict at `now` for a login that `exception` (the later end date of the
    /// user's and the network's exceptions) may cover.
    pub fn verdict(&self, exception: Option<Moment>, now: SystemTime) -> Verdict {
        let enforced = self.enforce_after.is_some_and(|at| now >= at.system_time());
        let base = match self.mode {
            PlaintextAuth::Refuse => Verdict::Refuse,
            _ if enforced => Verdict::Refuse,
            PlaintextAuth::Warn => Verdict::Warn { until: self.enforce_after, exception: false },
            PlaintextAuth::Allow => Verdict::Allow,
        };
        let Some(exception) = exception.filter(|until| now < until.system_time()) else {
            return base;
        };
        match base {
            Verdict::Refuse => Verdict::Warn { until: Some(exception), exception: true },
            Verdict::Warn { until, exception: false } => {
                Verdict::Warn { until: Some(until.map_or(exception, |until| until.max(exception))), exception: false }
            }
            other => other,
        }
    }

    /// The text a warned client is shown, for a verdict ending at `until`.
    pub fn warning(&self, until: Option<Moment>) -> String {
        let date = until.map(Moment::date);
        let template = match (&self.warning, &date) {
            (Some(text), _) => text.as_str(),
            (None, Some(_)) => {
                "Your mail program signs in without encryption, which stops working on {date}: \
                 turn on SSL/TLS in its account settings ({tls_ports})."
            }
            (None, None) => {
                "Your mail program signs in without encryption, which will stop working: \
                 turn on SSL/TLS in its account settings ({tls_ports})."
            }
        };
        template
            .replace("{date}", date.as_deref().unwrap_or("a date to be announced"))
            .replace("{tls_ports}", &self.tls_ports)
    }
}

/// `port 993` or `port 993 or 1993` (implicit TLS), else `STARTTLS on port 143`, for
/// `protocol`'s listeners with a fixed port; `the secure ports` when none has one.
fn tls_ports(protocol: Protocol, listeners: &[ListenerConfig]) -> String {
    let ports = |mode: TlsMode| -> Vec<String> {
        let mut ports: Vec<u16> = (listeners.iter())
            .filter(|l| l.protocol == protocol && l.tls == mode && l.address.port() != 0)
            .map(|l| l.address.port())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports.iter().map(u16::to_string).collect()
    };
    let (implicit, starttls) = (ports(TlsMode::Implicit), ports(TlsMode::Starttls));
    if !implicit.is_empty() {
        format!("port {}", implicit.join(" or "))
    } else if !starttls.is_empty() {
        format!("STARTTLS on port {}", starttls.join(" or "))
    } else {
        "the secure ports".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(name: &str, protocol: Protocol, port: u16, tls: TlsMode) -> ListenerConfig {
        ListenerConfig {
            name: name.into(),
            protocol,
            address: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            tls,
            ..ListenerConfig::default()
        }
    }

    fn at(text: &str) -> Moment {
        text.parse().unwrap()
    }

    fn policy(mode: Option<PlaintextAuth>, enforce_after: Option<&str>) -> Policy {
        let mut imap = listener("imap", Protocol::Imap, 143, TlsMode::Starttls);
        imap.plaintext_auth = mode;
        imap.enforce_after = enforce_after.map(at);
        let all = [imap.clone(), listener("imaps", Protocol::Imap, 993, TlsMode::Implicit)];
        Policy::new(&imap, &all).unwrap()
    }

    #[test]
    fn warn_turns_into_refuse_at_the_enforcement_moment() {
        let policy = policy(Some(PlaintextAuth::Warn), Some("2027-03-31T00:00:00Z"));
        let before = at("2027-03-30T23:59:59Z").system_time();
        let after = at("2027-03-31T00:00:00Z").system_time();
        let until = Some(at("2027-03-31T00:00:00Z"));
        assert_eq!(policy.verdict(None, before), Verdict::Warn { until, exception: false });
        assert_eq!(policy.verdict(None, after), Verdict::Refuse);
        assert_eq!(policy.verdict(None, after).label(), "refuse");
    }

    #[test]
    fn an_exception_lets_a_user_in_until_its_own_date_and_no_longer() {
        let policy = policy(None, None);
        let exception = Some(at("2027-06-30T00:00:00+02:00"));
        let now = at("2027-05-01T12:00:00Z").system_time();
        assert_eq!(policy.verdict(None, now), Verdict::Refuse);
        let verdict = policy.verdict(exception, now);
        assert_eq!(verdict, Verdict::Warn { until: exception, exception: true });
        assert_eq!(verdict.label(), "exception");
        assert_eq!(policy.verdict(exception, at("2027-06-29T22:00:00Z").system_time()), Verdict::Refuse);
        // An exception longer than the listener's warning period keeps the user warned to its end.
        let warned = self::policy(Some(PlaintextAuth::Warn), Some("2027-05-15T00:00:00Z"));
        assert_eq!(warned.verdict(exception, now), Verdict::Warn { until: exception, exception: false });
        assert_eq!(
            warned.verdict(exception, at("2027-06-01T00:00:00Z").system_time()),
            Verdict::Warn { until: exception, exception: true }
        );
    }

    #[test]
    fn defaults_follow_the_listener_kind() {
        let now = SystemTime::now();
        let plain = listener("plain", Protocol::Pop3, 110, TlsMode::Plaintext);
        assert_eq!(Policy::new(&plain, std::slice::from_ref(&plain)).unwrap().verdict(None, now), Verdict::Allow);
        assert_eq!(policy(None, None).verdict(None, now), Verdict::Refuse);
        let implicit = listener("imaps", Protocol::Imap, 993, TlsMode::Implicit);
        assert!(Policy::new(&implicit, std::slice::from_ref(&implicit)).is_none());
        let allowed = policy(Some(PlaintextAuth::Allow), Some("2027-03-31T00:00:00Z"));
        assert_eq!(allowed.verdict(None, at("2027-03-01T00:00:00Z").system_time()), Verdict::Allow);
        assert_eq!(allowed.verdict(None, at("2027-04-01T00:00:00Z").system_time()), Verdict::Refuse);
    }

    #[test]
    fn the_warning_names_the_date_and_the_tls_ports() {
        let policy = policy(Some(PlaintextAuth::Warn), Some("2027-03-31T00:00:00Z"));
        let text = policy.warning(Some(at("2027-03-31T00:00:00Z")));
        assert_eq!(
            text,
            "Your mail program signs in without encryption, which stops working on 2027-03-31: \
             turn on SSL/TLS in its account settings (port 993)."
        );
        let mut custom = listener("pop3", Protocol::Pop3, 110, TlsMode::Starttls);
        custom.plaintext_warning = Some("Plain POP3 ends {date}; use {tls_ports}.".into());
        let all = [custom.clone(), listener("imaps", Protocol::Imap, 993, TlsMode::Implicit)];
        let custom = Policy::new(&custom, &all).unwrap();
        assert_eq!(
            custom.warning(Some(at("2027-01-02T00:00:00Z"))),
            "Plain POP3 ends 2027-01-02; use STARTTLS on port 110."
        );
        assert_eq!(custom.warning(None), "Plain POP3 ends a date to be announced; use STARTTLS on port 110.");
    }
}
