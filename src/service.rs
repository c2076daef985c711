//! What every session of one listener shares, whatever its protocol: settings, the TLS
//! acceptor, the upstream, the shutdown signal; and the TLS steps both protocols take the
//! same way (implicit TLS at accept, STARTTLS/STLS later).

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::auth::Credentials;
use crate::cache::{Account, LoginProof, MessageCache, Scope};
use crate::config::{Config, Protocol, TlsMode};
use crate::metrics::Metrics;
use crate::stream::Stream;
use crate::upstream::Upstream;

/// Why a login was refused before it reached the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginRefusal {
    /// Too many login attempts from the address.
    Rate,
    /// Too many failed logins of this user from this address.
    LockedOut,
    /// The user's session caps are reached.
    Sessions,
    /// The shared limits store cannot answer and fails closed.
    Unavailable,
}

/// How the upstream's refusal of a login is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamRefusal {
    /// Wrong credentials: counted as `rejected` and penalized (a delay, towards lockout).
    WrongCredentials,
    /// The upstream cannot log anyone in now (its password database is down...): counted
    /// as `unavailable`, no penalty.
    Temporary,
    /// Anything else (an expired password, a locked maildrop, a login delay): `rejected`,
    /// no penalty, since the password may be right.
    Other,
}

/// What a login came to.
/// What a front hands to its relay once the upstream accepted the login: both sides of
/// the session and what the session keys on. The front's future ends before the relay's
/// begins, so a session's memory is the larger of the two, not their sum.
pub struct Handover<T> {
    pub client: Stream,
    /// Bytes the client sent after its login command (a pipelining client's next commands).
    pub leftover: bytes::BytesMut,
    /// The upstream session, logged in.
    pub upstream: T,
    pub scope: Option<Scope>,
    /// The canonical account name (see [`LoginOutcome::LoggedIn`]).
    pub account: String,
    /// The user's session slot, held while the session lasts.
    pub lease: crate::limits::UserLease,
    /// Set while the client has not said what software it is (IMAP `ID` may follow).
    pub unidentified: Option<Box<crate::metrics::clients::Unidentified>>,
    /// The session in its account's support history (reported when dropped); `None`
    /// while histories are off.
    pub activity: Option<Box<crate::insight::Activity>>,
}

pub enum LoginOutcome<T> {
    /// Logged in: the upstream session, its upstream, the user's session slot (held as
    /// long as the session lasts), and the canonical account name every per-user limit,
    /// quota and report of the session keys on.
    LoggedIn { session: T, upstream: Arc<Upstream>, lease: crate::limits::UserLease, account: String },
    /// Refused by a limit before any upstream was asked.
    Refused(LoginRefusal),
    /// The upstream refused, with its response code if any.
    Rejected { code: Option<String> },
    /// No upstream could be used.
    Unavailable,
    /// A user name or password longer than any upstream takes (`limits.max_user_bytes`,
    /// `max_password_bytes`): a failed login, not asked upstream.
    TooLong,
}

pub struct Service {
    pub config: Arc<Config>,
    /// The listener's configured name (a metric label).
    pub listener: String,
    pub protocol: Protocol,
    pub listener_tls: TlsMode,
    /// For implicit TLS and STARTTLS; `None` on a plaintext listener.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    pub upstream: Arc<Upstream>,
    /// Cancelled when the process starts its graceful shutdown.
    pub shutdown: CancellationToken,
    /// The process-wide message cache, when enabled.
    pub cache: Option<Arc<MessageCache>>,
    pub metrics: Arc<Metrics>,
    /// The process-wide connection caps.
    pub limits: Arc<crate::limits::Limits>,
    /// Per-account support histories (`crate::insight`).
    pub insight: Arc<crate::insight::Insight>,
    /// Set when the listener expects a PROXY protocol header.
    pub proxy: Option<crate::proxy_header::ProxyPolicy>,
    /// Chooses the upstream of each login (`upstream` when nothing else does).
    pub router: Arc<crate::routing::Router>,
    /// What a login without TLS gets; `None` on an implicit-TLS listener.
    pub plaintext: Option<crate::plaintext::Policy>,
    /// Parked upstream IMAP sessions (`[imap] reuse_for`), shared by this generation's
    /// IMAP listeners; `None` when reuse is off and for POP3 (a maildrop's lock and
    /// deletions belong to one session).
    pub reuse: Option<std::sync::Arc<crate::imap::reuse::Pool>>,
    /// Logged-in IMAP clients are offered COMPRESS=DEFLATE (`imap.compress`, the
    /// listener's `compress`).
    pub compress: bool,
}

