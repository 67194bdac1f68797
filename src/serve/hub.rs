//! The daemon's sync with the fleet's Postgres hub (`[hub] url`): a thread that pushes and
//! pulls (`sync::hub`) when another node pushes (LISTEN), when this node commits, and at least
//! every [`PULL_EVERY`]; reconnects with backoff; reports in `status` and `/metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::App;
use crate::sync::hub::{Hub, HubSummary};

/// A round at least this often, notification or not: a missed one only delays.
pub const PULL_EVERY: Duration = Duration::from_secs(30);
/// The projection's digest is published again at least this often, the vector unchanged.
const PUBLISH_EVERY: Duration = Duration::from_secs(60);
/// Waits between reconnections grow to this.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often the thread looks at `stopping` and at new commits while it waits for a
/// notification: what a new own event may wait before its push starts.
const TICK: Duration = Duration::from_millis(100);

pub fn keep_synced(app: &Arc<App>, url: &str) {
    let stopping = app.stopping.subscribe();
    let mut committed = app.committed.subscribe();
    let stopped = || *stopping.borrow();
    let mut backoff = Duration::from_secs(1);
    while !stopped() {
        let mut hub = match Hub::open(url) {
            Ok(hub) => hub,
            Err(e) => {
                failed(app, &e.to_string());
                let until = Instant::now() + backoff;
                while Instant::now() < until && !stopped() {
                    std::thread::sleep(TICK.min(until - Instant::now()));
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = Duration::from_secs(1);
        let mut due = true;
        let mut last = Instant::now();
        let mut published: Option<(crate::sync::Vector, Instant)> = None;
        loop {
            if stopped() {
                return;
            }
            if due || last.elapsed() >= PULL_EVERY {
                committed.mark_unchanged();
                match hub.sync(&app.log, app.key.as_deref(), |_| {}) {
                    Ok(summary) => {
                        synced(app, &summary);
                        if let Err(e) = compare(app, &mut hub, &mut published) {
                            failed(app, &e);
                            break;
                        }
                    }
                    Err(e) => {
                        failed(app, &e.to_string());
                        break; // Reconnect.
                    }
                }
                (due, last) = (false, Instant::now());
            }
            match hub.wait(TICK) {
                Ok(woke) => due |= woke,
                Err(e) => {
                    failed(app, &e.to_string());
                    break;
                }
            }
            // This node wrote (or took) something: push it.
            due |= committed.has_changed().unwrap_or(false);
        }
    }
}

fn synced(app: &App, summary: &HubSummary) {
    if summary.applied + summary.released > 0 {
        // The live projector and event streams follow commits.
        app.committed.send_replace(());
    }
    let Some(status) = &app.hub else { return };
    let mut status = status.lock().unwrap_or_else(|e| e.into_inner());
    status.syncs += 1;
    status.last_sync_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64);
    status.pushed += summary.pushed;
    status.pulled += summary.pulled;
    status.applied += summary.applied + summary.released;
    for (origin, now) in &summary.origins {
        let kept = status.origins.entry(*origin).or_default();
        let (pushed, pulled) = (kept.pushed + now.pushed, kept.pulled + now.pulled);
        *kept = now.clone();
        (kept.pushed, kept.pulled) = (pushed, pulled);
    }
    status.lag_events = status.origins.values().map(|o| o.lag).sum();
    status.last_error = None;
}

/// Publishes the projection's digest beside the events it covers, when they changed (or a
/// minute passed), and records who diverges.
fn compare(
    app: &App,
    hub: &mut Hub,
    published: &mut Option<(crate::sync::Vector, Instant)>,
) -> Result<(), String> {
    let Some((covers, digest)) =
        crate::jobs::projection_digest(&app.projection).map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    if let Some((vector, at)) = published {
        if *vector == covers && at.elapsed() < PUBLISH_EVERY {
            return Ok(());
        }
    }
    let divergent = hub
        .compare(app.name.id, &covers, digest)
        .map_err(|e| e.to_string())?;
    *published = Some((covers, Instant::now()));
    if let Some(status) = &app.hub {
        status.lock().unwrap_or_else(|e| e.into_inner()).divergent = divergent;
    }
    Ok(())
}

fn failed(app: &App, error: &str) {
    tracing::warn!(%error, "hub sync");
    if let Some(status) = &app.hub {
        status.lock().unwrap_or_else(|e| e.into_inner()).last_error = Some(error.to_owned());
    }
}
