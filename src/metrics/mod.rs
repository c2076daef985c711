//! Metric families, registered once in one place, and their export in the Prometheus text
//! format. Labels are bounded by construction (see `docs/METRICS.md`): protocol, listener
//! and TLS mode names from the configuration, and fixed words; never a user name, an
//! address or a mailbox name.

pub mod clients;
pub mod counted;
pub mod topk;

use std::sync::{Arc, Mutex};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::cache::{Kind, MessageCache, StatsSnapshot};

/// A session's bytes: (from, to) the client, and (from, to) the upstream.
#[derive(Default)]
pub struct SessionBytes {
    pub client: Arc<(std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64)>,
    pub upstream: Arc<(std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64)>,
}

/// The `result` label of `mailgate_quota_checks_total`.
pub const QUOTA_RESULTS: [&str; 3] = ["read", "none", "failed"];

pub struct Metrics {
    registry: Registry,
    /// The heaviest accounts by sync cost over a sliding window (names never go to labels).
    pub top_accounts: topk::TopAccounts,
    /// How many of them `/debug/top-accounts` lists.
    pub top_accounts_shown: usize,
    pub connections_active: IntGaugeVec,
    pub connections_total: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub tls_handshake_failures: IntCounterVec,
    /// Handshakes where a lenient listener ignored the client's ALPN list.
    pub tls_alpn_ignored: IntCounterVec,
    pub starttls_upgrades: IntCounterVec,
    pub plaintext_auth_refused: IntCounterVec,
    /// Logins sent without TLS, by what they got (`plaintext::Verdict::label`).
    pub plaintext_logins: IntCounterVec,
    /// Each listener's `enforce_after` as a Unix time (absent: none), for alert rules.
    pub plaintext_enforce_after: IntGaugeVec,
    /// `/debug/plaintext-clients` and `/debug/client-software`.
    pub clients: Arc<clients::ClientReports>,
    /// The shared cache tier's families (exported whether or not the tier is on).
    pub cache_shared: crate::cache::shared::SharedMetrics,
    /// Support insight's families (`crate::insight`): detections by kind, history updates.
    pub insight: crate::insight::Counters,
    pub logins: IntCounterVec,
    pub client_bytes: IntCounterVec,
    pub upstream_bytes: IntCounterVec,
    pub commands: IntCounterVec,
    pub command_duration: HistogramVec,
    pub upstream_connect_duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    /// IMAP logins answered with a parked upstream session (`imap::reuse`).
    pub upstream_sessions_reused: IntCounter,
    pub upstream_sessions_parked: IntGauge,
    /// Parked sessions dropped, by reason (`imap::reuse::DROP_REASONS`).
    pub upstream_sessions_dropped: IntCounterVec,
    pub mailbox_messages: Histogram,
    pub fetch_messages: Histogram,
    /// When each account's quota was asked and its client alerted, and `/debug/quota`.
    pub quota: Arc<crate::quota::QuotaBook>,
    /// Used share of the INBOX quota, one observation per reading (no account label).
    pub quota_usage: Histogram,
    pub quota_alerts: IntCounter,
    /// Quota questions by result (`QUOTA_RESULTS`).
    pub quota_checks: IntCounterVec,
    pub full_resyncs: IntCounterVec,
    pub limit_rejections: IntCounterVec,
    /// Routing decisions by protocol and source (`routing::SOURCES`).
    pub routes: IntCounterVec,
    /// Each upstream host's health (1 up, 0 down), by upstream, protocol and host.
    pub upstream_host_up: IntGaugeVec,
    /// Configuration reloads (SIGHUP) by result.
    pub config_reloads: IntCounterVec,
    /// Failed calls to the shared limits store, by operation and what the check decided.
    pub limit_store_errors: IntCounterVec,
    /// IMAP sessions that turned COMPRESS=DEFLATE on.
    pub compress_sessions: IntCounter,
    /// Bytes through the client leg's compression, by direction and stage (plain, deflated).
    pub compress_bytes: IntCounterVec,
    /// Sessions closed because the client's DEFLATE stream did not inflate.
    pub compress_errors: IntCounter,
    cache_requests: IntCounterVec,
    cache_size: IntGauge,
    cache_entries: IntGauge,
    cache_evictions: IntCounterVec,
    cache_saved: IntCounter,
    cache_stale: IntCounter,
    cache: Option<Arc<MessageCache>>,
    /// The cache counters as last exported: the cache keeps its own monotonic counters and
    /// the exported ones advance by the difference.
    exported: Mutex<StatsSnapshot>,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let family = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(family.clone())).expect("metric registered once");
    family
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let family = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid metric");
    registry.register(Box::new(family.clone())).expect("metric registered once");
    family
}

