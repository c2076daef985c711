//! The not-authenticated state, answered by mailgate itself: greeting, CAPABILITY, NOOP,
//! ID, LOGOUT, STARTTLS, LOGIN, AUTHENTICATE PLAIN, and AUTHENTICATE OAUTHBEARER / XOAUTH2
//! where the upstream offers them (passed through, see `crate::oauth`). The upstream is
//! contacted only when the client has sent credentials over an acceptable channel.
//!
//! Hygiene rules enforced here:
//! - before TLS on a STARTTLS listener, LOGIN and AUTHENTICATE get `NO [PRIVACYREQUIRED]`
//!   (a synchronizing literal is refused before the password is sent); OAuth mechanisms
//!   are neither announced nor taken without TLS on any listener;
//! - after `OK Begin TLS`, every byte already received is discarded and nothing more is
//!   written in plaintext (NO STARTTLS, USENIX Security 2021);
//! - limits: line and literal sizes, `max_bad_commands` BADs, and the login timeout.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, info};

use super::capabilities;
use super::command::{self, Command, Part};
use super::framing::{parse_announce, strip_eol, Event, FrameError, Framer};
use super::response::relayable_capabilities;
use super::upstream::{login, LoggedIn};
use crate::auth::{decode_plain, Credentials};
use crate::metrics::clients::Software;
use crate::oauth::{EnvelopeError, Mechanism, SaslClient};
use crate::origin::Origin;
use crate::plaintext::Verdict;
use crate::secret::Secret;
use crate::service::{Handover, LoginOutcome, LoginRefusal, Service, UpstreamRefusal};
use crate::stream::Stream;

/// The client connection before login: the stream and the bytes read but not yet used.
struct Conn {
    stream: Stream,
    buffer: BytesMut,
    framer: Framer,
    deadline: Instant,
    /// The client's address (logins without TLS may be let in by its network).
    ip: std::net::IpAddr,
    /// What the client said of itself in `ID`, if it did.
    software: Option<Software>,
}

/// Why the front stops reading commands.
enum Stop {
    /// Send this untagged BYE text, then close.
    Bye(&'static str),
    /// The peer is gone or broke TLS: just close.
    Gone,
}

enum Input {
    Command(Vec<Part>),
    /// Refused while framing: `tag BAD text` or `tag NO text`.
    Refused {
        tag: String,
        response: String,
        bad: bool,
    },
}

const MAX_PARTS: usize = 8;
/// An `ID` may send each of its 30 fields and values as a literal (RFC 2971): a line and a
/// literal each, and the closing line.
const MAX_ID_PARTS: usize = 4 * 30 + 1;

/// The commands allowed `imap.preauth_max_long_command_bytes` instead of the line limit.
const LONG_COMMANDS: [&str; 2] = ["ID", "AUTHENTICATE"];

/// The long command that `prefix` (a line's first bytes) begins, if its name is complete
/// (followed by a space: an `IDX...` cut after `ID` is no ID).
fn long_command(prefix: &[u8]) -> Option<&'static str> {
    let (tag, name) = command::peek_name(prefix)?;
    if prefix.get(tag.len() + 1 + name.len()) != Some(&b' ') {
        return None;
    }
    LONG_COMMANDS.into_iter().find(|long| *long == name)
}

