//! Client credentials as mailgate receives them, shared by IMAP and POP3.
//!
//! The password is a [`Secret`] from the moment it is parsed; nothing here logs.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::secret::Secret;

/// What the client proved it knows; sent upstream unchanged.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// The authentication identity (LOGIN user name, SASL authcid).
    pub user: String,
    pub password: Secret<String>,
    /// SASL authorization identity, when the client asked to act as someone else.
    pub authzid: Option<String>,
    /// An OAuth bearer response (OAUTHBEARER, XOAUTH2): sent upstream as the client sent
    /// it, with `user` the envelope's user and `password` its token.
    pub oauth: Option<crate::oauth::Bearer>,
}

impl Credentials {
    /// Whose mailboxes the session sees: the authorization identity when one was given.
    pub fn identity(&self) -> &str {
        self.authzid.as_deref().unwrap_or(&self.user)
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("invalid base64")]
    Base64,
    #[error("PLAIN needs authzid NUL authcid NUL password")]
    Shape,
    #[error("credentials must be UTF-8")]
    Utf8,
    #[error("empty user name or password")]
    Empty,
}

/// Decodes a SASL PLAIN message (RFC 4616) from its base64 form.
pub fn decode_plain(base64: &[u8]) -> Result<Credentials, SaslError> {
    let raw = Secret::new(STANDARD.decode(base64).map_err(|_| SaslError::Base64)?);
    let mut fields = raw.expose().split(|&b| b == 0);
    let (Some(authzid), Some(user), Some(password), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(SaslError::Shape);
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| SaslError::Utf8);
    let (authzid, user, password) = (text(authzid)?, text(user)?, Secret::new(text(password)?));
    if user.is_empty() || password.expose().is_empty() {
        return Err(SaslError::Empty);
    }
    Ok(Credentials {
        authzid: (!authzid.is_empty() && authzid != user).then_some(authzid),
        user,
        password,
        oauth: None,
    })
}

/// Encodes credentials as a SASL PLAIN initial response (for the upstream login).
pub fn encode_plain(credentials: &Credentials) -> Secret<String> {
    let mut raw = Vec::new();
    raw.extend_from_slice(credentials.authzid.as_deref().unwrap_or("").as_bytes());
    raw.push(0);
    raw.extend_from_slice(credentials.user.as_bytes());
    raw.push(0);
    raw.extend_from_slice(credentials.password.expose().as_bytes());
    Secret::new(STANDARD.encode(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_round_trips_and_drops_a_redundant_authzid() {
        let creds = decode_plain(b"AGFsaWNlAHMzY3JldA==").unwrap();
        assert_eq!(creds.user, "alice");
        assert_eq!(creds.password.expose(), "s3cret");
        assert_eq!(creds.authzid, None);
        assert_eq!(encode_plain(&creds).expose(), "AGFsaWNlAHMzY3JldA==");
        let same = decode_plain(STANDARD.encode(b"alice\0alice\0pw").as_bytes()).unwrap();
        assert_eq!(same.authzid, None);
        let other = decode_plain(STANDARD.encode(b"bob\0alice\0pw").as_bytes()).unwrap();
        assert_eq!(other.authzid.as_deref(), Some("bob"));
    }

    #[test]
    fn malformed_plain_is_refused() {
        assert_eq!(decode_plain(b"!!!").unwrap_err(), SaslError::Base64);
        assert_eq!(decode_plain(STANDARD.encode(b"alice\0pw").as_bytes()).unwrap_err(), SaslError::Shape);
        assert_eq!(decode_plain(STANDARD.encode(b"\0alice\0").as_bytes()).unwrap_err(), SaslError::Empty);
        assert_eq!(decode_plain(STANDARD.encode(b"\0\xff\0pw").as_bytes()).unwrap_err(), SaslError::Utf8);
    }

    #[test]
    fn debug_output_hides_the_password() {
        let creds = decode_plain(b"AGFsaWNlAHMzY3JldA==").unwrap();
        assert!(!format!("{creds:?}").contains("s3cret"));
    }
}
