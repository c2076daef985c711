mod support;

// Moving old clients to TLS (issue 15): a STARTTLS listener that warns, then refuses at
// its enforcement date; exceptions per user and network; what the reports and metrics
// say of who is left. Python's imaplib and poplib are the old clients, logging in without
// STARTTLS; Dovecot is the upstream, reached over TLS whatever the client did.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::client::Client;
use support::gateway::Gateway;
use support::setup::*;

/// An old client that never uses STARTTLS: logs in, reads what the server told it, and
/// prints it as JSON (one object).
const OLD_CLIENT: &str = r#"
import imaplib, json, poplib, sys
imaplib.Commands.setdefault("ID", ("NONAUTH", "AUTH", "SELECTED"))
protocol, host, port, user, password, name = sys.argv[1:7]
out = {}
try:
    if protocol == "imap":
        m = imaplib.IMAP4(host, int(port), timeout=20)
        out["capabilities"] = sorted(c.decode() if isinstance(c, bytes) else c for c in m.capabilities)
        if name:
            typ, data = m._simple_command("ID", '("name" "%s" "version" "1.0")' % name)
            out["id"] = typ
        typ, data = m.login(user, password)
        out["login"] = typ
        # imaplib keeps "* OK [ALERT] text" under OK (and the bare code under ALERT).
        out["alert"] = [d.decode() for d in m.untagged_responses.get("OK", []) if d.startswith(b"[ALERT]")]
        typ, data = m.select("INBOX")
        out["select"] = typ
        m.logout()
    else:
        p = poplib.POP3(host, int(port), timeout=20)
        out["capabilities"] = sorted(p.capa().keys())
        p.user(user)
        out["login"] = p.pass_(password).decode()
        out["stat"] = list(p.stat())
        p.quit()
except (imaplib.IMAP4.error, poplib.error_proto) as e:
    out["error"] = str(e)
print(json.dumps(out))
"#;

/// Runs [`OLD_CLIENT`] against `listener`: its JSON answer.
fn old_client(gateway: &Gateway, listener: &str, (user, password): (&str, &str), id_name: &str) -> serde_json::Value {
    let addr = gateway.addr(listener);
    let protocol = if listener.starts_with("pop3") { "pop3" } else { "imap" };
    let mut child = Command::new("python3")
        .args(["-c", OLD_CLIENT, protocol, &addr.ip().to_string(), &addr.port().to_string(), user, password, id_name])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (tests/run.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the old client hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out} {err}"))
}

/// The listener `name`'s block with `keys` added.
fn with_keys(config: String, name: &str, keys: &str) -> String {
    let head = format!("name = \"{name}\"\n");
    let at = config.find(&head).unwrap_or_else(|| panic!("no listener {name}"));
    let end = at + config[at..].find("\n\n").unwrap() + 1;
    format!("{}{keys}{}", &config[..end], &config[end..])
}

/// The body of the admin listener's answer to `GET path`.
fn http_get(gateway: &Gateway, path: &str) -> String {
    let text = gateway.admin_get(path);
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}

