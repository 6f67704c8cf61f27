//! The settings each part runs with, taken from the configuration. Pure:
//! nothing here starts, opens or binds anything.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::http::{self, ConnectionLimits};
use crate::ingest::{IngestSettings, SecretCheck};
use crate::metrics::{IngestResult, Metrics};
use crate::node::NodeId;
use crate::reload::Swap;
use crate::store::StoreOptions;

/// The ingest endpoint's settings, checking secrets through `secret`.
pub(super) fn ingest_settings(
    config: &Config,
    secret: Arc<Swap<Option<SecretCheck>>>,
) -> IngestSettings {
    IngestSettings {
        path: config.server.path.clone(),
        secret,
        max_body_bytes: config.server.max_body_bytes,
        request_timeout: config.server.request_timeout.get(),
        commit_timeout: config.storage.commit_timeout.get(),
    }
}

pub(super) fn connection_limits(config: &Config) -> ConnectionLimits {
    ConnectionLimits {
        max_connections: config.server.max_connections,
        header_read_timeout: config.server.header_read_timeout.get(),
        shutdown_grace: config.server.shutdown_grace.get(),
    }
}

/// What the ingest listener counts besides requests.
pub(super) fn connection_events(metrics: &Arc<Metrics>) -> http::ConnectionEvents {
    let evicted = metrics.connections_evicted.clone();
    let handshakes = metrics.clone();
    let metrics = metrics.clone();
    // Handshake failures are counted, never logged: a flood of them (a
    // scanner, plain HTTP probes) would flood the log, and a line per
    // failure could only carry what a stranger sent.
    http::ConnectionEvents {
        evicted: Arc::new(move || evicted.inc()),
        malformed: Arc::new(move || metrics.count_request(IngestResult::BadRequest)),
        handshake_failed: Arc::new(move |failure: crate::tls::HandshakeFailure| {
            handshakes.count_handshake_failure(failure)
        }),
    }
}

/// Time a dispatcher's attempts in flight get when it stops.
pub(super) fn dispatcher_grace(config: &Config) -> Duration {
    config
        .server
        .shutdown_grace
        .get()
        .min(Duration::from_secs(5))
}

pub fn store_options(config: &Config, node: NodeId) -> StoreOptions {
    StoreOptions {
        node,
        data_dir: config.storage.data_dir.clone(),
        checkpoint_interval: config.storage.checkpoint_interval.get(),
        cache_capacity_bytes: config.storage.cache_capacity_bytes,
        quarantine_max_events: config.storage.quarantine_max_events,
        quarantine_max_bytes: config.storage.quarantine_max_bytes,
    }
}
