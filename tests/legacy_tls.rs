//! Legacy TLS and lenient ALPN with real clients, against Dovecot: `openssl s_client
//! -tls1`/`-tls1_1` and curl capped at TLS 1.0 log in through the listeners that allow TLS
//! 1.0 (`tls_min_version`), the default listeners refuse them, modern clients still get
//! TLS 1.3 there; an upstream that speaks TLS 1.0 only is reached when its
//! `tls_min_version` allows it; `alpn = "lenient"` serves a client offering a foreign
//! ALPN id (rustls and OpenSSL listeners alike), `"strict"` refuses it.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::client::{Client, Conn};
use support::dovecot::{Dovecot, Options};
use support::gateway::Gateway;
use support::process::{curl, run_bounded_fed, show, Run};
use support::setup::*;
use support::tls::TestPki;
use tokio_rustls::rustls::ProtocolVersion;

/// What OpenSSL 3 needs to speak TLS 1.0/1.1 at all (its default security level refuses
/// them), on the client side as on mailgate's.
const LEGACY_CIPHERS: &str = "DEFAULT:@SECLEVEL=0";

/// The listeners these tests add to the standard six: implicit TLS IMAP allowing TLS 1.0
/// (strict and lenient ALPN), STARTTLS IMAP and implicit POP3 allowing it, and a rustls
/// listener with lenient ALPN.
const LISTENERS: &str = r#"
[[listener]]
name = "legacy"
protocol = "imap"
address = "127.0.0.1:0"
tls = "implicit"
tls_min_version = "1.0"

[[listener]]
name = "legacy-lenient"
protocol = "imap"
address = "127.0.0.1:0"
tls = "implicit"
tls_min_version = "1.0"
alpn = "lenient"

[[listener]]
name = "legacy-starttls"
protocol = "imap"
address = "127.0.0.1:0"
tls = "starttls"
tls_min_version = "1.0"

[[listener]]
name = "legacy-pop3s"
protocol = "pop3"
address = "127.0.0.1:0"
tls = "implicit"
tls_min_version = "1.1"

[[listener]]
name = "lenient"
protocol = "imap"
address = "127.0.0.1:0"
tls = "implicit"
alpn = "lenient"
"#;

const IMAP_SESSION: &str = "a LOGIN bob bob-Pass-42\r\nb LOGOUT\r\n";
const POP3_SESSION: &str = "USER bob\r\nPASS bob-Pass-42\r\nQUIT\r\n";

/// `openssl s_client` to `addr` trusting `ca`, with `args`, fed `input` at once: with
/// `-ign_eof` it reads on after its input ends, until the server closes. Bounded in time.
fn s_client(addr: SocketAddr, ca: &Path, args: &[&str], input: &str) -> Run {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &addr.to_string(), "-ign_eof", "-verify_return_error"])
        .arg("-CAfile")
        .arg(ca)
        .args(args);
    run_bounded_fed(cmd, input.as_bytes(), Duration::from_secs(30))
}

/// The protocol of the session `s_client` established (`Protocol  : TLSv1`), if it
/// established one: a failed handshake reports `New, (NONE), Cipher is (NONE)` and the
/// version it tried.
fn negotiated(run: &Run) -> Option<String> {
    let out = show(&run.stdout);
    out.lines().find(|l| l.starts_with("New, ") && !l.contains("(NONE)"))?;
    let line = out.lines().find(|l| l.trim_start().starts_with("Protocol  :"))?;
    Some(line.split(':').nth(1)?.trim().to_string())
}

