//! IMAP answers: reading one command's responses, normalising them to what must be equal
//! between the session through mailgate and its twin straight to the server, and
//! describing the difference item by item.
//!
//! What is compared, and why anything is left out:
//! - FETCH responses by sequence number, as a multiset of items (raw `NAME SP value`
//!   bytes): the order of items may differ (IMAP allows it), a duplicated or missing item
//!   may not. Several FETCH responses for one message within a command are merged.
//! - `\Recent` is removed from FLAGS values: it belongs to whichever session saw a
//!   message first, which is not a property of the message.
//! - Every other untagged response (and continuation request) byte for byte, in order.
//! - The tagged completion by its status word and response code (`OK [READ-WRITE]`); the
//!   human-readable text (Dovecot's timings) is left out.

use std::collections::BTreeMap;
use std::io;

use super::wire::{show, show_cut, Wire};

/// Everything one command (or a group of pipelined commands) drew, as received.
#[derive(Clone, Debug, Default)]
pub struct Answer {
    /// Untagged responses and continuation requests, each with its literals.
    pub responses: Vec<Vec<u8>>,
    /// Tagged completion lines, in the order they came.
    pub tagged: Vec<Vec<u8>>,
    /// Why the answer ended before every tagged completion (closed, timed out, garbage).
    pub error: Option<String>,
}

impl Answer {
    /// Every command completed with OK.
    pub fn ok(&self) -> bool {
        !self.tagged.is_empty() && self.tagged.iter().all(|t| status_word(t) == "OK")
    }

    pub fn untagged_text(&self) -> impl Iterator<Item = String> + '_ {
        self.responses.iter().map(|r| String::from_utf8_lossy(r).into_owned())
    }
}

fn status_word(line: &[u8]) -> String {
    String::from_utf8_lossy(line).split(' ').nth(1).unwrap_or_default().trim_end().to_ascii_uppercase()
}

/// Reads responses until the tagged completions of all `tags` (in any order: Dovecot runs
/// pipelined commands in parallel and may complete a later one first) or, with
/// `until_continuation`, a continuation request, which ends the answer too.
pub fn read(wire: &mut Wire, tags: &[&str], until_continuation: bool) -> Answer {
    let mut answer = Answer::default();
    let mut open: Vec<String> = tags.iter().map(|t| format!("{t} ")).collect();
    while !open.is_empty() {
        match wire.imap_response() {
            Ok(response) => {
                if let Some(i) = open.iter().position(|p| response.starts_with(p.as_bytes())) {
                    open.swap_remove(i);
                    answer.tagged.push(response);
                    continue;
                }
                let continuation = response.starts_with(b"+");
                answer.responses.push(response);
                if continuation && until_continuation {
                    return answer;
                }
            }
            Err(e) => {
                answer.error = Some(describe(&e));
                return answer;
            }
        }
    }
    answer
}

pub fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
            "connection closed".to_string()
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timed out".to_string(),
        _ => format!("error: {e}"),
    }
}

/// The comparable form of an [`Answer`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Normal {
    pub fetch: BTreeMap<u32, Vec<Vec<u8>>>,
    pub other: Vec<Vec<u8>>,
    /// Status word and response code of each tagged completion, by tag.
    pub status: Vec<String>,
    pub error: Option<String>,
}

/// With `ordered`, other untagged responses keep their order (one command); without, they
/// are sorted (commands that ran in parallel interleave them as they like).
pub fn normalize(answer: &Answer, ordered: bool) -> Normal {
    let mut normal = Normal { error: answer.error.clone(), ..Normal::default() };
    for response in &answer.responses {
        match parse_fetch(response) {
            Some((seq, items)) => {
                let entry = normal.fetch.entry(seq).or_default();
                entry.extend(items.into_iter().map(|item| without_recent(&item)));
            }
            // Dovecot's warning about ambiguous pipelining (RFC 9051 §5.5: a command using
            // sequence numbers sent behind a UID command) depends on whether the earlier
            // command was still running when the later one was read: timing, not content.
            None if response.starts_with(b"* BAD [CLIENTBUG]") => {}
            None => normal.other.push(response.clone()),
        }
    }
    for items in normal.fetch.values_mut() {
        items.sort();
    }
    normal.status = answer.tagged.iter().map(|line| tagged_status(line)).collect();
    if !ordered {
        normal.other.sort();
        // Which of several commands running together carries a response code such as
        // [HIGHESTMODSEQ n] depends on the order they complete in: pooled.
        let mut codes = Vec::new();
        for status in normal.status.iter_mut() {
            if let Some(at) = status.find(" [") {
                codes.push(format!("(code){}", &status[at..]));
                status.truncate(at);
            }
        }
        normal.status.extend(codes);
    }
    normal.status.sort();
    normal
}

