//! IMAP: the pre-authentication front, the upstream login and the relay.
//!
//! - [`framing`]: sans-I/O lines-and-literals framer with limits (both directions).
//! - [`command`]: the commands mailgate answers before login.
//! - [`front`]: the not-authenticated state, STARTTLS and login.
//! - [`upstream`]: logging in to the upstream with the client's credentials.
//! - [`relay`]: the authenticated session, relayed with framing.
//! - [`intercept`], [`snapshot`]: FETCHes answered through the cache, and what it may keep.
//! - [`flags`]: flags remembered and checked with CONDSTORE; [`modseq`]: what mailgate's
//!   CONDSTORE adds to a session, kept from the client.
//! - [`reuse`]: upstream sessions parked after LOGOUT for the next login with the same
//!   credentials.

pub mod capabilities;
pub mod command;
pub mod fetch;
pub mod flags;
pub mod framing;
pub mod front;
pub mod intercept;
pub mod mailbox;
pub mod modseq;
pub mod quota;
pub mod relay;
pub mod renumber;
pub mod response;
pub mod reuse;
pub mod snapshot;
pub mod upstream;

/// The ALPN protocol id of IMAP.
pub const ALPN: &[u8] = b"imap";
