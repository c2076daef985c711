//! Configuration: typed structs per concern, layered with figment
//! (built-in defaults → TOML file → `MAILGATE_*` environment, nested keys split on `__`).
//!
//! Loading collects *every* problem instead of stopping at the first: each top-level section,
//! each listener and each upstream is deserialized on its own, then cross-checked
//! ([`Config::validate`]). Every error names the key path an operator has to fix, e.g.
//! `listener[1].tls: unknown variant "startls"`.
//!
//! Keys are documented in `docs/CONFIG.md`; `mailgate.example.toml` is parsed by a test.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::Value;
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, Span};

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    pub tls: TlsConfig,
    pub upstream: BTreeMap<String, UpstreamConfig>,
    pub imap: ImapConfig,
    pub pop3: Pop3Config,
    pub cache: CacheConfig,
    pub admin: AdminConfig,
    pub limits: LimitsConfig,
    pub routing: RoutingConfig,
    pub reload: ReloadConfig,
    pub shutdown: ShutdownConfig,
    pub insight: InsightConfig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Imap,
    Pop3,
}

impl Protocol {
    /// The ALPN protocol id (IANA registry: `imap`, `pop3`).
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Protocol::Imap => b"imap",
            Protocol::Pop3 => b"pop3",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
        }
    }
}

/// How a connection (client side or upstream side) is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// TLS from the first byte (993).
    Implicit,
    /// Plain TCP upgraded with STARTTLS; credentials refused until then (143).
    Starttls,
    /// No TLS at all, credentials in the clear: only by explicit choice, for trusted networks.
    Plaintext,
}

impl TlsMode {
    /// The configuration word, also the `tls` metric label.
    pub fn name(self) -> &'static str {
        match self {
            TlsMode::Implicit => "implicit",
            TlsMode::Starttls => "starttls",
            TlsMode::Plaintext => "plaintext",
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The oldest TLS version a listener or an upstream connection accepts. TLS 1.2 and 1.3
/// are served by rustls; 1.0 and 1.1 (which rustls does not implement) by the system's
/// OpenSSL, with its security level lowered for that listener or upstream only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
pub enum TlsVersion {
    #[serde(rename = "1.0")]
    Tls1_0,
    #[serde(rename = "1.1")]
    Tls1_1,
    #[default]
    #[serde(rename = "1.2")]
    Tls1_2,
    #[serde(rename = "1.3")]
    Tls1_3,
}

impl TlsVersion {
    /// TLS 1.0 or 1.1: OpenSSL, not rustls.
    pub fn is_legacy(self) -> bool {
        self < TlsVersion::Tls1_2
    }

    /// The versions from this one up, as `Stream::tls_version` names them.
    pub fn accepted(self) -> &'static [&'static str] {
        const ALL: [&str; 4] = ["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"];
        &ALL[self as usize..]
    }
}

/// What a listener does with a client whose ALPN list lacks the listener's protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlpnPolicy {
    /// Refused with `no_application_protocol` (RFC 7301): defeats ALPACA, where an attacker
    /// redirects a client speaking another protocol to this port.
    #[default]
    Strict,
    /// The handshake goes on without ALPN (counted in `mailgate_tls_alpn_ignored_total`):
    /// for old clients that send values a strict server refuses.
    Lenient,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Used in logs (and later in metric labels); unique.
    pub name: String,
    pub protocol: Protocol,
    pub address: SocketAddr,
    pub tls: TlsMode,
    /// The `[upstream.NAME]` this listener's sessions go to.
    #[serde(default = "default_upstream_name")]
    pub upstream: String,
    /// Connections carry a PROXY protocol (v1 or v2) header from a load balancer, which must
    /// come first; its client address replaces the socket's in logs, limits and what the
    /// upstream is told.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The balancers allowed to send that header (CIDRs); any other peer is closed before
    /// the greeting. Required with `proxy_protocol`.
    #[serde(default)]
    pub proxy_trusted: Vec<String>,
    /// How long a balancer has to send the header.
    #[serde(default = "default_proxy_timeout")]
    pub proxy_timeout: Span,
    /// What a login sent without TLS gets, on a STARTTLS listener before STARTTLS or on a
    /// plaintext listener: `refuse` (the default of a STARTTLS listener), `warn` (logged in
    /// and told to switch to TLS) or `allow` (the default of a plaintext listener).
    #[serde(default)]
    pub plaintext_auth: Option<PlaintextAuth>,
    /// From this moment `warn` and `allow` act as `refuse`, without a restart or reload.
    #[serde(default)]
    pub enforce_after: Option<crate::units::Moment>,
    /// What a warned client is told (IMAP `* OK [ALERT] ...`, POP3 in the `+OK` of its
    /// login): one line; `{date}` becomes the date of `enforce_after` (or of the user's or
    /// network's exception), `{tls_ports}` this protocol's TLS ports.
    #[serde(default)]
    pub plaintext_warning: Option<String>,
    /// The oldest TLS version served (default 1.2); only for TLS listeners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_min_version: Option<TlsVersion>,
    /// A client offering ALPN without this listener's protocol (default strict); only for
    /// TLS listeners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn: Option<AlpnPolicy>,
    /// Offer COMPRESS=DEFLATE on this IMAP listener (default: `imap.compress`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<bool>,
}

/// What a login sent without TLS gets (see [`ListenerConfig::plaintext_auth`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlaintextAuth {
    /// Refused before the password is sent where the protocol allows it (IMAP
    /// `NO [PRIVACYREQUIRED]`, POP3 `-ERR [AUTH]`).
    Refuse,
    /// Logged in, and told in the client's own protocol that this will stop.
    Warn,
    /// Logged in silently (a trusted network's plaintext listener).
    Allow,
}

impl PlaintextAuth {
    /// The configuration word, also the `mode` metric label.
    pub fn name(self) -> &'static str {
        match self {
            PlaintextAuth::Refuse => "refuse",
            PlaintextAuth::Warn => "warn",
            PlaintextAuth::Allow => "allow",
        }
    }
}

impl ListenerConfig {
    pub fn min_version(&self) -> TlsVersion {
        self.tls_min_version.unwrap_or_default()
    }

    pub fn alpn_policy(&self) -> AlpnPolicy {
        self.alpn.unwrap_or_default()
    }

    /// Whether this listener's logged-in IMAP clients are offered COMPRESS=DEFLATE.
    pub fn compress(&self, imap: &ImapConfig) -> bool {
        self.protocol == Protocol::Imap && self.compress.unwrap_or(imap.compress)
    }
}

fn default_proxy_timeout() -> Span {
    secs(3)
}

/// How an upstream learns the real client's address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardClient {
    /// It does not: it sees mailgate's address, so its per-address penalties and caps hit
    /// every user behind mailgate at once.
    None,
    /// IMAP `ID` with Dovecot's `x-originating-ip`/`x-connected-ip`/`x-session-id`/...
    /// fields, POP3 `XCLIENT ADDR= PORT= SESSION= TTL=`, before the login. Honoured by
    /// Dovecot when mailgate is in its `login_trusted_networks`; an upstream that does not
    /// trust mailgate takes it as the client's ID (XCLIENT is sent only when offered), so
    /// it is the default: safe either way.
    #[default]
    Commands,
    /// A PROXY protocol v2 header (with the SSL and ALPN TLVs) first on every upstream
    /// connection: for a listener with `haproxy = yes` (Dovecot) or `send-proxy-v2` peers.
    ProxyV2,
}

fn default_upstream_name() -> String {
    "default".into()
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatePair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chains with their keys; the first one is served.
    pub certificates: Vec<CertificatePair>,
    /// The longest a client may take to complete a TLS handshake.
    pub handshake_timeout: Span,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig { certificates: Vec::new(), handshake_timeout: secs(10) }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `host:port` of the upstream IMAP server, or a list: a pool whose hosts serve the
    /// same mailboxes, tried in turn, with health checks and failover.
    pub imap: Option<Hosts>,
    /// The same for POP3.
    pub pop3: Option<Hosts>,
    pub tls: TlsMode,
    /// PEM file of CA certificates that sign the upstream's certificate; the system roots otherwise.
    pub ca_file: Option<PathBuf>,
    /// The name the upstream's certificate must carry, when it is not the host of `imap`.
    pub server_name: Option<String>,
    /// Skips certificate verification: only for a lab. Logged as a warning at start.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// The oldest TLS version accepted from the upstream (default 1.2); not for a
    /// plaintext upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_min_version: Option<TlsVersion>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Span,
    #[serde(default = "default_connect_timeout")]
    pub tls_timeout: Span,
    /// Greeting, CAPABILITY, STARTTLS and the login exchange together.
    #[serde(default = "default_upstream_login_timeout")]
    pub login_timeout: Span,
    /// How this upstream learns the client's real address.
    #[serde(default)]
    pub forward_client: ForwardClient,
    /// How often each host of a pool of several is checked (a TCP connect); a host that
    /// fails is skipped until it answers again.
    #[serde(default = "default_health_check_interval")]
    pub health_check_interval: Span,
}

