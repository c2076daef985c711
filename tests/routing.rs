//! Routing with two real Dovecot instances: users of two domains land on their own
//! backend, a pool of both fails over when one stops, and the HTTP lookup service routes
//! users (by name or by host:port) with its outage handled as configured.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::client::Client;
use support::dovecot::Dovecot;
use support::gateway::Gateway;
use support::tls::TestPki;

const BOB: (&str, &str) = ("bob@a.test", "bob-pw");
const CAROL: (&str, &str) = ("carol@b.test", "carol-pw");
/// On both backends (a pool's hosts serve the same users).
const SHARED: (&str, &str) = ("shared", "shared-pw");

struct Fleet {
    dir: tempfile::TempDir,
    pki: TestPki,
    a: Dovecot,
    b: Dovecot,
    gateway: Gateway,
}

/// Dovecot A (bob, shared) and B (carol, shared), test certificates, and a file trusting
/// both backends' CAs.
fn backends() -> (tempfile::TempDir, TestPki, Dovecot, Dovecot) {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let a = Dovecot::start(&[BOB, SHARED]);
    let b = Dovecot::start(&[CAROL, SHARED]);
    let bundle = [std::fs::read(a.ca_pem()).unwrap(), std::fs::read(b.ca_pem()).unwrap()].concat();
    std::fs::write(bundle_in(&dir), bundle).unwrap();
    (dir, pki, a, b)
}

fn bundle_in(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("backends-ca.pem")
}

/// The backends, and mailgate with upstreams `a`, `b` and `pool` (both), `default` as
/// the listeners' upstream, and `extra` appended.
fn fleet(default: &str, extra: &str) -> Fleet {
    let (dir, pki, a, b) = backends();
    let gateway = Gateway::start(dir.path(), &config(&pki, &a, &b, &bundle_in(&dir), default, extra));
    Fleet { dir, pki, a, b, gateway }
}

fn config(pki: &TestPki, a: &Dovecot, b: &Dovecot, bundle: &std::path::Path, default: &str, extra: &str) -> String {
    let upstream = |name: &str, imap: String, pop3: String| {
        format!(
            "[upstream.{name}]\nimap = {imap}\npop3 = {pop3}\ntls = \"implicit\"\nca_file = {:?}\nconnect_timeout = \"2s\"\nhealth_check_interval = \"500ms\"\n\n",
            bundle.display().to_string()
        )
    };
    let quoted = |addr: SocketAddr| format!("\"{addr}\"");
    let mut config = String::new();
    for (name, protocol) in [("imaps", "imap"), ("pop3s", "pop3")] {
        config.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\naddress = \"127.0.0.1:0\"\ntls = \"implicit\"\nupstream = \"{default}\"\n\n"
        ));
    }
    config.push_str(&format!(
        "[tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n\n[admin]\naddress = \"127.0.0.1:0\"\n\n",
        pki.cert.display().to_string(),
        pki.key.display().to_string()
    ));
    config.push_str(&upstream("a", quoted(a.imaps), quoted(a.pop3s)));
    config.push_str(&upstream("b", quoted(b.imaps), quoted(b.pop3s)));
    config.push_str(&upstream(
        "pool",
        format!("[{}, {}]", quoted(a.imaps), quoted(b.imaps)),
        format!("[{}, {}]", quoted(a.pop3s), quoted(b.pop3s)),
    ));
    config.push_str(extra);
    config
}

impl Fleet {
    fn imap_login(&self, (user, password): (&str, &str)) -> (String, Client) {
        let mut client = Client::tls(self.gateway.addr("imaps"), self.pki.client_config(&[]));
        assert!(client.line().unwrap().starts_with("* OK"));
        let answer = client.command("a", &format!("LOGIN \"{user}\" \"{password}\"")).pop().unwrap();
        (answer, client)
    }

    fn pop3_login(&self, (user, password): (&str, &str)) -> String {
        let mut client = Client::tls(self.gateway.addr("pop3s"), self.pki.client_config(&[]));
        assert!(client.line().unwrap().starts_with("+OK"));
        client.send(format!("USER {user}\r\nPASS {password}\r\n").as_bytes());
        client.line().unwrap();
        client.line().unwrap()
    }

