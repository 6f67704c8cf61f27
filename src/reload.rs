//! Reload: the configuration file and every secret file read again under a
//! running relay (SIGHUP, `leadflo-relay reload`, `POST /api/reload`),
//! without refusing or losing a lead.
//!
//! What changes in place: the inbound secrets (current and previous), and
//! the targets: added, removed, or changed in any setting. A target whose
//! settings change keeps its dispatcher: the next attempts use the new
//! settings, those in flight finish, and its circuit, rate limiter and
//! in-flight count carry over. A target added, removed, or given other
//! event types gets its place in the log at a cut the committer chooses
//! (every event above it is for the new targets), while ingest goes on.
//! The `[alerts]` section (and the URL its file or variable holds) is read
//! again too, and so is the certificate `[server.tls]` names (served from
//! the next handshake on). Every other key needs a restart and is reported
//! so. A file that does not load, a secret that cannot be read, or a
//! certificate that does not read changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::alerts::{AlertSettings, Alerter};
use crate::config::{Config, ConfigError, Overrides, Secret, TargetConfig};
use crate::deliver::Deliverer;
use crate::dispatch::{self, Target};
use crate::ingest::SecretCheck;
use crate::metrics::Metrics;
use crate::ops::TargetsView;
use crate::store::{Committer, Store, Subscription, TargetChange};
use crate::tls::{Certificates, Staged, TlsFiles};

/// A value a reload replaces while readers keep using what they loaded.
#[derive(Debug, Default)]
pub struct Swap<T>(RwLock<Arc<T>>);

impl<T> Swap<T> {
    pub fn new(value: T) -> Swap<T> {
        Swap(RwLock::new(Arc::new(value)))
    }

    pub fn load(&self) -> Arc<T> {
        self.0.read().expect("swap lock").clone()
    }

    pub fn store(&self, value: T) {
        *self.0.write().expect("swap lock") = Arc::new(value);
    }
}

/// Where the configuration came from: the file (if any) and the flags
/// that override it, applied again at each reload.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub overrides: Overrides,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.path {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        config.apply(&self.overrides)?;
        Ok(config)
    }
}

/// The inbound secret check, from the configuration: `None` only in
/// unauthenticated mode.
pub fn secret_check(config: &Config) -> anyhow::Result<Option<SecretCheck>> {
    let secret = config.inbound_secret()?;
    anyhow::ensure!(
        secret.is_some() || config.auth.allow_unauthenticated,
        "no inbound secret configured and unauthenticated mode was not asked for"
    );
    let previous = config.previous_secret()?;
    Ok(secret.map(|s| SecretCheck::new(&s).with_previous(previous.as_ref())))
}

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Targets whose settings changed, each with the keys that did.
    pub changed: BTreeMap<String, Vec<String>>,
    /// Whether the inbound secrets were read again and differ.
    pub secrets_changed: bool,
    /// Keys that changed in the file but take effect only at a restart.
    pub needs_restart: Vec<String>,
    /// The certificate read again (`[server.tls]`): what it is for and
    /// when it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

/// What the admin API knows of the targets, replaced by each reload.
#[derive(Debug, Default)]
pub struct AdminTargets {
    pub view: TargetsView,
    /// Wakes a target's dispatcher after a replay or a retry.
    pub wakes: HashMap<String, Arc<Notify>>,
}

/// One running target: its configuration, its dispatcher, and how to
/// change or stop it.
struct Running {
    config: TargetConfig,
    settings: watch::Sender<Arc<Target>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::time::Instant>,
}

/// The targets with a dispatcher, and what starting one needs.
pub struct Targets {
    store: Store,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// The delivery worker pool, where dispatchers run.
    runtime: tokio::runtime::Handle,
    shutdown_grace: Duration,
    running: BTreeMap<String, Running>,
    /// Where the dispatchers tell dead letters and circuit changes.
    alerts: Alerter,
}

impl Targets {
    pub fn new(
        store: Store,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        runtime: tokio::runtime::Handle,
        shutdown_grace: Duration,
    ) -> Targets {
        Targets {
            store,
            metrics,
            shutdown,
            runtime,
            shutdown_grace,
            running: BTreeMap::new(),
            alerts: Alerter::disabled(),
        }
    }

    /// The dispatchers started from now on tell `alerts`.
    pub fn with_alerts(mut self, alerts: Alerter) -> Targets {
        self.alerts = alerts;
        self
    }

