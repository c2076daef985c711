//! mailgate's metrics as a real Prometheus sees them: `promtool check metrics` accepts the
//! exposition, a Prometheus server scraping the admin listener answers PromQL queries with
//! the expected series after known traffic, and every expression of the Grafana dashboard
//! names only metrics that mailgate exports.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::client::Client;
use support::setup::*;

fn http_get(addr: SocketAddr, path: &str) -> String {
    try_http_get(addr, path).expect("HTTP GET")
}

/// The body of a GET, or the error (a server still starting refuses the connection).
fn try_http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    let _ = tcp.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).to_string();
    Ok(response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default())
}

/// Known traffic: three logins with cache hits on the second and third, one plaintext login
/// refused on the STARTTLS listener.
fn traffic(setup: &Setup) {
    setup.dovecot.fill(ALICE.0, 4, 2);
    for _ in 0..3 {
        let mut client = setup.login(ALICE);
        client.command("s", "SELECT INBOX");
        client.command("f", "UID FETCH 1:4 (UID BODY.PEEK[HEADER])");
        client.send(b"z LOGOUT\r\n");
        let _ = client.rest();
    }
    let mut plain = Client::plain(setup.addr("imap"));
    plain.line().unwrap();
    assert!(plain.command("a", "LOGIN alice secret")[0].contains("PRIVACYREQUIRED"));
}

#[test]
fn promtool_accepts_the_exposition() {
    let setup = Setup::start();
    traffic(&setup);
    let metrics = http_get(setup.gateway.admin(), "/metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (installed by tests/run.sh)");
    promtool.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Prometheus server scraping `target` every second, with the scrape job of
/// deploy/prometheus.yml (its target rewritten).
fn prometheus(target: SocketAddr) -> Prometheus {
    prometheus_with_token(target, None)
}

/// Like [`prometheus`], with the job's commented-out `authorization` block in force and
/// its `credentials_file` holding `token`.
fn prometheus_with_token(target: SocketAddr, token: Option<&str>) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus.yml")).unwrap();
    let mut config =
        shipped.replace("mailgate:9090", &target.to_string()).replace("scrape_interval: 15s", "scrape_interval: 1s");
    if let Some(token) = token {
        let file = dir.path().join("mailgate-admin-token");
        std::fs::write(&file, format!("{token}\n")).unwrap();
        let block = "    # authorization:\n    #   type: Bearer\n    #   credentials_file: /etc/prometheus/mailgate-admin-token\n";
        assert!(config.contains(block), "deploy/prometheus.yml has no authorization block to enable");
        let enabled = format!("    authorization:\n      type: Bearer\n      credentials_file: {}\n", file.display());
        config = config.replace(block, &enabled);
    }
    assert!(config.contains(&target.to_string()), "deploy/prometheus.yml has no mailgate:9090 target");
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/mailgate-alerts.yml");
    std::fs::copy(rules, dir.path().join("mailgate-alerts.yml")).unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (installed by tests/run.sh)");
    Prometheus { child, addr, _dir: dir }
}