fn default_health_check_interval() -> Span {
    secs(5)
}

/// One `host:port`, or several.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Hosts {
    One(String),
    Many(Vec<String>),
}

impl Hosts {
    pub fn list(&self) -> Vec<&str> {
        match self {
            Hosts::One(one) => vec![one.as_str()],
            Hosts::Many(many) => many.iter().map(String::as_str).collect(),
        }
    }
}

/// Which upstream a user's session goes to, beyond the listener's own `upstream`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// A TOML file of `[domains]` and `[users]` tables mapping to `[upstream.NAME]`s, read
    /// with the configuration (and again on reload).
    pub rules_file: Option<PathBuf>,
    /// What `rules_file` says; filled in when the configuration is loaded.
    #[serde(skip)]
    pub rules: RoutingRules,
    /// An HTTP service asked for users no rule covers: `GET URL?user=&protocol=&client=`
    /// answered with `{"upstream": "NAME"}` or `{"host": "host:port"}` (404: no route).
    pub lookup_url: Option<String>,
    pub lookup_timeout: Span,
    /// How long an answer of the lookup service is reused.
    pub lookup_cache_ttl: Span,
    /// The lookup service down or answering nonsense: `default` (the listener's upstream)
    /// or `refuse` (the login gets NO [UNAVAILABLE] / -ERR [SYS/TEMP]).
    pub on_lookup_error: LookupFailure,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            rules_file: None,
            rules: RoutingRules::default(),
            lookup_url: None,
            lookup_timeout: secs(2),
            lookup_cache_ttl: secs(60),
            on_lookup_error: LookupFailure::Default,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LookupFailure {
    #[default]
    Default,
    Refuse,
}

/// The routing rules file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingRules {
    /// Domain (the part after the last `@`, any case) to upstream name.
    pub domains: BTreeMap<String, String>,
    /// User (the login name, any case) to upstream name; wins over its domain.
    pub users: BTreeMap<String, String>,
}

impl UpstreamConfig {
    pub fn min_version(&self) -> TlsVersion {
        self.tls_min_version.unwrap_or_default()
    }

    /// The configured `host:port`s for `protocol` (empty: none).
    pub fn addresses(&self, protocol: Protocol) -> Vec<&str> {
        let hosts = match protocol {
            Protocol::Imap => self.imap.as_ref(),
            Protocol::Pop3 => self.pop3.as_ref(),
        };
        hosts.map(Hosts::list).unwrap_or_default()
    }
}

