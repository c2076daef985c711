//! Modification sequences that mailgate turns on for itself (RFC 7162), kept from a client
//! that did not ask for them.
//!
//! To know whether the flags it remembers of a mailbox are still current, mailgate asks the
//! upstream `UID FETCH set (UID FLAGS) (CHANGEDSINCE n)` (or `MODSEQ` in a FETCH). Any such
//! command enables CONDSTORE for the rest of the upstream session (§3.1), and from then on the
//! upstream says more than it would have said to the client alone:
//!
//! - `* OK [HIGHESTMODSEQ n] ...` when it is enabled in a selected mailbox, and in every
//!   later SELECT and EXAMINE (`[NOMODSEQ]` for a mailbox without them);
//! - a `MODSEQ (n)` item in every FETCH response that reports a flag change (unsolicited
//!   ones, STORE's), and a FETCH response of nothing but that after `STORE .SILENT` or a
//!   FETCH that set `\Seen`.
//!
//! [`strip`] takes these out of each response line until the client enables CONDSTORE
//! itself. A client's enabling command ([`enabling`]) must then look like the first: the
//! upstream no longer announces `[HIGHESTMODSEQ]` for it, so the relay does (see
//! [`highest_modseq_line`]). Everything here is sans-I/O and tested with byte scripts.

use super::response::StatusLine;

/// What a response line becomes for a client that did not enable CONDSTORE.
#[derive(Debug, PartialEq, Eq)]
pub enum Stripped {
    /// Nothing of it was added by CONDSTORE.
    Keep,
    /// Nothing of it would have been sent without CONDSTORE.
    Drop,
    /// The line, its `MODSEQ (n)` item taken out (in place).
    Rewritten,
}

/// Strips from one response line (the whole line, or the part of a FETCH response up to its
/// first literal) what CONDSTORE added to it.
pub fn strip(line: &mut Vec<u8>) -> Stripped {
    let Some(rest) = line.strip_prefix(b"* ") else { return Stripped::Keep };
    if !mentions(rest) {
        return Stripped::Keep;
    }
    if let Some(status) = super::response::status(rest) {
        return if announces_code(&status) { Stripped::Drop } else { Stripped::Keep };
    }
    let Some(open) = fetch_items_start(rest) else { return Stripped::Keep };
    let start = 2 + open;
    let Some(item) = modseq_item(line, start) else { return Stripped::Keep };
    let mut range = item;
    // The item and one space that separates it from a neighbour.
    if line.get(range.end) == Some(&b' ') {
        range.end += 1;
    } else if range.start > start && line[range.start - 1] == b' ' {
        range.start -= 1;
    }
    line.drain(range);
    // `* n FETCH ()`, or `* n FETCH (UID m)` of a `UID STORE .SILENT`: the response said
    // nothing but the MODSEQ (a FETCH that asked for UID alone is never rewritten: MODSEQ
    // comes with a solicited answer only when asked for).
    let items = super::framing::strip_eol(&line[start..]);
    let only_uid = items.len() > 5
        && items[..4].eq_ignore_ascii_case(b"UID ")
        && items[4..items.len() - 1].iter().all(u8::is_ascii_digit)
        && items.ends_with(b")");
    if items == b")" || only_uid {
        return Stripped::Drop;
    }
    Stripped::Rewritten
}

/// The value of the `MODSEQ (n)` item of a FETCH response's first line.
pub fn fetch_modseq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"* ")?;
    let range = modseq_item(line, 2 + fetch_items_start(rest)?)?;
    std::str::from_utf8(&line[range.start + 8..range.end - 1]).ok()?.parse().ok()
}

/// Whether a response (its rest after `* `) names a modification sequence at all.
pub fn mentions(rest: &[u8]) -> bool {
    // Every response head passes here: look only where an `M` is.
    memchr::memchr2_iter(b'M', b'm', rest)
        .any(|at| rest.get(at..at + 6).is_some_and(|w| w.eq_ignore_ascii_case(b"MODSEQ")))
}

/// Whether an untagged response (its rest after `* `) is `OK [HIGHESTMODSEQ n]` or
/// `OK [NOMODSEQ]`: what a SELECT says of a mailbox's modification sequences.
pub fn announces(rest: &[u8]) -> bool {
    super::response::status(rest).is_some_and(|status| announces_code(&status))
}

fn announces_code(status: &StatusLine<'_>) -> bool {
    status.code.as_ref().is_some_and(|(atom, _)| atom == "HIGHESTMODSEQ" || atom == "NOMODSEQ")
}

