//! OAuth 2.0 bearer tokens over SASL: OAUTHBEARER (RFC 7628) and Google's XOAUTH2.
//!
//! mailgate does not check tokens: the client's SASL response goes to the upstream exactly
//! as the client sent it (its base64 text), and the upstream (Dovecot's `oauth2` passdb,
//! a provider's IMAP server) asks the token's issuer. What mailgate needs from the
//! response is the user it names, for limits, routing and cache keys; this module reads
//! that *envelope* and nothing else. The token itself is a [`Secret`] from the moment it
//! is decoded, and the whole response stays one too (it contains the token).
//!
//! Which mechanisms an upstream offers is learned from its capabilities ([`Offered`]):
//! mailgate announces a mechanism only where its upstream takes it, since a client that
//! picks OAuth and fails would otherwise not fall back to a password.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};

use base64::alphabet::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;

use crate::auth::Credentials;
use crate::secret::Secret;

/// The OAuth SASL mechanisms mailgate passes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 7628: a GS2 header naming the user (`a=`), then `auth=Bearer <token>`.
    OAuthBearer,
    /// Google's: `user=<user>`, then `auth=Bearer <token>`.
    XOAuth2,
}

impl Mechanism {
    pub const ALL: [Mechanism; 2] = [Mechanism::OAuthBearer, Mechanism::XOAuth2];

    /// The SASL name (as in `AUTH=` and POP3 `SASL`).
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::OAuthBearer => "OAUTHBEARER",
            Mechanism::XOAuth2 => "XOAUTH2",
        }
    }

    /// The mechanism named `name` (upper-cased by the caller), if it is one of these.
    pub fn from_name(name: &str) -> Option<Mechanism> {
        Mechanism::ALL.into_iter().find(|m| m.name() == name)
    }

    fn bit(self) -> u8 {
        match self {
            Mechanism::OAuthBearer => 1,
            Mechanism::XOAuth2 => 2,
        }
    }
}

/// A client's OAuth response, kept as it arrived: its base64 text goes upstream unchanged.
#[derive(Clone, Debug)]
pub struct Bearer {
    pub mechanism: Mechanism,
    /// The base64 text the client sent (SASL-IR argument or continuation line).
    pub response: Secret<Vec<u8>>,
}

/// The OAuth mechanisms an upstream offered when last asked (its capabilities before
/// login, from each login and from a probe when a configuration starts); none until then.
#[derive(Debug, Default)]
pub struct Offered(AtomicU8);

impl Offered {
    /// Records what the upstream offers now: exactly the mechanisms in `offered` (SASL
    /// names, any case), so that one withdrawn is no longer announced.
    pub fn learn<'a>(&self, offered: impl IntoIterator<Item = &'a str>) {
        let mut bits = 0;
        for name in offered {
            if let Some(mechanism) = Mechanism::from_name(&name.to_ascii_uppercase()) {
                bits |= mechanism.bit();
            }
        }
        self.0.store(bits, Ordering::Relaxed);
    }

    /// Takes what `other` learned (a reloaded configuration's pool, from the pool it
    /// replaces, until its own probe answers).
    pub fn inherit(&self, other: &Offered) {
        self.0.store(other.0.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    pub fn offers(&self, mechanism: Mechanism) -> bool {
        self.0.load(Ordering::Relaxed) & mechanism.bit() != 0
    }

    /// The mechanisms offered, in a fixed order.
    pub fn mechanisms(&self) -> impl Iterator<Item = Mechanism> + '_ {
        Mechanism::ALL.into_iter().filter(|m| self.offers(*m))
    }
}

/// The client's side of an exchange that the upstream continues: RFC 7628 §3.2.3's error
/// challenge (base64 JSON), which the client must answer (OAUTHBEARER `%x01`, XOAUTH2 an
/// empty line) before the upstream sends its failure. The front shows the client
/// `challenge` and returns the client's answer line; `None` when the client is gone.
pub trait SaslClient {
    fn respond(&mut self, challenge: &[u8]) -> impl Future<Output = Option<Vec<u8>>> + Send;
}

/// The refusal code of an upstream login whose upstream does not offer the client's
/// mechanism (a route to another upstream than the listener's): not a wrong credential.
pub const NOT_OFFERED: &str = "CANNOT";

/// At most this many challenges are relayed in one exchange (OAuth has one: the error).
pub const MAX_CHALLENGES: usize = 2;

/// The largest decoded response taken (the front's line limits bound it first).
const MAX_RESPONSE_BYTES: usize = 64 << 10;