fn default_connect_timeout() -> Span {
    secs(10)
}
fn default_upstream_login_timeout() -> Span {
    secs(30)
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImapConfig {
    /// Invalid commands tolerated before `* BYE` (Dovecot's default is also small).
    pub max_bad_commands: u32,
    /// Time from connect to a successful login.
    pub login_timeout: Span,
    /// Client inactivity after login, IDLE included (RFC 9051 §5.4: at least 30 minutes).
    pub idle_timeout: Span,
    /// Command line and literal limits before authentication: an unauthenticated peer
    /// only needs room for a user name and a password.
    pub preauth_max_line_bytes: ByteSize,
    pub preauth_max_literal_bytes: ByteSize,
    /// Before authentication, the two commands that legitimately run longer: `ID` (RFC 2971
    /// allows 30 pairs of 30-octet fields and 1024-octet values: ~32 KiB quoted, more with
    /// escapes or literals) and `AUTHENTICATE` (an OAuth token of several KB, as SASL-IR or
    /// as the response line). The whole command, lines and literals, stays under this.
    pub preauth_max_long_command_bytes: ByteSize,
    /// Command line and literal limits after authentication (APPEND needs the literal room).
    pub max_line_bytes: ByteSize,
    pub max_literal_bytes: ByteSize,
    /// How long an upstream session stays parked after its client's LOGOUT, for the next
    /// login with the same credentials from the same address to take instead of logging in
    /// upstream (`0`: never parked, the default). See `imap::reuse`.
    pub reuse_for: Span,
    /// Parked sessions per account and in all: a user cannot fill the pool, and the pool
    /// cannot hold more upstream processes than the upstream was sized for.
    pub reuse_per_user: u32,
    pub reuse_total: u32,
    /// Offer `COMPRESS=DEFLATE` (RFC 4978) to logged-in clients, whatever the upstream
    /// supports: mailgate compresses the client leg itself. On by default: a header sync
    /// over a mobile link is bound by bytes, and a client that does not ask pays nothing.
    /// A listener's `compress` overrides it.
    pub compress: bool,
    /// The DEFLATE level of the responses (1 fastest .. 9 smallest). 1 by default: a header
    /// sync takes 12.9 % of its bytes at 1 and 8.6 % at 6, for five times the CPU
    /// (benches/compress.rs); the gateway's CPU is shared by every session, a phone's link
    /// only by its own.
    pub compress_level: u32,
}

impl Default for ImapConfig {
    fn default() -> Self {
        ImapConfig {
            max_bad_commands: 3,
            login_timeout: secs(60),
            idle_timeout: Span(std::time::Duration::from_secs(30 * 60)),
            preauth_max_line_bytes: ByteSize(8 << 10),
            preauth_max_literal_bytes: ByteSize(8 << 10),
            preauth_max_long_command_bytes: ByteSize(64 << 10),
            // Dovecot's imap_max_line_length is 64 KiB.
            max_line_bytes: ByteSize(64 << 10),
            // 64 MiB: above the common 25-50 MiB message size limits.
            max_literal_bytes: ByteSize(64 << 20),
            // Off: a parked session is an upstream process kept alive with nobody on it.
            reuse_for: Span(std::time::Duration::ZERO),
            reuse_per_user: 2,
            reuse_total: 1000,
            compress: true,
            compress_level: 1,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pop3Config {
    /// Invalid commands tolerated before the connection is closed.
    pub max_bad_commands: u32,
    /// Time from connect to a successful login.
    pub login_timeout: Span,
    /// Client inactivity after login (RFC 1939 §3: at least 10 minutes).
    pub idle_timeout: Span,
    /// A command line (RFC 2449 §4: 255 octets). SASL responses to AUTH may be longer and
    /// have their own limit below.
    pub max_line_bytes: ByteSize,
    pub max_sasl_line_bytes: ByteSize,
}

impl Default for Pop3Config {
    fn default() -> Self {
        Pop3Config {
            max_bad_commands: 3,
            login_timeout: secs(60),
            idle_timeout: Span(std::time::Duration::from_secs(10 * 60)),
            max_line_bytes: ByteSize(255),
            max_sasl_line_bytes: ByteSize(8 << 10),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub enabled: bool,
    /// Total weight of the cache: the sum of the cached values' sizes.
    pub max_bytes: ByteSize,
    /// Larger items are streamed to the client and not stored.
    pub max_entry_bytes: ByteSize,
    /// Time-to-live of an entry. Immutable data never goes stale on a server that keeps its
    /// promises; this bounds how long a copy outlives a server that does not (a mailbox
    /// rebuilt under its old UIDVALIDITY, a maildrop numbered again) where no cheaper check
    /// notices, and how long a user's mail stays in memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_to_live: Option<Span>,
    /// A POP3 RETR answered from the cache is also sent upstream (its answer unseen by the
    /// client, and checked against the cached copy), because a RETR has effects there:
    /// Dovecot and most servers mark the message `\Seen` for IMAP clients of the account.
    /// Off saves the upstream that read, for stores where POP3 sets no state.
    pub pop3_mark_seen: bool,
    /// A second tier in Redis that every instance of a fleet shares (off by default).
    pub shared: SharedCacheConfig,
}

/// `[cache.shared]`: the message cache's second tier, in Redis (standalone or Cluster).
/// Immutable message data only; keys are keyed hashes (no user or mailbox name in clear),
/// values compressed and bound to their key, sealed with AES-256-GCM when `encrypt`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedCacheConfig {
    pub enabled: bool,
    /// A standalone Redis: `redis://[user:password@]host:port/db` (the password is never
    /// printed).
    #[serde(serialize_with = "redacted_optional_url")]
    pub url: Option<String>,
    /// Or the seed nodes of a Redis Cluster (`redis://host:port` each).
    #[serde(serialize_with = "redacted_urls")]
    pub cluster: Vec<String>,
    /// Prepended to every key.
    pub key_prefix: String,
    /// A file of at least 32 secret bytes, the same on every instance: the keys' hashes and
    /// the values' authentication (and encryption) derive from it.
    pub secret_file: Option<PathBuf>,
    /// Seal values with AES-256-GCM (mail at rest in a shared store).
    pub encrypt: bool,
    /// Compress values with LZ4 (where a sample shrinks): Redis memory for CPU at write.
    pub compress: bool,
    /// How long Redis keeps an item (set on every write).
    pub time_to_live: Span,
    /// Larger items stay in the memory tier only.
    pub max_item_bytes: ByteSize,
    /// The longest a lookup waits for Redis: then it is a miss.
    pub timeout: Span,
    /// Writes waiting to be sent; beyond this they are dropped (counted), never waited for.
    pub write_queue: usize,
}

impl Default for SharedCacheConfig {
    fn default() -> Self {
        SharedCacheConfig {
            enabled: false,
            url: None,
            cluster: Vec::new(),
            key_prefix: "mailgate:cache:".into(),
            secret_file: None,
            encrypt: false,
            compress: true,
            time_to_live: Span(std::time::Duration::from_secs(7 * 86_400)),
            // As the memory tier's max_entry_bytes: a FETCH of explicit UIDs that opens a body
            // neither tier has is relayed whole (streamed), bodies found included.
            max_item_bytes: ByteSize(8 << 20),
            timeout: Span(std::time::Duration::from_millis(250)),
            write_queue: 10_000,
        }
    }
}

fn redacted_optional_url<S: serde::Serializer>(url: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => serializer.serialize_some(&redact_url(url)),
        None => serializer.serialize_none(),
    }
}

fn redacted_urls<S: serde::Serializer>(urls: &[String], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(urls.iter().map(|url| redact_url(url)))
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            max_bytes: ByteSize(512 << 20),
            max_entry_bytes: ByteSize(8 << 20),
            time_to_live: Some(Span(std::time::Duration::from_secs(7 * 86_400))),
            pop3_mark_seen: true,
            shared: SharedCacheConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `false` turns the admin listener off.
    pub enabled: bool,
    /// Where `/metrics`, `/healthz` and `/readyz` are served: keep it on a private address.
    pub address: SocketAddr,
    /// How many heaviest accounts `/debug/top-accounts` lists (and, ×10, how many each
    /// time slice of the window tracks).
    pub top_accounts: usize,
    /// The sliding window of `/debug/top-accounts`.
    pub top_accounts_window: Span,
    /// A file holding the bearer token `/debug/*` requires (it names accounts); unset:
    /// no token (keep the admin address private). Read again when it changes.
    pub token_file: Option<PathBuf>,
    /// `/metrics` requires the token too.
    pub protect_metrics: bool,
    /// How many users `/debug/plaintext-clients` remembers (the least recently seen go first).
    pub plaintext_clients: usize,
    /// How many kinds of client (protocol, software, version, TLS version)
    /// `/debug/client-software` counts apart; the rest are counted together as `(other)`.
    pub client_software: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            address: SocketAddr::from(([127, 0, 0, 1], 9090)),
            top_accounts: 20,
            top_accounts_window: Span(std::time::Duration::from_secs(3600)),
            token_file: None,
            protect_metrics: false,
            plaintext_clients: 10_000,
            client_software: 1_000,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Client connections open at once, in all.
    pub max_connections: u32,
    /// Client connections open at once from one address (IPv6: one prefix).
    pub max_connections_per_ip: u32,
    /// Logged-in sessions of one user, IMAP and POP3 together.
    pub max_connections_per_user: u32,
    /// Logged-in sessions of one user from one address (Dovecot's mail_max_userip_connections).
    pub max_connections_per_user_ip: u32,
    /// IPv6 addresses sharing this many leading bits count as one client (a subscriber's prefix).
    pub ipv6_prefix: u8,
    /// The largest message a client may APPEND (`NO [TOOBIG]` above it). Upstream QUOTA
    /// answers pass through untouched.
    pub max_append_bytes: ByteSize,
    /// All literals of one APPEND together (MULTIAPPEND's messages, CATENATE's parts).
    pub max_append_command_bytes: ByteSize,
    /// The delay before answering a failed login from an address; doubles per failure.
    pub auth_base_delay: Span,
    pub auth_max_delay: Span,
    /// Distinct failed logins of a user from an address that lock that pair out.
    pub auth_lockout_failures: u32,
    /// How long failures are remembered (and a lockout lasts).
    pub auth_window: Span,
    /// Networks exempt from the authentication penalties and the login rate (`10.0.0.0/8`).
    pub trusted_networks: Vec<String>,
    /// How user names are folded before any limit counts them (`lower`, `exact`); the
    /// domain is always lower-cased. See `identity`.
    pub user_case: crate::identity::UserCase,
    /// Appended to bare user names before any limit counts them (`""`: none).
    pub default_domain: String,
    /// Longer user names (SASL authorization identity included) are a failed login,
    /// refused without asking the upstream (which may close the connection on them).
    pub max_user_bytes: u32,
    /// Longer passwords are a failed login, refused without asking the upstream.
    pub max_password_bytes: u32,
    /// New connections per client address per minute (0: no limit).
    pub connections_per_ip_per_minute: u32,
    /// Login attempts per client address per minute (0: no limit).
    pub logins_per_ip_per_minute: u32,
    /// Commands per user per second after login; faster ones wait (0: no limit).
    pub commands_per_user_per_second: u32,
    /// What one user's sessions together may download per second; faster writes wait, the
    /// session is slowed, never cut (0: no limit). One second's worth may go out at once.
    pub download_bytes_per_user_per_second: ByteSize,
    /// What one session may download per second, so that one sync cannot take a user's
    /// (or the link's) whole bandwidth (0: no limit).
    pub download_bytes_per_session_per_second: ByteSize,
    /// Bytes one user may download per `download_quota_window` (0: no quota).
    pub download_quota: ByteSize,
    /// The quota's window; it starts at the user's first download and rolls over after this.
    pub download_quota_window: Span,
    /// Over the quota: `throttle` (slow the user to `over_quota_bytes_per_second`) or
    /// `reject` (refuse message downloads until the window rolls over).
    pub download_quota_action: QuotaAction,
    pub over_quota_bytes_per_second: ByteSize,
    /// A TOML file with more trusted networks and per-user overrides (read at start and on
    /// every reload).
    pub overrides_file: Option<std::path::PathBuf>,
    /// What `overrides_file` says; filled in when the configuration is loaded.
    #[serde(skip)]
    pub overrides: Overrides,
    /// Where counters live: `local` (this process) or `redis` (shared by every instance
    /// pointing at the same Redis, see `[limits.redis]`).
    pub store: LimitStore,
    pub redis: RedisConfig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitStore {
    Local,
    Redis,
}

/// What a check does when Redis cannot answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreFailure {
    /// Allow (no lease is taken): mail keeps flowing while the limits are blind.
    Open,
    /// Refuse with "try again later".
    Closed,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db` or `unix:///path/to/socket`. The password is
    /// never printed (`check-config` shows `<redacted>`); keep it out of the file with
    /// `MAILGATE_LIMITS__REDIS__URL`.
    #[serde(serialize_with = "redacted_url")]
    pub url: String,
    /// Prepended to every key, so that several fleets can share one Redis.
    pub key_prefix: String,
    /// How long a connection's lease outlives its instance's last refresh (refreshed every
    /// third of it): a crashed instance's connections stop counting within this.
    pub lease_ttl: Span,
    /// The longest a check waits for Redis before `on_error` decides.
    pub timeout: Span,
    pub on_error: StoreFailure,
}

/// A URL with the password of its user part replaced by `<redacted>`.
fn redacted_url<S: serde::Serializer>(url: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&redact_url(url))
}

pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let after = &rest[authority.len()..];
    let authority = match authority.rsplit_once('@') {
        // `user:password`, or a lone part that some clients read as the password.
        Some((userinfo, host)) => {
            let shown =
                userinfo.split_once(':').map_or("<redacted>".to_string(), |(user, _)| format!("{user}:<redacted>"));
            format!("{shown}@{host}")
        }
        None => authority.to_string(),
    };
    // `?pass=` / `?password=` (unix:// URLs carry their credentials there).
    let after = match after.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = (query.split('&'))
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if ["pass", "password"].contains(&key.to_ascii_lowercase().as_str()) => {
                        format!("{key}=<redacted>")
                    }
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => after.to_string(),
    };
    format!("{scheme}://{authority}{after}")
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/0".into(),
            key_prefix: "mailgate:".into(),
            lease_ttl: secs(30),
            timeout: Span(std::time::Duration::from_millis(500)),
            on_error: StoreFailure::Open,
        }
    }
}

/// The overrides file: `trusted_networks = [...]`, `[users."name"]` and
/// `[networks."CIDR"]` tables.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Overrides {
    pub trusted_networks: Vec<String>,
    pub users: BTreeMap<String, UserOverride>,
    pub networks: BTreeMap<String, NetworkOverride>,
}

/// One client network's exceptions.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// Until then, logins without TLS from this network are let in (warned) where the
    /// listener refuses them.
    pub plaintext_until: crate::units::Moment,
}

