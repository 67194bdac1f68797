//! What a node does for a client, written once: the [`Node`] trait, its implementation on the
//! log itself ([`Local`]), and the functions the daemon answers with. The CLI runs every command
//! against a `dyn Node`: [`Local`] when it holds the log, the socket client
//! (`serve::client::Remote`) when `spool serve` does; both answer with the same [`wire`] types.
//!
//! Invariant: an answer's fields are computed here, once, for the CLI and the daemon alike; a
//! failure is a [`Problem`] with its stable code.
//!
//! Boundary: no HTTP and no printing.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use crate::home::{Home, HomeError};
use crate::input::AppendRequest;
use crate::jobs;
use crate::log::Log;
use crate::project;
use crate::project::postgres::Postgres;
use crate::project::sqlite::Sqlite;
use crate::sync::{file as shipping, Selection};
use crate::wire::{
    Ack, BackfillSummary, ExportRequest, Fork, Head, Heads, IngestSummary, LogPage, LogQuery,
    NodeName, PostgresRequest, Problem, ProjectSummary, RebuildSummary, Status, VerifyReport,
};

/// A job's progress: events done, events in all.
pub type ProgressFn<'a> = &'a mut dyn FnMut(u64, u64);

/// What a node does for a client: one method per command of the CLI, one endpoint each of the
/// daemon's API.
pub trait Node {
    /// Appends a batch, all or nothing; each acknowledgement once durable.
    fn append(&mut self, requests: Vec<AppendRequest>) -> Result<Vec<Ack>, Problem>;
    fn status(&mut self) -> Result<Status, Problem>;
    fn heads(&mut self) -> Result<Heads, Problem>;
    /// One page of events (at most [`LOG_PAGE_EVENTS`]).
    fn log(&mut self, query: &LogQuery) -> Result<LogPage, Problem>;
    fn verify(&mut self) -> Result<VerifyReport, Problem>;
    /// Writes an export file to `out`; returns its event count.
    fn export(&mut self, request: &ExportRequest, out: &mut dyn Write) -> Result<u64, Problem>;
    fn ingest(&mut self, input: Box<dyn Read + Send>) -> Result<IngestSummary, Problem>;
    fn rebuild(
        &mut self,
        request: &crate::wire::RebuildRequest,
        progress: ProgressFn,
    ) -> Result<RebuildSummary, Problem>;
    fn project_postgres(
        &mut self,
        request: &PostgresRequest,
        progress: ProgressFn,
    ) -> Result<ProjectSummary, Problem>;
    fn backfill_postgres(
        &mut self,
        request: &PostgresRequest,
        progress: ProgressFn,
    ) -> Result<BackfillSummary, Problem>;
    /// The node's projection file, holding at least every event the log held when asked.
    fn projection(&mut self) -> Result<PathBuf, Problem>;
}

/// Most events in one page of [`Node::log`].
pub const LOG_PAGE_EVENTS: usize = 1_000;

/// The node's status as the log shows it; `unreadable` comes from the projection's keeper.
pub fn status(
    log: &Log,
    name: &NodeName,
    home: &std::path::Path,
    unreadable: u64,
) -> Result<Status, Problem> {
    let stats = log.stats()?;
    let reader = log.read()?;
    let refused = reader.refused()?;
    Ok(Status {
        node: name.clone(),
        home: std::path::absolute(home)
            .unwrap_or_else(|_| home.to_owned())
            .display()
            .to_string(),
        events: stats.events,
        file_bytes: stats.file_bytes,
        heads: stats
            .heads
            .iter()
            .map(|h| Head {
                origin: h.origin,
                seq: h.seq,
                hash: h.hash,
                local: h.origin == log.origin(),
            })
            .collect(),
        waiting: reader.pending()?,
        forks: reader
            .forks()?
            .into_iter()
            .map(|f| Fork {
                id: f.id,
                refused: f.refused,
                held: f.held,
            })
            .collect(),
        refused: refused
            .iter()
            .take(crate::wire::STATUS_REFUSED_MAX)
            .map(|e| crate::wire::RefusedEvent {
                id: e.id,
                hash: e.hash,
                reason: e.reason.clone(),
            })
            .collect(),
        refused_count: refused.len() as u64,
        fleet: reader.fleet(log.fleet_root())?.as_ref().map(Into::into),
        halted: reader.halted()?,
        unreadable,
        daemon: None,
    })
}

