//! Sans-I/O understanding of FETCH for the message cache: which client FETCH commands can be
//! split into a mutable part (asked upstream every time) and an immutable part (cacheable),
//! and how the upstream's FETCH responses divide into items.
//!
//! Cached values are the upstream's own bytes for one item, name and value (for example
//! `BODY[HEADER.FIELDS (FROM)] {23}\r\n...`), so a response assembled from the cache carries
//! exactly what the upstream said. Anything this module does not fully understand makes the
//! command fall back to pass-through: that is always correct, only not faster.

use crate::cache::Kind;

/// One requested item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// As the client wrote it (sent upstream as is).
    pub request: String,
    pub kind: ItemKind,
}

impl Item {
    /// The name the upstream's answer carries for this item.
    fn response_name(&self) -> String {
        match &self.kind {
            ItemKind::Mutable => normalize(&self.request),
            ItemKind::Cached { response, .. } => response.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ItemKind {
    /// UID, FLAGS, MODSEQ, INTERNALDATE: asked upstream every time.
    Mutable,
    /// Immutable for a given (mailbox, UIDVALIDITY, UID).
    Cached {
        /// The normalized name the upstream's response item carries (`BODY.PEEK[...]<0.10>`
        /// answers as `BODY[...]<0>`).
        response: String,
        /// The item part of the cache key: the response name, with a partial's length
        /// (`BODY[...]<0.10>`: `<0.10>` and `<0.20>` both answer as `<0>`).
        key: String,
        /// BODY[...] without PEEK, RFC822 and RFC822.TEXT set `\Seen` (RFC 9051 §6.4.5).
        sets_seen: bool,
        class: Kind,
    },
}

/// A cacheable item of a request, as the cache path uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wanted<'a> {
    /// As the client wrote it.
    pub request: &'a str,
    /// The name of the upstream's response item.
    pub response: &'a str,
    /// The item part of the cache key.
    pub key: &'a str,
    pub class: Kind,
}

/// A FETCH or UID FETCH the cache can serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    pub tag: String,
    pub uid: bool,
    pub set: String,
    pub items: Vec<Item>,
}

impl FetchRequest {
    pub fn sets_seen(&self) -> bool {
        self.items.iter().any(|i| matches!(i.kind, ItemKind::Cached { sets_seen: true, .. }))
    }

    pub fn cached_items(&self) -> impl Iterator<Item = Wanted<'_>> {
        self.items.iter().filter_map(|i| match &i.kind {
            ItemKind::Cached { response, key, class, .. } => {
                Some(Wanted { request: &i.request, response, key, class: *class })
            }
            ItemKind::Mutable => None,
        })
    }

    /// The mutable items as the client wrote them (sent with the UID in phase one).
    pub fn mutable_requests(&self) -> Vec<&str> {
        self.items.iter().filter(|i| i.kind == ItemKind::Mutable).map(|i| i.request.as_str()).collect()
    }
}

/// Parses `tag FETCH set items` / `tag UID FETCH set items` (the line without CRLF).
/// `None` for anything the cache should not touch.
pub fn parse_request(line: &[u8]) -> Option<FetchRequest> {
    let line = std::str::from_utf8(line).ok()?;
    let (tag, rest) = line.split_once(' ')?;
    let (uid, rest) = match rest.get(..4) {
        Some(w) if w.eq_ignore_ascii_case("UID ") => (true, &rest[4..]),
        _ => (false, rest),
    };
    let (command, rest) = rest.split_once(' ')?;
    if !command.eq_ignore_ascii_case("FETCH") {
        return None;
    }
    let (set, items) = rest.split_once(' ')?;
    // Only a set the upstream accepts too (`:3`, `0` or `1:2:3` are refused there, and must
    // not be answered from the cache instead).
    if !valid_set(set) {
        return None;
    }
    let items = match items.strip_prefix('(') {
        Some(list) => split_items(list.strip_suffix(')')?)?,
        None => vec![items.to_string()],
    };
    let items = items.into_iter().map(classify).collect::<Option<Vec<_>>>()?;
    if !items.iter().any(|i| matches!(i.kind, ItemKind::Cached { .. })) {
        return None;
    }
    // Answers are matched to requests by the name the upstream echoes. Two requests that
    // answer under one name (`BODY[]<0.10>` and `BODY[]<0.20>` both answer as `BODY[]<0>`,
    // `BODY[]` and `BODY.PEEK[]`, an item named twice) cannot be told apart in the answer:
    // such a command is relayed as it is, so the upstream decides what it says.
    let mut names: Vec<String> = items.iter().map(Item::response_name).collect();
    names.sort_unstable();
    if names.windows(2).any(|pair| pair[0] == pair[1]) {
        return None;
    }
    Some(FetchRequest { tag: tag.to_string(), uid, set: set.to_string(), items })
}

