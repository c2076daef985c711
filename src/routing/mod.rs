//! Which upstream a user's session goes to.
//!
//! In order: a rule for the user, a rule for the user's domain (both from
//! `routing.rules_file`), the lookup service (`routing.lookup_url`, answers cached for
//! `lookup_cache_ttl`), and last the listener's own `upstream`. The lookup service may name
//! a configured upstream or a `host:port`, reached with the listener's upstream's settings
//! (TLS, CA, timeouts, identity forwarding). When it is down, `on_lookup_error` decides:
//! the listener's upstream, or a refusal that the client sees as `NO [UNAVAILABLE]` /
//! `-ERR [SYS/TEMP]`.
//!
//! One router per protocol and configuration generation: a reload brings new rules and an
//! empty lookup cache.

pub mod lookup;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::IntCounterVec;

use crate::config::{Config, LookupFailure, Protocol};
use crate::upstream::Upstream;

/// Lookup answers kept at most (the oldest go first when full).
const MAX_CACHED: usize = 100_000;
/// `host:port` upstreams named by the lookup service kept at most.
const MAX_HOSTS: usize = 1_000;

/// Why no upstream could be chosen.
#[derive(Debug, thiserror::Error)]
#[error("no route: {0}")]
pub struct RouteError(pub String);

/// What the lookup service said about a user.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    Upstream(String),
    Host(String),
    NoRoute,
}

pub struct Router {
    protocol: Protocol,
    config: Arc<Config>,
    /// This protocol's upstreams by name.
    pools: BTreeMap<String, Arc<Upstream>>,
    /// Lowercased keys.
    users: HashMap<String, String>,
    domains: HashMap<String, String>,
    lookup: Option<lookup::HttpUrl>,
    answers: Mutex<HashMap<String, (Instant, Answer)>>,
    /// By the listener's upstream (whose settings they use) and address.
    hosts: Mutex<HashMap<(String, String), Arc<Upstream>>>,
    routes: IntCounterVec,
}

/// Route sources, the labels of `mailgate_routes_total`.
pub const SOURCES: &[&str] = &["user_rule", "domain_rule", "lookup", "lookup_cached", "default", "lookup_failed"];

impl Router {
    pub fn new(
        config: &Arc<Config>,
        protocol: Protocol,
        pools: BTreeMap<String, Arc<Upstream>>,
        routes: IntCounterVec,
    ) -> Router {
        let lower = |map: &BTreeMap<String, String>| map.iter().map(|(k, v)| (k.to_lowercase(), v.clone())).collect();
        Router {
            protocol,
            config: config.clone(),
            pools,
            users: lower(&config.routing.rules.users),
            domains: lower(&config.routing.rules.domains),
            // Validated with the configuration.
            lookup: config.routing.lookup_url.as_deref().and_then(|u| lookup::HttpUrl::parse(u).ok()),
            answers: Mutex::new(HashMap::new()),
            hosts: Mutex::new(HashMap::new()),
            routes,
        }
    }

    fn counted(&self, source: &str) {
        self.routes.with_label_values(&[self.protocol.name(), source]).inc();
    }

    fn pool(&self, name: &str) -> Result<Arc<Upstream>, RouteError> {
        self.pools.get(name).cloned().ok_or_else(|| {
            RouteError(format!("upstream `{name}` has no {} address, or is not configured", self.protocol.name()))
        })
    }

