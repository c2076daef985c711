//! Sans-I/O framing of an IMAP byte stream into lines and literals.
//!
//! Both directions of the relay and the pre-authentication front use it. It never buffers a
//! line: it reports how many input bytes belong to the current fragment so that the caller can
//! forward them at once, and keeps only what interception needs, the first [`HEAD_LEN`] bytes
//! of each line (tag, command or status) and its last few bytes (a literal announcement
//! `{n}`, `{n+}` or `~{n}`). Memory per stream is therefore constant whatever the peer sends.
//!
//! A line that announces a literal stops the framer until the caller decides
//! ([`Framer::accept_literal`] / [`Framer::reject_literal`]): a synchronizing literal that the
//! receiver refuses is never sent, so the next bytes are a new line. Guessing here would let
//! literal data be read as commands, the confusion that smuggling attacks live on.

use memchr::memchr;

/// How much of each line's start is kept for the caller.
pub const HEAD_LEN: usize = 256;
/// Enough for `~{` + 20 digits + `+}` + CRLF.
const TAIL_LEN: usize = 32;

/// A literal announced at the end of a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Announce {
    /// Octets that follow; `u64::MAX` when the number does not fit (always over any limit).
    pub len: u64,
    /// `{n+}` (LITERAL+/LITERAL-): the sender does not wait for a continuation.
    pub non_sync: bool,
    /// `~{n}`: a literal8 (BINARY), which may contain NUL.
    pub binary: bool,
}

/// A complete line (its bytes were all counted in `consumed`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// The first bytes of the line, without the line ending if it fits.
    pub head: Vec<u8>,
    /// Total length including the line ending.
    pub len: usize,
    pub announce: Option<Announce>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Line(Line),
    LiteralEnd,
}

/// What one call to [`Framer::feed`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Input bytes that belong to the current fragment; forward or store them.
    pub consumed: usize,
    /// Set when those bytes completed a fragment.
    pub event: Option<Event>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("line longer than {0} bytes")]
    LineTooLong(usize),
    #[error("a literal was announced and not yet accepted or rejected")]
    LiteralUndecided,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Line,
    Undecided,
    Literal { remaining: u64 },
}

/// What the bytes of the current line that no longer fit in the tail ended with, as far as
/// an announcement is concerned. A literal's length is `number` (RFC 9051 §9: any count of
/// digits, leading zeros too), so `{` may have left the tail while the digits and `}` are
/// still in it: `{0000…00005}` announces 5 octets, and missing it would let the data of a
/// literal the upstream waits for pass as lines (smuggling past every check of a line).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Cut {
    #[default]
    Other,
    /// `{` or `~{` and digits; `significant`: one of the digits cut off is not `0`.
    Open { binary: bool, significant: bool },
}

impl Cut {
    /// Follows the bytes cut off the front of the tail, in order; `before` is the byte cut
    /// just before them. Only the digits at the end are looked at, so this is cheap.
    fn follow(self, cut: &[u8], before: Option<u8>) -> Cut {
        let significant = |digits: &[u8]| digits.iter().any(|&d| d != b'0');
        match cut.iter().rposition(|b| !b.is_ascii_digit()) {
            Some(i) if cut[i] == b'{' => {
                let binary = if i > 0 { cut[i - 1] == b'~' } else { before == Some(b'~') };
                Cut::Open { binary, significant: significant(&cut[i + 1..]) }
            }
            Some(_) => Cut::Other,
            None => match self {
                Cut::Open { binary, significant: s } => Cut::Open { binary, significant: s || significant(cut) },
                Cut::Other => Cut::Other,
            },
        }
    }
}

#[derive(Debug)]
pub struct Framer {
    max_line: usize,
    state: State,
    line_len: usize,
    head: Vec<u8>,
    tail: Vec<u8>,
    pending: Option<Announce>,
    /// The part of the line cut off the tail, and its last byte.
    cut: Cut,
    cut_last: Option<u8>,
    /// A literal was accepted: the line goes on after it, up to a line without one.
    continued: bool,
}

impl Framer {
    pub fn new(max_line: usize) -> Self {
        Framer {
            max_line,
            state: State::Line,
            line_len: 0,
            head: Vec::with_capacity(HEAD_LEN),
            tail: Vec::with_capacity(TAIL_LEN * 2),
            pending: None,
            cut: Cut::Other,
            cut_last: None,
            continued: false,
        }
    }

