//! Who may read the admin listener's sensitive pages: `/debug/*` names accounts, and
//! `/metrics` optionally (`[admin] protect_metrics`), need `Authorization: Bearer <token>`
//! once `[admin] token_file` is set. `/healthz` and `/readyz` stay open (probes carry no
//! secret and reveal nothing).
//!
//! The token lives in a file (a Kubernetes Secret, a file only root and mailgate read),
//! never in the configuration: it is read at the first request, again whenever the file
//! changes (its modification time, size or inode: a Secret update swaps a symlink) and on
//! every reload. It is held in a [`Secret`], compared in constant time, and never logged.
//! A token file that cannot be read or is empty refuses everyone (and says so in the log):
//! failing open would publish the account list.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::config::AdminConfig;
use crate::secret::Secret;

/// What the file looked like when read: modification time, size, inode.
type Stamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

/// Why a request was not let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token that is not the one in the file (or the file has none).
    Wrong,
}

pub struct AdminAuth {
    state: Mutex<State>,
}

struct State {
    token_file: Option<PathBuf>,
    protect_metrics: bool,
    /// The token as last read, with the file's stamp then; `None` before the first read.
    read: Option<(Stamp, Option<Secret<Vec<u8>>>)>,
}

impl AdminAuth {
    pub fn new(config: &AdminConfig) -> AdminAuth {
        let auth = AdminAuth { state: Mutex::new(State { token_file: None, protect_metrics: false, read: None }) };
        auth.configure(config);
        auth
    }

    /// Takes the settings of a (re)loaded configuration; the file is read again at the
    /// next request.
    pub fn configure(&self, config: &AdminConfig) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.token_file = config.token_file.clone();
        state.protect_metrics = config.protect_metrics;
        state.read = None;
    }

    /// Whether `path` needs the token.
    pub fn protects(&self, path: &str) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.token_file.is_some() && (path.starts_with("/debug/") || (state.protect_metrics && path == "/metrics"))
    }

    /// Lets a request for `path` with the header block `head` through, or says why not.
    pub fn check(&self, path: &str, head: &[u8]) -> Result<(), Denied> {
        if !self.protects(path) {
            return Ok(());
        }
        let given = presented_token(head).ok_or(Denied::Missing)?;
        let expected = self.token();
        match expected {
            Some(token) if same_secret(given.expose(), token.expose()) => Ok(()),
            _ => Err(Denied::Wrong),
        }
    }

    /// The token in the file, read again if the file changed.
    fn token(&self) -> Option<Secret<Vec<u8>>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let path = state.token_file.clone()?;
        let now = stamp(&path);
        if let Some((was, token)) = &state.read {
            if *was == now {
                return token.clone();
            }
        }
        let token = match std::fs::read(&path) {
            Ok(bytes) => {
                let token = bytes.trim_ascii().to_vec();
                if token.is_empty() {
                    tracing::warn!(file = %path.display(), "admin token file is empty: protected admin pages refuse everyone");
                    None
                } else {
                    tracing::info!(file = %path.display(), "admin token read");
                    Some(Secret::new(token))
                }
            }
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "admin token file unreadable: protected admin pages refuse everyone");
                None
            }
        };
        state.read = Some((now, token.clone()));
        token
    }
}

/// The values of the request head's `name` headers (name in any case, RFC 9110), trimmed;
/// the request line is no header.
pub fn header_values<'a>(head: &'a [u8], name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    head.split(|&b| b == b'\n').skip(1).filter_map(move |line| {
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon].eq_ignore_ascii_case(name).then(|| line[colon + 1..].trim_ascii())
    })
}

/// The credentials of the request's `Authorization: <scheme> <credentials>` header, for a
/// scheme in any case (RFC 9110 §11.1); `None` when absent or empty.
fn authorization<'a>(head: &'a [u8], scheme: &[u8]) -> Option<&'a [u8]> {
    header_values(head, b"authorization").find_map(|value| {
        let (given, credentials) = value.split_at_checked(scheme.len() + 1)?;
        let named = given[..scheme.len()].eq_ignore_ascii_case(scheme) && given[scheme.len()] == b' ';
        named.then(|| credentials.trim_ascii()).filter(|c| !c.is_empty())
    })
}

/// The token of the request's `Authorization: Bearer` header (RFC 6750).
pub fn bearer_token(head: &[u8]) -> Option<&[u8]> {
    authorization(head, b"bearer")
}

/// The token a request presents: its `Authorization: Bearer` token, or the password of
/// `Authorization: Basic` (any user name), which is how a browser asks for a page such as
/// `/debug/accounts/<user>` after the 401's `Basic` challenge.
pub fn presented_token(head: &[u8]) -> Option<Secret<Vec<u8>>> {
    use base64::Engine;
    if let Some(token) = bearer_token(head) {
        return Some(Secret::new(token.to_vec()));
    }
    let decoded = Secret::new(base64::engine::general_purpose::STANDARD.decode(authorization(head, b"basic")?).ok()?);
    let colon = decoded.expose().iter().position(|&b| b == b':')?;
    let password = decoded.expose()[colon + 1..].to_vec();
    (!password.is_empty()).then(|| Secret::new(password))
}

