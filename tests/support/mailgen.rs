//! Deterministic generator of realistic RFC 5322 messages for tests.
//!
//! The same `(seed, index)` always yields the same bytes, so a test can
//! regenerate any message it stored upstream and compare it with what came
//! back through the proxy, without keeping a copy around.
//!
//! Every message uses CRLF line endings only (no bare CR or LF) and no line is
//! longer than 990 octets, so the file size equals the IMAP RFC822.SIZE and
//! POP3 octet count Dovecot reports. Coverage of the awkward cases is tied to
//! the index (not left to chance), so the first six messages of any batch
//! cover all of them:
//!
//! * `index % 4` selects the shape: 0 plain ASCII text, 1 8-bit UTF-8 text,
//!   2 multipart/alternative, 3 multipart/mixed with base64 attachments;
//! * `index % 10 == 3`: 200 `Received:` lines and a long folded `References:`;
//! * `index % 3 == 1` (plus some others): body lines starting with `.`,
//!   including a line that is just `.` (POP3 dot-stuffing);
//! * `index % 5 == 2` (plus some others): very long lines (500-990 octets);
//! * `index % 16 == 5`: a big message of 100 KB up to `max_big` bytes.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bound for big messages written by [`fill_maildir`].
pub const MAX_BIG: usize = 3 * 1024 * 1024;

/// Lower bound for big messages (unless `max_big` is smaller).
const MIN_BIG: usize = 100 * 1024;

/// Longest line we emit, excluding CRLF; RFC 5322 allows 998.
const MAX_LINE: usize = 990;

/// Small, fast, good-enough PRNG (xorshift64*), seeded through splitmix64 so
/// that nearby seeds give unrelated streams.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // xorshift has a fixed point at zero.
        Rng(if z == 0 { 1 } else { z })
    }

    /// The stream for one message of a batch.
    pub fn for_message(seed: u64, index: usize) -> Rng {
        Rng::new(seed.rotate_left(17) ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `lo..=hi` (modulo bias is irrelevant here).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        debug_assert!(lo <= hi);
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.range(0, items.len() - 1)]
    }

    pub fn fill_bytes(&mut self, out: &mut Vec<u8>, n: usize) {
        let end = out.len() + n;
        out.reserve(n);
        while out.len() < end {
            let word = self.next_u64().to_le_bytes();
            let take = (end - out.len()).min(8);
            out.extend_from_slice(&word[..take]);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    Plain,
    Utf8,
    Alternative,
    Mixed,
}

/// Knobs for body text.
#[derive(Clone, Copy)]
struct TextStyle {
    utf8: bool,
    dot_lines: bool,
    long_lines: bool,
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "at",
    "by",
    "this",
    "had",
    "not",
    "are",
    "but",
    "from",
    "or",
    "have",
    "an",
    "they",
    "which",
    "one",
    "you",
    "were",
    "all",
    "we",
    "when",
    "there",
    "can",
    "been",
    "has",
    "more",
    "if",
    "will",
    "mailbox",
    "server",
    "message",
    "proxy",
    "folder",
    "quota",
    "invoice",
    "meeting",
    "agenda",
    "report",
    "attached",
    "please",
    "review",
    "thanks",
    "regards",
    "tomorrow",
    "schedule",
    "project",
    "release",
    "update",
    "deadline",
    "budget",
    "customer",
    "ticket",
    "question",
    "answer",
    "draft",
    "final",
    "version",
    "network",
    "latency",
    "certificate",
    "password",
    "backup",
    "archive",
    "weekend",
    "coffee",
    "lunch",
    "office",
    "remote",
    "summary",
    "notes",
    "Monday",
    "Friday",
    "October",
    "approx.",
    "e.g.",
    "i.e.",
    "etc.",
    "FYI",
    "ASAP",
    "v2.3",
];

const UTF8_WORDS: &[&str] = &[
    "Grüße",
    "Straße",
    "naïve",
    "café",
    "smörgåsbord",
    "façade",
    "jalapeño",
    "Øresund",
    "Ελληνικά",
    "Привет",
    "спасибо",
    "日本語",
    "東京",
    "中文",
    "你好",
    "한국어",
    "שלום",
    "مرحبا",
    "हिन्दी",
    "ไทย",
    "€100",
    "→",
    "½",
    "“quoted”",
    "—",
    "🎉",
    "📎",
    "👍🏽",
];

const NAMES: &[(&str, &str)] = &[
    ("Alice Example", "alice@example.com"),
    ("Bob Builder", "bob@example.org"),
    ("Carol Smith", "carol.smith@mail.example.net"),
    ("Dave O'Brien", "dave@corp.example"),
    ("Erin Müller", "erin.mueller@example.de"),
    ("Frank Zhang", "frank@example.cn"),
    ("Grace Hopper", "grace@navy.example.mil"),
    ("Heidi Nakamura", "heidi@example.jp"),
];

const SUBJECTS: &[&str] = &[
    "Quarterly report",
    "Re: meeting tomorrow",
    "Fwd: invoice 2023-0042",
    "Lunch?",
    "[project] release notes for v2.3",
    "Re: Re: Re: quota exceeded on shared folder",
    "Your ticket #48213 has been updated",
    "Weekend plans",
    "Certificate renewal reminder",
    "Photos from the trip",
];

const UTF8_SUBJECTS: &[&str] = &[
    "Grüße aus München",
    "Привет из Москвы",
    "会議の議事録",
    "Café au lait ☕ tomorrow?",
    "Résumé – final version 🎉",
];

const ATTACHMENTS: &[(&str, &str)] = &[
    ("application/pdf", "report.pdf"),
    ("image/png", "screenshot.png"),
    ("image/jpeg", "IMG_4711.jpg"),
    ("application/zip", "archive.zip"),
    ("application/octet-stream", "data.bin"),
    ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "budget.xlsx"),
];