/// Splits `A B[C (D E)]<1.2> F` at top-level spaces.
fn split_items(list: &str) -> Option<Vec<String>> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' | '(' => depth += 1,
            ']' | ')' => depth -= 1,
            ' ' if depth == 0 => {
                items.push(list[start..i].to_string());
                start = i + 1;
            }
            '"' | '{' | '\\' => return None,
            _ => {}
        }
        if depth < 0 {
            return None;
        }
    }
    items.push(list[start..].to_string());
    (depth == 0 && items.iter().all(|i| !i.is_empty())).then_some(items)
}

fn classify(request: String) -> Option<Item> {
    // Quoted strings and literals in item names are legal but rare: not worth parsing here.
    if request.contains(['"', '{', '\\']) {
        return None;
    }
    // Items are separated by single spaces (RFC 9051 §9): an item with a space at either end
    // (`a FETCH 1 BODY[] `) or a tab inside is a command the upstream may refuse, and must
    // then not be answered from the cache.
    if request.starts_with(' ') || request.ends_with(' ') || request.contains(|c: char| c.is_whitespace() && c != ' ') {
        return None;
    }
    let upper = normalize(&request);
    let cached = |response: &str, sets_seen: bool, class: Kind| ItemKind::Cached {
        response: response.to_string(),
        key: response.to_string(),
        sets_seen,
        class,
    };
    let kind = match upper.as_str() {
        // INTERNALDATE is immutable by the letter of RFC 9051, but it is the one item a
        // faithful restore of a mailbox changes (a maildir's file times): always asked.
        "UID" | "FLAGS" | "MODSEQ" | "INTERNALDATE" => ItemKind::Mutable,
        "RFC822.SIZE" | "ENVELOPE" | "BODYSTRUCTURE" | "BODY" => cached(&upper, false, Kind::Structure),
        "RFC822" => cached("RFC822", true, Kind::Body),
        "RFC822.TEXT" => cached("RFC822.TEXT", true, Kind::Body),
        "RFC822.HEADER" => cached("RFC822.HEADER", false, Kind::Header),
        _ => {
            let (peek, rest) = if let Some(rest) = upper.strip_prefix("BODY.PEEK[") {
                (true, rest)
            } else {
                (false, upper.strip_prefix("BODY[")?)
            };
            let (section, partial) = rest.split_once(']')?;
            if !valid_section(section) {
                return None;
            }
            let (partial, key_partial) = match partial {
                "" => (String::new(), String::new()),
                p => {
                    let inner = p.strip_prefix('<')?.strip_suffix('>')?;
                    let (origin, length) = inner.split_once('.')?;
                    let number =
                        |text: &str| text.bytes().all(|b| b.is_ascii_digit()).then(|| text.parse::<u32>().ok())?;
                    // `partial = "<" number "." nz-number ">"` (RFC 9051 §9).
                    let (origin, length) = (number(origin)?, number(length).filter(|&l| l > 0)?);
                    // The response names only the origin (RFC 9051 §7.5.2), as a number: `<09.20>`
                    // is answered as `<9>`. The key keeps both, written the same way.
                    (format!("<{origin}>"), format!("<{origin}.{length}>"))
                }
            };
            let class = if section.contains("HEADER") || section.ends_with("MIME") { Kind::Header } else { Kind::Body };
            // A partial fetch is keyed apart from the whole section: the upstream cuts it, so
            // its bytes are exactly the upstream's (slicing octets of a cached whole section
            // would also need the upstream's rules for cutting inside a multi-byte character).
            // Some servers echo header field names as the client spelled them (Courier:
            // `("date")` for `(date)`), and a cached item is the upstream's own bytes, name
            // included: another spelling of the field list is another entry.
            let spelling = match request.find('(') {
                Some(open) if request[open..].bytes().any(|b| b.is_ascii_lowercase()) => {
                    let fields = request[open + 1..].split(')').next().unwrap_or_default();
                    format!(" as ({})", fields.split_whitespace().collect::<Vec<_>>().join(" "))
                }
                _ => String::new(),
            };
            ItemKind::Cached {
                response: format!("BODY[{section}]{partial}"),
                key: format!("BODY[{section}]{key_partial}{spelling}"),
                sets_seen: !peek,
                class,
            }
        }
    };
    Some(Item { request, kind })
}

