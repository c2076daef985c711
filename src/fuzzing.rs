//! Fuzz harnesses: one function per parser that sees bytes from the network, each checking
//! a property of that parser (not only that it does not panic). A violated property panics.
//!
//! The coverage-guided targets in `fuzz/` call these, and `tests/fuzz_corpora.rs` replays
//! every committed corpus file through the same functions on stable, so a crash found once
//! stays fixed. Nothing here is used by the gateway itself.
//!
//! The first bytes of an input often choose knobs (a line limit, how the input is cut into
//! reads): the same bytes always make the same choices, so every finding replays.

use crate::auth::{self, Credentials};
use crate::imap::command::{self, Command, Part};
use crate::imap::fetch::{self, SequenceSet};
use crate::imap::framing::{parse_announce, strip_eol, Event, FrameError, Framer, HEAD_LEN};
use crate::pop3::codec::{self, LineReader, ResponseScanner};
use crate::proxy_header::{self, Header, Parsed};
use crate::secret::Secret;

/// Read sizes drawn from a seed: what a socket may hand over at a time.
struct Reads(u64);

impl Reads {
    fn next(&mut self, max: usize) -> usize {
        // xorshift64*: deterministic, no dependency.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        1 + (r % max.max(1) as u64) as usize
    }
}

fn reads(seed: u8) -> Reads {
    Reads(0x9e37_79b9_7f4a_7c15 ^ u64::from(seed).wrapping_mul(0x1000_0000_01b3) | 1)
}

/// Splits `data` into a knob byte and the rest.
fn knob(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((&k, rest)) => (k, rest),
        None => (0, data),
    }
}

// ---------------------------------------------------------------------------------------
// IMAP framer

#[derive(Debug, PartialEq, Eq)]
enum Fragment {
    Line {
        bytes: Vec<u8>,
        head: Vec<u8>,
        announce: Option<crate::imap::framing::Announce>,
    },
    Literal(Vec<u8>),
    /// The line limit was hit at this input offset.
    TooLong(usize),
}

/// Frames `input` read `read` bytes at a time; the n-th announced literal is accepted or
/// refused by bit n of `decisions` (cycled), as a caller would decide.
fn frame(input: &[u8], max_line: usize, decisions: u8, mut read: impl FnMut() -> usize) -> Vec<Fragment> {
    let mut framer = Framer::new(max_line);
    let (mut out, mut current, mut at, mut announced) = (Vec::new(), Vec::new(), 0, 0u32);
    let mut fragment_start = 0;
    while at < input.len() {
        let end = (at + read()).min(input.len());
        let mut rest = &input[at..end];
        while !rest.is_empty() {
            let step = match framer.feed(rest) {
                Ok(step) => step,
                Err(FrameError::LineTooLong(limit)) => {
                    assert_eq!(limit, max_line);
                    out.push(Fragment::TooLong(fragment_start));
                    return out;
                }
                Err(FrameError::LiteralUndecided) => panic!("every literal is decided as it is announced"),
            };
            assert!(step.consumed <= rest.len());
            assert!(step.consumed > 0 || step.event.is_some(), "no progress on {rest:?}");
            current.extend_from_slice(&rest[..step.consumed]);
            rest = &rest[step.consumed..];
            if step.event.is_some() {
                fragment_start = end - rest.len();
            }
            match step.event {
                None => {}
                Some(Event::LiteralEnd) => out.push(Fragment::Literal(std::mem::take(&mut current))),
                Some(Event::Line(line)) => {
                    assert_eq!(line.len, current.len(), "a line's length is the bytes consumed for it");
                    assert!(line.head.len() <= HEAD_LEN);
                    if line.announce.is_some() {
                        assert_eq!(framer.pending_literal(), line.announce);
                        let accept = decisions >> (announced % 8) & 1 == 0;
                        announced += 1;
                        if accept {
                            framer.accept_literal();
                            assert!(!framer.at_boundary());
                        } else {
                            framer.reject_literal();
                            assert!(framer.at_boundary());
                        }
                    }
                    let bytes = std::mem::take(&mut current);
                    out.push(Fragment::Line { bytes, head: line.head, announce: line.announce });
                }
            }
        }
        at = end;
    }
    out
}