/// One user's limits where they differ from `[limits]`.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserOverride {
    pub max_connections_per_user: Option<u32>,
    pub max_connections_per_user_ip: Option<u32>,
    /// 0: no quota for this user.
    pub download_quota: Option<ByteSize>,
    /// 0: no rate for this user.
    pub download_bytes_per_user_per_second: Option<ByteSize>,
    /// 0: no command rate for this user.
    pub commands_per_user_per_second: Option<u32>,
    /// Until then, this user's logins without TLS are let in (warned) where the listener
    /// refuses them.
    pub plaintext_until: Option<crate::units::Moment>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaAction {
    Throttle,
    Reject,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 20_000,
            max_connections_per_ip: 100,
            max_connections_per_user: 50,
            max_connections_per_user_ip: 20,
            ipv6_prefix: 64,
            max_append_bytes: ByteSize(50 << 20),
            max_append_command_bytes: ByteSize(200 << 20),
            auth_base_delay: secs(2),
            auth_max_delay: secs(15),
            auth_lockout_failures: 10,
            auth_window: Span(std::time::Duration::from_secs(600)),
            trusted_networks: Vec::new(),
            user_case: crate::identity::UserCase::Lower,
            default_domain: String::new(),
            // RFC 5321 caps an address at 254 octets; Dovecot's login process drops a
            // LOGIN line past about 2 KB ("Input buffer full").
            max_user_bytes: 255,
            max_password_bytes: 1024,
            connections_per_ip_per_minute: 1200,
            logins_per_ip_per_minute: 300,
            // Off by default: a resync legitimately sends thousands of commands in seconds.
            commands_per_user_per_second: 0,
            // Off by default: the right figure depends on the ISP's plans and its upstream.
            download_bytes_per_user_per_second: ByteSize(0),
            download_bytes_per_session_per_second: ByteSize(0),
            download_quota: ByteSize(0),
            download_quota_window: Span(std::time::Duration::from_secs(86_400)),
            download_quota_action: QuotaAction::Throttle,
            over_quota_bytes_per_second: ByteSize(64 << 10),
            overrides_file: None,
            overrides: Overrides::default(),
            store: LimitStore::Local,
            redis: RedisConfig::default(),
        }
    }
}

/// Reloading without a signal: when a watched file changes (a renewed certificate written
/// by an ACME client, a Kubernetes Secret or ConfigMap update), as if SIGHUP had come.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Watch the configuration file and every file it names (certificates, keys, CA files,
    /// the overrides and routing rules files).
    pub watch_files: bool,
    /// How often they are looked at.
    pub watch_interval: Span,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig { watch_files: false, watch_interval: secs(10) }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long in-flight commands may run after SIGTERM before sessions are cut.
    pub grace: Span,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { grace: secs(30) }
    }
}

/// What mailgate learns about accounts for their support (`[insight]`): a short history
/// per recently active account and the common mistakes it shows (docs/OPERATIONS.md,
/// "Support insight"), and the quota alert.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct InsightConfig {
    /// Keep per-account histories and run the detections.
    pub history: bool,
    /// Memory for the histories of this instance (least recently active accounts go
    /// first); with `limits.store = "redis"` they live in Redis instead, for the fleet.
    pub memory: ByteSize,
    /// How long an account's history lasts after its last activity (a week: "which
    /// devices used the account this week").
    pub keep_for: Span,
    /// How close in time two clients' use must be to count as "at the same time" (a
    /// POP3 client deleting while another reads; several POP3 clients).
    pub window: Span,
    /// POP3 sessions in a row without deletions, each finding more messages, that make
    /// a "never deletes while the maildrop grows" detection.
    pub growth_polls: u32,
    /// Full resyncs of a large IMAP mailbox in 24 hours above which they are too many.
    pub resyncs_per_day: u32,
    /// A detection fires again for the same account only after this long.
    pub repeat_after: Span,
    /// Recent detections kept for `/debug/detections`.
    pub recent_detections: u32,
    /// Ask an IMAP account's INBOX quota after its login (upstreams announcing QUOTA
    /// only; the relay asks in the session's pipeline, the login waits for nothing) and
    /// alert its client when nearly full.
    pub quota: bool,
    /// At most one question per account in this window (`0s`: at every login). An hour:
    /// a mailbox does not fill up in less, and the question costs the upstream a quota
    /// lookup.
    pub quota_check_every: Span,
    /// The used share of the limit (0 < x <= 1) from which the client is alerted.
    pub quota_warn_at: f64,
    /// At most one alert per account in this window: a day, so that a phone that logs in
    /// every few minutes does not show it every few minutes.
    pub quota_alert_every: Span,
    /// The alert's text; `{percent}`, `{used}` and `{limit}` are filled in.
    pub quota_alert_text: String,
}

impl Default for InsightConfig {
    fn default() -> Self {
        InsightConfig {
            history: true,
            memory: ByteSize(64 << 20),
            keep_for: secs(7 * 86_400),
            window: secs(86_400),
            growth_polls: 3,
            resyncs_per_day: 10,
            repeat_after: secs(86_400),
            recent_detections: 1000,
            quota: true,
            quota_check_every: secs(3600),
            quota_warn_at: 0.9,
            quota_alert_every: secs(86_400),
            quota_alert_text:
                "Your mailbox is {percent} % full ({used} of {limit}). Please delete or archive old mail.".into(),
        }
    }
}

fn secs(n: u64) -> Span {
    Span(std::time::Duration::from_secs(n))
}

/// One problem with the configuration and the key it is at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found; never empty.
#[derive(Debug, thiserror::Error)]
#[error("{} configuration error(s): {}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct ConfigErrors(pub Vec<ConfigError>);

const SECTIONS: &[&str] = &[
    "listener", "tls", "upstream", "imap", "pop3", "cache", "admin", "limits", "routing", "reload", "shutdown",
    "insight",
];

