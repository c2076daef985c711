//! The POP3 AUTHORIZATION state, answered by mailgate itself (RFC 1939, 2449, 2595, 5034):
//! greeting (without an APOP timestamp: APOP cannot be proxied), CAPA, STLS, USER/PASS,
//! AUTH PLAIN, AUTH OAUTHBEARER / XOAUTH2 under TLS where the upstream offers them
//! (passed through, see `crate::oauth`), QUIT. The upstream is contacted only for
//! credentials received over TLS (or on a listener configured for plaintext).
//!
//! Refusals carry RFC 3206 codes: `-ERR [AUTH]` for credentials, `-ERR [SYS/TEMP]` when the
//! upstream cannot be reached; the upstream's own `[IN-USE]`, `[LOGIN-DELAY]` and `[SYS/*]`
//! reach the client unchanged.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, info};

use super::codec::{split_command, CodecError, LineReader};
use super::upstream::{login, LoggedIn};
use crate::auth::{decode_plain, Credentials};
use crate::oauth::{Mechanism, SaslClient};
use crate::origin::Origin;
use crate::plaintext::Verdict;
use crate::secret::Secret;
use crate::service::{Handover, LoginOutcome, LoginRefusal, Service, UpstreamRefusal};
use crate::stream::Stream;

/// Before TLS on an STLS listener: no USER, no SASL (RFC 2595 §4).
const CAPA_BEFORE_TLS: &str = "CAPA\r\nSTLS\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nUIDL\r\nTOP\r\n";
/// PIPELINING is honest: the relay serializes commands for an upstream without it.
const CAPA_READY: &str = "CAPA\r\nUSER\r\nSASL PLAIN\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nUIDL\r\nTOP\r\n";
/// Before TLS where logins without TLS are still let in (a migration's `warn`, or
/// `allow`): STLS first, and the login methods for the clients that cannot use it.
const CAPA_TLS_OFFERED: &str =
    "CAPA\r\nSTLS\r\nUSER\r\nSASL PLAIN\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nUIDL\r\nTOP\r\n";

const PRIVACY: &str = "-ERR [AUTH] Plaintext authentication is not allowed: use STLS first.";

struct Conn {
    stream: Stream,
    buffer: BytesMut,
    lines: LineReader,
    deadline: Instant,
    /// The client's address (logins without TLS may be let in by its network).
    ip: std::net::IpAddr,
}

enum Stop {
    /// Send this `-ERR` line, then close.
    Err(&'static str),
    Gone,
}

impl Conn {
    async fn write(&mut self, text: &str) -> Result<(), Stop> {
        let written = async {
            self.stream.write_all(text.as_bytes()).await?;
            self.stream.write_all(b"\r\n").await?;
            self.stream.flush().await
        };
        match tokio::time::timeout_at(self.deadline, written).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Stop::Gone),
        }
    }

    /// The next line, without its ending. An `AUTH` line may be as long as a SASL
    /// response (an OAuth client sends its token as the initial response, whatever the
    /// length: Thunderbird does).
    async fn line(&mut self, service: &Service) -> Result<Vec<u8>, Stop> {
        let limits = &service.config.pop3;
        loop {
            if !self.buffer.is_empty() {
                let (consumed, line) = match self.lines.feed(&self.buffer) {
                    Ok(step) => step,
                    Err(CodecError::LineTooLong(max)) => {
                        let head = [self.lines.pending(), &self.buffer[..self.buffer.len().min(5)]].concat();
                        if max < limits.max_sasl_line_bytes.as_usize()
                            && head[..head.len().min(5)].eq_ignore_ascii_case(b"AUTH ")
                        {
                            self.lines.set_max(limits.max_sasl_line_bytes.as_usize());
                            continue;
                        }
                        return Err(Stop::Err("-ERR Line too long."));
                    }
                };
                let _ = self.buffer.split_to(consumed);
                if let Some(line) = line {
                    self.lines.set_max(limits.max_line_bytes.as_usize());
                    return Ok(line);
                }
            }
            tokio::select! {
                read = tokio::time::timeout_at(self.deadline, self.stream.read_buf(&mut self.buffer)) => match read {
                    Err(_) => return Err(Stop::Err("-ERR [SYS/TEMP] Login timeout, disconnecting.")),
                    Ok(Ok(0)) | Ok(Err(_)) => return Err(Stop::Gone),
                    Ok(Ok(_)) => {}
                },
                _ = service.shutdown.cancelled() => return Err(Stop::Err("-ERR [SYS/TEMP] Server shutting down.")),
            }
        }
    }
}

