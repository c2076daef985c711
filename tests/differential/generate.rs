//! Random steps for one logical user: IMAP commands (FETCH above all, with every kind of
//! set and item list), pipelined batches, session changes, mutations straight to the
//! server, POP3 sessions. Each step runs at once (later steps aim at what earlier answers
//! showed) and is logged as the actions that ran.

use crate::support::mailgen::Rng;

use super::action::{Action, Cmd, Mail};
use super::env::User;
use super::exec::{is_barrier, Executor, Mismatch, Outcome};
use super::model::Model;
use super::pop3;
use super::server::initial_folders;

/// FETCH items and how often to pick them.
const ITEMS: &[(&str, u32)] = &[
    ("UID", 10),
    ("FLAGS", 10),
    ("RFC822.SIZE", 8),
    ("INTERNALDATE", 6),
    ("ENVELOPE", 6),
    ("BODYSTRUCTURE", 6),
    ("BODY", 4),
    ("RFC822.HEADER", 4),
    ("RFC822", 1),
    ("RFC822.TEXT", 1),
    ("BODY[]", 1),
    ("BODY[TEXT]", 1),
    ("BODY[HEADER]", 1),
    ("BODY[1]", 1),
    ("BODY.PEEK[]", 8),
    ("BODY.PEEK[HEADER]", 6),
    ("BODY.PEEK[TEXT]", 5),
    ("BODY.PEEK[1]", 4),
    ("BODY.PEEK[1.MIME]", 3),
    ("BODY.PEEK[2]", 2),
    ("BODY.PEEK[2.1]", 3),
    ("BODY.PEEK[1.2]", 1),
    ("BODY.PEEK[1.HEADER]", 1),
    ("BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)]", 5),
    ("BODY.PEEK[HEADER.FIELDS.NOT (RECEIVED)]", 3),
    ("BODY.PEEK[HEADER.FIELDS (DATE MESSAGE-ID TO)]", 2),
    ("BINARY.PEEK[1]", 1),
    ("BINARY.SIZE[1]", 1),
];

/// Messages a folder may hold before the generator trims it.
const MAX_FOLDER: u32 = 90;

const FLAGS: &[&str] =
    &["\\Seen", "\\Flagged", "\\Answered", "\\Draft", "$Fuzz", "\\Seen \\Flagged", "$Label1 \\Answered"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Fetch,
    Batch,
    Select,
    Close,
    Noop,
    Idle,
    Status,
    Search,
    Store,
    Expunge,
    CopyMove,
    Append,
    Enable,
    Reconnect,
    Mutate,
    Pop3,
}

const IMAP_KINDS: &[(Kind, u32)] = &[
    (Kind::Fetch, 40),
    (Kind::Batch, 8),
    (Kind::Select, 7),
    (Kind::Close, 2),
    (Kind::Noop, 2),
    (Kind::Idle, 2),
    (Kind::Status, 2),
    (Kind::Search, 2),
    (Kind::Store, 5),
    (Kind::Expunge, 1),
    (Kind::CopyMove, 2),
    (Kind::Append, 1),
    (Kind::Enable, 1),
    (Kind::Reconnect, 2),
    (Kind::Mutate, 12),
];

/// Constructs `MAILGATE_FUZZ_AVOID` can leave out (to look past a known open bug).
pub const AVOIDABLE: &[(&str, &str)] = &[
    ("condstore", "MODSEQ, CHANGEDSINCE, UNCHANGEDSINCE, ENABLE, SELECT (CONDSTORE) and (QRESYNC ...)"),
    ("seen", "FETCH items that set \\Seen (BODY[...], RFC822, RFC822.TEXT)"),
    ("partials2", "two partials of one section in one FETCH"),
    ("dup", "an item repeated in one FETCH"),
    ("macros", "ALL, FAST, FULL"),
    ("lowercase", "commands in lower case"),
    ("beyond", "sets past the last message, and invalid sets"),
    ("pipeline", "several commands in one write"),
    ("rebuild", "a folder rebuilt on disk with its old UIDVALIDITY"),
    ("recreate", "a folder deleted and created again"),
    ("odd-pop3", "odd POP3 spellings (RETR +1, TOP 1 0 junk, DELE twice...)"),
    ("move", "MOVE and UID MOVE (COPY instead)"),
    ("unselect", "UNSELECT (CLOSE instead)"),
    ("dupset", "a sequence set naming a message twice (`1:4,1`), which Courier answers twice"),
];

