//! The support view of an account (`/debug/accounts/<user>`, issue 18) over a real
//! mailgate in front of a real Dovecot, rendered by a real browser.
//!
//! An IMAP client (over TLS from ::1) says `ID ("name" "TestClient<b>" ...)` after login,
//! selects INBOX and fetches; then a POP3 client (over TLS from 127.0.0.1) retrieves and
//! deletes two messages and QUITs, which fires `pop3_deletes_shared`. The JSON view (bearer
//! token) and the HTML view as headless Chromium renders it (the token as the password of
//! the URL's credentials, answering the 401's `Basic` challenge) must show the same facts:
//! the account, every device's description, protocol, network and TLS, the deletion with
//! its count and client, the detections' texts; the client's `<b>` shown as text, never
//! as an element. Also: the 401 challenges, a wrong Basic password, an unknown account,
//! `/debug/detections`, and the 403 without `[admin] token_file`.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::client::Client;
use support::dovecot::Dovecot;
use support::gateway::Gateway;
use support::pop3;
use support::process::{run_bounded, tail};
use support::tls::TestPki;

/// A user name with `@`, which the URL carries percent-encoded.
const JANE: (&str, &str) = ("jane@example.org", "jane-Pass-31");
const JANE_IN_URL: &str = "jane%40example.org";
const TOKEN: &str = "insight-view-token-7c41e9";
/// The `ID` name, with markup that the HTML page must show as text.
const SOFTWARE: &str = "TestClient<b> 1.0";
const CHROMIUM: &str = "/usr/bin/chromium";

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Chromium, or `None` after saying the browser checks are skipped; with CI=true a missing
/// Chromium fails the test (tests/run.sh installs Debian's `chromium`).
fn chromium() -> Option<PathBuf> {
    let path = PathBuf::from(CHROMIUM);
    if path.is_file() {
        return Some(path);
    }
    assert!(!ci(), "CI=true but {CHROMIUM} is missing: tests/run.sh installs Debian's chromium");
    eprintln!("skipped the browser checks: {CHROMIUM} missing (tests/run.sh installs it)");
    None
}

/// mailgate with an IMAP implicit-TLS listener on [::1] (`imaps6`), a POP3 one on
/// 127.0.0.1 (`pop3s`), both to `dovecot` over TLS, and the admin listener; with the token
/// file when `token_file` is given.
fn start_gateway(dir: &Path, pki: &TestPki, dovecot: &Dovecot, token_file: Option<&Path>) -> Gateway {
    let token = token_file.map(|f| format!("token_file = {:?}\n", f.display().to_string())).unwrap_or_default();
    let config = format!(
        r#"[[listener]]
name = "imaps6"
protocol = "imap"
address = "[::1]:0"
tls = "implicit"

[[listener]]
name = "pop3s"
protocol = "pop3"
address = "127.0.0.1:0"
tls = "implicit"

[tls]
certificates = [{{ cert = {cert:?}, key = {key:?} }}]
handshake_timeout = "5s"

[upstream.default]
imap = "127.0.0.1:{imaps}"
pop3 = "127.0.0.1:{pop3s}"
tls = "implicit"
ca_file = {ca:?}
connect_timeout = "3s"
tls_timeout = "3s"
login_timeout = "15s"

[admin]
address = "127.0.0.1:0"
{token}
[shutdown]
grace = "10s"
"#,
        cert = pki.cert.display().to_string(),
        key = pki.key.display().to_string(),
        imaps = dovecot.imaps.port(),
        pop3s = dovecot.pop3s.port(),
        ca = dovecot.ca_pem().display().to_string(),
    );
    Gateway::start(dir, &config)
}

struct Response {
    status: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header_values(&self, name: &str) -> Vec<&str> {
        (self.headers.iter()).filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }
}