/// Equality whose time depends on the lengths only, never on where the bytes differ.
pub fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = given.len() ^ expected.len();
    for (i, byte) in expected.iter().enumerate() {
        difference |= usize::from(given.get(i).copied().unwrap_or(!byte) ^ byte);
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_token_is_found_in_any_case_and_spacing() {
        let head = b"GET /debug/top-accounts HTTP/1.1\r\nHost: x\r\nauthorization:  bearer  s3cr3t \r\n\r\n";
        assert_eq!(bearer_token(head), Some(&b"s3cr3t"[..]));
        assert_eq!(bearer_token(b"GET / HTTP/1.1\nAuthorization: Bearer t\n\n"), Some(&b"t"[..]));
        assert_eq!(bearer_token(b"GET / HTTP/1.1\r\nAuthorization: Basic dTpw\r\n\r\n"), None);
        assert_eq!(bearer_token(b"GET / HTTP/1.1\r\nAuthorization: Bearer \r\n\r\n"), None);
        assert_eq!(bearer_token(b"GET /Authorization: Bearer t HTTP/1.1\r\n\r\n"), None, "not in the request line");
    }

    #[test]
    fn a_browser_presents_the_token_as_a_basic_password() {
        let basic = |credentials: &str| {
            use base64::Engine;
            let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
            format!("GET / HTTP/1.1\r\nauthorization: basic {encoded}\r\n\r\n").into_bytes()
        };
        assert_eq!(presented_token(&basic("admin:s3cret")).unwrap().expose(), b"s3cret");
        assert_eq!(presented_token(&basic(":s3cret")).unwrap().expose(), b"s3cret");
        assert!(presented_token(&basic("admin:")).is_none());
        assert!(presented_token(&basic("no-colon")).is_none());
        assert!(presented_token(b"GET / HTTP/1.1\r\nAuthorization: Basic !!!\r\n\r\n").is_none());
        let bearer = presented_token(b"GET / HTTP/1.1\r\nAuthorization: Bearer t\r\n\r\n").unwrap();
        assert_eq!(bearer.expose(), b"t");
    }

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        assert!(same_secret(b"token", b"token"));
        assert!(!same_secret(b"token", b"tokem"));
        assert!(!same_secret(b"toke", b"token"));
        assert!(!same_secret(b"token!", b"token"));
        assert!(!same_secret(b"", b"token"));
        assert!(!same_secret(b"\xff", b"\x00"));
    }

    #[test]
    fn debug_pages_and_optionally_metrics_need_the_token_of_the_file_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "first-token\n").unwrap();
        let config = AdminConfig { token_file: Some(file.clone()), ..AdminConfig::default() };
        let auth = AdminAuth::new(&config);
        let with = |token: &str| format!("GET / HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\r\n").into_bytes();
        assert_eq!(auth.check("/debug/top-accounts", b"GET / HTTP/1.1\r\n\r\n"), Err(Denied::Missing));
        assert_eq!(auth.check("/debug/top-accounts", &with("wrong")), Err(Denied::Wrong));
        assert_eq!(auth.check("/debug/top-accounts", &with("first-token")), Ok(()));
        assert_eq!(auth.check("/metrics", b"GET / HTTP/1.1\r\n\r\n"), Ok(()));
        assert_eq!(auth.check("/healthz", b"GET / HTTP/1.1\r\n\r\n"), Ok(()));

        // A new file (another inode, as a Secret update or `mv` makes).
        let next = dir.path().join("token.new");
        std::fs::write(&next, "second-token").unwrap();
        std::fs::rename(&next, &file).unwrap();
        assert_eq!(auth.check("/debug/top-accounts", &with("first-token")), Err(Denied::Wrong));
        assert_eq!(auth.check("/debug/top-accounts", &with("second-token")), Ok(()));

        auth.configure(&AdminConfig { protect_metrics: true, ..config });
        assert_eq!(auth.check("/metrics", b"GET / HTTP/1.1\r\n\r\n"), Err(Denied::Missing));
        assert_eq!(auth.check("/metrics", &with("second-token")), Ok(()));

        std::fs::write(&file, "  \n").unwrap();
        assert_eq!(auth.check("/metrics", &with("")), Err(Denied::Missing));
        assert_eq!(auth.check("/debug/top-accounts", &with("second-token")), Err(Denied::Wrong), "empty: nobody");
        std::fs::remove_file(&file).unwrap();
        assert_eq!(auth.check("/debug/top-accounts", &with("second-token")), Err(Denied::Wrong), "gone: nobody");
    }

    #[test]
    fn without_a_token_file_nothing_is_protected() {
        let auth = AdminAuth::new(&AdminConfig { protect_metrics: true, ..AdminConfig::default() });
        assert_eq!(auth.check("/debug/top-accounts", b"GET / HTTP/1.1\r\n\r\n"), Ok(()));
        assert_eq!(auth.check("/metrics", b"GET / HTTP/1.1\r\n\r\n"), Ok(()));
    }
}
