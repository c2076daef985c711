//! Runs actions for one logical user: its IMAP session through mailgate (`via`) in lockstep
//! with the twin account's session straight to the server, a mutator session on each of
//! the two accounts, and POP3 sessions; every answer compared.

use std::thread::sleep;
use std::time::Duration;

use super::action::{batch_bytes, Action, Cmd};
use super::answer::{self, describe, diff, normalize, show_answer, Answer};
use super::env::Env;
use super::pop3;
use super::server::{rebuilt_folder, PASSWORD};
use super::wire::{show, show_cut, Endpoint, Wire};

/// The first difference found, ready to print.
#[derive(Debug, Clone)]
pub struct Mismatch {
    /// Which command, on which sessions.
    pub what: String,
    pub detail: String,
    /// Both answers whole (for a file next to the trace; `detail` cuts long values).
    pub raw: Option<String>,
}

impl Mismatch {
    pub fn new(what: impl Into<String>, detail: impl Into<String>) -> Mismatch {
        Mismatch { what: what.into(), detail: detail.into(), raw: None }
    }
}

/// The twin's answers (what the generator learns the state from).
#[derive(Default)]
pub struct Outcome {
    /// Commands of the via/twin IMAP sessions (settling NOOPs included).
    pub session: Vec<(Cmd, Answer)>,
    /// Commands of the mutator, with the twin account's answers.
    pub mutator: Vec<(Cmd, Answer)>,
    /// The action was skipped as unsafe in the current state.
    pub skipped: bool,
}

/// Verbs that change a mailbox (a mutation after which the sessions must settle).
const CHANGING: &[&str] = &[
    "APPEND",
    "STORE",
    "UID STORE",
    "EXPUNGE",
    "UID EXPUNGE",
    "MOVE",
    "UID MOVE",
    "COPY",
    "UID COPY",
    "DELETE",
    "CREATE",
    "RENAME",
];

pub struct Executor<'e> {
    env: &'e Env,
    /// The account reached through mailgate, and its twin.
    pub user: String,
    pub twin: String,
    /// What they log in with (the server's names for them).
    login_user: String,
    login_twin: String,
    /// The server takes `{n+}` literals (else APPEND waits for the `+`).
    literal_plus: bool,
    via: Option<Wire>,
    direct: Option<Wire>,
    mut_user: Option<Wire>,
    mut_twin: Option<Wire>,
    /// The mailbox the via/twin sessions have selected (from the twin's answers).
    selected: Option<String>,
    settles: u64,
}