/// Generates message `index` of the batch identified by `seed`.
///
/// `max_big` caps the size of the occasional big message (100 KB up to
/// `max_big`); pass 0 to make those ordinary-sized too. The result is
/// deterministic and independent of other indexes.
pub fn message(seed: u64, index: usize, max_big: usize) -> Vec<u8> {
    let mut rng = Rng::for_message(seed, index);
    let shape = match index % 4 {
        0 => Shape::Plain,
        1 => Shape::Utf8,
        2 => Shape::Alternative,
        _ => Shape::Mixed,
    };
    let huge_headers = index % 10 == 3;
    let style = TextStyle {
        utf8: shape == Shape::Utf8 || (shape != Shape::Plain && rng.chance(30)),
        dot_lines: index % 3 == 1 || rng.chance(20),
        long_lines: index % 5 == 2 || rng.chance(15),
    };
    let target = if index % 16 == 5 && max_big > 0 {
        rng.range(MIN_BIG.min(max_big), max_big)
    } else if rng.chance(12) {
        rng.range(8_000, 40_000)
    } else {
        rng.range(1_000, 8_000)
    };

    let mut out = Vec::with_capacity(target + 4096);
    headers(&mut out, &mut rng, seed, index, huge_headers, style.utf8);
    // Headers count towards the size, but the body must not become empty.
    let body_target = target.saturating_sub(out.len()).max(200);
    let boundary = |n: u32| format!("----=_mailgen_{seed:x}_{index}_{n}");

    match shape {
        Shape::Plain | Shape::Utf8 => {
            single_text_part(&mut out, &mut rng, "plain", body_target, style);
        }
        Shape::Alternative => {
            let b = boundary(1);
            header(&mut out, &format!("Content-Type: multipart/alternative;\r\n\tboundary=\"{b}\""));
            out.extend_from_slice(b"\r\nThis is a multi-part message in MIME format.\r\n");
            alternative_parts(&mut out, &mut rng, &b, body_target, style);
        }
        Shape::Mixed => {
            let b = boundary(1);
            header(&mut out, &format!("Content-Type: multipart/mixed; boundary=\"{b}\""));
            out.extend_from_slice(b"\r\nThis is a multi-part message in MIME format.\r\n");
            let text_target = rng.range(300, 3_000).min(body_target);
            start_part(&mut out, &b);
            if rng.chance(50) {
                // Nested alternative, as most MUAs send it.
                let inner = boundary(2);
                header(&mut out, &format!("Content-Type: multipart/alternative; boundary=\"{inner}\""));
                out.extend_from_slice(b"\r\n");
                alternative_parts(&mut out, &mut rng, &inner, text_target, style);
            } else {
                single_text_part(&mut out, &mut rng, "plain", text_target, style);
            }
            // Attachments make up the rest; base64 inflates by 4/3 plus CRLFs.
            let count = rng.range(1, 3);
            let raw_total = body_target.saturating_sub(text_target) * 3 / 4;
            for i in 0..count {
                let raw =
                    if i + 1 == count { raw_total.saturating_sub(raw_total / count * i) } else { raw_total / count };
                start_part(&mut out, &b);
                attachment(&mut out, &mut rng, raw.max(16));
            }
            end_parts(&mut out, &b);
        }
    }
    debug_assert!(well_formed(&out));
    out
}

