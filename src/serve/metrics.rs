//! The daemon's Prometheus metrics: appends, acknowledgement latency, refusals, busy answers,
//! and, read at scrape time, the writer's commits, the log's size, waiting events, forks, the
//! halt, unreadable events, open event streams and the projection's lag.
//!
//! Two text formats, chosen by the scraper's `Accept`: OpenMetrics when it asks for it, else the
//! classic Prometheus text format (0.0.4), which names a counter's family with its `_total`
//! suffix so a classic parser keeps its samples together.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
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
    commits: Counter,
    committed_events: Counter,
    panics: Counter,
    lag: Gauge,
    unreadable: Gauge,
    waiting: Gauge,
    forks: Gauge,
    halted: Gauge,
    streams: Gauge,
    log_bytes: Gauge,
    hub_pushed: Counter,
    hub_pulled: Counter,
    hub_lag: Gauge,
    hub_failing: Gauge,
    hub_divergent: Gauge,
    hub_refused: Gauge,
    peers_unreachable: Gauge,
    peers_divergent: Gauge,
}

/// What is read at scrape time.
pub struct Now {
    pub writer: WriterStats,
    pub panics: u64,
    pub lag: u64,
    pub unreadable: u64,
    pub waiting: u64,
    pub forks: u64,
    pub halted: bool,
    pub streams: u64,
    pub log_bytes: u64,
    /// The hub sync's report, when there is a hub.
    pub hub: Option<crate::wire::HubStatus>,
    /// Each peer's report.
    pub peers: Vec<crate::wire::PeerStatus>,
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
            commits: Counter::default(),
            committed_events: Counter::default(),
            panics: Counter::default(),
            lag: Gauge::default(),
            unreadable: Gauge::default(),
            waiting: Gauge::default(),
            forks: Gauge::default(),
            halted: Gauge::default(),
            streams: Gauge::default(),
            log_bytes: Gauge::default(),
            hub_pushed: Counter::default(),
            hub_pulled: Counter::default(),
            hub_lag: Gauge::default(),
            hub_failing: Gauge::default(),
            hub_divergent: Gauge::default(),
            hub_refused: Gauge::default(),
            peers_unreachable: Gauge::default(),
            peers_divergent: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "build",
            "This build of spool",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let counters = [
            (
                "appended_events",
                "Events written by append requests (a repeated idempotency key writes none)",
                &m.events,
            ),
            (
                "append_requests",
                "Append requests acknowledged",
                &m.requests,
            ),
            ("refused_requests", "Requests refused as invalid", &m.refused),
            ("busy_requests", "Requests answered busy (503)", &m.busy),
            (
                "writer_commits",
                "Durable group commits since the log was opened",
                &m.commits,
            ),
            (
                "writer_events",
                "Events written by those commits (their ratio is the mean commit batch)",
                &m.committed_events,
            ),
            (
                "panics",
                "Panics (bugs) in any thread since the daemon started; each is logged with its place",
                &m.panics,
            ),
            (
                "hub_pushed_events",
                "Events pushed to the hub that it lacked",
                &m.hub_pushed,
            ),
            (
                "hub_pulled_events",
                "Events read from the hub",
                &m.hub_pulled,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
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
        let gauges = [
            (
                "projection_lag_events",
                "Events the SQLite projection is behind the log",
                &m.lag,
            ),
            (
                "unreadable_events",
                "Events of kinds or versions this build cannot read, kept and skipped by the projection (upgrade spool)",
                &m.unreadable,
            ),
            (
                "waiting_events",
                "Shipped events waiting for their predecessor or deps",
                &m.waiting,
            ),
            ("forks", "Forks kept as evidence", &m.forks),
            (
                "halted",
                "1 when this node's own writes are stopped (a fork of its own origin)",
                &m.halted,
            ),
            ("event_streams", "Event streams (SSE) open now", &m.streams),
            ("log_bytes", "Size of the log file", &m.log_bytes),
            (
                "hub_lag_events",
                "Events the hub held that this node lacked, at the last hub sync",
                &m.hub_lag,
            ),
            (
                "hub_failing",
                "1 when the last attempt to sync with the hub failed (status says why)",
                &m.hub_failing,
            ),
            (
                "hub_divergent_nodes",
                "Nodes whose projection of the same events has another digest (a divergence)",
                &m.hub_divergent,
            ),
            (
                "hub_refused_origins",
                "Origins whose pull from the hub was refused at the last hub sync (status says why)",
                &m.hub_refused,
            ),
            (
                "peers_unreachable",
                "Peers of [[peers]] whose last attempt failed (status says why)",
                &m.peers_unreachable,
            ),
            (
                "peers_divergent",
                "Peers whose projection of the same events has another digest (a divergence)",
                &m.peers_divergent,
            ),
        ];
        for (name, help, gauge) in gauges {
            registry.register(name, help, gauge.clone());
        }
        Metrics { registry, ..m }
    }
}

/// A text format of the exposition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: what Prometheus and most tools parse by default.
    Classic,
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics only when it names it.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Classic,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

impl Metrics {
    /// A request of `events` events answered, `written` of them new (the others repeated an
    /// idempotency key), `latency` after it arrived.
    pub fn appended(&self, written: u64, events: u64, latency: Duration) {
        self.events.inc_by(written);
        self.requests.inc();
        self.batch_events.observe(events as f64);
        self.ack_seconds.observe(latency.as_secs_f64());
    }