impl<'e> Executor<'e> {
    pub fn new(env: &'e Env, user: &str) -> Executor<'e> {
        let twin = format!("{user}-twin");
        Executor {
            env,
            login_user: env.server.login(user),
            login_twin: env.server.login(&twin),
            literal_plus: env.server.kind().literal_plus(),
            user: user.to_string(),
            twin,
            via: None,
            direct: None,
            mut_user: None,
            mut_twin: None,
            selected: None,
            settles: 0,
        }
    }

    pub fn run(&mut self, action: &Action) -> Result<Outcome, Mismatch> {
        let mut out = Outcome::default();
        match action {
            Action::Imap(cmds) => self.imap(cmds, &mut out)?,
            Action::Idle { tag, millis } => self.idle(tag, *millis, &mut out)?,
            Action::Reconnect => {
                self.logout_pair()?;
                self.ensure_pair()?;
            }
            Action::Mutate(cmds) => self.mutate(cmds, &mut out)?,
            Action::Rebuild { folder, uidvalidity, seed, count } => {
                // A restore from an older copy takes UIDNEXT down; one that does not (a server
                // handing out the same UIDs again) is out of any proxy's reach. Checked here,
                // not only when generated, so that a minimised trace keeps what made it one.
                let rebuilt = rebuilt_folder(folder, *uidvalidity, *seed, *count);
                if self.uid_next(folder)?.is_none_or(|now| rebuilt.uidnext >= now) {
                    out.skipped = true;
                    return Ok(out);
                }
                self.logout_pair()?;
                for wire in [self.mut_user.take(), self.mut_twin.take()].into_iter().flatten() {
                    logout(wire);
                }
                // Let the server finish the sessions (mailgate closes its upstream after
                // relaying the BYE).
                sleep(Duration::from_millis(300));
                let server = &self.env.server;
                out.skipped = !(server.rebuild(&self.user, &rebuilt) && server.rebuild(&self.twin, &rebuilt));
            }
            Action::Pop3 { writes, quit } => {
                self.pop3(writes, *quit)?;
                self.settle(&mut out)?;
            }
        }
        Ok(out)
    }

    fn ensure_pair(&mut self) -> Result<(), Mismatch> {
        if self.via.is_some() && self.direct.is_some() {
            return Ok(());
        }
        self.via = None;
        self.direct = None;
        self.selected = None;
        let via = imap_login(&self.env.via_imap(), &self.login_user)
            .map_err(|e| Mismatch::new(format!("IMAP login of {} through the gateway", self.user), e))?;
        let direct = imap_login(&self.env.server.imap(), &self.login_twin)
            .map_err(|e| Mismatch::new(format!("IMAP login of {} (harness)", self.twin), e))?;
        self.via = Some(via);
        self.direct = Some(direct);
        Ok(())
    }

    fn logout_pair(&mut self) -> Result<(), Mismatch> {
        if self.via.is_none() || self.direct.is_none() {
            self.via = None;
            self.direct = None;
            return Ok(());
        }
        let cmd = Cmd::new("z", "LOGOUT");
        let mut out = Outcome::default();
        self.imap(std::slice::from_ref(&cmd), &mut out)?;
        Ok(())
    }

    fn pair(&mut self) -> (&mut Wire, &mut Wire) {
        (self.via.as_mut().unwrap(), self.direct.as_mut().unwrap())
    }

    fn imap(&mut self, cmds: &[Cmd], out: &mut Outcome) -> Result<(), Mismatch> {
        self.ensure_pair()?;
        let literal_plus = self.literal_plus;
        let (via, direct) = self.pair();
        let sent = (send_batch(via, cmds, literal_plus), send_batch(direct, cmds, literal_plus));
        let mut closed = false;
        for range in segments(cmds) {
            let group = &cmds[range];
            let tags: Vec<&str> = group.iter().map(|c| c.tag.as_str()).collect();
            let (via, direct) = self.pair();
            let v = read_or(via, &sent.0, &tags, false);
            let t = read_or(direct, &sent.1, &tags, false);
            let what = match group {
                [one] => format!("`{} {}`", one.tag, one.text),
                _ => format!(
                    "`{} {}` .. `{} {}` (pipelined commands that run together)",
                    group[0].tag,
                    group[0].text,
                    group[group.len() - 1].tag,
                    group[group.len() - 1].text
                ),
            };
            let what = format!("{what} (IMAP, {} via the gateway vs {})", self.user, self.twin);
            compare(&what, cmds, &v, &t, group.len() == 1)?;
            closed |= v.error.is_some() || t.error.is_some();
            for (i, cmd) in group.iter().enumerate() {
                let answer = if i == 0 {
                    t.clone()
                } else {
                    let prefix = format!("{} ", cmd.tag);
                    let tagged = t.tagged.iter().filter(|l| l.starts_with(prefix.as_bytes())).cloned().collect();
                    Answer { tagged, ..Answer::default() }
                };
                self.track(cmd, &answer);
                out.session.push((cmd.clone(), answer));
            }
        }
        if closed || cmds.iter().any(|c| c.verb() == "LOGOUT") {
            for wire in [self.via.take(), self.direct.take()].into_iter().flatten() {
                drain(wire);
            }
            self.selected = None;
        }
        Ok(())
    }

    fn track(&mut self, cmd: &Cmd, twin: &Answer) {
        match cmd.verb().as_str() {
            "SELECT" | "EXAMINE" => self.selected = twin.ok().then(|| cmd.arg().unwrap_or_default().to_string()),
            "CLOSE" | "UNSELECT" if twin.ok() => self.selected = None,
            _ => {}
        }
    }

    fn idle(&mut self, tag: &str, millis: u64, out: &mut Outcome) -> Result<(), Mismatch> {
        self.ensure_pair()?;
        let what = format!("`{tag} IDLE` ... `DONE` ({} via the gateway vs {})", self.user, self.twin);
        let cmd = Cmd::new(tag, "IDLE");
        let line = format!("{tag} IDLE\r\n");
        let (via, direct) = self.pair();
        let sent = (
            via.send(line.as_bytes()).map_err(|e| describe(&e)),
            direct.send(line.as_bytes()).map_err(|e| describe(&e)),
        );
        let v = read_or(via, &sent.0, &[tag], true);
        let t = read_or(direct, &sent.1, &[tag], true);
        compare(&what, std::slice::from_ref(&cmd), &v, &t, true)?;
        if !t.tagged.is_empty() || t.error.is_some() {
            out.session.push((cmd, t));
            return Ok(());
        }
        sleep(Duration::from_millis(millis));
        let sent =
            (via.send(b"DONE\r\n").map_err(|e| describe(&e)), direct.send(b"DONE\r\n").map_err(|e| describe(&e)));
        let v = read_or(via, &sent.0, &[tag], false);
        let t = read_or(direct, &sent.1, &[tag], false);
        compare(&what, std::slice::from_ref(&cmd), &v, &t, true)?;
        out.session.push((cmd, t));
        Ok(())
    }

    /// NOOP on both sessions, so that what a mutation changed is reported to both now
    /// (and not at different later commands).
    fn settle(&mut self, out: &mut Outcome) -> Result<(), Mismatch> {
        if self.via.is_none() || self.direct.is_none() {
            return Ok(());
        }
        self.settles += 1;
        let cmd = Cmd::new(format!("s{}", self.settles), "NOOP");
        self.imap(std::slice::from_ref(&cmd), out)
    }

    /// The folder's UIDNEXT on the account under test, asked straight at the server.
    fn uid_next(&mut self, folder: &str) -> Result<Option<u32>, Mismatch> {
        let status = Cmd::new("r", format!("STATUS {folder} (UIDNEXT)"));
        let mut out = Outcome::default();
        self.mutate(std::slice::from_ref(&status), &mut out)?;
        let next = out.mutator.iter().flat_map(|(_, a)| a.untagged_text()).find_map(|text| {
            let rest = text.trim_end().strip_suffix(')')?.rsplit_once("UIDNEXT ")?.1.to_string();
            rest.parse().ok()
        });
        Ok(next)
    }

    fn mutate(&mut self, cmds: &[Cmd], out: &mut Outcome) -> Result<(), Mismatch> {
        // Deleting the mailbox the sessions have open is not a cache question, and its
        // timing is the server's; skipped (the generator avoids it too).
        if cmds.iter().any(|c| matches!(c.verb().as_str(), "DELETE" | "RENAME") && c.arg() == self.selected.as_deref())
        {
            out.skipped = true;
            return Ok(());
        }
        if self.mut_user.is_none() || self.mut_twin.is_none() {
            let server = self.env.server.imap();
            let harness = |user: &str, e: String| Mismatch::new(format!("mutator login of {user} (harness)"), e);
            self.mut_user = Some(imap_login(&server, &self.login_user).map_err(|e| harness(&self.user, e))?);
            self.mut_twin = Some(imap_login(&server, &self.login_twin).map_err(|e| harness(&self.twin, e))?);
        }
        // Synchronizing literals wait for the server's `+`: one command at a time.
        let one_by_one = !self.literal_plus && cmds.iter().any(|c| c.literal.is_some());
        let (mu, mt) = (self.mut_user.as_mut().unwrap(), self.mut_twin.as_mut().unwrap());
        let mut sent =
            if one_by_one { (Ok(()), Ok(())) } else { (send_batch(mu, cmds, true), send_batch(mt, cmds, true)) };
        for cmd in cmds {
            if one_by_one {
                let one = std::slice::from_ref(cmd);
                sent = (send_batch(mu, one, false), send_batch(mt, one, false));
            }
            let u = read_or(mu, &sent.0, &[&cmd.tag], false);
            let t = read_or(mt, &sent.1, &[&cmd.tag], false);
            let what = format!(
                "mutator `{} {}`: {} and {} straight to the server disagree (the twins diverged)",
                cmd.tag, cmd.text, self.user, self.twin
            );
            compare(&what, cmds, &u, &t, true)?;
            out.mutator.push((cmd.clone(), t));
        }
        if cmds.iter().any(|c| CHANGING.contains(&c.verb().as_str())) {
            self.settle(out)?;
        }
        Ok(())
    }

    fn pop3(&mut self, writes: &[Vec<String>], quit: bool) -> Result<(), Mismatch> {
        let who = format!("{} via the gateway vs {}", self.user, self.twin);
        let mut via = pop3::login(&self.env.via_pop3(), &self.login_user)
            .map_err(|e| Mismatch::new(format!("POP3 login of {} through the gateway", self.user), e))?;
        let mut direct = pop3::login(&self.env.server.pop3(), &self.login_twin)
            .map_err(|e| Mismatch::new(format!("POP3 login of {} (harness)", self.twin), e))?;
        let mut all: Vec<String> = writes.iter().flatten().cloned().collect();
        if quit {
            all.push("QUIT".to_string());
        }
        let mut writes: Vec<Vec<String>> = writes.to_vec();
        if quit {
            writes.push(vec!["QUIT".to_string()]);
        }
        for write in &writes {
            let bytes: Vec<u8> = write.iter().flat_map(|c| format!("{c}\r\n").into_bytes()).collect();
            let sent = (via.send(&bytes).map_err(|e| describe(&e)), direct.send(&bytes).map_err(|e| describe(&e)));
            for cmd in write {
                let v = sent.0.clone().and_then(|()| pop3::response(&mut via, cmd));
                let t = sent.1.clone().and_then(|()| pop3::response(&mut direct, cmd));
                if v != t {
                    let text = |r: &Result<Vec<u8>, String>| match r {
                        Ok(bytes) => show_cut(bytes, 600),
                        Err(e) => format!("({e})"),
                    };
                    let full = |r: &Result<Vec<u8>, String>| match r {
                        Ok(bytes) => show(bytes),
                        Err(e) => format!("({e})"),
                    };
                    let what = format!("POP3 `{}` ({who})", show(cmd.as_bytes()));
                    let raw = format!("{what}\n=== via ===\n{}\n=== twin ===\n{}\n", full(&v), full(&t));
                    return Err(Mismatch {
                        what,
                        detail: format!("  session commands: {:?}\n  via  {}\n  twin {}\n", all, text(&v), text(&t)),
                        raw: Some(raw),
                    });
                }
            }
        }
        if quit {
            // The maildrop is updated before +OK; wait for the close so that the next
            // session finds it unlocked.
            pop3::drain(via);
            pop3::drain(direct);
        } else {
            // Dropped: the server still commits \Seen, when it notices. Once a new session
            // gets the maildrop lock, it has.
            drop((via, direct));
            for user in [&self.login_user, &self.login_twin] {
                let mut probe = pop3::login(&self.env.server.pop3(), user)
                    .map_err(|e| Mismatch::new(format!("POP3 login of {user} after a dropped session (harness)"), e))?;
                let _ = probe.send(b"QUIT\r\n");
                pop3::drain(probe);
            }
        }
        Ok(())
    }
}

fn read_or(wire: &mut Wire, sent: &Result<(), String>, tags: &[&str], until_continuation: bool) -> Answer {
    match sent {
        Ok(()) => answer::read(wire, tags, until_continuation),
        Err(e) => Answer { error: Some(e.clone()), ..Answer::default() },
    }
}

/// Pipelined commands that Dovecot may run in parallel come back as one group: the
/// commands between two that change the selected mailbox (which run alone).
pub fn segments(cmds: &[Cmd]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, cmd) in cmds.iter().enumerate() {
        if is_barrier(cmd) {
            if start < i {
                out.push(start..i);
            }
            out.push(i..i + 1);
            start = i + 1;
        }
    }
    if start < cmds.len() {
        out.push(start..cmds.len());
    }
    out
}