/// The value of `series` (name and labels exactly as exported), waiting up to 5 s for it
/// to reach `expected` (a counter is bumped as the peer sees the handshake end).
fn metric_reaches(gateway: &Gateway, series: &str, expected: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = gateway.metrics();
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"));
        if value == expected || Instant::now() > deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn handshakes(listener: &str, result: &str, version: &str) -> String {
    format!("mailgate_tls_handshakes_total{{listener=\"{listener}\",result=\"{result}\",version=\"{version}\"}}")
}

fn failures(listener: &str, reason: &str) -> String {
    format!("mailgate_tls_handshake_failures_total{{listener=\"{listener}\",reason=\"{reason}\"}}")
}

fn alpn_ignored(listener: &str) -> String {
    format!("mailgate_tls_alpn_ignored_total{{listener=\"{listener}\"}}")
}

/// Asserts that an IMAP `s_client` session on `version` logged in and out.
fn assert_imap_session(run: &Run, version: &str, log: &str) {
    let out = show(&run.stdout);
    assert_eq!(negotiated(run).as_deref(), Some(version), "{out}\n{}\n--- mailgate ---\n{log}", run.stderr());
    assert!(out.lines().any(|l| l.starts_with("a OK")), "no LOGIN OK:\n{out}\n--- mailgate ---\n{log}");
    assert!(out.lines().any(|l| l.starts_with("b OK")), "no LOGOUT OK:\n{out}");
}

#[test]
fn tls1_and_tls1_1_clients_log_in_through_the_listeners_that_allow_them() {
    let setup = Setup::start_with("", LISTENERS);
    let ca = &setup.pki.ca;
    let legacy = ["-cipher", LEGACY_CIPHERS];

    for (flag, version) in [("-tls1", "TLSv1"), ("-tls1_1", "TLSv1.1")] {
        let run = s_client(setup.addr("legacy"), ca, &[&legacy[..], &[flag]].concat(), IMAP_SESSION);
        assert_imap_session(&run, version, &setup.gateway.log());
        assert_eq!(metric_reaches(&setup.gateway, &handshakes("legacy", "ok", version), 1.0), 1.0);
    }

    let starttls = [&legacy[..], &["-tls1", "-starttls", "imap"]].concat();
    let run = s_client(setup.addr("legacy-starttls"), ca, &starttls, IMAP_SESSION);
    assert_imap_session(&run, "TLSv1", &setup.gateway.log());
    assert_eq!(metric_reaches(&setup.gateway, &handshakes("legacy-starttls", "ok", "TLSv1"), 1.0), 1.0);

    let run = s_client(setup.addr("legacy-pop3s"), ca, &[&legacy[..], &["-tls1_1"]].concat(), POP3_SESSION);
    let out = show(&run.stdout);
    assert_eq!(negotiated(&run).as_deref(), Some("TLSv1.1"), "{out}");
    assert!(out.contains("+OK Logged in."), "{out}\n--- mailgate ---\n{}", setup.gateway.log());
    assert_eq!(metric_reaches(&setup.gateway, &handshakes("legacy-pop3s", "ok", "TLSv1.1"), 1.0), 1.0);

    // A TLS 1.0 client below that listener's minimum (1.1) is refused for its version.
    let run = s_client(setup.addr("legacy-pop3s"), ca, &[&legacy[..], &["-tls1"]].concat(), POP3_SESSION);
    assert!(!show(&run.stdout).contains("+OK"), "{}", show(&run.stdout));
    assert_eq!(metric_reaches(&setup.gateway, &failures("legacy-pop3s", "version"), 1.0), 1.0);

    // The session's lines carry the version it negotiated.
    let log = setup.gateway.log();
    assert!(
        log.lines().any(|l| l.contains("tls=\"TLSv1\"") && l.contains("logged in") && l.contains("listener=legacy ")),
        "{log}"
    );
}

#[test]
fn default_listeners_refuse_tls1_and_tls1_1_clients() {
    let setup = Setup::start_with("", LISTENERS);
    let ca = &setup.pki.ca;
    for flag in ["-tls1", "-tls1_1"] {
        let run = s_client(setup.addr("imaps"), ca, &["-cipher", LEGACY_CIPHERS, flag], IMAP_SESSION);
        let out = show(&run.stdout);
        assert!(!run.status.success() && !out.contains("* OK"), "{flag} was served:\n{out}");
    }
    let run =
        s_client(setup.addr("imap"), ca, &["-cipher", LEGACY_CIPHERS, "-tls1", "-starttls", "imap"], IMAP_SESSION);
    assert!(!show(&run.stdout).contains("a OK"), "{}", show(&run.stdout));

    assert_eq!(metric_reaches(&setup.gateway, &failures("imaps", "version"), 2.0), 2.0);
    assert_eq!(metric_reaches(&setup.gateway, &handshakes("imaps", "failed", "none"), 2.0), 2.0);
    assert_eq!(metric_reaches(&setup.gateway, &failures("imap", "version"), 1.0), 1.0);
    // A default listener offers no legacy series at all.
    assert!(!setup.gateway.metrics().contains("listener=\"imaps\",result=\"ok\",version=\"TLSv1\""));
}

#[test]
fn curl_capped_at_tls1_fetches_through_a_legacy_listener_only() {
    let setup = Setup::start_with("", LISTENERS);
    setup.dovecot.deliver(
        BOB.0,
        b"From: a@example.org\r\nTo: bob@example.org\r\nSubject: legacy-tls-probe\r\n\r\nHello over TLS 1.0.\r\n",
    );
    let tls1 = ["--tlsv1.0", "--tls-max", "1.0", "--ciphers", LEGACY_CIPHERS];

    let url = format!("imaps://{}/INBOX;UID=1", setup.addr("legacy"));
    let run = curl(&setup.pki.ca, BOB, &url, &tls1);
    assert!(run.status.success(), "curl failed: {}\n--- mailgate ---\n{}", run.stderr(), setup.gateway.log());
    assert!(show(&run.stdout).contains("Subject: legacy-tls-probe"), "{}", show(&run.stdout));
    assert_eq!(metric_reaches(&setup.gateway, &handshakes("legacy", "ok", "TLSv1"), 1.0), 1.0);

    let url = format!("imaps://{}/INBOX;UID=1", setup.addr("imaps"));
    let run = curl(&setup.pki.ca, BOB, &url, &tls1);
    assert!(!run.status.success(), "curl at TLS 1.0 was served by a default listener: {}", show(&run.stdout));
    assert_eq!(metric_reaches(&setup.gateway, &failures("imaps", "version"), 1.0), 1.0);
}

#[test]
fn a_modern_client_still_gets_tls1_3_on_a_legacy_listener() {
    let setup = Setup::start_with("", LISTENERS);
    let mut client = Client::tls(setup.addr("legacy"), setup.pki.client_config(&[b"imap"]));
    assert!(client.line().unwrap().starts_with("* OK"));
    let Conn::Tls(tls) = &client.conn else { panic!("not TLS") };
    assert_eq!(tls.conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"imap"[..]));
    client.login(BOB);
    assert!(client.command("n", "NOOP").last().unwrap().starts_with("n OK"));
    assert_eq!(metric_reaches(&setup.gateway, &handshakes("legacy", "ok", "TLSv1.3"), 1.0), 1.0);
}