    /// Starts a dispatcher for `target`, no attempt before `not_before`.
    pub fn start(&mut self, config: TargetConfig, target: Target, not_before: Instant) {
        tracing::info!(target = %target.name, "delivering");
        self.metrics.register_target(&target.name);
        let stop = self.shutdown.child_token();
        let (settings, receiver) = watch::channel(Arc::new(target));
        let run = dispatch::run(
            self.store.clone(),
            receiver,
            self.metrics.clone(),
            stop.clone(),
            not_before,
            self.alerts.clone(),
        );
        let task = self.runtime.spawn(run);
        let name = config.name.clone();
        let running = Running {
            config,
            settings,
            stop,
            task,
        };
        self.running.insert(name, running);
    }

    /// Stops `name`'s dispatcher (its attempts in flight finish within the
    /// grace period); returns when its next attempt could have started.
    async fn stop(&mut self, name: &str) -> Instant {
        let Some(running) = self.running.remove(name) else {
            return Instant::now();
        };
        running.stop.cancel();
        running.task.await.unwrap_or_else(|err| {
            tracing::error!(target = %name, error = %err, "dispatcher task failed");
            Instant::now()
        })
    }

    /// The subscriptions of the running targets, for the committer.
    fn subscriptions(&self) -> Vec<Subscription> {
        self.running
            .values()
            .map(|r| Subscription {
                target: r.config.name.clone(),
                events: r.config.events.clone(),
                wake: r.settings.borrow().wake.clone(),
            })
            .collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.running.keys().cloned().collect()
    }

    pub fn admin_view(&self, removed: BTreeSet<String>) -> AdminTargets {
        AdminTargets {
            view: TargetsView {
                targets: self
                    .running
                    .values()
                    .map(|r| (r.config.name.clone(), r.config.events.clone()))
                    .collect(),
                removed,
            },
            wakes: self
                .running
                .values()
                .map(|r| (r.config.name.clone(), r.settings.borrow().wake.clone()))
                .collect(),
        }
    }

    /// Waits for every dispatcher to stop (after shutdown was cancelled).
    pub async fn join_all(&mut self) -> anyhow::Result<()> {
        for (_, running) in std::mem::take(&mut self.running) {
            running.task.await.context("dispatcher task")?;
        }
        Ok(())
    }
}

/// The dispatcher settings for `config`, waking through `wake`.
pub fn build_target(
    config: &TargetConfig,
    wake: Arc<Notify>,
    shutdown_grace: Duration,
) -> anyhow::Result<Target> {
    let secret: Option<Secret> = config.secret()?;
    let url = config.endpoint()?;
    let outbound = crate::outbound::Outbound::build(config)?;
    let deliverer = Deliverer::new(url, secret.as_ref(), config.timeout.get(), outbound)
        .with_context(|| format!("target {}: cannot build its HTTP client", config.name))?;
    Ok(Target {
        name: config.name.clone(),
        deliverer,
        secret,
        policy: config.retry_policy(),
        concurrency: config.concurrency,
        rate_per_second: config.rate_per_second,
        circuit_failures: config.circuit_failures,
        probe_max_interval: config.probe_max_interval.get(),
        wake,
        shutdown_grace,
    })
}

/// Reloads a running relay; one reload at a time.
pub struct Reloader {
    source: Option<ConfigSource>,
    state: tokio::sync::Mutex<State>,
    secret: Arc<Swap<Option<SecretCheck>>>,
    admin: Arc<Swap<AdminTargets>>,
    committer: Committer,
    store: Store,
    metrics: Arc<Metrics>,
    alerts: Alerter,
    tls: Option<Arc<Certificates>>,
}

/// What the running relay was configured with, and its dispatchers.
struct State {
    config: Config,
    targets: Targets,
    /// The relay is shutting down: its dispatchers have stopped for good.
    closed: bool,
}

/// A reload asked for while the relay shuts down.
#[derive(Debug, thiserror::Error)]
#[error("the relay is shutting down; the configuration is not read again")]
pub struct ShuttingDown;

/// The running targets and where a reload puts what it changes.
pub struct Reloadable {
    pub config: Config,
    pub targets: Targets,
    pub secret: Arc<Swap<Option<SecretCheck>>>,
    pub admin: Arc<Swap<AdminTargets>>,
    pub committer: Committer,
    /// Takes the `[alerts]` settings each reload reads.
    pub alerts: Alerter,
    /// The certificate the ingest listener serves, read again by each
    /// reload; `None` for plain HTTP.
    pub tls: Option<Arc<Certificates>>,
}

