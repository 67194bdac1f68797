//! `spool sync peer`: exchange events with a peer over TLS with the node keys, once or (without
//! `--once`) every 30 s until interrupted.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use spool::event::Origin;
use spool::home::Home;
use spool::serve::peer::{self, Link};
use spool::wire::PeerSummary;

use super::commands::{json_line, stdout};
use super::Usage;

/// Waits between failed attempts grow to this.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

pub fn run(
    dir: &Path,
    address: &str,
    origin: Option<&str>,
    once: bool,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let home = Home::open(dir)?;
    let pinned = origin
        .map(|o| Origin::from_hex(o).map_err(|_| Usage("--origin: must be 32 hex digits".into())))
        .transpose()?;
    if std::os::unix::net::UnixStream::connect(dir.join(spool::serve::SOCKET)).is_ok() {
        return Err(Usage(
            "`spool serve` holds this node's log: list the peer in `[[peers]]` of spool.toml \
             and the daemon keeps it synced"
                .into(),
        )
        .into());
    }
    let Some(key) = home.node_key()? else {
        return Err(Usage(
            "this home was made before node keys: it has no fleet, and peers need one".into(),
        )
        .into());
    };
    let log = Arc::new(home.open_log()?);
    let members = log.clone();
    let admit = peer::admit(move |k| peer::member_key(&members, k), pinned);
    let link = Link::new(address, &key, admit).map_err(anyhow::Error::msg)?;
    let mut out = stdout();
    let mut backoff = Duration::from_secs(1);
    loop {
        match peer::exchange(&log, Some(&key), &link) {
            Ok(mut summary) => {
                let projection = home.projection_path();
                if let Err(problem) = spool::node::catch_up(&log, &projection) {
                    eprintln!("spool: warning: the projection was not updated ({problem})");
                }
                if summary.sent + summary.received == 0 {
                    // The same events on both sides: the same tables, or a divergence.
                    let own = spool::jobs::projection_digest(&projection)?;
                    summary.divergent = peer::diverges(&link, own).map_err(anyhow::Error::msg)?;
                }
                report(&mut out, &summary, as_json)?;
                if once {
                    return Ok(match summary.refused {
                        None => ExitCode::SUCCESS,
                        Some(_) => ExitCode::from(2),
                    });
                }
                backoff = Duration::from_secs(1);
                std::thread::sleep(peer::EXCHANGE_EVERY);
            }
            Err(e) if once => return Err(anyhow::Error::msg(e)),
            Err(e) => {
                eprintln!("spool: {e}; trying again in {} s", backoff.as_secs());
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn report(out: &mut impl Write, summary: &PeerSummary, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        json_line(out, summary)?;
    } else {
        writeln!(
            out,
            "peer {}: sent {} events ({} applied there), received {}: {} applied, {} released, {} waiting",
            summary.peer.map(|o| o.to_hex()).unwrap_or_default(),
            summary.sent,
            summary.sent_applied,
            summary.received,
            summary.applied,
            summary.released,
            summary.waiting
        )?;
        if let Some(why) = &summary.refused {
            writeln!(out, "REFUSED: {why}")?;
        }
        if summary.divergent {
            writeln!(
                out,
                "DIVERGED: the peer's projection of the same events has another digest \
                 (`spool rebuild sqlite` on each, then compare again)"
            )?;
        }
    }
    out.flush()?;
    Ok(())
}
