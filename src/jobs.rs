//! The long jobs over a node's log: rebuilding a SQLite projection, one pass of projecting into
//! Postgres, and a Postgres backfill. The CLI runs them on the log file it opened; `spool serve`
//! runs the same functions for a client while it holds the log. Each reports progress as
//! (events done, events in all) and ends with a JSON summary, which the CLI prints as text or,
//! with `--json`, as it is.
//!
//! Boundary: knows the log's reader and the projection targets; nothing of printing or HTTP.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::event::Origin;
use crate::files::{self, Existing, FileError, NewFile};
use crate::home;
use crate::log::{LogError, Reader};
use crate::project::postgres::{self, Postgres, PostgresError};
use crate::project::sqlite::{self, Durability, Sqlite, SqliteError};
use crate::project::{self, ReplayError, Target, Until};
use crate::wire::{BackfillSummary, ProjectSummary, RebuildSummary};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("--as-of {}: neither a position nor an RFC 3339 time ({problem})", crate::input::shown(.text))]
    AsOf { text: String, problem: String },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("the SQLite projection: {0}")]
    Sqlite(#[from] ReplayError<SqliteError>),
    #[error("Postgres: {0}")]
    Postgres(#[from] ReplayError<PostgresError>),
    #[error(transparent)]
    File(#[from] FileError),
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

/// Where jobs may write: the node's home (never over its own files) and a folder the config
/// names.
#[derive(Clone, Debug)]
pub struct Places {
    pub home: PathBuf,
    /// `[jobs] dir` of `spool.toml`.
    pub dir: Option<PathBuf>,
}

/// The files of a home that no job may write, by name: the log, the live projection (a rebuild
/// of it leaves `into` out), the identity and its key, config, token and socket, and any file whose name
/// begins with one of theirs (their journals and WAL files).
const HOME_FILES: [&str; 7] = [
    home::LOG_FILE,
    PROJECTION,
    home::NODE_FILE,
    home::KEY_FILE,
    home::CONFIG_FILE,
    home::SERVE_TOKEN,
    crate::serve::SOCKET,
];

/// A rebuild's target: the node's live projection (replaced whole), or a new file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RebuildTarget {
    Live(PathBuf),
    New(PathBuf),
}

impl RebuildTarget {
    pub fn path(&self) -> &Path {
        match self {
            RebuildTarget::Live(path) | RebuildTarget::New(path) => path,
        }
    }
}

/// The node's live SQLite projection, by name in its home.
pub const PROJECTION: &str = "projection.sqlite";

impl Places {
    /// The node's live projection.
    pub fn projection(&self) -> PathBuf {
        self.home.join(PROJECTION)
    }

    /// The target of `spool rebuild sqlite [--into PATH]`: without `into`, the node's projection;
    /// with it, a new file inside the home or `[jobs] dir`, never a home file by any spelling,
    /// a link, or a file that exists. The refusal names the rule.
    pub fn rebuild_target(&self, into: Option<&Path>) -> Result<RebuildTarget, JobError> {
        let Some(into) = into else {
            return Ok(RebuildTarget::Live(self.projection()));
        };
        let refused = |rule| {
            JobError::File(FileError::Refused {
                path: into.to_owned(),
                rule,
            })
        };
        if !into.is_absolute() {
            return Err(refused("`into` must be an absolute path"));
        }
        let (Some(parent), Some(name)) = (into.parent(), into.file_name()) else {
            return Err(refused("names no file"));
        };
        // Every spelling of a folder (`..`, links) resolved to one before it is compared.
        let canonical = |path: &Path| {
            std::fs::canonicalize(path).map_err(|source| {
                JobError::File(FileError::Io {
                    what: "resolving",
                    path: path.to_owned(),
                    source,
                })
            })
        };
        let folder = canonical(parent)?;
        let home = canonical(&self.home)?;
        let allowed = match &self.dir {
            Some(dir) => folder.starts_with(&home) || folder.starts_with(canonical(dir)?),
            None => folder.starts_with(&home),
        };
        if folder == home {
            let name = name.to_string_lossy();
            if name.starts_with(home::LOG_FILE) {
                return Err(refused("is the node's log; no job writes it"));
            }
            if name.starts_with(PROJECTION) {
                return Err(refused(
                    "is the node's live projection; leave `into` out to rebuild it",
                ));
            }
            if HOME_FILES.iter().any(|own| name.starts_with(own)) {
                return Err(refused("is one of the home's own files; no job writes it"));
            }
        }
        if !allowed {
            return Err(refused(
                "is outside the node's home and `[jobs] dir`; a job writes only there",
            ));
        }
        let target = folder.join(name);
        files::check_target(&target, Existing::Refuse)?;
        Ok(RebuildTarget::New(target))
    }
}

/// Rebuilds a SQLite projection of the log up to `until` into a new file beside its target,
/// and returns that file; [`swap_in`] then puts it in place. Nothing at the target changes until
/// then, and a rebuild that fails (a full disk) removes its file.
pub fn rebuild(
    reader: &Reader,
    target: &RebuildTarget,
    until: Until,
    mut progress: impl FnMut(u64, u64),
) -> Result<(NewFile, RebuildSummary), JobError> {
    let existing = match target {
        RebuildTarget::Live(_) => Existing::ReplaceRegular,
        RebuildTarget::New(_) => Existing::Refuse,
    };
    let partial = NewFile::create(target.path(), existing)?;
    let end = reader.last_position()?;
    let last = until.position.map_or(end, |p| p.min(end));
    let started = Instant::now();
    let mut db = Sqlite::open(partial.temp_path(), Durability::Rebuild)?;
    let applied = project::replay(reader, &mut db, 0, until, |p| progress(p, last))?;
    db.finish()?;
    let seconds = started.elapsed().as_secs_f64();
    let summary = RebuildSummary {
        path: target.path().to_owned(),
        applied,
        position: last,
        seconds,
        events_per_second: applied as f64 / seconds.max(1e-9),
    };
    Ok((partial, summary))
}

/// The digest of the projection at `path` and the vector of the events it covers (its
/// checkpoint's heads), for the hub's divergence alarm; `None` when there is no projection yet,
/// or its checkpoint predates heads.
pub fn projection_digest(
    path: &Path,
) -> Result<Option<(crate::sync::Vector, crate::event::Hash)>, JobError> {
    DigestCache::default().get(path)
}

/// [`projection_digest`], computed again only when the events the projection covers changed
/// (equal events give equal tables, so the digest of the same covered events is the same):
/// reading the checkpoint is cheap, hashing every row is not.
#[derive(Default)]
pub struct DigestCache(std::sync::Mutex<Option<(crate::sync::Vector, crate::event::Hash)>>);

impl DigestCache {
    pub fn get(
        &self,
        path: &Path,
    ) -> Result<Option<(crate::sync::Vector, crate::event::Hash)>, JobError> {
        if !path.is_file() {
            return Ok(None);
        }
        let mut db = Sqlite::open_read_only(path)?;
        let Some(heads) = Target::checkpoint(&mut db)?.heads else {
            return Ok(None);
        };
        let covers = crate::sync::Vector(heads.into_iter().map(|(o, (seq, _))| (o, seq)).collect());
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((vector, digest)) = cached.as_ref() {
            if *vector == covers {
                return Ok(Some((covers, *digest)));
            }
        }
        let (digest, _) = db.digest()?;
        *cached = Some((covers.clone(), digest));
        Ok(Some((covers, digest)))
    }
}

/// Opens the node's live projection at `path` for catching up. A file of an older schema (made
/// by an older build) is rebuilt from the log first: the projection is derived, and its layout
/// or its stamps may have changed.
pub fn open_projection(reader: &Reader, path: &Path) -> Result<Sqlite, JobError> {
    match Sqlite::open(path, Durability::Live) {
        Err(SqliteError::OtherSchema { found, .. }) if found < sqlite::SCHEMA_VERSION => {
            tracing::info!(
                path = %path.display(),
                found,
                "the projection's schema is older than this build's; rebuilding it from the log"
            );
            let target = RebuildTarget::Live(path.to_owned());
            let (partial, _) = rebuild(reader, &target, Until::default(), |_, _| {})?;
            swap_in(partial, &target)?;
            Ok(Sqlite::open(path, Durability::Live)?)
        }
        other => Ok(other?),
    }
}

/// Puts a rebuilt projection at its target (one rename over the live projection, whose stale
/// WAL goes with it; a link for a new file, which fails if one appeared meanwhile).
pub fn swap_in(partial: NewFile, target: &RebuildTarget) -> Result<(), JobError> {
    partial.place()?;
    if let RebuildTarget::Live(path) = target {
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
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

impl<'a> PostgresJob<'a> {
    /// The job a client's request names, for `node`.
    pub fn of(request: &'a crate::wire::PostgresRequest, node: Origin) -> PostgresJob<'a> {
        PostgresJob {
            url: &request.url,
            node,
            held_bytes_max: request.held_bytes_max,
        }
    }
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
) -> Result<ProjectSummary, JobError> {
    let last = reader.last_position()?;
    let started = Instant::now();
    let mut retries = 0;
    let applied = loop {
        let from = Target::checkpoint(target)?.position;
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
    Ok(ProjectSummary {
        applied,
        position,
        events,
        seconds: started.elapsed().as_secs_f64(),
        retries: u64::from(retries),
    })
}

/// `spool backfill postgres`: fills shadow tables up to a pinned position (resuming an
/// interrupted backfill of this node), catches up with the tail and swaps them in at once.
pub fn backfill_postgres(
    reader: &Reader,
    job: &PostgresJob,
    mut progress: impl FnMut(u64, u64),
) -> Result<BackfillSummary, JobError> {
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
    Ok(BackfillSummary {
        applied: copied + tail,
        resumed_from: from,
        pinned,
        tail,
        position,
        events,
        seconds,
        events_per_second: (copied + tail) as f64 / seconds.max(1e-9),
    })
}
