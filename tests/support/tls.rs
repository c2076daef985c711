//! Test certificates (a CA and leaves signed by it, made with rcgen) and a blocking TLS
//! client config that trusts that CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tokio_rustls::rustls::{self, pki_types::pem::PemObject, pki_types::CertificateDer, ClientConfig, RootCertStore};

pub struct TestPki {
    pub ca: PathBuf,
    /// A leaf for `localhost` and 127.0.0.1/::1.
    pub cert: PathBuf,
    pub key: PathBuf,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
    dir: PathBuf,
}

impl TestPki {
    pub fn generate(dir: &Path) -> TestPki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.distinguished_name.push(DnType::CommonName, "mailgate test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        let mut pki =
            TestPki { ca, cert: PathBuf::new(), key: PathBuf::new(), ca_cert, ca_key, dir: dir.to_path_buf() };
        let (cert, key) = pki.leaf("leaf", &["localhost", "127.0.0.1", "::1"]);
        pki.cert = cert;
        pki.key = key;
        pki
    }

    /// A leaf certificate for `names`, signed by the CA; returns (cert, key) paths.
    pub fn leaf(&self, file_stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, file_stem);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        let cert_path = self.dir.join(format!("{file_stem}.pem"));
        let key_path = self.dir.join(format!("{file_stem}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// A client config trusting the test CA, offering `alpn` (none when empty).
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        client_config_trusting(&self.ca, alpn)
    }
}

pub fn client_config_trusting(ca: &Path, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(config)
}
