//! Reading the server responses mailgate has to understand: status responses with their
//! response code, CAPABILITY lists, continuations. Everything else is relayed unread.

/// The kind of a response line, from its first bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind<'a> {
    /// `+ ...`
    Continuation,
    /// `* ...`; the rest of the line after `* `.
    Untagged(&'a [u8]),
    /// `tag SP rest`.
    Tagged { tag: &'a [u8], rest: &'a [u8] },
}

pub fn kind(line: &[u8]) -> Kind<'_> {
    if line.starts_with(b"+") {
        return Kind::Continuation;
    }
    if let Some(rest) = line.strip_prefix(b"* ") {
        return Kind::Untagged(rest);
    }
    match line.iter().position(|&b| b == b' ') {
        Some(sp) => Kind::Tagged { tag: &line[..sp], rest: &line[sp + 1..] },
        None => Kind::Tagged { tag: line, rest: b"" },
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
    Bye,
    Preauth,
}

/// A status response's condition, its response code (upper-cased atom and the rest) and text.
#[derive(Debug, PartialEq, Eq)]
pub struct StatusLine<'a> {
    pub status: Status,
    pub code: Option<(String, &'a [u8])>,
    pub text: &'a [u8],
}

/// Parses `OK [CODE args] text` (the part after the tag or `* `).
pub fn status(rest: &[u8]) -> Option<StatusLine<'_>> {
    let (word, after) = match rest.iter().position(|&b| b == b' ') {
        Some(sp) => (&rest[..sp], &rest[sp + 1..]),
        None => (rest, &b""[..]),
    };
    // Called on every response line (`1 FETCH ...` included): no allocation.
    const CONDITIONS: [(&[u8], Status); 5] = [
        (b"OK", Status::Ok),
        (b"NO", Status::No),
        (b"BAD", Status::Bad),
        (b"BYE", Status::Bye),
        (b"PREAUTH", Status::Preauth),
    ];
    let status = CONDITIONS.iter().find(|(name, _)| word.eq_ignore_ascii_case(name))?.1;
    let mut code = None;
    let mut text = after;
    if let Some(inner) = after.strip_prefix(b"[") {
        if let Some(close) = inner.iter().position(|&b| b == b']') {
            let body = &inner[..close];
            let (atom, args) = match body.iter().position(|&b| b == b' ') {
                Some(sp) => (&body[..sp], &body[sp + 1..]),
                None => (body, &b""[..]),
            };
            code = Some((String::from_utf8_lossy(atom).to_ascii_uppercase(), args));
            text = inner[close + 1..].strip_prefix(b" ").unwrap_or(&inner[close + 1..]);
        }
    }
    Some(StatusLine { status, code, text })
}

/// Capability atoms from `CAPABILITY a b c` arguments.
pub fn capability_list(args: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(args).split_ascii_whitespace().map(str::to_string).collect()
}

/// The capabilities in an untagged `* CAPABILITY ...` line or a `[CAPABILITY ...]` code.
pub fn capabilities_in(line: &[u8]) -> Option<Vec<String>> {
    match kind(line) {
        Kind::Untagged(rest) => {
            if rest.len() >= 11 && rest[..10].eq_ignore_ascii_case(b"CAPABILITY") && rest[10] == b' ' {
                return Some(capability_list(&rest[11..]));
            }
            status_capabilities(rest)
        }
        Kind::Tagged { rest, .. } => status_capabilities(rest),
        Kind::Continuation => None,
    }
}

fn status_capabilities(rest: &[u8]) -> Option<Vec<String>> {
    match status(rest)?.code {
        Some((code, args)) if code == "CAPABILITY" => Some(capability_list(args)),
        _ => None,
    }
}

pub fn has_capability(capabilities: &[String], name: &str) -> bool {
    capabilities.iter().any(|c| c.eq_ignore_ascii_case(name))
}

/// The upstream's post-login capabilities minus what mailgate does not relay: TLS and
/// authentication belong to mailgate's front, and the upstream's compression would hide
/// the stream from the relay's framing; mailgate's own `COMPRESS=DEFLATE` when `compress`
/// (see [`super::capabilities`]). `SASL-IR` stays: it only describes AUTHENTICATE's
/// syntax, and the upstream's own `CAPABILITY` (relayed after login) lists it, so the
/// tagged OK of a login says what a `CAPABILITY` through mailgate says.
pub fn relayable_capabilities(capabilities: &[String], compress: bool) -> Vec<String> {
    let kept = capabilities.iter().map(String::as_str).filter(|c| {
        let upper = c.to_ascii_uppercase();
        !(upper == "STARTTLS" || upper == "LOGINDISABLED" || upper.starts_with("AUTH="))
    });
    super::capabilities::with_own_compress(kept, compress).into_iter().map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_statuses() {
        assert_eq!(kind(b"+ idling"), Kind::Continuation);
        assert_eq!(kind(b"* 3 EXISTS"), Kind::Untagged(b"3 EXISTS"));
        assert_eq!(kind(b"a1 OK done"), Kind::Tagged { tag: b"a1", rest: b"OK done" });
        let line = status(b"NO [AUTHENTICATIONFAILED] Authentication failed.").unwrap();
        assert_eq!(line.status, Status::No);
        assert_eq!(line.code.as_ref().unwrap().0, "AUTHENTICATIONFAILED");
        assert_eq!(line.text, b"Authentication failed.");
        assert_eq!(status(b"ok").unwrap().status, Status::Ok);
        assert!(status(b"FETCH (FLAGS ())").is_none());
    }

    #[test]
    fn capabilities_from_untagged_and_codes() {
        let caps = capabilities_in(b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN").unwrap();
        assert_eq!(caps, ["IMAP4rev1", "STARTTLS", "AUTH=PLAIN"]);
        let caps = capabilities_in(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] Dovecot ready.").unwrap();
        assert_eq!(caps, ["IMAP4rev1", "LITERAL+"]);
        let caps = capabilities_in(b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").unwrap();
        assert!(has_capability(&caps, "idle"));
        assert_eq!(capabilities_in(b"* 1 EXISTS"), None);
    }

    #[test]
    fn relayed_capabilities_drop_tls_auth_and_compression() {
        let caps: Vec<String> = "IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN SASL-IR COMPRESS=DEFLATE IDLE MOVE"
            .split(' ')
            .map(String::from)
            .collect();
        assert_eq!(relayable_capabilities(&caps, false), ["IMAP4rev1", "SASL-IR", "IDLE", "MOVE"]);
        let offered = ["IMAP4rev1", "SASL-IR", "IDLE", "MOVE", "COMPRESS=DEFLATE"];
        assert_eq!(relayable_capabilities(&caps, true), offered);
    }
}