/// Why a response is refused before any upstream sees it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("invalid base64")]
    Base64,
    #[error("response too long")]
    TooLong,
    #[error("malformed SASL envelope")]
    Shape,
    /// OAUTHBEARER without `a=`: the user is only in the token, which mailgate cannot read.
    #[error("no user name in the SASL envelope (OAUTHBEARER needs a= in its GS2 header)")]
    NoUser,
    #[error("no bearer token in the SASL envelope")]
    NoToken,
    #[error("user names must be UTF-8")]
    Utf8,
}

/// What mailgate reads of a response: the user it names and the token.
#[derive(Debug)]
pub struct Envelope {
    pub user: String,
    pub token: Secret<String>,
}

/// Base64 as clients send it: padding is the upstream's to judge, not mailgate's.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The credentials of a client's `mechanism` response (its base64 text): the envelope's
/// user as the login name, its token where a password would be (for the failed-login
/// memory, which keeps only keyed hashes), and the response itself for the upstream.
pub fn credentials(mechanism: Mechanism, response: Secret<Vec<u8>>) -> Result<Credentials, EnvelopeError> {
    if response.expose().len() > MAX_RESPONSE_BYTES / 3 * 4 + 4 {
        return Err(EnvelopeError::TooLong);
    }
    let raw = Secret::new(BASE64.decode(response.expose()).map_err(|_| EnvelopeError::Base64)?);
    let envelope = parse(mechanism, raw.expose())?;
    Ok(Credentials {
        user: envelope.user,
        password: envelope.token,
        authzid: None,
        oauth: Some(Bearer { mechanism, response }),
    })
}

/// Reads a decoded `mechanism` response.
pub fn parse(mechanism: Mechanism, raw: &[u8]) -> Result<Envelope, EnvelopeError> {
    if raw.len() > MAX_RESPONSE_BYTES {
        return Err(EnvelopeError::TooLong);
    }
    let (gs2_user, pairs) = match mechanism {
        Mechanism::OAuthBearer => {
            let (user, rest) = gs2_header(raw)?;
            (user, rest.strip_prefix(b"\x01").ok_or(EnvelopeError::Shape)?)
        }
        Mechanism::XOAuth2 => (None, raw),
    };
    // key=value pairs, each ended by ^A, and one more ^A to close the list.
    let list = pairs.strip_suffix(b"\x01").ok_or(EnvelopeError::Shape)?;
    let list = match list {
        [] => None,
        _ => Some(list.strip_suffix(b"\x01").ok_or(EnvelopeError::Shape)?),
    };
    let (mut user, mut token) = (gs2_user, None);
    for pair in list.into_iter().flat_map(|list| list.split(|&b| b == 1)) {
        let Some(eq) = pair.iter().position(|&b| b == b'=') else {
            return Err(EnvelopeError::Shape);
        };
        let (key, value) = (&pair[..eq], &pair[eq + 1..]);
        if key.is_empty() || !key.iter().all(u8::is_ascii_alphabetic) {
            return Err(EnvelopeError::Shape);
        }
        match key {
            b"auth" => {
                if token.is_some() {
                    return Err(EnvelopeError::Shape);
                }
                token = Some(bearer_token(value)?);
            }
            b"user" if mechanism == Mechanism::XOAuth2 => {
                if user.is_some() {
                    return Err(EnvelopeError::Shape);
                }
                user = Some(text(value)?);
            }
            // host, port (RFC 7628 §3.1) and extensions: the upstream's.
            _ => {}
        }
    }
    let token = token.ok_or(EnvelopeError::NoToken)?;
    let user = user.filter(|u| !u.is_empty()).ok_or(EnvelopeError::NoUser)?;
    Ok(Envelope { user, token })
}

/// RFC 5801's GS2 header as RFC 7628 takes it: `n,` or `y,` (no channel binding), an
/// optional `a=` with `=2C` and `=3D` for `,` and `=`, then `,`. The user and the rest.
fn gs2_header(raw: &[u8]) -> Result<(Option<String>, &[u8]), EnvelopeError> {
    let rest = (raw.strip_prefix(b"n,").or_else(|| raw.strip_prefix(b"y,"))).ok_or(EnvelopeError::Shape)?;
    let comma = rest.iter().position(|&b| b == b',').ok_or(EnvelopeError::Shape)?;
    let (authzid, rest) = (&rest[..comma], &rest[comma + 1..]);
    if authzid.is_empty() {
        return Ok((None, rest));
    }
    let name = authzid.strip_prefix(b"a=").ok_or(EnvelopeError::Shape)?;
    let mut user = Vec::with_capacity(name.len());
    let mut i = 0;
    while i < name.len() {
        match (name[i], name.get(i + 1..i + 3)) {
            (b'=', Some(b"2C")) => user.push(b','),
            (b'=', Some(b"3D")) => user.push(b'='),
            (b'=', _) => return Err(EnvelopeError::Shape),
            (byte, _) => {
                user.push(byte);
                i += 1;
                continue;
            }
        }
        i += 3;
    }
    Ok((Some(text(&user)?), rest))
}