impl Reloader {
    pub fn new(source: Option<ConfigSource>, parts: Reloadable, metrics: Arc<Metrics>) -> Reloader {
        let store = parts.targets.store.clone();
        Reloader {
            source,
            state: tokio::sync::Mutex::new(State {
                config: parts.config,
                targets: parts.targets,
                closed: false,
            }),
            secret: parts.secret,
            admin: parts.admin,
            committer: parts.committer,
            store,
            metrics,
            alerts: parts.alerts,
            tls: parts.tls,
        }
    }

    /// Reads the configuration and secret files again and applies what
    /// changed; on an error the running configuration stays as it was.
    /// Runs to its end even if the caller stops waiting (an admin client
    /// that hangs up): a reload stopped half-way would leave targets
    /// without a dispatcher.
    pub async fn reload(self: &Arc<Self>) -> anyhow::Result<ReloadReport> {
        let this = Arc::clone(self);
        tokio::spawn(async move { this.reload_to_end().await })
            .await
            .context("reload task")?
    }

    async fn reload_to_end(&self) -> anyhow::Result<ReloadReport> {
        let mut state = self.state.lock().await;
        tracing::info!("reading the configuration again");
        let result = self.apply(&mut state).await;
        match &result {
            Ok(report) => {
                self.metrics.config_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(
                    added = ?report.added,
                    removed = ?report.removed,
                    changed = ?report.changed.keys().collect::<Vec<_>>(),
                    secrets_changed = report.secrets_changed,
                    needs_restart = ?report.needs_restart,
                    certificate = report.certificate.as_deref().unwrap_or("-"),
                    "configuration reloaded"
                );
                if !report.needs_restart.is_empty() {
                    tracing::warn!(keys = ?report.needs_restart, "these settings changed in the file but take effect only after a restart");
                }
            }
            Err(err) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["failed"])
                    .inc();
                tracing::error!(error = %format!("{err:#}"), "reload failed; the running configuration is kept");
            }
        }
        result
    }

    /// Stops every dispatcher (the relay is shutting down) and returns the
    /// names of the targets it delivered to.
    pub async fn join_targets(&self) -> anyhow::Result<Vec<String>> {
        let mut state = self.state.lock().await;
        state.closed = true;
        tracing::info!("stopping the dispatchers; reloads are refused from now on");
        let names = state.targets.names();
        state.targets.join_all().await?;
        Ok(names)
    }

    async fn apply(&self, state: &mut State) -> anyhow::Result<ReloadReport> {
        if state.closed {
            return Err(ShuttingDown.into());
        }
        let source = self.source.as_ref().context(
            "this relay was started without a configuration to read again (not by `serve`)",
        )?;
        let new = source.load()?;
        let check = secret_check(&new)?;
        let alerts = AlertSettings::resolve(&new.alerts)?;
        let plan = Plan::make(&state.targets, &new.targets)?;
        let certificate = self.stage_certificate(&new)?;
        let mut report = ReloadReport {
            needs_restart: restart_keys(&state.config, &new),
            secrets_changed: self.secret.load().as_ref().as_ref() != check.as_ref(),
            ..ReloadReport::default()
        };
        if check.is_none() && self.secret.load().is_some() {
            tracing::warn!(
                "UNAUTHENTICATED MODE from now on: every request is accepted without checking \
                 x-webhook-secret; anyone who can reach the ingest port can inject events"
            );
        }
        if !plan.retired.is_empty() || !plan.started.is_empty() {
            self.resubscribe(state, &new, plan.retired, plan.started, &mut report)
                .await?;
        }
        self.secret.store(check);
        for (name, target, keys) in plan.in_place {
            let running = state
                .targets
                .running
                .get_mut(&name)
                .expect("planned from it");
            running.settings.send_replace(Arc::new(target));
            running.config = new_config(&new, &name);
            report.changed.insert(name, keys);
        }
        let store = self.store.clone();
        let names = state.targets.names();
        let removed = tokio::task::spawn_blocking(move || store.targets_in_log())
            .await??
            .into_iter()
            .filter(|name| !names.contains(name))
            .collect();
        self.admin.store(state.targets.admin_view(removed));
        // Only once the admin view no longer lists them: a metrics scrape
        // sets the gauges of the targets it lists.
        for name in &report.removed {
            self.metrics.forget_target(name);
        }
        self.alerts.configure(alerts);
        if let Some(staged) = certificate {
            report.certificate = Some(staged.certificate().summary());
            self.install_certificate(state, staged, &new);
        }
        state.config.alerts = new.alerts.clone();
        state.config.auth = new.auth.clone();
        state.config.targets = new.targets.clone();
        Ok(report)
    }

    /// The certificate `new` names, read and checked but not yet served,
    /// when the relay serves HTTPS and the new configuration still does
    /// (turning HTTPS on or off needs a restart).
    fn stage_certificate(&self, new: &Config) -> anyhow::Result<Option<Staged>> {
        let files = new.server.tls.as_ref().and_then(TlsFiles::from_config);
        let (Some(tls), Some(files)) = (&self.tls, files) else {
            return Ok(None);
        };
        tls.stage(&files)
            .map(Some)
            .context("server.tls: the certificate does not read; the certificate in use is kept")
    }

    /// Serves `staged` from the next handshake on, and watches the files
    /// `new` names.
    fn install_certificate(&self, state: &mut State, staged: Staged, new: &Config) {
        let Some(tls) = &self.tls else {
            return;
        };
        tls.install(staged);
        if let (Some(running), Some(new)) = (state.config.server.tls.as_mut(), &new.server.tls) {
            running.cert_file = new.cert_file.clone();
            running.key_file = new.key_file.clone();
        }
    }

    /// Stops the dispatchers of the targets `retired` (removed, or whose
    /// event types changed), moves the committer to the new targets at a
    /// cut ([`crate::store::TargetChange`]), gives the retired ones'
    /// waiting deliveries queue entries, and starts the new dispatchers.
    /// Once the committer has moved, nothing stops it half-way.
    async fn resubscribe(
        &self,
        state: &mut State,
        new: &Config,
        retired: Vec<String>,
        started: Vec<(String, Target, Option<Vec<String>>)>,
        report: &mut ReloadReport,
    ) -> anyhow::Result<()> {
        let mut not_before = HashMap::new();
        for name in &retired {
            not_before.insert(name.clone(), state.targets.stop(name).await);
        }
        let starting: Vec<Subscription> = started
            .iter()
            .map(|(name, target, _)| Subscription {
                target: name.clone(),
                events: new_config(new, name).events,
                wake: target.wake.clone(),
            })
            .collect();
        // A target started while it still has a queue is retired first.
        let mut names = retired.clone();
        names.extend(starting.iter().map(|s| s.target.clone()));
        names.sort();
        names.dedup();
        let mut changes = self.store.retire_fronts(&names);
        changes.extend(starting.iter().map(|s| TargetChange::Start {
            target: s.target.clone(),
            events: s.events.clone(),
        }));
        let mut subscriptions = state.targets.subscriptions();
        subscriptions.extend(starting.iter().cloned());
        let cut = match self.committer.resubscribe(subscriptions, changes).await {
            Ok(cut) => cut,
            Err(err) => {
                self.store.restore_fronts();
                return Err(err).context("the committer did not take the new targets");
            }
        };
        self.store.finish_resubscribe(cut, &starting);
        if crate::crashpoint::hits(crate::crashpoint::RELOAD_CUT) {
            // Events acknowledged and checkpointed above the cut first.
            tokio::time::sleep(Duration::from_secs(1)).await;
            crate::crashpoint::crash(crate::crashpoint::RELOAD_CUT);
        }
        self.queue_retired().await;
        for (name, target, changed) in started {
            let when = not_before.get(&name).copied().unwrap_or_else(Instant::now);
            state.targets.start(new_config(new, &name), target, when);
            match changed {
                Some(keys) => drop(report.changed.insert(name, keys)),
                None => report.added.push(name),
            }
        }
        report.removed = retired
            .into_iter()
            .filter(|name| !state.targets.running.contains_key(name))
            .collect();
        Ok(())
    }

    /// Gives the deliveries waiting for retired targets queue entries; what
    /// fails is tried again by the next reload, or at the next start.
    async fn queue_retired(&self) {
        let store = self.store.clone();
        let queued = tokio::task::spawn_blocking(move || store.queue_retired()).await;
        match queued {
            Ok(Ok(queued)) => {
                for (target, queued) in queued {
                    tracing::info!(target = %target, queued, "deliveries waiting for a target the reload removed or changed now have queue entries");
                }
            }
            Ok(Err(err)) => {
                tracing::error!(error = %err, "cannot queue the deliveries waiting for a target the reload removed or changed; will try again at the next reload or start");
            }
            Err(err) => tracing::error!(error = %err, "queueing retired deliveries failed"),
        }
    }
}

