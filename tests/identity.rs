//! The real client's address, end to end, against Dovecot: forwarded to the upstream (IMAP
//! `ID`, POP3 `XCLIENT`, or a PROXY v2 header to a `haproxy = yes` listener) so that
//! Dovecot logs it, and taken from a trusted load balancer's PROXY header (v1 or v2) on
//! the way in. Clients connect from distinct 127.x.y.z addresses so that the logs can
//! only show them if mailgate forwarded them.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::client::{closed_before_tls, tcp_from, Client};
use support::dovecot::{Dovecot, Options};
use support::gateway::Gateway;
use support::setup::*;
use support::tls::TestPki;

/// Dovecot with `options`, and mailgate in front with `forward_client` and `extra`; the
/// upstream is Dovecot's `haproxy = yes` listeners with `proxy_v2`, else its TLS ones.
fn start(options: Options, forward_client: &str, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let dovecot = Dovecot::start_with(&[ALICE, BOB], &options);
    let (imap, pop3) = match forward_client {
        "proxy_v2" => (dovecot.imaps_haproxy.unwrap(), dovecot.pop3s_haproxy.unwrap()),
        _ => (dovecot.imaps, dovecot.pop3s),
    };
    let config = gateway_config_with(
        &pki,
        Some(&imap.to_string()),
        Some(&pop3.to_string()),
        "implicit",
        Some(&dovecot.ca_pem()),
        "",
        extra,
    )
    .replace("login_timeout = \"15s\"\n", &format!("login_timeout = \"15s\"\nforward_client = \"{forward_client}\"\n"));
    let gateway = Gateway::start(dir.path(), &config);
    Setup { dir, pki, dovecot, gateway }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Waits (bounded) for Dovecot's log to have a login line of `user` containing `needle`.
fn dovecot_login_line(dovecot: &Dovecot, service: &str, user: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = dovecot.log();
        let prefix = format!("{service}: Info: Login: user=<{user}>");
        if let Some(line) = log.lines().find(|l| l.contains(&prefix) && l.contains(needle)) {
            return line.to_string();
        }
        assert!(Instant::now() < deadline, "no {service} login of {user} with {needle}:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `session=<ID>` of a Dovecot log line.
fn session_of(line: &str) -> &str {
    line.split("session=<").nth(1).and_then(|rest| rest.split('>').next()).expect("session id")
}

fn imap_login_from(setup: &Setup, source: &str, user: (&str, &str)) -> Client {
    let mut client = Client::tls_over(tcp_from(setup.addr("imaps"), ip(source)), setup.tls_config());
    assert!(client.line().unwrap().starts_with("* OK"));
    client.login(user);
    client
}

fn pop3_login_from(setup: &Setup, source: &str, (user, password): (&str, &str)) -> Client {
    let mut client = Client::tls_over(tcp_from(setup.addr("pop3s"), ip(source)), setup.tls_config());
    assert!(client.line().unwrap().starts_with("+OK"));
    client.send(format!("USER {user}\r\nPASS {password}\r\n").as_bytes());
    assert!(client.line().unwrap().starts_with("+OK"));
    assert_eq!(client.line().unwrap(), "+OK Logged in.");
    client
}

#[test]
fn dovecot_logs_the_client_address_forwarded_with_imap_id_and_pop3_xclient() {
    let options = Options { login_trusted_networks: "127.0.0.1/32".into(), ..Options::default() };
    let setup = start(options, "commands", "");

    let mut imap = imap_login_from(&setup, "127.0.0.77", BOB);
    let line = dovecot_login_line(&setup.dovecot, "imap-login", "bob", "rip=127.0.0.77");
    // Dovecot takes mailgate's session id: one id finds the session in both logs.
    let session = session_of(&line);
    assert_eq!(session.len(), 16, "{line}");
    assert!(setup.gateway.log().contains(&format!("session={session}")), "{line}");
    assert!(imap.command("n", "NOOP").last().unwrap().starts_with("n OK"));

    let _pop3 = pop3_login_from(&setup, "127.0.0.78", ALICE);
    dovecot_login_line(&setup.dovecot, "pop3-login", "alice", "rip=127.0.0.78");

    // A client's own ID claims are answered by mailgate and never reach the upstream as
    // trusted: Dovecot logs the address the client really came from.
    let mut liar = Client::tls_over(tcp_from(setup.addr("imaps"), ip("127.0.0.79")), setup.tls_config());
    liar.line().unwrap();
    let id = liar.command("i", r#"ID ("x-originating-ip" "203.0.113.66" "x-originating-port" "1")"#);
    assert!(id.last().unwrap().starts_with("i OK"), "{id:?}");
    liar.login(ALICE);
    let after = liar.command("j", r#"ID ("x-originating-ip" "203.0.113.66")"#);
    assert!(after.last().unwrap().starts_with("j OK"), "{after:?}");
    dovecot_login_line(&setup.dovecot, "imap-login", "alice", "rip=127.0.0.79");
    assert!(!setup.dovecot.log().contains("203.0.113.66"), "{}", setup.dovecot.log());
}

#[test]
fn without_forwarding_or_trust_dovecot_sees_mailgate() {
    // forward_client = "commands" but Dovecot does not trust mailgate: the ID fields are
    // only the client's ID to it, and the login still works.
    let setup = start(Options { login_trusted_networks: String::new(), ..Options::default() }, "commands", "");
    let _imap = imap_login_from(&setup, "127.0.0.82", BOB);
    let line = dovecot_login_line(&setup.dovecot, "imap-login", "bob", "rip=");
    assert!(line.contains("rip=127.0.0.1,"), "{line}");
    let _pop3 = pop3_login_from(&setup, "127.0.0.82", ALICE);
    let line = dovecot_login_line(&setup.dovecot, "pop3-login", "alice", "rip=");
    assert!(line.contains("rip=127.0.0.1,"), "{line}");
}

#[test]
fn dovecot_behind_haproxy_listeners_logs_the_client_from_a_proxy_v2_header() {
    let setup = start(Options { haproxy: true, ..Options::default() }, "proxy_v2", "");
    let mut imap = imap_login_from(&setup, "127.0.0.80", BOB);
    dovecot_login_line(&setup.dovecot, "imap-login", "bob", "rip=127.0.0.80");
    assert!(imap.command("s", "SELECT INBOX").last().unwrap().starts_with("s OK"));
    let _pop3 = pop3_login_from(&setup, "127.0.0.81", ALICE);
    dovecot_login_line(&setup.dovecot, "pop3-login", "alice", "rip=127.0.0.81");
    // The readiness probe (mailgate's own connection, a LOCAL header) still passes.
    let mut tcp = TcpStream::connect(setup.gateway.admin()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = tcp.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"), "{answer}");
}

/// mailgate's listeners expect a PROXY header from 127.0.0.1 (the "balancer"), with a
/// 1 s timeout; the upstream gets the client's address by ID/XCLIENT.
fn behind_a_balancer(extra: &str) -> Setup {
    let setup =
        start(Options { login_trusted_networks: "127.0.0.1/32".into(), ..Options::default() }, "commands", extra);
    let text = std::fs::read_to_string(&setup.gateway.config_path).unwrap();
    drop(setup.gateway);
    let mut config = String::new();
    for block in text.split_inclusive("\n\n") {
        config.push_str(block);
        if block.starts_with("[[listener]]") {
            config.truncate(config.len() - 1);
            config.push_str("proxy_protocol = true\nproxy_trusted = [\"127.0.0.1/32\"]\nproxy_timeout = \"1s\"\n\n");
        }
    }
    let gateway = Gateway::start(setup.dir.path(), &config);
    Setup { gateway, ..setup }
}

/// A connection from 127.0.0.1 whose first bytes are `header`.
fn with_header(addr: SocketAddr, header: &[u8]) -> TcpStream {
    let mut tcp = tcp_from(addr, ip("127.0.0.1"));
    tcp.write_all(header).unwrap();
    tcp
}

fn v2(source: &str, destination: SocketAddr) -> Vec<u8> {
    mailgate::proxy_header::encode_v2(source.parse().unwrap(), destination, None)
}

/// Reads what the server sends until it closes (bounded): empty for a silent close.
fn everything(mut tcp: TcpStream) -> Vec<u8> {
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out);
    out
}

#[test]
fn a_trusted_balancers_proxy_header_gives_the_client_address_to_logs_limits_and_upstream() {
    let setup = behind_a_balancer("[limits]\nmax_connections_per_ip = 1\n");
    let imaps = setup.addr("imaps");
    // v2 in front of implicit TLS: the ClientHello follows the header at once.
    let mut client = Client::tls_over(with_header(imaps, &v2("203.0.113.9:4242", imaps)), setup.tls_config());
    assert!(client.line().unwrap().starts_with("* OK"));
    client.login(BOB);
    assert!(setup.gateway.wait_for_log("client=203.0.113.9:4242", Duration::from_secs(5)));
    dovecot_login_line(&setup.dovecot, "imap-login", "bob", "rip=203.0.113.9");
    // The limits key on the client's address, not the balancer's.
    let again = with_header(imaps, &v2("203.0.113.9:4243", imaps));
    assert!(closed_before_tls(again, setup.tls_config()), "not refused at accept");
    let mut other = Client::tls_over(with_header(imaps, &v2("203.0.113.10:1", imaps)), setup.tls_config());
    assert!(other.line().unwrap().starts_with("* OK"));

    // v1 on the POP3 STLS listener, from IPv6.
    let pop3 = setup.addr("pop3");
    let header = format!("PROXY TCP6 2001:db8::7 2001:db8::1 5000 {}\r\n", pop3.port());
    let mut pop3_client = Client::plain_over(with_header(pop3, header.as_bytes()));
    assert!(pop3_client.line().unwrap().starts_with("+OK"));
    assert!(setup.gateway.wait_for_log("client=[2001:db8::7]:5000", Duration::from_secs(5)));

    // LOCAL: the balancer's health check is served as itself.
    let local = mailgate::proxy_header::encode_v2_local();
    let mut check = Client::plain_over(with_header(setup.addr("imap"), &local));
    assert!(check.line().unwrap().starts_with("* OK"));
}

#[test]
fn without_a_valid_header_from_a_trusted_peer_the_connection_closes_before_any_greeting() {
    let setup = behind_a_balancer("");
    let imap = setup.addr("imap");
    // An untrusted peer, even with a well-formed header.
    let mut untrusted = tcp_from(imap, ip("127.0.0.83"));
    untrusted.write_all(&v2("203.0.113.9:1", imap)).unwrap();
    assert_eq!(everything(untrusted), b"");
    // A trusted peer that sends no header, within the timeout.
    let started = Instant::now();
    assert_eq!(everything(tcp_from(imap, ip("127.0.0.1"))), b"");
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    // A client speaking IMAP first, and a broken header.
    assert_eq!(everything(with_header(imap, b"a1 LOGIN bob secret\r\n")), b"");
    assert_eq!(everything(with_header(imap, b"PROXY TCP4 1.2.3.4 nonsense\r\n")), b"");
    assert!(!setup.gateway.log().contains("secret"));
    // The gateway keeps serving.
    let mut fine = Client::plain_over(with_header(imap, &v2("198.51.100.3:9", imap)));
    assert!(fine.line().unwrap().starts_with("* OK"));
}

#[test]
fn an_ipv6_client_is_served_logged_limited_and_forwarded_as_itself() {
    let options = Options { login_trusted_networks: "127.0.0.1/32".into(), ..Options::default() };
    let setup = start(options, "commands", "[limits]\nmax_connections_per_ip = 1\n");
    let text = std::fs::read_to_string(&setup.gateway.config_path).unwrap();
    let gateway = Gateway::start(setup.dir.path(), &text.replace("address = \"127.0.0.1:0\"", "address = \"[::1]:0\""));
    let Setup { dir, pki, dovecot, gateway: first } = setup;
    drop(first);
    let setup = Setup { dir, pki, dovecot, gateway };
    let imaps = setup.addr("imaps");
    assert_eq!(imaps.ip(), ip("::1"));

    let mut client = Client::tls(imaps, setup.tls_config());
    assert!(client.line().unwrap().starts_with("* OK"));
    client.login(BOB);
    assert!(setup.gateway.wait_for_log("client=[::1]:", Duration::from_secs(5)));
    dovecot_login_line(&setup.dovecot, "imap-login", "bob", "rip=::1,");
    // The per-address cap counts ::1 (its /64) as one client.
    let second = TcpStream::connect(imaps).unwrap();
    assert!(closed_before_tls(second, setup.tls_config()), "not refused at accept");
    assert!(client.command("n", "NOOP").last().unwrap().starts_with("n OK"));
}

/// Issue 12, defect 8: with mailgate's defaults (`forward_client = "commands"`) and Dovecot
/// trusting mailgate (`login_trusted_networks`, as OPERATIONS.md sets it up), Dovecot's own
/// failed-login delay and penalty (kept as shipped here) fall on the client that failed,
/// not on every user behind mailgate. Before, Dovecot saw every login come from mailgate's
/// address: a correct login after another client's three failures waited 2-4 s.
#[test]
fn dovecot_penalizes_the_client_that_failed_not_every_user_behind_mailgate() {
    let dovecot = Dovecot::start_with(&[ALICE, BOB], &Options { auth_penalties: true, ..Options::default() });
    // No forward_client: the default. mailgate's own penalty is per client address, so it
    // never delays the other addresses measured; short, so that the failures go quickly.
    let setup = Setup::in_front_of(dovecot, "", "[limits]\nauth_base_delay = \"100ms\"\nauth_max_delay = \"200ms\"\n");
    let config = std::fs::read_to_string(&setup.gateway.config_path).unwrap();
    assert!(!config.contains("forward_client"));

    // Three wrong passwords (distinct: Dovecot does not escalate a repeated one) from
    // 127.0.0.2, by IMAP, POP3 (XCLIENT) and IMAP again: a protocol that did not forward
    // would have Dovecot penalize mailgate's own address, and its correct login below.
    for (n, protocol) in [(1, "imap"), (2, "pop3"), (3, "imap")] {
        let listener = if protocol == "imap" { "imaps" } else { "pop3s" };
        let mut client = Client::tls_over(tcp_from(setup.addr(listener), ip("127.0.0.2")), setup.tls_config());
        client.line().unwrap();
        let refused = if protocol == "imap" {
            client.command("f", &format!("LOGIN bob wrong-{n}")).pop().unwrap()
        } else {
            client.send(format!("USER alice\r\nPASS wrong-{n}\r\n").as_bytes());
            assert!(client.line().unwrap().starts_with("+OK"));
            client.line().unwrap()
        };
        assert!(refused.starts_with("f NO") || refused.starts_with("-ERR"), "{refused}");
    }
    // Then the right ones from other addresses.
    let mut client = Client::tls_over(tcp_from(setup.addr("imaps"), ip("127.0.0.3")), setup.tls_config());
    client.line().unwrap();
    let started = Instant::now();
    client.login(BOB);
    let imap = started.elapsed();
    dovecot_login_line(&setup.dovecot, "imap-login", "bob", "rip=127.0.0.3");
    let started = Instant::now();
    let _pop3 = pop3_login_from(&setup, "127.0.0.5", ALICE);
    let pop3 = started.elapsed();
    dovecot_login_line(&setup.dovecot, "pop3-login", "alice", "rip=127.0.0.5");

    println!("correct logins after another address's three failures: IMAP {imap:?}, POP3 {pop3:?}");
    // Dovecot's penalty is whole seconds (2 s and up); a login without it takes milliseconds.
    for (protocol, took) in [("IMAP", imap), ("POP3", pop3)] {
        assert!(took < Duration::from_millis(1500), "{protocol}: {took:?}, Dovecot's penalty for another client");
    }
    // The failures themselves were Dovecot's to delay, from their own address.
    let log = setup.dovecot.log();
    assert!(log.contains("rip=127.0.0.2"), "{log}");
}
