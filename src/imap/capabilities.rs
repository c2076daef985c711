//! What mailgate announces. Before authentication: honest by construction, only what the
//! front itself implements, and nothing that would invite a password in clear text. After
//! it: the upstream's list as the relay can keep it (see
//! [`super::response::relayable_capabilities`]), with `COMPRESS=DEFLATE` as mailgate's own
//! when the listener offers it (the upstream's COMPRESS never: its stream would hide the
//! session from the relay).

use super::framing::strip_eol;
use crate::oauth::Mechanism;

/// What mailgate adds after login on a listener with `compress` on.
pub const COMPRESS: &str = "COMPRESS=DEFLATE";

fn is_compress(word: &str) -> bool {
    word.as_bytes().get(..9).is_some_and(|p| p.eq_ignore_ascii_case(b"COMPRESS="))
}

/// The upstream's post-login capabilities `words` with its own COMPRESS taken out and
/// mailgate's put in (`compress`).
pub fn with_own_compress<'a>(words: impl Iterator<Item = &'a str>, compress: bool) -> Vec<&'a str> {
    let mut kept: Vec<&str> = words.filter(|w| !is_compress(w)).collect();
    if compress {
        kept.push(COMPRESS);
    }
    kept
}

/// An untagged `* CAPABILITY` response at the start of the relay's buffer, as the client
/// is to see it.
#[derive(Debug, PartialEq, Eq)]
pub enum Relayed {
    /// Not a CAPABILITY response.
    Other,
    /// Maybe one, not all arrived: wait for its line end (relayed piecemeal, it could not
    /// be rewritten).
    Incomplete,
    /// Relayed as it is.
    Unchanged,
    /// Its `len` bytes become `line`.
    Rewritten { len: usize, line: Vec<u8> },
}

/// Reads a relay buffer at a response boundary (see [`Relayed`]).
pub fn relayed(buffer: &[u8], compress: bool) -> Relayed {
    const PREFIX: &[u8] = b"* CAPABILITY ";
    let head = &buffer[..buffer.len().min(PREFIX.len())];
    if !head.eq_ignore_ascii_case(&PREFIX[..head.len()]) {
        return Relayed::Other;
    }
    let Some(newline) = memchr::memchr(b'\n', buffer) else { return Relayed::Incomplete };
    if newline < PREFIX.len() {
        return Relayed::Other;
    }
    let len = newline + 1;
    let Ok(words) = std::str::from_utf8(strip_eol(&buffer[PREFIX.len()..len])) else { return Relayed::Unchanged };
    if words.contains('{') {
        return Relayed::Unchanged;
    }
    let kept = with_own_compress(words.split(' '), compress);
    if kept.iter().copied().eq(words.split(' ')) {
        return Relayed::Unchanged;
    }
    Relayed::Rewritten { len, line: format!("* CAPABILITY {}\r\n", kept.join(" ")).into_bytes() }
}

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

    #[test]
    fn a_capability_response_gets_mailgates_compress_and_loses_the_upstreams() {
        let input = b"* CAPABILITY IMAP4rev1 COMPRESS=DEFLATE IDLE compress=x\r\n* 1 EXISTS\r\n";
        let Relayed::Rewritten { len, line } = relayed(input, false) else { panic!() };
        assert_eq!(&input[len..], b"* 1 EXISTS\r\n");
        assert_eq!(line, b"* CAPABILITY IMAP4rev1 IDLE\r\n");
        let Relayed::Rewritten { line, .. } = relayed(input, true) else { panic!() };
        assert_eq!(line, b"* CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE\r\n");
        let Relayed::Rewritten { line, .. } = relayed(b"* CAPABILITY IMAP4rev1 IDLE\r\n", true) else { panic!() };
        assert_eq!(line, b"* CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE\r\n", "offered whatever the upstream does");
        assert_eq!(relayed(b"* CAPABILITY IMAP4rev1 IDLE\r\n", false), Relayed::Unchanged, "nothing to drop");
        assert_eq!(relayed(b"* CAPABILITY IMAP4rev1 COMPRESS=DEFLATE\r\n", true), Relayed::Unchanged);
        let accented = "* CAPABILITY ééééé COMPRESS=DEFLATE\r\n";
        let Relayed::Rewritten { line, .. } = relayed(accented.as_bytes(), false) else { panic!() };
        assert_eq!(line, "* CAPABILITY ééééé\r\n".as_bytes());
    }

    #[test]
    fn a_capability_response_is_waited_for_until_its_line_ends() {
        for partial in ["*", "* cap", "* CAPABILITY", "* CAPABILITY IMAP4rev1 COMPRESS=DEFLATE"] {
            assert_eq!(relayed(partial.as_bytes(), true), Relayed::Incomplete, "{partial}");
        }
        for other in
            ["* 1 EXISTS\r\n", "* OK [CAPABILITY COMPRESS=DEFLATE] x\r\n", "a OK done\r\n", "* CAP\r\n", "+ go\r\n"]
        {
            assert_eq!(relayed(other.as_bytes(), true), Relayed::Other, "{other}");
        }
    }
}