#[test]
fn strict_alpn_refuses_a_foreign_protocol_and_lenient_alpn_serves_it_without_alpn() {
    let setup = Setup::start_with("", LISTENERS);
    let ca = &setup.pki.ca;
    // rustls listeners with a current client; OpenSSL listeners with a TLS 1.1 one.
    let cases =
        [("imaps", "lenient", vec![]), ("legacy", "legacy-lenient", vec!["-tls1_1", "-cipher", LEGACY_CIPHERS])];
    for (strict, lenient, version) in cases {
        let foreign = [&version[..], &["-alpn", "http/1.1"]].concat();
        let run = s_client(setup.addr(strict), ca, &foreign, IMAP_SESSION);
        assert!(!show(&run.stdout).contains("* OK"), "{strict} served http/1.1:\n{}", show(&run.stdout));
        assert_eq!(metric_reaches(&setup.gateway, &failures(strict, "alpn"), 1.0), 1.0, "{strict}");

        let run = s_client(setup.addr(lenient), ca, &foreign, IMAP_SESSION);
        let out = show(&run.stdout);
        assert!(out.contains("No ALPN negotiated"), "{out}");
        assert!(out.lines().any(|l| l.starts_with("a OK")), "{lenient}:\n{out}\n{}", setup.gateway.log());
        assert_eq!(metric_reaches(&setup.gateway, &alpn_ignored(lenient), 1.0), 1.0, "{lenient}");

        for listener in [strict, lenient] {
            let ours = [&version[..], &["-alpn", "imap"]].concat();
            let run = s_client(setup.addr(listener), ca, &ours, IMAP_SESSION);
            let out = show(&run.stdout);
            assert!(out.contains("ALPN protocol: imap"), "{listener}:\n{out}");
            assert!(out.lines().any(|l| l.starts_with("a OK")), "{listener}:\n{out}");
        }
        assert_eq!(metric_reaches(&setup.gateway, &alpn_ignored(strict), 0.0), 0.0);
        assert_eq!(metric_reaches(&setup.gateway, &alpn_ignored(lenient), 1.0), 1.0);
    }
}

#[test]
fn a_legacy_listener_serves_the_certificate_the_sni_names() {
    let dir = tempfile::tempdir().unwrap();
    let other = TestPki::generate(dir.path());
    let (cert, key) = other.leaf("other", &["mail.example.org"]);
    let setup = Setup::start_edited("", LISTENERS, |config, _| {
        config.replace(
            "certificates = [{",
            &format!(
                "certificates = [{{ cert = {:?}, key = {:?} }}, {{",
                cert.display().to_string(),
                key.display().to_string()
            ),
        )
    });
    // The first certificate is the default; SNI picks the second by its name, through
    // OpenSSL's servername callback.
    for (name, ca, subject) in
        [("localhost", &setup.pki.ca, "CN = leaf"), ("mail.example.org", &other.ca, "CN = other")]
    {
        let args = ["-tls1", "-cipher", LEGACY_CIPHERS, "-servername", name];
        let run = s_client(setup.addr("legacy"), ca, &args, IMAP_SESSION);
        let out = show(&run.stdout);
        assert!(out.lines().any(|l| l.starts_with("subject=") && l.contains(subject)), "{name}:\n{out}");
        assert!(out.lines().any(|l| l.starts_with("a OK")), "{name}:\n{out}");
    }
}