/// `name`'s configuration in `config` (it is there: planned from it).
fn new_config(config: &Config, name: &str) -> TargetConfig {
    config
        .targets
        .iter()
        .find(|t| t.name == name)
        .cloned()
        .expect("the target is in the new configuration")
}

/// What a reload does to the targets, built before anything changes (so
/// that a secret that cannot be read changes nothing).
struct Plan {
    /// Kept, with new settings: name, dispatcher settings, changed keys.
    in_place: Vec<(String, Target, Vec<String>)>,
    /// Removed, or changing event types: their dispatchers stop.
    retired: Vec<String>,
    /// Added (`None`), or changing event types (the changed keys): new
    /// dispatchers.
    started: Vec<(String, Target, Option<Vec<String>>)>,
}

impl Plan {
    fn make(targets: &Targets, configs: &[TargetConfig]) -> anyhow::Result<Plan> {
        let mut plan = Plan {
            in_place: Vec::new(),
            retired: Vec::new(),
            started: Vec::new(),
        };
        for config in configs {
            let Some(running) = targets.running.get(&config.name) else {
                let target = build_target(config, Arc::new(Notify::new()), targets.shutdown_grace)?;
                plan.started.push((config.name.clone(), target, None));
                continue;
            };
            let current = running.settings.borrow().clone();
            let target = build_target(config, current.wake.clone(), targets.shutdown_grace)?;
            let mut keys = changed_keys(&running.config, config);
            if target.secret.as_ref().map(Secret::expose)
                != current.secret.as_ref().map(Secret::expose)
                && !keys.iter().any(|k| k.starts_with("secret"))
            {
                keys.push("secret".to_owned());
            }
            // A URL read from url_file or url_env can change with the same
            // keys; reported by key name, never by value.
            if target.deliverer.url() != current.deliverer.url()
                && !keys.iter().any(|k| k.starts_with("url"))
            {
                keys.push("url".to_owned());
            }
            for key in target
                .deliverer
                .outbound()
                .changed_values(current.deliverer.outbound())
            {
                if !keys.iter().any(|k| k.starts_with(&key)) {
                    keys.push(key);
                }
            }
            if keys.is_empty() {
                continue;
            }
            if running.config.events != config.events {
                plan.retired.push(config.name.clone());
                plan.started.push((config.name.clone(), target, Some(keys)));
            } else {
                plan.in_place.push((config.name.clone(), target, keys));
            }
        }
        for name in targets.running.keys() {
            if !configs.iter().any(|c| c.name == *name) {
                plan.retired.push(name.clone());
            }
        }
        Ok(plan)
    }
}