/// The framer gives the same fragments whatever the read sizes, every line's announcement
/// is the one its whole text makes (the framer keeps only the line's tail), every head is
/// the line's start, and the fragments put together are the input.
pub fn imap_framer(data: &[u8]) {
    let (limit, rest) = knob(data);
    let (seed, input) = knob(rest);
    let max_line = 8 + usize::from(limit) * 4;
    let whole = frame(input, max_line, seed, || usize::MAX);
    let mut cuts = reads(seed);
    let pieces = frame(input, max_line, seed, || cuts.next(24));
    assert_eq!(whole, pieces, "read sizes changed the framing");
    let mut joined = Vec::new();
    for fragment in &whole {
        match fragment {
            Fragment::Line { bytes, head, announce } => {
                assert!(bytes.ends_with(b"\n"));
                assert_eq!(*announce, parse_announce(strip_eol(bytes)), "announcement of {bytes:?}");
                let start = &bytes[..bytes.len().min(HEAD_LEN)];
                let expected =
                    if start.len() < HEAD_LEN || start.len() == bytes.len() { strip_eol(start) } else { start };
                assert_eq!(head, expected);
                joined.extend_from_slice(bytes);
            }
            Fragment::Literal(bytes) => joined.extend_from_slice(bytes),
            Fragment::TooLong(at) => {
                assert_eq!(*at, joined.len());
                let line = &input[*at..];
                let len = line.iter().position(|&b| b == b'\n').map_or(line.len(), |i| i + 1);
                assert!(len > max_line, "a line of {len} bytes refused with a limit of {max_line}");
                return;
            }
        }
    }
    assert!(input.starts_with(&joined));
}

// ---------------------------------------------------------------------------------------
// Pre-login commands

/// What `imap::front` makes of a command's bytes: lines (without their ending and
/// announcement) and the literals it accepted.
fn command_parts(input: &[u8]) -> Vec<Part> {
    let mut framer = Framer::new(64 * 1024);
    let (mut parts, mut current, mut rest) = (Vec::new(), Vec::new(), input);
    while !rest.is_empty() {
        let Ok(step) = framer.feed(rest) else { break };
        current.extend_from_slice(&rest[..step.consumed]);
        rest = &rest[step.consumed..];
        match step.event {
            None => {}
            Some(Event::LiteralEnd) => parts.push(Part::Literal(std::mem::take(&mut current))),
            Some(Event::Line(line)) => {
                let mut text = strip_eol(&current);
                if line.announce.is_some() {
                    let open = text.iter().rposition(|&b| b == b'{').unwrap_or(text.len());
                    let open = if open > 0 && text[open - 1] == b'~' { open - 1 } else { open };
                    text = &text[..open];
                }
                parts.push(Part::Line { text: text.to_vec(), literal_follows: line.announce.is_some() });
                current.clear();
                match line.announce {
                    Some(a) if a.len <= 4096 => framer.accept_literal(),
                    Some(_) => break,
                    None => break,
                }
            }
        }
    }
    parts
}

fn literal_command(tag: &str, name: &str, args: &[&[u8]]) -> Vec<Part> {
    let mut parts = vec![];
    let mut text = format!("{tag} {name}").into_bytes();
    for arg in args {
        text.push(b' ');
        parts.push(Part::Line { text: std::mem::take(&mut text), literal_follows: true });
        parts.push(Part::Literal(arg.to_vec()));
    }
    parts.push(Part::Line { text, literal_follows: false });
    parts
}