#[test]
fn an_upstream_speaking_only_tls1_is_reached_when_its_tls_min_version_allows_it() {
    let dovecot = Dovecot::start_with(&[ALICE, BOB], &Options { tls1_only: true, ..Options::default() });
    dovecot
        .deliver(BOB.0, b"From: a@example.org\r\nTo: bob@example.org\r\nSubject: tls1-upstream\r\n\r\nOld server.\r\n");
    // The cap holds: TLS 1.2 is refused, TLS 1.0 is what the server speaks.
    let run = s_client(dovecot.imaps, &dovecot.ca_pem(), &["-tls1_2"], "");
    assert_eq!(negotiated(&run).as_deref().filter(|p| p.starts_with("TLSv1.")), None, "{}", show(&run.stdout));
    let run = s_client(dovecot.imaps, &dovecot.ca_pem(), &["-cipher", LEGACY_CIPHERS], "a LOGOUT\r\n");
    assert_eq!(negotiated(&run).as_deref(), Some("TLSv1"), "{}\n{}", show(&run.stdout), run.stderr());

    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let imaps = format!("127.0.0.1:{}", dovecot.imaps.port());
    let pop3s = format!("127.0.0.1:{}", dovecot.pop3s.port());
    let config = gateway_config_with(&pki, Some(&imaps), Some(&pop3s), "implicit", Some(&dovecot.ca_pem()), "", "");

    // As configured by default (TLS 1.2 at least), the upstream cannot be used.
    let modern = Gateway::start(dir.path(), &config);
    let mut client = Client::tls(modern.addr("imaps"), pki.client_config(&[]));
    client.line().unwrap();
    let answer = client.command("a", "LOGIN bob bob-Pass-42");
    assert!(answer.last().unwrap().starts_with("a NO [UNAVAILABLE]"), "{answer:?}");
    assert_eq!(metric_reaches(&modern, "mailgate_upstream_errors_total{kind=\"tls\",protocol=\"imap\"}", 1.0), 1.0);

    // Allowed down to TLS 1.0: implicit TLS (IMAP and POP3) and STARTTLS towards it work.
    let starttls = format!(
        "\n[upstream.starttls]\nimap = \"127.0.0.1:{}\"\ntls = \"starttls\"\nca_file = {:?}\ntls_min_version = \"1.0\"\n\n\
         [[listener]]\nname = \"via-starttls\"\nprotocol = \"imap\"\naddress = \"127.0.0.1:0\"\ntls = \"implicit\"\nupstream = \"starttls\"\n",
        dovecot.imap.port(),
        dovecot.ca_pem().display().to_string()
    );
    let legacy_config =
        config.replace("connect_timeout = \"3s\"", "tls_min_version = \"1.0\"\nconnect_timeout = \"3s\"") + &starttls;
    let legacy = Gateway::start(dir.path(), &legacy_config);
    for listener in ["imaps", "via-starttls"] {
        let mut client = Client::tls(legacy.addr(listener), pki.client_config(&[]));
        client.line().unwrap();
        client.login(BOB);
        client.command("s", "SELECT INBOX");
        let fetched = client.command("f", "FETCH 1 BODY[]").join("\n");
        assert!(fetched.contains("Subject: tls1-upstream"), "{listener}: {fetched}\n{}", legacy.log());
    }
    let mut pop3 = Client::tls(legacy.addr("pop3s"), pki.client_config(&[]));
    assert!(pop3.line().unwrap().starts_with("+OK"));
    pop3.send(b"USER bob\r\nPASS bob-Pass-42\r\nRETR 1\r\n");
    let lines: Vec<String> = std::iter::from_fn(|| pop3.line()).take_while(|l| l != ".").collect();
    assert!(lines.iter().any(|l| l == "Subject: tls1-upstream"), "{lines:?}");

    let log = legacy.log();
    assert!(
        log.lines().any(|l| l.contains("upstream TLS established") && l.contains("tls=\"TLSv1 ")),
        "mailgate did not log a TLS 1.0 upstream handshake:\n{log}"
    );
    let upstream_log = dovecot.log();
    assert!(
        upstream_log.lines().any(|l| l.contains("Login: user=<bob>") && l.contains("TLSv1 with cipher")),
        "{upstream_log}"
    );
}