/// The value of `OK [HIGHESTMODSEQ n] ...` (an untagged response's rest after `* `).
pub fn announced_highest(rest: &[u8]) -> Option<u64> {
    match super::response::status(rest)?.code? {
        (atom, value) if atom == "HIGHESTMODSEQ" => std::str::from_utf8(value).ok()?.trim().parse().ok(),
        _ => None,
    }
}

/// Where the item list of `n FETCH (` starts in `rest` (just after the parenthesis).
fn fetch_items_start(rest: &[u8]) -> Option<usize> {
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let after = rest.get(digits..)?;
    (digits > 0 && after.len() >= 8 && after[..8].eq_ignore_ascii_case(b" FETCH (")).then_some(digits + 8)
}

/// The range of a top-level `MODSEQ (digits)` item in `line`, scanning from `from` (the
/// start of the item list) over quoted strings and parenthesized values.
fn modseq_item(line: &[u8], from: usize) -> Option<std::ops::Range<usize>> {
    let (mut at, mut depth, mut item_start) = (from, 0usize, true);
    while at < line.len() {
        match line[at] {
            b'"' => {
                at += 1;
                while at < line.len() && line[at] != b'"' {
                    at += if line[at] == b'\\' { 2 } else { 1 };
                }
            }
            b'(' => depth += 1,
            b')' if depth == 0 => return None,
            b')' => depth -= 1,
            b' ' => {
                item_start = depth == 0;
                at += 1;
                continue;
            }
            b'{' | b'~' if depth == 0 => return None,
            _ if depth == 0
                && item_start
                && line[at..].len() >= 8
                && line[at..at + 8].eq_ignore_ascii_case(b"MODSEQ (") =>
            {
                let digits = line[at + 8..].iter().take_while(|b| b.is_ascii_digit()).count();
                if digits > 0 && line.get(at + 8 + digits) == Some(&b')') {
                    return Some(at..at + 9 + digits);
                }
            }
            _ => {}
        }
        item_start = false;
        at += 1;
    }
    None
}

/// What a client's command does about CONDSTORE (RFC 7162 §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enabling {
    No,
    /// SELECT or EXAMINE with `(CONDSTORE)` or `(QRESYNC ...)`: the mailbox it opens
    /// announces its HIGHESTMODSEQ in any case.
    Select,
    /// Any other enabling command: in a selected mailbox, the upstream's first answer to it
    /// is `* OK [HIGHESTMODSEQ n]` when it is the session's first.
    Other,
}

/// Whether a client's command line enables CONDSTORE: `ENABLE CONDSTORE|QRESYNC`, SELECT or
/// EXAMINE with such a parameter, STATUS asking HIGHESTMODSEQ, FETCH asking MODSEQ or
/// CHANGEDSINCE, SEARCH (SORT, THREAD) by MODSEQ, STORE with UNCHANGEDSINCE. Quoted
/// strings are not looked into (a search for the text "MODSEQ" enables nothing).
pub fn enabling(line: &[u8]) -> Enabling {
    // Every client command passes here: only a line naming one of these words is split into
    // words (allocating), the rest costs a scan.
    let names = |word: &[u8]| line.windows(word.len()).any(|w| w.eq_ignore_ascii_case(word));
    if !(names(b"MODSEQ") || names(b"CHANGEDSINCE") || names(b"CONDSTORE") || names(b"QRESYNC")) {
        return Enabling::No;
    }
    let words = words(line);
    let mut iter = words.iter();
    let (Some(_tag), Some(command)) = (iter.next(), iter.next()) else { return Enabling::No };
    let mut command = command.to_ascii_uppercase();
    let rest: Vec<Vec<u8>> = iter.map(|w| w.to_ascii_uppercase()).collect();
    let mut rest = &rest[..];
    if command == b"UID" {
        let Some((next, after)) = rest.split_first() else { return Enabling::No };
        command = next.clone();
        rest = after;
    }
    let has = |names: &[&[u8]]| rest.iter().any(|w| names.contains(&w.as_slice()));
    let enables = match command.as_slice() {
        b"ENABLE" => has(&[b"CONDSTORE", b"QRESYNC"]),
        b"SELECT" | b"EXAMINE" => {
            return if has(&[b"CONDSTORE", b"QRESYNC"]) { Enabling::Select } else { Enabling::No };
        }
        b"STATUS" => has(&[b"HIGHESTMODSEQ"]),
        b"FETCH" => has(&[b"MODSEQ", b"CHANGEDSINCE"]),
        b"SEARCH" | b"SORT" | b"THREAD" => has(&[b"MODSEQ"]),
        b"STORE" => has(&[b"UNCHANGEDSINCE"]),
        _ => false,
    };
    if enables {
        Enabling::Other
    } else {
        Enabling::No
    }
}