/// What the generator may use.
#[derive(Clone, Debug)]
pub struct Features {
    pub imap: bool,
    pub pop3: bool,
    pub avoid: Vec<String>,
    /// The server's folder names, INBOX first (`server::Kind::folders`).
    pub folders: [&'static str; 3],
}

impl Features {
    pub fn allows(&self, construct: &str) -> bool {
        debug_assert!(AVOIDABLE.iter().any(|(name, _)| *name == construct), "{construct}");
        !self.avoid.iter().any(|a| a == construct)
    }
}

pub struct Generator {
    rng: Rng,
    pub model: Model,
    tags: u64,
    mails: usize,
    mail_seed: u64,
    features: Features,
    /// The folders were opened with CONDSTORE (see [`Generator::track_modseqs`]).
    tracked: bool,
}

fn weighted<T: Copy>(rng: &mut Rng, table: &[(T, u32)]) -> T {
    let total: u32 = table.iter().map(|(_, w)| w).sum();
    let mut x = rng.range(0, total as usize - 1) as u32;
    for (item, w) in table {
        if x < *w {
            return *item;
        }
        x -= w;
    }
    unreachable!()
}

impl Generator {
    pub fn new(seed: u64, user: &User, features: &Features) -> Generator {
        Generator {
            rng: Rng::new(seed ^ user.content_seed.rotate_left(29)),
            model: Model::new(&initial_folders(user.content_seed, features.folders)),
            tags: 0,
            mails: 0,
            mail_seed: user.content_seed ^ 0xA99E_u64,
            features: features.clone(),
            tracked: false,
        }
    }

    /// Opens `folders` once with CONDSTORE, straight at the server, for both accounts.
    /// Dovecot keeps modification sequences for a mailbox from the first time a session with
    /// CONDSTORE on opens it, and numbers them from then. mailgate turns CONDSTORE on in
    /// sessions whose resyncs it checks with them, for the account behind it only: without
    /// this, one twin would start keeping them earlier than the other, and the twins'
    /// SELECTs and MODSEQs would differ in a way no answer of mailgate's decides (a mailbox
    /// without them is tested in tests/imap_modseq.rs).
    fn track_modseqs(&mut self, ex: &mut Executor, log: &mut Vec<Action>, folders: &[String]) -> Result<(), Mismatch> {
        if !self.features.imap || !self.features.allows("condstore") {
            return Ok(());
        }
        let cmds = folders.iter().map(|f| Cmd::new(self.tag("m"), format!("SELECT {f} (CONDSTORE)"))).collect();
        self.act(ex, log, Action::Mutate(cmds))?;
        Ok(())
    }

    fn tag(&mut self, prefix: &str) -> String {
        self.tags += 1;
        format!("{prefix}{}", self.tags)
    }

    fn act(&mut self, ex: &mut Executor, log: &mut Vec<Action>, action: Action) -> Result<Outcome, Mismatch> {
        log.push(action.clone());
        let outcome = ex.run(&action)?;
        self.model.learn(&action, &outcome);
        Ok(outcome)
    }