/// `Bearer <token>` (the scheme is case-insensitive, RFC 6750 §2.1).
fn bearer_token(value: &[u8]) -> Result<Secret<String>, EnvelopeError> {
    let scheme = value.get(..7).filter(|s| s.eq_ignore_ascii_case(b"Bearer ")).ok_or(EnvelopeError::NoToken)?;
    let token = &value[scheme.len()..];
    if token.is_empty() || !token.iter().all(|b| b.is_ascii_graphic()) {
        return Err(EnvelopeError::NoToken);
    }
    Ok(Secret::new(String::from_utf8_lossy(token).into_owned()))
}

/// A user name: UTF-8 without control characters.
fn text(bytes: &[u8]) -> Result<String, EnvelopeError> {
    let text = std::str::from_utf8(bytes).map_err(|_| EnvelopeError::Utf8)?;
    if text.chars().any(char::is_control) {
        return Err(EnvelopeError::Shape);
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(raw: &[u8]) -> Secret<Vec<u8>> {
        Secret::new(base64::engine::general_purpose::STANDARD.encode(raw).into_bytes())
    }

    #[test]
    fn oauthbearer_names_the_gs2_user_and_keeps_the_response() {
        let raw = b"n,a=user@example.com,\x01host=imap.example.com\x01port=993\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01";
        let creds = credentials(Mechanism::OAuthBearer, b64(raw)).unwrap();
        assert_eq!(creds.user, "user@example.com");
        assert_eq!(creds.password.expose(), "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==");
        let bearer = creds.oauth.as_ref().unwrap();
        assert_eq!((bearer.mechanism, bearer.response.expose()), (Mechanism::OAuthBearer, b64(raw).expose()));
        assert_eq!(creds.identity(), "user@example.com");
    }

    #[test]
    fn gs2_escapes_are_decoded_and_others_refused() {
        let user = |raw: &[u8]| parse(Mechanism::OAuthBearer, raw).map(|e| e.user);
        assert_eq!(user(b"n,a=a=2Cb=3Dc@x,\x01auth=Bearer t\x01\x01").unwrap(), "a,b=c@x");
        assert_eq!(user(b"y,a=bob,\x01auth=bearer t\x01\x01").unwrap(), "bob", "y, and the scheme in any case");
        assert_eq!(user(b"n,a=a=2Db,\x01auth=Bearer t\x01\x01"), Err(EnvelopeError::Shape), "=2D is no escape");
        assert_eq!(user(b"n,a=ab=,\x01auth=Bearer t\x01\x01"), Err(EnvelopeError::Shape), "a cut escape");
        assert_eq!(user(b"p=tls-unique,a=bob,\x01auth=Bearer t\x01\x01"), Err(EnvelopeError::Shape));
        assert_eq!(user(b"n,a=\xff,\x01auth=Bearer t\x01\x01"), Err(EnvelopeError::Utf8));
        assert_eq!(user(b"n,a=b\x7fob,\x01auth=Bearer t\x01\x01"), Err(EnvelopeError::Shape));
    }

    #[test]
    fn xoauth2_names_its_user() {
        let env = parse(Mechanism::XOAuth2, b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3\x01\x01")
            .unwrap();
        assert_eq!((env.user.as_str(), env.token.expose().as_str()), ("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3"));
        let gs2 = parse(Mechanism::XOAuth2, b"n,a=bob,\x01auth=Bearer t\x01\x01");
        assert_eq!(gs2.unwrap_err(), EnvelopeError::Shape, "XOAUTH2 has no GS2 header");
    }

    #[test]
    fn missing_parts_are_refused() {
        use EnvelopeError::*;
        for (mechanism, raw, error) in [
            (Mechanism::OAuthBearer, &b"n,,\x01auth=Bearer t\x01\x01"[..], NoUser),
            (Mechanism::OAuthBearer, b"n,a=,\x01auth=Bearer t\x01\x01", NoUser),
            (Mechanism::OAuthBearer, b"n,a=bob,\x01host=x\x01\x01", NoToken),
            (Mechanism::OAuthBearer, b"n,a=bob,\x01auth=Basic dDp0\x01\x01", NoToken),
            (Mechanism::OAuthBearer, b"n,a=bob,\x01auth=Bearer \x01\x01", NoToken),
            (Mechanism::OAuthBearer, b"n,a=bob,\x01auth=Bearer a b\x01\x01", NoToken),
            (Mechanism::OAuthBearer, b"n,a=bob,\x01auth=Bearer t\x01", Shape),
            (Mechanism::OAuthBearer, b"n,a=bob,auth=Bearer t\x01\x01", Shape),
            (Mechanism::OAuthBearer, b"n,a=bob,\x01auth=Bearer t\x01auth=Bearer u\x01\x01", Shape),
            (Mechanism::OAuthBearer, b"\x01", Shape),
            (Mechanism::OAuthBearer, b"", Shape),
            (Mechanism::XOAuth2, b"auth=Bearer t\x01\x01", NoUser),
            (Mechanism::XOAuth2, b"user=bob\x01\x01", NoToken),
            (Mechanism::XOAuth2, b"user=bob\x01user=eve\x01auth=Bearer t\x01\x01", Shape),
            (Mechanism::XOAuth2, b"user=bob\x01auth=Bearer t", Shape),
            (Mechanism::XOAuth2, b"", Shape),
            (Mechanism::XOAuth2, b"\x01", NoToken),
        ] {
            assert_eq!(parse(mechanism, raw).unwrap_err(), error, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn garbage_and_oversize_are_refused() {
        assert_eq!(
            credentials(Mechanism::XOAuth2, Secret::new(b"!!notbase64".to_vec())).unwrap_err(),
            EnvelopeError::Base64
        );
        assert_eq!(credentials(Mechanism::XOAuth2, Secret::new(Vec::new())).unwrap_err(), EnvelopeError::Shape);
        let huge = vec![b'A'; MAX_RESPONSE_BYTES * 2];
        assert_eq!(credentials(Mechanism::OAuthBearer, Secret::new(huge)).unwrap_err(), EnvelopeError::TooLong);
        let mut big = b"user=bob\x01auth=Bearer ".to_vec();
        big.extend(std::iter::repeat_n(b't', MAX_RESPONSE_BYTES));
        big.extend_from_slice(b"\x01\x01");
        assert_eq!(parse(Mechanism::XOAuth2, &big).unwrap_err(), EnvelopeError::TooLong);
        // Random bytes never panic.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    [b'n', b',', b'a', b'=', 1, b'2', b'C', b'B', b' ', (seed >> 56) as u8][(seed % 10) as usize]
                })
                .collect();
            for mechanism in Mechanism::ALL {
                let _ = parse(mechanism, &bytes);
            }
        }
    }

    #[test]
    fn unpadded_base64_is_taken_as_clients_send_it() {
        let padded = base64::engine::general_purpose::STANDARD.encode(b"user=bob\x01auth=Bearer t\x01\x01");
        let unpadded = padded.trim_end_matches('=').as_bytes().to_vec();
        assert_eq!(credentials(Mechanism::XOAuth2, Secret::new(unpadded)).unwrap().user, "bob");
    }

    #[test]
    fn debug_output_hides_the_token_and_the_response() {
        let raw = b"user=bob\x01auth=Bearer SECRETTOKEN\x01\x01";
        let creds = credentials(Mechanism::XOAuth2, b64(raw)).unwrap();
        let shown = format!("{creds:?}");
        let encoded = String::from_utf8(b64(raw).expose().clone()).unwrap();
        assert!(!shown.contains("SECRETTOKEN") && !shown.contains(&encoded), "{shown}");
        assert!(shown.contains("XOAuth2"), "{shown}");
    }

    #[test]
    fn offered_mechanisms_follow_the_last_capabilities() {
        let offered = Offered::default();
        assert_eq!(offered.mechanisms().count(), 0);
        offered.learn(["PLAIN", "xoauth2", "OAUTHBEARER"]);
        assert_eq!(offered.mechanisms().collect::<Vec<_>>(), Mechanism::ALL);
        offered.learn(["OAUTHBEARER"]);
        assert!(offered.offers(Mechanism::OAuthBearer) && !offered.offers(Mechanism::XOAuth2));
        let reloaded = Offered::default();
        reloaded.inherit(&offered);
        assert_eq!(reloaded.mechanisms().collect::<Vec<_>>(), [Mechanism::OAuthBearer]);
    }
}
