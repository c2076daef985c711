//! Reading POP3 answers in tests: one whole response, raw, and a clean QUIT.

use std::time::Duration;

use super::client::Client;

/// One complete response, raw: the status line, and the body through its terminating `.`
/// when `multi_line` and the status is `+OK`.
pub fn response_of(client: &mut Client, multi_line: bool) -> Vec<u8> {
    let status = client.line().expect("status line");
    let mut out = format!("{status}\r\n").into_bytes();
    if multi_line && status.starts_with("+OK") {
        loop {
            let line = client.line().expect("body line");
            out.extend_from_slice(format!("{line}\r\n").as_bytes());
            if line == "." {
                return out;
            }
        }
    }
    out
}

/// One complete multi-line (or -ERR) response, raw.
pub fn response(client: &mut Client) -> Vec<u8> {
    response_of(client, true)
}

/// QUIT, and the session's end.
pub fn quit(mut client: Client) {
    client.send(b"QUIT\r\n");
    let _ = client.rest();
    // Dovecot releases the maildrop lock just after the session.
    std::thread::sleep(Duration::from_millis(100));
}
