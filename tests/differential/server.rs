//! The seam between the differential tester and a real mail server: where its IMAP and
//! POP3 listeners are, where mailgate should point, and how accounts get their initial
//! folders. [`DovecotServer`] implements it with the harness's throwaway Dovecot; another
//! server (Courier) needs its own [`Server`] and a case in [`start`].
//!
//! The initial folders are written so that both accounts of a twin pair are identical down
//! to UIDVALIDITY, UIDs (with gaps), flags and INTERNALDATE: every answer the twin gets must
//! then be the answer mailgate gives.

use std::fs;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use crate::support::dovecot::Dovecot;
use crate::support::mailgen::{self, Rng};

use super::wire::Endpoint;

/// Every account's password (an atom: LOGIN and USER/PASS send it as is).
pub const PASSWORD: &str = "fuzz-pw-1";
/// UIDVALIDITY of the initial folders: far in the future, so that a server handing out
/// `max(last + 1, now)` for new folders gives both twins the same values.
pub const UIDVALIDITY_BASE: u32 = 4_000_000_000;
/// Mailbox names; `.` is Dovecot's Maildir++ hierarchy separator.
pub const FOLDERS: [&str; 3] = ["INBOX", "Sent", "Archive.2024"];

/// Where mailgate's `[upstream.default]` points.
pub struct GatewayUpstream {
    pub imap: String,
    pub pop3: String,
    /// `implicit`, `starttls` or `plaintext`.
    pub tls: &'static str,
    pub ca: Option<std::path::PathBuf>,
}

#[derive(Clone, Debug)]
pub struct Message {
    pub uid: u32,
    pub seed: u64,
    pub index: usize,
    pub max_big: usize,
    /// Maildir flag letters (`DFRST`).
    pub flags: String,
    /// INTERNALDATE, Unix seconds.
    pub date: u64,
}

#[derive(Clone, Debug)]
pub struct Folder {
    pub name: String,
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub messages: Vec<Message>,
}

pub trait Server: Send + Sync {
    /// IMAP straight to the server (the twins and the mutator).
    fn imap(&self) -> Endpoint;
    /// POP3 straight to the server.
    fn pop3(&self) -> Endpoint;
    fn gateway_upstream(&self) -> GatewayUpstream;
    /// Gives `user`, who has had no session yet, exactly these folders.
    fn provision(&self, user: &str, folders: &[Folder]);
    /// Replaces `folder` of `user` (no session open) by the given one, UIDVALIDITY
    /// included; false if this server cannot.
    fn rebuild(&self, user: &str, folder: &Folder) -> bool;
}

/// Starts the server named by `MAILGATE_FUZZ_SERVER` (default `dovecot`) with these
/// accounts, all with [`PASSWORD`].
pub fn start(users: &[String]) -> Box<dyn Server> {
    let name = std::env::var("MAILGATE_FUZZ_SERVER").unwrap_or_else(|_| "dovecot".to_string());
    match name.as_str() {
        "dovecot" => Box::new(DovecotServer::start(users)),
        other => panic!("MAILGATE_FUZZ_SERVER={other}: only `dovecot` is wired up"),
    }
}

/// The initial folders of a logical user whose content comes from `content_seed`.
pub fn initial_folders(content_seed: u64) -> Vec<Folder> {
    let mut rng = Rng::new(content_seed ^ 0xF0_1DE5);
    FOLDERS
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let count = [36, 14, 9][i];
            let max_big = if i == 0 { 160_000 } else { 0 };
            folder(
                name,
                UIDVALIDITY_BASE + i as u32,
                content_seed.wrapping_add(i as u64 * 1_000_003),
                count,
                max_big,
                &mut rng,
            )
        })
        .collect()
}

/// A folder of `count` messages of batch `seed`, with UID gaps and assorted flags.
pub fn folder(name: &str, uidvalidity: u32, seed: u64, count: usize, max_big: usize, rng: &mut Rng) -> Folder {
    let mut uid = 0;
    let messages = (0..count)
        .map(|index| {
            uid += if rng.chance(15) { rng.range(2, 6) as u32 } else { 1 };
            let flags = match rng.range(0, 9) {
                0..=3 => "",
                4..=6 => "S",
                7 => "FS",
                8 => "RS",
                _ => "F",
            };
            Message {
                uid,
                seed,
                index,
                max_big,
                flags: flags.to_string(),
                date: 1_600_000_000 + index as u64 * 3_600 + rng.range(0, 3_599) as u64,
            }
        })
        .collect();
    Folder { name: name.to_string(), uidvalidity, uidnext: uid + 1 + rng.range(0, 2) as u32, messages }
}