    /// True between commands or responses: nothing of one has been seen yet, or the last
    /// one is complete. Not right after a literal: the line it sits in goes on after it
    /// (`)\r\n` at least).
    pub fn at_boundary(&self) -> bool {
        self.state == State::Line && self.line_len == 0 && !self.continued
    }

    pub fn in_literal(&self) -> bool {
        matches!(self.state, State::Literal { .. })
    }

    /// The announced literal awaiting a decision, if any.
    pub fn pending_literal(&self) -> Option<Announce> {
        self.pending
    }

    /// The announced literal follows: the next `len` bytes are data, not lines.
    pub fn accept_literal(&mut self) {
        if let Some(announce) = self.pending.take() {
            self.state = if announce.len == 0 { State::Line } else { State::Literal { remaining: announce.len } };
            self.continued = true;
        }
    }

    /// The literal will not be sent (its command was refused): the next bytes are a new line.
    pub fn reject_literal(&mut self) {
        self.pending = None;
        self.state = State::Line;
        self.continued = false;
    }

    /// The longest line accepted from now on, the current one included (a caller that
    /// learns from a line's first bytes that its command may be longer raises it).
    pub fn set_max_line(&mut self, max_line: usize) {
        self.max_line = max_line;
    }

    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Gives a finished line's `head` back for the next line to fill: a relay frames a
    /// line per response of a sync, and an allocation each would be most of its cost.
    pub fn recycle(&mut self, mut head: Vec<u8>) {
        if self.head.capacity() == 0 && head.capacity() >= HEAD_LEN {
            head.clear();
            self.head = head;
        }
    }

    /// Forgets everything, e.g. after STARTTLS.
    pub fn reset(&mut self) {
        *self = Framer::new(self.max_line);
    }

    pub fn feed(&mut self, input: &[u8]) -> Result<Step, FrameError> {
        match self.state {
            State::Undecided => Err(FrameError::LiteralUndecided),
            State::Literal { remaining } => {
                let take = remaining.min(input.len() as u64);
                let remaining = remaining - take;
                if remaining == 0 {
                    self.state = State::Line;
                    Ok(Step { consumed: take as usize, event: Some(Event::LiteralEnd) })
                } else {
                    self.state = State::Literal { remaining };
                    Ok(Step { consumed: take as usize, event: None })
                }
            }
            State::Line => {
                let (consumed, complete) = match memchr(b'\n', input) {
                    Some(i) => (i + 1, true),
                    None => (input.len(), false),
                };
                // Refused without taking anything: the caller may raise the limit and feed
                // the same bytes again.
                if self.line_len + consumed > self.max_line {
                    return Err(FrameError::LineTooLong(self.max_line));
                }
                self.line_len += consumed;
                let chunk = &input[..consumed];
                let room = HEAD_LEN.saturating_sub(self.head.len());
                self.head.extend_from_slice(&chunk[..room.min(chunk.len())]);
                self.push_tail(chunk);
                if !complete {
                    return Ok(Step { consumed, event: None });
                }
                let announce = self.announce();
                let mut head = std::mem::take(&mut self.head);
                if head.len() < HEAD_LEN || head.len() == self.line_len {
                    let body = strip_eol(&head).len();
                    head.truncate(body);
                }
                let line = Line { head, len: self.line_len, announce };
                self.line_len = 0;
                self.tail.clear();
                (self.cut, self.cut_last) = (Cut::Other, None);
                if announce.is_some() {
                    self.pending = announce;
                    self.state = State::Undecided;
                } else {
                    self.continued = false;
                }
                Ok(Step { consumed, event: Some(Event::Line(line)) })
            }
        }
    }

    fn push_tail(&mut self, chunk: &[u8]) {
        if chunk.len() >= TAIL_LEN {
            self.cut_off(None, chunk.len() - TAIL_LEN, chunk);
            self.tail.clear();
            self.tail.extend_from_slice(&chunk[chunk.len() - TAIL_LEN..]);
        } else {
            self.tail.extend_from_slice(chunk);
            if self.tail.len() > TAIL_LEN {
                let excess = self.tail.len() - TAIL_LEN;
                self.cut_off(Some(excess), 0, &[]);
                self.tail.drain(..excess);
            }
        }
    }