impl Config {
    /// Defaults, then the TOML file, then `MAILGATE_SECTION__KEY` variables from the process
    /// environment. Only names with a double underscore are overrides: container platforms
    /// inject unrelated `MAILGATE_*` variables (Kubernetes: `MAILGATE_PORT`,
    /// `MAILGATE_SERVICE_HOST` for a service named mailgate) that must not stop a start.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let figment = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(Env::prefixed("MAILGATE_").filter(|key| key.as_str().contains("__")).split("__"));
        Self::from_figment(figment)
    }

    /// Parses TOML text alone (tests, and the example config check).
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        Self::from_figment(Figment::from(Toml::string(text)))
    }

    fn from_figment(figment: Figment) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let root = match figment.extract::<BTreeMap<String, Value>>() {
            Ok(root) => root,
            Err(e) => {
                collect(&mut errors, "", e);
                return Err(ConfigErrors(errors));
            }
        };
        for key in root.keys().filter(|k| !SECTIONS.contains(&k.as_str())) {
            errors.push(ConfigError {
                path: key.clone(),
                message: format!("unknown section (expected one of {})", SECTIONS.join(", ")),
            });
        }

        let listeners = match root.get("listener") {
            None => Vec::new(),
            Some(Value::Array(_, items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, v)| section(&mut errors, &format!("listener[{i}]"), Some(v)))
                .collect(),
            Some(_) => {
                errors.push(error("listener", "must be an array of tables ([[listener]])"));
                Vec::new()
            }
        };
        let upstream = match root.get("upstream") {
            None => BTreeMap::new(),
            Some(Value::Dict(_, items)) => items
                .iter()
                .filter_map(|(name, v)| {
                    section(&mut errors, &format!("upstream.{name}"), Some(v)).map(|u| (name.clone(), u))
                })
                .collect(),
            Some(_) => {
                errors.push(error("upstream", "must be a table of named upstreams ([upstream.NAME])"));
                BTreeMap::new()
            }
        };
        let tls = section(&mut errors, "tls", root.get("tls")).unwrap_or_default();
        let imap = section(&mut errors, "imap", root.get("imap")).unwrap_or_default();
        let pop3 = section(&mut errors, "pop3", root.get("pop3")).unwrap_or_default();
        let cache = section(&mut errors, "cache", root.get("cache")).unwrap_or_default();
        let admin = section(&mut errors, "admin", root.get("admin")).unwrap_or_default();
        let mut limits: LimitsConfig = section(&mut errors, "limits", root.get("limits")).unwrap_or_default();
        if let Some(path) = &limits.overrides_file {
            match read_toml_file(path) {
                Ok(overrides) => limits.overrides = overrides,
                Err(message) => errors.push(error("limits.overrides_file", &message)),
            }
        }
        let mut routing: RoutingConfig = section(&mut errors, "routing", root.get("routing")).unwrap_or_default();
        if let Some(path) = &routing.rules_file {
            match read_toml_file(path) {
                Ok(rules) => routing.rules = rules,
                Err(message) => errors.push(error("routing.rules_file", &message)),
            }
        }
        let reload = section(&mut errors, "reload", root.get("reload")).unwrap_or_default();
        let shutdown = section(&mut errors, "shutdown", root.get("shutdown")).unwrap_or_default();
        let insight = section(&mut errors, "insight", root.get("insight")).unwrap_or_default();

        let config =
            Config { listeners, tls, upstream, imap, pop3, cache, admin, limits, routing, reload, shutdown, insight };
        errors.extend(config.validate());
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Cross-field rules that serde cannot express.
    fn validate(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        if self.listeners.is_empty() {
            errors.push(error("listener", "at least one [[listener]] is required"));
        }
        let mut names = BTreeSet::new();
        let mut addresses = BTreeSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let at = |key: &str| format!("listener[{i}].{key}");
            if l.name.is_empty() || !l.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                errors.push(error(&at("name"), "must be non-empty letters, digits, '-', '_' or '.'"));
            }
            if !names.insert(l.name.as_str()) {
                errors.push(error(&at("name"), &format!("`{}` is used by another listener", l.name)));
            }
            if l.address.port() != 0 && !addresses.insert(l.address) {
                errors.push(error(&at("address"), &format!("{} is used by another listener", l.address)));
            }
            if l.tls != TlsMode::Plaintext && self.tls.certificates.is_empty() {
                errors.push(error(
                    "tls.certificates",
                    &format!("listener `{}` uses TLS ({}) but no certificate is configured", l.name, l.tls),
                ));
            }
            if l.tls == TlsMode::Plaintext {
                for (key, set) in [("tls_min_version", l.tls_min_version.is_some()), ("alpn", l.alpn.is_some())] {
                    if set {
                        errors.push(error(&at(key), "only for a TLS listener (tls = \"implicit\" or \"starttls\")"));
                    }
                }
            }
            if l.compress.is_some() && l.protocol != Protocol::Imap {
                errors.push(error(&at("compress"), "only for an IMAP listener (POP3 has no COMPRESS)"));
            }
            if l.proxy_protocol && l.proxy_trusted.is_empty() {
                errors.push(error(
                    &at("proxy_trusted"),
                    "proxy_protocol needs the balancers' networks: anyone else could claim any address",
                ));
            }
            for (j, network) in l.proxy_trusted.iter().enumerate() {
                if let Err(message) = crate::network::Network::parse(network) {
                    errors.push(error(&at(&format!("proxy_trusted[{j}]")), &message));
                }
            }
            if l.plaintext_auth.is_some() && l.tls == TlsMode::Implicit {
                errors.push(error(&at("plaintext_auth"), "an implicit-TLS listener never sees a login without TLS"));
            }
            if l.enforce_after.is_some() && l.plaintext_auth.unwrap_or(PlaintextAuth::Refuse) == PlaintextAuth::Refuse {
                errors.push(error(&at("enforce_after"), "needs plaintext_auth = \"warn\" or \"allow\" to end"));
            }
            if let Some(text) = &l.plaintext_warning {
                if text.is_empty() || text.len() > 400 || text.chars().any(|c| c.is_control()) {
                    errors.push(error(&at("plaintext_warning"), "must be one line of 1 to 400 characters"));
                }
            }
            if l.proxy_timeout.0.is_zero() {
                errors.push(error(&at("proxy_timeout"), "must be longer than zero"));
            }
            match self.upstream.get(&l.upstream) {
                None => errors.push(error(&at("upstream"), &format!("no [upstream.{}] is configured", l.upstream))),
                Some(u) if u.addresses(l.protocol).is_empty() => errors.push(error(
                    &format!("upstream.{}.{}", l.upstream, l.protocol.name()),
                    &format!("listener `{}` speaks {} but this upstream has no {0} address", l.name, l.protocol.name()),
                )),
                Some(_) => {}
            }
        }
        for (name, u) in &self.upstream {
            if u.health_check_interval.0 < std::time::Duration::from_millis(100) {
                errors.push(error(&format!("upstream.{name}.health_check_interval"), "must be at least 100ms"));
            }
            for protocol in [Protocol::Imap, Protocol::Pop3] {
                for address in u.addresses(protocol) {
                    if let Err(message) = split_host_port(address) {
                        errors.push(error(&format!("upstream.{name}.{}", protocol.name()), &message));
                    }
                }
                if u.imap.as_ref().is_some_and(|h| h.list().is_empty())
                    || u.pop3.as_ref().is_some_and(|h| h.list().is_empty())
                {
                    errors.push(error(&format!("upstream.{name}"), "an empty list of hosts"));
                }
            }
            if u.tls == TlsMode::Plaintext && u.tls_min_version.is_some() {
                errors.push(error(
                    &format!("upstream.{name}.tls_min_version"),
                    "only for a TLS upstream (tls = \"implicit\" or \"starttls\")",
                ));
            }
            if let Some(ca) = &u.ca_file {
                if !ca.is_file() {
                    errors.push(error(
                        &format!("upstream.{name}.ca_file"),
                        &format!("{} is not a readable file", ca.display()),
                    ));
                }
            }
        }
        match &self.admin.token_file {
            Some(file) if !file.is_file() => {
                errors.push(error("admin.token_file", &format!("{} is not a readable file", file.display())))
            }
            None if self.admin.protect_metrics => {
                errors.push(error("admin.protect_metrics", "needs admin.token_file (the token to require)"))
            }
            _ => {}
        }
        for (i, pair) in self.tls.certificates.iter().enumerate() {
            for (key, path) in [("cert", &pair.cert), ("key", &pair.key)] {
                if !path.is_file() {
                    errors.push(error(
                        &format!("tls.certificates[{i}].{key}"),
                        &format!("{} is not a readable file", path.display()),
                    ));
                }
            }
        }
        let i = &self.imap;
        if !(1..=9).contains(&i.compress_level) {
            errors.push(error("imap.compress_level", "must be 1 (fastest) to 9 (smallest)"));
        }
        if i.max_bad_commands == 0 {
            errors.push(error("imap.max_bad_commands", "must be at least 1"));
        }
        for (key, span) in [
            ("imap.login_timeout", i.login_timeout),
            ("imap.idle_timeout", i.idle_timeout),
            ("tls.handshake_timeout", self.tls.handshake_timeout),
        ] {
            if span.0.is_zero() {
                errors.push(error(key, "must be longer than zero"));
            }
        }
        if self.cache.max_entry_bytes > self.cache.max_bytes {
            errors.push(error("cache.max_entry_bytes", "must not exceed cache.max_bytes"));
        }
        let shared = &self.cache.shared;
        if shared.enabled {
            match (&shared.url, shared.cluster.is_empty()) {
                (None, true) | (Some(_), false) => {
                    errors.push(error("cache.shared", "needs either url (standalone Redis) or cluster (its nodes)"))
                }
                _ => {}
            }
            for (i, url) in shared.url.iter().chain(&shared.cluster).enumerate() {
                let key = if shared.url.is_some() {
                    "cache.shared.url".to_string()
                } else {
                    format!("cache.shared.cluster[{i}]")
                };
                if let Err(e) = redis::Client::open(url.as_str()) {
                    errors.push(error(&key, &e.to_string()));
                }
            }
            match &shared.secret_file {
                None => errors.push(error("cache.shared.secret_file", "required: the keys' hashes derive from it")),
                Some(path) => match std::fs::read(path) {
                    Ok(secret) if secret.trim_ascii().len() >= 32 => {}
                    Ok(_) => errors.push(error("cache.shared.secret_file", "needs at least 32 bytes")),
                    Err(e) => errors.push(error("cache.shared.secret_file", &format!("{}: {e}", path.display()))),
                },
            }
            if shared.timeout.0.is_zero() || shared.time_to_live.0.as_secs() == 0 {
                errors.push(error("cache.shared", "timeout and time_to_live must be longer than zero"));
            }
            if shared.write_queue == 0 {
                errors.push(error("cache.shared.write_queue", "must be at least 1"));
            }
            if !self.cache.enabled {
                errors.push(error("cache.shared.enabled", "needs cache.enabled (the memory tier comes first)"));
            }
        }
        if self.limits.ipv6_prefix > 128 {
            errors.push(error("limits.ipv6_prefix", "must be at most 128"));
        }
        for (i, network) in self.limits.trusted_networks.iter().enumerate() {
            if let Err(message) = crate::network::Network::parse(network) {
                errors.push(error(&format!("limits.trusted_networks[{i}]"), &message));
            }
        }
        for (i, network) in self.limits.overrides.trusted_networks.iter().enumerate() {
            if let Err(message) = crate::network::Network::parse(network) {
                errors.push(error(&format!("limits.overrides_file: trusted_networks[{i}]"), &message));
            }
        }
        for network in self.limits.overrides.networks.keys() {
            if let Err(message) = crate::network::Network::parse(network) {
                errors.push(error(&format!("limits.overrides_file: networks.\"{network}\""), &message));
            }
        }
        for (user, o) in &self.limits.overrides.users {
            if let Some(rate) = o.download_bytes_per_user_per_second.map(|r| r.0) {
                if rate != 0 && !(1024..=u64::from(u32::MAX)).contains(&rate) {
                    errors.push(error(
                        &format!("limits.overrides_file: users.\"{user}\".download_bytes_per_user_per_second"),
                        "must be 0 (no limit) or between 1KiB and 4GiB",
                    ));
                }
            }
        }
        for (key, rate) in [
            ("limits.download_bytes_per_user_per_second", self.limits.download_bytes_per_user_per_second.0),
            ("limits.download_bytes_per_session_per_second", self.limits.download_bytes_per_session_per_second.0),
        ] {
            if rate != 0 && !(1024..=u64::from(u32::MAX)).contains(&rate) {
                errors.push(error(key, "must be 0 (off) or between 1KiB and 4GiB"));
            }
        }
        let over = self.limits.over_quota_bytes_per_second.0;
        if !(1024..=u64::from(u32::MAX)).contains(&over) {
            errors.push(error("limits.over_quota_bytes_per_second", "must be between 1KiB and 4GiB"));
        }
        if self.limits.download_quota_window.0.is_zero() {
            errors.push(error("limits.download_quota_window", "must be longer than 0s"));
        }
        let insight = &self.insight;
        for (value, path) in [(insight.keep_for.0, "insight.keep_for"), (insight.window.0, "insight.window")] {
            if value < std::time::Duration::from_secs(60) {
                errors.push(error(path, "must be at least 1m"));
            }
        }
        if insight.growth_polls < 2 {
            errors.push(error("insight.growth_polls", "must be at least 2 (growth is seen between polls)"));
        }
        if insight.history && insight.memory.0 < (1 << 20) {
            errors.push(error("insight.memory", "must be at least 1MiB"));
        }
        let warn_at = self.insight.quota_warn_at;
        if !(warn_at > 0.0 && warn_at <= 1.0) {
            errors.push(error("insight.quota_warn_at", "must be above 0 and at most 1"));
        }
        let text = &self.insight.quota_alert_text;
        // An IMAP response text is 7-bit (RFC 3501 TEXT-CHAR): a client may show 8-bit text
        // as garbage or take the response for broken.
        if text.trim().is_empty() || text.len() > 1000 || !text.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            errors.push(error(
                "insight.quota_alert_text",
                "must be one line of 1 to 1000 printable ASCII characters (IMAP response text is 7-bit)",
            ));
        }
        if self.reload.watch_interval.0 < std::time::Duration::from_secs(1) {
            errors.push(error("reload.watch_interval", "must be at least 1s"));
        }
        let routing = &self.routing;
        for (kind, rules) in [("domains", &routing.rules.domains), ("users", &routing.rules.users)] {
            for (key, target) in rules {
                if !self.upstream.contains_key(target) {
                    errors.push(error(
                        "routing.rules_file",
                        &format!("{kind}.\"{key}\" = \"{target}\": no [upstream.{target}] is configured"),
                    ));
                }
            }
        }
        if let Some(url) = &routing.lookup_url {
            if let Err(message) = crate::routing::lookup::HttpUrl::parse(url) {
                errors.push(error("routing.lookup_url", &message));
            }
        }
        if routing.lookup_timeout.0.is_zero() {
            errors.push(error("routing.lookup_timeout", "must be longer than zero"));
        }
        let redis = &self.limits.redis;
        if self.limits.store == LimitStore::Redis {
            if !["redis://", "unix://", "redis+unix://"].iter().any(|scheme| redis.url.starts_with(scheme)) {
                errors.push(error("limits.redis.url", "must be a redis:// or unix:// URL"));
            } else if let Err(e) = redis::Client::open(redis.url.as_str()) {
                errors.push(error("limits.redis.url", &e.to_string()));
            }
        }
        if redis.lease_ttl.0 < std::time::Duration::from_secs(1) {
            errors.push(error("limits.redis.lease_ttl", "must be at least 1s"));
        }
        if redis.timeout.0.is_zero() || redis.timeout.0 * 3 > redis.lease_ttl.0 {
            errors.push(error("limits.redis.timeout", "must be longer than 0s and at most a third of lease_ttl"));
        }
        if !crate::identity::valid_default_domain(&self.limits.default_domain) {
            errors.push(error("limits.default_domain", "must be a domain name, without `@` or spaces"));
        }
        if self.limits.max_user_bytes == 0 || self.limits.max_password_bytes == 0 {
            errors.push(error("limits.max_user_bytes", "max_user_bytes and max_password_bytes must be at least 1"));
        }
        if self.limits.auth_lockout_failures == 0 {
            errors.push(error("limits.auth_lockout_failures", "must be at least 1"));
        }
        let p = &self.pop3;
        if p.max_bad_commands == 0 {
            errors.push(error("pop3.max_bad_commands", "must be at least 1"));
        }
        for (key, span) in [("pop3.login_timeout", p.login_timeout), ("pop3.idle_timeout", p.idle_timeout)] {
            if span.0.is_zero() {
                errors.push(error(key, "must be longer than zero"));
            }
        }
        let rfc_line = crate::pop3::codec::MAX_COMMAND_LINE as u64;
        if p.max_line_bytes.0 < rfc_line || p.max_sasl_line_bytes.0 < rfc_line {
            errors.push(error("pop3.max_line_bytes", "POP3 line limits must be at least 255 octets (RFC 2449)"));
        }
        if i.preauth_max_line_bytes.0 < 512 || i.max_line_bytes.0 < 1024 {
            errors.push(error(
                "imap.max_line_bytes",
                "line limits must be at least 512 bytes before and 1KiB after login",
            ));
        }
        if i.preauth_max_long_command_bytes.0 < i.preauth_max_line_bytes.0 {
            errors.push(error("imap.preauth_max_long_command_bytes", "must be at least imap.preauth_max_line_bytes"));
        }
        if !i.reuse_for.0.is_zero() && (i.reuse_per_user == 0 || i.reuse_total == 0) {
            errors
                .push(error("imap.reuse_per_user", "reuse_per_user and reuse_total must be at least 1 with reuse_for"));
        }
        errors
    }

    /// The files this configuration reads besides itself: certificates and keys, upstream
    /// CA files, the overrides and routing rules files.
    pub fn side_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> =
            self.tls.certificates.iter().flat_map(|c| [c.cert.clone(), c.key.clone()]).collect();
        files.extend(self.upstream.values().filter_map(|u| u.ca_file.clone()));
        files.extend(self.limits.overrides_file.clone());
        files.extend(self.routing.rules_file.clone());
        files
    }

    /// The files the configuration file at `path` names, read leniently (for watching: the
    /// file may be one that does not load yet).
    pub fn referenced_files(path: &Path) -> Vec<PathBuf> {
        let Ok(table) = std::fs::read_to_string(path).unwrap_or_default().parse::<toml::Table>() else {
            return Vec::new();
        };
        let text = |v: Option<&toml::Value>| v.and_then(toml::Value::as_str).map(PathBuf::from);
        let mut files = Vec::new();
        let certificates = table.get("tls").and_then(|t| t.get("certificates")).and_then(toml::Value::as_array);
        for pair in certificates.into_iter().flatten() {
            files.extend(text(pair.get("cert")));
            files.extend(text(pair.get("key")));
        }
        for upstream in table.get("upstream").and_then(toml::Value::as_table).into_iter().flat_map(|t| t.values()) {
            files.extend(text(upstream.get("ca_file")));
        }
        files.extend(text(table.get("limits").and_then(|t| t.get("overrides_file"))));
        files.extend(text(table.get("routing").and_then(|t| t.get("rules_file"))));
        files
    }

    /// The effective configuration as TOML; secrets (if any) print as `<redacted>`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// `host:port` with a port; IPv6 literals in brackets.