    /// One random step (one or a few actions).
    pub fn step(&mut self, ex: &mut Executor, log: &mut Vec<Action>) -> Result<(), Mismatch> {
        if !self.tracked {
            self.tracked = true;
            let folders: Vec<String> = self.features.folders.iter().map(|f| f.to_string()).collect();
            return self.track_modseqs(ex, log, &folders);
        }
        let mut kind = if !self.features.imap {
            if self.rng.chance(60) {
                Kind::Pop3
            } else {
                Kind::Mutate
            }
        } else if self.features.pop3 && self.rng.chance(4) {
            Kind::Pop3
        } else {
            weighted(&mut self.rng, IMAP_KINDS)
        };
        let needs_mailbox = matches!(kind, Kind::Fetch | Kind::Batch | Kind::Store | Kind::Expunge | Kind::CopyMove);
        if needs_mailbox && self.model.selected.is_none() && self.rng.chance(80) {
            kind = Kind::Select;
        }
        // Clients enable extensions before they open a mailbox (Thunderbird, Apple Mail, K-9
        // right after login). One that syncs flags without CONDSTORE and turns QRESYNC on
        // later in the same session meets Dovecot's QRESYNC bookkeeping changed by mailgate's
        // own CONDSTORE (docs/TESTING.md, "What may differ").
        if (kind == Kind::Batch && !self.features.allows("pipeline"))
            || (kind == Kind::Enable && (!self.features.allows("condstore") || self.model.opened))
        {
            kind = Kind::Fetch;
        }
        match kind {
            Kind::Fetch => {
                let cmd = self.fetch();
                self.act(ex, log, Action::Imap(vec![cmd]))?;
            }
            Kind::Batch => {
                let n = self.rng.range(2, 4);
                let cmds: Vec<Cmd> = (0..n)
                    .map(|_| match self.rng.range(0, 9) {
                        0..=5 => self.fetch(),
                        6 | 7 => self.select(),
                        8 => self.store(),
                        _ => self.simple(),
                    })
                    .collect();
                self.act(ex, log, Action::Imap(deterministic(cmds)))?;
            }
            Kind::Select => {
                let cmd = self.select();
                self.act(ex, log, Action::Imap(vec![cmd]))?;
            }
            Kind::Close => {
                let text = if self.rng.chance(50) || !self.features.allows("unselect") { "CLOSE" } else { "UNSELECT" };
                let cmd = Cmd::new(self.tag("a"), text);
                self.act(ex, log, Action::Imap(vec![cmd]))?;
            }
            Kind::Noop | Kind::Status | Kind::Search => {
                let cmd = match kind {
                    Kind::Status => self.status(),
                    Kind::Search => self.search(),
                    _ => self.simple(),
                };
                self.act(ex, log, Action::Imap(vec![cmd]))?;
            }
            Kind::Idle => {
                let tag = self.tag("a");
                self.act(ex, log, Action::Idle { tag, millis: 50 })?;
            }
            Kind::Store => {
                let cmd = self.store();
                self.act(ex, log, Action::Imap(vec![cmd]))?;
            }
            Kind::Expunge => {
                let text =
                    if self.rng.chance(50) { "EXPUNGE".to_string() } else { format!("UID EXPUNGE {}", self.set(true)) };
                let cmd = Cmd::new(self.tag("a"), text);
                self.act(ex, log, Action::Imap(vec![cmd]))?;
            }
            Kind::CopyMove => {
                let uid = if self.rng.chance(60) { "UID " } else { "" };
                let dest = self.folder();
                // COPY grows the folders; past a size only MOVE (or nothing) keeps them small.
                let full = self.model.info(&dest).exists > MAX_FOLDER;
                if full && !self.features.allows("move") {
                    return Ok(());
                }
                let verb =
                    if (self.rng.chance(50) && !full) || !self.features.allows("move") { "COPY" } else { "MOVE" };
                let set = self.set(!uid.is_empty());
                let cmd = Cmd::new(self.tag("a"), format!("{uid}{verb} {set} {dest}"));
                self.act(ex, log, Action::Imap(vec![cmd]))?;
            }
            Kind::Append => {
                let folder = self.folder();
                if self.model.info(&folder).exists > MAX_FOLDER {
                    return self.trim(ex, log, &folder);
                }
                let cmd = self.append(&folder, "a");
                self.act(ex, log, Action::Imap(vec![cmd]))?;
            }
            Kind::Enable => {
                let what = *self.rng.pick(&["QRESYNC", "CONDSTORE", "CONDSTORE QRESYNC"]);
                let cmd = Cmd::new(self.tag("a"), format!("ENABLE {what}"));
                self.act(ex, log, Action::Imap(vec![cmd]))?;
            }
            Kind::Reconnect => {
                self.act(ex, log, Action::Reconnect)?;
                if self.rng.chance(40) && self.features.allows("condstore") {
                    let what = if self.rng.chance(75) { "QRESYNC" } else { "CONDSTORE" };
                    let cmd = Cmd::new(self.tag("a"), format!("ENABLE {what}"));
                    self.act(ex, log, Action::Imap(vec![cmd]))?;
                }
            }
            Kind::Mutate => self.mutate(ex, log)?,
            Kind::Pop3 => {
                let messages = self.model.info("INBOX").exists;
                let odd = self.features.allows("odd-pop3");
                let (writes, quit) = pop3::session(&mut self.rng, messages, odd);
                self.act(ex, log, Action::Pop3 { writes, quit })?;
                if self.rng.chance(50) {
                    self.flag_check(ex, log, "INBOX")?;
                }
            }
        }
        Ok(())
    }

