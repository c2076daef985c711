//! The admin HTTP listener: `/metrics` (Prometheus text format), `/healthz` (the process is
//! alive), `/readyz` (listeners bound, every upstream reachable), and behind a bearer token
//! once one is configured (see [`crate::admin_auth`]): `/debug/top-accounts`,
//! `/debug/plaintext-clients` (JSON; `.csv` for a spreadsheet), `/debug/client-software`,
//! `/debug/quota`; and only then (they exist for support staff): `/debug/accounts/<user>`
//! (an account's support view, JSON or HTML, see [`crate::insight::view`]) and
//! `/debug/detections`. A deliberately small
//! HTTP/1.1 server: GET only, one request per connection, the request head bounded in size
//! and time, so that a scraper or a prober costs nothing and nobody can hold it open.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub use crate::admin_auth::AdminAuth;
use crate::metrics::Metrics;
use crate::upstream::Upstream;

pub(crate) const MAX_HEAD: usize = 8 << 10;
const TIMEOUT: Duration = Duration::from_secs(5);

pub struct Admin {
    pub metrics: Arc<Metrics>,
    /// Probed by `/readyz`; replaced when a reload changes them.
    pub upstreams: std::sync::RwLock<Vec<Arc<Upstream>>>,
    /// The shared limits store when it fails closed: while it cannot answer, every client
    /// is refused, so the instance is not ready.
    pub required_store: Option<Arc<crate::limits::fleet::Fleet>>,
    /// The bearer token `/debug/*` (and optionally `/metrics`) require.
    pub auth: crate::admin_auth::AdminAuth,
    /// Per-account support histories: `/debug/accounts/<user>`, `/debug/detections`.
    pub insight: Arc<crate::insight::Insight>,
    /// The canonical user name a support view is asked by.
    pub limits: Arc<crate::limits::Limits>,
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(TIMEOUT, answer(tcp, &admin)).await;
        });
    }
}

/// The fullest accounts `/debug/quota` lists: the ones support should call first.
const QUOTA_ROWS: usize = 100;

async fn answer(mut tcp: TcpStream, admin: &Admin) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head_complete(&head) {
        let n = tcp.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let (method, path) = request_line(&head);
    if let Err(denied) = admin.auth.check(path, &head) {
        return unauthorized(&mut tcp, path, denied).await;
    }
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", admin.metrics.render().await),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/debug/top-accounts") => {
            let top = admin.metrics.top_accounts.top(admin.metrics.top_accounts_shown, std::time::Instant::now());
            ("200 OK", "application/json", serde_json::to_string_pretty(&top).unwrap_or_default() + "\n")
        }
        ("GET", "/debug/plaintext-clients") => {
            let rows = admin.metrics.clients.plaintext.rows();
            ("200 OK", "application/json", serde_json::to_string_pretty(&rows).unwrap_or_default() + "\n")
        }
        ("GET", "/debug/plaintext-clients.csv") => ("200 OK", "text/csv", admin.metrics.clients.plaintext.csv()),
        ("GET", "/debug/client-software") => {
            let rows = admin.metrics.clients.census.rows();
            ("200 OK", "application/json", serde_json::to_string_pretty(&rows).unwrap_or_default() + "\n")
        }
        ("GET", "/debug/detections") if !admin.auth.protects(path) => names_users_unprotected(),
        ("GET", "/debug/detections") => {
            let recent = admin.insight.recent(DETECTIONS_SHOWN).await;
            ("200 OK", "application/json", serde_json::to_string_pretty(&recent).unwrap_or_default() + "\n")
        }
        ("GET", path) if path.starts_with("/debug/accounts/") => account_page(admin, path, &head).await,
        ("GET", "/debug/quota") if !admin.auth.protects(path) => names_users_unprotected(),
        ("GET", "/debug/quota") => {
            let rows = admin.metrics.quota.fullest(QUOTA_ROWS);
            ("200 OK", "application/json", serde_json::to_string_pretty(&rows).unwrap_or_default() + "\n")
        }
        ("GET", "/readyz") => match unreachable_upstream(admin).await {
            Some(name) => ("503 Service Unavailable", "text/plain", format!("upstream {name} unreachable\n")),
            None => match &admin.required_store {
                Some(store) if !store.ping().await => (
                    "503 Service Unavailable",
                    "text/plain",
                    "limits store (Redis) unreachable and on_error = closed\n".to_string(),
                ),
                _ => ("200 OK", "text/plain", "ready\n".to_string()),
            },
        },
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n{body}",
        body.len(),
        page_headers(path, content_type)
    );
    tcp.write_all(response.as_bytes()).await?;
    tcp.shutdown().await
}