pub fn is_barrier(cmd: &Cmd) -> bool {
    matches!(cmd.verb().as_str(), "SELECT" | "EXAMINE" | "CLOSE" | "UNSELECT" | "LOGOUT" | "ENABLE")
}

fn compare(what: &str, batch: &[Cmd], via: &Answer, twin: &Answer, ordered: bool) -> Result<(), Mismatch> {
    let d = match diff(&normalize(via, ordered), &normalize(twin, ordered)) {
        // The server never stalls: a twin waiting in vain means the tester misread.
        None if twin.error.as_deref() == Some("timed out") => "  (harness) the twin timed out too\n".to_string(),
        None => return Ok(()),
        Some(d) => d,
    };
    let mut detail = String::new();
    if batch.len() > 1 {
        detail.push_str(&format!("  sent in one write: {:?}\n", String::from_utf8_lossy(&batch_bytes(batch))));
    }
    detail.push_str(&d);
    detail.push_str(&format!("  raw via:\n{}  raw twin:\n{}", show_answer(via, 300), show_answer(twin, 300)));
    let raw = format!(
        "{what}\n=== via ===\n{}\n=== twin ===\n{}",
        show_answer(via, usize::MAX),
        show_answer(twin, usize::MAX)
    );
    Err(Mismatch { what: what.to_string(), detail, raw: Some(raw) })
}