/// `tag OK [CODE args]` of `tag OK [CODE args] text`; the status word upper-cased.
pub fn tagged_status(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end();
    let mut words = text.splitn(3, ' ');
    let tag = words.next().unwrap_or_default();
    let status = words.next().unwrap_or_default().to_ascii_uppercase();
    let rest = words.next().unwrap_or_default();
    match rest.strip_prefix('[').and_then(|r| r.find(']').map(|end| &r[..end])) {
        Some(code) => format!("{tag} {status} [{code}]"),
        None => format!("{tag} {status}"),
    }
}

/// `FLAGS (...)` without `\Recent`; any other item unchanged.
fn without_recent(item: &[u8]) -> Vec<u8> {
    let Some(list) = item.strip_prefix(b"FLAGS (").and_then(|r| r.strip_suffix(b")")) else {
        return item.to_vec();
    };
    let kept: Vec<&[u8]> =
        list.split(|&b| b == b' ').filter(|f| !f.is_empty() && !f.eq_ignore_ascii_case(b"\\Recent")).collect();
    let mut out = b"FLAGS (".to_vec();
    out.extend_from_slice(&kept.join(&b' '));
    out.push(b')');
    out
}

/// `* n FETCH (items)` split into the raw bytes of each `NAME SP value`.
pub fn parse_fetch(response: &[u8]) -> Option<(u32, Vec<Vec<u8>>)> {
    let rest = response.strip_prefix(b"* ")?;
    let sp = rest.iter().position(|&b| b == b' ')?;
    let seq: u32 = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
    let rest = &rest[sp + 1..];
    if rest.len() < 7 || !rest[..7].eq_ignore_ascii_case(b"FETCH (") {
        return None;
    }
    let mut p = Cursor { bytes: response, pos: response.len() - rest.len() + 7 };
    let mut items = Vec::new();
    loop {
        if p.peek() == Some(b')') {
            p.pos += 1;
            break;
        }
        if !items.is_empty() {
            p.expect(b' ')?;
        }
        let start = p.pos;
        p.name()?;
        p.expect(b' ')?;
        p.value()?;
        items.push(response[start..p.pos].to_vec());
    }
    matches!(&response[p.pos..], b"\r\n" | b"\n").then_some((seq, items))
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn expect(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.pos += 1)
    }

    /// `NAME`, `NAME[section]`, `NAME[section]<origin>`.
    fn name(&mut self) -> Option<()> {
        let start = self.pos;
        while let Some(b) = self.peek() {
            if b == b'[' {
                let close = self.bytes[self.pos..].iter().position(|&c| c == b']')?;
                self.pos += close + 1;
                if self.peek() == Some(b'<') {
                    let close = self.bytes[self.pos..].iter().position(|&c| c == b'>')?;
                    self.pos += close + 1;
                }
                break;
            }
            if matches!(b, b' ' | b')' | b'(' | b'"' | b'{') || b < 0x21 {
                break;
            }
            self.pos += 1;
        }
        (self.pos > start).then_some(())
    }

    fn value(&mut self) -> Option<()> {
        match self.peek()? {
            b'(' => {
                self.pos += 1;
                loop {
                    match self.peek()? {
                        b')' => {
                            self.pos += 1;
                            return Some(());
                        }
                        b' ' => self.pos += 1,
                        _ => self.value()?,
                    }
                }
            }
            b'"' => {
                self.pos += 1;
                loop {
                    match self.peek()? {
                        b'\\' => self.pos += 2,
                        b'"' => {
                            self.pos += 1;
                            return Some(());
                        }
                        b'\r' | b'\n' => return None,
                        _ => self.pos += 1,
                    }
                }
            }
            b'{' | b'~' => {
                if self.peek()? == b'~' {
                    self.pos += 1;
                }
                self.expect(b'{')?;
                let close = self.bytes[self.pos..].iter().position(|&c| c == b'}')?;
                let len: usize = std::str::from_utf8(&self.bytes[self.pos..self.pos + close]).ok()?.parse().ok()?;
                self.pos += close + 1;
                if self.bytes[self.pos..].starts_with(b"\r\n") {
                    self.pos += 2;
                } else {
                    self.expect(b'\n')?;
                }
                self.pos = self.pos.checked_add(len).filter(|&end| end <= self.bytes.len())?;
                Some(())
            }
            _ => {
                let start = self.pos;
                while let Some(b) = self.peek() {
                    if matches!(b, b' ' | b')' | b'(') || b < 0x21 {
                        break;
                    }
                    self.pos += 1;
                }
                (self.pos > start).then_some(())
            }
        }
    }
}