/// The atoms of a command line, parentheses as separators, quoted strings and section
/// specifications (`[HEADER.FIELDS (...)]`) left out.
fn words(line: &[u8]) -> Vec<&[u8]> {
    let mut words = Vec::new();
    let (mut at, mut start) = (0, None);
    while at < line.len() {
        let b = line[at];
        if b == b'[' {
            if let Some(s) = start.take() {
                words.push(&line[s..at]);
            }
            while at < line.len() && line[at] != b']' {
                at += 1;
            }
        } else if b == b'"' {
            if let Some(s) = start.take() {
                words.push(&line[s..at]);
            }
            at += 1;
            while at < line.len() && line[at] != b'"' {
                at += if line[at] == b'\\' { 2 } else { 1 };
            }
        } else if matches!(b, b' ' | b'(' | b')' | b'\r' | b'\n') {
            if let Some(s) = start.take() {
                words.push(&line[s..at]);
            }
        } else if start.is_none() {
            start = Some(at);
        }
        at += 1;
    }
    if let Some(s) = start {
        words.push(&line[s..]);
    }
    words
}

/// The value of `* STATUS name (HIGHESTMODSEQ n)`.
pub fn status_highest_modseq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"* ")?;
    if rest.len() < 7 || !rest[..7].eq_ignore_ascii_case(b"STATUS ") {
        return None;
    }
    let open = rest.iter().rposition(|&b| b == b'(')?;
    let mut words = rest[open + 1..].split(|&b| b == b' ' || b == b')' || b == b'\r' || b == b'\n');
    while let Some(word) = words.next() {
        if word.eq_ignore_ascii_case(b"HIGHESTMODSEQ") {
            return std::str::from_utf8(words.next()?).ok()?.parse().ok();
        }
    }
    None
}

/// The text after the code of a `* OK [HIGHESTMODSEQ n] text` line (with its line end), to
/// announce later values the way the upstream words them.
pub fn highest_modseq_text(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(b"* ")?;
    announced_highest(rest)?;
    let close = rest.iter().position(|&b| b == b']')?;
    Some(&rest[close + 1..])
}

/// `* OK [HIGHESTMODSEQ n]` with the upstream's own wording.
pub fn highest_modseq_line(value: u64, text: Option<&[u8]>) -> Vec<u8> {
    let mut line = format!("* OK [HIGHESTMODSEQ {value}]").into_bytes();
    line.extend_from_slice(text.unwrap_or(b" Highest\r\n"));
    line
}