/// Sends `cmds` in one write; or, without `literal_plus`, a command with a literal as
/// `{n}`, then the literal once the server has answered `+` (a command with a literal is
/// then sent alone).
fn send_batch(wire: &mut Wire, cmds: &[Cmd], literal_plus: bool) -> Result<(), String> {
    if literal_plus || cmds.iter().all(|c| c.literal.is_none()) {
        return wire.send(&batch_bytes(cmds)).map_err(|e| describe(&e));
    }
    assert!(cmds.len() == 1, "a literal without LITERAL+ in a batch: {cmds:?}");
    let cmd = &cmds[0];
    let body = cmd.literal.as_ref().unwrap().bytes();
    let head = format!("{} {} {{{}}}\r\n", cmd.tag, cmd.text, body.len());
    wire.send(head.as_bytes()).map_err(|e| describe(&e))?;
    let line = wire.line().map_err(|e| format!("waiting for `+`: {}", describe(&e)))?;
    if !line.starts_with(b"+") {
        return Err(format!("no `+` for the literal but {}", show(&line)));
    }
    let mut rest = body;
    rest.extend_from_slice(b"\r\n");
    wire.send(&rest).map_err(|e| describe(&e))
}

fn imap_login(endpoint: &Endpoint, user: &str) -> Result<Wire, String> {
    let mut wire = Wire::connect(endpoint).map_err(|e| format!("connecting to {endpoint:?}: {e}"))?;
    wire.send(format!("l LOGIN {user} {PASSWORD}\r\n").as_bytes()).map_err(|e| describe(&e))?;
    let answer = answer::read(&mut wire, &["l"], false);
    if answer.ok() {
        Ok(wire)
    } else {
        Err(format!("LOGIN refused:\n{}", show_answer(&answer, 300)))
    }
}

fn logout(mut wire: Wire) {
    if wire.send(b"z LOGOUT\r\n").is_ok() {
        let _ = answer::read(&mut wire, &["z"], false);
    }
    drain(wire);
}

/// Reads until the peer closes (bounded by the read timeout).
fn drain(mut wire: Wire) {
    while wire.line().is_ok() {}
}