    fn folder(&mut self) -> String {
        self.rng.pick(&self.features.folders).to_string()
    }

    /// A message number or UID near the mailbox's range: inside it mostly, sometimes past it.
    fn number(&mut self, max: u32) -> u32 {
        if self.rng.chance(92) {
            self.rng.range(1, max.max(1) as usize) as u32
        } else {
            max + self.rng.range(1, 5) as u32
        }
    }

    /// A sequence set for FETCH/STORE/COPY: single numbers, ranges (reversed too), lists,
    /// `*`, `n:*`, beyond the last message, now and then invalid.
    fn set(&mut self, uid: bool) -> String {
        let max = if uid { self.model.uidnext.saturating_sub(1) } else { self.model.exists }.max(1);
        if !self.features.allows("beyond") {
            return match self.rng.range(0, 3) {
                0 => self.rng.range(1, max as usize).to_string(),
                1 => "1:*".to_string(),
                2 => "*".to_string(),
                _ => {
                    let a = self.rng.range(1, max as usize);
                    format!("{a}:{}", self.rng.range(a, max as usize))
                }
            };
        }
        match self.rng.range(0, 99) {
            0..=29 => self.number(max).to_string(),
            30..=49 => {
                let a = self.number(max);
                let b = a + self.rng.range(0, 8) as u32;
                if self.rng.chance(20) {
                    format!("{b}:{a}")
                } else {
                    format!("{a}:{b}")
                }
            }
            50..=56 => "*".to_string(),
            57..=64 => format!("{}:*", self.number(max)),
            65..=74 => {
                let n = self.rng.range(2, 4);
                let parts: Vec<(u32, u32)> = (0..n)
                    .map(|_| {
                        let a = self.number(max);
                        if self.rng.chance(30) {
                            (a, a + self.rng.range(1, 4) as u32)
                        } else {
                            (a, a)
                        }
                    })
                    .collect();
                let overlap =
                    parts.iter().enumerate().any(|(i, p)| parts[..i].iter().any(|q| p.0 <= q.1 && q.0 <= p.1));
                if overlap && !self.features.allows("dupset") {
                    let (lo, hi) = (parts.iter().map(|p| p.0).min().unwrap(), parts.iter().map(|p| p.1).max().unwrap());
                    return format!("{lo}:{hi}");
                }
                let text: Vec<String> =
                    parts.iter().map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}:{b}") }).collect();
                text.join(",")
            }
            75..=80 => "1:*".to_string(),
            81..=88 => match self.rng.range(0, 2) {
                0 => format!("{}:{}", max + 1, max + self.rng.range(1, 50) as u32),
                1 => format!("{}:*", max + self.rng.range(1, 120) as u32),
                _ => (max + self.rng.range(1, 3) as u32).to_string(),
            },
            89..=94 => format!("*:{}", self.number(max)),
            95..=97 => format!("{}:4294967295", self.number(max)),
            _ => (*self.rng.pick(&["0", "1:0", "0:*"])).to_string(),
        }
    }

    fn partial(&mut self) -> String {
        let origin = *self.rng.pick(&[0, 0, 0, 1, 10, 100, 500, 2_000, 10_000, 200_000]);
        let length = *self.rng.pick(&[1, 10, 10, 100, 1_000, 5_000, 300_000]);
        format!("<{origin}.{length}>")
    }

    fn item(&mut self) -> String {
        let mut item = weighted(&mut self.rng, ITEMS).to_string();
        while !self.features.allows("seen") && sets_seen(&item) {
            item = weighted(&mut self.rng, ITEMS).to_string();
        }
        if item.starts_with("BODY") && item.contains('[') && self.rng.chance(20) {
            format!("{item}{}", self.partial())
        } else {
            item
        }
    }