fn counter(gateway: &Gateway, series: &str) -> u64 {
    let text = gateway.metrics();
    let line = text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("no {series}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

fn plaintext_logins(gateway: &Gateway, protocol: &str, listener: &str, mode: &str) -> u64 {
    counter(
        gateway,
        &format!("mailgate_plaintext_logins_total{{listener=\"{listener}\",mode=\"{mode}\",protocol=\"{protocol}\"}}"),
    )
}

const WARNED: &str = "plaintext_auth = \"warn\"\nenforce_after = \"2099-01-01T00:00:00Z\"\n";
const ENFORCED: &str = "plaintext_auth = \"warn\"\nenforce_after = \"2020-01-01T00:00:00Z\"\n";

#[test]
fn warned_old_clients_log_in_are_told_and_are_listed_for_the_support_team() {
    let setup = Setup::start_edited("", "", |config, _| with_keys(with_keys(config, "imap", WARNED), "pop3", WARNED));
    let gateway = &setup.gateway;

    let imap = old_client(gateway, "imap", BOB, "OldMail");
    assert_eq!(imap["login"], "OK", "{imap}");
    assert_eq!(imap["select"], "OK", "{imap}");
    let caps = imap["capabilities"].to_string();
    assert!(caps.contains("STARTTLS") && caps.contains("AUTH=PLAIN") && !caps.contains("LOGINDISABLED"), "{caps}");
    let alert = imap["alert"][0].as_str().unwrap_or_default();
    assert!(alert.contains("without encryption") && alert.contains("2099-01-01"), "{imap}");

    let pop3 = old_client(gateway, "pop3", BOB, "");
    let ok = pop3["login"].as_str().unwrap();
    assert!(ok.starts_with("+OK Logged in. ") && ok.contains("2099-01-01"), "{pop3}");
    assert!(pop3["stat"].is_array(), "{pop3}");
    assert!(pop3["capabilities"].to_string().contains("STLS"), "{pop3}");

    assert_eq!(plaintext_logins(gateway, "imap", "imap", "warn"), 1);
    assert_eq!(plaintext_logins(gateway, "pop3", "pop3", "warn"), 1);
    assert_eq!(plaintext_logins(gateway, "imap", "imap", "refuse"), 0);

    // The report: who, with what, from where.
    let report: serde_json::Value = serde_json::from_str(&http_get(gateway, "/debug/plaintext-clients")).unwrap();
    let rows = report.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{report}");
    let imap_row = rows.iter().find(|r| r["protocol"] == "imap").unwrap();
    assert_eq!(imap_row["user"], "bob");
    assert_eq!(imap_row["mode"], "warn");
    assert_eq!(imap_row["client"]["name"], "OldMail");
    assert_eq!(imap_row["client"]["version"], "1.0");
    assert_eq!(imap_row["address_prefix"], "127.0.0.0/24");
    assert_eq!(imap_row["logins"], 1);
    let csv = http_get(gateway, "/debug/plaintext-clients.csv");
    assert!(csv.contains("\r\nbob,imap,imap,warn,OldMail,1.0,,127.0.0.0/24,"), "{csv}");
    assert!(csv.contains("\r\nbob,pop3,pop3,warn,,,,127.0.0.0/24,"), "{csv}");

    // The census: the same logins, without TLS.
    let census = http_get(gateway, "/debug/client-software");
    let census: serde_json::Value = serde_json::from_str(&census).unwrap();
    let old = census.as_array().unwrap().iter().find(|r| r["client"]["name"] == "OldMail").expect("OldMail counted");
    assert_eq!((old["tls"].as_str(), old["logins"].as_u64()), (Some("none"), Some(1)), "{census}");

    // The password crossed one network in clear, never two: Dovecot saw TLS.
    let dovecot = setup.dovecot.log();
    let logins: Vec<_> = dovecot.lines().filter(|l| l.contains("Login: user=<bob>")).collect();
    assert_eq!(logins.len(), 2, "{dovecot}");
    assert!(logins.iter().all(|l| l.contains(", TLS")), "{logins:?}");
    // And no password anywhere in mailgate's log or reports.
    for text in [gateway.log(), csv, census.to_string(), report.to_string()] {
        assert!(!text.contains(BOB.1), "a password leaked: {text}");
    }
}

#[test]
fn refused_before_and_after_the_enforcement_date() {
    let setup =
        Setup::start_edited("", "", |config, _| with_keys(with_keys(config, "imap", ENFORCED), "pop3", ENFORCED));
    // The default STARTTLS listener refused all along; these warned until 2020 and refuse now.
    let imap = old_client(&setup.gateway, "imap", BOB, "");
    assert!(imap["error"].as_str().unwrap_or_default().contains("PRIVACYREQUIRED"), "{imap}");
    assert!(imap["capabilities"].to_string().contains("LOGINDISABLED"), "{imap}");
    let pop3 = old_client(&setup.gateway, "pop3", BOB, "");
    assert!(pop3["error"].as_str().unwrap_or_default().contains("[AUTH]"), "{pop3}");
    assert_eq!(plaintext_logins(&setup.gateway, "imap", "imap", "refuse"), 1);
    assert_eq!(plaintext_logins(&setup.gateway, "pop3", "pop3", "refuse"), 1);
    assert_eq!(plaintext_logins(&setup.gateway, "imap", "imap", "warn"), 0);
    assert_eq!(http_get(&setup.gateway, "/debug/plaintext-clients").trim(), "[]");
    // The alert rules see the date.
    assert_eq!(counter(&setup.gateway, "mailgate_plaintext_enforce_after_seconds{listener=\"imap\"}"), 1_577_836_800);
    // Whoever upgrades is served as ever.
    let mut client = Client::plain(setup.addr("imap"));
    client.line();
    client.starttls(setup.tls_config());
    assert!(client.command("l", &format!("LOGIN {} {}", BOB.0, BOB.1)).last().unwrap().starts_with("l OK"));
}

/// The overrides file at `dir`, named in `config`'s `[limits]`.
fn with_overrides(config: String, dir: &Path, overrides: &str) -> String {
    let path = dir.join("overrides.toml");
    std::fs::write(&path, overrides).unwrap();
    format!("{config}\n[limits]\noverrides_file = {:?}\n", path.display().to_string())
}

#[test]
fn exceptions_let_their_user_or_network_in_until_their_own_date() {
    // The listener refuses (its default); bob has until 2099, carol's exception is over.
    let overrides = "[users.\"BOB\"]\nplaintext_until = \"2099-06-30T00:00:00+02:00\"\n\n[users.alice]\nplaintext_until = \"2021-01-01T00:00:00Z\"\n";
    let setup = Setup::start_edited("", "", |config, dir| with_overrides(config, dir, overrides));
    let bob = old_client(&setup.gateway, "imap", BOB, "Eudora");
    assert_eq!(bob["login"], "OK", "{bob}");
    assert!(bob["alert"][0].as_str().unwrap_or_default().contains("2099-06-30"), "{bob}");
    // Refused: the exception has ended (a password with quotes, sent as a literal: the
    // listener waits for the user name before deciding).
    let mut alice = Client::plain(setup.addr("imap"));
    alice.line();
    alice.send(b"a LOGIN alice {3}\r\n");
    assert_eq!(alice.line().unwrap(), "+ Ready for literal data");
    alice.send(b"pw!\r\n");
    assert!(alice.line().unwrap().starts_with("a NO [PRIVACYREQUIRED]"));
    let pop3 = old_client(&setup.gateway, "pop3", BOB, "");
    assert!(pop3["login"].as_str().unwrap_or_default().contains("2099-06-30"), "{pop3}");
    assert_eq!(plaintext_logins(&setup.gateway, "imap", "imap", "exception"), 1);
    assert_eq!(plaintext_logins(&setup.gateway, "imap", "imap", "refuse"), 1);

    // The help desk extends alice's exception: the overrides file and SIGHUP, no restart.
    let extended = overrides.replace("2021-01-01T00:00:00Z", "2099-02-01T00:00:00Z");
    std::fs::write(setup.dir.path().join("overrides.toml"), extended).unwrap();
    let pid = setup.gateway.pid().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    assert!(setup.gateway.wait_for_log("configuration reloaded", Duration::from_secs(10)), "{}", setup.gateway.log());
    let mut alice = Client::plain(setup.addr("imap"));
    alice.line();
    alice.send(format!("L LOGIN alice {{{}+}}\r\n{}\r\n", ALICE.1.len(), ALICE.1).as_bytes());
    let lines = alice.until_tagged("L");
    assert!(lines[0].starts_with("* OK [ALERT] ") && lines[0].contains("2099-02-01"), "{lines:?}");
    assert!(lines.last().unwrap().starts_with("L OK"), "{lines:?}");
    assert_eq!(plaintext_logins(&setup.gateway, "imap", "imap", "exception"), 2);

    // A network's exception covers everyone from it, announced before any user name.
    let config = std::fs::read_to_string(&setup.gateway.config_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let network = "[networks.\"127.0.0.0/8\"]\nplaintext_until = \"2099-01-01T00:00:00Z\"\n";
    let (first, path) = (setup.dir.path().join("overrides.toml"), dir.path().join("overrides.toml"));
    std::fs::write(&path, network).unwrap();
    let config =
        config.replace(&format!("{:?}", first.display().to_string()), &format!("{:?}", path.display().to_string()));
    let second = Gateway::start(dir.path(), &config);
    let pop3 = old_client(&second, "pop3", BOB, "");
    assert!(pop3["capabilities"].to_string().contains("USER"), "{pop3}");
    assert!(pop3["login"].as_str().unwrap_or_default().contains("2099-01-01"), "{pop3}");
}

#[test]
fn client_software_is_counted_once_per_login_with_its_tls_version() {
    let setup = Setup::start();
    // ID after login (as Thunderbird does), then none at all.
    let mut client = setup.login(BOB);
    assert!(client
        .command("i", "ID (\"name\" \"Thunderbird\" \"version\" \"115.0\")")
        .last()
        .unwrap()
        .starts_with("i OK"));
    client.command("j", "ID (\"name\" \"Other\" \"version\" \"1\")");
    client.command("z", "LOGOUT");
    drop(client);
    let mut quiet = setup.login(BOB);
    quiet.command("z", "LOGOUT");
    drop(quiet);
    let deadline = Instant::now() + Duration::from_secs(10);
    let rows = loop {
        let census: serde_json::Value =
            serde_json::from_str(&http_get(&setup.gateway, "/debug/client-software")).unwrap();
        let rows = census.as_array().unwrap().clone();
        if rows.iter().map(|r| r["logins"].as_u64().unwrap()).sum::<u64>() >= 2 || Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let seen: Vec<_> =
        rows.iter().map(|r| (r["client"]["name"].as_str(), r["tls"].as_str(), r["logins"].as_u64())).collect();
    assert!(seen.contains(&(Some("Thunderbird"), Some("TLSv1.3"), Some(1))), "{seen:?}");
    assert!(seen.contains(&(None, Some("TLSv1.3"), Some(1))), "{seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");
    // TLS logins are no plaintext logins.
    assert_eq!(http_get(&setup.gateway, "/debug/plaintext-clients").trim(), "[]");
}