impl Service {
    /// What a login from `ip` for `account` (canonical; `None` while the user is not
    /// known) gets on `stream` now; `None` when the stream is TLS (nothing to decide).
    pub fn plaintext_verdict(
        &self,
        stream: &Stream,
        account: Option<&str>,
        ip: std::net::IpAddr,
    ) -> Option<crate::plaintext::Verdict> {
        let policy = self.plaintext.as_ref().filter(|_| !stream.is_tls())?;
        Some(policy.verdict(self.limits.plaintext_exception(account, ip), std::time::SystemTime::now()))
    }

    /// Credentials may be offered on this connection: it is TLS, or its listener lets
    /// logins without TLS from `ip` in (a user's exception aside: see
    /// [`Service::refuses_before_credentials`]).
    pub fn login_allowed(&self, stream: &Stream, ip: std::net::IpAddr) -> bool {
        self.plaintext_verdict(stream, None, ip) != Some(crate::plaintext::Verdict::Refuse)
    }

    /// Credentials are refused on this connection before the client sends them (a
    /// password in a synchronizing literal or a SASL continuation): none can be let in,
    /// not even by a user's exception.
    pub fn refuses_before_credentials(&self, stream: &Stream, ip: std::net::IpAddr) -> bool {
        !self.login_allowed(stream, ip) && !self.limits.plaintext_user_exceptions()
    }

    /// The reports' part of a login that succeeded: a login without TLS counted (by its
    /// verdict), logged and remembered in `/debug/plaintext-clients`; the client's
    /// software counted in `/debug/client-software` now when known, else by the returned
    /// note (an IMAP session may say what it is after its login).
    pub fn logged_in_client(
        &self,
        stream: &Stream,
        account: &str,
        ip: std::net::IpAddr,
        verdict: Option<crate::plaintext::Verdict>,
        software: Option<crate::metrics::clients::Software>,
    ) -> Option<Box<crate::metrics::clients::Unidentified>> {
        let now = std::time::SystemTime::now();
        let protocol = self.protocol.name();
        let reports = &self.metrics.clients;
        if let Some(verdict) = verdict {
            self.metrics.plaintext_logins.with_label_values(&[protocol, &self.listener, verdict.label()]).inc();
            tracing::info!(mode = verdict.label(), "logged in without TLS");
            let login = crate::metrics::clients::PlaintextLogin {
                account,
                protocol,
                listener: &self.listener,
                mode: verdict.label(),
                ip,
                software: software.as_ref(),
            };
            reports.plaintext.record(&login, now);
        }
        let tls = stream.tls_version();
        if software.is_some() || self.protocol == Protocol::Pop3 {
            reports.census.record(protocol, software, tls, now);
            return None;
        }
        Some(Box::new(crate::metrics::clients::Unidentified {
            reports: reports.clone(),
            protocol,
            listener: self.listener.clone(),
            account: account.to_string(),
            tls,
            plaintext: verdict.is_some(),
            counted: false,
        }))
    }

    /// The session that just logged in, in `account`'s support history: the client as the
    /// history tells clients apart (protocol, `ID` software when said before login, the
    /// address's network, the listener, TLS).
    pub fn began(
        &self,
        stream: &Stream,
        account: &str,
        origin: &crate::origin::Origin,
        software: Option<&crate::metrics::clients::Software>,
    ) -> Option<Box<crate::insight::Activity>> {
        let client = crate::insight::Client {
            protocol: self.protocol.name().to_string(),
            software: software.map(crate::insight::software_name),
            network: crate::metrics::clients::address_prefix(origin.client.ip()),
            listener: self.listener.clone(),
            tls: stream.tls_version().map(str::to_string),
        };
        self.insight.began(account, &origin.session, client)
    }

    /// The cache scope of a session that just logged in at `upstream`: keys for
    /// `credentials`' identity (the SASL authorization identity when given) there. `None`
    /// without a cache.
    pub fn cache_scope(&self, upstream: &Upstream, credentials: &Credentials, proof: &LoginProof) -> Option<Scope> {
        let cache = self.cache.clone()?;
        Some(Scope { account: Account::new(&upstream.identity(), credentials.identity(), proof), cache })
    }