    fn items(&mut self) -> String {
        if self.rng.chance(5) && self.features.allows("macros") {
            return self.rng.pick(&["ALL", "FAST", "FULL"]).to_string();
        }
        let n = self.rng.range(1, 4);
        let mut items: Vec<String> = (0..n).map(|_| self.item()).collect();
        // Drawn with replacement: left out, repeats and second partials must go too.
        if !self.features.allows("dup") {
            let mut seen = std::collections::HashSet::new();
            items.retain(|i| seen.insert(i.to_ascii_uppercase()));
        }
        if !self.features.allows("partials2") {
            let mut sections = std::collections::HashSet::new();
            items.retain(|i| match i.split_once('<') {
                Some((section, _)) => sections.insert(section.to_ascii_uppercase()),
                None => true,
            });
        }
        if self.rng.chance(8) && self.features.allows("partials2") {
            // Two partials of one section.
            let section = *self.rng.pick(&["BODY.PEEK[]", "BODY.PEEK[TEXT]", "BODY.PEEK[1]", "BODY.PEEK[HEADER]"]);
            let (a, b) = (self.partial(), self.partial());
            items.push(format!("{section}{a}"));
            items.push(format!("{section}{b}"));
        }
        if self.rng.chance(6) && self.features.allows("dup") {
            let dup = items[self.rng.range(0, items.len() - 1)].clone();
            items.push(dup);
        }
        if self.model.condstore && self.rng.chance(30) && self.features.allows("condstore") {
            items.push("MODSEQ".to_string());
        }
        if items.len() == 1 && self.rng.chance(40) {
            return items.pop().unwrap();
        }
        format!("({})", items.join(" "))
    }

    fn fetch(&mut self) -> Cmd {
        let uid = self.rng.chance(50);
        let set = self.set(uid);
        let items = self.items();
        let mut text = format!("{}FETCH {set} {items}", if uid { "UID " } else { "" });
        if self.model.condstore && self.rng.chance(10) && self.features.allows("condstore") {
            let modseq = self.rng.range(0, self.model.selected_modseq() as usize);
            if uid && self.model.qresync && self.rng.chance(50) {
                text.push_str(&format!(" (CHANGEDSINCE {modseq} VANISHED)"));
            } else {
                text.push_str(&format!(" (CHANGEDSINCE {modseq})"));
            }
        }
        if self.rng.chance(10) && self.features.allows("lowercase") {
            text = text.to_ascii_lowercase();
        }
        Cmd::new(self.tag("a"), text)
    }

    fn select(&mut self) -> Cmd {
        let verb = if self.rng.chance(70) { "SELECT" } else { "EXAMINE" };
        let folder = match self.rng.range(0, 99) {
            0..=1 => "Nope".to_string(),
            2..=5 => "inbox".to_string(),
            _ => self.folder(),
        };
        let info = self.model.info(&folder).clone();
        let condstore = self.features.allows("condstore");
        let modifier = if !condstore {
            String::new()
        } else if self.model.qresync && info.uidvalidity != 0 && self.rng.chance(40) {
            let modseq = self.rng.range(1, info.highestmodseq.max(1) as usize);
            if self.rng.chance(50) {
                format!(" (QRESYNC ({} {modseq}))", info.uidvalidity)
            } else {
                format!(" (QRESYNC ({} {modseq} 1:{}))", info.uidvalidity, info.uidnext.max(2) - 1)
            }
        } else if self.rng.chance(10) {
            " (CONDSTORE)".to_string()
        } else {
            String::new()
        };
        Cmd::new(self.tag("a"), format!("{verb} {folder}{modifier}"))
    }

    fn simple(&mut self) -> Cmd {
        let text = *self.rng.pick(&["NOOP", "NOOP", "CHECK"]);
        Cmd::new(self.tag("a"), text)
    }

    fn status(&mut self) -> Cmd {
        let folder = self.folder();
        let items = if self.rng.chance(50) || !self.features.allows("condstore") {
            "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN)"
        } else {
            "(MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN HIGHESTMODSEQ)"
        };
        Cmd::new(self.tag("a"), format!("STATUS {folder} {items}"))
    }

