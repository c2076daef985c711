//! The standard test setup: a real Dovecot upstream, test certificates, and mailgate in
//! front with six listeners (IMAP `imaps`, `imap`, `plain`; POP3 `pop3s`, `pop3`,
//! `pop3-plain`: implicit TLS, STARTTLS/STLS, plaintext) whose upstream is Dovecot over
//! implicit TLS, verified against Dovecot's certificate.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::ClientConfig;

use super::client::Client;
use super::dovecot::Dovecot;
use super::gateway::Gateway;
use super::tls::{client_config_trusting, TestPki};

/// A user whose password needs quoting and a literal (space, quote, backslash, braces,
/// non-ASCII), to prove credentials pass through unchanged.
pub const ALICE: (&str, &str) = ("alice", "s3cret pw\"\\{5}ä");
pub const BOB: (&str, &str) = ("bob", "bob-Pass-42");

pub struct Setup {
    pub dir: tempfile::TempDir,
    pub pki: TestPki,
    pub dovecot: Dovecot,
    pub gateway: Gateway,
}

impl Setup {
    pub fn start() -> Setup {
        Setup::start_with("", "")
    }

    /// `imap_section` lines go under `[imap]`; `extra` is appended to the config.
    pub fn start_with(imap_section: &str, extra: &str) -> Setup {
        Setup::start_edited(imap_section, extra, |config, _| config)
    }

    /// Like [`Setup::start_with`], the configuration then rewritten by `edit` (given the
    /// test's directory, for files the configuration names).
    pub fn start_edited(imap_section: &str, extra: &str, edit: impl FnOnce(String, &Path) -> String) -> Setup {
        Setup::build(Dovecot::start(&[ALICE, BOB]), imap_section, extra, edit)
    }

    /// mailgate in front of `dovecot` (started with other options), configured as by
    /// [`Setup::start_with`].
    pub fn in_front_of(dovecot: Dovecot, imap_section: &str, extra: &str) -> Setup {
        Setup::build(dovecot, imap_section, extra, |config, _| config)
    }

    /// [`Setup::in_front_of`], the configuration then rewritten by `edit` (given the test's
    /// directory).
    pub fn in_front_of_edited(
        dovecot: Dovecot,
        imap_section: &str,
        extra: &str,
        edit: impl FnOnce(String, &Path) -> String,
    ) -> Setup {
        Setup::build(dovecot, imap_section, extra, edit)
    }

    fn build(dovecot: Dovecot, imap_section: &str, extra: &str, edit: impl FnOnce(String, &Path) -> String) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::generate(dir.path());
        let config = gateway_config_with(
            &pki,
            Some(&format!("127.0.0.1:{}", dovecot.imaps.port())),
            Some(&format!("127.0.0.1:{}", dovecot.pop3s.port())),
            "implicit",
            Some(&dovecot.ca_pem()),
            imap_section,
            extra,
        );
        let config = edit(config, dir.path());
        let gateway = Gateway::start(dir.path(), &config);
        Setup { dir, pki, dovecot, gateway }
    }

    pub fn tls_config(&self) -> Arc<ClientConfig> {
        self.pki.client_config(&[])
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.gateway.addr(listener)
    }

    /// A POP3 client on the implicit-TLS listener, greeting consumed.
    pub fn pop3s(&self) -> Client {
        let mut client = Client::tls(self.addr("pop3s"), self.tls_config());
        let greeting = client.line().expect("greeting");
        assert!(greeting.starts_with("+OK"), "{greeting}");
        client
    }

    /// A POP3 client logged in with USER/PASS over implicit TLS.
    pub fn pop3_login(&self, (user, password): (&str, &str)) -> Client {
        let mut client = self.pop3s();
        client.send(format!("USER {user}\r\nPASS {password}\r\n").as_bytes());
        assert!(client.line().unwrap().starts_with("+OK"));
        let ok = client.line().unwrap();
        assert!(ok.starts_with("+OK"), "{ok}");
        client
    }

    /// A POP3 client straight to Dovecot, logged in.
    pub fn pop3_direct(&self, (user, password): (&str, &str)) -> Client {
        let mut client = Client::tls(self.dovecot.pop3s, client_config_trusting(&self.dovecot.ca_pem(), &[]));
        assert!(client.line().unwrap().starts_with("+OK"));
        client.send(format!("USER {user}\r\nPASS {password}\r\n").as_bytes());
        assert!(client.line().unwrap().starts_with("+OK"));
        let ok = client.line().unwrap();
        assert!(ok.starts_with("+OK"), "{ok}");
        client
    }

    /// A client on the implicit-TLS listener, greeting consumed.
    pub fn imaps(&self) -> Client {
        let mut client = Client::tls(self.addr("imaps"), self.tls_config());
        let greeting = client.line().expect("greeting");
        assert!(greeting.starts_with("* OK"), "{greeting}");
        client
    }

    /// A client logged in as `user` over implicit TLS.
    pub fn login(&self, user: (&str, &str)) -> Client {
        let mut client = self.imaps();
        client.login(user);
        client
    }

    /// A client straight to Dovecot (for comparisons), logged in.
    pub fn direct(&self, user: (&str, &str)) -> Client {
        let mut client = Client::tls(self.dovecot.imaps, client_config_trusting(&self.dovecot.ca_pem(), &[]));
        client.line().expect("greeting");
        client.login(user);
        client
    }
}

/// A mailgate configuration with the three standard IMAP listeners.
pub fn gateway_config(
    pki: &TestPki,
    upstream: &str,
    upstream_tls: &str,
    ca: Option<&std::path::Path>,
    imap_section: &str,
    extra: &str,
) -> String {
    gateway_config_with(pki, Some(upstream), None, upstream_tls, ca, imap_section, extra)
}

/// The IMAP listeners (`imaps`, `imap`, `plain`) when `imap` is given, the POP3 ones
/// (`pop3s`, `pop3`, `pop3-plain`) when `pop3` is given, all to one upstream.
pub fn gateway_config_with(
    pki: &TestPki,
    imap: Option<&str>,
    pop3: Option<&str>,
    upstream_tls: &str,
    ca: Option<&std::path::Path>,
    imap_section: &str,
    extra: &str,
) -> String {
    let ca = ca.map(|p| format!("ca_file = {:?}\n", p.display().to_string())).unwrap_or_default();
    let mut config = String::new();
    let mut upstream = String::new();
    for (protocol, address, names) in
        [("imap", imap, ["imaps", "imap", "plain"]), ("pop3", pop3, ["pop3s", "pop3", "pop3-plain"])]
    {
        let Some(address) = address else { continue };
        upstream.push_str(&format!("{protocol} = \"{address}\"\n"));
        for (name, tls) in names.into_iter().zip(["implicit", "starttls", "plaintext"]) {
            config.push_str(&format!(
                "[[listener]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\naddress = \"127.0.0.1:0\"\ntls = \"{tls}\"\n\n"
            ));
        }
    }
    config.push_str(&format!(
        r#"
[tls]
certificates = [{{ cert = {cert:?}, key = {key:?} }}]
handshake_timeout = "5s"

[upstream.default]
{upstream}tls = "{upstream_tls}"
{ca}
connect_timeout = "3s"
tls_timeout = "3s"
login_timeout = "15s"

[imap]
{imap_section}

[admin]
address = "127.0.0.1:0"

[shutdown]
grace = "10s"
{extra}
"#,
        cert = pki.cert.display().to_string(),
        key = pki.key.display().to_string(),
    ));
    config
}
