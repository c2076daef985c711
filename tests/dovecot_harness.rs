//! Proves the test harness itself: a real Dovecot comes up, serves generated
//! mail over IMAP, IMAPS and POP3, and goes away again.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use support::dovecot::Dovecot;
use support::mailgen;

const SEED: u64 = 42;

/// Minimal line-based client; every read is bounded by a timeout.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream) }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read line");
        assert!(line.ends_with("\r\n"), "truncated line {line:?}");
        line
    }

    fn send(&mut self, line: &str) {
        self.writer.write_all(format!("{line}\r\n").as_bytes()).unwrap();
    }

    /// Sends an IMAP command and returns all response lines, tagged one last.
    fn imap(&mut self, tag: &str, command: &str) -> Vec<String> {
        self.send(&format!("{tag} {command}"));
        let mut lines = Vec::new();
        loop {
            let line = self.line();
            let done = line.starts_with(&format!("{tag} "));
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    fn pop3(&mut self, command: &str) -> String {
        self.send(command);
        self.line()
    }
}

#[test]
fn dovecot_serves_generated_mail() {
    let started = Instant::now();
    let dovecot = Dovecot::start(&[("alice", "alice-pw"), ("bob", "bob-pw")]);
    eprintln!("dovecot started in {:?}", started.elapsed());
    let total = dovecot.fill("alice", 50, SEED);
    let expected: Vec<Vec<u8>> = (0..50).map(|i| mailgen::message(SEED, i, mailgen::MAX_BIG)).collect();
    assert_eq!(total, expected.iter().map(|m| m.len() as u64).sum::<u64>());

    // Plain IMAP.
    let mut imap = Client::connect(dovecot.imap);
    let greeting = imap.line();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    assert!(greeting.contains("STARTTLS"), "{greeting}");
    let login = imap.imap("a", "LOGIN alice alice-pw");
    assert!(login.last().unwrap().starts_with("a OK"), "{login:?}");
    let select = imap.imap("b", "SELECT INBOX");
    assert!(select.iter().any(|l| l == "* 50 EXISTS\r\n"), "{select:?}");
    assert!(select.last().unwrap().starts_with("b OK"), "{select:?}");
    // UIDs follow generation order and sizes are byte-exact.
    let sizes = imap.imap("c", "UID FETCH 1:* (RFC822.SIZE)");
    assert_eq!(sizes.len(), 51, "{sizes:?}");
    for (i, msg) in expected.iter().enumerate() {
        let want = format!("(UID {} RFC822.SIZE {})", i + 1, msg.len());
        let want_alt = format!("(RFC822.SIZE {} UID {})", msg.len(), i + 1);
        assert!(sizes[i].contains(&want) || sizes[i].contains(&want_alt), "message {i}: {} vs {want}", sizes[i]);
    }
    imap.imap("d", "LOGOUT");

    // IMAPS with certificate verification against the harness CA.
    let url = format!("imaps://127.0.0.1:{}/INBOX;UID=1", dovecot.imaps.port());
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(dovecot.ca_pem())
        .args(["-u", "alice:alice-pw", &url])
        .output()
        .expect("running curl");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == expected[0], "UID 1 differs from message 0");

    // Plain POP3: the octet count equals what we generated.
    let mut pop3 = Client::connect(dovecot.pop3);
    assert!(pop3.line().starts_with("+OK"));
    assert!(pop3.pop3("USER alice").starts_with("+OK"));
    assert!(pop3.pop3("PASS alice-pw").starts_with("+OK"));
    assert_eq!(pop3.pop3("STAT"), format!("+OK 50 {total}\r\n"));
    assert!(pop3.pop3("QUIT").starts_with("+OK"));

    // Bob's INBOX is separate, and deliver() shows up in a new session.
    let note = b"Subject: hi\r\n\r\nhello bob\r\n";
    dovecot.deliver("bob", note);
    let mut pop3 = Client::connect(dovecot.pop3);
    pop3.line();
    pop3.pop3("USER bob");
    pop3.pop3("PASS bob-pw");
    assert_eq!(pop3.pop3("STAT"), format!("+OK 1 {}\r\n", note.len()));
    pop3.pop3("QUIT");

    let log = dovecot.log();
    assert!(log.contains("imap-login: Info: Login: user=<alice>"), "{log}");
    assert!(log.contains("pop3-login: Info: Login: user=<bob>"), "{log}");
}

#[test]
fn instances_run_side_by_side_and_stop() {
    let threads: Vec<_> = (0..3).map(|_| std::thread::spawn(|| Dovecot::start(&[("carol", "pw")]))).collect();
    let mut instances: Vec<Dovecot> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut ports: Vec<u16> =
        instances.iter().flat_map(|d| [d.imap, d.pop3, d.imaps, d.pop3s].map(|a| a.port())).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 12);

    // A wrong password fails promptly (auth_failure_delay = 0).
    let mut imap = Client::connect(instances[0].imap);
    imap.line();
    let started = Instant::now();
    let reply = imap.imap("a", "LOGIN carol wrong");
    assert!(reply.last().unwrap().starts_with("a NO"), "{reply:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(imap);

    let stopped = Instant::now();
    let first = &mut instances[0];
    let addr = first.imap;
    first.stop();
    eprintln!("dovecot stopped in {:?}", stopped.elapsed());
    assert!(TcpStream::connect(addr).is_err(), "still listening after stop");
    assert!(first.log().contains("auth failed"), "{}", first.log());
    // The others are unaffected.
    let mut pop3 = Client::connect(instances[1].pop3);
    assert!(pop3.line().starts_with("+OK"));
}

#[test]
fn generator_is_deterministic_and_covers_edge_cases() {
    let msgs: Vec<Vec<u8>> = (0..32).map(|i| mailgen::message(7, i, 200_000)).collect();
    assert_eq!(msgs[3], mailgen::message(7, 3, 200_000));
    assert_ne!(msgs[3], mailgen::message(8, 3, 200_000));
    for (i, m) in msgs.iter().enumerate() {
        assert!(mailgen::well_formed(m), "message {i} is not CRLF / <998");
    }
    let contains = |m: &[u8], needle: &[u8]| m.windows(needle.len()).any(|w| w == needle);
    let lines = |m: &[u8]| m.split(|&b| b == b'\n').map(<[u8]>::len).collect::<Vec<_>>();
    // The first six messages of a batch cover every edge case.
    assert!(contains(&msgs[1], b"\r\n.\r\n"), "lone dot line");
    assert!(contains(&msgs[1], b"Content-Transfer-Encoding: 8bit"));
    assert!(lines(&msgs[2]).iter().any(|&l| l > 500), "long line");
    assert!(contains(&msgs[2], b"multipart/alternative"));
    let received = msgs[3].split(|&b| b == b'\n').filter(|l| l.starts_with(b"Received:")).count();
    assert_eq!(received, 200);
    assert!(contains(&msgs[3], b"Content-Transfer-Encoding: base64"));
    assert!((100_000..=200_000).contains(&msgs[5].len()), "big message");
    let small = msgs.iter().filter(|m| m.len() < 10_000).count();
    assert!(small > 16, "most messages should be small");
}