/// What differs between the answer through mailgate (`via`) and the twin's, item by
/// item; `None` if they are equal.
pub fn diff(via: &Normal, twin: &Normal) -> Option<String> {
    if via == twin {
        return None;
    }
    let mut out = String::new();
    if via.status != twin.status {
        out.push_str(&format!("  tagged: via {:?}, twin {:?}\n", via.status, twin.status));
    }
    if via.error != twin.error {
        out.push_str(&format!(
            "  ended: via {}, twin {}\n",
            via.error.as_deref().unwrap_or("normally"),
            twin.error.as_deref().unwrap_or("normally")
        ));
    }
    let seqs: std::collections::BTreeSet<u32> = via.fetch.keys().chain(twin.fetch.keys()).copied().collect();
    let empty = Vec::new();
    let mut shown = 0;
    for seq in seqs {
        let (v, t) = (via.fetch.get(&seq).unwrap_or(&empty), twin.fetch.get(&seq).unwrap_or(&empty));
        if v == t {
            continue;
        }
        shown += 1;
        if shown > 8 {
            out.push_str("  ... more FETCH differences\n");
            break;
        }
        if !via.fetch.contains_key(&seq) || !twin.fetch.contains_key(&seq) {
            let who = if via.fetch.contains_key(&seq) { "via only" } else { "twin only" };
            out.push_str(&format!("  * {seq} FETCH: {who}\n"));
        } else {
            out.push_str(&format!("  * {seq} FETCH differs\n"));
        }
        for (label, only) in [("via  ", multiset_minus(v, t)), ("twin ", multiset_minus(t, v))] {
            for item in only {
                out.push_str(&format!("      {label} has {}\n", show_cut(item, 240)));
            }
        }
    }
    if via.other != twin.other {
        out.push_str("  other untagged responses (in order):\n");
        let n = via.other.len().max(twin.other.len());
        for i in 0..n.min(20) {
            let (v, t) = (via.other.get(i), twin.other.get(i));
            let mark = if v == t { " " } else { "≠" };
            let line = |r: Option<&Vec<u8>>| r.map(|r| show_cut(r, 200)).unwrap_or_else(|| "(none)".to_string());
            if v == t {
                out.push_str(&format!("    {mark} both {}\n", line(v)));
            } else {
                out.push_str(&format!("    {mark} via  {}\n      twin {}\n", line(v), line(t)));
            }
        }
    }
    Some(out)
}

fn multiset_minus<'a>(a: &'a [Vec<u8>], b: &[Vec<u8>]) -> Vec<&'a Vec<u8>> {
    let mut rest: Vec<&Vec<u8>> = b.iter().collect();
    let mut out = Vec::new();
    for item in a {
        match rest.iter().position(|r| *r == item) {
            Some(i) => {
                rest.swap_remove(i);
            }
            None => out.push(item),
        }
    }
    out
}

/// The raw answer, for reports.
pub fn show_answer(answer: &Answer, max: usize) -> String {
    let mut out = String::new();
    for r in &answer.responses {
        out.push_str(&format!("    {}\n", show_cut(r, max)));
    }
    for t in &answer.tagged {
        out.push_str(&format!("    {}\n", show(t)));
    }
    if let Some(e) = &answer.error {
        out.push_str(&format!("    ({e})\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_items_split_and_recent_dropped() {
        let r =
            b"* 3 FETCH (UID 7 FLAGS (\\Seen \\Recent) BODY[HEADER.FIELDS (FROM)] {7}\r\nFrom:\r\n BODY[]<0> NIL)\r\n";
        let (seq, items) = parse_fetch(r).unwrap();
        assert_eq!(seq, 3);
        assert_eq!(items.len(), 4);
        assert_eq!(without_recent(&items[1]), b"FLAGS (\\Seen)");
        assert_eq!(tagged_status(b"a1 OK [READ-WRITE] Select completed (0.001 secs).\r\n"), "a1 OK [READ-WRITE]");
        assert_eq!(tagged_status(b"a1 no Nope\r\n"), "a1 NO");
    }
}
