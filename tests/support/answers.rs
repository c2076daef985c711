//! IMAP answers in a form two servers' answers can be compared in: FETCH data by sequence
//! number, item name (normalized: case, spacing, quoted field names) to the item's raw bytes,
//! several FETCH responses for one message merged (RFC 9051 §7.5.2); other untagged
//! responses in order; the tagged status word. Item order and tagged text may differ
//! between a server and mailgate; nothing else may.

use std::collections::BTreeMap;

use mailgate::imap::fetch::parse_response;

use super::client::Client;

#[derive(Debug, PartialEq, Eq, Default)]
pub struct Answer {
    pub fetch: BTreeMap<u32, BTreeMap<String, Vec<u8>>>,
    pub other: Vec<Vec<u8>>,
    pub status: String,
}

impl Answer {
    /// What differs between two answers, readably (item bytes cut at 200).
    pub fn diff(&self, other: &Answer) -> String {
        let text = |raw: &[u8]| String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned();
        let mut out = String::new();
        if self.status != other.status {
            out.push_str(&format!("status {:?} vs {:?}\n", self.status, other.status));
        }
        let seqs: std::collections::BTreeSet<u32> = self.fetch.keys().chain(other.fetch.keys()).copied().collect();
        for seq in seqs {
            let (a, b) = (self.fetch.get(&seq), other.fetch.get(&seq));
            if a == b {
                continue;
            }
            let (Some(a), Some(b)) = (a, b) else {
                out.push_str(&format!("* {seq}: only in {}\n", if a.is_some() { "the first" } else { "the second" }));
                continue;
            };
            let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for name in names {
                match (a.get(name), b.get(name)) {
                    (x, y) if x == y => {}
                    (x, y) => {
                        out.push_str(&format!("* {seq} {name}: {:?} vs {:?}\n", x.map(|r| text(r)), y.map(|r| text(r))))
                    }
                }
            }
        }
        if self.other != other.other {
            let lines = |o: &[Vec<u8>]| o.iter().map(|r| text(r)).collect::<Vec<_>>();
            out.push_str(&format!("other: {:?} vs {:?}\n", lines(&self.other), lines(&other.other)));
        }
        out
    }

    /// Items of message `seq`, as text, for assertion messages.
    pub fn describe(&self, seq: u32) -> String {
        match self.fetch.get(&seq) {
            None => format!("no FETCH for {seq}"),
            Some(items) => items
                .values()
                .map(|raw| String::from_utf8_lossy(&raw[..raw.len().min(120)]).into_owned())
                .collect::<Vec<_>>()
                .join(" | "),
        }
    }
}

/// Sends `tag command` and reads its answer.
pub fn answer(client: &mut Client, tag: &str, command: &str) -> Answer {
    client.send(format!("{tag} {command}\r\n").as_bytes());
    read_answer(client, tag)
}

/// The answer of a command already sent.
pub fn read_answer(client: &mut Client, tag: &str) -> Answer {
    answer_of(client.responses(tag), tag)
}

/// The answer in `bytes` (another client's transcript: responses with their literals, up
/// to and including the tagged completion of `tag`).
pub fn answer_from_bytes(mut bytes: &[u8], tag: &str) -> Answer {
    let mut responses = Vec::new();
    while !bytes.is_empty() {
        let mut end = 0;
        loop {
            let line_end = end + bytes[end..].iter().position(|&b| b == b'\n').expect("a whole line") + 1;
            let text = String::from_utf8_lossy(&bytes[end..line_end]);
            let literal = text
                .trim_end()
                .strip_suffix('}')
                .and_then(|l| l.rsplit_once('{'))
                .and_then(|(_, n)| n.trim_end_matches('+').parse::<usize>().ok());
            end = line_end + literal.unwrap_or(0);
            if literal.is_none() {
                break;
            }
        }
        responses.push(bytes[..end].to_vec());
        bytes = &bytes[end..];
    }
    answer_of(responses, tag)
}

fn answer_of(responses: Vec<Vec<u8>>, tag: &str) -> Answer {
    let mut answer = Answer::default();
    for response in responses {
        if response.starts_with(format!("{tag} ").as_bytes()) {
            let status = String::from_utf8_lossy(&response[tag.len() + 1..]).into_owned();
            answer.status = status.trim_end().split(' ').next().unwrap().to_string();
        } else if let Some(parsed) = parse_response(&response) {
            let items = answer.fetch.entry(parsed.seq).or_default();
            for item in &parsed.items {
                let mut raw = response[item.range.clone()].to_vec();
                if item.name == "FLAGS" {
                    // \Recent belongs to whichever session saw the message first.
                    let text = String::from_utf8_lossy(&raw)
                        .replace("\\Recent ", "")
                        .replace(" \\Recent", "")
                        .replace("\\Recent", "");
                    raw = text.into_bytes();
                }
                items.insert(item.name.to_string(), raw);
            }
        } else if !response.ends_with(b" RECENT\r\n") {
            // Like \Recent, RECENT counts belong to whichever session saw a message first.
            answer.other.push(response);
        }
    }
    answer
}
