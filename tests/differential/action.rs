//! The steps of a differential run as data: exactly what is sent where. A trace file is
//! the text form of a list of actions (see [`to_text`]); a replay reads it back.
//!
//! ```text
//! imap                          one write to the session through mailgate and its twin
//!   |a1 UID FETCH 5 (UID BODY.PEEK[]<0.10> BODY.PEEK[]<0.20>)|
//!   |a2 EXAMINE Sent|
//! idle a3 50                    a3 IDLE, 50 ms, DONE
//! reconnect                     LOGOUT (if logged in) and LOGIN again, both sessions
//! mutate                        on the account and its twin, straight to the server
//!   |m4 APPEND Sent (\Seen) "14-Sep-2020 08:00:00 +0000"| mail 77 12 0
//! rebuild Archive.2024 4000000002 99 6
//! pop3 quit                     a POP3 session ending with QUIT (or `drop`)
//!   |RETR 1 | |DELE 2|          one write per line, each |command| sent with CRLF
//! ```
//!
//! A command with `mail SEED INDEX MAX` carries `mailgen::message(SEED, INDEX, MAX)` as a
//! LITERAL+ literal (`{n+}`).

use crate::support::mailgen;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Command lines written in one write to the IMAP session through mailgate and to its
    /// twin; every answer compared.
    Imap(Vec<Cmd>),
    /// `tag IDLE`, a pause, `DONE`, on both sessions.
    Idle { tag: String, millis: u64 },
    /// LOGOUT (when logged in) and a new LOGIN, on both sessions.
    Reconnect,
    /// Commands on the mutator's sessions of the account and of its twin, straight to the
    /// server (answers compared between the twins); then both IMAP sessions settle.
    Mutate(Vec<Cmd>),
    /// With every session of both accounts logged out, `folder` rewritten on disk with
    /// `count` messages of content `seed`, keeping UIDVALIDITY `uidvalidity`.
    Rebuild { folder: String, uidvalidity: u32, seed: u64, count: usize },
    /// A POP3 session on both accounts: each inner list is one write of command lines;
    /// it ends with QUIT or with the connection dropped.
    Pop3 { writes: Vec<Vec<String>>, quit: bool },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cmd {
    pub tag: String,
    /// The command after the tag (without the literal of an APPEND).
    pub text: String,
    pub literal: Option<Mail>,
}

/// A generated message (see `mailgen::message`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mail {
    pub seed: u64,
    pub index: usize,
    pub max_big: usize,
}

impl Mail {
    pub fn bytes(&self) -> Vec<u8> {
        mailgen::message(self.seed, self.index, self.max_big)
    }
}

impl Cmd {
    pub fn new(tag: impl Into<String>, text: impl Into<String>) -> Cmd {
        Cmd { tag: tag.into(), text: text.into(), literal: None }
    }

    /// The bytes on the wire, CRLF included.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {}", self.tag, self.text).into_bytes();
        if let Some(mail) = &self.literal {
            let body = mail.bytes();
            out.extend_from_slice(format!(" {{{}+}}\r\n", body.len()).as_bytes());
            out.extend_from_slice(&body);
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// The command word(s) in upper case: `FETCH`, `UID FETCH`, `SELECT`...
    pub fn verb(&self) -> String {
        let mut words = self.text.split(' ');
        let first = words.next().unwrap_or_default().to_ascii_uppercase();
        if first == "UID" {
            format!("UID {}", words.next().unwrap_or_default().to_ascii_uppercase())
        } else {
            first
        }
    }

    /// The first argument (a mailbox name for SELECT, EXAMINE, DELETE...).
    pub fn arg(&self) -> Option<&str> {
        self.text.split(' ').nth(1)
    }
}

pub fn batch_bytes(cmds: &[Cmd]) -> Vec<u8> {
    cmds.iter().flat_map(Cmd::bytes).collect()
}

fn cmd_line(cmd: &Cmd) -> String {
    let mut line = format!("  |{} {}|", cmd.tag, cmd.text);
    if let Some(m) = &cmd.literal {
        line.push_str(&format!(" mail {} {} {}", m.seed, m.index, m.max_big));
    }
    line
}

impl Action {
    /// The text form (one or more lines, each ending in a newline).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        match self {
            Action::Imap(cmds) | Action::Mutate(cmds) => {
                out.push_str(if matches!(self, Action::Imap(_)) { "imap\n" } else { "mutate\n" });
                for cmd in cmds {
                    out.push_str(&cmd_line(cmd));
                    out.push('\n');
                }
            }
            Action::Idle { tag, millis } => out.push_str(&format!("idle {tag} {millis}\n")),
            Action::Reconnect => out.push_str("reconnect\n"),
            Action::Rebuild { folder, uidvalidity, seed, count } => {
                out.push_str(&format!("rebuild {folder} {uidvalidity} {seed} {count}\n"))
            }
            Action::Pop3 { writes, quit } => {
                out.push_str(if *quit { "pop3 quit\n" } else { "pop3 drop\n" });
                for write in writes {
                    let line: Vec<String> = write.iter().map(|c| format!("|{c}|")).collect();
                    out.push_str(&format!("  {}\n", line.join(" ")));
                }
            }
        }
        out
    }

    /// How many parts [`Action::without_part`] can remove (commands of a batch, writes of
    /// a POP3 session).
    pub fn parts(&self) -> usize {
        match self {
            Action::Imap(cmds) | Action::Mutate(cmds) => cmds.len(),
            Action::Pop3 { writes, .. } => writes.iter().map(Vec::len).sum(),
            _ => 1,
        }
    }

    /// This action with one part removed (for minimising), or None if it would be empty.
    pub fn without_part(&self, i: usize) -> Option<Action> {
        match self {
            Action::Imap(cmds) | Action::Mutate(cmds) if cmds.len() > 1 => {
                let mut cmds = cmds.clone();
                cmds.remove(i);
                Some(if matches!(self, Action::Imap(_)) { Action::Imap(cmds) } else { Action::Mutate(cmds) })
            }
            Action::Pop3 { writes, quit } if self.parts() > 1 => {
                let mut n = i;
                let mut writes = writes.clone();
                for w in writes.iter_mut() {
                    if n < w.len() {
                        w.remove(n);
                        break;
                    }
                    n -= w.len();
                }
                writes.retain(|w| !w.is_empty());
                Some(Action::Pop3 { writes, quit: *quit })
            }
            _ => None,
        }
    }
}

