//! Sans-I/O POP3 framing: client command lines, and upstream responses, single-line or
//! multi-line with dot-stuffing (RFC 1939 §3).
//!
//! Commands are short (RFC 2449 §4: at most 255 octets with CRLF) and are buffered whole.
//! Responses are streamed: the scanner buffers only the status line (bounded) and then
//! reports how many bytes of a multi-line body to forward, watching line starts for the
//! terminating `.` line. A body line starting with `.` is dot-stuffed (`..`) and forwarded
//! as is, so the relay never changes a byte.

use memchr::memchr;

/// RFC 2449 §4: a command line is at most 255 octets including CRLF.
pub const MAX_COMMAND_LINE: usize = 255;
/// RFC 2449 §4 allows 512 octets for a response's first line; some servers say more.
pub const MAX_STATUS_LINE: usize = 4096;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("line longer than {0} octets")]
    LineTooLong(usize),
}

/// Splits input into lines of at most `max` octets (line ending included).
#[derive(Debug)]
pub struct LineReader {
    max: usize,
    line: Vec<u8>,
}

impl LineReader {
    pub fn new(max: usize) -> Self {
        LineReader { max, line: Vec::new() }
    }

    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    pub fn reset(&mut self) {
        self.line.clear();
    }

    /// The bytes of the line taken so far (a refused line's beginning).
    pub fn pending(&self) -> &[u8] {
        &self.line
    }

    /// Consumes input up to the end of a line; returns the bytes consumed and, when a line
    /// completed, the line without its ending.
    pub fn feed(&mut self, input: &[u8]) -> Result<(usize, Option<Vec<u8>>), CodecError> {
        let (consumed, complete) = match memchr(b'\n', input) {
            Some(i) => (i + 1, true),
            None => (input.len(), false),
        };
        if self.line.len() + consumed > self.max {
            return Err(CodecError::LineTooLong(self.max));
        }
        self.line.extend_from_slice(&input[..consumed]);
        if !complete {
            return Ok((consumed, None));
        }
        let mut line = std::mem::take(&mut self.line);
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok((consumed, Some(line)))
    }
}

/// The keyword of a command line, upper-cased, and the rest after one space.
pub fn split_command(line: &[u8]) -> (String, &[u8]) {
    let (keyword, rest) = match line.iter().position(|&b| b == b' ') {
        Some(sp) => (&line[..sp], &line[sp + 1..]),
        None => (line, &b""[..]),
    };
    (String::from_utf8_lossy(keyword).to_ascii_uppercase(), rest)
}

