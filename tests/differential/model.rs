//! What the generator knows of one logical user's state, learned from the twin's answers:
//! rough enough to aim commands at interesting places (existing and missing messages, the
//! right UIDVALIDITY and MODSEQ), never relied on for correctness.

use std::collections::BTreeMap;

use super::action::{Action, Cmd};
use super::answer::{parse_fetch, Answer};
use super::exec::Outcome;
use super::server::Folder;

#[derive(Clone, Debug, Default)]
pub struct FolderInfo {
    pub uidvalidity: u32,
    pub highestmodseq: u64,
    pub uidnext: u32,
    pub exists: u32,
    /// UIDs from the mutator's last `UID SEARCH ALL`.
    pub uids: Vec<u32>,
}

#[derive(Debug, Default)]
pub struct Model {
    pub connected: bool,
    pub selected: Option<String>,
    /// The session has opened a mailbox since it connected.
    pub opened: bool,
    pub read_only: bool,
    pub exists: u32,
    pub uidnext: u32,
    pub condstore: bool,
    pub qresync: bool,
    pub folders: BTreeMap<String, FolderInfo>,
    pub mut_selected: Option<String>,
}

impl Model {
    pub fn new(initial: &[Folder]) -> Model {
        let folders = initial
            .iter()
            .map(|f| {
                let info = FolderInfo {
                    uidvalidity: f.uidvalidity,
                    highestmodseq: 1,
                    uidnext: f.uidnext,
                    exists: f.messages.len() as u32,
                    uids: f.messages.iter().map(|m| m.uid).collect(),
                };
                (f.name.clone(), info)
            })
            .collect();
        Model { folders, ..Model::default() }
    }

    pub fn info(&mut self, folder: &str) -> &mut FolderInfo {
        self.folders.entry(canonical(folder)).or_default()
    }

    pub fn learn(&mut self, action: &Action, outcome: &Outcome) {
        match action {
            Action::Reconnect | Action::Rebuild { .. } => {
                self.connected = matches!(action, Action::Reconnect);
                self.selected = None;
                self.opened = false;
                self.condstore = false;
                self.qresync = false;
                if let Action::Rebuild { .. } = action {
                    self.mut_selected = None;
                }
            }
            Action::Imap(_) | Action::Idle { .. } => self.connected = true,
            _ => {}
        }
        for (cmd, answer) in &outcome.session {
            self.learn_session(cmd, answer);
        }
        for (cmd, answer) in &outcome.mutator {
            self.learn_mutator(cmd, answer);
        }
    }

    fn learn_session(&mut self, cmd: &Cmd, answer: &Answer) {
        let verb = cmd.verb();
        let upper = cmd.text.to_ascii_uppercase();
        if upper.contains("MODSEQ") || upper.contains("CHANGEDSINCE") || upper.contains("CONDSTORE") {
            self.condstore = true;
        }
        match verb.as_str() {
            "SELECT" | "EXAMINE" => {
                self.selected = answer.ok().then(|| canonical(cmd.arg().unwrap_or_default()));
                self.opened |= self.selected.is_some();
                self.read_only = verb == "EXAMINE";
                self.exists = 0;
                self.uidnext = 1;
            }
            "CLOSE" | "UNSELECT" if answer.ok() => self.selected = None,
            "LOGOUT" => {
                self.connected = false;
                self.selected = None;
            }
            _ => {}
        }
        if answer.error.is_some() {
            self.connected = false;
            self.selected = None;
        }
        for text in answer.untagged_text() {
            self.learn_untagged(&text);
        }
        for response in &answer.responses {
            if let Some((_, items)) = parse_fetch(response) {
                for item in items {
                    let item = String::from_utf8_lossy(&item).into_owned();
                    if let Some(uid) = item.strip_prefix("UID ").and_then(|u| u.parse::<u32>().ok()) {
                        self.uidnext = self.uidnext.max(uid + 1);
                    }
                    if let Some(m) = item.strip_prefix("MODSEQ (").and_then(|m| m.trim_end_matches(')').parse().ok()) {
                        if let Some(s) = self.selected.clone() {
                            let info = self.info(&s);
                            info.highestmodseq = info.highestmodseq.max(m);
                        }
                    }
                }
            }
        }
        for tagged in &answer.tagged {
            self.learn_untagged(&String::from_utf8_lossy(tagged));
        }
        if let Some(s) = self.selected.clone() {
            let (exists, uidnext) = (self.exists, self.uidnext);
            let info = self.info(&s);
            info.exists = exists;
            info.uidnext = info.uidnext.max(uidnext);
        }
    }

