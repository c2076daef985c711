//! Cache keys. A key names one immutable piece of one account's mail; it can only be built
//! from an [`Account`], and an `Account` only from a successful upstream login
//! ([`LoginProof`]), so no code path can look up cached data for a user who has not proved
//! their password to the upstream in this session.

use std::sync::Arc;

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
pub struct Account(Arc<(String, String)>);

impl Account {
    pub fn new(upstream: &str, identity: &str, _proof: &LoginProof) -> Account {
        Account(Arc::new((upstream.to_string(), identity.to_string())))
    }

    pub fn identity(&self) -> &str {
        &self.0 .1
    }
}

/// An IMAP item: one message (mailbox, UIDVALIDITY, UID) and the exact item fetched, in a
/// normalized spelling (see `imap::fetch`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImapKey {
    pub account: Account,
    pub mailbox: Arc<str>,
    pub uid_validity: u32,
    pub uid: u32,
    pub item: Arc<str>,
}

/// A whole POP3 message (its RETR response) by UIDL. UIDLs are unique per maildrop and never
/// reused for other content (RFC 1939 §7).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pop3Key {
    pub account: Account,
    pub uidl: Arc<str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    Imap(ImapKey),
    Pop3(Pop3Key),
}
