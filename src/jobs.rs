//! The long jobs over a node's log: rebuilding a SQLite projection, one pass of projecting into
//! Postgres, and a Postgres backfill. The CLI runs them on the log file it opened; `spool serve`
//! runs the same functions for a client while it holds the log. Each reports progress as
//! (events done, events in all) and ends with a JSON summary, which the CLI prints as text or,
//! with `--json`, as it is.
//!
//! Boundary: knows the log's reader and the projection targets; nothing of printing or HTTP.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::event::Origin;
use crate::log::{LogError, Reader};
use crate::project::postgres::{self, Postgres, PostgresError};
use crate::project::sqlite::{Durability, Sqlite, SqliteError};
use crate::project::{self, ReplayError, Target, Until};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("--as-of {text:?}: neither a position nor an RFC 3339 time ({problem})")]
    AsOf { text: String, problem: String },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("the SQLite projection: {0}")]
    Sqlite(#[from] ReplayError<SqliteError>),
    #[error("Postgres: {0}")]
    Postgres(#[from] ReplayError<PostgresError>),
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<SqliteError> for JobError {
    fn from(e: SqliteError) -> Self {
        JobError::Sqlite(ReplayError::Target(e))
    }
}

impl From<PostgresError> for JobError {
    fn from(e: PostgresError) -> Self {
        JobError::Postgres(ReplayError::Target(e))
    }
}

/// Reads `--as-of`: a position, or an RFC 3339 time (the state at the last event before it).
pub fn as_of(text: Option<&str>) -> Result<Until, JobError> {
    let Some(text) = text else {
        return Ok(Until::default());
    };
    if let Ok(position) = text.parse::<u64>() {
        return Ok(Until {
            position: Some(position),
            time_ms: None,
        });
    }
    let time = humantime::parse_rfc3339_weak(text).map_err(|e| JobError::AsOf {
        text: text.to_owned(),
        problem: e.to_string(),
    })?;
    let ms = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    Ok(Until {
        position: None,
        time_ms: Some(ms),
    })
}

/// Rebuilds a SQLite projection of the log up to `until` into a new file beside `path`, and
/// returns that file; [`swap_in`] then puts it in place. Nothing at `path` changes until then.
pub fn rebuild(
    reader: &Reader,
    path: &Path,
    until: Until,
    mut progress: impl FnMut(u64, u64),
) -> Result<(PathBuf, Value), JobError> {
    let partial = path.with_extension("rebuilding");
    let _ = std::fs::remove_file(&partial);
    let end = reader.last_position()?;
    let last = until.position.map_or(end, |p| p.min(end));
    let started = Instant::now();
    let mut target = Sqlite::open(&partial, Durability::Rebuild)?;
    let applied = project::replay(reader, &mut target, 0, until, |p| progress(p, last))?;
    target.finish()?;
    let seconds = started.elapsed().as_secs_f64();
    let summary = json!({
        "path": path, "applied": applied, "position": last, "seconds": seconds,
        "events_per_second": applied as f64 / seconds.max(1e-9),
    });
    Ok((partial, summary))
}

/// Moves a rebuilt projection over `path` (one rename) and removes the old file's WAL.
pub fn swap_in(partial: &Path, path: &Path) -> Result<(), JobError> {
    std::fs::rename(partial, path).map_err(|source| JobError::File {
        what: "moving the rebuilt projection to",
        path: path.to_owned(),
        source,
    })?;
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(())
}

/// Times a projection retries a batch that a concurrent projector's transaction deadlocked.
const DEADLOCK_RETRIES: u32 = 20;

/// How a Postgres job connects and how much it holds in memory.
pub struct PostgresJob<'a> {
    pub url: &'a str,
    pub node: Origin,
    pub held_bytes_max: Option<usize>,
}

/// The connection `spool project postgres` writes through (the schema made if absent); one
/// serves every pass of `--follow`.
pub fn postgres_target(job: &PostgresJob) -> Result<Postgres, JobError> {
    let mut target = Postgres::connect(job.url, job.node)?;
    if let Some(bytes) = job.held_bytes_max {
        target.hold_at_most(bytes);
    }
    Ok(target)
}

/// One pass of `spool project postgres`: brings the database up to the log's end from this
/// node's checkpoint there, retrying a batch that deadlocked with another projector.
pub fn project_postgres(
    reader: &Reader,
    target: &mut Postgres,
    mut progress: impl FnMut(u64, u64),
) -> Result<Value, JobError> {
    let last = reader.last_position()?;
    let started = Instant::now();
    let mut retries = 0;
    let applied = loop {
        let (from, _) = Target::checkpoint(target)?;
        let result = project::catch_up(reader, target, |p| {
            progress(p.saturating_sub(from), last.saturating_sub(from))
        });
        match result {
            Err(ReplayError::Target(e))
                if postgres::is_retryable(&e) && retries < DEADLOCK_RETRIES =>
            {
                retries += 1;
                std::thread::sleep(Duration::from_millis(20 * u64::from(retries)));
            }
            other => break other?,
        }
    };
    let (position, _, events) = target.checkpoint()?;
    Ok(
        json!({"applied": applied, "position": position, "events": events,
              "seconds": started.elapsed().as_secs_f64(), "retries": retries}),
    )
}

/// `spool backfill postgres`: fills shadow tables up to a pinned position (resuming an
/// interrupted backfill of this node), catches up with the tail and swaps them in at once.
pub fn backfill_postgres(
    reader: &Reader,
    job: &PostgresJob,
    mut progress: impl FnMut(u64, u64),
) -> Result<Value, JobError> {
    let started = Instant::now();
    let (mut target, pinned) = Postgres::backfill(job.url, job.node, reader.last_position()?)?;
    if let Some(bytes) = job.held_bytes_max {
        target.hold_at_most(bytes);
    }
    let (from, _, _) = target.checkpoint()?;
    let until = Until {
        position: Some(pinned),
        time_ms: None,
    };
    let copied = project::resume(reader, &mut target, until, |p| {
        progress(p.saturating_sub(from), pinned.saturating_sub(from))
    })?;
    // Events appended since the pin, then the swap.
    let tail = project::catch_up(reader, &mut target, |_| {})?;
    let (position, _, events) = target.checkpoint()?;
    target.swap()?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(
        json!({"applied": copied + tail, "resumed_from": from, "pinned": pinned, "tail": tail,
              "position": position, "events": events, "seconds": seconds,
              "events_per_second": (copied + tail) as f64 / seconds.max(1e-9)}),
    )
}