/// Whether a command's `+OK` answer is followed by a multi-line body (RFC 1939, 2449).
pub fn multiline_if_ok(keyword: &str, args: &[u8]) -> bool {
    let has_args = args.iter().any(|b| !b.is_ascii_whitespace());
    match keyword {
        "RETR" | "TOP" | "CAPA" => true,
        "LIST" | "UIDL" => !has_args,
        // `AUTH` without a mechanism lists the mechanisms (a common extension).
        "AUTH" => !has_args,
        _ => false,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The status line (without ending) is complete; `ok` is `+OK`. When `body` is false the
    /// response is complete.
    Status { ok: bool, line: Vec<u8>, body: bool },
    /// The terminating `.` line of a multi-line body was consumed.
    End,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub consumed: usize,
    pub event: Option<Event>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    LineStart,
    Mid,
    Dot,
    DotCr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Status { multiline_if_ok: bool },
    Body(Body),
}

/// A line that starts with a dot, from the end of the line before it.
static DOT_LINE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\n."));

/// Follows upstream responses; the caller says before each one whether `+OK` brings a body.
#[derive(Debug)]
pub struct ResponseScanner {
    state: State,
    status: Vec<u8>,
}

impl Default for ResponseScanner {
    fn default() -> Self {
        ResponseScanner { state: State::Status { multiline_if_ok: false }, status: Vec::new() }
    }
}

impl ResponseScanner {
    /// Sets what the next response is (call between responses).
    pub fn expect(&mut self, multiline_if_ok: bool) {
        debug_assert!(self.at_boundary());
        self.state = State::Status { multiline_if_ok };
    }

    /// True between responses.
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Status { .. }) && self.status.is_empty()
    }

    pub fn feed(&mut self, input: &[u8]) -> Result<Step, CodecError> {
        match self.state {
            State::Status { multiline_if_ok } => {
                let (consumed, complete) = match memchr(b'\n', input) {
                    Some(i) => (i + 1, true),
                    None => (input.len(), false),
                };
                if self.status.len() + consumed > MAX_STATUS_LINE {
                    return Err(CodecError::LineTooLong(MAX_STATUS_LINE));
                }
                self.status.extend_from_slice(&input[..consumed]);
                if !complete {
                    return Ok(Step { consumed, event: None });
                }
                let mut line = std::mem::take(&mut self.status);
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                let ok = line.starts_with(b"+OK");
                let body = ok && multiline_if_ok;
                self.state = if body { State::Body(Body::LineStart) } else { State::Status { multiline_if_ok: false } };
                Ok(Step { consumed, event: Some(Event::Status { ok, line, body }) })
            }
            State::Body(mut at) => {
                let mut i = 0;
                while i < input.len() {
                    if at == Body::Mid {
                        // Inside a line, only the start of a line that begins with a dot
                        // matters (the end, or a stuffed line): one search across the many
                        // lines of a message instead of a search per line.
                        match DOT_LINE.find(&input[i..]) {
                            Some(n) => {
                                i += n + 1;
                                at = Body::LineStart;
                                continue;
                            }
                            None => {
                                if input.last() == Some(&b'\n') {
                                    at = Body::LineStart;
                                }
                                break;
                            }
                        }
                    }
                    let byte = input[i];
                    i += 1;
                    at = match (at, byte) {
                        (Body::LineStart, b'.') => Body::Dot,
                        (Body::Dot, b'\r') => Body::DotCr,
                        (Body::Dot | Body::DotCr, b'\n') => {
                            self.state = State::Status { multiline_if_ok: false };
                            return Ok(Step { consumed: i, event: Some(Event::End) });
                        }
                        (_, b'\n') => Body::LineStart,
                        _ => Body::Mid,
                    };
                }
                self.state = State::Body(at);
                Ok(Step { consumed: input.len(), event: None })
            }
        }
    }
}