impl Conn {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), Stop> {
        let written = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout_at(self.deadline, written).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Stop::Gone),
        }
    }

    async fn fill(&mut self, service: &Service) -> Result<(), Stop> {
        tokio::select! {
            read = tokio::time::timeout_at(self.deadline, self.stream.read_buf(&mut self.buffer)) => match read {
                Err(_) => Err(Stop::Bye("Login timeout, disconnecting.")),
                Ok(Ok(0)) | Ok(Err(_)) => Err(Stop::Gone),
                Ok(Ok(_)) => Ok(()),
            },
            _ = service.shutdown.cancelled() => Err(Stop::Bye("Server shutting down.")),
        }
    }

    /// Reads one whole command (lines and literals), deciding on each announced literal.
    ///
    /// What one command may hold in memory: lines of `preauth_max_line_bytes` and fewer
    /// than [`MAX_PARTS`] parts (literals of `preauth_max_literal_bytes`); for ID and
    /// AUTHENTICATE, `preauth_max_long_command_bytes` in all (lines and literals together).
    async fn command(&mut self, service: &Service, privacy_required: bool) -> Result<Input, Stop> {
        let limits = &service.config.imap;
        let long_limit = limits.preauth_max_long_command_bytes.as_usize();
        self.framer.set_max_line(limits.preauth_max_line_bytes.as_usize());
        let mut parts = Vec::new();
        let mut current = Vec::new();
        let mut first: Option<(String, String)> = None;
        // A long command (ID, AUTHENTICATE) and its bytes so far, for its bound.
        let mut long = false;
        let mut total = 0usize;
        loop {
            if self.buffer.is_empty() {
                self.fill(service).await?;
            }
            let step = match self.framer.feed(&self.buffer) {
                Ok(step) => step,
                Err(FrameError::LineTooLong(limit)) => {
                    // The command's name is in the first line's first bytes: what the
                    // framer took of the line so far, then what it refused.
                    let name = match &first {
                        Some((_, name)) => LONG_COMMANDS.into_iter().find(|long| long == name),
                        None => {
                            let mut prefix = current[..current.len().min(64)].to_vec();
                            let more = 64 - prefix.len();
                            prefix.extend_from_slice(&self.buffer[..self.buffer.len().min(more)]);
                            long_command(&prefix)
                        }
                    };
                    if name.is_some() && limit < long_limit {
                        long = true;
                        self.framer.set_max_line(long_limit);
                        continue;
                    }
                    info!(limit, command = name.unwrap_or("other"), "command line too long before login: closing");
                    return Err(Stop::Bye("Command line too long."));
                }
                // Literals are decided as soon as announced; never reached.
                Err(FrameError::LiteralUndecided) => return Err(Stop::Gone),
            };
            total += step.consumed;
            if long && total > long_limit {
                // Its lines and literals together (any other command is bounded by its
                // line limit and its literals' size and number).
                info!(limit = long_limit, "command too long before login: closing");
                return Err(Stop::Bye("Command too long."));
            }
            current.extend_from_slice(&self.buffer.split_to(step.consumed));
            match step.event {
                None => continue,
                Some(Event::LiteralEnd) => parts.push(Part::Literal(std::mem::take(&mut current))),
                Some(Event::Line(line)) => {
                    let text = strip_eol(&current);
                    let announce = line.announce;
                    let text = match announce {
                        Some(_) => strip_announce(text),
                        None => text,
                    }
                    .to_vec();
                    current.clear();
                    if parts.is_empty() {
                        first = command::peek_name(&line.head);
                        long |= first.as_ref().is_some_and(|(_, name)| LONG_COMMANDS.contains(&name.as_str()));
                    }
                    parts.push(Part::Line { text, literal_follows: announce.is_some() });
                    let Some(announce) = announce else {
                        return Ok(Input::Command(parts));
                    };
                    let (tag, name) = first.clone().unwrap_or_else(|| ("*".into(), String::new()));
                    let credentials = name == "LOGIN" || name == "AUTHENTICATE";
                    let max_parts = if name == "ID" { MAX_ID_PARTS } else { MAX_PARTS };
                    if announce.len > limits.preauth_max_literal_bytes.0 || parts.len() >= max_parts {
                        info!(
                            command = name.as_str(),
                            literal = announce.len,
                            parts = parts.len(),
                            "literal refused before login"
                        );
                        if announce.non_sync {
                            return Err(Stop::Bye("Literal too large before authentication."));
                        }
                        self.framer.reject_literal();
                        return Ok(Input::Refused {
                            tag,
                            response: "BAD [TOOBIG] Literal too large.".into(),
                            bad: true,
                        });
                    }
                    if privacy_required && credentials && !announce.non_sync {
                        // Refuse before the client sends its password in the clear.
                        self.framer.reject_literal();
                        service.plaintext_refused();
                        return Ok(Input::Refused { tag, response: privacy_refusal(), bad: false });
                    }
                    if !announce.non_sync {
                        self.write(b"+ Ready for literal data\r\n").await?;
                    }
                    self.framer.accept_literal();
                }
            }
        }
    }

    /// One line of a SASL exchange; a literal announcement there is just text. It may be
    /// as long as a long command (an OAuth token).
    async fn sasl_line(&mut self, service: &Service) -> Result<Vec<u8>, Stop> {
        let limit = service.config.imap.preauth_max_long_command_bytes.as_usize();
        self.framer.set_max_line(limit);
        let mut line = Vec::new();
        loop {
            if self.buffer.is_empty() {
                self.fill(service).await?;
            }
            let step = self.framer.feed(&self.buffer).map_err(|_| {
                info!(limit, "SASL response too long before login: closing");
                Stop::Bye("SASL response too long.")
            })?;
            line.extend_from_slice(&self.buffer.split_to(step.consumed));
            if let Some(Event::Line(_)) = step.event {
                self.framer.reject_literal();
                return Ok(strip_eol(&line).to_vec());
            }
        }
    }
}

