//! Startup and shutdown: builds every part from the configuration, binds the
//! listeners (port 0 allowed), and runs until the shutdown token fires.
//!
//! Nothing here reads flags or the environment: `main.rs` resolves those and
//! passes a [`Config`] and the secret in, so tests build a relay the same way.
//!
//! One file per concern:
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the [`Relay`] type and its accessors |
//! | [`credentials`] | the secrets it runs with, and when they are required |
//! | [`build`] | building it: the log opened, backlogs counted, listeners bound |
//! | [`settings`] | the settings each part takes from the configuration |
//! | [`run`] | running it: services built, tasks spawned |
//! | [`stop`] | the drain, and shutting the tasks down in order |
//! | [`stuck_log`] | stopping for a restart when the log's writer is stuck |
//! | [`delivery`] | the delivery worker pool and its CPU priority |

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::alerts::{AlertTask, Alerter};
use crate::config::{Config, Secret, TargetConfig};
use crate::disk::DiskGuard;
use crate::dispatch::Target;
use crate::metrics::Metrics;
use crate::node::NodeId;
use crate::reload::ConfigSource;
use crate::store::{Committer, CommitterHandle, Store};
use crate::tls::Https;

mod build;
mod credentials;
mod delivery;
mod run;
mod settings;
mod stop;
mod stuck_log;

pub use credentials::{Credentials, SocketOrigin, require_admin_token};
pub use delivery::{DELIVERY_NICE_INCREMENT, DELIVERY_THREAD_NAME};
pub use settings::store_options;
pub use stop::Draining;
pub use stuck_log::STUCK_LOG_GRACE;

/// A relay whose listeners are bound and whose log is open.
pub struct Relay {
    config: Config,
    secret: Option<Secret>,
    previous_secret: Option<Secret>,
    admin_token: Option<Secret>,
    ingest_listener: TcpListener,
    admin_listener: TcpListener,
    store: Store,
    committer: Committer,
    committer_handle: CommitterHandle,
    targets: Vec<(TargetConfig, Target)>,
    /// Where `reload` reads the configuration again (`serve`'s file and
    /// flags); `None`: a relay built from a [`Config`] cannot reload.
    source: Option<ConfigSource>,
    /// Notified to reload (SIGHUP).
    reload_requests: Arc<tokio::sync::Notify>,
    /// Targets the log holds deliveries or dead letters for that the
    /// configuration no longer lists (found at start).
    removed_targets: Vec<String>,
    disk: Arc<DiskGuard>,
    metrics: Arc<Metrics>,
    node: NodeId,
    draining: Draining,
    /// Where dead letters, circuit changes and disk space are told.
    alerts: Alerter,
    /// Posts them; spawned when the relay runs.
    alert_task: Option<AlertTask>,
    /// Where the ingest listener's certificate comes from, when
    /// `[server.tls]` is set.
    tls: Option<Https>,
}

impl Relay {
    pub fn ingest_addr(&self) -> SocketAddr {
        self.ingest_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The open log, for inspection (tests, and the CLI in-process).
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Lets `reload` (SIGHUP, `leadflo-relay reload`) read the
    /// configuration again from `source`.
    pub fn reload_from(mut self, source: ConfigSource) -> Relay {
        self.source = Some(source);
        self
    }

    /// Notify it to reload, as SIGHUP does; the outcome is logged and
    /// counted in `leadflo_relay_config_reloads_total`.
    pub fn reload_requests(&self) -> Arc<tokio::sync::Notify> {
        self.reload_requests.clone()
    }

    /// The switch that starts a drain (see [`Relay::stop`]).
    pub fn draining(&self) -> Draining {
        self.draining.clone()
    }
}