enum Outcome {
    Continue,
    Close,
    StartTls,
    Login(Credentials),
}

/// What one command earned: a reply, and whether it counts as a bad command.
struct Reply {
    text: String,
    bad: bool,
}

fn reply(text: &str) -> Reply {
    Reply { text: text.to_string(), bad: false }
}

fn bad(text: &str) -> Reply {
    Reply { text: text.to_string(), bad: true }
}

pub async fn serve(stream: Stream, service: &Service, origin: Origin) -> Option<Handover<LoggedIn>> {
    let limits = &service.config.pop3;
    let mut conn = Conn {
        stream,
        buffer: BytesMut::with_capacity(1024),
        lines: LineReader::new(limits.max_line_bytes.as_usize()),
        deadline: Instant::now() + limits.login_timeout.0,
        ip: origin.client.ip(),
    };
    let mut user: Option<String> = None;
    let mut bad_commands = 0u32;
    if conn.write("+OK mailgate POP3 ready.").await.is_err() {
        return None;
    }
    loop {
        let outcome = match step(&mut conn, service, &mut user).await {
            Ok((outcome, None)) => outcome,
            Ok((outcome, Some(reply))) => {
                if reply.bad {
                    bad_commands += 1;
                    debug!(bad = bad_commands, "invalid command before login");
                }
                if conn.write(&reply.text).await.is_err() {
                    return None;
                }
                if bad_commands >= limits.max_bad_commands {
                    let _ = conn.write("-ERR Too many invalid commands, closing.").await;
                    conn.stream.linger_close().await;
                    return None;
                }
                outcome
            }
            Err(Stop::Err(text)) => {
                if conn.write(text).await.is_ok() {
                    conn.stream.linger_close().await;
                }
                return None;
            }
            Err(Stop::Gone) => return None,
        };
        match outcome {
            Outcome::Continue => {}
            Outcome::Close => return None,
            Outcome::StartTls => {
                // Whatever the client pipelined after STLS was sent in the clear: drop it.
                conn.buffer.clear();
                conn.lines.reset();
                match Box::pin(service.start_tls(conn.stream)).await {
                    Some(stream) => conn.stream = stream,
                    None => return None,
                }
            }
            Outcome::Login(credentials) => {
                user = None;
                // Without TLS, the user (or network) decides (a listener that refuses
                // everyone without exception has refused before the credentials came).
                let account = service.limits.canonical(credentials.identity());
                let verdict = service.plaintext_verdict(&conn.stream, Some(&account), conn.ip);
                if verdict == Some(Verdict::Refuse) {
                    info!(user = %credentials.user, "credentials refused before STLS");
                    service.plaintext_refused();
                    if conn.write(PRIVACY).await.is_err() {
                        return None;
                    }
                    continue;
                }
                // The client\'s TLS as it is now (implicit, or after STARTTLS), for the upstream.
                let origin = Origin { tls: conn.stream.tls_facts(), ..origin.clone() };
                let mut client = Challenges { conn: &mut conn, service };
                let login = async |upstream: &std::sync::Arc<crate::upstream::Upstream>| {
                    login(upstream, &credentials, &origin, &mut client).await
                };
                // Boxed: a session's future is as large as its largest state, and every idle
                // session would carry the login's (connect, TLS, login).
                let outcome = Box::pin(service.log_in(&credentials, &origin, refusal_kind, login)).await;
                let text = match outcome {
                    LoginOutcome::LoggedIn { session, upstream, lease, account } => {
                        let ok = match (verdict, &service.plaintext) {
                            (Some(Verdict::Warn { until, .. }), Some(policy)) => {
                                format!("+OK Logged in. {}", policy.warning(until))
                            }
                            _ => "+OK Logged in.".to_string(),
                        };
                        if conn.write(&ok).await.is_err() {
                            return None;
                        }
                        let scope = service.cache_scope(&upstream, &credentials, &session.proof);
                        let activity = service.began(&conn.stream, &account, &origin, None);
                        let unidentified = service.logged_in_client(&conn.stream, &account, conn.ip, verdict, None);
                        return Some(Handover {
                            client: conn.stream,
                            leftover: conn.buffer,
                            upstream: session,
                            scope,
                            account,
                            lease,
                            unidentified,
                            activity,
                        });
                    }
                    LoginOutcome::Refused(refusal) => match refusal {
                        LoginRefusal::Rate => "-ERR [SYS/TEMP] Too many logins from your address, slow down.".into(),
                        LoginRefusal::LockedOut => "-ERR [SYS/TEMP] Too many failed logins, try again later.".into(),
                        LoginRefusal::Sessions => {
                            "-ERR [IN-USE] Too many sessions for this user, try again later.".into()
                        }
                        LoginRefusal::Unavailable => {
                            "-ERR [SYS/TEMP] Login temporarily unavailable, try again later.".into()
                        }
                    },
                    LoginOutcome::Rejected { code } => {
                        // Codes that tell the user something (RFC 2449 §8, RFC 3206) pass through.
                        const RELAYED: &[&str] = &["IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM"];
                        match code.as_deref().filter(|c| RELAYED.contains(c)) {
                            Some(code) => format!("-ERR [{code}] Login refused by the mail server."),
                            None => "-ERR [AUTH] Authentication failed.".to_string(),
                        }
                    }
                    LoginOutcome::Unavailable => "-ERR [SYS/TEMP] Mail server unavailable, try again later.".into(),
                    LoginOutcome::TooLong => "-ERR [AUTH] User name or password too long.".into(),
                };
                if conn.write(&text).await.is_err() {
                    return None;
                }
            }
        }
    }
}