    fn search(&mut self) -> Cmd {
        let text = match self.rng.range(0, 5) {
            0 => "SEARCH ALL".to_string(),
            1 => "UID SEARCH ALL".to_string(),
            2 => "SEARCH UNSEEN".to_string(),
            3 => "UID SEARCH FLAGGED".to_string(),
            4 => format!("SEARCH {}", self.set(false)),
            _ => format!("UID SEARCH UID {}", self.set(true)),
        };
        Cmd::new(self.tag("a"), text)
    }

    fn store(&mut self) -> Cmd {
        let uid = self.rng.chance(50);
        let set = self.set(uid);
        let op = *self.rng.pick(&["+FLAGS", "-FLAGS", "+FLAGS.SILENT", "-FLAGS.SILENT", "FLAGS"]);
        let flags = *self.rng.pick(FLAGS);
        let unchanged = if self.model.condstore && self.rng.chance(15) && self.features.allows("condstore") {
            format!(" (UNCHANGEDSINCE {})", self.rng.range(1, self.model.selected_modseq() as usize))
        } else {
            String::new()
        };
        let text = format!("{}STORE {set}{unchanged} {op} ({flags})", if uid { "UID " } else { "" });
        Cmd::new(self.tag("a"), text)
    }

    fn append(&mut self, folder: &str, prefix: &str) -> Cmd {
        self.mails += 1;
        let index = self.mails;
        let flags = *self.rng.pick(&["", "\\Seen", "\\Flagged", "\\Seen \\Answered", "$Fuzz"]);
        let date = imap_date(1_650_000_000 + index as u64 * 7_919);
        let max_big = if self.rng.chance(5) { 120_000 } else { 0 };
        Cmd {
            tag: self.tag(prefix),
            text: format!("APPEND {folder} ({flags}) \"{date}\""),
            literal: Some(Mail { seed: self.mail_seed, index, max_big }),
        }
    }