pub fn split_host_port(address: &str) -> Result<(String, u16), String> {
    let (host, port) = address.rsplit_once(':').ok_or_else(|| format!("`{address}` needs a port (host:port)"))?;
    let port: u16 = port.parse().map_err(|_| format!("`{address}`: `{port}` is not a port number"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("`{address}` has no host"));
    }
    Ok((host.to_string(), port))
}

/// A side file of the configuration (overrides, routing rules), its errors naming the file
/// and the line.
fn read_toml_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str::<T>(&text).map_err(|e| {
        let line = e.span().map(|span| text[..span.start].matches('\n').count() + 1);
        let message = line.map_or_else(|| e.message().to_string(), |line| format!("line {line}: {}", e.message()));
        format!("{}: {message}", path.display())
    })
}

fn error(path: &str, message: &str) -> ConfigError {
    ConfigError { path: path.to_string(), message: message.to_string() }
}

/// Deserializes one section; an absent section yields its defaults.
fn section<T: DeserializeOwned + Default>(
    errors: &mut Vec<ConfigError>,
    path: &str,
    value: Option<&Value>,
) -> Option<T> {
    let figment = match value {
        Some(v) => Figment::from(Serialized::defaults(v)),
        None => return Some(T::default()),
    };
    match figment.extract::<T>() {
        Ok(v) => Some(v),
        Err(e) => {
            collect(errors, path, e);
            None
        }
    }
}

