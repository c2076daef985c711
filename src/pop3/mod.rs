//! POP3: the AUTHORIZATION-state front, the upstream login and the relay.
//!
//! - [`codec`]: sans-I/O command lines and (multi-line, dot-stuffed) responses.
//! - [`front`]: greeting, CAPA, STLS, USER/PASS, AUTH PLAIN, QUIT, answered by mailgate.
//! - [`upstream`]: logging in to the upstream with the client's credentials.
//! - [`relay`]: the TRANSACTION state, relayed byte for byte.

pub mod codec;
pub mod front;
pub mod relay;
pub mod upstream;
