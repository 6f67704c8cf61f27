//! The relay's Prometheus registry and every metric handle.
//!
//! One [`Metrics`] per running relay, owned by the application and passed to
//! each part: there is no process-global registry, so parallel tests never
//! share counters. Labels carry only fixed vocabularies (results, event
//! classes, target names from the configuration): never secrets, ids, URLs or
//! anything read from a request body.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds: 50 µs up to LeadFloAgent's 5 s deadline.
pub const LATENCY_BUCKETS: [f64; 16] = [
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// Delivery attempt buckets: the ingest latencies, then on past 5 s to a
/// minute, since an attempt may take up to its target's timeout (10 s by
/// default) and a histogram puts anything beyond its last bucket in `+Inf`.
pub const DELIVERY_BUCKETS: [f64; 20] = [
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 15.0, 30.0, 60.0,
];

/// Why an ingest request ended the way it did; the `result` label of
/// `leadflo_relay_ingest_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestResult {
    Accepted,
    Unauthorized,
    BadRequest,
    TooLarge,
    NotFound,
    MethodNotAllowed,
    Timeout,
    Unavailable,
}

impl IngestResult {
    pub const ALL: [IngestResult; 8] = [
        IngestResult::Accepted,
        IngestResult::Unauthorized,
        IngestResult::BadRequest,
        IngestResult::TooLarge,
        IngestResult::NotFound,
        IngestResult::MethodNotAllowed,
        IngestResult::Timeout,
        IngestResult::Unavailable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            IngestResult::Accepted => "accepted",
            IngestResult::Unauthorized => "unauthorized",
            IngestResult::BadRequest => "bad_request",
            IngestResult::TooLarge => "too_large",
            IngestResult::NotFound => "not_found",
            IngestResult::MethodNotAllowed => "method_not_allowed",
            IngestResult::Timeout => "timeout",
            IngestResult::Unavailable => "unavailable",
        }
    }
}

/// The `event` label: the two event types LeadFloAgent documents, and
/// `other` for anything else, so a sender cannot mint label values.
pub fn event_class(event: &str) -> &'static str {
    match event {
        "visitor_created" => "visitor_created",
        "conversation_ended" => "conversation_ended",
        _ => "other",
    }
}

