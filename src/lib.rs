//! leadflo-relay: a durable queueing relay for LeadFloAgent webhooks.
//!
//! LeadFloAgent never retries a webhook, so the relay answers 200 only once
//! an event is on disk, then delivers it to every target at least once.
//!
//! # Layout
//!
//! | module      | owns |
//! |-------------|------|
//! | [`config`]  | settings: TOML file, environment, flag overrides, validation |
//! | [`app`]     | building the relay from settings, running it, shutting it down |
//! | [`http`]    | the accept loop: connection cap, timeouts, graceful shutdown |
//! | [`tls`]     | HTTPS on the ingest listener: certificate files, checks, swaps, the handshake |
//! | [`ingest`]  | the webhook endpoint: limits, secret check, validation, append |
//! | [`store`]   | the durable log: records, group commit, queues, quarantine (the only sled user) |
//! | [`dispatch`] | per-target scheduling: due deliveries, concurrency, rate, circuit breaker |
//! | [`deliver`] | one HTTP attempt with reqwest, turned into an outcome |
//! | [`outbound`] | what a target is sent: format (raw, Slack, template), headers, status rules, signing |
//! | [`retry`]   | pure backoff and Retry-After math |
//! | [`disk`]    | disk space sampling and the free-space floor |
//! | [`durable_file`] | small files written whole (node identity, ACME cache) |
//! | [`alerts`]  | messages to a team's channel (Slack or JSON): dead letters, circuits, disk; rate-limited, never blocking |
//! | [`admin`]   | the admin listener: health, readiness, metrics |
//! | [`metrics`] | the Prometheus registry and metric handles |
//! | [`node`]    | event ids no two relays share, and the node identity |
//! | [`systemd`] | listening sockets passed in (socket activation), readiness notifications |
//! | [`telemetry`] | the relay's own log output (tracing) |
//! | [`reload`]  | configuration and secret files read again under a running relay |
//! | [`retention`] | background pruning of delivered events past `storage.retention` |
//! | [`ops`]     | operator actions on the log: replay, events, dead letters, stats |
//! | [`clock`]   | the wall clock in ms since the epoch |
//! | [`duration`] | durations as written in the configuration (`10s`) |
//! | [`cli`]     | the operator commands: online via the admin API or offline, tables or JSON |
#![forbid(unsafe_code)]

pub mod admin;
pub mod alerts;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crashpoint;
pub mod deliver;
pub mod disk;
pub mod dispatch;
pub mod durable_file;
pub mod duration;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod outbound;
pub mod reload;
pub mod retention;
pub mod retry;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod tls;

pub use app::Relay;
