//! Cache keys. A key names one immutable piece of one account's mail; it can only be built
//! from an [`Account`], and an `Account` only from a successful upstream login
//! ([`LoginProof`]), so no code path can look up cached data for a user who has not proved
//! their password to the upstream in this session.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// A shared string that hashes by a digest computed once: keys are built per message and
/// item on hot paths, so hashing them must not walk their text each time.
#[derive(Clone, Debug)]
pub struct Name {
    text: Arc<str>,
    digest: u64,
}

impl Name {
    pub fn new(text: &str) -> Name {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut hasher);
        Name { text: Arc::from(text), digest: hasher.finish() }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn len(&self) -> usize {
        self.text.len()
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.digest == other.digest && (Arc::ptr_eq(&self.text, &other.text) || self.text == other.text)
    }
}

impl Eq for Name {}

impl Hash for Name {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.digest);
    }
}

/// Evidence that the upstream accepted the credentials just now. Only the upstream login
/// code creates one (`pub(crate)`), right after the upstream's OK.
#[derive(Debug)]
pub struct LoginProof(());

impl LoginProof {
    pub(crate) fn upstream_accepted() -> LoginProof {
        LoginProof(())
    }
}

/// Whose mail: the upstream (name and address) and the identity whose mailboxes the session
/// sees (the SASL authorization identity when one was given, else the login name).
///
/// The name is used exactly as authenticated: no case folding, because whether `Alice` and
/// `alice` are one mailbox is the upstream's policy, and guessing wrong would serve one
/// user's mail to another.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Account(Name);

impl Account {
    pub fn new(upstream: &str, identity: &str, _proof: &LoginProof) -> Account {
        // NUL cannot occur in either part, so the pair is unambiguous.
        Account(Name::new(&format!("{upstream}\0{identity}")))
    }

    /// The upstream and identity, NUL-separated (hashed into the shared tier's key names).
    pub fn text(&self) -> &str {
        self.0.as_str()
    }
}

/// An IMAP item: one message (mailbox, UIDVALIDITY, UID) and the exact item fetched, in a
/// normalized spelling (see `imap::fetch`).
#[derive(Clone, Debug, Eq)]
pub struct ImapKey {
    pub account: Account,
    pub mailbox: Name,
    pub uid_validity: u32,
    pub uid: u32,
    pub item: Name,
    /// What the item is (follows from `item`, so not part of equality): headers and
    /// structure live in the mailbox's snapshot columns, bodies in entries of their own.
    pub kind: super::Kind,
}

impl ImapKey {
    /// Whether the item is kept in a snapshot column (see [`column`](ImapKey::column)).
    pub fn is_column_item(&self) -> bool {
        matches!(self.kind, super::Kind::Header | super::Kind::Structure)
    }

    /// The snapshot column holding this item, when it is kept in one.
    pub fn column(&self) -> Option<ColumnKey> {
        self.is_column_item().then(|| ColumnKey {
            account: self.account.clone(),
            mailbox: self.mailbox.clone(),
            uid_validity: self.uid_validity,
            item: self.item.clone(),
        })
    }
}

/// One item of every message of one mailbox at one UIDVALIDITY of one account: a column of
/// the mailbox's snapshot (see `cache::column`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ColumnKey {
    pub account: Account,
    pub mailbox: Name,
    pub uid_validity: u32,
    pub item: Name,
}

impl Hash for ImapKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.account.hash(state);
        self.mailbox.hash(state);
        self.uid_validity.hash(state);
        self.uid.hash(state);
        self.item.hash(state);
    }
}

impl PartialEq for ImapKey {
    /// The numbers first: they tell most keys apart without looking at a name.
    fn eq(&self, other: &ImapKey) -> bool {
        self.uid == other.uid
            && self.uid_validity == other.uid_validity
            && self.item == other.item
            && self.mailbox == other.mailbox
            && self.account == other.account
    }
}

/// A whole POP3 message (its RETR response) by UIDL and size. UIDLs are unique per
/// maildrop and never reused for other content (RFC 1939 §7); the size (from `LIST`) is
/// there for the servers that break that promise (a maildrop rebuilt or restored that
/// numbers its messages again): another message under an old UIDL almost always has
/// another size, and then another key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pop3Key {
    pub account: Account,
    pub uidl: Name,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    Imap(ImapKey),
    /// A whole column (see [`ImapKey::column`]); its items are looked up by UID inside.
    Column(ColumnKey),
    Pop3(Pop3Key),
}
