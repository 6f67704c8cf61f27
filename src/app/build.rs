//! Building a relay from its settings: the credentials checked, the log
//! opened and its backlogs counted, the disk guard's first sample, the
//! certificate read, and both listeners bound (port 0 allowed). Starts no
//! task.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use super::credentials::check_credentials;
use super::settings::{dispatcher_grace, store_options};
use super::{Credentials, Draining, Relay};
use crate::alerts::Alerter;
use crate::config::{Config, Secret, TargetConfig};
use crate::disk::DiskGuard;
use crate::dispatch::Target;
use crate::metrics::Metrics;
use crate::node::NodeId;
use crate::store::{Store, StoreOptions, Subscription};
use crate::systemd::PassedListeners;
use crate::tls::{Acme, AcmeSettings, Certificates, Https, TlsFiles};

/// A passed socket as it is, or a new one bound to `addr`.
async fn listen(
    passed: Option<std::net::TcpListener>,
    addr: SocketAddr,
    key: &str,
) -> anyhow::Result<TcpListener> {
    match passed {
        Some(listener) => TcpListener::from_std(listener)
            .with_context(|| format!("cannot listen on the socket passed for {key}")),
        None => TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} ({key})")),
    }
}

/// The open log, and the configured targets it was opened for.
struct OpenedStore {
    store: Store,
    options: StoreOptions,
    targets: Vec<(TargetConfig, Target)>,
    subscriptions: Vec<Subscription>,
}

/// Opens the log in the data directory (creating both, and the node
/// identity, on the first start) and has it adopt the configured targets.
fn open_store(config: &Config) -> anyhow::Result<OpenedStore> {
    let data_dir = &config.storage.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let node = NodeId::load_or_create(config.server.node_id, data_dir)?;
    let options = store_options(config, node);
    let targets = build_targets(config)?;
    let subscriptions = subscriptions(&targets);
    let store = Store::open(&options)?;
    store.adopt_targets(&subscriptions)?;
    Ok(OpenedStore {
        store,
        options,
        targets,
        subscriptions,
    })
}

/// Counts the backlog of every target the log holds deliveries for, and
/// returns those no longer configured.
fn count_backlogs(
    store: &Store,
    targets: &[(TargetConfig, Target)],
) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = targets.iter().map(|(c, _)| c.name.clone()).collect();
    // A target removed from the configuration keeps what waited for it
    // (and so its events) until it is configured again or forgotten:
    // counted too, for `stats`, and said once at each start.
    let removed: Vec<String> = store
        .targets_in_log()?
        .into_iter()
        .filter(|name| !names.contains(name))
        .collect();
    store.count_backlogs(&[names.as_slice(), removed.as_slice()].concat())?;
    for name in &removed {
        let stats = store.target_stats(name)?;
        tracing::warn!(
            target = %name,
            waiting = stats.queued,
            dead_letters = stats.dead,
            "a target no longer configured still holds deliveries, and their events are not \
             pruned: configure it again to deliver them, or drop them with \
             `leadflo-relay forget-target <name>`"
        );
    }
    Ok(removed)
}

/// The disk space guard of the data directory, with a first sample taken
/// so that a full disk refuses ingest (and is alerted) from the start.
fn disk_guard(
    config: &Config,
    options: &StoreOptions,
    store: &Store,
    metrics: &Metrics,
    alerts: &Alerter,
) -> anyhow::Result<Arc<DiskGuard>> {
    let disk = Arc::new(
        DiskGuard::new(
            options.data_dir.clone(),
            config.storage.min_free_bytes,
            config.storage.max_bytes,
        )
        .with_reusable({
            let store = store.clone();
            Box::new(move || store.reusable_bytes())
        })
        .with_alerts(alerts.clone()),
    );
    disk.sample(metrics).with_context(|| {
        format!(
            "cannot read the disk space of {}",
            options.data_dir.display()
        )
    })?;
    Ok(disk)
}