    /// Follows what leaves the tail: its first `from_tail` bytes (all of it when `None`),
    /// then the first `from_chunk` bytes of `chunk`.
    fn cut_off(&mut self, from_tail: Option<usize>, from_chunk: usize, chunk: &[u8]) {
        let tail = &self.tail[..from_tail.unwrap_or(self.tail.len())];
        for part in [tail, &chunk[..from_chunk]] {
            if let Some(&last) = part.last() {
                self.cut = self.cut.follow(part, self.cut_last);
                self.cut_last = Some(last);
            }
        }
    }

    /// The literal the line announces: from its tail, and from what was cut off it when
    /// the tail holds only the end of a long run of digits.
    fn announce(&self) -> Option<Announce> {
        let end = strip_eol(&self.tail);
        if let Some(mut announce) = parse_announce(end) {
            // `~` of `~{n}` cut off, `{` the tail's first byte.
            if end.iter().rposition(|&b| b == b'{') == Some(0) && self.cut_last == Some(b'~') {
                announce.binary = true;
            }
            return Some(announce);
        }
        let Cut::Open { binary, significant } = self.cut else { return None };
        let body = end.strip_suffix(b"}")?;
        let (digits, non_sync) = match body.strip_suffix(b"+") {
            Some(digits) => (digits, true),
            None => (body, false),
        };
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        // Digits only, and `{` was cut off just before them: an announcement whose number
        // has more digits than the tail holds. A significant digit cut off makes it too
        // large for a u64 (at least 10^20), like `parse_announce` says for any overflow.
        let len = match significant {
            true => u64::MAX,
            false => std::str::from_utf8(digits).ok()?.parse::<u64>().unwrap_or(u64::MAX),
        };
        Some(Announce { len, non_sync, binary })
    }
}