/// Section text: part numbers, HEADER, HEADER.FIELDS[.NOT] (list), TEXT, MIME.
fn valid_section(section: &str) -> bool {
    let (spec, fields) = match section.split_once(' ') {
        Some((spec, fields)) => (spec, Some(fields)),
        None => (section, None),
    };
    let mut parts = spec.split('.').peekable();
    // Part numbers are nz-numbers (RFC 9051 §9): `BODY[01]` is not `BODY[1]`, and whether a
    // server echoes it as written or as a number is its own choice; relayed, not cached.
    let mut numbered = false;
    while let Some(p) = parts.peek() {
        if nz_number(p) {
            parts.next();
            numbered = true;
        } else {
            break;
        }
    }
    let text: Vec<&str> = parts.collect();
    let text = text.join(".");
    match (text.as_str(), fields) {
        ("" | "HEADER" | "TEXT", None) => true,
        // `MIME` names a part's own header: only after a part number (RFC 9051 §6.4.5).
        ("MIME", None) => numbered,
        ("HEADER.FIELDS" | "HEADER.FIELDS.NOT", Some(list)) => {
            list.starts_with('(')
                && list.ends_with(')')
                && list.len() > 2
                // `[` is an ASTRING-CHAR, but one inside a list would make `split_items` see an
                // unclosed section: such a field name is left to the upstream, listed or not.
                && (list[1..list.len() - 1].split(' '))
                    .all(|field| field.is_empty() || field.bytes().all(|b| astring_char(b) && b != b'['))
        }
        _ => false,
    }
}

/// RFC 9051 §9 `nz-number`: digits without a leading zero, at most 4,294,967,295.
fn nz_number(text: &str) -> bool {
    !text.starts_with('0') && text.bytes().all(|b| b.is_ascii_digit()) && text.parse::<u32>().is_ok()
}

/// RFC 9051 §9 `sequence-set`: `seq-number` or `seq-number:seq-number`, comma-separated.
fn valid_set(set: &str) -> bool {
    let number = |n: &str| n == "*" || nz_number(n);
    set.split(',').all(|range| match range.split_once(':') {
        Some((a, b)) => number(a) && number(b),
        None => number(range),
    })
}

/// `ASTRING-CHAR` (RFC 9051 §9), what an unquoted header field name is made of (quoted and
/// literal names are left to the upstream: see `classify`).
fn astring_char(b: u8) -> bool {
    (0x21..0x7f).contains(&b) && !b"(){%*\"\\".contains(&b)
}

/// Upper-case, single spaces, header field names unquoted: how item names compare. Names
/// are compared by meaning, not spelling: a server may echo `BODY[HEADER.FIELDS ("From")]`
/// for `BODY[HEADER.FIELDS (FROM)]` (Courier does; field names are astrings, RFC 9051 §9).
pub fn normalize(name: &str) -> String {
    // Servers echo names in normal form almost always: then it is a copy.
    if is_normal(name) {
        return name.to_string();
    }
    // One pass, one allocation: this runs for every item of every FETCH response.
    let mut out = String::with_capacity(name.len());
    let mut space = false;
    let mut chars = name.chars();
    while let Some(c) = chars.next() {
        if c.is_whitespace() {
            space = !out.is_empty();
            continue;
        }
        if space && c != ')' && !out.ends_with('(') {
            out.push(' ');
        }
        space = false;
        if c == '"' {
            push_unquoted(&mut out, &mut chars);
        } else {
            out.push(c.to_ascii_uppercase());
        }
    }
    out
}

/// Whether `normalize` would return `name` as it is: no lower case, no quotes, single
/// spaces only between words (not after `(`, not before `)`).
fn is_normal(name: &str) -> bool {
    let bytes = name.as_bytes();
    let mut previous = b'(';
    for &b in bytes {
        let fine = match b {
            b'a'..=b'z' | b'"' | b'\t' | b'\r' | b'\n' => false,
            b' ' => previous != b' ' && previous != b'(',
            b')' => previous != b' ',
            _ => !b.is_ascii_whitespace() && b.is_ascii(),
        };
        if !fine {
            return false;
        }
        previous = b;
    }
    previous != b' '
}