pub fn heads(log: &Log) -> Result<Heads, Problem> {
    Ok(log
        .read()?
        .heads()?
        .iter()
        .map(|h| (h.origin, h.seq))
        .collect())
}

pub fn log_page(log: &Log, query: &LogQuery) -> Result<LogPage, Problem> {
    let limit = query
        .limit
        .map_or(LOG_PAGE_EVENTS, |l| (l as usize).clamp(1, LOG_PAGE_EVENTS));
    let page = log.read()?.scan(query.after, limit, &query.filter())?;
    Ok(LogPage {
        events: page.records.iter().map(Into::into).collect(),
        next: page.last_examined,
    })
}

pub fn verify(log: &Log) -> Result<VerifyReport, Problem> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();
    let report = log.verify(threads)?;
    Ok(VerifyReport::of(&report, started.elapsed().as_secs_f64()))
}

/// The selection an export request names; a refusal names its field.
pub fn selection(request: &ExportRequest) -> Result<Selection, Problem> {
    Selection::parse(&request.origins, request.since.as_deref()).map_err(|(part, _)| {
        use crate::wire::Code::InvalidField;
        match part {
            "origin" => {
                Problem::new(InvalidField, "origins: each must be 32 hex digits").field("origins")
            }
            _ => Problem::new(
                InvalidField,
                "since: must be a version vector as `spool heads --json` prints it",
            )
            .field("since"),
        }
    })
}

pub fn export(
    log: &Log,
    selection: &Selection,
    signer: Option<&crate::identity::NodeKey>,
    out: &mut dyn Write,
) -> Result<u64, Problem> {
    let reader = log.read()?;
    let (count, _) = shipping::export(&reader, selection, out, signer, |_| {})
        .map_err(|e| Problem::new(crate::wire::Code::Storage, e.to_string()))?;
    Ok(count)
}

pub fn ingest(log: &Log, input: impl Read + Send) -> Result<IngestSummary, Problem> {
    let summary = shipping::ingest(log, input, |_| {})?;
    Ok(IngestSummary::from(&summary))
}

/// Where a rebuild request may write; any refusal is `path_refused`, naming `into`.
pub fn rebuild_target(
    places: &jobs::Places,
    request: &crate::wire::RebuildRequest,
) -> Result<jobs::RebuildTarget, Problem> {
    places
        .rebuild_target(request.into.as_deref())
        .map_err(|e| Problem::new(crate::wire::Code::PathRefused, e.to_string()).field("into"))
}

/// The node with its log open in this process.
pub struct Local {
    home: Home,
    log: Log,
    /// The Postgres connection of the last project job, kept for the next pass (`--follow`).
    postgres: Option<(String, Postgres)>,
}

/// Brings the projection at `path` up to the log's end (made, or rebuilt from an older schema,
/// as needed).
pub fn catch_up(log: &Log, path: &std::path::Path) -> Result<(), Problem> {
    let sqlite = |e: &dyn std::fmt::Display| {
        Problem::new(
            crate::wire::Code::Sqlite,
            format!("the projection: {e}; `spool rebuild sqlite` rebuilds it"),
        )
    };
    let reader = log.read()?;
    let mut target = jobs::open_projection(&reader, path).map_err(|e| sqlite(&e))?;
    project::catch_up(&reader, &mut target, |_| {}).map_err(|e| sqlite(&e))?;
    Ok(())
}

impl Local {
    pub fn open(home: Home) -> Result<Local, HomeError> {
        let log = home.open_log()?;
        Ok(Local {
            home,
            log,
            postgres: None,
        })
    }