/// The line without its CRLF (or bare LF, which Dovecot and most servers also accept).
pub fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `{123}`, `{123+}` or `~{123}` at the very end of a line.
pub fn parse_announce(line: &[u8]) -> Option<Announce> {
    let body = line.strip_suffix(b"}")?;
    let (body, non_sync) = match body.strip_suffix(b"+") {
        Some(b) => (b, true),
        None => (body, false),
    };
    let open = body.iter().rposition(|&b| b == b'{')?;
    let digits = &body[open + 1..];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let binary = open > 0 && body[open - 1] == b'~';
    let len = std::str::from_utf8(digits).ok()?.parse::<u64>().unwrap_or(u64::MAX);
    Some(Announce { len, non_sync, binary })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a framer over `input` in chunks of `chunk` bytes, accepting every literal;
    /// returns the fragments as (kind, bytes).
    fn fragments(input: &[u8], chunk: usize) -> Vec<(char, Vec<u8>)> {
        let mut framer = Framer::new(1 << 20);
        let mut out: Vec<(char, Vec<u8>)> = Vec::new();
        let mut current = Vec::new();
        for piece in input.chunks(chunk) {
            let mut rest = piece;
            while !rest.is_empty() {
                if framer.pending_literal().is_some() {
                    framer.accept_literal();
                }
                let step = framer.feed(rest).unwrap();
                current.extend_from_slice(&rest[..step.consumed]);
                rest = &rest[step.consumed..];
                match step.event {
                    Some(Event::Line(line)) => {
                        assert_eq!(line.len, current.len());
                        out.push(('L', std::mem::take(&mut current)));
                        if line.announce.map(|a| a.len) == Some(0) {
                            framer.accept_literal();
                        }
                    }
                    Some(Event::LiteralEnd) => out.push(('D', std::mem::take(&mut current))),
                    None => {}
                }
            }
        }
        assert!(current.is_empty(), "incomplete fragment left: {current:?}");
        out
    }

    #[test]
    fn lines_and_literals_split_identically_in_any_chunking() {
        let input: &[u8] = b"a LOGIN {5}\r\nalice {6+}\r\nsecret\r\n* 1 FETCH (BODY[] {3}\r\n\r\n.)\r\nb NOOP\r\n";
        let whole = fragments(input, input.len());
        assert_eq!(
            whole,
            vec![
                ('L', b"a LOGIN {5}\r\n".to_vec()),
                ('D', b"alice".to_vec()),
                ('L', b" {6+}\r\n".to_vec()),
                ('D', b"secret".to_vec()),
                ('L', b"\r\n".to_vec()),
                ('L', b"* 1 FETCH (BODY[] {3}\r\n".to_vec()),
                ('D', b"\r\n.".to_vec()),
                ('L', b")\r\n".to_vec()),
                ('L', b"b NOOP\r\n".to_vec()),
            ]
        );
        for chunk in 1..=512 {
            assert_eq!(fragments(input, chunk), whole, "chunk size {chunk}");
        }
    }

    #[test]
    fn a_response_ends_at_its_last_line_not_at_a_literals_end() {
        let mut framer = Framer::new(1 << 20);
        assert!(framer.at_boundary());
        let head = b"* 1 FETCH (BODY[] {3}\r\n";
        assert_eq!(framer.feed(head).unwrap().consumed, head.len());
        framer.accept_literal();
        assert!(!framer.at_boundary());
        assert_eq!(framer.feed(b"abc").unwrap().event, Some(Event::LiteralEnd));
        assert!(!framer.at_boundary(), "`)\\r\\n` is still to come");
        framer.feed(b")\r\n").unwrap();
        assert!(framer.at_boundary());
        // The same with an empty literal, and a refused one ends the command.
        framer.feed(b"a APPEND x {0}\r\n").unwrap();
        framer.accept_literal();
        assert!(!framer.at_boundary());
        framer.feed(b"\r\n").unwrap();
        assert!(framer.at_boundary());
        framer.feed(b"b APPEND x {9}\r\n").unwrap();
        framer.reject_literal();
        assert!(framer.at_boundary());
    }

    #[test]
    fn announcements_are_recognised_only_at_line_end() {
        assert_eq!(parse_announce(b"a LOGIN {5}"), Some(Announce { len: 5, non_sync: false, binary: false }));
        assert_eq!(parse_announce(b"a APPEND x {5+}"), Some(Announce { len: 5, non_sync: true, binary: false }));
        assert_eq!(parse_announce(b"a APPEND x ~{7}"), Some(Announce { len: 7, non_sync: false, binary: true }));
        assert_eq!(parse_announce(b"a LOGIN {99999999999999999999}").unwrap().len, u64::MAX);
        assert_eq!(parse_announce(b"a LOGIN {5} x"), None);
        assert_eq!(parse_announce(b"a LOGIN {}"), None);
        assert_eq!(parse_announce(b"a LOGIN {-5}"), None);
        assert_eq!(parse_announce(b"{x5}"), None);
    }

    #[test]
    fn long_lines_keep_head_and_announcement_but_not_the_middle() {
        let mut line = b"* SEARCH".to_vec();
        for uid in 1..20_000 {
            line.extend_from_slice(format!(" {uid}").as_bytes());
        }
        line.extend_from_slice(b" {4}\r\n");
        let mut framer = Framer::new(1 << 20);
        let mut event = None;
        for piece in line.chunks(1000) {
            let step = framer.feed(piece).unwrap();
            assert_eq!(step.consumed, piece.len());
            event = step.event.or(event);
        }
        let Some(Event::Line(parsed)) = event else { panic!("no line") };
        assert_eq!(parsed.head.len(), HEAD_LEN);
        assert!(parsed.head.starts_with(b"* SEARCH 1 2 3"));
        assert_eq!(parsed.len, line.len());
        assert_eq!(parsed.announce.unwrap().len, 4);
        assert!(framer.capacity_is_bounded());
    }

    /// Found by the `imap_framer` fuzz target: the framer keeps only a line's last 32 bytes,
    /// and an announcement of more digits than that (`{0000…0005}`: leading zeros are valid)
    /// went unseen, so a literal's data would have been taken for lines.
    #[test]
    fn announcements_longer_than_the_kept_tail_are_seen() {
        let zeros = "0".repeat(40);
        for (line, len, non_sync, binary) in [
            (format!("a APPEND x {{{zeros}60000000}}\r\n"), 60_000_000, false, false),
            (format!("a APPEND x {{{zeros}5+}}\r\n"), 5, true, false),
            (format!("a APPEND x ~{{{zeros}5}}\r\n"), 5, false, true),
            (format!("a LOGIN {{{}}}\r\n", "9".repeat(40)), u64::MAX, false, false),
            (format!("a APPEND x ~{{{}}}\r\n", "0".repeat(27)), 0, false, true),
        ] {
            for chunk in [1, 3, 7, 31, 32, 33, line.len()] {
                let mut framer = Framer::new(1 << 20);
                let mut event = None;
                for piece in line.as_bytes().chunks(chunk) {
                    event = framer.feed(piece).unwrap().event.or(event);
                }
                let Some(Event::Line(parsed)) = event else { panic!("no line") };
                assert_eq!(parsed.announce, Some(Announce { len, non_sync, binary }), "{line} in chunks of {chunk}");
                assert_eq!(parsed.announce, parse_announce(strip_eol(line.as_bytes())));
            }
        }
        // Digits and `}` without `{` announce nothing, however long.
        let mut framer = Framer::new(1 << 20);
        let line = format!("* OK x{}}}\r\n", "0".repeat(40));
        let Some(Event::Line(parsed)) = framer.feed(line.as_bytes()).unwrap().event else { panic!("no line") };
        assert_eq!(parsed.announce, None);
    }

    #[test]
    fn line_limit_is_enforced_without_a_line_ending() {
        let mut framer = Framer::new(100);
        assert!(framer.feed(&[b'x'; 100]).is_ok());
        assert_eq!(framer.feed(b"x"), Err(FrameError::LineTooLong(100)));
    }

    #[test]
    fn a_refused_line_goes_on_under_a_raised_limit() {
        let mut framer = Framer::new(10);
        assert_eq!(framer.feed(b"a ID (\"x\"").unwrap().consumed, 9);
        assert_eq!(framer.feed(b" \"long value\")\r\n"), Err(FrameError::LineTooLong(10)));
        framer.set_max_line(100);
        let step = framer.feed(b" \"long value\")\r\n").unwrap();
        let Some(Event::Line(line)) = step.event else { panic!("{step:?}") };
        assert_eq!((line.len, line.head.as_slice()), (25, &b"a ID (\"x\" \"long value\")"[..]));
    }

    #[test]
    fn rejected_literal_lets_the_next_line_through() {
        let mut framer = Framer::new(1000);
        let step = framer.feed(b"a LOGIN {100000}\r\nb NOOP\r\n").unwrap();
        assert_eq!(step.consumed, 18);
        assert_eq!(framer.feed(b"b NOOP\r\n"), Err(FrameError::LiteralUndecided));
        framer.reject_literal();
        let step = framer.feed(b"b NOOP\r\n").unwrap();
        assert_eq!(step.event, Some(Event::Line(Line { head: b"b NOOP".to_vec(), len: 8, announce: None })));
    }

    /// Random bytes (weighted towards the characters that matter: CR, LF, braces, digits,
    /// `+`, `~`) in random chunks never panic, always make progress and stay bounded.
    #[test]
    fn random_input_never_panics_and_always_progresses() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        const ALPHABET: &[u8] = b"\r\n{}+~0123456789 aA*()[]\"\\\0\xff";
        for _ in 0..2000 {
            let mut framer = Framer::new(64);
            let len = (next() % 300) as usize;
            let input: Vec<u8> = (0..len).map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize]).collect();
            let mut rest = &input[..];
            while !rest.is_empty() {
                if framer.pending_literal().is_some() {
                    if next() % 2 == 0 {
                        framer.accept_literal();
                    } else {
                        framer.reject_literal();
                    }
                }
                let chunk = 1 + (next() % 17) as usize;
                let piece = &rest[..chunk.min(rest.len())];
                match framer.feed(piece) {
                    Ok(step) => {
                        assert!(step.consumed <= piece.len());
                        assert!(step.consumed > 0 || framer.pending_literal().is_some(), "no progress");
                        rest = &rest[step.consumed..];
                    }
                    Err(FrameError::LineTooLong(_)) => break,
                    Err(FrameError::LiteralUndecided) => unreachable!("decided above"),
                }
                assert!(framer.capacity_is_bounded());
            }
        }
    }

    impl Framer {
        fn capacity_is_bounded(&self) -> bool {
            self.head.capacity() <= HEAD_LEN * 2 && self.tail.capacity() <= TAIL_LEN * 4
        }
    }
}
