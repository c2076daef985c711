//! The standard test setup: a real Dovecot upstream, test certificates, and mailgate in
//! front with three listeners (`imaps` implicit TLS, `imap` STARTTLS, `plain` plaintext)
//! whose upstream is Dovecot over implicit TLS, verified against Dovecot's certificate.

use std::net::SocketAddr;
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
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::generate(dir.path());
        let dovecot = Dovecot::start(&[ALICE, BOB]);
        let config = gateway_config(
            &pki,
            &format!("127.0.0.1:{}", dovecot.imaps.port()),
            "implicit",
            Some(&dovecot.ca_pem()),
            imap_section,
            extra,
        );
        let gateway = Gateway::start(dir.path(), &config);
        Setup { dir, pki, dovecot, gateway }
    }

    pub fn tls_config(&self) -> Arc<ClientConfig> {
        self.pki.client_config(&[])
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.gateway.addr(listener)
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

/// A mailgate configuration with the three standard listeners.
pub fn gateway_config(
    pki: &TestPki,
    upstream: &str,
    upstream_tls: &str,
    ca: Option<&std::path::Path>,
    imap_section: &str,
    extra: &str,
) -> String {
    let ca = ca.map(|p| format!("ca_file = {:?}\n", p.display().to_string())).unwrap_or_default();
    format!(
        r#"
[[listener]]
name = "imaps"
protocol = "imap"
address = "127.0.0.1:0"
tls = "implicit"

[[listener]]
name = "imap"
protocol = "imap"
address = "127.0.0.1:0"
tls = "starttls"

[[listener]]
name = "plain"
protocol = "imap"
address = "127.0.0.1:0"
tls = "plaintext"

[tls]
certificates = [{{ cert = {cert:?}, key = {key:?} }}]
handshake_timeout = "5s"

[upstream.default]
imap = "{upstream}"
tls = "{upstream_tls}"
{ca}
connect_timeout = "3s"
tls_timeout = "3s"
login_timeout = "5s"

[imap]
{imap_section}

[shutdown]
grace = "10s"
{extra}
"#,
        cert = pki.cert.display().to_string(),
        key = pki.key.display().to_string(),
    )
}