/// `tag STATUS "name" (HIGHESTMODSEQ)`, or `None` for a name that would need a literal.
pub fn status_command(tag: &str, mailbox: &str) -> Option<Vec<u8>> {
    if mailbox.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
        return None;
    }
    let quoted = mailbox.replace('\\', "\\\\").replace('"', "\\\"");
    Some(format!("{tag} STATUS \"{quoted}\" (HIGHESTMODSEQ)\r\n").into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stripped(line: &str) -> String {
        let mut out = line.as_bytes().to_vec();
        match strip(&mut out) {
            Stripped::Keep => format!("keep {}", String::from_utf8(out).unwrap()),
            Stripped::Drop => "drop".to_string(),
            Stripped::Rewritten => String::from_utf8(out).unwrap(),
        }
    }

    #[test]
    fn what_dovecot_adds_once_condstore_is_on_is_taken_out() {
        // Dovecot 2.3's own lines, after mailgate's CHANGEDSINCE enabled CONDSTORE.
        assert_eq!(stripped("* OK [HIGHESTMODSEQ 7] Highest\r\n"), "drop");
        assert_eq!(stripped("* OK [NOMODSEQ] No permanent modsequences\r\n"), "drop");
        assert_eq!(
            stripped("* 2 FETCH (MODSEQ (20) FLAGS (\\Flagged \\Seen))\r\n"),
            "* 2 FETCH (FLAGS (\\Flagged \\Seen))\r\n"
        );
        assert_eq!(
            stripped("* 1 FETCH (UID 1 MODSEQ (25) FLAGS (\\Answered \\Seen))\r\n"),
            "* 1 FETCH (UID 1 FLAGS (\\Answered \\Seen))\r\n"
        );
        assert_eq!(stripped("* 3 FETCH (UID 3 FLAGS (\\Seen) MODSEQ (7))\r\n"), "* 3 FETCH (UID 3 FLAGS (\\Seen))\r\n");
        // STORE .SILENT and a FETCH that set \Seen: nothing without CONDSTORE.
        assert_eq!(stripped("* 1 FETCH (MODSEQ (22))\r\n"), "drop");
        assert_eq!(stripped("* 5 FETCH (UID 6 MODSEQ (22))\r\n"), "drop");
        assert_eq!(stripped("* 5 FETCH (MODSEQ (22) UID 6)\r\n"), "drop");
        assert_eq!(fetch_modseq(b"* 1 FETCH (UID 1 MODSEQ (25) FLAGS (\\Seen) BODY[] {5}\r\n"), Some(25));
        assert_eq!(fetch_modseq(b"* 1 FETCH (UID 1 FLAGS (\\Seen))\r\n"), None);
        // Up to a literal: the part of a FETCH response before its first one.
        assert_eq!(
            stripped("* 5 fetch (uid 5 modseq (9) BODY[HEADER.FIELDS (SUBJECT)] {12}\r\n"),
            "* 5 fetch (uid 5 BODY[HEADER.FIELDS (SUBJECT)] {12}\r\n"
        );
    }

    #[test]
    fn what_only_looks_like_it_stays() {
        for line in [
            "* 3 FETCH (UID 3 FLAGS (\\Seen))\r\n",
            "* 3 FETCH (FLAGS (MODSEQ \\Seen))\r\n",
            "* 3 FETCH (ENVELOPE (\"x\" \"MODSEQ (5)\" NIL NIL NIL NIL NIL NIL NIL NIL))\r\n",
            "* 3 FETCH (BODY[] {9}\r\n",
            "* SEARCH 1 2 (MODSEQ 9)\r\n",
            "* STATUS INBOX (HIGHESTMODSEQ 7)\r\n",
            "* OK [UIDNEXT 4] Predicted next UID\r\n",
            "* OK MODSEQ is what this says\r\n",
            "a OK [HIGHESTMODSEQ 7] done\r\n",
            "+ MODSEQ\r\n",
        ] {
            assert_eq!(stripped(line), format!("keep {line}"), "{line}");
        }
    }

    #[test]
    fn enabling_commands_are_told_apart() {
        use Enabling::*;
        for (line, expected) in [
            ("a ENABLE CONDSTORE", Other),
            ("a enable qresync", Other),
            ("a ENABLE UTF8=ACCEPT", No),
            ("a SELECT INBOX (CONDSTORE)", Select),
            ("a EXAMINE INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))", Select),
            ("a SELECT CONDSTORE", Select),
            ("a SELECT \"CONDSTORE\"", No),
            ("a SELECT INBOX", No),
            ("a STATUS INBOX (MESSAGES HIGHESTMODSEQ)", Other),
            ("a STATUS INBOX (MESSAGES)", No),
            ("a FETCH 1:* (FLAGS MODSEQ)", Other),
            ("a UID FETCH 1:* (UID FLAGS) (CHANGEDSINCE 12)", Other),
            ("a UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (MODSEQ)])", No),
            ("a UID FETCH 1:* (UID FLAGS)", No),
            ("a SEARCH MODSEQ 5", Other),
            ("a UID SEARCH SUBJECT \"MODSEQ\"", No),
            ("a UID SORT (DATE) UTF-8 MODSEQ 5", Other),
            ("a STORE 1 (UNCHANGEDSINCE 3) +FLAGS (\\Seen)", Other),
            ("a UID STORE 1 +FLAGS (\\Seen)", No),
            ("a NOOP", No),
            ("a", No),
        ] {
            assert_eq!(enabling(line.as_bytes()), expected, "{line}");
        }
    }

    #[test]
    fn highest_modseq_is_read_and_worded_like_the_upstream() {
        assert_eq!(status_highest_modseq(b"* STATUS INBOX (HIGHESTMODSEQ 7)\r\n"), Some(7));
        assert_eq!(status_highest_modseq(b"* STATUS \"a (b)\" (MESSAGES 3 HIGHESTMODSEQ 12)\r\n"), Some(12));
        assert_eq!(status_highest_modseq(b"* STATUS INBOX (MESSAGES 3)\r\n"), None);
        assert_eq!(announced_highest(b"OK [HIGHESTMODSEQ 715] Highest\r\n"), Some(715));
        assert_eq!(announced_highest(b"OK [UIDNEXT 715] x"), None);
        assert_eq!(highest_modseq_text(b"* OK [HIGHESTMODSEQ 7] Highest\r\n"), Some(&b" Highest\r\n"[..]));
        assert_eq!(highest_modseq_text(b"* OK [UIDNEXT 7] x\r\n"), None);
        assert_eq!(highest_modseq_line(9, Some(b" Highest\r\n")), b"* OK [HIGHESTMODSEQ 9] Highest\r\n");
        assert_eq!(
            status_command("mg1", "a\"b\\c").unwrap(),
            b"mg1 STATUS \"a\\\"b\\\\c\" (HIGHESTMODSEQ)\r\n".to_vec()
        );
        assert_eq!(status_command("mg1", "caf\u{e9}"), None);
    }
}
