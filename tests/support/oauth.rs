//! A Dovecot that takes OAuth 2.0 bearer tokens (its `oauth2` passdb, after the usual
//! passwd-file one), and the token introspection endpoint it asks: a small HTTP/1.1
//! server on 127.0.0.1 that knows a fixed table of tokens.
//!
//! The endpoint answers RFC 7662 style (`introspection_mode = post`, the token in a
//! `token=` form field): `{"active": true, "username": ...}` for a known token,
//! `{"active": false}` for any other.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::dovecot::{Dovecot, Options};

/// The most requests one endpoint serves, and how long it lives at most.
const MAX_REQUESTS: usize = 1000;
const MAX_LIFETIME: Duration = Duration::from_secs(300);

pub struct Introspection {
    pub addr: SocketAddr,
    /// Requests answered so far.
    pub requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Holds the passdb's settings file for as long as a Dovecot may read it.
    dir: tempfile::TempDir,
}

impl Introspection {
    /// Serves `tokens` (token → the user it belongs to) until dropped.
    pub fn start(tokens: &[(&str, &str)]) -> Introspection {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let tokens: HashMap<String, String> = tokens.iter().map(|(t, u)| (t.to_string(), u.to_string())).collect();
        let (requests, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (count, halt) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            while !halt.load(Ordering::Relaxed)
                && count.load(Ordering::Relaxed) < MAX_REQUESTS
                && started.elapsed() < MAX_LIFETIME
            {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if answer(stream, &tokens).is_ok() {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let dir = tempfile::tempdir().unwrap();
        Introspection { addr, requests, stop, thread: Some(thread), dir }
    }

    /// Requests answered so far.
    pub fn count(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// A Dovecot serving `users` (name, password) that also takes OAUTHBEARER and XOAUTH2
    /// tokens checked here.
    pub fn dovecot(&self, users: &[(&str, &str)]) -> Dovecot {
        let dir = self.dir.path();
        // The auth process (not root) reads the settings file.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let args = dir.join("dovecot-oauth2.conf.ext");
        std::fs::write(
            &args,
            format!(
                "introspection_url = http://{}/introspect\n\
                 introspection_mode = post\n\
                 force_introspection = yes\n\
                 username_attribute = username\n\
                 active_attribute = active\n\
                 active_value = true\n",
                self.addr
            ),
        )
        .unwrap();
        std::fs::set_permissions(&args, std::fs::Permissions::from_mode(0o644)).unwrap();
        let extra = format!(
            "auth_mechanisms = plain login oauthbearer xoauth2\n\
             passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {}\n}}\n",
            args.display()
        );
        Dovecot::start_with(users, &Options { extra, ..Options::default() })
    }
}

impl Drop for Introspection {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request (headers, then a Content-Length body) and answers it, then closes.
fn answer(mut stream: TcpStream, tokens: &HashMap<String, String>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    let body_start = loop {
        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 || request.len() > 64 << 10 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        request.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&request[..body_start]).to_ascii_lowercase();
    let length: usize = (head.lines())
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
        .min(64 << 10);
    while request.len() < body_start + length {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&request[body_start..]).into_owned();
    let token = body
        .split('&')
        .find_map(|field| field.strip_prefix("token="))
        .map(|t| t.replace("%2B", "+").replace("%2F", "/").replace("%3D", "="))
        .unwrap_or_default();
    let json = match tokens.get(&token) {
        Some(user) => format!("{{\"active\": true, \"username\": \"{user}\", \"scope\": \"mail\"}}"),
        None => "{\"active\": false}".to_string(),
    };
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        json.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

/// An OAUTHBEARER initial response (base64) for `user` (escaped in the GS2 header).
pub fn oauthbearer(user: &str, token: &str) -> String {
    use base64::Engine;
    let user = user.replace('=', "=3D").replace(',', "=2C");
    let raw = format!("n,a={user},\x01host=localhost\x01port=993\x01auth=Bearer {token}\x01\x01");
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// An XOAUTH2 initial response (base64) for `user`.
pub fn xoauth2(user: &str, token: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}