/// Undoes dot-stuffing of a multi-line body (without its terminating line). The relay
/// never does (it passes bytes as they are); the tests and the fuzz harness check what
/// clients will see.
#[doc(hidden)]
pub fn unstuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut line_start = true;
    for (i, &b) in body.iter().enumerate() {
        if !(line_start && b == b'.' && body.get(i + 1) == Some(&b'.')) {
            out.push(b);
        }
        line_start = b == b'\n';
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds a scripted session in `chunk`-sized pieces; returns (events, bytes per response).
    fn scan(input: &[u8], expectations: &[bool], chunk: usize) -> (Vec<Event>, Vec<Vec<u8>>) {
        let mut scanner = ResponseScanner::default();
        let mut expectations = expectations.iter();
        scanner.expect(*expectations.next().unwrap());
        let (mut events, mut responses, mut current) = (Vec::new(), Vec::new(), Vec::new());
        for piece in input.chunks(chunk) {
            let mut rest = piece;
            while !rest.is_empty() {
                let step = scanner.feed(rest).unwrap();
                current.extend_from_slice(&rest[..step.consumed]);
                rest = &rest[step.consumed..];
                if let Some(event) = step.event {
                    let done = matches!(event, Event::End | Event::Status { body: false, .. });
                    events.push(event);
                    if done {
                        responses.push(std::mem::take(&mut current));
                        if let Some(&next) = expectations.next() {
                            scanner.expect(next);
                        }
                    }
                }
            }
        }
        assert!(current.is_empty(), "left over: {current:?}");
        (events, responses)
    }

    const SESSION: &[u8] = b"+OK 2 messages\r\n\
+OK 2 messages (320 octets)\r\n1 120\r\n2 200\r\n.\r\n\
+OK 120 octets\r\nSubject: x\r\n\r\n..leading dot\r\n..\r\n...\r\nend.\r\n.\r\n\
-ERR [IN-USE] no such message\r\n\
+OK\r\n.\r\n";

    #[test]
    fn responses_split_identically_in_any_chunking() {
        let expectations = [false, true, true, true, true];
        let (events, responses) = scan(SESSION, &expectations, SESSION.len());
        assert_eq!(responses.len(), 5);
        assert_eq!(responses.concat(), SESSION);
        assert_eq!(
            responses[2],
            b"+OK 120 octets\r\nSubject: x\r\n\r\n..leading dot\r\n..\r\n...\r\nend.\r\n.\r\n".to_vec(),
            "dot-stuffed lines do not end the body"
        );
        assert!(
            matches!(&events[5], Event::Status { ok: false, line, body: false } if line.starts_with(b"-ERR [IN-USE]"))
        );
        for chunk in 1..=512 {
            assert_eq!(scan(SESSION, &expectations, chunk), (events.clone(), responses.clone()), "chunk {chunk}");
        }
    }

    #[test]
    fn status_line_is_bounded() {
        let mut scanner = ResponseScanner::default();
        scanner.expect(false);
        assert_eq!(scanner.feed(&vec![b'x'; MAX_STATUS_LINE + 1]), Err(CodecError::LineTooLong(MAX_STATUS_LINE)));
    }

    #[test]
    fn command_lines_are_bounded_and_chunk_independent() {
        let input = b"USER alice\r\nPASS s3cret pw\r\nLIST\r\nTOP 1 10\r\n";
        let expected: Vec<Vec<u8>> =
            vec![b"USER alice".to_vec(), b"PASS s3cret pw".to_vec(), b"LIST".to_vec(), b"TOP 1 10".to_vec()];
        for chunk in 1..=512 {
            let mut reader = LineReader::new(MAX_COMMAND_LINE);
            let mut lines = Vec::new();
            for piece in input.chunks(chunk) {
                let mut rest = piece;
                while !rest.is_empty() {
                    let (n, line) = reader.feed(rest).unwrap();
                    rest = &rest[n..];
                    lines.extend(line);
                }
            }
            assert_eq!(lines, expected, "chunk {chunk}");
        }
        let mut reader = LineReader::new(MAX_COMMAND_LINE);
        assert_eq!(reader.feed(&[b'a'; 256]), Err(CodecError::LineTooLong(255)));
    }

    #[test]
    fn which_commands_bring_a_body() {
        assert!(multiline_if_ok("LIST", b""));
        assert!(!multiline_if_ok("LIST", b"3"));
        assert!(multiline_if_ok("UIDL", b" "));
        assert!(multiline_if_ok("RETR", b"1"));
        assert!(multiline_if_ok("TOP", b"1 0"));
        assert!(!multiline_if_ok("STAT", b""));
        assert!(!multiline_if_ok("DELE", b"1"));
        assert_eq!(split_command(b"top 1 5"), ("TOP".to_string(), &b"1 5"[..]));
    }

    /// Random responses in random chunks never panic, always make progress, and a body
    /// ends only at a lone dot line.
    #[test]
    fn random_responses_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        const ALPHABET: &[u8] = b"\r\n..+-OKER x";
        for _ in 0..2000 {
            let mut scanner = ResponseScanner::default();
            scanner.expect(next() % 2 == 0);
            let len = (next() % 400) as usize;
            let input: Vec<u8> = (0..len).map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize]).collect();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let chunk = 1 + (next() % 13) as usize;
                let piece = &rest[..chunk.min(rest.len())];
                match scanner.feed(piece) {
                    Ok(step) => {
                        assert!(step.consumed > 0 && step.consumed <= piece.len());
                        rest = &rest[step.consumed..];
                        if step.event.is_some() && scanner.at_boundary() {
                            scanner.expect(next() % 2 == 0);
                        }
                    }
                    Err(CodecError::LineTooLong(_)) => break,
                }
            }
        }
    }

    #[test]
    fn unstuffing_removes_one_leading_dot() {
        assert_eq!(unstuff(b"..a\r\nb..\r\n...\r\n"), b".a\r\nb..\r\n..\r\n");
    }
}