/// `GET path` with `headers` (each `Name: value`), one request per connection.
fn get(admin: SocketAddr, path: &str, headers: &[&str]) -> Response {
    let mut tcp = TcpStream::connect_timeout(&admin, Duration::from_secs(10)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head: {response:?}"));
    let mut lines = head.lines();
    let status = lines.next().unwrap().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
        .collect();
    Response { status, headers, body: body.to_string() }
}

fn bearer() -> String {
    format!("Authorization: Bearer {TOKEN}")
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!("Authorization: Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// The JSON view of jane's account.
fn account_json(admin: SocketAddr) -> Value {
    let response = get(admin, &format!("/debug/accounts/{JANE_IN_URL}"), &[&bearer()]);
    assert_eq!(response.status, "HTTP/1.1 200 OK", "{}", response.body);
    assert_eq!(response.header_values("Content-Type"), ["application/json"]);
    serde_json::from_str(&response.body).unwrap_or_else(|e| panic!("{e}: {}", response.body))
}

/// Polls the JSON view (bounded) until `done` holds; returns that view.
fn wait_for_view(gateway: &Gateway, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let admin = gateway.admin();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let response = get(admin, &format!("/debug/accounts/{JANE_IN_URL}"), &[&bearer()]);
        if response.status == "HTTP/1.1 200 OK" {
            let view: Value = serde_json::from_str(&response.body).unwrap();
            if done(&view) {
                return view;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the view never showed {what}; last: {} {}\n--- mailgate log (tail) ---\n{}",
            response.status,
            response.body,
            tail(&gateway.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn devices(view: &Value) -> &Vec<Value> {
    view["devices"].as_array().expect("devices")
}

fn device<'a>(view: &'a Value, protocol: &str) -> Option<&'a Value> {
    devices(view).iter().find(|d| d["protocol"] == protocol)
}

/// The IMAP session: login over TLS from ::1, `ID` after login, SELECT, FETCH, LOGOUT.
fn imap_session(gateway: &Gateway, pki: &TestPki) {
    let addr = gateway.addr("imaps6");
    assert!(addr.is_ipv6() && addr.ip().is_loopback(), "{addr}");
    let mut client = Client::tls(addr, pki.client_config(&[]));
    let greeting = client.line().expect("greeting");
    assert!(greeting.starts_with("* OK"), "{greeting}");
    client.login(JANE);
    let (name, version) = SOFTWARE.split_once(' ').unwrap();
    let id = client.command("i", &format!("ID (\"name\" \"{name}\" \"version\" \"{version}\")"));
    assert!(id.last().unwrap().starts_with("i OK"), "{id:?}");
    let select = client.command("s", "SELECT INBOX");
    assert!(select.iter().any(|l| l == "* 5 EXISTS"), "{select:?}");
    assert!(select.last().unwrap().starts_with("s OK"), "{select:?}");
    client.send(b"f FETCH 1:3 (FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n");
    let fetched = client.responses("f");
    assert_eq!(fetched.len(), 4, "three messages and the tagged OK");
    assert!(fetched.last().unwrap().starts_with(b"f OK"));
    let logout = client.command("z", "LOGOUT");
    assert!(logout.last().unwrap().starts_with("z OK"), "{logout:?}");
    assert!(client.rest().is_empty());
}

/// The POP3 session: USER/PASS over TLS from 127.0.0.1, STAT, RETR and DELE of messages 1
/// and 2, QUIT (which commits the deletions).
fn pop3_session(gateway: &Gateway, pki: &TestPki) {
    let addr = gateway.addr("pop3s");
    assert_eq!(addr.ip(), std::net::IpAddr::from([127, 0, 0, 1]));
    let mut client = Client::tls(addr, pki.client_config(&[]));
    assert!(client.line().expect("greeting").starts_with("+OK"));
    client.send(format!("USER {}\r\n", JANE.0).as_bytes());
    assert!(client.line().unwrap().starts_with("+OK"));
    client.send(format!("PASS {}\r\n", JANE.1).as_bytes());
    let ok = client.line().unwrap();
    assert!(ok.starts_with("+OK"), "{ok}");
    client.send(b"STAT\r\n");
    let stat = client.line().unwrap();
    assert!(stat.starts_with("+OK 5 "), "{stat}");
    for n in [1, 2] {
        client.send(format!("RETR {n}\r\n").as_bytes());
        let message = pop3::response(&mut client);
        assert!(message.starts_with(b"+OK") && message.ends_with(b"\r\n.\r\n"), "RETR {n}");
        client.send(format!("DELE {n}\r\n").as_bytes());
        let dele = client.line().unwrap();
        assert!(dele.starts_with("+OK"), "{dele}");
    }
    client.send(b"QUIT\r\n");
    let quit = client.line().unwrap();
    assert!(quit.starts_with("+OK"), "{quit}");
    assert!(client.rest().is_empty());
}

/// `&lt;` and the other entities a serialised DOM holds, decoded.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some(semi) = rest.find(';').filter(|&s| s <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..semi];
        let decoded = match entity {
            "lt" => Some('<'),
            "gt" => Some('>'),
            "amp" => Some('&'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some('\u{a0}'),
            _ => (entity.strip_prefix("#x").or_else(|| entity.strip_prefix("#X")))
                .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|dec| dec.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The text a fragment of serialised DOM shows: tags out (each as a space), entities
/// decoded, white space collapsed.
fn text_of(html: &str) -> String {
    let mut raw = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match (in_tag, c) {
            (false, '<') => {
                in_tag = true;
                raw.push(' ');
            }
            (true, '>') => in_tag = false,
            (false, c) => raw.push(c),
            (true, _) => {}
        }
    }
    unescape(&raw).split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The serialised element with `id` (its tag name given), through its closing tag.
fn element<'a>(dom: &'a str, tag: &str, id: &str) -> &'a str {
    let open = format!("<{tag} id=\"{id}\"");
    let start = dom.find(&open).unwrap_or_else(|| panic!("no <{tag} id={id}> in the DOM:\n{dom}"));
    let close = format!("</{tag}>");
    let end = dom[start..].find(&close).unwrap_or_else(|| panic!("<{tag} id={id}> not closed")) + start;
    &dom[start..end + close.len()]
}

/// A table's rows as maps from its header cells' texts to the row's cells' texts.
fn table(dom: &str, id: &str) -> Vec<HashMap<String, String>> {
    let table = element(dom, "table", id);
    let mut rows = table.split("<tr").skip(1).map(|row| {
        let (cell_tag, close) = if row.contains("<th") { ("<th", "</th>") } else { ("<td", "</td>") };
        (row.split(cell_tag).skip(1))
            .map(|cell| text_of(&format!("{cell_tag}{}", cell.split(close).next().unwrap_or_default())))
            .collect::<Vec<_>>()
    });
    let header: Vec<String> = rows.next().unwrap_or_else(|| panic!("table {id} without a header row"));
    rows.map(|cells: Vec<String>| {
        assert_eq!(cells.len(), header.len(), "table {id}: {cells:?} under {header:?}");
        header.iter().cloned().zip(cells).collect()
    })
    .collect()
}

/// The DOM headless Chromium renders for `url` (with a fresh profile, loopback only),
/// killed after 60 s.
fn render(chromium: &Path, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=5", "60"])
        .arg(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            // Nothing but the loopback address in the URL: no name resolves.
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .env("HOME", profile.path());
    let run = run_bounded(cmd, Duration::from_secs(70));
    let dom = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(run.status.success() && dom.contains("</html>"), "chromium failed ({}):\n{}", run.status, run.stderr());
    dom
}

fn chromium_version(chromium: &Path) -> String {
    let out = Command::new(chromium).arg("--version").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What the rendered page must show, checked against the JSON view.
fn assert_same_facts(dom: &str, view: &Value) {
    // Markup from a client is text, never an element.
    assert!(!dom.contains("<b>") && !dom.contains("<b "), "the client's <b> became an element:\n{dom}");
    let text = text_of(dom);
    assert!(text.contains(SOFTWARE), "{text}");

    assert_eq!(text_of(element(dom, "h1", "account")), view["account"].as_str().unwrap());
    let generated = text_of(element(dom, "span", "generated"));
    assert!(generated.len() == 20 && generated.ends_with('Z'), "{generated}");

    let rows = table(dom, "devices");
    assert_eq!(rows.len(), devices(view).len(), "{rows:?}");
    for device in devices(view) {
        let client = device["client"].as_str().unwrap();
        let row = rows.iter().find(|r| r["client"] == client).unwrap_or_else(|| panic!("no row {client}: {rows:?}"));
        for (column, key) in
            [("protocol", "protocol"), ("network", "network"), ("TLS", "tls"), ("listener", "listener")]
        {
            assert_eq!(row[column], device[key].as_str().unwrap(), "{client}: {column}");
        }
        assert_eq!(row["software"], device["software"].as_str().unwrap_or(""), "{client}: software");
        for (column, key) in [("sessions", "sessions"), ("deleted", "deleted"), ("messages", "messages")] {
            assert_eq!(row[column], device[key].to_string(), "{client}: {column}");
        }
    }

    let rows = table(dom, "deletions");
    let deletions = view["deletions"].as_array().unwrap();
    assert_eq!(rows.len(), deletions.len(), "{rows:?}");
    for (row, deletion) in rows.iter().zip(deletions) {
        assert_eq!(row["client"], deletion["client"].as_str().unwrap());
        assert_eq!(row["messages"], deletion["count"].to_string());
        assert_eq!(row["when"], deletion["at"].as_str().unwrap());
    }

    let rows = table(dom, "detections");
    let detections = view["detections"].as_array().unwrap();
    assert_eq!(rows.len(), detections.len(), "{rows:?}");
    for (row, detection) in rows.iter().zip(detections) {
        assert_eq!(row["detection"], detection["detection"].as_str().unwrap());
        assert_eq!(row["what it means"], detection["text"].as_str().unwrap());
    }

    let findings = element(dom, "div", "findings");
    let shown: Vec<String> = findings.split("<p").skip(1).map(|p| text_of(&format!("<p{p}"))).collect();
    let expected: Vec<&str> = view["findings"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert_eq!(shown, expected);

    assert_eq!(text_of(element(dom, "td", "messages")), view["syncs"]["messages"].to_string());
    assert_eq!(text_of(element(dom, "td", "bytes")), view["syncs"]["bytes"].to_string());
}

#[test]
fn the_html_view_in_chromium_shows_the_facts_of_the_json_view() {
    let chromium = chromium();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let dovecot = Dovecot::start(&[JANE]);
    dovecot.fill(JANE.0, 5, 18);
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let gateway = start_gateway(dir.path(), &pki, &dovecot, Some(&token_file));
    let admin = gateway.admin();

    // Before any session the account is not known; a token is needed to learn even that.
    assert_eq!(get(admin, &format!("/debug/accounts/{JANE_IN_URL}"), &[&bearer()]).status, "HTTP/1.1 404 Not Found");

    imap_session(&gateway, &pki);
    let software = SOFTWARE;
    wait_for_view(&gateway, "the IMAP session's end", |view| {
        device(view, "imap").is_some_and(|d| d["software"] == software && d["connected"] == false)
    });
    pop3_session(&gateway, &pki);
    let view = wait_for_view(&gateway, "the POP3 deletions and the detection", |view| {
        let fired =
            view["detections"].as_array().is_some_and(|d| d.iter().any(|d| d["detection"] == "pop3_deletes_shared"));
        let ended = device(view, "pop3").is_some_and(|d| d["connected"] == false);
        fired && ended && !view["deletions"].as_array().unwrap().is_empty()
    });
    println!("JSON view:\n{}", serde_json::to_string_pretty(&view).unwrap());

    // The facts, from the JSON.
    assert_eq!(view["account"], JANE.0);
    assert_eq!(devices(&view).len(), 2, "{view:#}");
    let imap = device(&view, "imap").unwrap();
    assert_eq!(imap["software"], SOFTWARE);
    assert_eq!(imap["network"], "::/48");
    assert_eq!(imap["listener"], "imaps6");
    assert_eq!(imap["client"], format!("IMAP {SOFTWARE} from ::/48"));
    assert_eq!(imap["sessions"], 1);
    assert_eq!(imap["deleted"], 0);
    let pop3 = device(&view, "pop3").unwrap();
    assert_eq!(pop3["network"], "127.0.0.0/24");
    assert_eq!(pop3["client"], "POP3 client from 127.0.0.0/24 (listener pop3s)");
    assert!(pop3.get("software").is_none(), "{pop3}");
    assert_eq!(pop3["deleted"], 2);
    assert_eq!(pop3["messages"], 2);
    for device in devices(&view) {
        let tls = device["tls"].as_str().unwrap();
        assert!(tls.starts_with("TLSv1."), "{device}");
        assert_eq!(device["plaintext_sessions"], 0);
    }
    let deletions = view["deletions"].as_array().unwrap();
    assert_eq!(deletions.len(), 1, "{deletions:?}");
    assert_eq!(deletions[0]["count"], 2);
    assert_eq!(deletions[0]["client"], pop3["client"]);
    let detections = view["detections"].as_array().unwrap();
    let shared = detections.iter().find(|d| d["detection"] == "pop3_deletes_shared").unwrap();
    let text = shared["text"].as_str().unwrap();
    assert!(
        text.contains(pop3["client"].as_str().unwrap()) && text.contains(imap["client"].as_str().unwrap()),
        "{text}"
    );
    assert!(detections.iter().all(|d| d["detection"] != "plaintext"), "{detections:?}");
    assert!(view["findings"].as_array().unwrap().iter().any(|f| f.as_str().unwrap().ends_with(text)));

    // /debug/detections lists it with the account.
    let response = get(admin, "/debug/detections", &[&bearer()]);
    assert_eq!(response.status, "HTTP/1.1 200 OK");
    let recent: Value = serde_json::from_str(&response.body).unwrap();
    assert!(
        recent
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["account"] == JANE.0 && d["detection"] == "pop3_deletes_shared" && d["text"] == text),
        "{recent:#}"
    );

    // Without the token: 401 with both challenges, and nothing of the account.
    let path = format!("/debug/accounts/{JANE_IN_URL}?format=html");
    let response = get(admin, &path, &[]);
    assert_eq!(response.status, "HTTP/1.1 401 Unauthorized");
    let challenges = response.header_values("WWW-Authenticate");
    assert!(challenges.contains(&"Bearer realm=\"mailgate-admin\""), "{challenges:?}");
    assert!(challenges.contains(&"Basic realm=\"mailgate-admin\""), "{challenges:?}");
    assert!(!response.body.contains("jane") && !response.body.contains("TestClient"), "{}", response.body);
    // A wrong Basic password, a wrong bearer token, the token as a Basic user name.
    for wrong in [basic("admin", "not-the-token"), "Authorization: Bearer not-the-token".into(), basic(TOKEN, "x")] {
        let response = get(admin, &path, &[&wrong]);
        assert_eq!(response.status, "HTTP/1.1 401 Unauthorized", "{wrong}");
        assert!(response.header_values("WWW-Authenticate").contains(&"Basic realm=\"mailgate-admin\""));
        assert!(!response.body.contains("jane"), "{}", response.body);
    }
    assert_eq!(get(admin, "/debug/detections", &[]).status, "HTTP/1.1 401 Unauthorized");
    // The right Basic password (any user name): the HTML; JSON unless asked otherwise.
    let response = get(admin, &path, &[&basic("support", TOKEN)]);
    assert_eq!(response.status, "HTTP/1.1 200 OK");
    assert_eq!(response.header_values("Content-Type"), ["text/html; charset=utf-8"]);
    assert!(response.body.contains("TestClient&lt;b&gt; 1.0"), "{}", response.body);
    // Nothing cached, nothing loaded or run.
    assert_eq!(response.header_values("Cache-Control"), ["no-store"]);
    let policy = response.header_values("Content-Security-Policy");
    assert!(policy.len() == 1 && policy[0].starts_with("default-src 'none';"), "{policy:?}");
    assert!(!response.body.contains("<script") && !response.body.contains("src="), "{}", response.body);
    let json = get(admin, &format!("/debug/accounts/{JANE_IN_URL}"), &[&basic("", TOKEN)]);
    assert_eq!(json.header_values("Content-Type"), ["application/json"]);
    let html = get(admin, &format!("/debug/accounts/{JANE_IN_URL}"), &[&bearer(), "Accept: text/html,*/*;q=0.8"]);
    assert_eq!(html.header_values("Content-Type"), ["text/html; charset=utf-8"]);
    // An unknown account, a name not percent-encoded, a broken escape.
    assert_eq!(get(admin, "/debug/accounts/nobody%40example.org", &[&bearer()]).status, "HTTP/1.1 404 Not Found");
    assert_eq!(get(admin, "/debug/accounts/jane@example.org", &[&bearer()]).status, "HTTP/1.1 200 OK");
    assert_eq!(get(admin, "/debug/accounts/jane%4", &[&bearer()]).status, "HTTP/1.1 400 Bad Request");

    // The same facts in a real browser: headless Chromium answering the Basic challenge
    // with the URL's credentials, once asked for HTML, once by its own Accept header.
    if let Some(chromium) = &chromium {
        println!("browser: {}", chromium_version(chromium));
        let base = format!("http://support:{TOKEN}@{admin}/debug/accounts/{JANE_IN_URL}");
        for url in [format!("{base}?format=html"), base.clone()] {
            let dom = render(chromium, &url);
            let view = account_json(admin);
            assert_same_facts(&dom, &view);
            let text = text_of(&dom);
            for needle in [JANE.0, "::/48", "127.0.0.0/24", "pop3_deletes_shared"] {
                assert!(text.contains(needle), "{needle:?} not shown:\n{dom}");
            }
        }
    }

    let log = gateway.log();
    assert!(!log.contains(TOKEN), "the token in the log");
    assert!(!log.contains(JANE.1), "a password in the log");
}

#[test]
fn without_a_token_file_account_views_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let dovecot = Dovecot::start(&[JANE]);
    dovecot.fill(JANE.0, 5, 18);
    let gateway = start_gateway(dir.path(), &pki, &dovecot, None);
    pop3_session(&gateway, &pki);
    let admin = gateway.admin();
    let pages = [
        format!("/debug/accounts/{JANE_IN_URL}"),
        format!("/debug/accounts/{JANE_IN_URL}?format=html"),
        "/debug/detections".to_string(),
        "/debug/quota".to_string(),
    ];
    for path in pages {
        for headers in [vec![], vec!["Authorization: Bearer anything".to_string()]] {
            let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
            let response = get(admin, &path, &headers);
            assert_eq!(response.status, "HTTP/1.1 403 Forbidden", "{path}");
            assert!(!response.body.contains("jane") && !response.body.contains("127.0.0"), "{}", response.body);
        }
    }
}