    fn metric(&self, series: &str) -> u64 {
        let mut tcp = TcpStream::connect(self.gateway.admin()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        let _ = tcp.read_to_string(&mut text);
        let line = text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("no {series}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }
}

/// How many logins of `user` (by `service`) a Dovecot has logged.
fn logins(dovecot: &Dovecot, service: &str, user: &str) -> usize {
    dovecot.log().matches(&format!("{service}: Info: Login: user=<{user}>")).count()
}

/// Waits (bounded) for the count to reach `n`: Dovecot writes its log asynchronously.
fn wait_logins(dovecot: &Dovecot, service: &str, user: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while logins(dovecot, service, user) < n {
        assert!(Instant::now() < deadline, "{n} {service} logins of {user} expected:\n{}", dovecot.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn users_of_two_domains_land_on_their_own_backend_and_a_user_rule_wins() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("routes.toml");
    std::fs::write(&rules, "[domains]\n\"a.test\" = \"a\"\n\"B.TEST\" = \"b\"\n\n[users]\n\"Shared\" = \"b\"\n")
        .unwrap();
    let fleet = fleet("a", &format!("[routing]\nrules_file = {:?}\n", rules.display().to_string()));
    assert!(fleet.imap_login(BOB).0.starts_with("a OK"));
    assert!(fleet.imap_login(CAROL).0.starts_with("a OK"));
    assert_eq!(fleet.pop3_login(CAROL), "+OK Logged in.");
    assert!(fleet.imap_login(SHARED).0.starts_with("a OK"));
    wait_logins(&fleet.a, "imap-login", "bob@a.test", 1);
    wait_logins(&fleet.b, "imap-login", "carol@b.test", 1);
    wait_logins(&fleet.b, "pop3-login", "carol@b.test", 1);
    wait_logins(&fleet.b, "imap-login", "shared", 1);
    assert_eq!(logins(&fleet.a, "imap-login", "shared"), 0, "the user rule beats the default");
    assert_eq!(fleet.metric("mailgate_routes_total{protocol=\"imap\",source=\"domain_rule\"}"), 2);
    assert_eq!(fleet.metric("mailgate_routes_total{protocol=\"imap\",source=\"user_rule\"}"), 1);

    // The rules file is read again on SIGHUP: shared moves to A for new sessions.
    std::fs::write(&rules, "[domains]\n\"a.test\" = \"a\"\n\"b.test\" = \"b\"\n\n[users]\n\"shared\" = \"a\"\n")
        .unwrap();
    let pid = fleet.gateway.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    assert!(fleet.gateway.wait_for_log("configuration reloaded", Duration::from_secs(10)));
    assert!(fleet.imap_login(SHARED).0.starts_with("a OK"));
    wait_logins(&fleet.a, "imap-login", "shared", 1);
}

#[test]
fn a_pool_spreads_sessions_fails_over_when_a_host_stops_and_refuses_when_none_is_left() {
    let mut fleet = fleet("pool", "");
    for _ in 0..4 {
        assert!(fleet.imap_login(SHARED).0.starts_with("a OK"));
    }
    wait_logins(&fleet.a, "imap-login", "shared", 1);
    wait_logins(&fleet.b, "imap-login", "shared", 1);

    fleet.a.stop();
    let stopped = Instant::now();
    let before_b = logins(&fleet.b, "imap-login", "shared");
    // At once: a refused connection moves the session to the next host.
    for _ in 0..4 {
        let (answer, _client) = fleet.imap_login(SHARED);
        assert!(answer.starts_with("a OK"), "{answer}");
        assert_eq!(fleet.pop3_login(SHARED), "+OK Logged in.");
    }
    wait_logins(&fleet.b, "imap-login", "shared", before_b + 4);
    // The health check marks the host down within its interval (500 ms).
    let host = format!("mailgate_upstream_host_up{{host=\"{}\",protocol=\"imap\",upstream=\"pool\"}}", fleet.a.imaps);
    while fleet.metric(&host) != 0 {
        assert!(stopped.elapsed() < Duration::from_secs(3), "host still up after {:?}", stopped.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }

    fleet.b.stop();
    assert_eq!(fleet.imap_login(SHARED).0, "a NO [UNAVAILABLE] Upstream server unavailable, try again later.");
    assert_eq!(fleet.pop3_login(SHARED), "-ERR [SYS/TEMP] Mail server unavailable, try again later.");
}

/// A lookup service on loopback: answers from `routes` (user -> JSON), 404 otherwise;
/// records every request line. Stops when the returned flag is set (and it is woken).
struct LookupService {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl LookupService {
    fn start(routes: Vec<(&'static str, String)>) -> LookupService {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopping) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().take(200) {
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut line = String::new();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                // The rest of the header.
                let mut header = String::new();
                while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                    header.clear();
                }
                seen.lock().unwrap().push(line.trim_end().to_string());
                let user = line.split("user=").nth(1).and_then(|r| r.split(['&', ' ']).next()).unwrap_or("");
                let user = user.replace("%40", "@");
                let answer = match routes.iter().find(|(u, _)| *u == user) {
                    Some((_, json)) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
                        json.len()
                    ),
                    None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string(),
                };
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        LookupService { addr, requests, stop }
    }

    fn shut_down(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

#[test]
fn the_lookup_service_routes_by_upstream_or_host_and_its_outage_follows_on_lookup_error() {
    let (dir, pki, a, b) = backends();
    let bundle = bundle_in(&dir);
    let lookup = LookupService::start(vec![
        ("shared", "{\"upstream\": \"b\"}".to_string()),
        ("carol@b.test", format!("{{\"host\": \"{}\"}}", b.imaps)),
    ]);
    let routing = |on_error: &str| {
        format!(
            "[routing]\nlookup_url = \"http://{}/route?site=test\"\nlookup_timeout = \"1s\"\nlookup_cache_ttl = \"60s\"\non_lookup_error = \"{on_error}\"\n",
            lookup.addr
        )
    };
    let refuse = Gateway::start(dir.path(), &config(&pki, &a, &b, &bundle, "a", &routing("refuse")));
    let fleet = Fleet { dir, pki, a, b, gateway: refuse };

    assert!(fleet.imap_login(SHARED).0.starts_with("a OK"), "upstream b");
    wait_logins(&fleet.b, "imap-login", "shared", 1);
    assert!(fleet.imap_login(CAROL).0.starts_with("a OK"), "host:port of b");
    wait_logins(&fleet.b, "imap-login", "carol@b.test", 1);
    assert!(fleet.imap_login(BOB).0.starts_with("a OK"), "404: the listener's upstream");
    wait_logins(&fleet.a, "imap-login", "bob@a.test", 1);
    let requests = lookup.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 3, "{requests:?}");
    assert!(
        requests[0].starts_with("GET /route?site=test&user=shared&protocol=imap&client=127.0.0.1 HTTP/1.1"),
        "{requests:?}"
    );
    // Answers are cached: the same user again asks nobody.
    assert!(fleet.imap_login(SHARED).0.starts_with("a OK"));
    assert_eq!(lookup.requests.lock().unwrap().len(), 3);
    assert_eq!(fleet.metric("mailgate_routes_total{protocol=\"imap\",source=\"lookup_cached\"}"), 1);

    // The service goes away: a user it has not answered for is refused ...
    lookup.shut_down();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(fleet.pop3_login(BOB), "-ERR [SYS/TEMP] Mail server unavailable, try again later.");
    assert_eq!(
        fleet.imap_login(("nobody@c.test", "x")).0,
        "a NO [UNAVAILABLE] Upstream server unavailable, try again later."
    );
    // ... while cached answers (a 404 included) keep working.
    assert!(fleet.imap_login(BOB).0.starts_with("a OK"));
    assert!(fleet.imap_login(SHARED).0.starts_with("a OK"));
    assert!(fleet.metric("mailgate_routes_total{protocol=\"imap\",source=\"lookup_failed\"}") >= 1);

    // With on_lookup_error = "default" the same outage sends users to the listener's upstream.
    let fallback =
        Gateway::start(fleet.dir.path(), &config(&fleet.pki, &fleet.a, &fleet.b, &bundle, "a", &routing("default")));
    let fleet = Fleet { gateway: fallback, ..fleet };
    assert!(fleet.imap_login(BOB).0.starts_with("a OK"));
}

#[test]
fn a_host_that_accepts_connections_but_never_greets_is_taken_out_of_its_pool() {
    use support::fake_upstream::{server_tls, FakeConn, FakeUpstream};
    let (dir, pki, a, b) = backends();
    // A backend that hangs: it accepts TCP, then says nothing (not even TLS).
    let hung = FakeUpstream::start(Some(server_tls(&pki.cert, &pki.key)), |_: &mut FakeConn| {
        std::thread::sleep(Duration::from_secs(15));
    });
    let mut bundle = std::fs::read(bundle_in(&dir)).unwrap();
    bundle.extend(std::fs::read(&pki.ca).unwrap());
    std::fs::write(bundle_in(&dir), bundle).unwrap();
    let text = config(&pki, &a, &b, &bundle_in(&dir), "pool", "")
        .replace(&format!("\"{}\"]", b.imaps), &format!("\"{}\"]", hung.addr))
        .replace("connect_timeout = \"2s\"", "connect_timeout = \"1s\"\ntls_timeout = \"1s\"");
    let gateway = Gateway::start(dir.path(), &text);
    let fleet = Fleet { dir, pki, a, b, gateway };

    // The health check (every 500 ms) sees no greeting within its timeouts.
    let hung_up = format!("mailgate_upstream_host_up{{host=\"{}\",protocol=\"imap\",upstream=\"pool\"}}", hung.addr);
    let started = Instant::now();
    while fleet.metric(&hung_up) != 0 {
        assert!(started.elapsed() < Duration::from_secs(8), "the hung host is still in the pool");
        std::thread::sleep(Duration::from_millis(100));
    }
    // From then on every session goes to the healthy host without waiting.
    for _ in 0..4 {
        let started = Instant::now();
        let (answer, _client) = fleet.imap_login(SHARED);
        assert!(answer.starts_with("a OK"), "{answer}");
        assert!(started.elapsed() < Duration::from_millis(900), "{:?}", started.elapsed());
    }
    wait_logins(&fleet.a, "imap-login", "shared", 4);
    assert_eq!(
        fleet.metric(&format!(
            "mailgate_upstream_host_up{{host=\"{}\",protocol=\"imap\",upstream=\"pool\"}}",
            fleet.a.imaps
        )),
        1
    );
    // The instance is ready: the pool has a healthy host, whatever the hung one does.
    let started = Instant::now();
    let mut tcp = TcpStream::connect(fleet.gateway.admin()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = tcp.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
}