    /// Brings the node's projection up to the log's end.
    pub fn catch_up(&self) -> Result<(), Problem> {
        catch_up(&self.log, &self.home.projection_path())
    }

    /// Events the node's projection skipped as unreadable (0 when it has none yet).
    fn unreadable(&self) -> u64 {
        let path = self.home.projection_path();
        if !path.exists() {
            return 0;
        }
        Sqlite::open_read_only(&path)
            .and_then(|db| db.unreadable())
            .unwrap_or(0)
    }

    fn name(&self) -> NodeName {
        NodeName {
            id: self.home.origin(),
            label: self.home.label().to_owned(),
        }
    }
}

/// Appends `requests` as one durable commit, all or nothing.
pub fn append(log: &Log, requests: Vec<AppendRequest>) -> Result<Vec<Ack>, Problem> {
    let mut events = Vec::with_capacity(requests.len());
    for (i, request) in requests.into_iter().enumerate() {
        let index = Some(i);
        events.push(crate::input::new_event(request).map_err(|e| Problem::from(&e).index(index))?);
    }
    let appended = log.append(events)?;
    Ok(appended.iter().map(Into::into).collect())
}

impl Node for Local {
    fn append(&mut self, requests: Vec<AppendRequest>) -> Result<Vec<Ack>, Problem> {
        append(&self.log, requests)
    }

    fn status(&mut self) -> Result<Status, Problem> {
        status(&self.log, &self.name(), self.home.dir(), self.unreadable())
    }

    fn heads(&mut self) -> Result<Heads, Problem> {
        heads(&self.log)
    }

    fn log(&mut self, query: &LogQuery) -> Result<LogPage, Problem> {
        log_page(&self.log, query)
    }

    fn verify(&mut self) -> Result<VerifyReport, Problem> {
        verify(&self.log)
    }

    fn export(&mut self, request: &ExportRequest, out: &mut dyn Write) -> Result<u64, Problem> {
        // Own heads are signed with the node's key (a home made before keys has none).
        let key = self
            .home
            .node_key()
            .map_err(|e| Problem::new(crate::wire::Code::File, e.to_string()))?;
        export(&self.log, &selection(request)?, key.as_ref(), out)
    }

    fn ingest(&mut self, input: Box<dyn Read + Send>) -> Result<IngestSummary, Problem> {
        ingest(&self.log, input)
    }

    fn rebuild(
        &mut self,
        request: &crate::wire::RebuildRequest,
        progress: ProgressFn,
    ) -> Result<RebuildSummary, Problem> {
        let until = jobs::as_of(request.as_of.as_deref())?;
        let target = rebuild_target(&self.home.places(), request)?;
        let reader = self.log.read()?;
        let (partial, summary) = jobs::rebuild(&reader, &target, until, progress)?;
        jobs::swap_in(partial, &target)?;
        Ok(summary)
    }

    fn project_postgres(
        &mut self,
        request: &PostgresRequest,
        progress: ProgressFn,
    ) -> Result<ProjectSummary, Problem> {
        let job = jobs::PostgresJob::of(request, self.home.origin());
        let target = match &mut self.postgres {
            Some((url, target)) if *url == request.url => target,
            held => {
                &mut held
                    .insert((request.url.clone(), jobs::postgres_target(&job)?))
                    .1
            }
        };
        Ok(jobs::project_postgres(&self.log.read()?, target, progress)?)
    }

    fn backfill_postgres(
        &mut self,
        request: &PostgresRequest,
        progress: ProgressFn,
    ) -> Result<BackfillSummary, Problem> {
        let job = jobs::PostgresJob::of(request, self.home.origin());
        Ok(jobs::backfill_postgres(&self.log.read()?, &job, progress)?)
    }

    fn projection(&mut self) -> Result<PathBuf, Problem> {
        self.catch_up()?;
        Ok(self.home.projection_path())
    }
}