/// The rest of a quoted string (after its opening quote) as the atom it stands for, when it
/// is one; otherwise kept quoted (upper-cased) so that it never equals an atom spelling.
fn push_unquoted(out: &mut String, chars: &mut std::str::Chars<'_>) {
    let mut text = String::new();
    let mut escaped = false;
    for c in chars.by_ref() {
        match (escaped, c) {
            (false, '\\') => escaped = true,
            (false, '"') => break,
            _ => {
                escaped = false;
                text.push(c.to_ascii_uppercase());
            }
        }
    }
    let atom = !text.is_empty() && text.chars().all(|c| c.is_ascii_graphic() && !"()[]{}\"%*\\".contains(c));
    if atom {
        out.push_str(&text);
    } else {
        out.push('"');
        for c in text.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
}

/// One item of a FETCH response: its normalized name and the byte range of `NAME SP VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseItem {
    /// The common names are static (no allocation per item of every response).
    pub name: std::borrow::Cow<'static, str>,
    pub range: std::ops::Range<usize>,
}

/// Item names servers send in almost every FETCH response, in normal form.
const COMMON_NAMES: [&str; 11] = [
    "UID",
    "FLAGS",
    "MODSEQ",
    "RFC822.SIZE",
    "INTERNALDATE",
    "ENVELOPE",
    "BODYSTRUCTURE",
    "BODY",
    "RFC822",
    "RFC822.HEADER",
    "RFC822.TEXT",
];

/// `normalize`, without an allocation for the common names.
fn response_name(name: &str) -> std::borrow::Cow<'static, str> {
    match COMMON_NAMES.iter().find(|common| **common == name) {
        Some(common) => std::borrow::Cow::Borrowed(*common),
        None => std::borrow::Cow::Owned(normalize(name)),
    }
}

/// `* n FETCH (items)` split into items. `response` holds the whole response as received
/// (lines with CRLF, literal announcements and literal data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchResponse {
    pub seq: u32,
    pub items: Vec<ResponseItem>,
}

impl FetchResponse {
    pub fn item<'a>(&self, response: &'a [u8], name: &str) -> Option<&'a [u8]> {
        self.range(name).map(|range| &response[range])
    }

    /// Where item `name` (name and value) is in the response.
    pub fn range(&self, name: &str) -> Option<std::ops::Range<usize>> {
        self.items.iter().find(|i| i.name == name).map(|i| i.range.clone())
    }

    /// The value of the UID item.
    pub fn uid(&self, response: &[u8]) -> Option<u32> {
        let raw = self.item(response, "UID")?;
        std::str::from_utf8(raw).ok()?.split(' ').nth(1)?.parse().ok()
    }
}

pub fn parse_response(response: &[u8]) -> Option<FetchResponse> {
    let rest = response.strip_prefix(b"* ")?;
    let sp = rest.iter().position(|&b| b == b' ')?;
    let seq: u32 = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
    let rest = &rest[sp + 1..];
    if rest.len() < 7 || !rest[..7].eq_ignore_ascii_case(b"FETCH (") {
        return None;
    }
    let mut p = Parser { bytes: response, pos: response.len() - rest.len() + 7 };
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
        let name = p.item_name()?;
        p.expect(b' ')?;
        p.value()?;
        items.push(ResponseItem { name: response_name(&name), range: start..p.pos });
    }
    // Only the line ending may follow.
    let tail = &response[p.pos..];
    (tail == b"\r\n" || tail == b"\n").then_some(FetchResponse { seq, items })
}

struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn expect(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.pos += 1)
    }

    /// `NAME`, `NAME[section]` or `NAME[section]<origin>` (borrowed when it is UTF-8, as
    /// it always is from a server that follows the grammar).
    fn item_name(&mut self) -> Option<std::borrow::Cow<'a, str>> {
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
            if b == b' ' || b == b')' || b == b'(' || b == b'"' || b == b'{' || b < 0x21 {
                break;
            }
            self.pos += 1;
        }
        let bytes: &'a [u8] = self.bytes;
        (self.pos > start).then(|| String::from_utf8_lossy(&bytes[start..self.pos]))
    }

    /// A number, atom, NIL, quoted string, literal (or literal8), or parenthesized list.
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
                    if b == b' ' || b == b')' || b == b'(' || b < 0x21 {
                        break;
                    }
                    // Atoms may carry brackets (flags like \Seen never do; keywords may not).
                    self.pos += 1;
                }
                (self.pos > start).then_some(())
            }
        }
    }
}