    /// The whole login of `credentials` from `origin`, the same for both protocols: the
    /// limits (rate, lockout, session caps), routing, the upstream `login`, and their
    /// accounting (metrics, penalties, log lines). `classify` says how the protocol's
    /// upstream refusal codes are taken: only wrong credentials are penalized.
    pub async fn log_in<T>(
        &self,
        credentials: &Credentials,
        origin: &crate::origin::Origin,
        classify: fn(Option<&str>) -> UpstreamRefusal,
        login: impl AsyncFnOnce(&Arc<Upstream>) -> Result<T, crate::upstream::LoginError>,
    ) -> LoginOutcome<T> {
        use crate::upstream::LoginError;
        let ip = origin.client.ip();
        // The authentication identity is what a password is guessed for (the lockout); the
        // identity whose mailboxes the session sees is what sessions and bytes count for.
        let (authenticating, account) =
            (self.limits.canonical(&credentials.user), self.limits.canonical(credentials.identity()));
        let (attempt, lease) = match self.admit_login(credentials, &authenticating, &account, ip).await {
            Ok(admitted) => admitted,
            Err(refusal) => return LoginOutcome::Refused(refusal),
        };
        if !self.credentials_fit(credentials) {
            // The client's fault, not the upstream's: without this the upstream would drop
            // the connection and it would count as an upstream error.
            tracing::info!(
                user_bytes = credentials.user.len(),
                password_bytes = credentials.password.expose().len(),
                "login refused: user name or password too long"
            );
            self.login_result("rejected");
            self.penalize(attempt, credentials).await;
            return LoginOutcome::TooLong;
        }
        match self.timed_login(self.routed_login(credentials, origin, login)).await {
            Ok((session, upstream)) => {
                self.limits.succeeded(attempt);
                self.logged_in(credentials, &upstream);
                LoginOutcome::LoggedIn { session, upstream, lease, account }
            }
            Err(LoginError::Rejected { code }) => {
                tracing::info!(user = %credentials.user, upstream_code = ?code, "login refused by upstream");
                match classify(code.as_deref()) {
                    UpstreamRefusal::WrongCredentials => {
                        self.login_result("rejected");
                        self.penalize(attempt, credentials).await;
                    }
                    UpstreamRefusal::Temporary => self.login_result("unavailable"),
                    UpstreamRefusal::Other => self.login_result("rejected"),
                }
                LoginOutcome::Rejected { code }
            }
            Err(LoginError::Unavailable(e)) => {
                self.login_result("unavailable");
                crate::log_budget::warn_limited!(user = %credentials.user, error = %e, "upstream unavailable");
                LoginOutcome::Unavailable
            }
        }
    }

    /// Whether `credentials` are within `limits.max_user_bytes` and `max_password_bytes`.
    /// An OAuth token is no password (providers' tokens run to kilobytes): the front's SASL
    /// line limit bounds it.
    fn credentials_fit(&self, credentials: &Credentials) -> bool {
        let limits = &self.config.limits;
        let names = [Some(credentials.user.as_str()), credentials.authzid.as_deref()];
        names.into_iter().flatten().all(|name| name.len() <= limits.max_user_bytes as usize)
            && (credentials.oauth.is_some()
                || credentials.password.expose().len() <= limits.max_password_bytes as usize)
    }

    /// Routes `credentials` from `origin` to an upstream and runs `login` there: its
    /// session and the upstream. A routing failure is an unavailable upstream.
    async fn routed_login<T>(
        &self,
        credentials: &Credentials,
        origin: &crate::origin::Origin,
        login: impl AsyncFnOnce(&Arc<Upstream>) -> Result<T, crate::upstream::LoginError>,
    ) -> Result<(T, Arc<Upstream>), crate::upstream::LoginError> {
        let upstream = (self.router.route(&self.upstream, credentials.identity(), origin.client.ip()).await)
            .map_err(|e| crate::upstream::UpstreamError::NoRoute(e.0))?;
        let session = login(&upstream).await?;
        Ok((session, upstream))
    }