/// The certificate `[server.tls]` names, read and checked, or the ACME
/// client that orders it; `None` for plain HTTP. An expired certificate is
/// served, with a warning.
fn load_certificates(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<Option<Https>> {
    let Some(tls) = &config.server.tls else {
        return Ok(None);
    };
    if let Some(acme) = &tls.acme {
        let settings = AcmeSettings::from_config(acme, &config.storage.data_dir);
        let acme = Acme::new(settings, metrics.clone())?;
        tracing::info!("ingest serves HTTPS with an {}", acme.summary());
        return Ok(Some(Https::Acme(acme)));
    }
    let Some(files) = TlsFiles::from_config(tls) else {
        return Ok(None);
    };
    let (certificates, certificate) =
        Certificates::load(files, metrics.clone()).context("server.tls")?;
    tracing::info!("ingest serves HTTPS with the {}", certificate.summary());
    crate::tls::warn_if_expired(&certificate);
    Ok(Some(Https::Files(certificates)))
}

/// The ingest and the admin listener, in that order.
async fn bind_listeners(
    passed: PassedListeners,
    config: &Config,
) -> anyhow::Result<(TcpListener, TcpListener)> {
    let ingest = listen(passed.ingest, config.server.listen, "server.listen").await?;
    let admin = listen(
        passed.admin,
        config.server.admin_listen,
        "server.admin_listen",
    )
    .await?;
    Ok((ingest, admin))
}

impl Relay {
    /// Opens the log and binds both listeners. `secret` is `None` only when
    /// `auth.allow_unauthenticated` is set.
    pub async fn build(config: Config, secret: Option<Secret>) -> anyhow::Result<Relay> {
        let credentials = Credentials {
            inbound: secret,
            ..Credentials::default()
        };
        Relay::build_with(config, credentials).await
    }

    /// Like [`Relay::build`], with every credential.
    pub async fn build_with(config: Config, credentials: Credentials) -> anyhow::Result<Relay> {
        Relay::build_from(config, credentials, PassedListeners::default()).await
    }

    /// Like [`Relay::build_with`], listening on the sockets `passed` holds
    /// (socket activation) instead of binding them.
    pub async fn build_from(
        config: Config,
        credentials: Credentials,
        passed: PassedListeners,
    ) -> anyhow::Result<Relay> {
        check_credentials(&config, &credentials, &passed)?;
        let Credentials {
            inbound: secret,
            previous_inbound,
            admin_token,
        } = credentials;
        let metrics = Arc::new(Metrics::new());
        let tls = load_certificates(&config, &metrics)?;
        let (alerts, alert_task) = crate::alerts::start(&config.alerts, metrics.clone())?;
        let OpenedStore {
            store,
            options,
            targets,
            subscriptions,
        } = open_store(&config)?;
        let removed = count_backlogs(&store, &targets)?;
        let disk = disk_guard(&config, &options, &store, &metrics, &alerts)?;
        let (committer, committer_handle) =
            store.start_committer(&options, subscriptions, metrics.clone())?;
        let (ingest_listener, admin_listener) = bind_listeners(passed, &config).await?;
        Ok(Relay {
            config,
            secret,
            previous_secret: previous_inbound,
            admin_token,
            ingest_listener,
            admin_listener,
            store,
            committer,
            committer_handle,
            targets,
            removed_targets: removed,
            disk,
            metrics,
            node: options.node,
            draining: Draining::default(),
            source: None,
            reload_requests: Arc::default(),
            alerts,
            alert_task: Some(alert_task.with_node(options.node)),
            tls,
        })
    }
}

/// A dispatcher's settings per configured target.
fn build_targets(config: &Config) -> anyhow::Result<Vec<(TargetConfig, Target)>> {
    config
        .targets
        .iter()
        .map(|target| {
            let wake = Arc::new(tokio::sync::Notify::new());
            let built = crate::reload::build_target(target, wake, dispatcher_grace(config))?;
            Ok((target.clone(), built))
        })
        .collect()
}

/// What the committer needs of each target.
fn subscriptions(targets: &[(TargetConfig, Target)]) -> Vec<Subscription> {
    targets
        .iter()
        .map(|(config, target)| Subscription {
            target: config.name.clone(),
            events: config.events.clone(),
            wake: target.wake.clone(),
        })
        .collect()
}