/// `(seq, uid)` from the start of an untagged FETCH response (`n FETCH (... UID m ...`,
/// the part after `* `), when the UID appears before any literal: how relayed answers
/// teach the UID map without parsing them whole.
pub fn seq_and_uid(rest: &[u8]) -> Option<(u32, u32)> {
    // Bytes, not text: this runs on every FETCH response relayed to a cached session.
    let sp = memchr::memchr(b' ', rest)?;
    let seq: u32 = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
    let after = &rest[sp + 1..];
    let items = after.strip_prefix(b"FETCH (").or_else(|| after.strip_prefix(b"fetch ("))?;
    let (mut depth, mut previous_uid) = (0i32, false);
    for word in items.split(|&b| b == b' ') {
        if depth == 0 && previous_uid {
            let digits = word.iter().take_while(|b| b.is_ascii_digit()).count();
            return Some((seq, std::str::from_utf8(&word[..digits]).ok()?.parse().ok()?));
        }
        previous_uid = depth == 0 && word.eq_ignore_ascii_case(b"UID");
        for &b in word {
            match b {
                b'[' | b'(' => depth += 1,
                b']' | b')' => depth -= 1,
                b'{' | b'"' => return None,
                _ => {}
            }
        }
    }
    None
}

/// An IMAP sequence set parsed once: its numeric ranges sorted and merged (membership by
/// binary search), and those that end at `*`, which only the last message resolves. A set
/// of thousands of ranges then costs a FETCH of thousands of messages a logarithm each,
/// not a pass over the set per message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SequenceSet {
    ranges: Vec<(u32, u32)>,
    /// The least and the greatest `n` of the ranges `n:*` (`*` alone is `max` itself):
    /// `n:*` covers `min(n, max)..=max(n, max)`.
    star: Option<(Option<u32>, Option<u32>)>,
}

