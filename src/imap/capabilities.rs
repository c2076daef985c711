//! What mailgate announces before authentication. Honest by construction: only what the
//! front itself implements, and nothing that would invite a password in clear text.

use crate::oauth::Mechanism;

/// Before TLS on a STARTTLS listener (RFC 9051 §6.2.1, RFC 8314 §3.3): STARTTLS, and
/// LOGINDISABLED with no AUTH= mechanism, so that compliant clients never try.
pub const BEFORE_TLS: &str = "IMAP4rev1 LITERAL+ ID STARTTLS LOGINDISABLED";

/// Under TLS (or on a listener configured for plaintext): the login methods mailgate relays.
pub const READY_FOR_LOGIN: &str = "IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN";

/// Before TLS on a STARTTLS listener that still lets logins without TLS in (a migration's
/// `warn`, or `allow`): STARTTLS first, so that every client able to use it does, and the
/// login methods, so that the others can still log in (and be warned).
pub const TLS_OFFERED: &str = "IMAP4rev1 LITERAL+ SASL-IR ID STARTTLS AUTH=PLAIN";

/// The list for a connection where logins are (or are not) `login_allowed` now and
/// STARTTLS is (or is not) available, with `oauth`: the OAuth mechanisms the upstream
/// offers, which the caller passes under TLS only (a bearer token is as good as a
/// password to whoever reads it, and OAuth clients all speak TLS).
pub fn preauth(login_allowed: bool, starttls: bool, oauth: impl Iterator<Item = Mechanism>) -> String {
    let mut list = match (login_allowed, starttls) {
        (false, _) => BEFORE_TLS,
        (true, true) => TLS_OFFERED,
        (true, false) => READY_FOR_LOGIN,
    }
    .to_string();
    for mechanism in oauth {
        list.push_str(" AUTH=");
        list.push_str(mechanism.name());
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oauth_mechanisms_follow_the_login_methods() {
        let both = || Mechanism::ALL.into_iter();
        assert_eq!(preauth(true, false, both()), format!("{READY_FOR_LOGIN} AUTH=OAUTHBEARER AUTH=XOAUTH2"));
        assert_eq!(preauth(true, false, std::iter::empty()), READY_FOR_LOGIN);
        assert_eq!(preauth(false, true, std::iter::empty()), BEFORE_TLS);
    }
}
