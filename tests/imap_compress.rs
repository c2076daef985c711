mod support;

// COMPRESS=DEFLATE (RFC 4978) on the client leg: mailgate compresses for any upstream, the
// upstream never sees the command. Clients: Python's zlib over ssl, the tests' own client
// (flate2), mbsync (tests/imap_clients.rs asserts its sessions compressed).

use std::process::Command;
use std::time::Duration;

use support::answers::{answer, answer_from_bytes};
use support::dovecot::{Dovecot, Options};
use support::process::run_bounded;
use support::setup::*;

const HEADERS: &str = "UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])";

fn metric(setup: &Setup, name: &str) -> f64 {
    let metrics = setup.gateway.metrics();
    let line = metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("{name} not exported"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A client logged in through mailgate that turned COMPRESS on.
fn compressed(setup: &Setup, user: (&str, &str)) -> support::client::Client {
    let mut client = setup.login(user);
    assert_eq!(client.command("z", "COMPRESS DEFLATE"), ["z OK DEFLATE active"]);
    client.compress();
    client
}

#[test]
fn python_zlib_client_syncs_headers_and_idles_compressed_over_tls() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 300, 4_978);
    // Dovecot's own answer to the header sync, before the Python client adds a message.
    let mut direct = setup.direct(BOB);
    direct.command("s", "EXAMINE INBOX");
    let want = answer(&mut direct, "e", HEADERS);
    direct.command("z", "LOGOUT");

    let addr = setup.addr("imaps");
    let fetch_out = setup.dir.path().join("fetch.bin");
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=5", "120", "python3"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/compress_client.py"))
        .args(["--host", &addr.ip().to_string(), "--port", &addr.port().to_string()])
        .arg("--cafile")
        .arg(&setup.pki.ca)
        .args(["--user", BOB.0, "--password", BOB.1])
        .args(["--dovecot-port", &setup.dovecot.imaps.port().to_string()])
        .arg("--dovecot-ca")
        .arg(setup.dovecot.ca_pem())
        .arg("--fetch-out")
        .arg(&fetch_out)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let run = run_bounded(cmd, Duration::from_secs(130));
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "python client failed: {stdout}\n{}\n--- mailgate log ---\n{}",
        run.stderr(),
        setup.gateway.log()
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    println!("{seen}");
    assert_eq!(seen["exists"], 300);
    assert_eq!(seen["fetch_responses"], 300);
    let got = answer_from_bytes(&std::fs::read(&fetch_out).unwrap(), "e");
    assert_eq!(got, want, "header sync through COMPRESS differs from Dovecot's: {}", got.diff(&want));
    let (wire, plain) = (seen["fetch_wire"].as_f64().unwrap(), seen["fetch_plain"].as_f64().unwrap());
    assert!(wire < plain * 0.35, "the header sync took {wire} bytes on the wire for {plain}");
    assert_eq!(seen["idle_exists"], 301, "IDLE announced the new message");
    assert_eq!(seen["new_subject"], true);
    assert!(seen["second_compress"].as_str().unwrap().starts_with("h NO [COMPRESSIONACTIVE]"), "{seen}");
    assert!(seen["noop"].as_str().unwrap().starts_with("i OK"), "{seen}");
    let logout = seen["logout"].as_array().unwrap();
    assert!(logout[0].as_str().unwrap().starts_with("* BYE") && logout[1].as_str().unwrap().starts_with("j OK"));

    assert_eq!(metric(&setup, "mailgate_imap_compress_sessions_total"), 1.0);
    let out =
        |stage: &str| metric(&setup, &format!("mailgate_compress_bytes_total{{direction=\"out\",stage=\"{stage}\"}}"));
    assert!(out("deflated") > 0.0 && out("deflated") < out("plain") * 0.5, "{} {}", out("deflated"), out("plain"));
}