/// A folder built from a rebuild action's parameters.
pub fn rebuilt_folder(name: &str, uidvalidity: u32, seed: u64, count: usize) -> Folder {
    folder(name, uidvalidity, seed, count, 0, &mut Rng::new(seed))
}

pub struct DovecotServer {
    dovecot: Dovecot,
}

impl DovecotServer {
    pub fn start(users: &[String]) -> DovecotServer {
        let accounts: Vec<(&str, &str)> = users.iter().map(|u| (u.as_str(), PASSWORD)).collect();
        DovecotServer { dovecot: Dovecot::start(&accounts) }
    }

    fn folder_dir(&self, user: &str, name: &str) -> std::path::PathBuf {
        let root = self.dovecot.maildir(user);
        if name == "INBOX" {
            root
        } else {
            root.join(format!(".{name}"))
        }
    }

    /// Writes the folder's messages and a `dovecot-uidlist` naming their UIDs, then hands
    /// the whole tree to the mail user.
    fn write_folder(&self, user: &str, folder: &Folder) {
        let dir = self.folder_dir(user, &folder.name);
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        if folder.name != "INBOX" {
            fs::write(dir.join("maildirfolder"), b"").unwrap();
        }
        let mut uidlist = format!("3 V{} N{}\n", folder.uidvalidity, folder.uidnext);
        for m in &folder.messages {
            let body = mailgen::message(m.seed, m.index, m.max_big);
            let base = format!(
                "{}.M{}P{}Q{}.fuzz,S={len},W={len}",
                m.date,
                m.uid,
                m.index,
                m.seed % 100_000,
                len = body.len()
            );
            let path = dir.join("cur").join(format!("{base}:2,{}", m.flags));
            write_with_mtime(&path, &body, m.date);
            uidlist.push_str(&format!("{} :{base}\n", m.uid));
        }
        fs::write(dir.join("dovecot-uidlist"), uidlist).unwrap();
    }

    /// The per-user counter Dovecot takes new UIDVALIDITY values from.
    fn seed_uidvalidity_counter(&self, user: &str) {
        let root = self.dovecot.maildir(user);
        let value = UIDVALIDITY_BASE + 100;
        fs::write(root.join("dovecot-uidvalidity"), format!("{value:08x}")).unwrap();
        fs::write(root.join(format!("dovecot-uidvalidity.{value:08x}")), b"").unwrap();
    }

    fn chown(&self, user: &str) {
        // `fill` with no messages only hands the user's Maildir tree to the mail user.
        self.dovecot.fill(user, 0, 0);
    }
}

fn write_with_mtime(path: &Path, body: &[u8], date: u64) {
    let file = fs::File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    use std::io::Write;
    (&file).write_all(body).unwrap();
    file.set_modified(UNIX_EPOCH + Duration::from_secs(date)).unwrap();
}

impl Server for DovecotServer {
    fn imap(&self) -> Endpoint {
        Endpoint { addr: self.dovecot.imap, tls: None }
    }

    fn pop3(&self) -> Endpoint {
        Endpoint { addr: self.dovecot.pop3, tls: None }
    }

    fn gateway_upstream(&self) -> GatewayUpstream {
        GatewayUpstream {
            imap: format!("127.0.0.1:{}", self.dovecot.imaps.port()),
            pop3: format!("127.0.0.1:{}", self.dovecot.pop3s.port()),
            tls: "implicit",
            ca: Some(self.dovecot.ca_pem()),
        }
    }

    fn provision(&self, user: &str, folders: &[Folder]) {
        for folder in folders {
            self.write_folder(user, folder);
        }
        self.seed_uidvalidity_counter(user);
        self.chown(user);
    }

    fn rebuild(&self, user: &str, folder: &Folder) -> bool {
        if folder.name == "INBOX" {
            return false;
        }
        let dir = self.folder_dir(user, &folder.name);
        let _ = fs::remove_dir_all(&dir);
        self.write_folder(user, folder);
        self.chown(user);
        true
    }
}