/// Seconds, from a fast local command to a long download or an IDLE.
fn duration_buckets() -> Vec<f64> {
    vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0]
}

/// Message counts, from a single message to a very large mailbox.
fn count_buckets() -> Vec<f64> {
    vec![1.0, 10.0, 100.0, 500.0, 1000.0, 5000.0, 10_000.0, 50_000.0, 100_000.0, 500_000.0]
}

/// What `mailgate_limit_rejections_total` counts (the limits of docs/CONFIG.md).
pub const LIMIT_KINDS: &[&str] = &["connections", "rate", "auth", "bandwidth", "quota", "append_size"];

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let family = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(family.clone())).expect("metric registered once");
    family
}

impl Metrics {
    /// The shared cache tier's families (`cache::shared`), registered in `registry`.
    pub fn shared_families(registry: &Registry) -> crate::cache::shared::SharedMetrics {
        let saved = IntCounter::new(
            "mailgate_cache_shared_saved_bytes_total",
            "Bytes found in the shared cache tier (Redis): what the upstream did not have to send.",
        )
        .expect("valid metric");
        registry.register(Box::new(saved.clone())).expect("metric registered once");
        let up = IntGauge::new("mailgate_cache_shared_up", "1 while the shared cache tier (Redis) answers.")
            .expect("valid metric");
        registry.register(Box::new(up.clone())).expect("metric registered once");
        let seconds = Histogram::with_opts(
            HistogramOpts::new("mailgate_cache_shared_lookup_seconds", "Time of one lookup in the shared cache tier.")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
        )
        .expect("valid metric");
        registry.register(Box::new(seconds.clone())).expect("metric registered once");
        crate::cache::shared::SharedMetrics {
            requests: counter(
                registry,
                "mailgate_cache_shared_requests_total",
                "Item lookups in the shared cache tier (Redis) by kind and result.",
                &["kind", "result"],
            ),
            writes: counter(
                registry,
                "mailgate_cache_shared_writes_total",
                "Writes to the shared cache tier (Redis) by result.",
                &["result"],
            ),
            seconds,
            saved,
            up,
        }
    }

