//! mailgate: a TLS-terminating IMAP and POP3 gateway in front of existing mail servers,
//! with a per-user message cache, limits, and metrics.
//!
//! The data path (see `docs/ARCHITECTURE.md`):
//!
//! ```text
//! client ─TCP─▶ listener ─(PROXY header)─(TLS | STARTTLS)─▶ imap::front | pop3::front
//!                                  │ credentials                (not authenticated:
//!                                  ▼                             mailgate's own)
//!               service::log_in: limits, routing, upstream (TLS | STARTTLS | plain),
//!                                imap::upstream | pop3::upstream login
//!                                  │ OK: a service::Handover
//!                                  ▼
//!               imap::relay | pop3::relay: two pumps (pumps), client ◀──▶ upstream,
//!                                          FETCH / RETR answered from the cache
//! ```
//!
//! Sessions:
//! - [`listener`]: accept loops, the PROXY header, implicit TLS, a span per session; runs
//!   the front, then the relay.
//! - [`service`]: what a listener's sessions share, TLS handshakes, the login flow both
//!   protocols share.
//! - [`imap`], [`pop3`]: each protocol's front (before login), upstream login and relay.
//! - [`pumps`]: driving a relay's two directions; the buffers they read and write through.
//! - [`compress`]: COMPRESS=DEFLATE on an IMAP client leg, a reader and a writer that turn
//!   DEFLATE on when the relay says.
//! - [`stream`]: TCP or TLS, either side; [`tls`]: rustls settings built once;
//!   [`legacy_tls`]: OpenSSL for the listeners and upstreams that allow TLS 1.0/1.1.
//! - [`upstream`]: reaching an upstream pool (timeouts, PROXY v2, TLS, failover, health);
//!   [`routing`]: which upstream a login goes to.
//! - [`origin`]: where a session comes from, and how an upstream is told;
//!   [`proxy_header`]: the PROXY protocol, without I/O.
//!
//! Around them:
//! - [`cache`]: the message cache (snapshots per mailbox, bodies, POP3 messages).
//! - [`plaintext`]: what a login without TLS gets while clients move to TLS (warn, then
//!   refuse; exceptions with end dates).
//! - [`quota`]: an IMAP account's INBOX quota read after login, the ALERT of a nearly
//!   full one, `/debug/quota` (`[insight]`).
//! - [`limits`]: connection caps, rates, bandwidth, penalties, alone or shared in Redis;
//!   [`identity`]: the canonical user name they key on; [`network`]: CIDR networks.
//! - [`metrics`]: Prometheus families, byte counting, the top-K of sync cost, the reports
//!   of who logs in with what (plaintext clients, client software);
//!   [`admin`], [`admin_auth`]: the admin HTTP listener and its token.
//! - [`insight`]: per-account support histories, the common mailbox mistakes they show,
//!   and the support view of an account (`/debug/accounts/<user>`).
//! - [`config`]: typed configuration with key paths in every error; [`units`]: sizes and
//!   durations; [`reload`]: SIGHUP and watched files; [`shutdown`]: the graceful drain.
//! - [`auth`], [`secret`]: credentials that never reach a log; [`log_budget`]: what a peer
//!   can make mailgate log is bounded.
//! - `fuzzing`: the fuzz harnesses (hidden; used by `fuzz/` and the corpus tests).