/// Writes `count` messages of batch `seed` into `dir/cur` (creating the
/// Maildir if needed) and returns their total size in bytes.
///
/// Files are named so that Dovecot, which sorts new files by the timestamp in
/// their name, assigns UIDs in index order: UID n holds `message(seed, n - 1,
/// MAX_BIG)`. Some get the `\Seen` or `\Flagged \Seen` flag. Ownership is
/// left to the caller (see `Dovecot::fill`).
pub fn fill_maildir(dir: &Path, count: usize, seed: u64) -> u64 {
    static BATCH: AtomicU64 = AtomicU64::new(0);
    let batch = BATCH.fetch_add(1, Ordering::Relaxed);
    for sub in ["cur", "new", "tmp"] {
        fs::create_dir_all(dir.join(sub)).unwrap_or_else(|e| panic!("creating {}/{sub}: {e}", dir.display()));
    }
    let mut total = 0u64;
    for index in 0..count {
        let msg = message(seed, index, MAX_BIG);
        let flags = if index % 11 == 6 {
            "FS"
        } else if index % 3 == 1 {
            "S"
        } else {
            ""
        };
        // S= and W= (physical and virtual size) let Dovecot answer size
        // queries without reading the file; both equal the length because
        // the message is CRLF-only.
        let name = format!(
            "{}.M{index}P{}Q{batch}.mailgen,S={len},W={len}:2,{flags}",
            1_600_000_000 + index as u64,
            std::process::id(),
            len = msg.len(),
        );
        write_new(&dir.join("cur").join(name), &msg)
            .unwrap_or_else(|e| panic!("writing message {index} to {}: {e}", dir.display()));
        total += msg.len() as u64;
    }
    total
}

fn write_new(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(data)
}

/// CRLF to LF, for comparing with a store that keeps native line endings (mbsync's
/// Maildir, fetchmail's MDA).
pub fn lf(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len());
    let mut start = 0;
    for i in memchr::memchr_iter(b'\n', msg) {
        let end = if i > start && msg[i - 1] == b'\r' { i - 1 } else { i };
        out.extend_from_slice(&msg[start..end]);
        out.push(b'\n');
        start = i + 1;
    }
    out.extend_from_slice(&msg[start..]);
    out
}

/// True if `msg` only uses CRLF line endings and no line exceeds 998 octets.
pub fn well_formed(msg: &[u8]) -> bool {
    let mut line_len = 0usize;
    let mut i = 0;
    while i < msg.len() {
        match msg[i] {
            b'\r' => {
                if msg.get(i + 1) != Some(&b'\n') {
                    return false;
                }
                line_len = 0;
                i += 2;
                continue;
            }
            b'\n' => return false,
            _ => line_len += 1,
        }
        if line_len > 998 {
            return false;
        }
        i += 1;
    }
    msg.ends_with(b"\r\n")
}

