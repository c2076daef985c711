mod support;

// Support insight (issue 18) against Dovecot: the account histories the relays keep, the
// detections they fire, and the support view an operator reads (`/debug/accounts/<user>`).
// Clients are told apart by the network of their address: the tests connect from
// 127.0.0.1 (127.0.0.0/24) and 127.0.1.5 (127.0.1.0/24), both loopback.

use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use support::client::{tcp_from, Client};
use support::fetchmail::{fetchmail, Poll, Tls};
use support::setup::*;

const TOKEN: &str = "insight-test-token-0123456789";
const OTHER_NETWORK: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 1, 5));

/// The standard setup with the admin token, `insight` settings, and logins without TLS
/// allowed on the plaintext listeners.
fn setup(insight: &str) -> Setup {
    Setup::start_edited("", &format!("\n[insight]\n{insight}\n"), |config, dir| {
        let token_file = dir.join("admin-token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        config
            .replace("[admin]\n", &format!("[admin]\ntoken_file = {:?}\n", token_file.display().to_string()))
            .replace("tls = \"plaintext\"\n", "tls = \"plaintext\"\nplaintext_auth = \"allow\"\n")
    })
}

/// `GET path` on the admin listener with the bearer token: status line and body.
fn admin(setup: &Setup, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut tcp = TcpStream::connect(setup.gateway.admin()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    tcp.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// Waits (bounded) until the support view of `user` satisfies `ready`; returns it.
fn view_when(setup: &Setup, user: &str, ready: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = admin(setup, &format!("/debug/accounts/{user}"));
        if status == "HTTP/1.1 200 OK" {
            let view: serde_json::Value = serde_json::from_str(&body).unwrap();
            if ready(&view) {
                return view;
            }
            assert!(Instant::now() < deadline, "the view never became ready:\n{body}\n{}", setup.gateway.log());
        } else {
            assert!(Instant::now() < deadline, "{status}: {body}\n{}", setup.gateway.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn detections(view: &serde_json::Value) -> Vec<String> {
    let list = view["detections"].as_array().unwrap();
    list.iter().map(|d| d["detection"].as_str().unwrap().to_string()).collect()
}

/// `mailgate_insight_detections_total{kind}` as exported.
fn detected(setup: &Setup, kind: &str) -> u64 {
    let needle = format!("mailgate_insight_detections_total{{kind=\"{kind}\"}} ");
    let metrics = setup.gateway.metrics();
    let line = metrics.lines().find(|l| l.starts_with(&needle)).unwrap_or_else(|| panic!("no {needle}"));
    line[needle.len()..].trim().parse().unwrap()
}

/// An IMAP client from the other network, logged in as `user`, its software said by `ID`.
fn imap_from_other_network(setup: &Setup, user: (&str, &str), software: &str) -> Client {
    let mut client = Client::tls_over(tcp_from(setup.addr("imaps"), OTHER_NETWORK), setup.tls_config());
    assert!(client.line().unwrap().starts_with("* OK"));
    client.login(user);
    let id = client.command("i", &format!("ID (\"name\" \"{software}\" \"version\" \"2.1\")"));
    assert!(id.last().unwrap().starts_with("i OK"), "{id:?}");
    client
}

/// Messages in a Maildir's `cur` and `new`.
fn messages_in(maildir: &Path) -> usize {
    ["cur", "new"].iter().map(|d| std::fs::read_dir(maildir.join(d)).map_or(0, |e| e.count())).sum()
}

/// A POP3 session that looks at the maildrop (`STAT`) and quits, from `source`.
fn pop3_poll(setup: &Setup, source: Option<IpAddr>, (user, password): (&str, &str)) -> String {
    let mut client = match source {
        Some(source) => Client::tls_over(tcp_from(setup.addr("pop3s"), source), setup.tls_config()),
        None => Client::tls(setup.addr("pop3s"), setup.tls_config()),
    };
    assert!(client.line().unwrap().starts_with("+OK"));
    client.send(format!("USER {user}\r\nPASS {password}\r\nSTAT\r\n").as_bytes());
    for _ in 0..2 {
        let line = client.line().unwrap();
        assert!(line.starts_with("+OK"), "{line}");
    }
    let stat = client.line().unwrap();
    assert!(stat.starts_with("+OK "), "{stat}");
    client.send(b"QUIT\r\n");
    assert!(client.line().unwrap().starts_with("+OK"));
    stat
}

/// "Why did my mail disappear?": fetchmail without `keep` on one computer, a phone's IMAP
/// client on another network. The detection fires once, the account view names both
/// clients and the deletion, and Dovecot's state agrees (the maildrop is empty, the IMAP
/// session is told the messages went).
#[test]
fn fetchmail_deleting_while_an_imap_client_reads_is_detected_and_explained() {
    let setup = setup("");
    let maildir = setup.dovecot.maildir("bob");
    setup.dovecot.fill("bob", 3, 18);
    let mut phone = imap_from_other_network(&setup, BOB, "Phone Mail");
    let selected = phone.command("s", "SELECT INBOX");
    assert!(selected.iter().any(|l| l == "* 3 EXISTS"), "{selected:?}");

    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("delivered");
    std::fs::create_dir(&out).unwrap();
    let ca = setup.pki.ca.clone();
    let poll = Poll {
        port: setup.addr("pop3s").port(),
        ca: &ca,
        tls: Tls::Implicit,
        keep: false,
        out: &out,
        block_after: None,
    };
    let log = || setup.gateway.log();
    fetchmail(work.path(), &poll, &log);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 3, "fetchmail delivered the three messages");
    assert_eq!(messages_in(&maildir), 0, "and deleted them from the server");
    // The phone's session is told, as Dovecot tells it.
    let noop = phone.command("n", "NOOP");
    assert_eq!(noop.iter().filter(|l| l.ends_with(" EXPUNGE")).count(), 3, "{noop:?}");

    let view = view_when(&setup, "bob", |v| v["deletions"].as_array().is_some_and(|d| !d.is_empty()));
    println!("example account view:\n{}", serde_json::to_string_pretty(&view).unwrap());
    assert_eq!(view["account"], "bob");
    let devices = view["devices"].as_array().unwrap();
    let pop3 = devices.iter().find(|d| d["protocol"] == "pop3").expect("the POP3 client is listed");
    assert_eq!((pop3["network"].as_str(), pop3["listener"].as_str()), (Some("127.0.0.0/24"), Some("pop3s")));
    assert_eq!(pop3["deleted"], 3);
    assert_eq!(pop3["messages"], 3);
    assert!(pop3["tls"].as_str().unwrap().starts_with("TLSv1."), "{pop3}");
    let imap = devices.iter().find(|d| d["protocol"] == "imap").expect("the IMAP client is listed");
    assert_eq!(imap["software"], "Phone Mail 2.1");
    assert_eq!(imap["network"], "127.0.1.0/24");
    assert_eq!(imap["connected"], true, "its session is still open");
    let deletion = &view["deletions"][0];
    assert_eq!(deletion["count"], 3);
    assert!(deletion["client"].as_str().unwrap().starts_with("POP3 client from 127.0.0.0/24"), "{deletion}");
    assert_eq!(detections(&view), ["pop3_deletes_shared"]);
    let finding = view["findings"][0].as_str().unwrap();
    assert!(finding.contains("Phone Mail 2.1") && finding.contains("mail disappears"), "{finding}");
    assert_eq!(detected(&setup, "pop3_deletes_shared"), 1);
    assert!(setup.gateway.log().contains("detection=\"pop3_deletes_shared\""));

    // The recent detections name the account.
    let (status, body) = admin(&setup, "/debug/detections");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let recent: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(recent[0]["account"], "bob");
    assert_eq!(recent[0]["detection"], "pop3_deletes_shared");

    // The next poll the same day: nothing new to tell.
    setup.dovecot.fill("bob", 1, 19);
    fetchmail(work.path(), &poll, &log);
    phone.command("z", "LOGOUT");
    // The phone's session ends as its LOGOUT is answered: recorded a moment later.
    let imap_ended = |v: &serde_json::Value| {
        v["devices"].as_array().unwrap().iter().any(|d| d["protocol"] == "imap" && d["connected"] == false)
    };
    let view = view_when(&setup, "bob", |v| v["deletions"].as_array().is_some_and(|d| d.len() == 2) && imap_ended(v));
    assert_eq!(detections(&view), ["pop3_deletes_shared"], "fires once per repeat_after");
    assert_eq!(detected(&setup, "pop3_deletes_shared"), 1);
    let imap = view["devices"].as_array().unwrap().iter().find(|d| d["protocol"] == "imap").unwrap().clone();
    assert_eq!(imap["connected"], false);
    assert_eq!(imap["sessions"], 1);
}

/// A POP3 client that keeps everything while mail keeps arriving: the growth detection
/// fires at the third poll, not before; a single client is not "several".
#[test]
fn pop3_never_deleting_while_the_maildrop_grows_is_detected() {
    let setup = setup("growth_polls = 3");
    setup.dovecot.fill("bob", 2, 21);
    assert_eq!(pop3_poll(&setup, None, BOB).split(' ').nth(1), Some("2"));
    setup.dovecot.fill("bob", 1, 22);
    pop3_poll(&setup, None, BOB);
    let view = view_when(&setup, "bob", |v| v["devices"][0]["sessions"] == 2);
    assert!(detections(&view).is_empty(), "two polls are not yet a trend: {view}");
    setup.dovecot.fill("bob", 1, 23);
    pop3_poll(&setup, None, BOB);
    let view = view_when(&setup, "bob", |v| !detections(v).is_empty());
    assert_eq!(detections(&view), ["pop3_keeps_mail"]);
    let text = view["detections"][0]["text"].as_str().unwrap();
    assert!(text.contains("2 to 4 messages") && text.contains("3 polls"), "{text}");
    assert_eq!(view["devices"].as_array().unwrap().len(), 1);
    assert_eq!(detected(&setup, "pop3_keeps_mail"), 1);
    assert_eq!(detected(&setup, "pop3_several_clients"), 0);
}

/// Two POP3 clients on different networks polling one account.
#[test]
fn several_pop3_clients_on_one_account_are_detected() {
    let setup = setup("");
    setup.dovecot.fill("alice", 1, 31);
    pop3_poll(&setup, None, ALICE);
    pop3_poll(&setup, Some(OTHER_NETWORK), ALICE);
    let view = view_when(&setup, "alice", |v| !detections(v).is_empty());
    assert_eq!(detections(&view), ["pop3_several_clients"]);
    let text = view["detections"][0]["text"].as_str().unwrap();
    assert!(text.contains("127.0.0.0/24") && text.contains("127.0.1.0/24"), "{text}");
}

/// An IMAP client that expunges from INBOX and moves out of it: its deletions are counted
/// as its own (another session's EXPUNGEs are not); a login without TLS is detected.
#[test]
fn imap_expunges_and_moves_out_of_inbox_are_the_clients_deletions_and_plaintext_is_detected() {
    let setup = setup("");
    setup.dovecot.fill("bob", 5, 41);
    let mut client = setup.login(BOB);
    client.command("c", "CREATE Archive");
    client.command("s", "SELECT INBOX");
    client.command("f", "STORE 1:2 +FLAGS.SILENT (\\Deleted)");
    let expunged = client.command("e", "EXPUNGE");
    assert_eq!(expunged.iter().filter(|l| l.ends_with(" EXPUNGE")).count(), 2, "{expunged:?}");
    let moved = client.command("m", "UID MOVE 5 Archive");
    assert!(moved.last().unwrap().starts_with("m OK"), "{moved:?}");
    // Another session deletes one: this session is told, but did not do it.
    let mut other = setup.login(BOB);
    other.command("s", "SELECT INBOX");
    other.command("d", "STORE 1 +FLAGS.SILENT (\\Deleted)");
    other.command("e", "EXPUNGE");
    other.command("z", "LOGOUT");
    let noop = client.command("n", "NOOP");
    assert!(noop.iter().any(|l| l.ends_with(" EXPUNGE")), "{noop:?}");
    client.command("z", "LOGOUT");
    let view = view_when(&setup, "bob", |v| v["deletions"].as_array().is_some_and(|d| d.len() == 2));
    let mut counts: Vec<u64> =
        view["deletions"].as_array().unwrap().iter().map(|d| d["count"].as_u64().unwrap()).collect();
    counts.sort_unstable();
    assert_eq!(counts, [1, 3], "3 by the first session (2 expunged, 1 moved), 1 by the other");
    assert!(detections(&view).is_empty(), "{view}");

    // A POP3 login without TLS, on a listener that allows it.
    let mut plain = Client::plain(setup.addr("pop3-plain"));
    assert!(plain.line().unwrap().starts_with("+OK"));
    plain.send(b"USER bob\r\nPASS bob-Pass-42\r\nQUIT\r\n");
    for _ in 0..3 {
        assert!(plain.line().unwrap().starts_with("+OK"));
    }
    let view = view_when(&setup, "bob", |v| !detections(v).is_empty());
    assert_eq!(detections(&view), ["plaintext"]);
    let pop3 = view["devices"].as_array().unwrap().iter().find(|d| d["protocol"] == "pop3").unwrap().clone();
    assert_eq!((pop3["tls"].as_str(), pop3["plaintext_sessions"].as_u64()), (Some("none"), Some(1)));
}

/// Full resyncs of a large mailbox, more than the configured number a day.
#[test]
fn heavy_imap_resyncs_are_detected() {
    let setup = setup("resyncs_per_day = 1");
    setup.dovecot.fill("bob", 1000, 51);
    for round in 0..2 {
        let mut client = setup.login(BOB);
        client.command("s", "SELECT INBOX");
        let fetched = client.command("f", "FETCH 1:* (UID FLAGS)");
        assert_eq!(fetched.len(), 1001, "round {round}");
        client.command("z", "LOGOUT");
    }
    let view = view_when(&setup, "bob", |v| !detections(v).is_empty());
    assert_eq!(detections(&view), ["heavy_resyncs"]);
    assert_eq!(view["syncs"]["full_resyncs_24h"], 2);
    assert_eq!(view["devices"][0]["messages"], 2000);
}

/// With histories off nothing is kept; an unknown account is a 404; without the token
/// nothing is shown.
#[test]
fn histories_off_keep_nothing_and_the_view_needs_the_token() {
    let setup = setup("history = false");
    setup.dovecot.fill("bob", 1, 61);
    pop3_poll(&setup, None, BOB);
    assert!(setup.gateway.wait_for_log("sync cost", Duration::from_secs(10)));
    let (status, _) = admin(&setup, "/debug/accounts/bob");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let metrics = setup.gateway.metrics();
    assert!(metrics.contains("mailgate_insight_updates_total{result=\"ok\"} 0"), "{metrics}");
    let without_token = setup.gateway.admin_get("/debug/accounts/bob");
    assert!(without_token.starts_with("HTTP/1.1 401"), "{without_token}");
}