/// How an upstream's refusal code (RFC 2449, RFC 3206) is taken: only wrong credentials
/// are penalized; a locked maildrop (IN-USE), a login delay or a server problem are no
/// guessing.
fn refusal_kind(code: Option<&str>) -> UpstreamRefusal {
    match code {
        None | Some("AUTH") => UpstreamRefusal::WrongCredentials,
        Some("SYS/TEMP") => UpstreamRefusal::Temporary,
        Some(_) => UpstreamRefusal::Other,
    }
}

/// Reads and answers one command; the reply is written by the caller.
async fn step(conn: &mut Conn, service: &Service, user: &mut Option<String>) -> Result<(Outcome, Option<Reply>), Stop> {
    let line = conn.line(service).await?;
    if line.contains(&0) {
        return Ok((Outcome::Continue, Some(bad("-ERR NUL byte in command."))));
    }
    let (keyword, args) = split_command(&line);
    let args = String::from_utf8_lossy(args).into_owned();
    let login_allowed = service.login_allowed(&conn.stream, conn.ip);
    let refuse_credentials = service.refuses_before_credentials(&conn.stream, conn.ip);
    let answer = match keyword.as_str() {
        "CAPA" => {
            let list = match (login_allowed, service.starttls_available(&conn.stream)) {
                (false, _) => CAPA_BEFORE_TLS,
                (true, true) => CAPA_TLS_OFFERED,
                (true, false) => CAPA_READY,
            };
            let list = list.replace("SASL PLAIN", &format!("SASL {}", mechanisms(conn, service).join(" ")));
            conn.write(&format!("+OK Capability list follows\r\n{list}.")).await?;
            return Ok((Outcome::Continue, None));
        }
        "STLS" if service.starttls_available(&conn.stream) => {
            conn.write("+OK Begin TLS negotiation now.").await?;
            return Ok((Outcome::StartTls, None));
        }
        "STLS" => bad(if conn.stream.is_tls() {
            "-ERR TLS is already active."
        } else {
            "-ERR STLS is not available on this port."
        }),
        "QUIT" => {
            conn.write("+OK Bye.").await?;
            return Ok((Outcome::Close, None));
        }
        "APOP" => reply("-ERR [AUTH] APOP is not supported here: use USER/PASS or AUTH PLAIN over TLS."),
        // `AUTH` alone only lists mechanisms, which is fine before TLS.
        "USER" | "PASS" | "AUTH" if refuse_credentials && !(keyword == "AUTH" && args.is_empty()) => {
            info!("credentials refused before STLS");
            service.plaintext_refused();
            reply(PRIVACY)
        }
        "USER" if args.is_empty() => bad("-ERR USER needs a name."),
        "USER" => {
            *user = Some(args);
            reply("+OK Send PASS.")
        }
        "PASS" => match user.take() {
            None => bad("-ERR Send USER first."),
            Some(name) => {
                let credentials = Credentials { user: name, password: Secret::new(args), authzid: None, oauth: None };
                return Ok((Outcome::Login(credentials), None));
            }
        },
        "AUTH" if args.is_empty() => {
            let list = mechanisms(conn, service).join("\r\n");
            conn.write(&format!("+OK Mechanisms follow\r\n{list}\r\n.")).await?;
            return Ok((Outcome::Continue, None));
        }
        "AUTH" => return auth(conn, service, &args).await,
        "" => bad("-ERR Empty command."),
        "STAT" | "LIST" | "RETR" | "DELE" | "NOOP" | "RSET" | "TOP" | "UIDL" => bad("-ERR Not logged in."),
        _ => bad("-ERR Unknown command."),
    };
    Ok((Outcome::Continue, Some(answer)))
}