    /// The upstream for `user`, logging in from `client` on a listener whose own upstream
    /// is `default`.
    pub async fn route(
        &self,
        default: &Arc<Upstream>,
        user: &str,
        client: IpAddr,
    ) -> Result<Arc<Upstream>, RouteError> {
        let user = user.to_lowercase();
        if let Some(name) = self.users.get(&user) {
            self.counted("user_rule");
            return self.pool(name);
        }
        if let Some(name) = user.rsplit_once('@').and_then(|(_, domain)| self.domains.get(domain)) {
            self.counted("domain_rule");
            return self.pool(name);
        }
        let Some(url) = &self.lookup else {
            self.counted("default");
            return Ok(default.clone());
        };
        let cached = self.cached(&user);
        let answer = match cached {
            Some(answer) => {
                self.counted("lookup_cached");
                Ok(answer)
            }
            None => self.ask(url, &user, client).await,
        };
        let chosen = match answer {
            Ok(Answer::NoRoute) => {
                self.counted("default");
                return Ok(default.clone());
            }
            Ok(Answer::Upstream(name)) => self.pool(&name),
            Ok(Answer::Host(address)) => self.host(default, &address),
            Err(error) => Err(error),
        };
        match (chosen, self.config.routing.on_lookup_error) {
            (Ok(upstream), _) => Ok(upstream),
            (Err(error), LookupFailure::Default) => {
                crate::log_budget::warn_limited!(%error, "routing lookup failed: using the listener's upstream");
                self.counted("lookup_failed");
                Ok(default.clone())
            }
            (Err(error), LookupFailure::Refuse) => {
                crate::log_budget::warn_limited!(%error, "routing lookup failed: login refused");
                self.counted("lookup_failed");
                Err(error)
            }
        }
    }

    fn cached(&self, user: &str) -> Option<Answer> {
        let ttl = self.config.routing.lookup_cache_ttl.0;
        let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        answers.get(user).filter(|(at, _)| at.elapsed() < ttl).map(|(_, answer)| answer.clone())
    }

    /// Asks the lookup service; good answers are cached, failures are not.
    async fn ask(&self, url: &lookup::HttpUrl, user: &str, client: IpAddr) -> Result<Answer, RouteError> {
        let client = client.to_canonical().to_string();
        let query = [("user", user), ("protocol", self.protocol.name()), ("client", client.as_str())];
        let (status, body) = lookup::get(url, &query, self.config.routing.lookup_timeout.0)
            .await
            .map_err(|e| RouteError(format!("lookup service: {e}")))?;
        let answer = match status {
            404 => Answer::NoRoute,
            200 => {
                #[derive(serde::Deserialize)]
                struct Reply {
                    upstream: Option<String>,
                    host: Option<String>,
                }
                let reply: Reply = serde_json::from_slice(&body)
                    .map_err(|e| RouteError(format!("lookup service: not the expected JSON: {e}")))?;
                match (reply.upstream, reply.host) {
                    (Some(name), None) => Answer::Upstream(name),
                    (None, Some(host)) => Answer::Host(host),
                    _ => return Err(RouteError("lookup service: expected one of `upstream` or `host`".into())),
                }
            }
            other => return Err(RouteError(format!("lookup service answered HTTP {other}"))),
        };
        self.counted("lookup");
        self.store(user, answer.clone());
        Ok(answer)
    }

    fn store(&self, user: &str, answer: Answer) {
        let ttl = self.config.routing.lookup_cache_ttl.0;
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        if answers.len() >= MAX_CACHED {
            answers.retain(|_, (at, _)| at.elapsed() < ttl);
            if answers.len() >= MAX_CACHED {
                answers.clear();
            }
        }
        answers.insert(user.to_string(), (Instant::now(), answer));
    }

    /// An upstream for a `host:port` the lookup service named, with the settings of the
    /// listener's upstream (TLS, CA, timeouts, identity forwarding); built once per
    /// listener upstream and address, outside the lock (it reads CA files).
    fn host(&self, default: &Arc<Upstream>, address: &str) -> Result<Arc<Upstream>, RouteError> {
        crate::config::split_host_port(address).map_err(|e| RouteError(format!("lookup service: {e}")))?;
        let key = (default.name.clone(), address.to_string());
        if let Some(upstream) = self.hosts.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(upstream.clone());
        }
        let settings = self
            .config
            .upstream
            .get(&default.name)
            .ok_or_else(|| RouteError(format!("no settings for upstream `{}`", default.name)))?;
        let upstream = Upstream::new(&format!("{}+lookup", default.name), settings, &[address], self.protocol.alpn())
            .map_err(|e| RouteError(format!("lookup service host {address}: {e}")))?;
        let upstream = Arc::new(upstream);
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if hosts.len() >= MAX_HOSTS {
            hosts.clear();
        }
        Ok(hosts.entry(key).or_insert(upstream).clone())
    }
}