    pub fn new(cache: Option<Arc<MessageCache>>, admin: &crate::config::AdminConfig) -> Metrics {
        let registry = Registry::new();
        let build = gauge(&registry, "mailgate_build_info", "The running mailgate version (always 1).", &["version"]);
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let conn = &["protocol", "listener", "tls"];
        let cache_size =
            IntGauge::new("mailgate_cache_size_bytes", "Weight of the message cache in bytes.").expect("valid");
        let cache_entries = IntGauge::new("mailgate_cache_entries", "Entries in the message cache.").expect("valid");
        let cache_saved = IntCounter::new(
            "mailgate_cache_upstream_bytes_saved_total",
            "Bytes sent to clients from the cache instead of the upstream.",
        )
        .expect("valid");
        let cache_stale = IntCounter::new(
            "mailgate_cache_stale_total",
            "Cached mailboxes or POP3 messages forgotten because the upstream changed them without a new UIDVALIDITY or UIDL.",
        )
        .expect("valid");
        for single in [
            Box::new(cache_size.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(cache_entries.clone()),
            Box::new(cache_saved.clone()),
            Box::new(cache_stale.clone()),
        ] {
            registry.register(single).expect("metric registered once");
        }
        let single = |name: &str, help: &str| {
            let family = Histogram::with_opts(HistogramOpts::new(name, help).buckets(count_buckets())).expect("valid");
            registry.register(Box::new(family.clone())).expect("metric registered once");
            family
        };
        let mailbox_messages = single("mailgate_mailbox_messages", "Mailbox size (EXISTS) at SELECT or EXAMINE.");
        let fetch_messages = single("mailgate_fetch_messages", "Messages answered per FETCH.");
        let limit_rejections =
            counter(&registry, "mailgate_limit_rejections_total", "Requests refused by a limit or quota.", &["kind"]);
        for kind in LIMIT_KINDS {
            limit_rejections.with_label_values(&[kind]);
        }
        let limit_store_errors = counter(
            &registry,
            "mailgate_limit_store_errors_total",
            "Calls to the shared limits store (Redis) that failed or timed out, by operation and outcome (allowed: failed open, refused: failed closed, none: background work).",
            &["operation", "outcome"],
        );
        let config_reloads = counter(
            &registry,
            "mailgate_config_reloads_total",
            "Configuration reloads on SIGHUP, by result (ok, failed: the running configuration stays).",
            &["result"],
        );
        for result in ["ok", "failed"] {
            config_reloads.with_label_values(&[result]);
        }
        let upstream_host_up = gauge(
            &registry,
            "mailgate_upstream_host_up",
            "Whether a host of an upstream pool (two or more hosts) answers its health check (1) or not (0).",
            &["upstream", "protocol", "host"],
        );
        let routes = counter(
            &registry,
            "mailgate_routes_total",
            "Logins routed, by protocol and what chose the upstream (user_rule, domain_rule, lookup, lookup_cached, default, lookup_failed).",
            &["protocol", "source"],
        );
        for protocol in ["imap", "pop3"] {
            for source in crate::routing::SOURCES {
                routes.with_label_values(&[protocol, source]);
            }
        }
        let upstream_sessions_reused = IntCounter::new(
            "mailgate_upstream_sessions_reused_total",
            "IMAP logins answered with a parked upstream session instead of an upstream login.",
        )
        .expect("valid metric");
        registry.register(Box::new(upstream_sessions_reused.clone())).expect("metric registered once");
        let upstream_sessions_parked =
            IntGauge::new("mailgate_upstream_sessions_parked", "Upstream IMAP sessions parked for reuse now.")
                .expect("valid metric");
        registry.register(Box::new(upstream_sessions_parked.clone())).expect("metric registered once");
        let upstream_sessions_dropped = counter(
            &registry,
            "mailgate_upstream_sessions_dropped_total",
            "Parked upstream IMAP sessions logged out unused, by reason (expired, dead, evicted, reload, shutdown).",
            &["reason"],
        );
        for reason in crate::imap::reuse::DROP_REASONS {
            upstream_sessions_dropped.with_label_values(&[reason]);
        }
        let compress_sessions = IntCounter::new(
            "mailgate_imap_compress_sessions_total",
            "IMAP sessions that turned COMPRESS=DEFLATE on (RFC 4978).",
        )
        .expect("valid");
        let compress_errors = IntCounter::new(
            "mailgate_imap_compress_errors_total",
            "IMAP sessions closed because the client's DEFLATE stream did not inflate.",
        )
        .expect("valid");
        for single in [&compress_sessions, &compress_errors] {
            registry.register(Box::new(single.clone())).expect("metric registered once");
        }
        let compress_bytes = counter(
            &registry,
            "mailgate_compress_bytes_total",
            "Bytes through COMPRESS=DEFLATE on client legs: direction in (from clients) or out, stage plain (what the relay reads or writes) or deflated (on the wire).",
            &["direction", "stage"],
        );
        for direction in ["in", "out"] {
            for stage in ["plain", "deflated"] {
                compress_bytes.with_label_values(&[direction, stage]);
            }
        }
        let quota_usage = Histogram::with_opts(
            HistogramOpts::new(
                "mailgate_quota_usage_ratio",
                "Used share of IMAP accounts' INBOX quota (STORAGE), one observation per reading.",
            )
            .buckets(vec![0.5, 0.75, 0.9, 0.95, 1.0]),
        )
        .expect("valid");
        let quota_alerts =
            IntCounter::new("mailgate_quota_alerts_total", "Quota ALERTs sent to IMAP clients after login.")
                .expect("valid");
        registry.register(Box::new(quota_alerts.clone())).expect("metric registered once");
        registry.register(Box::new(quota_usage.clone())).expect("metric registered once");
        let quota_checks = counter(
            &registry,
            "mailgate_quota_checks_total",
            "Upstream quota questions after IMAP logins by result (read; none: no STORAGE quota; failed: no answer, login refused).",
            &["result"],
        );
        for result in QUOTA_RESULTS {
            quota_checks.with_label_values(&[result]);
        }
        Metrics {
            quota: Arc::new(crate::quota::QuotaBook::default()),
            quota_usage,
            quota_alerts,
            quota_checks,
            upstream_sessions_reused,
            upstream_sessions_parked,
            upstream_sessions_dropped,
            compress_sessions,
            compress_bytes,
            compress_errors,
            routes,
            upstream_host_up,
            config_reloads,
            limit_store_errors,
            commands: counter(
                &registry,
                "mailgate_commands_total",
                "Client commands after login.",
                &["protocol", "command"],
            ),
            command_duration: histogram(
                &registry,
                "mailgate_command_duration_seconds",
                "From a command to its completion by the upstream (or the cache).",
                &["protocol", "command"],
                duration_buckets(),
            ),
            upstream_connect_duration: histogram(
                &registry,
                "mailgate_upstream_connect_duration_seconds",
                "Upstream connect, TLS and login.",
                &["protocol"],
                duration_buckets(),
            ),
            upstream_errors: counter(
                &registry,
                "mailgate_upstream_errors_total",
                "Upstreams that could not be used, by kind.",
                &["protocol", "kind"],
            ),
            mailbox_messages,
            fetch_messages,
            full_resyncs: counter(
                &registry,
                "mailgate_full_resyncs_total",
                "FETCHes covering at least 90% of a mailbox of at least 1,000 messages.",
                &["protocol"],
            ),
            limit_rejections,
            connections_active: gauge(&registry, "mailgate_connections_active", "Client connections open now.", conn),
            connections_total: counter(&registry, "mailgate_connections_total", "Client connections accepted.", conn),
            tls_handshakes: counter(
                &registry,
                "mailgate_tls_handshakes_total",
                "Server-side TLS handshakes by result and negotiated version (none when failed).",
                &["listener", "result", "version"],
            ),
            tls_handshake_failures: counter(
                &registry,
                "mailgate_tls_handshake_failures_total",
                "Failed server-side TLS handshakes by reason.",
                &["listener", "reason"],
            ),
            tls_alpn_ignored: counter(
                &registry,
                "mailgate_tls_alpn_ignored_total",
                "Handshakes of clients offering ALPN without the listener's protocol, served without ALPN (alpn = \"lenient\").",
                &["listener"],
            ),
            starttls_upgrades: counter(
                &registry,
                "mailgate_starttls_upgrades_total",
                "Completed STARTTLS/STLS upgrades.",
                &["protocol", "listener"],
            ),
            plaintext_auth_refused: counter(
                &registry,
                "mailgate_plaintext_auth_refused_total",
                "Credentials refused because TLS was not active yet.",
                &["protocol", "listener"],
            ),
            plaintext_logins: counter(
                &registry,
                "mailgate_plaintext_logins_total",
                "Logins sent without TLS: let in (warn, exception, allow) or refused (refuse).",
                &["protocol", "listener", "mode"],
            ),
            plaintext_enforce_after: gauge(
                &registry,
                "mailgate_plaintext_enforce_after_seconds",
                "When a listener starts refusing logins without TLS (enforce_after), as a Unix time.",
                &["listener"],
            ),
            cache_shared: Metrics::shared_families(&registry),
            insight: Metrics::insight_families(&registry),
            clients: Arc::new(clients::ClientReports {
                plaintext: clients::PlaintextClients::new(admin.plaintext_clients),
                census: clients::SoftwareCensus::new(admin.client_software),
            }),
            logins: counter(
                &registry,
                "mailgate_logins_total",
                "Login attempts by outcome at the upstream.",
                &["protocol", "listener", "result"],
            ),
            client_bytes: counter(
                &registry,
                "mailgate_client_bytes_total",
                "Bytes from (in) and to (out) clients after login.",
                &["protocol", "direction"],
            ),
            upstream_bytes: counter(
                &registry,
                "mailgate_upstream_bytes_total",
                "Bytes from (in) and to (out) upstreams after login.",
                &["protocol", "direction"],
            ),
            cache_requests: counter(
                &registry,
                "mailgate_cache_requests_total",
                "Message cache lookups by kind and result.",
                &["kind", "result"],
            ),
            cache_evictions: counter(
                &registry,
                "mailgate_cache_evictions_total",
                "Entries removed from the message cache, by cause.",
                &["cause"],
            ),
            cache_size,
            cache_entries,
            cache_saved,
            cache_stale,
            cache,
            exported: Mutex::new(StatsSnapshot::default()),
            top_accounts: topk::TopAccounts::new(admin.top_accounts.max(1) * 10, admin.top_accounts_window.0, 6),
            top_accounts_shown: admin.top_accounts,
            registry,
        }
    }

    /// Support insight's families, every label created at zero.
    pub(crate) fn insight_families(registry: &Registry) -> crate::insight::Counters {
        let detections = counter(
            registry,
            "mailgate_insight_detections_total",
            "Common mailbox mistakes detected in accounts' activity, by kind (no account label: see /debug/detections).",
            &["kind"],
        );
        for kind in crate::insight::Kind::ALL {
            detections.with_label_values(&[kind.label()]);
        }
        let updates = counter(
            registry,
            "mailgate_insight_updates_total",
            "Account history updates: ok, dropped (too many Redis updates in flight), error (Redis).",
            &["result"],
        );
        for result in ["ok", "dropped", "error"] {
            updates.with_label_values(&[result]);
        }
        let accounts = prometheus::IntGauge::new(
            "mailgate_insight_accounts",
            "Account histories held in this instance's memory (0 when they live in Redis).",
        )
        .expect("valid metric");
        registry.register(Box::new(accounts.clone())).expect("metric registered once");
        crate::insight::Counters { detections, updates, accounts }
    }

    /// Creates the series of a listener's fixed label sets at zero, so that every family is
    /// present from the start (dashboards and alerts need no special case for "absent").
    /// `versions` are the TLS versions the listener accepts (`TlsVersion::accepted`).
    /// The byte counters of one direction (`in`, `out`) of the client legs' compression.
    pub fn compress_counters(&self, direction: &str) -> crate::compress::Counters {
        crate::compress::Counters {
            plain: self.compress_bytes.with_label_values(&[direction, "plain"]),
            deflated: self.compress_bytes.with_label_values(&[direction, "deflated"]),
        }
    }

    pub fn prepare_listener(&self, protocol: &str, listener: &str, tls: &str, versions: &[&str]) {
        self.connections_active.with_label_values(&[protocol, listener, tls]);
        self.connections_total.with_label_values(&[protocol, listener, tls]);
        self.starttls_upgrades.with_label_values(&[protocol, listener]);
        self.plaintext_auth_refused.with_label_values(&[protocol, listener]);
        if tls != "implicit" {
            for mode in ["refuse", "warn", "exception", "allow"] {
                self.plaintext_logins.with_label_values(&[protocol, listener, mode]);
            }
        }
        for result in ["ok", "rejected", "unavailable"] {
            self.logins.with_label_values(&[protocol, listener, result]);
        }
        if tls != "plaintext" {
            for version in versions {
                self.tls_handshakes.with_label_values(&[listener, "ok", version]);
            }
            self.tls_handshakes.with_label_values(&[listener, "failed", "none"]);
            self.tls_alpn_ignored.with_label_values(&[listener]);
            for reason in ["timeout", "alpn", "version", "other"] {
                self.tls_handshake_failures.with_label_values(&[listener, reason]);
            }
        }
        for kind in ["connect", "tls", "timeout", "closed", "starttls", "protocol", "no_healthy_host", "no_route"] {
            self.upstream_errors.with_label_values(&[protocol, kind]);
        }
        self.full_resyncs.with_label_values(&[protocol]);
        for direction in ["in", "out"] {
            self.client_bytes.with_label_values(&[protocol, direction]);
            self.upstream_bytes.with_label_values(&[protocol, direction]);
        }
        self.upstream_connect_duration.with_label_values(&[protocol]);
    }

    /// The exposition text (`/metrics`), with the cache's counters brought up to date.
    pub async fn render(&self) -> String {
        if let Some(cache) = &self.cache {
            let now = cache.stats().await;
            let mut last = self.exported.lock().expect("metrics lock");
            for kind in Kind::ALL {
                let (hits, misses) = (now.hits(kind) - last.hits(kind), now.misses(kind) - last.misses(kind));
                self.cache_requests.with_label_values(&[kind.name(), "hit"]).inc_by(hits);
                self.cache_requests.with_label_values(&[kind.name(), "miss"]).inc_by(misses);
            }
            self.cache_evictions.with_label_values(&["size"]).inc_by(now.evicted_size - last.evicted_size);
            self.cache_evictions.with_label_values(&["expired"]).inc_by(now.evicted_expired - last.evicted_expired);
            self.cache_evictions.with_label_values(&["other"]).inc_by(now.evicted_other - last.evicted_other);
            self.cache_saved.inc_by(now.bytes_served - last.bytes_served);
            self.cache_stale.inc_by(now.stale - last.stale);
            self.cache_size.set(i64::try_from(now.bytes).unwrap_or(i64::MAX));
            self.cache_entries.set(i64::try_from(now.entries).unwrap_or(i64::MAX));
            *last = now;
        }
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding never fails");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// Why a server-side TLS handshake failed, as a bounded label, from rustls' or OpenSSL's
/// error (timeouts are told apart by the caller).
pub fn handshake_failure_reason(error: &dyn std::fmt::Display) -> &'static str {
    let text = error.to_string().to_ascii_lowercase();
    // rustls: "peer doesn't support any known protocol" (no common ALPN id); OpenSSL: "no
    // application protocol".
    if text.contains("known protocol") || text.contains("application protocol") {
        "alpn"
    } else if text.contains("version") || text.contains("incompatible") || text.contains("unsupported protocol") {
        // rustls: "peer is incompatible: ..." for TLS 1.1 and older clients (they lack what
        // TLS 1.2+ requires, e.g. SignatureAlgorithmsExtensionRequired). OpenSSL:
        // "unsupported protocol" for a client below the minimum version, "wrong version
        // number", "version too low".
        "version"
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_exported_with_their_labels() {
        let metrics = Metrics::new(None, &Default::default());
        metrics.logins.with_label_values(&["imap", "imaps", "ok"]).inc();
        let text = futures_render(&metrics);
        assert!(text.contains("mailgate_logins_total{listener=\"imaps\",protocol=\"imap\",result=\"ok\"} 1"), "{text}");
        assert!(text.contains(&format!("mailgate_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))));
    }

    fn futures_render(metrics: &Metrics) -> String {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(metrics.render())
    }
}