    /// Whether `credentials` from `ip` may try to log in now: within the address's login
    /// rate, not locked out after failures (`authenticating`'s, attempts in flight
    /// included), and within the session caps of `account`. Refusals are logged and
    /// counted; the attempt counts towards the lockout until its answer, the lease holds
    /// the user's session slot.
    async fn admit_login(
        &self,
        credentials: &Credentials,
        authenticating: &str,
        account: &str,
        ip: std::net::IpAddr,
    ) -> Result<(crate::limits::Attempt, crate::limits::UserLease), LoginRefusal> {
        use crate::limits::Refused;
        let limits = &self.limits;
        let refusal = match limits.login_rate(ip).await {
            Err(Refused::Unavailable) => LoginRefusal::Unavailable,
            Err(_) => LoginRefusal::Rate,
            Ok(()) => match limits.attempt(authenticating, ip, credentials.password.expose()).await {
                Err(Refused::LockedOut) => LoginRefusal::LockedOut,
                Err(_) => LoginRefusal::Unavailable,
                Ok(attempt) => match limits.login(account, ip).await {
                    Ok(lease) => return Ok((attempt, lease)),
                    Err(Refused::Unavailable) => LoginRefusal::Unavailable,
                    Err(_) => LoginRefusal::Sessions,
                },
            },
        };
        let (kind, why) = match refusal {
            LoginRefusal::Rate => (Some("rate"), "too many logins from this address"),
            LoginRefusal::LockedOut => (Some("auth"), "locked out after failed logins"),
            LoginRefusal::Sessions => (Some("connections"), "too many sessions for this user"),
            // Counted in mailgate_limit_store_errors_total.
            LoginRefusal::Unavailable => (None, "shared limits unavailable"),
        };
        tracing::info!(user = %credentials.user, "login refused: {why}");
        if let Some(kind) = kind {
            self.limited(kind);
        }
        Err(refusal)
    }

    /// Waits while `user` sends commands faster than allowed (counted when it waits).
    pub async fn command_rate(&self, user: &str) {
        if self.limits.rates.command(user).await {
            self.limited("rate");
        }
    }

    /// A failed login: waits the address's penalty (a timer in this session's task only).
    async fn penalize(&self, attempt: crate::limits::Attempt, credentials: &Credentials) {
        let delay = self.limits.failed_login(attempt, credentials.password.expose()).await;
        tokio::time::sleep(delay).await;
    }

    /// Counts a request refused by a limit (`kind` from `metrics::LIMIT_KINDS`).
    pub fn limited(&self, kind: &'static str) {
        self.metrics.limit_rejections.with_label_values(&[kind]).inc();
    }

    /// Counts credentials refused because TLS was not active yet.
    pub fn plaintext_refused(&self) {
        self.metrics.plaintext_auth_refused.with_label_values(&[self.protocol.name(), &self.listener]).inc();
        self.metrics.plaintext_logins.with_label_values(&[self.protocol.name(), &self.listener, "refuse"]).inc();
    }

    /// Runs an upstream login (IMAP or POP3), timed, counting why an upstream could not be
    /// used.
    async fn timed_login<T>(
        &self,
        login: impl std::future::Future<Output = Result<T, crate::upstream::LoginError>>,
    ) -> Result<T, crate::upstream::LoginError> {
        let started = std::time::Instant::now();
        let result = login.await;
        let protocol = self.protocol.name();
        self.metrics.upstream_connect_duration.with_label_values(&[protocol]).observe(started.elapsed().as_secs_f64());
        if let Err(crate::upstream::LoginError::Unavailable(error)) = &result {
            self.metrics.upstream_errors.with_label_values(&[protocol, error.kind()]).inc();
        }
        result
    }

    /// A successful login at `upstream`: counted, the session's span gets the user, one
    /// log line.
    fn logged_in(&self, credentials: &Credentials, upstream: &Upstream) {
        self.login_result("ok");
        tracing::Span::current().record("user", credentials.user.as_str());
        tracing::info!(upstream = %upstream.name, "logged in");
    }

    /// Counts a login attempt's outcome: `ok`, `rejected` or `unavailable`.
    fn login_result(&self, result: &str) {
        self.metrics.logins.with_label_values(&[self.protocol.name(), &self.listener, result]).inc();
    }