/// The tests' own client (flate2): the cache's composed answers, a repeated sync, IDLE,
/// pipelined commands, all through one DEFLATE stream each way.
#[test]
fn cached_answers_and_pipelined_commands_are_compressed_like_relayed_ones() {
    let setup = Setup::start();
    setup.dovecot.fill(ALICE.0, 200, 17);
    let mut direct = setup.direct(ALICE);
    direct.command("s", "EXAMINE INBOX");
    let want = answer(&mut direct, "e", HEADERS);
    let mut client = compressed(&setup, ALICE);
    client.command("s", "EXAMINE INBOX");
    // Cold (relayed and learned), then warm (composed from the cache): the same answer.
    for tag in ["e1", "e2"] {
        let got = answer(&mut client, tag, HEADERS);
        assert_eq!(got.fetch, want.fetch, "{tag}: {}", got.diff(&want));
    }
    // Pipelined: three commands in one compressed write, three answers in order.
    client.send(b"p1 NOOP\r\np2 UID SEARCH ALL\r\np3 NOOP\r\n");
    let lines = client.until_tagged("p3");
    let tagged: Vec<&String> = lines.iter().filter(|l| l.starts_with('p')).collect();
    assert_eq!(tagged.len(), 3, "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with("* SEARCH 1 2 3")), "{lines:?}");
    // IDLE: the continuation and the DONE's completion each arrive without more traffic.
    client.send(b"i IDLE\r\n");
    assert!(client.line().unwrap().starts_with("+ "));
    client.send(b"DONE\r\n");
    assert!(client.until_tagged("i").last().unwrap().starts_with("i OK"));
    let deflated = client.deflated().unwrap();
    println!("client: {} bytes on the wire for {}", deflated.wire_in, deflated.plain_in);
    assert!(deflated.wire_in * 3 < deflated.plain_in);
    assert!(client.command("l", "LOGOUT").last().unwrap().starts_with("l OK"));
}

#[test]
fn bad_deflate_data_closes_only_that_session() {
    let setup = Setup::start();
    let mut other = compressed(&setup, ALICE);
    let mut plain = setup.login(BOB);
    let mut broken = compressed(&setup, BOB);
    assert!(broken.command("n", "NOOP").last().unwrap().starts_with("n OK"));
    // A block of the reserved type 11: no inflater can go on from here.
    broken.send_raw(&[0xff; 64]).unwrap();
    assert!(broken.closed(), "the session ends without a word (a BYE could not be read)");
    for client in [&mut other, &mut plain] {
        assert!(client.command("n", "NOOP").last().unwrap().starts_with("n OK"), "other sessions go on");
    }
    assert_eq!(metric(&setup, "mailgate_imap_compress_errors_total"), 1.0);
    assert!(setup.gateway.log().contains("client stream unreadable"), "logged");
}

#[test]
fn compress_is_answered_by_the_rfc_before_and_after_login() {
    let setup = Setup::start();
    // Before login the front answers: not a command it knows there.
    let mut client = setup.imaps();
    let answer = client.command("a", "COMPRESS DEFLATE");
    assert!(answer.last().unwrap().starts_with("a BAD"), "{answer:?}");
    client.login(BOB);
    for (command, want) in [
        ("COMPRESS LZW", "x NO Unsupported compression algorithm."),
        ("COMPRESS", "x BAD Syntax: COMPRESS algorithm"),
        ("COMPRESS DEFLATE now", "x BAD Syntax: COMPRESS algorithm"),
    ] {
        assert_eq!(client.command("x", command), [want], "{command}");
    }
    assert_eq!(client.command("c", "compress deflate"), ["c OK DEFLATE active"], "case does not matter");
    client.compress();
    assert_eq!(client.command("d", "COMPRESS DEFLATE"), ["d NO [COMPRESSIONACTIVE] DEFLATE active via COMPRESS."]);
    assert_eq!(client.command("e", "COMPRESS LZW"), ["e NO [COMPRESSIONACTIVE] DEFLATE active via COMPRESS."]);
    assert!(client.command("s", "SELECT INBOX").last().unwrap().starts_with("s OK"));
    assert_eq!(metric(&setup, "mailgate_commands_total{command=\"compress\",protocol=\"imap\"}"), 6.0);
}

/// The upstream offers COMPRESS itself: the client sees mailgate's (once), and mailgate's
/// COMPRESS never reaches the upstream (its answers stay plain on that leg).
#[test]
fn an_upstream_offering_compress_is_never_asked_for_it() {
    let dovecot = Dovecot::start_with(&[ALICE, BOB], &Options { compress: true, ..Options::default() });
    let setup = Setup::in_front_of(dovecot, "", "");
    let mut direct = setup.direct(BOB);
    let caps = direct.command("c", "CAPABILITY");
    assert!(caps[0].contains("COMPRESS=DEFLATE"), "the upstream offers it: {caps:?}");
    let mut client = setup.login(BOB);
    let through = client.command("c", "CAPABILITY");
    assert_eq!(through[0], caps[0].replace(" COMPRESS=DEFLATE", "") + " COMPRESS=DEFLATE", "{through:?}");
    assert_eq!(client.command("z", "COMPRESS DEFLATE"), ["z OK DEFLATE active"]);
    client.compress();
    let through = client.command("c", "CAPABILITY");
    assert_eq!(through[0], caps[0].replace(" COMPRESS=DEFLATE", "") + " COMPRESS=DEFLATE");
    // Had the command reached the upstream, its answers would now come deflated a second
    // time and nothing here would parse.
    let select = client.command("s", "SELECT INBOX");
    assert!(select.last().unwrap().starts_with("s OK"), "{select:?}");
}

#[test]
fn compress_off_keeps_it_unannounced_and_refused() {
    let setup = Setup::start_with("compress = false", "");
    let mut client = setup.imaps();
    let ok = client.command("a", &format!("LOGIN {} {}", BOB.0, BOB.1));
    assert!(!ok.last().unwrap().contains("COMPRESS"), "{ok:?}");
    let caps = client.command("c", "CAPABILITY");
    assert!(!caps[0].contains("COMPRESS"), "{caps:?}");
    assert_eq!(
        client.command("z", "COMPRESS DEFLATE"),
        ["z NO [CANNOT] COMPRESS is not available through this gateway."]
    );
    assert!(client.command("n", "NOOP").last().unwrap().starts_with("n OK"));
}