    /// The exposition in `format`, with what is read at scrape time as of `now`.
    pub fn render(&self, now: &Now, format: Format) -> String {
        // Counters read from elsewhere only grow: each scrape adds what is new.
        let catch_up = |counter: &Counter, value: u64| {
            counter.inc_by(value.saturating_sub(counter.get()));
        };
        catch_up(&self.commits, now.writer.commits);
        catch_up(&self.committed_events, now.writer.events);
        catch_up(&self.panics, now.panics);
        let gauge = |gauge: &Gauge, value: u64| {
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        };
        gauge(&self.lag, now.lag);
        gauge(&self.unreadable, now.unreadable);
        gauge(&self.waiting, now.waiting);
        gauge(&self.forks, now.forks);
        gauge(&self.halted, u64::from(now.halted));
        gauge(&self.streams, now.streams);
        gauge(&self.log_bytes, now.log_bytes);
        if let Some(hub) = &now.hub {
            catch_up(&self.hub_pushed, hub.pushed);
            catch_up(&self.hub_pulled, hub.pulled);
            gauge(&self.hub_lag, hub.lag_events);
            gauge(&self.hub_failing, u64::from(hub.last_error.is_some()));
            gauge(&self.hub_divergent, hub.divergent.len() as u64);
            let refused = hub.origins.values().filter(|o| o.refused.is_some()).count();
            gauge(&self.hub_refused, refused as u64);
        }
        {
            // A peer not tried yet is not counted.
            let unreachable = now
                .peers
                .iter()
                .filter(|p| !p.reachable && p.last_error.is_some())
                .count();
            gauge(&self.peers_unreachable, unreachable as u64);
            let divergent = now.peers.iter().filter(|p| p.divergent).count();
            gauge(&self.peers_divergent, divergent as u64);
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        match format {
            Format::OpenMetrics => out,
            Format::Classic => classic(&out),
        }
    }
}

/// The classic text format of an OpenMetrics exposition: a counter's and an info's `# HELP`
/// and `# TYPE` name the family as its samples do (`_total`, `_info`; an info is a gauge),
/// units and `# EOF` go.
fn classic(openmetrics: &str) -> String {
    let mut families: Vec<(&str, &str)> = Vec::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                families.push((name, kind));
            }
        }
    }
    let suffix = |name: &str| match families.iter().find(|(n, _)| *n == name) {
        Some((_, "counter")) => "_total",
        Some((_, "info")) => "_info",
        _ => "",
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            let tail = match (prefix, tail) {
                (&"# TYPE ", "info") => "gauge",
                (_, tail) => tail,
            };
            Some(format!("{prefix}{name}{} {tail}", suffix(name)))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}
