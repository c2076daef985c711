//! What mailgate announces before authentication. Honest by construction: only what the
//! front itself implements, and nothing that would invite a password in clear text.

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
/// STARTTLS is (or is not) available.
pub fn preauth(login_allowed: bool, starttls: bool) -> &'static str {
    match (login_allowed, starttls) {
        (false, _) => BEFORE_TLS,
        (true, true) => TLS_OFFERED,
        (true, false) => READY_FOR_LOGIN,
    }
}
