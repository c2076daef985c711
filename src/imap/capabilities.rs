//! What mailgate announces before authentication. Honest by construction: only what the
//! front itself implements, and nothing that would invite a password in clear text.

/// Before TLS on a STARTTLS listener (RFC 9051 §6.2.1, RFC 8314 §3.3): STARTTLS, and
/// LOGINDISABLED with no AUTH= mechanism, so that compliant clients never try.
pub const BEFORE_TLS: &str = "IMAP4rev1 LITERAL+ ID STARTTLS LOGINDISABLED";

/// Under TLS (or on a listener configured for plaintext): the login methods mailgate relays.
pub const READY_FOR_LOGIN: &str = "IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN";

pub fn preauth(login_allowed: bool) -> &'static str {
    if login_allowed {
        READY_FOR_LOGIN
    } else {
        BEFORE_TLS
    }
}
