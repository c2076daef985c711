//! The differential FETCH target: imap-codec (a complete RFC 3501 parser) is the oracle for
//! the grammar a cache key depends on. For every FETCH line both parsers accept, the items
//! mailgate would ask for and cache must be the items imap-codec reads, in order, with the
//! same section, partial range and PEEK, and the sequence set must hold the same messages.
//! Where only one side accepts, [`Verdict`] says which (see `src/bin/fetch_grammar.rs`).

use imap_codec::decode::Decoder;
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItemName, Part, Section};
use imap_codec::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use imap_codec::CommandCodec;
use mailgate::imap::fetch::{self, ItemKind};

/// How the two parsers judged one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// Both accept and agree (a mismatch panics instead).
    Agree,
    /// Only mailgate would cache it.
    MailgateOnly,
    /// Only imap-codec accepts it (mailgate relays it untouched).
    CodecOnly,
    Neither,
}

pub use mailgate::fuzzing::fetch_line as line;

fn part(part: &Option<Part>) -> String {
    part.as_ref().map(|p| p.0.as_ref().iter().map(|n| format!("{n}.")).collect()).unwrap_or_default()
}

fn section(section: &Option<Section>) -> String {
    let fields = |list: &[imap_codec::imap_types::core::AString]| {
        let names: Vec<String> =
            list.iter().map(|f| String::from_utf8_lossy(f.as_ref()).to_ascii_uppercase()).collect();
        names.join(" ")
    };
    match section {
        None => String::new(),
        Some(Section::Part(p)) => part(&Some(p.clone())).trim_end_matches('.').to_string(),
        Some(Section::Header(p)) => format!("{}HEADER", part(p)),
        Some(Section::HeaderFields(p, list)) => format!("{}HEADER.FIELDS ({})", part(p), fields(list.as_ref())),
        Some(Section::HeaderFieldsNot(p, list)) => {
            format!("{}HEADER.FIELDS.NOT ({})", part(p), fields(list.as_ref()))
        }
        Some(Section::Text(p)) => format!("{}TEXT", part(p)),
        Some(Section::Mime(p)) => format!("{}MIME", part(&Some(p.clone()))),
    }
}

/// What mailgate's item must be for imap-codec's: (response name, key without the
/// spelling suffix, sets \Seen), or the plain name of an item asked upstream every time.
fn expected(item: &MessageDataItemName) -> (String, Option<(String, bool)>) {
    let plain = |name: &str, seen: bool| (name.to_string(), Some((name.to_string(), seen)));
    match item {
        MessageDataItemName::Uid => ("UID".into(), None),
        MessageDataItemName::Flags => ("FLAGS".into(), None),
        MessageDataItemName::InternalDate => ("INTERNALDATE".into(), None),
        MessageDataItemName::Body => plain("BODY", false),
        MessageDataItemName::BodyStructure => plain("BODYSTRUCTURE", false),
        MessageDataItemName::Envelope => plain("ENVELOPE", false),
        MessageDataItemName::Rfc822 => plain("RFC822", true),
        MessageDataItemName::Rfc822Header => plain("RFC822.HEADER", false),
        MessageDataItemName::Rfc822Size => plain("RFC822.SIZE", false),
        MessageDataItemName::Rfc822Text => plain("RFC822.TEXT", true),
        MessageDataItemName::BodyExt { section: s, partial, peek } => {
            let name = format!("BODY[{}]", section(s));
            let (response, key) = match partial {
                Some((origin, length)) => (format!("{name}<{origin}>"), format!("{name}<{origin}.{length}>")),
                None => (name.clone(), name),
            };
            (response, Some((key, !peek)))
        }
    }
}

fn contains(set: &SequenceSet, n: u32, max: u32) -> bool {
    let value = |v: &SeqOrUid| match v {
        SeqOrUid::Value(v) => v.get(),
        SeqOrUid::Asterisk => max,
    };
    set.0.as_ref().iter().any(|s| match s {
        Sequence::Single(v) => value(v) == n,
        Sequence::Range(a, b) => (value(a).min(value(b))..=value(a).max(value(b))).contains(&n),
    })
}

/// Parses the line with both and compares; panics on a disagreement that matters.
pub fn compare(line: &[u8]) -> Verdict {
    let ours = fetch::parse_request(line);
    let wire = [line, b"\r\n"].concat();
    let theirs = match CommandCodec::default().decode(&wire) {
        Ok((rest, command)) if rest.is_empty() => match command.body {
            CommandBody::Fetch { sequence_set, macro_or_item_names, uid } => Some((sequence_set, macro_or_item_names, uid)),
            _ => None,
        },
        _ => None,
    };
    let (ours, (set, items, uid)) = match (ours, theirs) {
        (Some(ours), Some(theirs)) => (ours, theirs),
        (Some(_), None) => return Verdict::MailgateOnly,
        (None, Some(_)) => return Verdict::CodecOnly,
        (None, None) => return Verdict::Neither,
    };
    let text = String::from_utf8_lossy(line);
    assert_eq!(ours.uid, uid, "{text}");
    let MacroOrMessageDataItemNames::MessageDataItemNames(items) = items else {
        panic!("mailgate caches a macro: {text}")
    };
    assert_eq!(ours.items.len(), items.len(), "{text}: {ours:?} vs {items:?}");
    for (mine, item) in ours.items.iter().zip(&items) {
        let (name, cached) = expected(item);
        match (&mine.kind, cached) {
            (ItemKind::Mutable, None) => assert_eq!(fetch::normalize(&mine.request), name, "{text}"),
            (ItemKind::Cached { response, key, sets_seen, .. }, Some((want_key, seen))) => {
                assert_eq!(response, &name, "{text}");
                assert_eq!(key.split(" as (").next(), Some(want_key.as_str()), "{text}");
                assert_eq!(*sets_seen, seen, "{text}");
            }
            (kind, cached) => panic!("{text}: mailgate {kind:?}, imap-codec {item:?} ({cached:?})"),
        }
    }
    let ours_set = fetch::SequenceSet::parse(&ours.set);
    for max in [1, 2, 7, 1000] {
        for n in [1, 2, 3, 5, 7, 8, 999, 1000, 1001, u32::MAX] {
            assert_eq!(ours_set.contains(n, max), contains(&set, n, max), "{text}: {n} with * = {max}");
        }
    }
    Verdict::Agree
}