/// A whole trace: `# comments`, then the actions.
pub fn to_text(header: &[String], actions: &[Action]) -> String {
    let mut out = String::new();
    for line in header {
        out.push_str(&format!("# {line}\n"));
    }
    for action in actions {
        out.push_str(&action.to_text());
    }
    out
}

/// `key value` comment lines of a trace.
pub type Header = Vec<(String, String)>;

/// Parses [`to_text`]'s output (comment lines are skipped; `key value` comments are
/// returned as the header).
pub fn parse(text: &str) -> Result<(Header, Vec<Action>), String> {
    let mut header = Vec::new();
    let mut actions: Vec<Action> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let err = |what: &str| format!("line {}: {what}: {line:?}", n + 1);
        if let Some(comment) = line.strip_prefix('#') {
            if let Some((k, v)) = comment.trim().split_once(' ') {
                header.push((k.to_string(), v.trim().to_string()));
            }
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        if line.starts_with("  ") {
            let body = line.trim_start();
            match actions.last_mut() {
                Some(Action::Imap(cmds)) | Some(Action::Mutate(cmds)) => {
                    let rest = body.strip_prefix('|').ok_or_else(|| err("expected |command|"))?;
                    let end = rest.find('|').ok_or_else(|| err("unterminated |command|"))?;
                    let (tag, text) = rest[..end].split_once(' ').ok_or_else(|| err("command without tag"))?;
                    let literal = match rest[end + 1..].split_whitespace().collect::<Vec<_>>()[..] {
                        [] => None,
                        ["mail", seed, index, max] => Some(Mail {
                            seed: seed.parse().map_err(|_| err("seed"))?,
                            index: index.parse().map_err(|_| err("index"))?,
                            max_big: max.parse().map_err(|_| err("max"))?,
                        }),
                        _ => return Err(err("unexpected text after command")),
                    };
                    cmds.push(Cmd { tag: tag.to_string(), text: text.to_string(), literal });
                }
                Some(Action::Pop3 { writes, .. }) => {
                    let mut write = Vec::new();
                    let mut rest = body;
                    while let Some(r) = rest.strip_prefix('|') {
                        let end = r.find('|').ok_or_else(|| err("unterminated |command|"))?;
                        write.push(r[..end].to_string());
                        rest = r[end + 1..].trim_start();
                    }
                    if !rest.is_empty() || write.is_empty() {
                        return Err(err("expected |command| |command| ..."));
                    }
                    writes.push(write);
                }
                _ => return Err(err("indented line outside imap/mutate/pop3")),
            }
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let action = match words[..] {
            ["imap"] => Action::Imap(Vec::new()),
            ["mutate"] => Action::Mutate(Vec::new()),
            ["reconnect"] => Action::Reconnect,
            ["idle", tag, millis] => {
                Action::Idle { tag: tag.to_string(), millis: millis.parse().map_err(|_| err("millis"))? }
            }
            ["rebuild", folder, uv, seed, count] => Action::Rebuild {
                folder: folder.to_string(),
                uidvalidity: uv.parse().map_err(|_| err("uidvalidity"))?,
                seed: seed.parse().map_err(|_| err("seed"))?,
                count: count.parse().map_err(|_| err("count"))?,
            },
            ["pop3", end] => Action::Pop3 { writes: Vec::new(), quit: end == "quit" },
            _ => return Err(err("unknown action")),
        };
        actions.push(action);
    }
    Ok((header, actions))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips() {
        let actions = vec![
            Action::Imap(vec![Cmd::new("a1", "UID FETCH 5 (BODY.PEEK[]<0.10>)"), Cmd::new("a2", "EXAMINE Sent")]),
            Action::Idle { tag: "a3".into(), millis: 50 },
            Action::Reconnect,
            Action::Mutate(vec![Cmd {
                tag: "m4".into(),
                text: "APPEND Sent (\\Seen) \"14-Sep-2020 08:00:00 +0000\"".into(),
                literal: Some(Mail { seed: 7, index: 3, max_big: 0 }),
            }]),
            Action::Rebuild { folder: "Archive.2024".into(), uidvalidity: 4_000_000_002, seed: 9, count: 4 },
            Action::Pop3 {
                writes: vec![vec!["RETR 1 ".into(), "DELE 2".into()], vec!["TOP 1 0 junk".into()]],
                quit: false,
            },
        ];
        let text = to_text(&["seed 5".to_string()], &actions);
        let (header, parsed) = parse(&text).unwrap();
        assert_eq!(header, vec![("seed".to_string(), "5".to_string())]);
        assert_eq!(parsed, actions);
    }
}