impl SequenceSet {
    /// Unparsable parts match nothing.
    pub fn parse(set: &str) -> SequenceSet {
        let mut out = SequenceSet::default();
        let number = |s: &str| if s == "*" { Some(None) } else { s.parse::<u32>().ok().map(Some) };
        for range in set.split(',') {
            let (a, b) = range.split_once(':').unwrap_or((range, range));
            match (number(a), number(b)) {
                (Some(Some(a)), Some(Some(b))) => out.ranges.push((a.min(b), a.max(b))),
                (Some(Some(n)), Some(None)) | (Some(None), Some(Some(n))) => {
                    let (least, greatest) = out.star.unwrap_or((None, None));
                    out.star = Some((Some(least.map_or(n, |m| m.min(n))), Some(greatest.map_or(n, |m| m.max(n)))));
                }
                (Some(None), Some(None)) => out.star = Some(out.star.unwrap_or((None, None))),
                _ => {}
            }
        }
        out.ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(out.ranges.len());
        for (lo, hi) in out.ranges.drain(..) {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        out.ranges = merged;
        out
    }

    /// Whether `n` is in the set when `max` is the last message (what `*` stands for).
    pub fn contains(&self, n: u32, max: u32) -> bool {
        if let Some((least, greatest)) = self.star {
            let low = least.map_or(max, |l| l.min(max));
            let high = greatest.map_or(max, |g| g.max(max));
            if (low..=high).contains(&n) {
                return true;
            }
        }
        let i = self.ranges.partition_point(|&(_, hi)| hi < n);
        self.ranges.get(i).is_some_and(|&(lo, _)| lo <= n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `fetch_codec` (differential) and `fetch_request` fuzz targets.
    #[test]
    fn partials_and_spacing_are_read_as_the_grammar_says() {
        // A partial's origin is a number: answered as `<9>` whatever its spelling, one key.
        let r = parse_request(b"a FETCH 1 (BODY[TEXT]<09.20>)").unwrap();
        let wanted: Vec<_> = r.cached_items().map(|w| (w.response.to_string(), w.key.to_string())).collect();
        assert_eq!(wanted, [("BODY[TEXT]<9>".to_string(), "BODY[TEXT]<9.20>".to_string())]);
        // A length of zero, signs, or a space at an item's edge: not a valid FETCH, relayed.
        for line in [
            &b"a FETCH 1 (BODY[TEXT]<0.0>)"[..],
            b"a FETCH 1 (BODY[TEXT]<+1.5>)",
            b"a FETCH 1 (BODY[TEXT]<1.+5>)",
            b"a fetch 2 body[] ",
            b"a FETCH 2  BODY[]",
            b"a FETCH 2 (BODY[HEADER.FIELDS\t(FROM)])",
            b"a UID FETCH 9 (UID BODY[001987724718])",
            b"a FETCH 9 BODY[1.0.TEXT]",
            // Found by the differential target: sets, part numbers and field names imap-codec
            // (and Dovecot) refuse, which the upstream-free path could otherwise answer.
            b"a FETCH :3,1 BODY[]",
            b"a FETCH 0 BODY[]",
            b"a FETCH 1:2:3 BODY[]",
            b"a FETCH 1,,2 BODY[]",
            b"a FETCH 1 BODY[4294967296]",
            b"a FETCH 1 BODY[HEADER.FIELDS (FROM\x01)]",
            "a FETCH 1 BODY[HEADER.FIELDS (Fr\u{f6}m)]".as_bytes(),
            // Found replaying the fetch_codec corpus through the fetch_request harness: this
            // was cached alone but relayed within a list.
            b"a FETCH 1 BODY.PEEK[1.HEADER.FIELDS.NOT (BODY[2.2.MV[2.2.MVCCEIREeD)]",
            // In the differential target's "only mailgate" listing: MIME needs a part.
            b"a FETCH 1 BODY[MIME]",
        ] {
            assert_eq!(parse_request(line), None, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn requests_are_split_into_mutable_and_cacheable_items() {
        let r = parse_request(
            b"a1 UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (From  to)]<0.100> BODYSTRUCTURE)",
        )
        .unwrap();
        assert!(r.uid);
        assert_eq!(r.set, "1:*");
        assert_eq!(r.mutable_requests(), ["UID", "FLAGS"]);
        let cached: Vec<_> = r.cached_items().map(|w| (w.response.to_string(), w.class)).collect();
        let keys: Vec<_> = r.cached_items().map(|w| w.key.to_string()).collect();
        // The field names' spelling is part of the key (a server may echo it).
        assert_eq!(keys[1], "BODY[HEADER.FIELDS (FROM TO)]<0.100> as (From to)");
        assert_eq!(
            cached,
            [
                ("RFC822.SIZE".to_string(), Kind::Structure),
                ("BODY[HEADER.FIELDS (FROM TO)]<0>".to_string(), Kind::Header),
                ("BODYSTRUCTURE".to_string(), Kind::Structure)
            ]
        );
        assert!(!r.sets_seen());
        let r = parse_request(b"b fetch 3 body[1.2.MIME]").unwrap();
        assert!(!r.uid && r.sets_seen());
        assert!(parse_request(b"c FETCH 3 RFC822").unwrap().sets_seen());
        assert!(parse_request(b"c FETCH 3 BODY[]").unwrap().sets_seen());
    }

    #[test]
    fn unusual_requests_fall_back_to_pass_through() {
        for line in [
            &b"a FETCH 1 (FLAGS)"[..],               // nothing to cache
            b"a FETCH 1 ALL",                        // macro
            b"a FETCH 1 BINARY[1]",                  // BINARY
            b"a FETCH 1:* (FLAGS) (CHANGEDSINCE 4)", // modifier
            b"a UID FETCH 1 (BODY[] X-GM-LABELS)",   // unknown item
            b"a FETCH $ BODY[]",                     // saved search
            b"a FETCH 1 BODY[HEADER.FIELDS (\"X\")]",
            b"a FETCH 1 BODY[FOO]",
            b"a STORE 1 +FLAGS (\\Seen)",
        ] {
            assert_eq!(parse_request(line), None, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn responses_are_split_into_items_with_literals_and_lists() {
        let response: &[u8] = b"* 12 FETCH (UID 7 FLAGS (\\Seen $Junk) BODY[HEADER.FIELDS (FROM TO)] {18}\r\nFrom: a\r\nTo: b\r\n\r\n \
ENVELOPE (\"date\" {3}\r\na)b NIL ((\"x\" NIL \"y\" \"z\")) NIL NIL NIL NIL NIL \"<id>\") RFC822.SIZE 1234 BODY[]<0> \"\")\r\n";
        let parsed = parse_response(response).unwrap();
        assert_eq!(parsed.seq, 12);
        let names: Vec<&str> = parsed.items.iter().map(|i| i.name.as_ref()).collect();
        assert_eq!(names, ["UID", "FLAGS", "BODY[HEADER.FIELDS (FROM TO)]", "ENVELOPE", "RFC822.SIZE", "BODY[]<0>"]);
        assert_eq!(parsed.uid(response), Some(7));
        assert_eq!(parsed.item(response, "RFC822.SIZE").unwrap(), b"RFC822.SIZE 1234");
        assert_eq!(
            parsed.item(response, "BODY[HEADER.FIELDS (FROM TO)]").unwrap(),
            b"BODY[HEADER.FIELDS (FROM TO)] {18}\r\nFrom: a\r\nTo: b\r\n\r\n"
        );
        assert!(parse_response(b"* 1 FETCH (UID 1 BODY[] {10}\r\nshort)\r\n").is_none());
        assert!(parse_response(b"* 1 EXISTS\r\n").is_none());
        assert!(parse_response(b"* 1 FETCH (UID 1) trailing\r\n").is_none());
    }

    #[test]
    fn requests_whose_answers_share_a_name_are_relayed() {
        for line in [
            &b"a UID FETCH 5 (UID BODY.PEEK[]<0.10> BODY.PEEK[]<0.20>)"[..],
            b"a FETCH 2 (RFC822.SIZE RFC822.SIZE)",
            b"a FETCH 2 (BODY[TEXT] BODY.PEEK[TEXT])",
            b"a FETCH 2 (FLAGS BODY[] flags)",
        ] {
            assert_eq!(parse_request(line), None, "{}", String::from_utf8_lossy(line));
        }
        assert!(parse_request(b"a FETCH 2 (BODY.PEEK[]<0.10> BODY.PEEK[]<10.20>)").is_some());
    }

    #[test]
    fn names_compare_by_meaning_not_spelling() {
        // Courier echoes header field names quoted.
        assert_eq!(normalize("BODY[HEADER.FIELDS (\"From\" \"TO\")]"), "BODY[HEADER.FIELDS (FROM TO)]");
        assert_eq!(normalize("BODY[HEADER.FIELDS.NOT (\"x-a\")]<0>"), "BODY[HEADER.FIELDS.NOT (X-A)]<0>");
        // A quoted string that is not an atom stays quoted and never equals an atom.
        assert_eq!(normalize("BODY[HEADER.FIELDS (\"a b\")]"), "BODY[HEADER.FIELDS (\"A B\")]");
        let response: &[u8] = b"* 1 FETCH (UID 1 BODY[HEADER.FIELDS (\"FROM\")] {9}\r\nFrom: a\r\n RFC822.SIZE 7)\r\n";
        let parsed = parse_response(response).unwrap();
        let request = parse_request(b"a UID FETCH 1 (UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM)])").unwrap();
        for wanted in request.cached_items() {
            assert!(parsed.item(response, wanted.response).is_some(), "{}", wanted.response);
        }
    }

    #[test]
    fn header_field_lists_spelled_otherwise_are_other_entries() {
        let key = |line: &[u8]| parse_request(line).unwrap().cached_items().next().unwrap().key.to_string();
        let upper = key(b"a UID FETCH 1 BODY.PEEK[HEADER.FIELDS (DATE TO)]");
        assert_eq!(upper, "BODY[HEADER.FIELDS (DATE TO)]");
        assert_eq!(key(b"a UID FETCH 1 body.peek[header.fields (DATE TO)]"), upper, "only the field names count");
        let lower = key(b"a UID FETCH 1 BODY.PEEK[HEADER.FIELDS (date To)]");
        assert_ne!(lower, upper);
        assert_eq!(lower, key(b"a UID FETCH 1 BODY.PEEK[HEADER.FIELDS (date   To)]<0.5>").replace("<0.5>", ""));
    }

    #[test]
    fn names_normalize_to_one_spelling() {
        assert_eq!(normalize("body[header.fields ( From   to )]<0>"), "BODY[HEADER.FIELDS (FROM TO)]<0>");
        assert_eq!(normalize(" UID "), "UID");
        assert_eq!(normalize("BODY[HEADER.FIELDS (FROM TO)]"), "BODY[HEADER.FIELDS (FROM TO)]");
    }

    #[test]
    fn common_response_names_cost_no_allocation() {
        let response = b"* 1 FETCH (UID 5 flags (\\Seen) RFC822.SIZE 9 BODY[HEADER] {2}\r\nab)\r\n";
        let parsed = parse_response(response).unwrap();
        let borrowed: Vec<bool> =
            parsed.items.iter().map(|i| matches!(i.name, std::borrow::Cow::Borrowed(_))).collect();
        let names: Vec<&str> = parsed.items.iter().map(|i| i.name.as_ref()).collect();
        assert_eq!(names, ["UID", "FLAGS", "RFC822.SIZE", "BODY[HEADER]"]);
        // Another spelling still gets its normal form, just not for free.
        assert_eq!(borrowed, [true, false, true, false]);
    }

    #[test]
    fn the_fast_path_takes_only_names_already_in_normal_form() {
        for name in [
            "UID",
            "BODY[HEADER.FIELDS (FROM TO)]<0>",
            "BODY[HEADER.FIELDS ( FROM)]",
            "BODY[HEADER.FIELDS (FROM )]",
            "BODY[HEADER.FIELDS  (FROM)]",
            " UID",
            "UID ",
            "body[]",
            "BODY[HEADER.FIELDS (\"A B\")]",
            "BODY[HEADER.FIELDS (\"FROM\")]",
            "RFC822.SIZE",
            "BINARY[1]<0>",
            "BODY[1.MIME]",
            "X\tY",
        ] {
            let normal = normalize(name);
            // (A quoted name that stays quoted takes the slow path: allowed, not needed.)
            assert!(!is_normal(name) || normal == name, "{name:?} -> {normal:?}");
            assert_eq!(normalize(&normal), normal, "{name:?}: normal form is stable");
        }
        for name in ["UID", "FLAGS", "RFC822.SIZE", "BODY[HEADER.FIELDS (FROM TO)]<0>", "BODY[1.MIME]"] {
            assert!(is_normal(name), "{name}");
        }
    }

    #[test]
    fn uids_are_read_from_fetch_heads() {
        assert_eq!(seq_and_uid(b"12 FETCH (UID 345 FLAGS (\\Seen))"), Some((12, 345)));
        assert_eq!(seq_and_uid(b"12 FETCH (FLAGS (\\Seen UID) UID 7)"), Some((12, 7)));
        assert_eq!(seq_and_uid(b"3 FETCH (BODY[HEADER.FIELDS (UID)] {5}"), None);
        assert_eq!(seq_and_uid(b"3 FETCH (UID 9)"), Some((3, 9)));
        assert_eq!(seq_and_uid(b"3 EXISTS"), None);
    }

    #[test]
    fn sequence_sets() {
        let set_contains = |set: &str, n, max| SequenceSet::parse(set).contains(n, max);
        assert!(set_contains("1:4,7,9:*", 3, 20));
        assert!(set_contains("1:4,7,9:*", 20, 20));
        assert!(!set_contains("1:4,7,9:*", 8, 20));
        assert!(set_contains("*:5", 7, 7));
        assert!(set_contains("*", 7, 7));
        assert!(set_contains("400:*", 300, 300), "n:* past the end still names the last");
        assert!(!set_contains("400:*", 299, 300));
        assert!(set_contains("9:3,1", 5, 20));
    }

    #[test]
    fn a_parsed_set_agrees_with_the_definition() {
        // The definition, range by range (RFC 9051 §9, seq-range), against the parsed form.
        let naive = |set: &str, n: u32, max: u32| {
            let value = |s: &str| if s == "*" { Some(max) } else { s.parse::<u32>().ok() };
            set.split(',').any(|range| match range.split_once(':') {
                Some((a, b)) => {
                    matches!((value(a), value(b)), (Some(a), Some(b)) if (a.min(b)..=a.max(b)).contains(&n))
                }
                None => value(range) == Some(n),
            })
        };
        let mut seed = 7u64;
        let mut next = |m: u32| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) % u64::from(m)) as u32
        };
        for _ in 0..300 {
            let parts: Vec<String> = (0..1 + next(6))
                .map(|_| match next(5) {
                    0 => "*".to_string(),
                    1 => format!("{}:*", 1 + next(40)),
                    2 => format!("*:{}", 1 + next(40)),
                    3 => (1 + next(40)).to_string(),
                    _ => format!("{}:{}", 1 + next(40), 1 + next(40)),
                })
                .collect();
            let set = parts.join(",");
            let parsed = SequenceSet::parse(&set);
            for max in [1, 17, 40, 55] {
                for n in 0..=60 {
                    assert_eq!(parsed.contains(n, max), naive(&set, n, max), "{set} n={n} max={max}");
                }
            }
        }
        // Thousands of ranges merge into what they cover.
        let many: Vec<String> = (0..9000).map(|i| format!("{}:{}", i * 2 + 1, i * 2 + 2)).collect();
        let parsed = SequenceSet::parse(&many.join(","));
        assert_eq!(parsed.ranges, [(1, 18000)]);
    }
}
