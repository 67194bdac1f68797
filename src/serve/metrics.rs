//! The daemon's Prometheus metrics: appends, acknowledgement latency, refusals, busy answers,
//! and, read at scrape time, the writer's commits (so the mean commit batch size) and the
//! projection's lag.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::log::WriterStats;

pub struct Metrics {
    registry: Registry,
    events: Counter,
    requests: Counter,
    pub refused: Counter,
    pub busy: Counter,
    batch_events: Histogram,
    ack_seconds: Histogram,
    commits: Gauge,
    committed_events: Gauge,
    lag: Gauge,
    panics: Gauge,
    unreadable: Gauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("spool");
        let m = Metrics {
            events: Counter::default(),
            requests: Counter::default(),
            refused: Counter::default(),
            busy: Counter::default(),
            batch_events: Histogram::new(exponential_buckets(1.0, 4.0, 9)),
            ack_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            commits: Gauge::default(),
            committed_events: Gauge::default(),
            lag: Gauge::default(),
            panics: Gauge::default(),
            unreadable: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("appended_events", "Events acknowledged", m.events.clone());
        registry.register(
            "append_requests",
            "Append requests acknowledged",
            m.requests.clone(),
        );
        registry.register(
            "refused_requests",
            "Requests refused as invalid",
            m.refused.clone(),
        );
        registry.register(
            "busy_requests",
            "Requests answered busy (503)",
            m.busy.clone(),
        );
        registry.register(
            "request_events",
            "Events per acknowledged request",
            m.batch_events.clone(),
        );
        registry.register(
            "ack_latency_seconds",
            "From a request's arrival to its durable acknowledgement",
            m.ack_seconds.clone(),
        );
        registry.register(
            "writer_commits",
            "Durable group commits since the log was opened",
            m.commits.clone(),
        );
        registry.register(
            "writer_events",
            "Events written by those commits (their ratio is the mean commit batch)",
            m.committed_events.clone(),
        );
        registry.register(
            "projection_lag_events",
            "Events the SQLite projection is behind the log",
            m.lag.clone(),
        );
        registry.register(
            "panics",
            "Panics (bugs) in any thread since the daemon started; each is logged with its place",
            m.panics.clone(),
        );
        registry.register(
            "unreadable_events",
            "Events of kinds or versions this build cannot read, kept and skipped by the projection (upgrade spool)",
            m.unreadable.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Counts an acknowledged request of `events` events that took `latency`.
    /// A request of `events` events answered, `written` of them new (the others repeated an
    /// idempotency key).
    pub fn appended(&self, written: u64, events: u64, latency: Duration) {
        self.events.inc_by(written);
        self.requests.inc();
        self.batch_events.observe(events as f64);
        self.ack_seconds.observe(latency.as_secs_f64());
    }

    /// The text exposition, with the writer's counters and the lag as of now.
    pub fn render(&self, writer: WriterStats, lag: u64, panics: u64, unreadable: u64) -> String {
        self.panics.set(panics as i64);
        self.unreadable.set(unreadable as i64);
        self.commits.set(writer.commits as i64);
        self.committed_events.set(writer.events as i64);
        self.lag.set(lag as i64);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