/// The pre-login parser never panics; what it accepts has a tag that `peek_name` reads the
/// same; LOGIN credentials survive being sent again as literals; the metric label and the
/// download-quota test read any line.
pub fn imap_command(data: &[u8]) {
    let parts = command_parts(data);
    let _ = command::metric_label(data);
    let _ = command::fetches_message_data(data);
    let Ok(tagged) = command::parse(&parts) else { return };
    let Some(Part::Line { text, .. }) = parts.first() else { panic!("accepted without a line") };
    let (tag, _) = command::peek_name(text).expect("an accepted command has a tag and a name");
    assert_eq!(tag, tagged.tag);
    assert!(!tagged.tag.is_empty());
    match tagged.command {
        Command::Login(credentials) => {
            let again = literal_command(
                &tagged.tag,
                "LOGIN",
                &[credentials.user.as_bytes(), credentials.password.expose().as_bytes()],
            );
            let Ok(command::Tagged { command: Command::Login(same), .. }) = command::parse(&again) else {
                panic!("LOGIN credentials sent as literals are refused: {again:?}")
            };
            assert_eq!(same.user, credentials.user);
            assert_eq!(same.password.expose(), credentials.password.expose());
        }
        Command::Authenticate { mechanism, initial } => {
            assert!(!mechanism.is_empty());
            assert_eq!(mechanism, mechanism.to_ascii_uppercase());
            if let Some(initial) = initial {
                if mechanism == "PLAIN" {
                    let _ = auth::decode_plain(initial.expose());
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------
// FETCH requests, responses and sequence sets

/// Checks the invariants of a FETCH request mailgate would cache: at least one cached item,
/// no two items answered under one name, every item as the client wrote it, and the same
/// request written again (items joined by single spaces) parses to the same items.
pub fn fetch_request(data: &[u8]) {
    let _ = fetch::seq_and_uid(data);
    let Some(request) = fetch::parse_request(data) else { return };
    assert!(request.cached_items().next().is_some());
    let line = std::str::from_utf8(data).expect("parsed lines are text");
    for item in &request.items {
        assert!(!item.request.is_empty() && line.contains(&item.request));
    }
    for wanted in request.cached_items() {
        assert_eq!(fetch::normalize(wanted.response), wanted.response, "response names are normalized");
        assert!(wanted.key.starts_with(wanted.response.split('<').next().unwrap_or_default()));
    }
    let items: Vec<&str> = request.items.iter().map(|i| i.request.as_str()).collect();
    let again =
        format!("{} {}FETCH {} ({})", request.tag, if request.uid { "UID " } else { "" }, request.set, items.join(" "));
    let reparsed = fetch::parse_request(again.as_bytes()).expect("a request written again still parses");
    assert_eq!(reparsed, request);
    let _ = SequenceSet::parse(&request.set).contains(1, 1);
}

/// A FETCH response's items cover it exactly: the prefix, the items joined by single
/// spaces, `)` and the line ending give back the input byte for byte, and each item's name
/// is the normalized start of its bytes.
pub fn fetch_response(data: &[u8]) {
    let simple = data.strip_prefix(b"* ").and_then(fetch::seq_and_uid);
    let Some(response) = fetch::parse_response(data) else { return };
    let sp = 2 + data[2..].iter().position(|&b| b == b' ').expect("a number and a space");
    let mut rebuilt = data[..sp + 8].to_vec();
    assert!(rebuilt[sp + 1..].eq_ignore_ascii_case(b"FETCH ("));
    for (i, item) in response.items.iter().enumerate() {
        if i > 0 {
            rebuilt.push(b' ');
        }
        assert_eq!(item.range.start, rebuilt.len(), "items follow each other");
        rebuilt.extend_from_slice(&data[item.range.clone()]);
        assert!(!item.name.is_empty());
        assert_eq!(fetch::normalize(&item.name), *item.name, "names are normalized");
    }
    rebuilt.push(b')');
    let ending = &data[rebuilt.len().min(data.len())..];
    assert!(ending == b"\r\n" || ending == b"\n", "only the line ending follows the items");
    rebuilt.extend_from_slice(ending);
    assert_eq!(rebuilt, data);
    if let (Some((seq, uid)), Some(parsed)) = (simple, response.uid(data)) {
        // The shortcut the relay uses to learn UIDs agrees with the full parse.
        assert_eq!((seq, uid), (response.seq, parsed));
    }
}

/// The sequence-set text of `data`: bytes mapped onto digits, `:`, `,` and `*`.
fn set_text(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"0123456789012345:,:,*";
    data.iter().map(|&b| ALPHABET[usize::from(b) % ALPHABET.len()] as char).collect()
}

/// RFC 9051 §9 `sequence-set`, read literally: each part a number, `*` or `a:b` (either
/// order), `*` standing for the last message; a part that is none of these matches nothing.
fn naive_contains(set: &str, n: u32, max: u32) -> bool {
    let number = |s: &str| if s == "*" { Some(max) } else { s.parse::<u32>().ok() };
    set.split(',').any(|part| {
        let (a, b) = part.split_once(':').unwrap_or((part, part));
        match (number(a), number(b)) {
            (Some(a), Some(b)) => a.min(b) <= n && n <= a.max(b),
            _ => false,
        }
    })
}

/// `SequenceSet` (sorted, merged ranges, binary search) agrees with the definition for
/// every message number around the set's edges and the last message.
pub fn sequence_set(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let max = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) % 200_000;
    let probe = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
    let text = set_text(&data[8..]);
    let set = SequenceSet::parse(&text);
    let mut probes = vec![0, 1, 2, max.saturating_sub(1), max, max.saturating_add(1), probe, u32::MAX];
    // The numbers of the set's first parts and their neighbours (a few dozen probes: the
    // definition below costs a pass over the set per probe).
    for word in text.split([',', ':']).take(16) {
        if let Ok(n) = word.parse::<u32>() {
            probes.extend([n.saturating_sub(1), n, n.saturating_add(1)]);
        }
    }
    for n in probes {
        assert_eq!(set.contains(n, max), naive_contains(&text, n, max), "{n} in {text:?} with * = {max}");
    }
}

// ---------------------------------------------------------------------------------------
// POP3

/// Dot-stuffs `body` and ends it as a server would (RFC 1939 §3).
fn stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    for line in body.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Scans `input` read in pieces; returns each event with the offset just after it.
fn scan(input: &[u8], multiline: bool, mut read: impl FnMut() -> usize) -> Vec<(usize, codec::Event)> {
    let mut scanner = ResponseScanner::default();
    scanner.expect(multiline);
    let (mut events, mut at) = (Vec::new(), 0);
    while at < input.len() {
        let end = (at + read()).min(input.len());
        let mut rest = &input[at..end];
        while !rest.is_empty() {
            let Ok(step) = scanner.feed(rest) else {
                events.push((usize::MAX, codec::Event::End));
                return events;
            };
            assert!(step.consumed > 0 && step.consumed <= rest.len());
            let offset = end - rest.len() + step.consumed;
            rest = &rest[step.consumed..];
            if let Some(event) = step.event {
                let done = matches!(event, codec::Event::End | codec::Event::Status { body: false, .. });
                events.push((offset, event));
                if done {
                    assert!(scanner.at_boundary());
                    scanner.expect(multiline);
                }
            }
        }
        at = end;
    }
    events
}

/// The POP3 codec: a server's dot-stuffed body, cut anywhere, ends exactly at its `.` line
/// and unstuffs to the original; raw bytes scan and split into command lines the same
/// whatever the read sizes.
pub fn pop3_codec(data: &[u8]) {
    let (seed, data) = knob(data);
    // A body made of the input's lines (with CRLF), never the terminating line itself.
    let body: Vec<u8> = (data.split(|&b| b == b'\n'))
        .flat_map(|line| line.iter().copied().filter(|&b| b != b'\r').chain(*b"\r\n"))
        .collect();
    let body = &body[..];
    let stuffed = stuff(body);
    assert_eq!(codec::unstuff(&stuffed), body, "unstuffing inverts stuffing");
    let mut response = b"+OK message follows\r\n".to_vec();
    response.extend_from_slice(&stuffed);
    response.extend_from_slice(b".\r\n");
    let mut cuts = reads(seed);
    let events = scan(&response, true, || cuts.next(16));
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].0, 21);
    assert_eq!(events[1], (response.len(), codec::Event::End));

    // Raw input as the upstream's answers: the read sizes change nothing.
    let multiline = seed & 1 == 0;
    let mut cuts = reads(seed);
    assert_eq!(scan(data, multiline, || usize::MAX), scan(data, multiline, || cuts.next(16)));

    // Raw input as client command lines.
    let lines = |read: &mut dyn FnMut() -> usize| {
        let mut reader = LineReader::new(codec::MAX_COMMAND_LINE);
        let (mut out, mut at) = (Vec::new(), 0);
        while at < data.len() {
            let end = (at + read()).min(data.len());
            let mut rest = &data[at..end];
            while !rest.is_empty() {
                match reader.feed(rest) {
                    Ok((consumed, line)) => {
                        rest = &rest[consumed..];
                        if let Some(line) = line {
                            let (keyword, args) = codec::split_command(&line);
                            let _ = codec::multiline_if_ok(&keyword, args);
                            out.push(Ok(line));
                        }
                    }
                    Err(e) => {
                        out.push(Err(e));
                        return out;
                    }
                }
            }
            at = end;
        }
        out
    };
    let mut cuts = reads(seed);
    assert_eq!(lines(&mut || usize::MAX), lines(&mut || cuts.next(16)));
}

// ---------------------------------------------------------------------------------------
// SASL PLAIN

/// `decode_plain` never panics, and `decode_plain(encode_plain(x)) == x` for credentials
/// made from the input (split at NUL bytes); what it accepts encodes back to an equivalent.
pub fn sasl_plain(data: &[u8]) {
    if let Ok(credentials) = auth::decode_plain(data) {
        let again = auth::decode_plain(auth::encode_plain(&credentials).expose().as_bytes()).expect("round trip");
        assert_eq!(again.user, credentials.user);
        assert_eq!(again.password.expose(), credentials.password.expose());
        assert_eq!(again.authzid, credentials.authzid);
    }
    let text = String::from_utf8_lossy(data);
    let mut fields = text.split('\0');
    let (Some(authzid), Some(user), Some(password)) = (fields.next(), fields.next(), fields.next()) else { return };
    let password = password.to_string();
    let credentials = Credentials {
        user: user.to_string(),
        password: Secret::new(password.clone()),
        authzid: (!authzid.is_empty() && authzid != user).then(|| authzid.to_string()),
        oauth: None,
    };
    let decoded = auth::decode_plain(auth::encode_plain(&credentials).expose().as_bytes());
    if user.is_empty() || password.is_empty() {
        assert_eq!(decoded.err(), Some(auth::SaslError::Empty));
        return;
    }
    let decoded = decoded.expect("valid credentials decode");
    assert_eq!((decoded.user.as_str(), decoded.password.expose().as_str()), (user, password.as_str()));
    assert_eq!(decoded.authzid, credentials.authzid);
}

// ---------------------------------------------------------------------------------------
// OAuth SASL envelopes (OAUTHBEARER, XOAUTH2)

/// The first byte picks the mechanism, the rest is a decoded response. Never panics; what
/// is accepted names a user and a token that, written again in the mechanism's form (the
/// GS2 escapes included), read back the same.
pub fn sasl_oauth(data: &[u8]) {
    use crate::oauth::{parse, Mechanism};
    let Some((&first, raw)) = data.split_first() else { return };
    let mechanism = if first & 1 == 0 { Mechanism::OAuthBearer } else { Mechanism::XOAuth2 };
    let Ok(envelope) = parse(mechanism, raw) else { return };
    assert!(!envelope.user.is_empty() && !envelope.token.expose().is_empty());
    assert!(!envelope.user.chars().any(char::is_control));
    let token = envelope.token.expose();
    let again = match mechanism {
        Mechanism::OAuthBearer => {
            let user = envelope.user.replace('=', "=3D").replace(',', "=2C");
            format!("n,a={user},\x01auth=Bearer {token}\x01\x01")
        }
        Mechanism::XOAuth2 => format!("user={}\x01auth=Bearer {token}\x01\x01", envelope.user),
    };
    let reread = parse(mechanism, again.as_bytes()).expect("a written envelope reads back");
    assert_eq!((reread.user, reread.token.expose()), (envelope.user, token));
}

// ---------------------------------------------------------------------------------------
// PROXY header

/// The PROXY decoder read as the listener reads it (exactly the bytes it asks for) gives
/// the answer it gives on the whole input, never asks for a byte past the header, and
/// decodes what `encode_v2` writes.
pub fn proxy_header(data: &[u8]) {
    let whole = proxy_header::parse(data);
    // The listener's loop: read what the parser asks for, no more.
    let mut have = 0;
    let incremental = loop {
        match proxy_header::parse(&data[..have]) {
            Ok(Parsed::Incomplete(more)) => {
                assert!(more > 0);
                if have + more > data.len() {
                    break None;
                }
                have += more;
            }
            other => break Some(other),
        }
    };
    match incremental {
        Some(Ok(Parsed::Done(header, len))) => {
            assert_eq!(whole, Ok(Parsed::Done(header, len)), "read as asked vs whole input");
            assert_eq!(have, len, "read past the header");
        }
        Some(Err(e)) => assert!(whole.is_err(), "read as asked: {e:?}; whole input: {whole:?}"),
        Some(Ok(Parsed::Incomplete(_))) => unreachable!("the loop goes on while incomplete"),
        None => assert!(!matches!(whole, Ok(Parsed::Done(..))), "whole input: {whole:?}, read as asked: more"),
    }

    if data.len() < 37 {
        return;
    }
    let v4 = |at: usize| std::net::IpAddr::from([data[at], data[at + 1], data[at + 2], data[at + 3]]);
    let v6 = |at: usize| std::net::IpAddr::from(<[u8; 16]>::try_from(&data[at..at + 16]).expect("16 bytes"));
    let port = |at: usize| u16::from_be_bytes([data[at], data[at + 1]]);
    let (source, destination) = match data[0] % 3 {
        0 => (v4(1), v4(5)),
        1 => (v6(1), v6(17)),
        _ => (v4(1), v6(17)),
    };
    let source = std::net::SocketAddr::new(source, port(33));
    let destination = std::net::SocketAddr::new(destination, port(35));
    let rest = String::from_utf8_lossy(&data[37..]);
    let tls = (data[0] & 4 != 0).then(|| proxy_header::TlsFacts {
        version: "TLSv1.3".into(),
        alpn: (data[0] & 8 != 0).then(|| b"imap".to_vec()),
        server_name: Some(rest.chars().take(200).collect()),
    });
    let encoded = proxy_header::encode_v2(source, destination, tls.as_ref());
    let mapped = |a: std::net::SocketAddr| match (source, destination, a.ip()) {
        (std::net::SocketAddr::V4(_), std::net::SocketAddr::V4(_), _) => a,
        (_, _, std::net::IpAddr::V4(ip)) => std::net::SocketAddr::new(ip.to_ipv6_mapped().into(), a.port()),
        _ => a,
    };
    let expected = Header::Proxied { source: mapped(source), destination: mapped(destination) };
    assert_eq!(proxy_header::parse(&encoded), Ok(Parsed::Done(expected, encoded.len())));
}

// ---------------------------------------------------------------------------------------
// HTTP: the admin listener's requests, the lookup service's answers

/// The admin listener's request reader, fed as a socket would: the same request (method
/// and path) whatever the read sizes, and bounded.
pub fn admin_request(data: &[u8]) {
    let (seed, data) = knob(data);
    let read = |next: &mut dyn FnMut() -> usize| {
        let mut head = Vec::new();
        let mut at = 0;
        while !crate::admin::head_complete(&head) {
            if at == data.len() {
                return None;
            }
            let end = (at + next()).min(data.len());
            if head.len() + (end - at) > crate::admin::MAX_HEAD {
                return None;
            }
            head.extend_from_slice(&data[at..end]);
            at = end;
        }
        let (method, path) = crate::admin::request_line(&head);
        Some((method.to_string(), path.to_string()))
    };
    let whole = read(&mut || 1024);
    let mut cuts = reads(seed);
    let pieces = read(&mut || cuts.next(64));
    // A head that completes within the limit is read whole either way.
    if let (Some(a), Some(b)) = (&whole, &pieces) {
        assert_eq!(a, b);
    }
    if let Some((method, path)) = &whole {
        assert!(!method.contains(char::is_whitespace) && !path.contains(char::is_whitespace));
    }
}

/// The lookup client's response reader, read as the client reads (up to 8 KiB at a time,
/// checking after each read): once a response is complete by its own framing, reading more
/// does not change it; a Content-Length body has that length; chunked bodies decode to what
/// was chunked.
pub fn lookup_response(data: &[u8]) {
    use crate::routing::lookup;
    let (seed, data) = knob(data);
    let mut cuts = reads(seed);
    if data.len() <= lookup::MAX_RESPONSE {
        let whole = lookup_read(data, &mut || 8192);
        let pieces = lookup_read(data, &mut || cuts.next(300));
        assert_eq!(whole, pieces, "read sizes changed the answer");
    }

    // Chunked transfer coding round trip.
    let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let mut rest = data;
    while !rest.is_empty() {
        let n = cuts.next(40).min(rest.len());
        chunked.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        chunked.extend_from_slice(&rest[..n]);
        chunked.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(lookup::complete(&chunked), Some(Ok((200, data.to_vec()))));
    let sized = [format!("HTTP/1.0 201 Created\r\nContent-Length: {}\r\n\r\n", data.len()).as_bytes(), data].concat();
    assert_eq!(lookup::complete(&sized), Some(Ok((201, data.to_vec()))));
}

/// What `routing::lookup::get` makes of a connection that sends `data` and closes.
fn lookup_read(data: &[u8], read: &mut dyn FnMut() -> usize) -> Result<(u16, Vec<u8>), String> {
    use crate::routing::lookup;
    let (mut response, mut at) = (Vec::new(), 0);
    while at < data.len() {
        let end = (at + read()).min(data.len());
        response.extend_from_slice(&data[at..end]);
        at = end;
        if let Some(done) = lookup::complete(&response) {
            return done;
        }
    }
    lookup::complete(&response).unwrap_or_else(|| lookup::parse(&response, true))
}

/// The FETCH line a `fetch_codec` input stands for: `a FETCH ` (first byte even) or
/// `a UID FETCH ` and the rest of the input, which must hold no line ending.
pub fn fetch_line(data: &[u8]) -> Option<Vec<u8>> {
    let (first, rest) = data.split_first()?;
    if rest.contains(&b'\n') || rest.contains(&b'\r') {
        return None;
    }
    let prefix: &[u8] = if first & 1 == 0 { b"a FETCH " } else { b"a UID FETCH " };
    Some([prefix, rest].concat())
}

/// mailgate's side of the differential `fetch_codec` target (imap-codec is the fuzz
/// crate's dependency, not the gateway's): the input's FETCH line through `fetch_request`.
pub fn fetch_codec_line(data: &[u8]) {
    if let Some(line) = fetch_line(data) {
        fetch_request(&line);
    }
}
