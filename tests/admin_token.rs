//! The admin listener's bearer token, over real HTTP requests to a real mailgate process:
//! `/debug/top-accounts` (which names accounts) answers 401 with a `Bearer` challenge
//! without the token or with a wrong one, and the account list with it; a new token in the
//! file takes over on reload; `protect_metrics` puts `/metrics` behind the token too; the
//! probes stay open and the token never reaches the log.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::gateway::Gateway;
use support::setup::*;
use support::tls::TestPki;

const FIRST: &str = "first-admin-token-4d1c";
const SECOND: &str = "second-admin-token-9e07";

/// The status line, the `WWW-Authenticate` value if any, and the body of `GET path`.
fn get(admin: SocketAddr, path: &str, token: Option<&str>) -> (String, Option<String>, String) {
    let mut tcp = TcpStream::connect(admin).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let authorization = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{authorization}\r\n").as_bytes()).unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let challenge = head.lines().find_map(|l| l.strip_prefix("WWW-Authenticate: ")).map(str::to_string);
    (head.lines().next().unwrap().to_string(), challenge, body.to_string())
}

/// Replaces the token file's content as a Secret update or `mv` would (a new inode).
fn write_token(file: &Path, token: &str) {
    let next = file.with_extension("new");
    std::fs::write(&next, format!("{token}\n")).unwrap();
    std::fs::rename(&next, file).unwrap();
}

fn reload(gateway: &Gateway, reloads: usize) {
    assert!(Command::new("kill").arg("-HUP").arg(gateway.pid().to_string()).status().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gateway.log().matches("configuration reloaded").count() < reloads {
        assert!(std::time::Instant::now() < deadline, "no reload:\n{}", gateway.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn debug_pages_need_the_bearer_token_from_the_file_and_a_new_token_takes_over_on_reload() {
    let setup = Setup::start_edited("", "", |config, dir| {
        let token_file = dir.join("admin-token");
        write_token(&token_file, FIRST);
        config.replace("[admin]\n", &format!("[admin]\ntoken_file = {:?}\n", token_file.display().to_string()))
    });
    let token_file = setup.dir.path().join("admin-token");
    let admin = setup.gateway.admin();

    // A session, so that the account list names someone.
    let mut client = setup.login(BOB);
    client.command("z", "LOGOUT");
    assert!(setup.gateway.wait_for_log("sync cost", Duration::from_secs(5)));

    let (status, challenge, body) = get(admin, "/debug/top-accounts", None);
    assert_eq!(status, "HTTP/1.1 401 Unauthorized");
    assert_eq!(challenge.as_deref(), Some("Bearer realm=\"mailgate-admin\""));
    assert!(!body.contains("bob"), "{body}");
    let (status, challenge, body) = get(admin, "/debug/top-accounts", Some("not-the-token"));
    assert_eq!(status, "HTTP/1.1 401 Unauthorized");
    assert_eq!(challenge.as_deref(), Some("Bearer realm=\"mailgate-admin\", error=\"invalid_token\""));
    assert!(!body.contains("bob"), "{body}");
    // A prefix of the token is not the token.
    assert_eq!(get(admin, "/debug/top-accounts", Some(&FIRST[..10])).0, "HTTP/1.1 401 Unauthorized");
    let (status, _, body) = get(admin, "/debug/top-accounts", Some(FIRST));
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("\"bob\""), "{body}");
    // The quota report names accounts too.
    assert_eq!(get(admin, "/debug/quota", None).0, "HTTP/1.1 401 Unauthorized");
    assert_eq!(get(admin, "/debug/quota", Some(FIRST)).0, "HTTP/1.1 200 OK");
    // Metrics (not protected by default) and the probes stay open.
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(get(admin, path, None).0, "HTTP/1.1 200 OK", "{path}");
    }

    // A new token in the file, then a reload: the old one no longer opens anything.
    write_token(&token_file, SECOND);
    reload(&setup.gateway, 1);
    assert_eq!(get(admin, "/debug/top-accounts", Some(FIRST)).0, "HTTP/1.1 401 Unauthorized");
    assert_eq!(get(admin, "/debug/top-accounts", Some(SECOND)).0, "HTTP/1.1 200 OK");

    // protect_metrics, applied by a reload too.
    let config = std::fs::read_to_string(&setup.gateway.config_path).unwrap();
    let protected = config.replace("[admin]\n", "[admin]\nprotect_metrics = true\n");
    std::fs::write(&setup.gateway.config_path, protected).unwrap();
    reload(&setup.gateway, 2);
    let (status, challenge, body) = get(admin, "/metrics", None);
    assert_eq!((status.as_str(), challenge.is_some()), ("HTTP/1.1 401 Unauthorized", true));
    assert!(!body.contains("mailgate_"), "{body}");
    let (status, _, body) = get(admin, "/metrics", Some(SECOND));
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("mailgate_logins_total"), "{body}");
    assert_eq!(get(admin, "/healthz", None).0, "HTTP/1.1 200 OK");

    let log = setup.gateway.log();
    assert!(!log.contains(FIRST) && !log.contains(SECOND), "a token in the log");
    assert!(log.contains("admin request without the right bearer token"), "refusals are logged");
}

#[test]
fn protect_metrics_without_a_token_file_is_refused_by_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let config = gateway_config_with(&pki, Some("127.0.0.1:1"), None, "plaintext", None, "", "")
        .replace("[admin]\n", "[admin]\nprotect_metrics = true\n");
    let path = dir.path().join("mailgate.toml");
    std::fs::write(&path, config).unwrap();
    let output =
        Command::new(env!("CARGO_BIN_EXE_mailgate")).args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(errors.contains("admin.protect_metrics: needs admin.token_file"), "{errors}");
}
