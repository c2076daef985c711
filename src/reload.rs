//! Reloading the configuration on SIGHUP, or when a watched file changes
//! (`[reload] watch_files`), without dropping a session.
//!
//! The file is read and validated again and a new generation of services (upstreams,
//! certificates, TLS acceptors, listener settings) is built from it; only when all of that
//! succeeded does each listener switch to its new service. New connections get the new
//! settings; sessions already open keep the service they started with, to their end.
//!
//! Some things cannot change under a running process, and a configuration that changes
//! them is refused as a whole: the set of listeners (their names, protocols and addresses:
//! sockets are bound once). Others keep their running values, with a warning, until a
//! restart: `[cache]`, `[admin]`, `[shutdown]` and `[limits]` (counts and leases live
//! there), except the overrides file, which is read again and applied, and the admin
//! token settings (`token_file`, `protect_metrics`: the token file is read again).
//!
//! A refused reload changes nothing; it is logged with every error and counted in
//! `mailgate_config_reloads_total{result="failed"}`.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::admin::Admin;
use crate::config::Config;
use crate::service::Service;
use crate::Shared;

pub struct Reloader {
    pub path: PathBuf,
    /// The configuration in force.
    pub config: Arc<Config>,
    pub shared: Shared,
    /// Each listener's current service, in configuration order.
    pub listeners: Vec<Arc<RwLock<Arc<Service>>>>,
    pub admin: Arc<Admin>,
    /// Ends the health checks of the generation in force.
    pub health: tokio_util::sync::CancellationToken,
    /// Its pools' `mailgate_upstream_host_up` label sets.
    pub host_labels: std::collections::BTreeSet<[String; 3]>,
}

/// What a watched file looked like: modification time, size and inode (a Kubernetes
/// volume update swaps a symlink; an ACME client may rewrite in place).
type Stamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamp(path: &std::path::Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

impl Reloader {
    /// The configuration file, the files the configuration in force names, and the files
    /// the file names now even if it does not load (a certificate that does not exist
    /// yet), with their current stamps.
    fn watched(&self) -> Vec<(PathBuf, Stamp)> {
        let mut paths: Vec<PathBuf> = std::iter::once(self.path.clone())
            .chain(self.config.side_files())
            .chain(Config::referenced_files(&self.path))
            .collect();
        paths.sort();
        paths.dedup();
        paths.into_iter().map(|path| (stamp(&path), path)).map(|(stamped, path)| (path, stamped)).collect()
    }

    /// Reloads on every SIGHUP, and when a watched file changes if `[reload] watch_files`,
    /// until shutdown.
    pub async fn on_hangup(mut self) {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("no SIGHUP handler: reloading is off");
            return;
        };
        let mut watched = self.watched();
        let mut tick = tokio::time::interval(self.config.reload.watch_interval.0);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = hangups.recv() => {
                    tracing::info!(path = %self.path.display(), "SIGHUP: reloading the configuration");
                }
                _ = tick.tick(), if self.config.reload.watch_files => {
                    let changed: Vec<String> = (watched.iter())
                        .filter(|(path, was)| stamp(path) != *was)
                        .map(|(path, _)| path.display().to_string())
                        .collect();
                    if changed.is_empty() {
                        continue;
                    }
                    // Writers replace files one by one (a certificate, then its key): let
                    // them finish before reading.
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    tracing::info!(files = ?changed, "watched files changed: reloading the configuration");
                }
                _ = self.shared.token.cancelled() => return,
            }
            // Stamped before reading: a file written during the reload is seen next time.
            let before = self.watched();
            let result = match self.reload() {
                Ok(()) => {
                    tracing::info!("configuration reloaded: new connections use it");
                    "ok"
                }
                Err(errors) => {
                    for error in &errors {
                        tracing::error!("reload refused, the running configuration stays: {error}");
                    }
                    "failed"
                }
            };
            self.shared.metrics.config_reloads.with_label_values(&[result]).inc();
            // A refused change is not retried until something changes again; files the
            // new configuration names are watched from now on.
            let known: Vec<PathBuf> = before.iter().map(|(path, _)| path.clone()).collect();
            watched = before;
            watched.extend(self.watched().into_iter().filter(|(path, _)| !known.contains(path)));
        }
    }

    /// Builds and installs the new generation, or says why not.
    pub fn reload(&mut self) -> Result<(), Vec<String>> {
        let new = Config::load(&self.path).map_err(|e| e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
        let old = &self.config;
        let listener_key =
            |c: &Config| -> Vec<_> { c.listeners.iter().map(|l| (l.name.clone(), l.protocol, l.address)).collect() };
        if listener_key(&new) != listener_key(old) {
            return Err(vec![
                "[[listener]] names, protocols or addresses changed: sockets are bound once, restart to apply".into(),
            ]);
        }
        let new = Arc::new(new);
        let generation = crate::services(&new, &self.shared).map_err(|e| vec![e.to_string()])?;
        for (section, changed) in [
            ("[cache]", toml_of(&new.cache) != toml_of(&old.cache)),
            ("[admin]", toml_of(&listener_settings(&new.admin)) != toml_of(&listener_settings(&old.admin))),
            ("[shutdown]", toml_of(&new.shutdown) != toml_of(&old.shutdown)),
            ("[reload] watch_interval", new.reload.watch_interval != old.reload.watch_interval),
            ("[limits]", toml_of(&new.limits) != toml_of(&old.limits)),
        ] {
            if changed {
                tracing::warn!(section, "changes here take effect at the next restart");
            }
        }
        self.shared.limits.set_overrides(&new.limits.overrides);
        // The admin token (file and what it protects) applies at once; the file is read again.
        self.admin.auth.configure(&new.admin);
        self.shared.insight.configure(&new.insight);
        // The old pools stop checking (their sessions go on); hosts that are gone leave
        // the host gauge; the new pools start.
        self.health.cancel();
        let labels = generation.host_labels();
        for gone in self.host_labels.difference(&labels) {
            let _ = self.shared.metrics.upstream_host_up.remove_label_values(&[&gone[0], &gone[1], &gone[2]]);
        }
        {
            // What the old pools learned of OAuth is announced until the new probes answer
            // (the same upstream: the same name and hosts).
            let old = self.admin.upstreams.read().unwrap_or_else(|p| p.into_inner());
            for (upstream, _) in &generation.upstreams {
                if let Some(previous) = old.iter().find(|o| o.identity() == upstream.identity()) {
                    upstream.oauth.inherit(&previous.oauth);
                }
            }
        }
        generation.check_health(&self.shared.metrics);
        (self.health, self.host_labels) = (generation.health.clone(), labels);
        *self.admin.upstreams.write().unwrap_or_else(|p| p.into_inner()) =
            generation.upstreams.iter().map(|(u, _)| u.clone()).collect();
        for (slot, service) in self.listeners.iter().zip(generation.services) {
            *slot.write().unwrap_or_else(|p| p.into_inner()) = service;
        }
        self.config = new;
        Ok(())
    }
}

/// `[admin]` but for the token settings, which a reload applies.
fn listener_settings(admin: &crate::config::AdminConfig) -> crate::config::AdminConfig {
    crate::config::AdminConfig { token_file: None, protect_metrics: false, ..admin.clone() }
}

fn toml_of<T: serde::Serialize>(section: &T) -> String {
    toml::to_string(section).unwrap_or_default()
}