/// The SASL mechanisms offered on `conn` now: PLAIN, and the upstream's OAuth mechanisms
/// under TLS only (a bearer token is as good as a password to whoever reads it).
fn mechanisms(conn: &Conn, service: &Service) -> Vec<&'static str> {
    let oauth = service.upstream.oauth.mechanisms().filter(|_| conn.stream.is_tls());
    std::iter::once("PLAIN").chain(oauth.map(Mechanism::name)).collect()
}

/// The client's side of an OAuth exchange the upstream continues: its challenge goes out
/// as a continuation, the client's next line comes back.
struct Challenges<'a> {
    conn: &'a mut Conn,
    service: &'a Service,
}

impl SaslClient for Challenges<'_> {
    async fn respond(&mut self, challenge: &[u8]) -> Option<Vec<u8>> {
        self.conn.write(&format!("+ {}", String::from_utf8_lossy(challenge))).await.ok()?;
        self.conn.lines.set_max(self.service.config.pop3.max_sasl_line_bytes.as_usize());
        self.conn.line(self.service).await.ok()
    }
}

/// `AUTH mechanism [initial-response]` (RFC 5034) for PLAIN and the upstream's OAuth
/// mechanisms; `=` is an empty initial response.
async fn auth(conn: &mut Conn, service: &Service, args: &str) -> Result<(Outcome, Option<Reply>), Stop> {
    let mut words = args.split(' ');
    let mechanism = words.next().unwrap_or_default().to_ascii_uppercase();
    let initial = words.next();
    let oauth = Mechanism::from_name(&mechanism);
    if oauth.is_some() && !conn.stream.is_tls() {
        info!(mechanism = mechanism.as_str(), "OAuth refused without TLS");
        service.plaintext_refused();
        return Ok((Outcome::Continue, Some(reply("-ERR [AUTH] OAuth is accepted over TLS only."))));
    }
    if mechanism != "PLAIN" && !oauth.is_some_and(|m| service.upstream.oauth.offers(m)) {
        return Ok((Outcome::Continue, Some(reply("-ERR [AUTH] Unsupported authentication mechanism."))));
    }
    if words.next().is_some() {
        return Ok((Outcome::Continue, Some(bad("-ERR Too many arguments."))));
    }
    let response = match initial {
        Some("=") => Secret::new(Vec::new()),
        Some(initial) => Secret::new(initial.as_bytes().to_vec()),
        None => {
            conn.write("+ ").await?;
            conn.lines.set_max(service.config.pop3.max_sasl_line_bytes.as_usize());
            let line = conn.line(service).await;
            conn.lines.set_max(service.config.pop3.max_line_bytes.as_usize());
            let line = line?;
            if line == b"*" {
                return Ok((Outcome::Continue, Some(reply("-ERR Authentication cancelled."))));
            }
            Secret::new(line)
        }
    };
    let credentials = match oauth {
        Some(oauth) => {
            crate::oauth::credentials(oauth, response).map_err(|e| format!("{} response: {e}", oauth.name()))
        }
        None => decode_plain(response.expose()).map_err(|e| format!("PLAIN response: {e}")),
    };
    Ok(match credentials {
        Ok(credentials) => (Outcome::Login(credentials), None),
        Err(e) => (Outcome::Continue, Some(bad(&format!("-ERR [AUTH] Invalid SASL {e}.")))),
    })
}