fn header(out: &mut Vec<u8>, line: &str) {
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn headers(out: &mut Vec<u8>, rng: &mut Rng, seed: u64, index: usize, huge: bool, utf8_subject: bool) {
    let when = 1_600_000_000 + index as u64 * 3_600 + rng.range(0, 3_599) as u64;
    let (from_name, from) = *rng.pick(NAMES);
    let (to_name, to) = *rng.pick(NAMES);
    header(out, &format!("Return-Path: <{from}>"));
    let hops = if huge { 200 } else { rng.range(1, 4) };
    for hop in (0..hops).rev() {
        // Received lines are prepended by each hop, so times count down.
        let t = when + 2 * hop as u64;
        header(
            out,
            &format!(
                "Received: from mx{hop}.relay.example.net (mx{hop}.relay.example.net [192.0.2.{}])\r\n\
                 \tby mx{}.relay.example.net (Postfix) with ESMTPS id {:010X}\r\n\
                 \tfor <{to}>; {}",
                hop % 250 + 1,
                hop + 1,
                rng.next_u64() & 0xFF_FFFF_FFFF,
                rfc5322_date(t)
            ),
        );
    }
    if huge {
        let mut refs = String::from("References:");
        for n in 0..60 {
            refs.push_str(&format!(" <{:x}.{n}@mailgen.example>\r\n", rng.next_u64()));
        }
        refs.truncate(refs.len() - 2);
        header(out, &refs);
    }
    header(out, &format!("Date: {}", rfc5322_date(when)));
    header(out, &format!("From: {} <{from}>", display_name(from_name)));
    header(out, &format!("To: {} <{to}>", display_name(to_name)));
    if rng.chance(30) {
        let (cc_name, cc) = *rng.pick(NAMES);
        header(out, &format!("Cc: {} <{cc}>", display_name(cc_name)));
    }
    let subject =
        if utf8_subject { encoded_word(rng.pick::<&str>(UTF8_SUBJECTS)) } else { rng.pick(SUBJECTS).to_string() };
    header(out, &format!("Subject: {subject} [{index}]"));
    header(out, &format!("Message-ID: <{seed:x}.{index}@mailgen.example>"));
    header(out, &format!("X-Mailgen: seed={seed}; index={index}"));
    header(out, "MIME-Version: 1.0");
}

/// RFC 2047 encoded-word (base64) for a non-ASCII phrase.
fn encoded_word(s: &str) -> String {
    format!("=?UTF-8?B?{}?=", base64(s.as_bytes()))
}

fn display_name(name: &str) -> String {
    if name.is_ascii() {
        format!("\"{}\"", name.replace('"', "\\\""))
    } else {
        encoded_word(name)
    }
}

fn single_text_part(out: &mut Vec<u8>, rng: &mut Rng, subtype: &str, target: usize, style: TextStyle) {
    let body = if subtype == "html" { html(rng, target, style) } else { text(rng, target, style) };
    let (charset, cte) = if body.is_ascii() { ("us-ascii", "7bit") } else { ("utf-8", "8bit") };
    header(out, &format!("Content-Type: text/{subtype}; charset={charset}"));
    header(out, &format!("Content-Transfer-Encoding: {cte}"));
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
}

fn alternative_parts(out: &mut Vec<u8>, rng: &mut Rng, boundary: &str, target: usize, style: TextStyle) {
    start_part(out, boundary);
    single_text_part(out, rng, "plain", target / 2, style);
    start_part(out, boundary);
    single_text_part(out, rng, "html", target / 2, style);
    end_parts(out, boundary);
}

fn start_part(out: &mut Vec<u8>, boundary: &str) {
    out.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
}

fn end_parts(out: &mut Vec<u8>, boundary: &str) {
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
}

fn attachment(out: &mut Vec<u8>, rng: &mut Rng, raw_len: usize) {
    let (mime, name) = *rng.pick(ATTACHMENTS);
    header(out, &format!("Content-Type: {mime}; name=\"{name}\""));
    header(out, "Content-Transfer-Encoding: base64");
    header(out, &format!("Content-Disposition: attachment; filename=\"{name}\""));
    out.extend_from_slice(b"\r\n");
    let mut data = Vec::new();
    rng.fill_bytes(&mut data, raw_len);
    let encoded = base64(&data);
    for chunk in encoded.as_bytes().chunks(76) {
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
}

/// Body text of roughly `target` bytes, CRLF-terminated lines.
fn text(rng: &mut Rng, target: usize, style: TextStyle) -> String {
    let mut out = String::with_capacity(target + 1024);
    // A fixed non-ASCII greeting guarantees UTF-8 bodies really are 8-bit.
    let greeting = if style.utf8 {
        *rng.pick(&["Grüße,", "Привет,", "こんにちは、", "Hej då ☺"])
    } else {
        *rng.pick(&["Hi,", "Hello all,", "Dear team,", "Hey"])
    };
    out.push_str(greeting);
    out.push_str("\r\n\r\n");
    let (mut dots_done, mut long_done) = (false, false);
    while out.len() < target {
        if style.dot_lines && (!dots_done || rng.chance(10)) {
            // A lone "." would end a POP3 multi-line response if the server
            // forgot to dot-stuff; ".." and ".foo" test the unstuffing side.
            for line in [".", "..", ".hidden line starting with a dot", "...and so on"] {
                out.push_str(line);
                out.push_str("\r\n");
            }
            out.push_str("\r\n");
            dots_done = true;
        }
        if style.long_lines && (!long_done || rng.chance(25)) {
            let len = rng.range(500, MAX_LINE);
            out.push_str(&long_line(rng, len, style.utf8));
            out.push_str("\r\n\r\n");
            long_done = true;
        }
        paragraph(rng, &mut out, style.utf8);
    }
    out.push_str("\r\n-- \r\nSent by mailgen\r\n");
    out
}

fn html(rng: &mut Rng, target: usize, style: TextStyle) -> String {
    let mut out = String::with_capacity(target + 1024);
    out.push_str("<!DOCTYPE html>\r\n<html><head><meta charset=\"utf-8\"></head>\r\n<body>\r\n");
    while out.len() < target {
        out.push_str("<p>\r\n");
        paragraph(rng, &mut out, style.utf8);
        out.push_str("</p>\r\n");
        if style.long_lines && rng.chance(20) {
            // Minified HTML produces long lines in the wild.
            let len = rng.range(500, MAX_LINE - 20);
            out.push_str(&format!("<div>{}</div>\r\n", long_line(rng, len, style.utf8)));
        }
    }
    out.push_str("</body></html>\r\n");
    out
}

/// A wrapped paragraph (lines up to ~76 octets) followed by a blank line.
fn paragraph(rng: &mut Rng, out: &mut String, utf8: bool) {
    let words = rng.range(20, 120);
    let mut line_len = 0;
    for w in 0..words {
        let word = next_word(rng, utf8);
        if line_len > 0 && line_len + 1 + word.len() > 76 {
            out.push_str("\r\n");
            line_len = 0;
        } else if w > 0 {
            out.push(' ');
            line_len += 1;
        }
        out.push_str(word);
        line_len += word.len();
    }
    out.push_str("\r\n\r\n");
}

/// One unwrapped line of at most `len` octets (never more than MAX_LINE).
fn long_line(rng: &mut Rng, len: usize, utf8: bool) -> String {
    let len = len.min(MAX_LINE);
    let mut line = String::with_capacity(len);
    loop {
        let word = next_word(rng, utf8);
        if line.len() + 1 + word.len() > len {
            break;
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    line
}

fn next_word(rng: &mut Rng, utf8: bool) -> &'static str {
    if utf8 && rng.chance(25) {
        rng.pick::<&str>(UTF8_WORDS)
    } else {
        rng.pick::<&str>(WORDS)
    }
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `Tue, 14 Nov 2023 10:22:33 +0000` for a Unix timestamp.
fn rfc5322_date(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Civil-from-days (Howard Hinnant), valid for dates after 1970.
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {day} {} {year} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        secs / 3_600,
        secs / 60 % 60,
        secs % 60
    )
}