fn collect(errors: &mut Vec<ConfigError>, prefix: &str, error: figment::Error) {
    for e in error {
        let mut path = prefix.to_string();
        for part in &e.path {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(part);
        }
        errors.push(ConfigError { path, message: e.kind.to_string() });
    }
}

// `section` needs `Default` for absent sections; listeners and upstreams are always present
// when deserialized, so these defaults are never used as configuration.
impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            name: String::new(),
            protocol: Protocol::Imap,
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: TlsMode::Implicit,
            upstream: default_upstream_name(),
            proxy_protocol: false,
            proxy_trusted: Vec::new(),
            proxy_timeout: default_proxy_timeout(),
            plaintext_auth: None,
            enforce_after: None,
            plaintext_warning: None,
            tls_min_version: None,
            alpn: None,
            compress: None,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            imap: None,
            pop3: None,
            tls: TlsMode::Implicit,
            ca_file: None,
            server_name: None,
            insecure_skip_verify: false,
            tls_min_version: None,
            connect_timeout: default_connect_timeout(),
            tls_timeout: default_connect_timeout(),
            login_timeout: default_upstream_login_timeout(),
            forward_client: ForwardClient::Commands,
            health_check_interval: default_health_check_interval(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[listener]]
        name = "imap"
        protocol = "imap"
        address = "127.0.0.1:1143"
        tls = "plaintext"

        [upstream.default]
        imap = "127.0.0.1:143"
        tls = "plaintext"
    "#;

    #[test]
    fn migration_keys_are_read_and_checked_with_their_paths() {
        let warned = MINIMAL.replace(
            "tls = \"plaintext\"\n\n",
            "tls = \"plaintext\"\nplaintext_auth = \"warn\"\nenforce_after = \"2027-03-31T00:00:00+01:00\"\n\n",
        );
        let config = Config::from_toml(&warned).unwrap();
        assert_eq!(config.listeners[0].plaintext_auth, Some(PlaintextAuth::Warn));
        assert_eq!(config.listeners[0].enforce_after.unwrap().to_string(), "2027-03-31T00:00:00+01:00");

        let errors = |text: &str| Config::from_toml(text).unwrap_err().0;
        let not_a_time = warned.replace("2027-03-31T00:00:00+01:00", "next spring");
        let found = errors(&not_a_time);
        assert!(found.iter().any(|e| e.path.starts_with("listener[0]") && e.message.contains("RFC 3339")), "{found:?}");
        let refusing = warned.replace("plaintext_auth = \"warn\"", "plaintext_auth = \"refuse\"");
        let found = errors(&refusing);
        assert!(found.iter().any(|e| e.path == "listener[0].enforce_after"), "{found:?}");
        let implicit = warned.replace("tls = \"plaintext\"\nplaintext_auth", "tls = \"implicit\"\nplaintext_auth");
        let found = errors(&implicit);
        assert!(found.iter().any(|e| e.path == "listener[0].plaintext_auth"), "{found:?}");
        let two_lines = warned.replace("enforce_after", "plaintext_warning = \"a\\nb\"\nenforce_after");
        let found = errors(&two_lines);
        assert!(found.iter().any(|e| e.path == "listener[0].plaintext_warning"), "{found:?}");

        let dir = tempfile::tempdir().unwrap();
        let overrides = dir.path().join("overrides.toml");
        let with = |body: &str| {
            std::fs::write(&overrides, body).unwrap();
            format!("{MINIMAL}\n[limits]\noverrides_file = {:?}\n", overrides.display().to_string())
        };
        let good = "[users.bob]\nplaintext_until = \"2027-05-01T00:00:00Z\"\n[networks.\"192.0.2.0/24\"]\nplaintext_until = \"2027-06-30T00:00:00Z\"\n";
        let config = Config::from_toml(&with(good)).unwrap();
        assert_eq!(config.limits.overrides.users["bob"].plaintext_until.unwrap().date(), "2027-05-01");
        assert_eq!(config.limits.overrides.networks["192.0.2.0/24"].plaintext_until.date(), "2027-06-30");
        let found = errors(&with("[networks.\"192.0.2.0/33\"]\nplaintext_until = \"2027-06-30T00:00:00Z\"\n"));
        assert!(found.iter().any(|e| e.path.contains("networks.\"192.0.2.0/33\"")), "{found:?}");
    }

    #[test]
    fn insight_quota_keys_are_read_and_checked_with_their_paths() {
        let config = Config::from_toml(MINIMAL).unwrap();
        assert!(config.insight.quota);
        assert_eq!(config.insight.quota_check_every.0.as_secs(), 3600);
        assert_eq!(config.insight.quota_alert_every.0.as_secs(), 86_400);
        let with = |keys: &str| format!("{MINIMAL}\n[insight]\n{keys}\n");
        let config = Config::from_toml(&with("quota_check_every = \"0s\"\nquota_warn_at = 0.8")).unwrap();
        assert_eq!((config.insight.quota_check_every.0.as_secs(), config.insight.quota_warn_at), (0, 0.8));
        for (keys, path) in [
            ("quota_warn_at = 1.5", "insight.quota_warn_at"),
            ("quota_warn_at = 0.0", "insight.quota_warn_at"),
            ("quota_alert_text = \"a\\nb\"", "insight.quota_alert_text"),
            ("quota_alert_text = \" \"", "insight.quota_alert_text"),
            ("quota_alert_text = \"Ihr Postfach ist {percent} % voll. Größe\"", "insight.quota_alert_text"),
            ("quota_every = \"1h\"", "insight"),
        ] {
            let found = Config::from_toml(&with(keys)).unwrap_err().0;
            assert!(found.iter().any(|e| e.path.starts_with(path)), "{keys}: {found:?}");
        }
    }

    #[test]
    fn insight_history_keys_are_read_and_checked_with_their_paths() {
        let config = Config::from_toml(MINIMAL).unwrap();
        assert!(config.insight.history);
        assert_eq!(config.insight.keep_for.0.as_secs(), 7 * 86_400);
        assert_eq!((config.insight.growth_polls, config.insight.resyncs_per_day), (3, 10));
        let with = |keys: &str| format!("{MINIMAL}\n[insight]\n{keys}\n");
        let config = Config::from_toml(&with("memory = \"8MiB\"\nwindow = \"2h\"\nhistory = false")).unwrap();
        assert_eq!((config.insight.memory.0, config.insight.window.0.as_secs()), (8 << 20, 7200));
        for (keys, path) in [
            ("keep_for = \"10s\"", "insight.keep_for"),
            ("window = \"0s\"", "insight.window"),
            ("growth_polls = 1", "insight.growth_polls"),
            ("memory = \"100KiB\"", "insight.memory"),
            ("histories = true", "insight"),
        ] {
            let found = Config::from_toml(&with(keys)).unwrap_err().0;
            assert!(found.iter().any(|e| e.path.starts_with(path)), "{keys}: {found:?}");
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(config.imap.max_bad_commands, 3);
        assert_eq!(config.imap.idle_timeout.0.as_secs(), 1800);
        assert_eq!(config.listeners[0].upstream, "default");
        assert_eq!(config.upstream["default"].login_timeout.0.as_secs(), 30);
    }

    #[test]
    fn every_error_is_reported_with_its_key_path() {
        let text = r#"
            [[listener]]
            name = "a"
            protocol = "imap"
            address = "127.0.0.1:1143"
            tls = "startls"

            [[listener]]
            name = "b"
            protocol = "imap"
            address = "not an address"
            tls = "implicit"
            upstream = "missing"

            [imap]
            idle_timeout = "forever"
            max_bad_commands = 0

            [upstream.default]
            imap = "no-port"
            tls = "implicit"
            colour = "blue"

            [bogus]
        "#;
        let errors = Config::from_toml(text).unwrap_err().0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in
            ["bogus", "listener[0].tls", "listener[1].address", "imap.idle_timeout", "upstream.default.colour"]
        {
            assert!(paths.contains(&expected), "{expected} missing from {errors:?}");
        }
    }

    #[test]
    fn cross_checks_name_the_key() {
        let text = MINIMAL.replace("tls = \"plaintext\"\n\n", "tls = \"implicit\"\n\n");
        let errors = Config::from_toml(&text).unwrap_err().0;
        assert!(errors.iter().any(|e| e.path == "tls.certificates"), "{errors:?}");
        let text = MINIMAL.replace("127.0.0.1:143", "127.0.0.1");
        let errors = Config::from_toml(&text).unwrap_err().0;
        assert!(errors.iter().any(|e| e.path == "upstream.default.imap"), "{errors:?}");
        let bad = format!("{MINIMAL}\n[imap]\nmax_bad_commands = 0\n");
        let errors = Config::from_toml(&bad).unwrap_err().0;
        assert!(errors.iter().any(|e| e.path == "imap.max_bad_commands"), "{errors:?}");
        for level in [0, 10] {
            let bad = format!("{MINIMAL}\n[imap]\ncompress_level = {level}\n");
            let errors = Config::from_toml(&bad).unwrap_err().0;
            assert!(errors.iter().any(|e| e.path == "imap.compress_level"), "{errors:?}");
        }
        let on_pop3 = MINIMAL.replace("protocol = \"imap\"", "protocol = \"pop3\"\ncompress = true");
        if on_pop3 != MINIMAL {
            let errors = Config::from_toml(&on_pop3).unwrap_err().0;
            assert!(errors.iter().any(|e| e.path.ends_with(".compress")), "{errors:?}");
        }
        let slow = format!("{MINIMAL}\n[limits]\ndownload_bytes_per_user_per_second = 100\n");
        let errors = Config::from_toml(&slow).unwrap_err().0;
        assert!(errors.iter().any(|e| e.path == "limits.download_bytes_per_user_per_second"), "{errors:?}");
        let fine = format!("{MINIMAL}\n[limits]\ndownload_bytes_per_user_per_second = \"2MiB\"\n");
        assert_eq!(Config::from_toml(&fine).unwrap().limits.download_bytes_per_user_per_second.0, 2 << 20);
    }

    /// A listener and an upstream with `listener` and `upstream` as their TLS lines.
    fn tls_config(dir: &Path, listener: &str, upstream: &str) -> String {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, "").unwrap();
        std::fs::write(&key, "").unwrap();
        format!(
            "[[listener]]\nname = \"imaps\"\nprotocol = \"imap\"\naddress = \"127.0.0.1:993\"\n{listener}\n\n\
             [upstream.default]\nimap = \"127.0.0.1:993\"\n{upstream}\n\n\
             [tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n",
            cert.display().to_string(),
            key.display().to_string()
        )
    }

    #[test]
    fn tls_versions_and_alpn_policies_parse_and_name_their_key_when_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let text = tls_config(
            dir.path(),
            "tls = \"implicit\"\ntls_min_version = \"1.0\"\nalpn = \"lenient\"",
            "tls = \"starttls\"\ntls_min_version = \"1.1\"",
        );
        let config = Config::from_toml(&text).unwrap();
        assert_eq!(config.listeners[0].min_version(), TlsVersion::Tls1_0);
        assert!(config.listeners[0].min_version().is_legacy());
        assert_eq!(config.listeners[0].alpn_policy(), AlpnPolicy::Lenient);
        assert_eq!(config.upstream["default"].min_version(), TlsVersion::Tls1_1);
        assert_eq!(TlsVersion::Tls1_1.accepted(), ["TLSv1.1", "TLSv1.2", "TLSv1.3"]);
        assert_eq!(TlsVersion::Tls1_3.accepted(), ["TLSv1.3"]);
        let again = Config::from_toml(&config.to_toml()).unwrap();
        assert_eq!(again.listeners[0].tls_min_version, Some(TlsVersion::Tls1_0));

        // Unset: TLS 1.2 and strict ALPN, and the effective configuration invents no key.
        let text = tls_config(dir.path(), "tls = \"implicit\"", "tls = \"implicit\"");
        let config = Config::from_toml(&text).unwrap();
        let listener = &config.listeners[0];
        assert_eq!((listener.min_version(), listener.alpn_policy()), (TlsVersion::Tls1_2, AlpnPolicy::Strict));
        assert!(!listener.min_version().is_legacy());
        assert!(!config.to_toml().contains("tls_min_version"), "{}", config.to_toml());

        // One wrong value per listener: a section stops at its first error.
        for (listener, upstream, path) in [
            ("tls_min_version = \"1.4\"", "", "listener[0].tls_min_version"),
            ("alpn = \"loose\"", "", "listener[0].alpn"),
            ("", "tls_min_version = \"TLSv1.1\"", "upstream.default.tls_min_version"),
        ] {
            let text = tls_config(
                dir.path(),
                &format!("tls = \"implicit\"\n{listener}"),
                &format!("tls = \"implicit\"\n{upstream}"),
            );
            let errors = Config::from_toml(&text).unwrap_err().0;
            assert!(
                errors.iter().any(|e| e.path == path && e.message.contains("unknown variant")),
                "{path}: {errors:?}"
            );
        }
    }

    #[test]
    fn tls_settings_on_plaintext_listeners_and_upstreams_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let text = tls_config(
            dir.path(),
            "tls = \"plaintext\"\ntls_min_version = \"1.0\"\nalpn = \"lenient\"",
            "tls = \"plaintext\"\ntls_min_version = \"1.0\"",
        );
        let errors = Config::from_toml(&text).unwrap_err().0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in ["listener[0].tls_min_version", "listener[0].alpn", "upstream.default.tls_min_version"] {
            assert!(paths.contains(&expected), "{expected} missing from {errors:?}");
        }
    }

    #[test]
    fn the_overrides_file_is_read_and_its_errors_name_it() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("overrides.toml");
        std::fs::write(
            &good,
            "trusted_networks = [\"10.0.0.0/8\"]\n[users.\"bob@example.org\"]\ndownload_quota = \"1GiB\"\n",
        )
        .unwrap();
        let text = format!("{MINIMAL}\n[limits]\noverrides_file = {:?}\n", good.display().to_string());
        let config = Config::from_toml(&text).unwrap();
        let bob = config.limits.overrides.users["bob@example.org"];
        assert_eq!(bob.download_quota.map(|b| b.0), Some(1 << 30));
        assert_eq!(bob.max_connections_per_user, None);
        assert_eq!(config.limits.overrides.trusted_networks, ["10.0.0.0/8"]);

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "trusted_networks = [\"10.0.0.0/99\"]\n[users.bob]\nmax_sessions = 3\n").unwrap();
        let text = format!("{MINIMAL}\n[limits]\noverrides_file = {:?}\n", bad.display().to_string());
        let errors = Config::from_toml(&text).unwrap_err().0;
        assert!(
            errors.iter().any(
                |e| e.path == "limits.overrides_file" && e.message.contains("line 3: unknown field `max_sessions`")
            ),
            "{errors:?}"
        );
        let missing = format!("{MINIMAL}\n[limits]\noverrides_file = \"/nonexistent/overrides.toml\"\n");
        let errors = Config::from_toml(&missing).unwrap_err().0;
        assert!(errors.iter().any(|e| e.path == "limits.overrides_file"), "{errors:?}");
    }

    #[test]
    fn effective_config_round_trips_through_toml() {
        let config = Config::from_toml(MINIMAL).unwrap();
        let again = Config::from_toml(&config.to_toml()).unwrap();
        assert_eq!(again.to_toml(), config.to_toml());
    }

    #[test]
    fn redis_passwords_never_print() {
        assert_eq!(redact_url("redis://user:S3cret@10.0.0.1:6379/2"), "redis://user:<redacted>@10.0.0.1:6379/2");
        assert_eq!(redact_url("redis://:S3cret@redis:6379"), "redis://:<redacted>@redis:6379");
        assert_eq!(redact_url("redis://redis:6379/0"), "redis://redis:6379/0");
        assert_eq!(redact_url("unix:///run/redis.sock"), "unix:///run/redis.sock");
        assert_eq!(
            redact_url("unix:///run/redis.sock?db=2&pass=S3cret"),
            "unix:///run/redis.sock?db=2&pass=<redacted>"
        );
        assert_eq!(redact_url("redis://h:1/0?user=u&password=S3cret"), "redis://h:1/0?user=u&password=<redacted>");
        let text = format!(
            "{MINIMAL}\n[limits]\nstore = \"redis\"\n[limits.redis]\nurl = \"redis://u:S3cret@127.0.0.1:6379/0\"\n"
        );
        let shown = Config::from_toml(&text).unwrap().to_toml();
        assert!(!shown.contains("S3cret") && shown.contains("redis://u:<redacted>@127.0.0.1:6379/0"), "{shown}");
    }

    #[test]
    fn shipped_example_parses() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/mailgate.example.toml")).unwrap();
        // The commented legacy listener, uncommented, must parse too: the `# ` lines from
        // its `# [[listener]]` on.
        let start = text.find("# [[listener]]\n# name = \"imaps-legacy\"").expect("the legacy listener example");
        let (before, block) = text.split_at(start);
        let lines: Vec<&str> = block.lines().collect();
        let commented = lines.iter().take_while(|l| l.starts_with("# ")).count();
        let uncommented = lines[..commented].iter().map(|l| &l[2..]);
        let legacy =
            format!("{before}{}\n{}\n", uncommented.collect::<Vec<_>>().join("\n"), lines[commented..].join("\n"));
        assert!(legacy.contains("\ntls_min_version = \"1.0\"") && legacy.contains("\nalpn = \"lenient\""), "{legacy}");
        for text in [text, legacy] {
            // The example points at /etc paths that do not exist here: only file checks may fail.
            match Config::from_toml(&text) {
                Ok(_) => {}
                Err(ConfigErrors(errors)) => {
                    for e in errors {
                        assert!(e.message.contains("is not a readable file"), "{e}");
                    }
                }
            }
        }
    }
}