/// Headers for what a browser may show: the debug pages name accounts, so no cache keeps
/// them; an HTML page may load nothing and run nothing (its own inline style aside), so
/// that even a client string that escaped the escaping could not act.
fn page_headers(path: &str, content_type: &str) -> &'static str {
    match (path.starts_with("/debug/"), content_type.starts_with("text/html")) {
        (true, true) => {
            "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
             Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; form-action 'none'; frame-ancestors 'none'\r\n"
        }
        (true, false) => "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n",
        (false, _) => "",
    }
}

/// 401 with the challenge of RFC 6750 (`invalid_token` when a token was given). Logged
/// within the log budget: anyone who reaches the port can cause it.
async fn unauthorized(tcp: &mut TcpStream, path: &str, denied: crate::admin_auth::Denied) -> std::io::Result<()> {
    use crate::admin_auth::Denied;
    let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    crate::log_budget::warn_limited!(%peer, path, ?denied, "admin request without the right bearer token");
    let challenge = match denied {
        Denied::Missing => "Bearer realm=\"mailgate-admin\"",
        Denied::Wrong => "Bearer realm=\"mailgate-admin\", error=\"invalid_token\"",
    };
    // A browser asks for the token (as a password) after a Basic challenge.
    let body = "bearer token required\n";
    let response = format!(
        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: {challenge}\r\nWWW-Authenticate: Basic realm=\"mailgate-admin\"\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(response.as_bytes()).await?;
    tcp.shutdown().await
}

/// Detections `/debug/detections` lists, newest first.
const DETECTIONS_SHOWN: usize = 200;

/// `/debug/accounts/<user>`: the support view of one account, JSON, or HTML for a browser
/// (`?format=html`, or an `Accept` header that prefers `text/html`). Account names are
/// shown only behind the admin token: without `[admin] token_file` the page is refused.
async fn account_page(admin: &Admin, path: &str, head: &[u8]) -> (&'static str, &'static str, String) {
    if !admin.auth.protects(path) {
        return names_users_unprotected();
    }
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let Some(user) = percent_decoded(&path["/debug/accounts/".len()..]).filter(|u| !u.is_empty() && u.len() <= 512)
    else {
        return ("400 Bad Request", "text/plain", "/debug/accounts/<user>: a user name, percent-encoded\n".into());
    };
    let html = match query.split('&').find_map(|pair| pair.strip_prefix("format=")) {
        Some(format) => format == "html",
        None => prefers_html(head),
    };
    let account = admin.limits.canonical(&user);
    let history = match admin.insight.history(&account).await {
        Ok(Some(history)) => history,
        Ok(None) => {
            let text = format!("no activity of {account} is known (histories last insight.keep_for)\n");
            return ("404 Not Found", "text/plain; charset=utf-8", text);
        }
        Err(_) => {
            let text = "the history store (Redis) does not answer; try again\n".to_string();
            return ("503 Service Unavailable", "text/plain", text);
        }
    };
    let now = crate::units::unix_now();
    let view = crate::insight::view::AccountView::new(&account, &history, now, admin.insight.keep_for().as_secs());
    if html {
        ("200 OK", "text/html; charset=utf-8", view.html())
    } else {
        ("200 OK", "application/json", serde_json::to_string_pretty(&view).unwrap_or_default() + "\n")
    }
}

/// The answer of a page that names users (account histories, detections) while the admin
/// listener has no token: refused, since anyone reaching the port would read them.
fn names_users_unprotected() -> (&'static str, &'static str, String) {
    let text = "account histories name users: set [admin] token_file to see them\n";
    ("403 Forbidden", "text/plain", text.to_string())
}

/// `%XX` escapes decoded (`+` stays: it is a character of mail addresses); `None` when
/// an escape is broken or the result is not UTF-8.
fn percent_decoded(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Whether the request's `Accept` header names `text/html` (a browser's does, first).
fn prefers_html(head: &[u8]) -> bool {
    let html = |value: &[u8]| value.windows(9).any(|w| w.eq_ignore_ascii_case(b"text/html"));
    crate::admin_auth::header_values(head, b"accept").any(html)
}

/// Whether the request head has arrived (an empty line ends it).
pub(crate) fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

/// The method and path of a request head's first line (empty when missing).
pub(crate) fn request_line(head: &[u8]) -> (&str, &str) {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut words = std::str::from_utf8(line).unwrap_or("").split_whitespace();
    (words.next().unwrap_or(""), words.next().unwrap_or(""))
}

/// The first upstream that cannot take sessions, all checked at once (each within a
/// second: see [`Upstream::ready`]).
async fn unreachable_upstream(admin: &Admin) -> Option<String> {
    let upstreams = admin.upstreams.read().unwrap_or_else(|p| p.into_inner()).clone();
    let mut checks = tokio::task::JoinSet::new();
    for upstream in upstreams {
        checks.spawn(async move { (upstream.ready().await, upstream.identity()) });
    }
    while let Some(done) = checks.join_next().await {
        if let Ok((false, identity)) = done {
            return Some(identity);
        }
    }
    None
}