    /// A relay stream counted into `mailgate_client_bytes_total` (`client`) or
    /// `mailgate_upstream_bytes_total`.
    pub fn counted(
        &self,
        stream: Stream,
        client: bool,
        session: &crate::metrics::SessionBytes,
    ) -> crate::metrics::counted::Counted<Stream> {
        let family = if client { &self.metrics.client_bytes } else { &self.metrics.upstream_bytes };
        let protocol = self.protocol.name();
        crate::metrics::counted::Counted::new(
            stream,
            family.with_label_values(&[protocol, "in"]),
            family.with_label_values(&[protocol, "out"]),
            if client { session.client.clone() } else { session.upstream.clone() },
        )
    }

    /// Whether `account`'s message downloads are refused now: past its download quota with
    /// the `reject` action (counted; logged at info).
    pub fn download_refused(&self, account: &str) -> bool {
        let refused = self.config.limits.download_quota_action == crate::config::QuotaAction::Reject
            && self.limits.bandwidth.over_quota(account);
        if refused {
            tracing::info!("download refused: download quota used up");
            self.limited("quota");
        }
        refused
    }

    /// The client side of a logged-in session, its downloads held to `account`'s bandwidth.
    pub fn throttled<S>(&self, stream: S, account: &str) -> crate::limits::bandwidth::Throttled<S> {
        let delayed = self.metrics.limit_rejections.with_label_values(&["bandwidth"]);
        self.limits.bandwidth.throttle(stream, account, delayed)
    }

    /// The session-end line with the account's sync cost, and its share in the top-K.
    pub fn session_cost(&self, account: &str, bytes: &crate::metrics::SessionBytes, commands: u64, messages: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let cost = crate::metrics::topk::Cost {
            client_bytes: bytes.client.1.load(Relaxed),
            upstream_bytes: bytes.upstream.0.load(Relaxed),
            commands,
            messages,
        };
        tracing::info!(
            account,
            client_bytes = cost.client_bytes,
            upstream_bytes = cost.upstream_bytes,
            commands,
            messages,
            "sync cost"
        );
        self.metrics.top_accounts.record(account, cost, std::time::Instant::now());
    }

    /// STARTTLS/STLS may be started now.
    pub fn starttls_available(&self, stream: &Stream) -> bool {
        self.listener_tls == TlsMode::Starttls && !stream.is_tls() && self.tls.is_some()
    }

    /// STARTTLS/STLS after the `OK`: the handshake over the plain connection. `None` when
    /// the connection is not plain or the handshake fails (the session then ends).
    pub async fn start_tls(&self, stream: Stream) -> Option<Stream> {
        let upgraded = match stream {
            Stream::Plain(tcp) => self.accept_tls(tcp).await,
            Stream::Tls(_) | Stream::Legacy(_) => None,
        };
        if upgraded.is_some() {
            self.metrics.starttls_upgrades.with_label_values(&[self.protocol.name(), &self.listener]).inc();
        }
        upgraded
    }

    /// The server side of a TLS handshake within the handshake timeout; `None` (logged at
    /// debug: a client's failure, not ours) when it fails. The negotiated version goes to
    /// the session's span (`tls`), so every later line of the session carries it.
    pub async fn accept_tls(&self, tcp: TcpStream) -> Option<Stream> {
        let acceptor = self.tls.as_deref()?;
        let failed = |reason: &str| {
            self.metrics.tls_handshakes.with_label_values(&[&self.listener, "failed", "none"]).inc();
            self.metrics.tls_handshake_failures.with_label_values(&[&self.listener, reason]).inc();
        };
        match tokio::time::timeout(self.config.tls.handshake_timeout.0, acceptor.accept(tcp)).await {
            Ok(Ok(accepted)) => {
                let version = accepted.stream.tls_version().unwrap_or("TLS");
                self.metrics.tls_handshakes.with_label_values(&[&self.listener, "ok", version]).inc();
                if accepted.alpn_ignored {
                    self.metrics.tls_alpn_ignored.with_label_values(&[&self.listener]).inc();
                }
                tracing::Span::current().record("tls", version);
                debug!(tls = accepted.stream.tls_summary(), alpn_ignored = accepted.alpn_ignored, "TLS established");
                Some(accepted.stream)
            }
            Ok(Err(refused)) => {
                failed(refused.reason);
                debug!(error = %refused.error, "TLS handshake failed");
                None
            }
            Err(_) => {
                failed("timeout");
                debug!("TLS handshake timed out");
                None
            }
        }
    }
}
