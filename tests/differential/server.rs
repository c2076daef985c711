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

use crate::support::courier::Courier;
use crate::support::dovecot::Dovecot;
use crate::support::mailgen::{self, Rng};

use super::wire::Endpoint;

/// Every account's password (an atom: LOGIN and USER/PASS send it as is).
pub const PASSWORD: &str = "fuzz-pw-1";
/// UIDVALIDITY of the initial folders: far in the future, so that a server handing out
/// `max(last + 1, now)` for new folders gives both twins the same values.
pub const UIDVALIDITY_BASE: u32 = 4_000_000_000;
/// Mailbox names on Dovecot; `.` is the Maildir++ hierarchy separator.
pub const FOLDERS: [&str; 3] = ["INBOX", "Sent", "Archive.2024"];
/// The same folders on Courier, whose folders all live below `INBOX.` (Maildir++ `.Sent`
/// is `INBOX.Sent`).
pub const COURIER_FOLDERS: [&str; 3] = ["INBOX", "INBOX.Sent", "INBOX.Archive.2024"];

/// Which server is the upstream (`MAILGATE_FUZZ_SERVER`), and what the generator must know
/// of it: its folder names and the constructs it does not support.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dovecot,
    Courier,
}

impl Kind {
    /// `MAILGATE_FUZZ_SERVER` (default `dovecot`).
    pub fn from_env() -> Kind {
        let name = std::env::var("MAILGATE_FUZZ_SERVER").unwrap_or_default();
        match name.trim() {
            "" | "dovecot" => Kind::Dovecot,
            "courier" => Kind::Courier,
            other => panic!("MAILGATE_FUZZ_SERVER={other}: `dovecot` or `courier`"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Dovecot => "dovecot",
            Kind::Courier => "courier",
        }
    }

    /// The three folders every account starts with, INBOX first.
    pub fn folders(self) -> [&'static str; 3] {
        match self {
            Kind::Dovecot => FOLDERS,
            Kind::Courier => COURIER_FOLDERS,
        }
    }

    /// Constructs (`generate::AVOIDABLE`) the generator always leaves out on this server.
    /// Courier's CAPABILITY has no CONDSTORE, QRESYNC, ENABLE, MOVE, UNSELECT nor LITERAL+
    /// (APPEND then sends synchronizing literals, see [`Kind::literal_plus`]); and it takes
    /// a new folder's UIDVALIDITY from the clock, so a folder deleted and created again
    /// could get different ones in the twins. `dupset`: Courier answers a message named
    /// twice in a FETCH set twice, and mailgate then answers the repeat with a
    /// `* n FETCH (UID n FLAGS (...))` of its own rather than the items asked for (an open
    /// difference). `seen`: for `FETCH n (FLAGS BODY[TEXT])` of an unseen message Courier
    /// answers `FLAGS ()` and then `* n FETCH (FLAGS (\Seen))`, mailgate `FLAGS (\Seen)`
    /// once (as Dovecot does): the same flags in the end, told differently.
    pub fn avoid(self) -> &'static [&'static str] {
        match self {
            Kind::Dovecot => &[],
            Kind::Courier => &["condstore", "move", "unselect", "recreate", "dupset", "seen"],
        }
    }

    /// Whether POP3 answers can be compared between the twins. Not on Courier: its UIDL
    /// holds a POP3 UIDVALIDITY taken from the clock at an account's first POP3 session,
    /// and it numbers messages added after provisioning by their file names (which hold
    /// the time and pid of the APPEND or COPY), so the twins' maildrops diverge.
    pub fn pop3(self) -> bool {
        self == Kind::Dovecot
    }

    /// Whether the server takes `{n+}` literals (else `{n}` and wait for `+`).
    pub fn literal_plus(self) -> bool {
        self == Kind::Dovecot
    }
}

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
    /// The name `account` logs in with (IMAP LOGIN, POP3 USER).
    fn login(&self, account: &str) -> String {
        account.to_string()
    }
    fn kind(&self) -> Kind;
}

/// Starts the server of `kind` with these accounts, all with [`PASSWORD`].
pub fn start(kind: Kind, users: &[String]) -> Box<dyn Server> {
    match kind {
        Kind::Dovecot => Box::new(DovecotServer::start(users)),
        Kind::Courier => Box::new(CourierServer::start(users)),
    }
}