    /// A mutation straight to the server on both accounts of the pair.
    fn mutate(&mut self, ex: &mut Executor, log: &mut Vec<Action>) -> Result<(), Mismatch> {
        let mut folder = self.folder();
        if self.model.info(&folder).exists > MAX_FOLDER {
            return self.trim(ex, log, &folder);
        }
        let mut kind = self.rng.range(0, 99);
        let exists = self.model.info(&folder).exists;
        if exists > 70 && kind < 28 {
            kind = 30;
        } else if exists < 4 && (30..60).contains(&kind) {
            kind = 0;
        }
        match kind {
            0..=27 => {
                let n = self.rng.range(1, 3);
                let cmds = (0..n).map(|_| self.append(&folder, "m")).collect();
                self.act(ex, log, Action::Mutate(cmds))?;
            }
            28..=87 => {
                self.mutator_select(ex, log, &folder, true)?;
                let uids = self.model.info(&folder).uids.clone();
                if uids.is_empty() {
                    return Ok(());
                }
                let set = self.uid_subset(&uids);
                let cmds = match kind {
                    28..=53 => {
                        let op = *self.rng.pick(&["+FLAGS", "-FLAGS", "FLAGS", "-FLAGS", "+FLAGS.SILENT"]);
                        let flags = *self.rng.pick(FLAGS);
                        vec![Cmd::new(self.tag("m"), format!("UID STORE {set} {op} ({flags})"))]
                    }
                    54..=67 => vec![
                        Cmd::new(self.tag("m"), format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)")),
                        Cmd::new(self.tag("m"), format!("UID EXPUNGE {set}")),
                    ],
                    68..=75 => {
                        let verb = if self.rng.chance(50) && self.features.allows("move") { "MOVE" } else { "COPY" };
                        let folders = self.features.folders;
                        let dest = folders.iter().find(|f| **f != folder).copied().unwrap_or("INBOX");
                        let dest = if self.rng.chance(50) { dest } else { folders[2] };
                        vec![Cmd::new(self.tag("m"), format!("UID {verb} {set} {dest}"))]
                    }
                    _ => vec![Cmd::new(self.tag("m"), "UID FETCH 1:* (FLAGS)")],
                };
                self.act(ex, log, Action::Mutate(cmds))?;
            }
            88..=95 if self.features.allows("recreate") => {
                // Delete and create again, with new messages at the same UIDs.
                if folder == "INBOX" {
                    folder = self.features.folders[1].to_string();
                }
                if self.model.selected.as_deref() == Some(folder.as_str()) {
                    return Ok(());
                }
                let mut cmds = Vec::new();
                if self.model.mut_selected.as_deref() == Some(folder.as_str()) {
                    cmds.push(Cmd::new(self.tag("m"), "UNSELECT"));
                }
                cmds.push(Cmd::new(self.tag("m"), format!("DELETE {folder}")));
                cmds.push(Cmd::new(self.tag("m"), format!("CREATE {folder}")));
                for _ in 0..self.rng.range(1, 6) {
                    let append = self.append(&folder, "m");
                    cmds.push(append);
                }
                self.act(ex, log, Action::Mutate(cmds))?;
                self.track_modseqs(ex, log, std::slice::from_ref(&folder))?;
            }
            96.. if self.features.allows("rebuild") => {
                // Rebuilt on disk with the same UIDVALIDITY and new content.
                if folder == "INBOX" {
                    folder = self.features.folders[2].to_string();
                }
                // A restore from an older copy: the UIDs start again and stop below the
                // UIDNEXT handed out before. That is the rebuild a gateway can notice without
                // asking the upstream for every item (UIDNEXT went down under one UIDVALIDITY);
                // one that hands out the same UIDs again with other content of the same sizes
                // is out of any proxy's reach (docs/ARCHITECTURE.md, invariant 10).
                let status = Cmd::new(self.tag("m"), format!("STATUS {folder} (UIDVALIDITY UIDNEXT)"));
                self.act(ex, log, Action::Mutate(vec![status]))?;
                let (uidvalidity, uidnext) = {
                    let info = self.model.info(&folder);
                    (info.uidvalidity, info.uidnext)
                };
                if uidvalidity == 0 {
                    return Ok(());
                }
                let seed = self.rng.next_u64() % 1_000_000;
                let fits =
                    |count: usize| super::server::rebuilt_folder(&folder, uidvalidity, seed, count).uidnext < uidnext;
                let most = self.rng.range(1, 9);
                let Some(count) = (1..=most).rev().find(|&count| fits(count)) else { return Ok(()) };
                self.act(ex, log, Action::Rebuild { folder: folder.clone(), uidvalidity, seed, count })?;
                self.track_modseqs(ex, log, std::slice::from_ref(&folder))?;
                // The client looks at the restored folder before new mail arrives in it (new
                // mail would hand the old UIDs out again and hide the lower UIDNEXT).
                let examine = Cmd::new(self.tag("a"), format!("EXAMINE {folder}"));
                self.act(ex, log, Action::Imap(vec![examine]))?;
                let sync = Cmd::new(self.tag("a"), "FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])");
                self.act(ex, log, Action::Imap(vec![sync]))?;
            }
            _ => self.flag_check(ex, log, &folder)?,
        }
        Ok(())
    }

    /// Expunges the oldest messages of a folder grown past [`MAX_FOLDER`] (straight at the
    /// server, on both accounts), so that long runs keep their pace.
    fn trim(&mut self, ex: &mut Executor, log: &mut Vec<Action>, folder: &str) -> Result<(), Mismatch> {
        self.mutator_select(ex, log, folder, true)?;
        let uids = self.model.info(folder).uids.clone();
        if uids.len() <= MAX_FOLDER as usize / 2 {
            return Ok(());
        }
        let last = uids[uids.len() - MAX_FOLDER as usize / 2];
        let cmds = vec![
            Cmd::new(self.tag("m"), format!("UID STORE 1:{last} +FLAGS.SILENT (\\Deleted)")),
            Cmd::new(self.tag("m"), format!("UID EXPUNGE 1:{last}")),
        ];
        self.act(ex, log, Action::Mutate(cmds))?;
        Ok(())
    }