#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_auth;
pub mod auth;
pub mod cache;
pub mod compress;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod imap;
pub mod insight;
pub mod legacy_tls;
pub mod limits;
pub mod listener;
pub mod log_budget;
pub mod metrics;
pub mod network;
pub mod oauth;
pub mod origin;
pub mod plaintext;
pub mod pop3;
pub mod proxy_header;
pub mod pumps;
pub mod quota;
pub mod reload;
pub mod routing;
pub mod secret;
pub mod service;
pub mod shutdown;
pub mod stream;
pub mod tls;
pub mod units;
pub mod upstream;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Protocol, TlsMode};
use crate::listener::Listener;
use crate::service::Service;
use crate::upstream::Upstream;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigErrors),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("listener `{name}` cannot bind {address}: {source}")]
    Bind { name: String, address: std::net::SocketAddr, source: std::io::Error },
    #[error(transparent)]
    LimitStore(#[from] limits::fleet::StoreError),
    #[error(transparent)]
    SharedCache(#[from] cache::shared::SharedError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Binds every configured listener, in configuration order.
pub async fn bind(config: &Config) -> Result<Vec<TcpListener>> {
    let mut bound = Vec::new();
    for l in &config.listeners {
        let tcp = TcpListener::bind(l.address).await.map_err(|source| Error::Bind {
            name: l.name.clone(),
            address: l.address,
            source,
        })?;
        bound.push(tcp);
    }
    Ok(bound)
}

/// What every generation of services shares and a reload leaves alone: the shutdown
/// signal, the message cache, the metrics and the limits (with their open leases).
pub struct Shared {
    pub token: CancellationToken,
    pub cache: Option<Arc<cache::MessageCache>>,
    pub metrics: Arc<metrics::Metrics>,
    pub limits: Arc<limits::Limits>,
    /// Per-account support histories (`[insight]`), kept across reloads.
    pub insight: Arc<insight::Insight>,
    /// The parked IMAP sessions' sweeps and log-outs (`imap::reuse`), waited for at
    /// shutdown: a parked session is logged out, not cut.
    pub parked: TaskTracker,
}

/// One configuration's services, one per listener in configuration order, and the
/// upstreams they use, with the switch that ends their health checks.
pub struct Generation {
    pub services: Vec<Arc<Service>>,
    pub upstreams: Vec<(Arc<Upstream>, Protocol)>,
    pub health: CancellationToken,
    /// Parked IMAP sessions, when `[imap] reuse_for` is set: closed with the generation.
    pub reuse: Option<Arc<imap::reuse::Pool>>,
}

impl Generation {
    /// Starts the pools' health checks: only once this generation is the one in use (a
    /// refused reload never starts them).
    pub fn check_health(&self, metrics: &metrics::Metrics) {
        for (upstream, protocol) in &self.upstreams {
            upstream.watch(metrics.upstream_host_up.clone(), protocol.name(), self.health.clone());
            tokio::spawn(learn_oauth(Arc::downgrade(upstream), *protocol, self.health.clone()));
        }
        if let Some(reuse) = &self.reuse {
            reuse.tasks().spawn(reuse.clone().sweep(self.health.clone()));
        }
    }

    /// The `mailgate_upstream_host_up` label sets of this generation's pools.
    pub fn host_labels(&self) -> std::collections::BTreeSet<[String; 3]> {
        (self.upstreams.iter())
            .filter(|(u, _)| u.hosts.len() >= 2)
            .flat_map(|(u, p)| u.hosts.iter().map(|h| [u.name.clone(), p.name().to_string(), h.address()]))
            .collect()
    }
}

/// Learns which OAuth mechanisms `upstream` offers, so that the fronts announce them from
/// the first client on (every login refreshes it after that): a probe connection of
/// mailgate's own, again every 30 seconds until one succeeds, or until `stop` (the
/// generation was replaced) or the upstream is dropped.
async fn learn_oauth(upstream: std::sync::Weak<Upstream>, protocol: Protocol, stop: CancellationToken) {
    const RETRY: std::time::Duration = std::time::Duration::from_secs(30);
    loop {
        let Some(pool) = upstream.upgrade() else { return };
        let probed = tokio::select! {
            probed = async {
                match protocol {
                    Protocol::Imap => imap::upstream::probe(&pool).await,
                    Protocol::Pop3 => pop3::upstream::probe(&pool).await,
                }
            } => probed,
            _ = stop.cancelled() => return,
        };
        match probed {
            Ok(()) => {
                let offered: Vec<&str> = pool.oauth.mechanisms().map(oauth::Mechanism::name).collect();
                tracing::info!(upstream = %pool.name, protocol = protocol.name(), oauth = ?offered, "upstream OAuth mechanisms learned");
                return;
            }
            Err(e) => {
                tracing::debug!(upstream = %pool.name, protocol = protocol.name(), error = %e, "OAuth probe failed; retrying")
            }
        }
        drop(pool);
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// The services of one configuration, with the upstreams (and their TLS client settings)
/// and the TLS acceptors built from it.
pub fn services(config: &Arc<Config>, shared: &Shared) -> Result<Generation> {
    // One upstream per name and protocol, and one TLS acceptor per listener (its protocol's
    // ALPN id, its minimum version and ALPN policy) over the same certificates.
    let mut upstreams = BTreeMap::new();
    for (name, u) in &config.upstream {
        for protocol in [Protocol::Imap, Protocol::Pop3] {
            let addresses = u.addresses(protocol);
            if !addresses.is_empty() {
                let upstream = Arc::new(Upstream::new(name, u, &addresses, protocol.alpn())?);
                upstreams.insert((name.clone(), protocol), upstream);
            }
        }
    }
    let routers: BTreeMap<Protocol, Arc<routing::Router>> = [Protocol::Imap, Protocol::Pop3]
        .into_iter()
        .map(|protocol| {
            let pools = (upstreams.iter())
                .filter(|((_, p), _)| *p == protocol)
                .map(|((name, _), upstream)| (name.clone(), upstream.clone()))
                .collect();
            (protocol, Arc::new(routing::Router::new(config, protocol, pools, shared.metrics.routes.clone())))
        })
        .collect();
    let mut acceptors = BTreeMap::new();
    if config.listeners.iter().any(|l| l.tls != TlsMode::Plaintext) {
        let certificates = tls::load_certificates(&config.tls.certificates)?;
        for l in config.listeners.iter().filter(|l| l.tls != TlsMode::Plaintext) {
            acceptors.insert(l.name.as_str(), Arc::new(tls::ServerTls::for_listener(&certificates, l)?));
        }
    }
    let reuse =
        imap::reuse::Pool::new(&config.imap, shared.metrics.clone(), shared.token.clone(), shared.parked.clone());
    let services = (config.listeners.iter())
        .map(|settings| {
            Arc::new(Service {
                config: config.clone(),
                protocol: settings.protocol,
                listener_tls: settings.tls,
                tls: acceptors.get(settings.name.as_str()).cloned(),
                upstream: upstreams[&(settings.upstream.clone(), settings.protocol)].clone(),
                shutdown: shared.token.clone(),
                cache: shared.cache.clone(),
                metrics: shared.metrics.clone(),
                limits: shared.limits.clone(),
                insight: shared.insight.clone(),
                proxy: settings.proxy_protocol.then(|| proxy_header::ProxyPolicy {
                    // Validated with the configuration.
                    trusted: settings.proxy_trusted.iter().filter_map(|n| network::Network::parse(n).ok()).collect(),
                    timeout: settings.proxy_timeout.0,
                }),
                router: routers[&settings.protocol].clone(),
                plaintext: plaintext::Policy::new(settings, &config.listeners),
                compress: settings.compress(&config.imap),
                listener: settings.name.clone(),
                reuse: (settings.protocol == Protocol::Imap).then(|| reuse.clone()).flatten(),
            })
        })
        .collect();
    let upstreams = upstreams.into_iter().map(|((_, protocol), upstream)| (upstream, protocol)).collect();
    for settings in &config.listeners {
        let gauge = shared.metrics.plaintext_enforce_after.with_label_values(&[&settings.name]);
        gauge.set(settings.enforce_after.map_or(0, |at| at.0.unix_timestamp()));
    }
    Ok(Generation { services, upstreams, health: shared.token.child_token(), reuse })
}

/// Serves on already-bound listeners (one per `config.listeners` entry) until `shutdown`
/// resolves, then drains sessions for up to `config.shutdown.grace`. With `reload_from`,
/// SIGHUP reloads the configuration from that file (see [`reload`]).
pub async fn run(
    config: Config,
    listeners: Vec<TcpListener>,
    shutdown: impl Future<Output = ()>,
    reload_from: Option<std::path::PathBuf>,
) -> Result<()> {
    let config = Arc::new(config);
    let tracker = TaskTracker::new();
    let cache = config.cache.enabled.then(|| Arc::new(cache::MessageCache::new(&config.cache)));
    let metrics = Arc::new(metrics::Metrics::new(cache.clone(), &config.admin));
    if let (Some(cache), true) = (&cache, config.cache.shared.enabled) {
        let tier = cache::shared::SharedTier::new(&config.cache.shared, metrics.cache_shared.clone())?;
        tracing::info!(
            cluster = !config.cache.shared.cluster.is_empty(),
            encrypt = config.cache.shared.encrypt,
            "message cache shared through Redis"
        );
        cache.attach_shared(tier);
    }
    let fleet = match config.limits.store {
        config::LimitStore::Local => None,
        config::LimitStore::Redis => {
            let fleet = limits::fleet::Fleet::new(&config.limits.redis, metrics.limit_store_errors.clone())?;
            tracing::info!(on_error = ?config.limits.redis.on_error, "limits shared through Redis");
            Some(fleet)
        }
    };
    let insight = insight::Insight::new(&config.insight, fleet.clone(), metrics.insight.clone());
    let required_store = fleet.clone().filter(|_| config.limits.redis.on_error == config::StoreFailure::Closed);
    let limits = limits::Limits::shared(&config.limits, fleet);
    let parked = TaskTracker::new();
    let shared = Shared {
        token: CancellationToken::new(),
        cache,
        metrics: metrics.clone(),
        limits: limits.clone(),
        insight: insight.clone(),
        parked: parked.clone(),
    };
    let generation = services(&config, &shared)?;
    generation.check_health(&metrics);
    let (health, host_labels) = (generation.health.clone(), generation.host_labels());
    let upstreams = generation.upstreams.iter().map(|(u, _)| u.clone()).collect();
    let services = generation.services;
    let admin = Arc::new(admin::Admin {
        metrics: metrics.clone(),
        upstreams: std::sync::RwLock::new(upstreams),
        required_store,
        auth: admin::AdminAuth::new(&config.admin),
        insight: insight.clone(),
        limits: limits.clone(),
    });
    if config.admin.enabled {
        let address = config.admin.address;
        let tcp =
            TcpListener::bind(address).await.map_err(|source| Error::Bind { name: "admin".into(), address, source })?;
        let bound = tcp.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(listener = "admin", address = %bound, "listening");
        tokio::spawn(admin::serve(tcp, admin.clone(), shared.token.clone()));
    }

    let accept_loops = TaskTracker::new();
    let mut current = Vec::new();
    for ((settings, tcp), service) in config.listeners.iter().zip(listeners).zip(services) {
        if settings.tls == TlsMode::Plaintext {
            tracing::warn!(listener = %settings.name, "plaintext listener: clients may send credentials unencrypted");
        }
        metrics.prepare_listener(
            settings.protocol.name(),
            &settings.name,
            settings.tls.name(),
            settings.min_version().accepted(),
        );
        if settings.tls != TlsMode::Plaintext && settings.min_version().is_legacy() {
            tracing::warn!(listener = %settings.name, "tls_min_version below 1.2: TLS 1.0/1.1 through OpenSSL, at security level 0");
        }
        let address = tcp.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(listener = %settings.name, %address, protocol = settings.protocol.name(), tls = %settings.tls, "listening");
        let service = Arc::new(std::sync::RwLock::new(service));
        current.push(service.clone());
        accept_loops.spawn(Listener { name: settings.name.clone(), tcp, service }.serve(tracker.clone()));
    }
    let token = shared.token.clone();
    if let Some(path) = reload_from {
        let reloader =
            reload::Reloader { path, config: config.clone(), shared, listeners: current, admin, health, host_labels };
        tokio::spawn(reloader.on_hangup());
    }

    shutdown.await;
    token.cancel();
    accept_loops.close();
    accept_loops.wait().await;
    shutdown::drain(&tracker, config.shutdown.grace.0).await;
    // Parked sessions: the sweeps saw the shutdown and log them out (each within 2 s).
    parked.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), parked.wait()).await;
    limits.close().await;
    Ok(())
}
