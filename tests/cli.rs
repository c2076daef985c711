//! The `mailgate` command line: `check-config` output, error reporting and environment
//! overrides.

mod support;

use std::process::Command;

use support::setup::gateway_config;
use support::tls::TestPki;

fn check_config(path: &std::path::Path, env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mailgate"));
    command.args(["check-config", "--config"]).arg(path);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn check_config_prints_the_effective_configuration_with_environment_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let path = dir.path().join("mailgate.toml");
    std::fs::write(&path, gateway_config(&pki, "127.0.0.1:993", "implicit", Some(&pki.ca), "", "")).unwrap();
    let (ok, stdout, stderr) =
        check_config(&path, &[("MAILGATE_IMAP__IDLE_TIMEOUT", "45m"), ("MAILGATE_IMAP__MAX_BAD_COMMANDS", "5")]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("idle_timeout = \"45m\""), "{stdout}");
    assert!(stdout.contains("max_bad_commands = 5"), "{stdout}");
    assert!(stdout.contains("[[listener]]") && stdout.contains("name = \"imaps\""), "{stdout}");
    // Defaults are shown too.
    assert!(stdout.contains("max_literal_bytes = \"64MiB\""), "{stdout}");
}

#[test]
fn check_config_reports_every_error_with_its_key_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[[listener]]
name = "imaps"
protocol = "imap"
address = "127.0.0.1:993"
tls = "implicit"

[[listener]]
name = "imaps"
protocol = "imap"
address = "127.0.0.1:143"
tls = "startls"

[tls]
certificates = [{ cert = "/nonexistent/cert.pem", key = "/nonexistent/key.pem" }]

[upstream.default]
imap = "mail.example"
tls = "implicit"
"#,
    )
    .unwrap();
    let (ok, _, stderr) = check_config(&path, &[("MAILGATE_IMAP__IDLE_TIMEOUT", "later")]);
    assert!(!ok);
    for key in [
        "listener[1].tls",
        "tls.certificates[0].cert",
        "tls.certificates[0].key",
        "upstream.default.imap",
        "imap.idle_timeout",
    ] {
        assert!(stderr.contains(&format!("error: {key}:")), "{key} missing:\n{stderr}");
    }
}

#[test]
fn the_shipped_example_only_lacks_its_certificate_files() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mailgate.example.toml");
    let (ok, _, stderr) = check_config(&path, &[]);
    assert!(!ok);
    for line in stderr.lines() {
        assert!(line.contains("is not a readable file"), "{line}");
    }
}