/// Every metric the relay exports, registered in its own [`Registry`].
pub struct Metrics {
    registry: Registry,
    /// Held while the per-target gauges are refreshed or a target's are
    /// dropped, so that a refresh that read the targets before a reload
    /// cannot bring back the gauges of a target the reload removed.
    gauges: std::sync::Mutex<()>,
    pub ingest_requests: IntCounterVec,
    pub ingest_events: IntCounterVec,
    pub ingest_duration: Histogram,
    pub ingest_in_flight: IntGauge,
    pub commits: IntCounter,
    pub commit_failures: IntCounter,
    pub fsyncs: IntCounter,
    pub checkpoints: IntCounter,
    pub commit_duration: Histogram,
    pub commit_batch_size: Histogram,
    pub quarantined: IntCounter,
    pub connections_evicted: IntCounter,
    pub build_info: IntGaugeVec,
    pub delivery_attempts: IntCounterVec,
    pub delivery_duration: HistogramVec,
    pub circuit_open: IntGaugeVec,
    pub last_success: GaugeVec,
    pub pruned_events: IntCounter,
    pub backlog_events: IntGaugeVec,
    pub backlog_oldest_age: GaugeVec,
    pub dead_letters: IntGaugeVec,
    pub store_size_bytes: IntGauge,
    pub disk_free_bytes: IntGauge,
    pub disk_total_bytes: IntGauge,
    pub config_reloads: IntCounterVec,
    /// `leadflo_relay_alerts_total{kind,result}`: see [`crate::alerts`].
    pub alerts: IntCounterVec,
    /// `leadflo_relay_tls_handshake_failures_total{reason}`: see
    /// [`crate::tls::HandshakeFailure`].
    pub tls_handshake_failures: IntCounterVec,
    /// `leadflo_relay_tls_reloads_total{result}`: the certificate read
    /// again under a running relay.
    pub tls_reloads: IntCounterVec,
    /// `leadflo_relay_tls_certificate_expiry_timestamp_seconds`.
    pub tls_certificate_expiry: IntGauge,
    /// `leadflo_relay_acme_orders_total{result}`: certificate orders
    /// (first and renewals) to the ACME authority.
    pub acme_orders: IntCounterVec,
    /// `leadflo_relay_acme_cache_errors_total`: the ACME cache directory
    /// could not be read or written.
    pub acme_cache_errors: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let ingest_requests = IntCounterVec::new(
            Opts::new(
                "leadflo_relay_ingest_requests_total",
                "Ingest requests answered, by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let ingest_events = IntCounterVec::new(
            Opts::new(
                "leadflo_relay_ingest_events_total",
                "Events accepted and made durable, by event type.",
            ),
            &["event"],
        )
        .expect("valid metric");
        // 50 µs to 5 s, the sender's deadline; 1 s is the alerting threshold.
        let latency_buckets = LATENCY_BUCKETS.to_vec();
        let ingest_duration = Histogram::with_opts(
            HistogramOpts::new(
                "leadflo_relay_ingest_duration_seconds",
                "Time from request headers to the response, for every ingest request.",
            )
            .buckets(latency_buckets.clone()),
        )
        .expect("valid metric");
        let ingest_in_flight = IntGauge::new(
            "leadflo_relay_ingest_requests_in_flight",
            "Ingest requests begun (headers read) and not yet answered.",
        )
        .expect("valid metric");
        let commits = IntCounter::new(
            "leadflo_relay_commits_total",
            "Group commits that reached disk (one write-ahead log append and fdatasync each).",
        )
        .expect("valid metric");
        let commit_failures = IntCounter::new(
            "leadflo_relay_commit_failures_total",
            "Writes to the log that failed: group commits (their requests were answered 503), and checkpoints or write-ahead log rotations (retried; no request refused).",
        )
        .expect("valid metric");
        let fsyncs = IntCounter::new(
            "leadflo_relay_fsyncs_total",
            "fdatasync calls on the write-ahead log, one per group commit.",
        )
        .expect("valid metric");
        let checkpoints = IntCounter::new(
            "leadflo_relay_checkpoints_total",
            "Checkpoints: sled flushed and fsynced, the write-ahead log emptied.",
        )
        .expect("valid metric");
        let commit_duration = Histogram::with_opts(
            HistogramOpts::new(
                "leadflo_relay_commit_duration_seconds",
                "Time to write and fsync one group commit.",
            )
            .buckets(latency_buckets),
        )
        .expect("valid metric");
        let commit_batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "leadflo_relay_commit_batch_size",
                "Records written by one group commit.",
            )
            .buckets(prometheus::exponential_buckets(1.0, 2.0, 12).expect("valid buckets")),
        )
        .expect("valid metric");
        let quarantined = IntCounter::new(
            "leadflo_relay_quarantined_total",
            "Authenticated but malformed bodies kept in quarantine.",
        )
        .expect("valid metric");
        let connections_evicted = IntCounter::new(
            "leadflo_relay_connections_evicted_total",
            "Idle ingest connections closed to make room for new ones at server.max_connections.",
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "leadflo_relay_build_info",
                "Always 1; the version label tells the build.",
            ),
            &["version"],
        )
        .expect("valid metric");

        let delivery_attempts = IntCounterVec::new(
            Opts::new(
                "leadflo_relay_delivery_attempts_total",
                "Delivery attempts by target and outcome (success, retry, dead).",
            ),
            &["target", "outcome"],
        )
        .expect("valid metric");
        let delivery_duration = HistogramVec::new(
            HistogramOpts::new(
                "leadflo_relay_delivery_duration_seconds",
                "Time of one delivery attempt, by target.",
            )
            .buckets(DELIVERY_BUCKETS.to_vec()),
            &["target"],
        )
        .expect("valid metric");
        let circuit_open = IntGaugeVec::new(
            Opts::new(
                "leadflo_relay_circuit_open",
                "1 while the target's circuit breaker is open (probing), else 0.",
            ),
            &["target"],
        )
        .expect("valid metric");
        let gauge_vec = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["target"]).expect("valid metric")
        };
        let backlog_events = gauge_vec(
            "leadflo_relay_backlog_events",
            "Deliveries waiting for the target (due now or scheduled for a retry).",
        );
        let backlog_oldest_age = GaugeVec::new(
            Opts::new(
                "leadflo_relay_backlog_oldest_age_seconds",
                "Age of the oldest delivery waiting for the target; 0 when none waits.",
            ),
            &["target"],
        )
        .expect("valid metric");
        let dead_letters = gauge_vec(
            "leadflo_relay_dead_letters",
            "Dead letters kept for the target, waiting for an operator.",
        );
        let store_size_bytes = IntGauge::new(
            "leadflo_relay_store_size_bytes",
            "Bytes the log's files take on disk.",
        )
        .expect("valid metric");
        let disk_free_bytes = IntGauge::new(
            "leadflo_relay_disk_free_bytes",
            "Bytes available on the data directory's filesystem.",
        )
        .expect("valid metric");
        let disk_total_bytes = IntGauge::new(
            "leadflo_relay_disk_total_bytes",
            "Size of the data directory's filesystem.",
        )
        .expect("valid metric");
        let last_success = GaugeVec::new(
            Opts::new(
                "leadflo_relay_last_success_timestamp_seconds",
                "When the target last answered 2xx (Unix time); 0 before the first success.",
            ),
            &["target"],
        )
        .expect("valid metric");
        let pruned_events = IntCounter::new(
            "leadflo_relay_pruned_events_total",
            "Delivered events deleted after storage.retention.",
        )
        .expect("valid metric");
        let metrics = Metrics {
            registry,
            gauges: std::sync::Mutex::new(()),
            ingest_requests,
            ingest_events,
            ingest_duration,
            ingest_in_flight,
            commits,
            commit_failures,
            fsyncs,
            checkpoints,
            commit_duration,
            commit_batch_size,
            quarantined,
            connections_evicted,
            build_info,
            delivery_attempts,
            delivery_duration,
            circuit_open,
            last_success,
            pruned_events,
            backlog_events,
            backlog_oldest_age,
            dead_letters,
            store_size_bytes,
            disk_free_bytes,
            disk_total_bytes,
            config_reloads: IntCounterVec::new(
                Opts::new(
                    "leadflo_relay_config_reloads_total",
                    "Configuration reloads (SIGHUP, `leadflo-relay reload`), by result: ok, or \
                     failed (the running configuration was kept).",
                ),
                &["result"],
            )
            .expect("valid metric"),
            alerts: IntCounterVec::new(
                Opts::new(
                    "leadflo_relay_alerts_total",
                    "Alerts ([alerts]) by kind and result: sent or failed (posted in a message \
                     the receiver took, or did not), folded (held back and counted in a later \
                     message), dropped (the alert queue was full, or still unsent at shutdown).",
                ),
                &["kind", "result"],
            )
            .expect("valid metric"),
            tls_handshake_failures: IntCounterVec::new(
                Opts::new(
                    "leadflo_relay_tls_handshake_failures_total",
                    "Ingest connections that never got past the TLS handshake, by reason: \
                     plain_http (answered 400), timeout (none within server.header_read_timeout), \
                     error (the client broke off or sent what is not TLS), no_certificate (the \
                     first ACME certificate is not there yet).",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            tls_reloads: IntCounterVec::new(
                Opts::new(
                    "leadflo_relay_tls_reloads_total",
                    "The certificate files read again (on reload, or changed on disk), by result: \
                     ok (served from the next handshake), or failed (the certificate in use was \
                     kept; the log says why).",
                ),
                &["result"],
            )
            .expect("valid metric"),
            tls_certificate_expiry: IntGauge::new(
                "leadflo_relay_tls_certificate_expiry_timestamp_seconds",
                "When the certificate the ingest listener serves expires (Unix time); 0 when it \
                 serves plain HTTP.",
            )
            .expect("valid metric"),
            acme_orders: IntCounterVec::new(
                Opts::new(
                    "leadflo_relay_acme_orders_total",
                    "Certificate orders to the ACME authority (the first, and each renewal), by \
                     result: ok (the new certificate is served), failed (retried with backoff; \
                     the log says why).",
                ),
                &["result"],
            )
            .expect("valid metric"),
            acme_cache_errors: IntCounter::new(
                "leadflo_relay_acme_cache_errors_total",
                "The ACME cache directory (account key, certificates) could not be read or \
                 written; a restart would order again.",
            )
            .expect("valid metric"),
        };
        metrics.register_all();
        metrics
    }

    fn register_all(&self) {
        let collectors: [Box<dyn prometheus::core::Collector>; 31] = [
            Box::new(self.ingest_requests.clone()),
            Box::new(self.ingest_events.clone()),
            Box::new(self.ingest_duration.clone()),
            Box::new(self.ingest_in_flight.clone()),
            Box::new(self.commits.clone()),
            Box::new(self.commit_failures.clone()),
            Box::new(self.fsyncs.clone()),
            Box::new(self.checkpoints.clone()),
            Box::new(self.commit_duration.clone()),
            Box::new(self.commit_batch_size.clone()),
            Box::new(self.quarantined.clone()),
            Box::new(self.connections_evicted.clone()),
            Box::new(self.build_info.clone()),
            Box::new(self.delivery_attempts.clone()),
            Box::new(self.delivery_duration.clone()),
            Box::new(self.circuit_open.clone()),
            Box::new(self.last_success.clone()),
            Box::new(self.pruned_events.clone()),
            Box::new(self.backlog_events.clone()),
            Box::new(self.backlog_oldest_age.clone()),
            Box::new(self.dead_letters.clone()),
            Box::new(self.store_size_bytes.clone()),
            Box::new(self.disk_free_bytes.clone()),
            Box::new(self.disk_total_bytes.clone()),
            Box::new(self.config_reloads.clone()),
            Box::new(self.alerts.clone()),
            Box::new(self.tls_handshake_failures.clone()),
            Box::new(self.tls_reloads.clone()),
            Box::new(self.tls_certificate_expiry.clone()),
            Box::new(self.acme_orders.clone()),
            Box::new(self.acme_cache_errors.clone()),
        ];
        for collector in collectors {
            self.registry
                .register(collector)
                .expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        self.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registers once");
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Pre-create every result so dashboards see zeros instead of gaps.
        for result in IngestResult::ALL {
            self.ingest_requests.with_label_values(&[result.label()]);
        }
        for event in ["visitor_created", "conversation_ended", "other"] {
            self.ingest_events.with_label_values(&[event]);
        }
        for result in ["ok", "failed"] {
            self.config_reloads.with_label_values(&[result]);
            self.tls_reloads.with_label_values(&[result]);
            self.acme_orders.with_label_values(&[result]);
        }
        for failure in crate::tls::HandshakeFailure::ALL {
            self.tls_handshake_failures
                .with_label_values(&[failure.label()]);
        }
        for kind in crate::alerts::AlertKind::ALL {
            for result in crate::alerts::AlertResult::ALL {
                self.alerts
                    .with_label_values(&[kind.label(), result.label()]);
            }
        }
    }

    pub fn count_request(&self, result: IngestResult) {
        self.ingest_requests
            .with_label_values(&[result.label()])
            .inc();
    }

    /// The current value of `leadflo_relay_ingest_requests_total{result}`.
    pub fn requests(&self, result: IngestResult) -> u64 {
        self.ingest_requests
            .with_label_values(&[result.label()])
            .get()
    }

    /// Drops `target`'s gauges (a reload removed it): they would otherwise
    /// stay at their last values, as no dispatcher updates them, and a
    /// restart would not show them either. Its counters stay.
    pub fn forget_target(&self, target: &str) {
        let _gauges = self.gauge_lock();
        let _ = self.circuit_open.remove_label_values(&[target]);
        let _ = self.backlog_events.remove_label_values(&[target]);
        let _ = self.last_success.remove_label_values(&[target]);
        let _ = self.backlog_oldest_age.remove_label_values(&[target]);
        let _ = self.dead_letters.remove_label_values(&[target]);
    }

    /// Held while per-target gauges are set from a list of targets (see
    /// `gauges`).
    pub fn gauge_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.gauges.lock().expect("gauge lock")
    }

    /// Pre-creates a target's series so they read 0 before any attempt.
    pub fn register_target(&self, target: &str) {
        for outcome in ["success", "retry", "dead"] {
            self.delivery_attempts.with_label_values(&[target, outcome]);
        }
        self.circuit_open.with_label_values(&[target]).set(0);
        self.backlog_events.with_label_values(&[target]).set(0);
        self.last_success.with_label_values(&[target]).set(0.0);
        self.backlog_oldest_age
            .with_label_values(&[target])
            .set(0.0);
        self.dead_letters.with_label_values(&[target]).set(0);
    }

    /// The current value of `leadflo_relay_delivery_attempts_total`.
    pub fn attempts(&self, target: &str, outcome: &str) -> u64 {
        self.delivery_attempts
            .with_label_values(&[target, outcome])
            .get()
    }

    /// Counts a connection that never got past its TLS handshake.
    pub fn count_handshake_failure(&self, failure: crate::tls::HandshakeFailure) {
        self.tls_handshake_failures
            .with_label_values(&[failure.label()])
            .inc();
    }

    /// The current value of
    /// `leadflo_relay_tls_handshake_failures_total{reason}`.
    pub fn handshake_failures(&self, failure: crate::tls::HandshakeFailure) -> u64 {
        self.tls_handshake_failures
            .with_label_values(&[failure.label()])
            .get()
    }

    /// The current value of `leadflo_relay_tls_reloads_total{result}`.
    pub fn tls_reloads(&self, result: &str) -> u64 {
        self.tls_reloads.with_label_values(&[result]).get()
    }

    /// The current value of `leadflo_relay_acme_orders_total{result}`.
    pub fn acme_orders(&self, result: &str) -> u64 {
        self.acme_orders.with_label_values(&[result]).get()
    }

    /// The current value of `leadflo_relay_alerts_total{kind,result}`.
    pub fn alerts(&self, kind: &str, result: &str) -> u64 {
        self.alerts.with_label_values(&[kind, result]).get()
    }

    /// The registry in Prometheus text exposition format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
