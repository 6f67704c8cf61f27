//! The integration tests, one binary (each module used to link the library
//! on its own). Shared helpers live in [`common`]: the in-process relay on
//! port 0, the real binary for crash and restart tests, a test receiver,
//! senders and the CLI.
//!
//! | module | what it proves |
//! |---|---|
//! | [`ingest`] | the webhook endpoint and the log behind it: durable before 200, answers, quarantine, group commit |
//! | [`abuse`] | slow, idle and oversized clients cost nothing and lose nothing |
//! | [`tls`] | HTTPS: certificate files, plain HTTP refused, swaps on reload and renewal, limits during the handshake |
//! | [`delivery`] | retries, limits, circuit breaker, dead letters, at-least-once |
//! | [`faults`] | targets that reset, stall, lie or vanish |
//! | [`crash`], [`crash_points`] | `kill -9` at random moments and at exact points loses no acknowledged event |
//! | [`disk`] | a full or failing disk |
//! | [`operations`], [`cli`] | the operator commands, online and offline |
//! | [`observability`], [`logs`] | metrics, dashboard, alert rules, log lines without personal data |
//! | [`availability`], [`reload`] | ids across replicas, drain, socket activation, HAProxy, reload |
//! | [`properties`] | property tests of the codecs and validation |
//! | [`formats`] | Slack messages and templates, against receivers that enforce their contracts |
//! | [`outbound`] | extra headers, status rules and Standard Webhooks signatures |
//! | [`alerts`] | alert messages to a small team's channel |
//! | [`docs`] | links and test names in the docs resolve |

mod common;

mod abuse;
mod acme;
mod alerts;
mod availability;
mod cli;
mod crash;
mod crash_points;
mod delivery;
mod disk;
mod docs;
mod faults;
mod formats;
mod ingest;
mod logs;
mod observability;
mod operations;
mod outbound;
mod properties;
mod reload;
mod tls;
