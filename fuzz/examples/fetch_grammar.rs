//! The numbers behind the imap-codec decision (docs/TESTING.md, "Fuzzing"):
//!
//! - `fetch_grammar verdicts DIR`: how mailgate and imap-codec judge every input of the
//!   `fetch_codec` corpus (agree, only one accepts, neither), with examples of each side;
//! - `fetch_grammar timing`: parse time per command, mailgate's FETCH parser and pre-login
//!   parser against imap-codec's `CommandCodec`, over commands real clients send.
//!
//! Run it optimised: `cargo run --release --example fetch_grammar -- timing` (in `fuzz/`).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use imap_codec::decode::Decoder;
use imap_codec::CommandCodec;
use mailgate::imap::command::{self, Part};
use mailgate::imap::fetch;
use mailgate_fuzz::Verdict;

const FETCHES: &[&str] = &[
    // Thunderbird's header sync and body download.
    "5 UID fetch 1:* (FLAGS)",
    "6 UID fetch 1:4012 (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (From To Cc Bcc Subject Date Message-ID Priority X-Priority References Newsgroups In-Reply-To Content-Type Reply-To)])",
    "7 UID fetch 4011 (UID RFC822.SIZE BODY.PEEK[])",
    // Apple Mail, K-9 / FairEmail, mutt.
    "A14 UID FETCH 1:* (FLAGS UID RFC822.SIZE INTERNALDATE BODY.PEEK[HEADER.FIELDS (date subject from to cc message-id in-reply-to references content-type x-priority)])",
    "12 UID FETCH 3120:3170 (UID INTERNALDATE RFC822.SIZE FLAGS BODYSTRUCTURE BODY.PEEK[HEADER])",
    "a0009 FETCH 1:250 (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[HEADER.FIELDS (DATE FROM SENDER SUBJECT TO CC MESSAGE-ID REFERENCES CONTENT-TYPE CONTENT-DESCRIPTION IN-REPLY-TO REPLY-TO LINES LIST-POST X-LABEL)])",
    "a0010 UID FETCH 42 (BODY.PEEK[1.2]<0.65536> BODY.PEEK[1.2.MIME])",
];

const PRELOGIN: &[&str] = &[
    "a1 CAPABILITY",
    "a2 LOGIN alice@example.com \"correct horse battery staple\"",
    "a3 AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUuY29tAGNvcnJlY3QgaG9yc2UgYmF0dGVyeSBzdGFwbGU=",
    "a4 ID (\"name\" \"Thunderbird\" \"version\" \"115.6.0\" \"os\" \"Linux\" \"vendor\" \"Mozilla\")",
    "a5 NOOP",
];

/// Nanoseconds per call of `f`, the best of 25 rounds (the machine is shared: the best
/// round is the one least disturbed).
fn per_call(rounds: u32, mut f: impl FnMut()) -> f64 {
    (0..25)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..rounds {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(rounds)
        })
        .fold(f64::INFINITY, f64::min)
}

fn timing() {
    let codec = CommandCodec::default();
    println!("| command | bytes | mailgate ns | imap-codec ns | ratio |");
    println!("|---|---:|---:|---:|---:|");
    let mut total = (0.0, 0.0);
    for line in FETCHES {
        let wire = format!("{line}\r\n");
        // Every one but the FLAGS-only sync (nothing to cache) is one the cache serves.
        assert_eq!(fetch::parse_request(line.as_bytes()).is_some(), line.contains('['), "{line}");
        assert!(codec.decode(wire.as_bytes()).is_ok(), "{line}");
        let ours = per_call(20_000, || drop(black_box(fetch::parse_request(black_box(line.as_bytes())))));
        let theirs = per_call(20_000, || drop(black_box(codec.decode(black_box(wire.as_bytes())))));
        total = (total.0 + ours, total.1 + theirs);
        println!("| `{}` | {} | {ours:.0} | {theirs:.0} | {:.1} |", &line[..line.len().min(40)], wire.len(), theirs / ours);
    }
    println!("| FETCH, all | | {:.0} | {:.0} | {:.1} |", total.0, total.1, total.1 / total.0);
    let mut total = (0.0, 0.0);
    for line in PRELOGIN {
        let wire = format!("{line}\r\n");
        let parts = [Part::Line { text: line.as_bytes().to_vec(), literal_follows: false }];
        assert!(command::parse(&parts).is_ok(), "{line}");
        let ours = per_call(20_000, || drop(black_box(command::parse(black_box(&parts)))));
        if codec.decode(wire.as_bytes()).is_err() {
            println!("| `{}` | {} | {ours:.0} | refused | |", &line[..line.len().min(40)], wire.len());
            continue;
        }
        let theirs = per_call(20_000, || drop(black_box(codec.decode(black_box(wire.as_bytes())))));
        total = (total.0 + ours, total.1 + theirs);
        println!("| `{}` | {} | {ours:.0} | {theirs:.0} | {:.1} |", &line[..line.len().min(40)], wire.len(), theirs / ours);
    }
    println!("| pre-login, all accepted by both | | {:.0} | {:.0} | {:.1} |", total.0, total.1, total.1 / total.0);
}

fn verdicts(dir: &str) {
    let mut counts: BTreeMap<Verdict, usize> = BTreeMap::new();
    let mut examples: BTreeMap<Verdict, Vec<String>> = BTreeMap::new();
    let mut paths: Vec<_> = std::fs::read_dir(dir).expect("corpus directory").map(|e| e.unwrap().path()).collect();
    paths.sort();
    for path in paths {
        let data = std::fs::read(&path).unwrap();
        let Some(line) = mailgate_fuzz::line(&data) else { continue };
        let verdict = mailgate_fuzz::compare(&line);
        *counts.entry(verdict).or_default() += 1;
        let list = examples.entry(verdict).or_default();
        if list.len() < 25 && verdict != Verdict::Neither {
            list.push(String::from_utf8_lossy(&line).into_owned());
        }
    }
    println!("{counts:?}");
    for (verdict, lines) in examples {
        println!("{verdict:?}:");
        for line in lines {
            println!("  {line}");
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("timing") => timing(),
        Some("verdicts") => verdicts(args.get(2).expect("a corpus directory")),
        _ => eprintln!("usage: fetch_grammar timing | verdicts DIR"),
    }
}
