//! `spool sync hub`: push this node's events to the fleet's Postgres hub and pull what it lacks,
//! once or (without `--once`) again whenever another node pushes, until interrupted.

use std::io::{IsTerminal as _, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use spool::home::Home;
use spool::sync::hub::{Hub, HubSummary};

use super::commands::{json_line, stdout};
use super::Usage;

/// Without a notification, a pull this often anyway: a missed one only delays.
const PULL_EVERY: Duration = Duration::from_secs(30);
/// Waits between reconnections grow to this.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

pub fn run(dir: &Path, url: &str, once: bool, as_json: bool) -> anyhow::Result<ExitCode> {
    let home = Home::open(dir)?;
    if dir.join(spool::serve::SOCKET).exists()
        && std::os::unix::net::UnixStream::connect(dir.join(spool::serve::SOCKET)).is_ok()
    {
        return Err(Usage(
            "`spool serve` holds this node's log: stop it to sync with the hub from the command line"
                .into(),
        )
        .into());
    }
    let log = home.open_log()?;
    let key = home.node_key()?;
    let projection = home.projection_path();
    let mut out = stdout();
    let mut backoff = Duration::from_secs(1);
    loop {
        let round = (|| -> anyhow::Result<HubSummary> {
            let mut hub = Hub::open(url)?;
            let summary = sync_once(&log, key.as_ref(), &projection, &mut hub)?;
            report(&mut out, &summary, as_json)?;
            if !once {
                backoff = Duration::from_secs(1);
                loop {
                    // Woken by a push, or after PULL_EVERY; then push and pull again.
                    hub.wait(PULL_EVERY)?;
                    let summary = sync_once(&log, key.as_ref(), &projection, &mut hub)?;
                    if summary.pushed + summary.pulled > 0 || summary.refused().next().is_some() {
                        report(&mut out, &summary, as_json)?;
                    }
                }
            }
            Ok(summary)
        })();
        match round {
            Ok(summary) if once => {
                return Ok(match summary.refused().next() {
                    None => ExitCode::SUCCESS,
                    Some(_) => ExitCode::from(2),
                })
            }
            Ok(_) => {}
            Err(e) if once => return Err(e),
            Err(e) => {
                eprintln!("spool: {e}; trying again in {} s", backoff.as_secs());
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn sync_once(
    log: &spool::log::Log,
    key: Option<&spool::identity::NodeKey>,
    projection: &Path,
    hub: &mut Hub,
) -> anyhow::Result<HubSummary> {
    let bar = indicatif::ProgressBar::new_spinner();
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let summary = hub.sync(log, key, |s| {
        bar.set_message(format!("hub: {} pushed, {} pulled", s.pushed, s.pulled));
        bar.tick();
    });
    bar.finish_and_clear();
    let mut summary = summary?;
    if let Err(problem) = spool::node::catch_up(log, projection) {
        eprintln!("spool: warning: the projection was not updated ({problem})");
    }
    // The projection's digest beside the events it covers, and who holds the same events in
    // other tables.
    if let Some((covers, digest)) = spool::jobs::projection_digest(projection)? {
        summary.divergent = hub.compare(log.origin(), &covers, digest)?;
    }
    Ok(summary)
}

fn report(out: &mut impl Write, summary: &HubSummary, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        json_line(out, summary)?;
    } else {
        writeln!(
            out,
            "hub: pushed {} events ({} there already, {} forks kept), pulled {}: {} applied, {} released, {} waiting",
            summary.pushed,
            summary.already_there,
            summary.forks,
            summary.pulled,
            summary.applied,
            summary.released,
            summary.waiting
        )?;
        for (origin, o) in &summary.origins {
            writeln!(
                out,
                "  origin {origin}: the hub holds seq {}, this node {} ({} behind); {} pushed, {} pulled",
                o.hub_holds, o.held, o.lag, o.pushed, o.pulled
            )?;
        }
        for (origin, why) in summary.refused() {
            writeln!(out, "REFUSED origin {origin}: {why}")?;
        }
        for origin in &summary.divergent {
            writeln!(
                out,
                "DIVERGED node {origin} published a projection of the same events with another digest"
            )?;
        }
    }
    out.flush()?;
    Ok(())
}