fn strip_announce(text: &[u8]) -> &[u8] {
    debug_assert!(parse_announce(text).is_some());
    let open = text.iter().rposition(|&b| b == b'{').unwrap_or(text.len());
    let open = if open > 0 && text[open - 1] == b'~' { open - 1 } else { open };
    &text[..open]
}

fn privacy_refusal() -> String {
    "NO [PRIVACYREQUIRED] Use STARTTLS first: credentials are not accepted in clear text.".into()
}

/// The capabilities announced before login on `conn` now.
fn preauth_capabilities(conn: &Conn, service: &Service) -> String {
    let oauth = service.upstream.oauth.mechanisms().filter(|_| conn.stream.is_tls());
    capabilities::preauth(service.login_allowed(&conn.stream, conn.ip), service.starttls_available(&conn.stream), oauth)
}

/// The client's side of an OAuth exchange the upstream continues: its challenge goes out
/// as a continuation, the client's next line comes back.
struct Challenges<'a> {
    conn: &'a mut Conn,
    service: &'a Service,
}

impl SaslClient for Challenges<'_> {
    async fn respond(&mut self, challenge: &[u8]) -> Option<Vec<u8>> {
        self.conn.write(&[&b"+ "[..], challenge, b"\r\n"].concat()).await.ok()?;
        self.conn.sasl_line(self.service).await.ok()
    }
}

/// What the front decided about the session.
enum Outcome {
    Continue,
    Close,
    StartTls,
    Login { tag: String, credentials: Credentials },
}