/// The initial folders of a logical user whose content comes from `content_seed`, named
/// `names` (INBOX first).
pub fn initial_folders(content_seed: u64, names: [&str; 3]) -> Vec<Folder> {
    let mut rng = Rng::new(content_seed ^ 0xF0_1DE5);
    names
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
    fn kind(&self) -> Kind {
        Kind::Dovecot
    }

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

/// Courier IMAP/POP3 (`tests/support/courier.rs`): plain ports, system users named after
/// the accounts, Maildirs written here with Courier's own UID database.
pub struct CourierServer {
    courier: Courier,
    /// `(account, the harness's short name)`: the harness allows only `a-z0-9`.
    names: Vec<(String, String)>,
}

impl CourierServer {
    pub fn start(users: &[String]) -> CourierServer {
        let names: Vec<(String, String)> = users
            .iter()
            .map(|u| (u.clone(), u.chars().filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit()).collect()))
            .collect();
        for (i, (account, short)) in names.iter().enumerate() {
            assert!(
                !names[..i].iter().any(|(_, s)| s == short),
                "accounts {account:?} and another both become Courier user {short:?}"
            );
        }
        let accounts: Vec<(&str, &str)> = names.iter().map(|(_, s)| (s.as_str(), PASSWORD)).collect();
        CourierServer { courier: Courier::start(&accounts), names }
    }

    fn short(&self, account: &str) -> &str {
        self.names
            .iter()
            .find(|(a, _)| a == account)
            .map(|(_, s)| s.as_str())
            .unwrap_or_else(|| panic!("{account:?} is not an account of this Courier"))
    }

    /// The Maildir++ directory of `name` (`INBOX.Sent` is `.Sent`).
    fn folder_dir(&self, user: &str, name: &str) -> std::path::PathBuf {
        let root = self.courier.maildir(self.short(user));
        match name.strip_prefix("INBOX.") {
            None => {
                assert!(name.eq_ignore_ascii_case("INBOX"), "Courier folder {name:?} outside INBOX.");
                root
            }
            Some(sub) => root.join(format!(".{sub}")),
        }
    }

    /// Writes the folder's messages (LF line ends: Courier adds the CR) and a
    /// `courierimapuiddb` naming their UIDs: `1 <uidvalidity> <uidnext>`, then
    /// `<uid> <file name without :2,flags>` per message.
    fn write_folder(&self, user: &str, folder: &Folder) {
        let dir = self.folder_dir(user, &folder.name);
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        if folder.name != "INBOX" {
            fs::write(dir.join("maildirfolder"), b"").unwrap();
        }
        let mut uiddb = format!("1 {} {}\n", folder.uidvalidity, folder.uidnext);
        for m in &folder.messages {
            let body = mailgen::lf(&mailgen::message(m.seed, m.index, m.max_big));
            let base = format!("{}.M{}P{}Q{}.fuzz,S={}", m.date, m.uid, m.index, m.seed % 100_000, body.len());
            let path = dir.join("cur").join(format!("{base}:2,{}", m.flags));
            write_with_mtime(&path, &body, m.date);
            uiddb.push_str(&format!("{} {base}\n", m.uid));
        }
        fs::write(dir.join("courierimapuiddb"), uiddb).unwrap();
    }

    /// Hands the user's Maildir tree to the user (imapd runs as them).
    fn chown(&self, user: &str) {
        let login = self.courier.login_name(self.short(user));
        let root = self.courier.maildir(self.short(user));
        let status = std::process::Command::new("chown")
            .args(["-R", &format!("{login}:{login}")])
            .arg(&root)
            .status()
            .expect("running chown");
        assert!(status.success(), "chown -R {login} {}: {status}", root.display());
    }
}

impl Server for CourierServer {
    fn kind(&self) -> Kind {
        Kind::Courier
    }

    fn imap(&self) -> Endpoint {
        Endpoint { addr: self.courier.imap, tls: None }
    }

    fn pop3(&self) -> Endpoint {
        Endpoint { addr: self.courier.pop3, tls: None }
    }

    fn gateway_upstream(&self) -> GatewayUpstream {
        GatewayUpstream {
            imap: self.courier.imap.to_string(),
            pop3: self.courier.pop3.to_string(),
            tls: "plaintext",
            ca: None,
        }
    }

    fn provision(&self, user: &str, folders: &[Folder]) {
        for folder in folders {
            self.write_folder(user, folder);
        }
        self.chown(user);
    }

    fn rebuild(&self, _user: &str, _folder: &Folder) -> bool {
        false
    }

    fn login(&self, account: &str) -> String {
        self.courier.login_name(self.short(account))
    }
}
