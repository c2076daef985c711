//! POP3 for the differential tester: logging in (waiting out the maildrop lock a previous
//! session may still hold), reading one response by the command that asked for it, and
//! generating sessions with well-formed and odd commands.

use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::support::mailgen::Rng;

use super::answer::describe;
use super::server::PASSWORD;
use super::wire::{show, Endpoint, Wire};

/// How long a login retries while the maildrop is `[IN-USE]`.
const LOCK_WAIT: Duration = Duration::from_secs(10);

pub fn login(endpoint: &Endpoint, user: &str) -> Result<Wire, String> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let mut wire = Wire::connect(endpoint).map_err(|e| format!("connecting to {endpoint:?}: {e}"))?;
        let greeting = wire.line().map_err(|e| format!("greeting: {}", describe(&e)))?;
        if !greeting.starts_with(b"+OK") {
            return Err(format!("greeting {}", show(&greeting)));
        }
        wire.send(format!("USER {user}\r\nPASS {PASSWORD}\r\n").as_bytes()).map_err(|e| describe(&e))?;
        let user_ok = wire.line().map_err(|e| format!("USER: {}", describe(&e)))?;
        let pass_ok = wire.line().map_err(|e| format!("PASS: {}", describe(&e)))?;
        if user_ok.starts_with(b"+OK") && pass_ok.starts_with(b"+OK") {
            return Ok(wire);
        }
        let in_use = String::from_utf8_lossy(&pass_ok).contains("[IN-USE]");
        if !in_use || Instant::now() > deadline {
            return Err(format!("USER: {} PASS: {}", show(&user_ok), show(&pass_ok)));
        }
        sleep(Duration::from_millis(50));
    }
}

/// True if a positive answer to `cmd` has a multi-line body (what Dovecot does: `LIST`
/// and `UIDL` with nothing but spaces after them list every message).
pub fn multi_line(cmd: &str) -> bool {
    let (verb, args) = cmd.split_once(' ').unwrap_or((cmd, ""));
    match verb.to_ascii_uppercase().as_str() {
        "RETR" | "TOP" | "CAPA" => true,
        "LIST" | "UIDL" => args.trim().is_empty(),
        _ => false,
    }
}

/// One response to `cmd`: the status line and, if it has one, the body up to and
/// including the terminating `.` line; raw bytes.
pub fn response(wire: &mut Wire, cmd: &str) -> Result<Vec<u8>, String> {
    let mut out = wire.line().map_err(|e| describe(&e))?;
    if out.starts_with(b"+OK") && multi_line(cmd) {
        loop {
            let line = wire.line().map_err(|e| format!("{} after {} bytes", describe(&e), out.len()))?;
            let end = line == b".\r\n";
            out.extend_from_slice(&line);
            if end {
                break;
            }
        }
    }
    Ok(out)
}

/// Reads until the peer closes (bounded by the read timeout).
pub fn drain(mut wire: Wire) {
    while wire.line().is_ok() {}
}

/// A random session: writes of one or more commands (`messages` is about how many the
/// maildrop holds), and whether it ends with QUIT.
pub fn session(rng: &mut Rng, messages: u32, odd: bool) -> (Vec<Vec<String>>, bool) {
    let n = rng.range(1, 12);
    let max = messages.max(1) as usize;
    let mut cmds: Vec<String> = Vec::new();
    for _ in 0..n {
        let m = if rng.chance(90) { rng.range(1, max.min(12)) } else { rng.range(1, max + 3) };
        let cmd = match rng.range(0, if odd { 99 } else { 78 }) {
            0..=7 => "STAT".to_string(),
            8..=12 => "LIST".to_string(),
            13..=18 => format!("LIST {m}"),
            19..=23 => "UIDL".to_string(),
            24..=28 => format!("UIDL {m}"),
            29..=48 => format!("RETR {m}"),
            49..=58 => format!("TOP {m} {}", rng.pick(&[0, 1, 3, 10, 100000])),
            59..=68 => format!("DELE {m}"),
            69..=72 => "RSET".to_string(),
            73..=75 => "NOOP".to_string(),
            76..=78 => format!("retr {m}"),
            // Odd spellings: Dovecot refuses these, so must whoever answers instead.
            79 => "RETR +1".to_string(),
            80 => format!("RETR {m} "),
            81 => format!("TOP {m} 0 junk"),
            82 => "RETR 0".to_string(),
            83 => "RETR 99999".to_string(),
            84 => "LIST ".to_string(),
            85 => "UIDL ".to_string(),
            86 => format!("TOP {m}"),
            87 => format!("RETR {m}x"),
            88 => format!("DELE {m} "),
            89 => format!("top {m} 2"),
            90 => "RETR -1".to_string(),
            91 => format!("RETR 0{m}"),
            92 => "RETR 4294967297".to_string(),
            // The same message twice: DELE, DELE again, RETR.
            _ => {
                cmds.push(format!("DELE {m}"));
                cmds.push(format!("DELE {m}"));
                format!("RETR {m}")
            }
        };
        cmds.push(cmd);
    }
    let mut writes = Vec::new();
    let mut rest = cmds.as_slice();
    while !rest.is_empty() {
        // Mostly one command per write, sometimes pipelined.
        let k = if rng.chance(25) { rng.range(1, rest.len().min(4)) } else { 1 };
        writes.push(rest[..k].to_vec());
        rest = &rest[k..];
    }
    (writes, rng.chance(80))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_by_command() {
        assert!(multi_line("RETR 1"));
        assert!(multi_line("retr 1 "));
        assert!(multi_line("LIST"));
        assert!(multi_line("LIST "));
        assert!(!multi_line("LIST 1"));
        assert!(!multi_line("UIDL 2"));
        assert!(!multi_line("DELE 1"));
    }
}