    fn learn_untagged(&mut self, text: &str) {
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            ["*", n, "EXISTS", ..] => self.exists = n.parse().unwrap_or(self.exists),
            ["*", _, "EXPUNGE", ..] => self.exists = self.exists.saturating_sub(1),
            ["*", "VANISHED", set] => self.exists = self.exists.saturating_sub(set_size(set)),
            ["*", "ENABLED", caps @ ..] => {
                for cap in caps {
                    match cap.to_ascii_uppercase().as_str() {
                        "QRESYNC" => {
                            self.qresync = true;
                            self.condstore = true;
                        }
                        "CONDSTORE" => self.condstore = true,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        let code = |name: &str| -> Option<u64> {
            let start = text.find(&format!("[{name} "))? + name.len() + 2;
            text[start..].split([']', ' ']).next()?.parse().ok()
        };
        if let Some(s) = self.selected.clone() {
            if let Some(uv) = code("UIDVALIDITY") {
                self.info(&s).uidvalidity = uv as u32;
            }
            if let Some(m) = code("HIGHESTMODSEQ") {
                self.info(&s).highestmodseq = m;
            }
        }
        if let Some(n) = code("UIDNEXT") {
            self.uidnext = n as u32;
        }
        if let Some(rest) = text.strip_prefix("* STATUS ") {
            let mut words = rest.split([' ', '(', ')']).filter(|w| !w.is_empty());
            if let Some(folder) = words.next() {
                let folder = canonical(folder);
                let words: Vec<&str> = words.collect();
                for pair in words.chunks(2) {
                    if let [key, value] = pair {
                        match key.to_ascii_uppercase().as_str() {
                            "UIDVALIDITY" => self.info(&folder).uidvalidity = value.parse().unwrap_or(0),
                            "HIGHESTMODSEQ" => self.info(&folder).highestmodseq = value.parse().unwrap_or(1),
                            "UIDNEXT" => self.info(&folder).uidnext = value.parse().unwrap_or(1),
                            "MESSAGES" => self.info(&folder).exists = value.parse().unwrap_or(0),
                            _ => {}
                        }
                    }
                }
            }
        }
    }

    fn learn_mutator(&mut self, cmd: &Cmd, answer: &Answer) {
        match cmd.verb().as_str() {
            "SELECT" | "EXAMINE" => self.mut_selected = answer.ok().then(|| canonical(cmd.arg().unwrap_or_default())),
            "UNSELECT" | "CLOSE" => self.mut_selected = None,
            "DELETE" if answer.ok() => {
                let folder = canonical(cmd.arg().unwrap_or_default());
                if self.mut_selected.as_deref() == Some(folder.as_str()) {
                    self.mut_selected = None;
                }
                *self.info(&folder) = FolderInfo::default();
            }
            "UID SEARCH" => {
                if let Some(folder) = self.mut_selected.clone() {
                    let uids: Vec<u32> = answer
                        .untagged_text()
                        .filter_map(|t| t.strip_prefix("* SEARCH").map(str::to_string))
                        .flat_map(|t| t.split_whitespace().filter_map(|w| w.parse().ok()).collect::<Vec<u32>>())
                        .collect();
                    let info = self.info(&folder);
                    info.exists = uids.len() as u32;
                    info.uids = uids;
                }
            }
            _ => {}
        }
        for text in answer.untagged_text() {
            if let Some(rest) = text.strip_prefix("* STATUS ") {
                let mut words = rest.split([' ', '(', ')']).filter(|w| !w.is_empty());
                let Some(folder) = words.next() else { continue };
                let words: Vec<&str> = words.collect();
                for pair in words.chunks(2) {
                    match pair {
                        ["UIDVALIDITY", uv] => self.info(folder).uidvalidity = uv.parse().unwrap_or(0),
                        ["UIDNEXT", next] => self.info(folder).uidnext = next.parse().unwrap_or(0),
                        _ => {}
                    }
                }
            }
        }
    }
}

/// INBOX in any case is INBOX.
pub fn canonical(folder: &str) -> String {
    let folder = folder.trim_matches('"');
    if folder.eq_ignore_ascii_case("INBOX") {
        "INBOX".to_string()
    } else {
        folder.to_string()
    }
}

/// How many numbers `1:3,7` covers (`*` counts as one).
fn set_size(set: &str) -> u32 {
    set.split(',')
        .map(|r| match r.split_once(':') {
            Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
                (Ok(a), Ok(b)) => a.abs_diff(b) + 1,
                _ => 1,
            },
            None => 1,
        })
        .sum()
}