/// The keys of a target's configuration that differ.
fn changed_keys(old: &TargetConfig, new: &TargetConfig) -> Vec<String> {
    table_diff(&toml_table(old), &toml_table(new), "")
}

/// The keys outside `[auth]` and `[[targets]]` that differ: they take
/// effect at the next start. The certificate files of `[server.tls]` are
/// read again in place; turning HTTPS on or off needs a restart.
fn restart_keys(old_config: &Config, new_config: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    for (section, old, new) in [
        (
            "server",
            toml_table(&old_config.server),
            toml_table(&new_config.server),
        ),
        (
            "storage",
            toml_table(&old_config.storage),
            toml_table(&new_config.storage),
        ),
        (
            "logging",
            toml_table(&old_config.logging),
            toml_table(&new_config.logging),
        ),
    ] {
        keys.extend(
            table_diff(&old, &new, &format!("{section}."))
                .into_iter()
                .filter(|key| key != "server.tls"),
        );
        if section == "server" {
            keys.extend(tls_restart_keys(old_config, new_config));
        }
    }
    keys
}

/// The `[server.tls]` keys that take effect only at a restart.
fn tls_restart_keys(old: &Config, new: &Config) -> Vec<String> {
    match (&old.server.tls, &new.server.tls) {
        (Some(old), Some(new)) if old.acme != new.acme => vec!["server.tls.acme".to_owned()],
        (Some(old), Some(new)) if old.watch_interval != new.watch_interval => {
            vec!["server.tls.watch_interval".to_owned()]
        }
        (Some(_), Some(_)) | (None, None) => Vec::new(),
        (Some(_), None) | (None, Some(_)) => vec!["server.tls".to_owned()],
    }
}

fn toml_table<T: Serialize>(value: &T) -> toml::Table {
    toml::Table::try_from(value).unwrap_or_default()
}

/// The keys (with `prefix`) whose values differ between two tables.
fn table_diff(old: &toml::Table, new: &toml::Table, prefix: &str) -> Vec<String> {
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|key| old.get(*key) != new.get(*key))
        .map(|key| format!("{prefix}{key}"))
        .collect()
}