/// Serves the not-authenticated state; on a successful login hands over to the relay.
pub async fn serve(stream: Stream, service: &Service, origin: Origin) -> Option<Handover<LoggedIn>> {
    let limits = &service.config.imap;
    let mut conn = Conn {
        stream,
        buffer: BytesMut::with_capacity(4096),
        framer: Framer::new(limits.preauth_max_line_bytes.as_usize()),
        deadline: Instant::now() + limits.login_timeout.0,
        ip: origin.client.ip(),
        software: None,
    };
    let mut bad = 0u32;
    let greeting = format!("* OK [CAPABILITY {}] mailgate ready.\r\n", preauth_capabilities(&conn, service));
    if conn.write(greeting.as_bytes()).await.is_err() {
        return None;
    }
    loop {
        let outcome = match step(&mut conn, service, &mut bad).await {
            Ok(outcome) => outcome,
            Err(Stop::Bye(text)) => {
                debug!(reason = text, "closing before login");
                if conn.write(format!("* BYE {text}\r\n").as_bytes()).await.is_ok() {
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
                // Whatever the client pipelined after STARTTLS was sent in the clear: drop it.
                conn.buffer.clear();
                conn.framer.reset();
                match Box::pin(service.start_tls(conn.stream)).await {
                    Some(stream) => conn.stream = stream,
                    None => return None,
                }
            }
            Outcome::Login { tag, credentials } => {
                // Without TLS, the user (or network) decides (a listener that refuses
                // everyone without exception has refused before the credentials came).
                let user = service.limits.canonical(credentials.identity());
                let verdict = service.plaintext_verdict(&conn.stream, Some(&user), conn.ip);
                if verdict == Some(Verdict::Refuse) {
                    info!(user = %credentials.user, "credentials refused before STARTTLS");
                    service.plaintext_refused();
                    if conn.write(format!("{tag} {}\r\n", privacy_refusal()).as_bytes()).await.is_err() {
                        return None;
                    }
                    continue;
                }
                // The client\'s TLS as it is now (implicit, or after STARTTLS), for the upstream.
                let origin = Origin { tls: conn.stream.tls_facts(), ..origin.clone() };
                let mut client = Challenges { conn: &mut conn, service };
                // The key a parked session would have: the login is routed first, so the
                // upstream is the one this login goes to.
                let reuse_key = |upstream: &crate::upstream::Upstream| {
                    let pool = service.reuse.as_ref()?;
                    Some((pool, pool.key(&upstream.identity(), &credentials, &user, &origin)?))
                };
                let login = async |upstream: &std::sync::Arc<crate::upstream::Upstream>| {
                    if let Some((pool, key)) = reuse_key(upstream) {
                        if let Some(parked) = pool.take(&key).await {
                            return Ok(parked);
                        }
                    }
                    login(upstream, &credentials, &origin, &mut client).await
                };
                // Boxed: a session's future is as large as its largest state, and every idle
                // session would carry the login's (connect, TLS, login).
                let outcome = Box::pin(service.log_in(&credentials, &origin, refusal_kind, login)).await;
                let text = match outcome {
                    LoginOutcome::LoggedIn { mut session, upstream, lease, account } => {
                        session.reuse = reuse_key(&upstream)
                            .map(|(pool, key)| Box::new(crate::imap::reuse::Ticket { pool: pool.clone(), key }));
                        let caps = relayable_capabilities(&session.capabilities, service.compress).join(" ");
                        let mut ok = String::new();
                        if let (Some(Verdict::Warn { until, .. }), Some(policy)) = (verdict, &service.plaintext) {
                            // RFC 9051 §7.1: a client must show an ALERT's text to its user.
                            ok = format!("* OK [ALERT] {}\r\n", policy.warning(until));
                        }
                        ok.push_str(&format!("{tag} OK [CAPABILITY {caps}] Logged in\r\n"));
                        if conn.write(ok.as_bytes()).await.is_err() {
                            return None;
                        }
                        let scope = service.cache_scope(&upstream, &credentials, &session.proof);
                        let activity = service.began(&conn.stream, &account, &origin, conn.software.as_ref());
                        let unidentified =
                            service.logged_in_client(&conn.stream, &account, conn.ip, verdict, conn.software.take());
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
                        LoginRefusal::Rate => "NO [LIMIT] Too many logins from your address, slow down.".to_string(),
                        LoginRefusal::LockedOut => "NO [LIMIT] Too many failed logins, try again later.".to_string(),
                        LoginRefusal::Sessions => "NO [LIMIT] Too many sessions for this user, try again later.".into(),
                        LoginRefusal::Unavailable => {
                            "NO [UNAVAILABLE] Login temporarily unavailable, try again later.".to_string()
                        }
                    },
                    LoginOutcome::Rejected { code } => {
                        // RFC 5530 codes that tell the user something useful pass through.
                        const RELAYED: &[&str] =
                            &["AUTHORIZATIONFAILED", "EXPIRED", "CONTACTADMIN", "UNAVAILABLE", "LIMIT"];
                        let code = code.as_deref().filter(|c| RELAYED.contains(c)).unwrap_or("AUTHENTICATIONFAILED");
                        match code {
                            "UNAVAILABLE" => format!("NO [{code}] Login temporarily unavailable, try again later."),
                            _ => format!("NO [{code}] Authentication failed."),
                        }
                    }
                    LoginOutcome::Unavailable => {
                        "NO [UNAVAILABLE] Upstream server unavailable, try again later.".into()
                    }
                    LoginOutcome::TooLong => "NO [AUTHENTICATIONFAILED] User name or password too long.".into(),
                };
                if conn.write(format!("{tag} {text}\r\n").as_bytes()).await.is_err() {
                    return None;
                }
            }
        }
    }
}

/// How an upstream's refusal code (RFC 5530) is taken: only wrong credentials are
/// penalized; a server that is busy or broken, an expired password or an account to see
/// the admin about are no guessing.
fn refusal_kind(code: Option<&str>) -> UpstreamRefusal {
    match code {
        None | Some("AUTHENTICATIONFAILED" | "AUTHORIZATIONFAILED") => UpstreamRefusal::WrongCredentials,
        Some("UNAVAILABLE" | "SERVERBUG") => UpstreamRefusal::Temporary,
        Some(_) => UpstreamRefusal::Other,
    }
}

/// Reads and answers one command.
async fn step(conn: &mut Conn, service: &Service, bad: &mut u32) -> Result<Outcome, Stop> {
    let privacy_required = service.refuses_before_credentials(&conn.stream, conn.ip);
    let (tag, response, is_bad) = match conn.command(service, privacy_required).await? {
        Input::Refused { tag, response, bad } => (tag, response, bad),
        Input::Command(parts) => match command::parse(&parts) {
            Err(invalid) => (invalid.tag, format!("BAD {}", invalid.reason), true),
            Ok(tagged) => {
                let tag = tagged.tag;
                match answer(conn, service, &tag, tagged.command, privacy_required).await? {
                    Answer::Done(outcome) => return Ok(outcome),
                    Answer::Respond { response, bad } => (tag, response, bad),
                }
            }
        },
    };
    if is_bad {
        *bad += 1;
        debug!(bad = *bad, "invalid command before login");
        if *bad >= service.config.imap.max_bad_commands {
            conn.write(format!("{tag} {response}\r\n").as_bytes()).await?;
            return Err(Stop::Bye("Too many invalid commands."));
        }
    }
    conn.write(format!("{tag} {response}\r\n").as_bytes()).await?;
    Ok(Outcome::Continue)
}

enum Answer {
    Done(Outcome),
    Respond { response: String, bad: bool },
}

fn ok(text: &str) -> Answer {
    Answer::Respond { response: format!("OK {text}"), bad: false }
}

fn refuse_bad(text: &str) -> Answer {
    Answer::Respond { response: format!("BAD {text}"), bad: true }
}

async fn answer(
    conn: &mut Conn,
    service: &Service,
    tag: &str,
    command: Command,
    privacy_required: bool,
) -> Result<Answer, Stop> {
    Ok(match command {
        Command::Capability => {
            let caps = preauth_capabilities(conn, service);
            conn.write(format!("* CAPABILITY {caps}\r\n").as_bytes()).await?;
            ok("Capability completed.")
        }
        Command::Noop => ok("NOOP completed."),
        Command::Id(software) => {
            if software.is_some() {
                conn.software = software;
            }
            conn.write(b"* ID (\"name\" \"mailgate\")\r\n").await?;
            ok("ID completed.")
        }
        Command::Logout => {
            conn.write(format!("* BYE Logging out.\r\n{tag} OK LOGOUT completed.\r\n").as_bytes()).await?;
            Answer::Done(Outcome::Close)
        }
        Command::StartTls => {
            if !service.starttls_available(&conn.stream) {
                refuse_bad(if conn.stream.is_tls() {
                    "TLS is already active."
                } else {
                    "STARTTLS is not available on this port."
                })
            } else {
                conn.write(format!("{tag} OK Begin TLS negotiation now.\r\n").as_bytes()).await?;
                Answer::Done(Outcome::StartTls)
            }
        }
        Command::Login(_) | Command::Authenticate { .. } if privacy_required => {
            info!("credentials refused before STARTTLS");
            service.plaintext_refused();
            Answer::Respond { response: privacy_refusal(), bad: false }
        }
        Command::Login(credentials) => Answer::Done(Outcome::Login { tag: tag.to_string(), credentials }),
        Command::Authenticate { mechanism, initial } => {
            let oauth = Mechanism::from_name(&mechanism);
            if let Some(oauth) = oauth {
                if !conn.stream.is_tls() {
                    info!(mechanism = oauth.name(), "OAuth refused without TLS");
                    service.plaintext_refused();
                    return Ok(Answer::Respond {
                        response: "NO [PRIVACYREQUIRED] OAuth is accepted over TLS only.".into(),
                        bad: false,
                    });
                }
            }
            if mechanism != "PLAIN" && !oauth.is_some_and(|m| service.upstream.oauth.offers(m)) {
                return Ok(Answer::Respond {
                    response: "NO [CANNOT] Unsupported authentication mechanism.".into(),
                    bad: false,
                });
            }
            let response = match initial {
                Some(initial) => initial,
                None => {
                    conn.write(b"+ \r\n").await?;
                    let line = conn.sasl_line(service).await?;
                    if line == b"*" {
                        return Ok(refuse_bad("Authentication cancelled."));
                    }
                    Secret::new(line)
                }
            };
            let credentials = match oauth {
                Some(oauth) => crate::oauth::credentials(oauth, response).map_err(|e| {
                    let code = if e == EnvelopeError::NoUser { "AUTHENTICATIONFAILED" } else { "PARSE" };
                    format!("NO [{code}] Invalid SASL {} response: {e}.", oauth.name())
                }),
                None => decode_plain(response.expose()).map_err(|e| format!("BAD Invalid SASL PLAIN response: {e}.")),
            };
            match credentials {
                Ok(credentials) => Answer::Done(Outcome::Login { tag: tag.to_string(), credentials }),
                // Counted as invalid commands: garbage is no credential to penalize.
                Err(response) => Answer::Respond { response, bad: true },
            }
        }
    })
}