    /// Selects `folder` in the mutator's sessions (if not already) and, with `search`,
    /// learns its UIDs.
    fn mutator_select(
        &mut self,
        ex: &mut Executor,
        log: &mut Vec<Action>,
        folder: &str,
        search: bool,
    ) -> Result<(), Mismatch> {
        let mut cmds = Vec::new();
        if self.model.mut_selected.as_deref() != Some(folder) {
            cmds.push(Cmd::new(self.tag("m"), format!("SELECT {folder}")));
        }
        if search {
            cmds.push(Cmd::new(self.tag("m"), "UID SEARCH ALL"));
        }
        if !cmds.is_empty() {
            self.act(ex, log, Action::Mutate(cmds))?;
        }
        Ok(())
    }

    /// The flags of every message of `folder`, compared between the twins.
    fn flag_check(&mut self, ex: &mut Executor, log: &mut Vec<Action>, folder: &str) -> Result<(), Mismatch> {
        self.mutator_select(ex, log, folder, false)?;
        let cmd = Cmd::new(self.tag("m"), "UID FETCH 1:* (FLAGS)");
        self.act(ex, log, Action::Mutate(vec![cmd]))?;
        Ok(())
    }

    fn uid_subset(&mut self, uids: &[u32]) -> String {
        let pick = |rng: &mut Rng| uids[rng.range(0, uids.len() - 1)];
        match self.rng.range(0, 9) {
            0..=5 => pick(&mut self.rng).to_string(),
            6 | 7 => {
                let (a, b) = (pick(&mut self.rng), pick(&mut self.rng));
                format!("{}:{}", a.min(b), a.max(b).min(a.min(b) + 6))
            }
            _ => {
                let n = self.rng.range(2, 3);
                let picked: Vec<String> = (0..n).map(|_| pick(&mut self.rng).to_string()).collect();
                picked.join(",")
            }
        }
    }
}

/// Keeps what Dovecot answers the same however it schedules pipelined commands: it runs
/// the commands between two mailbox changes (SELECT, EXAMINE, CLOSE...) in parallel, so
/// such a group holds either read-only commands or a single one (a STORE next to a FETCH
/// of FLAGS would race).
fn deterministic(cmds: Vec<Cmd>) -> Vec<Cmd> {
    let (mut readers, mut changer) = (0, false);
    let mut out = Vec::new();
    for cmd in cmds {
        if is_barrier(&cmd) {
            (readers, changer) = (0, false);
        } else if read_only(&cmd) {
            if changer {
                continue;
            }
            readers += 1;
        } else {
            if changer || readers > 0 {
                continue;
            }
            changer = true;
        }
        out.push(cmd);
    }
    out
}

/// Changes nothing: a FETCH without items that set \Seen, SEARCH, STATUS, NOOP, CHECK.
fn read_only(cmd: &Cmd) -> bool {
    match cmd.verb().as_str() {
        "FETCH" | "UID FETCH" => {
            let text = cmd.text.to_ascii_uppercase();
            let words = text.split([' ', '(', ')']);
            !text.contains("BODY[")
                && !text.contains("BINARY[")
                && !words.into_iter().any(|w| w == "RFC822" || w == "RFC822.TEXT")
        }
        "SEARCH" | "UID SEARCH" | "STATUS" | "NOOP" | "CHECK" => true,
        _ => false,
    }
}

/// True if FETCH items `text` include one that sets \Seen (RFC 9051 6.4.5).
fn sets_seen(text: &str) -> bool {
    let text = text.to_ascii_uppercase();
    let mut words = text.split([' ', '(', ')']);
    text.contains("BODY[") || text.contains("BINARY[") || words.any(|w| w == "RFC822" || w == "RFC822.TEXT")
}

impl Model {
    /// HIGHESTMODSEQ last seen for the selected mailbox (at least 1).
    fn selected_modseq(&mut self) -> u64 {
        match self.selected.clone() {
            Some(s) => self.info(&s).highestmodseq.max(1),
            None => 1,
        }
    }
}

/// `14-Sep-2020 08:00:00 +0000` for a Unix time.
pub fn imap_date(unix: u64) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil from days (Howard Hinnant).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{day:02}-{}-{year} {:02}:{:02}:{:02} +0000",
        MONTHS[(month - 1) as usize],
        secs / 3_600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn imap_dates() {
        assert_eq!(super::imap_date(1_600_000_000), "13-Sep-2020 12:26:40 +0000");
    }
}