/// The single value of an instant query, once Prometheus has it (bounded wait).
fn query(prometheus: &Prometheus, promql: &str, want: f64) -> f64 {
    let encoded: String = promql
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"_.-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        // Prometheus may still be starting (connection refused): wait and ask again.
        last =
            try_http_get(prometheus.addr, &format!("/api/v1/query?query={encoded}")).unwrap_or_else(|e| e.to_string());
        if let Ok(json) = serde_json::from_str::<serde_json::Value>(&last) {
            if let Some(value) = json["data"]["result"][0]["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()) {
                if value == want {
                    return value;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("{promql} never became {want}; last answer: {last}");
}

#[test]
fn a_real_prometheus_sees_the_traffic() {
    let setup = Setup::start();
    let server = prometheus(setup.gateway.admin());
    traffic(&setup);
    query(&server, r#"sum(mailgate_logins_total{result="ok"})"#, 3.0);
    query(&server, r#"sum(mailgate_plaintext_auth_refused_total{listener="imap"})"#, 1.0);
    query(&server, r#"sum(mailgate_cache_requests_total{kind="header",result="hit"})"#, 8.0);
    query(&server, r#"sum(mailgate_commands_total{command="uid_fetch"})"#, 3.0);
    query(&server, "count(mailgate_build_info)", 1.0);
}

#[test]
fn a_real_prometheus_scrapes_protected_metrics_with_the_token_file_of_the_shipped_job() {
    let setup = Setup::start_edited("", "", |config, dir| {
        std::fs::write(dir.join("admin-token"), "scrape-token-51f2\n").unwrap();
        let file = dir.join("admin-token").display().to_string();
        config.replace("[admin]\n", &format!("[admin]\ntoken_file = {file:?}\nprotect_metrics = true\n"))
    });
    let admin = setup.gateway.admin();
    assert!(try_http_get(admin, "/metrics").unwrap().contains("bearer token required"));
    let wrong = prometheus_with_token(admin, Some("not-the-token"));
    query(&wrong, r#"up{job="mailgate"}"#, 0.0);
    drop(wrong);
    let right = prometheus_with_token(admin, Some("scrape-token-51f2"));
    query(&right, r#"up{job="mailgate"}"#, 1.0);
    query(&right, "count(mailgate_build_info)", 1.0);
}

/// Metric family names in a PromQL expression (histogram series suffixes removed).
fn names_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("mailgate_") {
        let token: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[i + token.len()..];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(token.clone(), |t, s| t.strip_suffix(s).map(String::from).unwrap_or(t));
        names.push(family);
    }
    names
}

fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_expressions_name_only_exported_metrics() {
    // Every family the dashboard shows must be exported: the fleet ones only exist with
    // limits in Redis, an upstream pool and the shared cache tier, so this gateway has all.
    let setup = Setup::start();
    let redis = support::redis::Redis::start();
    let port = setup.dovecot.imaps.port();
    let text = std::fs::read_to_string(&setup.gateway.config_path).unwrap().replace(
        &format!("imap = \"127.0.0.1:{port}\""),
        &format!("imap = [\"127.0.0.1:{port}\", \"localhost:{port}\"]"),
    );
    let secret = setup.dir.path().join("cache-secret");
    std::fs::write(&secret, "a secret of thirty-two bytes or more for the tier").unwrap();
    let fleet = format!(
        "{text}\n[limits]\nstore = \"redis\"\n[limits.redis]\nurl = \"{}\"\n\n[cache.shared]\nenabled = true\nurl = \"{}\"\nsecret_file = {:?}\n",
        redis.url(),
        redis.url(),
        secret.display().to_string()
    );
    let gateway = support::gateway::Gateway::start(setup.dir.path(), &fleet);
    let Setup { dir, pki, dovecot, gateway: first } = setup;
    drop(first);
    let setup = Setup { dir, pki, dovecot, gateway };
    traffic(&setup);
    let metrics = http_get(setup.gateway.admin(), "/metrics");
    let exported: Vec<&str> =
        metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
    let mut checked = 0;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/grafana")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let mut all = Vec::new();
            exprs(&dashboard, &mut all);
            assert!(!all.is_empty(), "{} has no expressions", path.display());
            for expr in all {
                for name in names_in(&expr) {
                    assert!(exported.contains(&name.as_str()), "{}: {name} is not exported ({expr})", path.display());
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} metric references found");
}

#[test]
fn the_alert_rules_load_and_fire_as_documented() {
    // `promtool test rules` feeds the rules made-up series (deploy/mailgate-alerts.test.yml)
    // and checks which alerts fire when, with their texts.
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
    for args in [["check", "rules", "mailgate-alerts.yml"], ["test", "rules", "mailgate-alerts.test.yml"]] {
        let out = Command::new("promtool").args(args).current_dir(deploy).output().expect("promtool (tests/run.sh)");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        assert!(text.contains("SUCCESS"), "{text}");
    }
}
