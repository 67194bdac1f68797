//! `spool serve`: the node-resident writer. Local programs append through a JSON API on a Unix
//! socket in the node home (mode 0600) and, when asked, on a loopback HTTP address with a bearer
//! token. One writer (the log's) group-commits behind a bounded queue; when it is full a client
//! gets 503 with Retry-After instead of the daemon growing without bound. The daemon keeps the
//! SQLite projection live and reports its lag.
//!
//! Invariants: an answer listing an event is sent only once that event is durable; an invalid
//! request changes nothing (400 naming the field, 413 when too large); on SIGTERM or SIGINT the
//! daemon stops accepting, answers what it accepted, and closes the log (the writer drains)
//! before it exits.
//!
//! Boundary: the only module importing axum/hyper (with the CLI's client side in `client`); it
//! knows requests and the log, not SQL (the projection goes through `project`).

pub mod client;
mod metrics;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::input;
use crate::log::{Log, LogError};
use crate::priority;
use crate::project::sqlite::{Durability, Sqlite};
use crate::project::{self};
use crate::sync::Vector;

/// Largest request body (JSON), one event or a batch.
pub const REQUEST_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Largest ingest request (an export file; `spool ingest` sends larger files in pieces).
pub const INGEST_BYTES_MAX: usize = 64 * 1024 * 1024;
/// What a busy client is told to wait before retrying, in seconds.
const RETRY_AFTER_SECONDS: u64 = 1;
/// The socket's name in the node home.
pub const SOCKET: &str = "spool.sock";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("--http {0}: only a loopback address is served (127.0.0.0/8 or ::1)")]
    NotLoopback(std::net::SocketAddr),
}

/// Where and how the daemon listens.
pub struct Options {
    /// The Unix socket (in the node home).
    pub socket: PathBuf,
    /// A loopback HTTP address, and the bearer token it requires.
    pub http: Option<(std::net::SocketAddr, String)>,
    /// The SQLite projection kept live.
    pub projection: PathBuf,
}

struct App {
    log: Log,
    /// Set when the daemon stops: event streams end so the drain can finish.
    stopping: tokio::sync::watch::Sender<bool>,
    metrics: metrics::Metrics,
    /// Marked after every commit: the projector and the event streams follow it. A watch, so a
    /// commit that lands while a follower is busy is seen when it next waits.
    committed: tokio::sync::watch::Sender<()>,
    projection: PathBuf,
    /// The live projector's connection, held while it catches up; a rebuild of the node's
    /// projection takes it to close it before swapping the new file in.
    projection_db: std::sync::Mutex<Option<Sqlite>>,
    /// The projection's position, for the lag.
    projected: std::sync::atomic::AtomicU64,
}

/// Runs the daemon until SIGTERM or SIGINT; returns once the log is closed.
pub fn run(log: Log, options: Options) -> Result<(), ServeError> {
    if let Some((addr, _)) = &options.http {
        if !addr.ip().is_loopback() {
            return Err(ServeError::NotLoopback(*addr));
        }
    }
    no_huge_pages();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("spool-serve")
        .build()?;
    let app = Arc::new(App {
        log,
        stopping: tokio::sync::watch::Sender::new(false),
        metrics: metrics::Metrics::default(),
        committed: tokio::sync::watch::Sender::new(()),
        // Compared with the paths clients send (absolute), to know a rebuild of this one.
        projection: std::path::absolute(&options.projection)?,
        projection_db: Default::default(),
        projected: Default::default(),
    });
    runtime.block_on(serve(app.clone(), options))?;
    drop(runtime);
    // The last reference: closing the log lets the writer finish and sync.
    match Arc::try_unwrap(app) {
        Ok(app) => drop(app.log),
        Err(_) => tracing::warn!("the log is still referenced at exit; it closes with the process"),
    }
    Ok(())
}

async fn serve(app: Arc<App>, options: Options) -> Result<(), ServeError> {
    let _ = std::fs::remove_file(&options.socket);
    let unix = tokio::net::UnixListener::bind(&options.socket)?;
    set_mode_0600(&options.socket)?;
    let projector = {
        let (app, runtime) = (app.clone(), tokio::runtime::Handle::current());
        std::thread::Builder::new()
            .name("spool-projector".into())
            .spawn(move || project_live(app, runtime))?
    };
    let routes = |token: Option<String>| {
        let router = Router::new()
            .route("/v1/events", post(append).get(events))
            .route(
                "/v1/ingest",
                post(ingest).layer(DefaultBodyLimit::max(INGEST_BYTES_MAX)),
            )
            .route("/v1/log", get(log_page))
            .route("/v1/export", post(export))
            .route("/v1/jobs/rebuild", post(rebuild))
            .route("/v1/jobs/project-postgres", post(project_postgres))
            .route("/v1/jobs/backfill-postgres", post(backfill_postgres))
            .route("/v1/verify", get(verify))
            .route("/v1/heads", get(heads))
            .route("/v1/status", get(status))
            .route("/metrics", get(metrics));
        // The socket is guarded by its file mode: only the HTTP listener checks a token.
        let router = match token {
            Some(token) => {
                // Shared by every request, not copied for each.
                let token: Arc<str> = token.into();
                router.layer(axum::middleware::from_fn(move |req, next| {
                    authorize(token.clone(), req, next)
                }))
            }
            None => router,
        };
        router
            .layer(DefaultBodyLimit::max(REQUEST_BYTES_MAX))
            .with_state(app.clone())
    };
    let mut servers = tokio::task::JoinSet::new();
    let mut unix_stop = app.stopping.subscribe();
    let unix_routes = routes(None);
    servers.spawn(async move {
        axum::serve(unix, unix_routes)
            .with_graceful_shutdown(async move {
                let _ = unix_stop.wait_for(|stopping| *stopping).await;
            })
            .await
    });
    if let Some((addr, token)) = options.http {
        let tcp = tokio::net::TcpListener::bind(addr).await?;
        let mut tcp_stop = app.stopping.subscribe();
        let tcp_routes = routes(Some(token));
        servers.spawn(async move {
            axum::serve(tcp, tcp_routes)
                .with_graceful_shutdown(async move {
                    let _ = tcp_stop.wait_for(|stopping| *stopping).await;
                })
                .await
        });
    }
    tracing::info!(socket = %options.socket.display(), "spool serve: listening");
    shutdown_signal().await;
    tracing::info!("spool serve: stopping; answering what was accepted");
    app.stopping.send_replace(true);
    while let Some(done) = servers.join_next().await {
        if let Ok(Err(e)) = done {
            tracing::warn!("a listener ended with {e}");
        }
    }
    let _ = tokio::task::spawn_blocking(move || projector.join()).await;
    let _ = std::fs::remove_file(&options.socket);
    Ok(())
}

/// Turns transparent huge pages off for the daemon. Under load it allocates and frees request
/// buffers at a pace that made the kernel zero a 2 MiB page at many faults (a tenth of the
/// daemon's samples). In 7 interleaved pairs of serve-bench runs (64 clients, 100-event
/// requests) with and without, 4 KiB pages gave the lower p99 in all 7 and the higher rate in
/// 6. A rebuild showed no such gain, so only the daemon does this. Best effort: a refusal
/// changes nothing.
fn no_huge_pages() {
    // SAFETY: a plain system call with integer arguments, changing only this process's setting.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

fn set_mode_0600(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The HTTP listener requires `Authorization: Bearer <token>`.
async fn authorize(
    token: Arc<str>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_none_or(|g| !constant_time_eq(g.as_bytes(), token.as_bytes())) {
        return error(StatusCode::UNAUTHORIZED, "a bearer token is required", None);
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error(status: StatusCode, message: &str, field: Option<&str>) -> Response {
    let mut body = json!({"error": message});
    if let Some(field) = field {
        body["field"] = field.into();
    }
    (status, Json(body)).into_response()
}

/// `POST /v1/events`: one event (an object) or a batch (an array), all-or-nothing.
async fn append(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let started = Instant::now();
    let (events, single) = match input::parse_body(&body) {
        Ok(body) => (body.events, body.single),
        Err(refused) => {
            app.metrics.refused.inc();
            let message = refused.to_string();
            return error(StatusCode::BAD_REQUEST, &message, refused.field.as_deref());
        }
    };
    let count = events.len() as u64;
    let answer = match app.log.submit(events) {
        Ok(answer) => answer,
        Err(LogError::Busy(_)) => {
            app.metrics.busy.inc();
            let mut response = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy: the writer's queue is full; retry",
                None,
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
            return response;
        }
        Err(e) => return log_error(&e),
    };
    match answer.await {
        Ok(Ok(appended)) => {
            app.metrics.appended(count, started.elapsed());
            app.committed.send_replace(());
            let lines: Vec<_> = appended.iter().map(input::appended_json).collect();
            match single {
                true => json_sized(&lines.first(), ACK_JSON_BYTES),
                false => json_sized(&lines, ACK_JSON_BYTES * lines.len() + 2),
            }
        }
        Ok(Err(e)) => log_error(&e),
        Err(_) => log_error(&LogError::WriterGone),
    }
}

/// Room for one event's acknowledgement in JSON: 140 bytes with one-digit numbers, up to 38
/// more for the largest.
const ACK_JSON_BYTES: usize = 180;

/// `value` as a JSON answer, serialized into a buffer of `capacity` bytes made once (axum's
/// `Json` starts from 128 bytes and regrows: eight times for a 100-event answer).
fn json_sized(value: &impl serde::Serialize, capacity: usize) -> Response {
    let mut body = Vec::with_capacity(capacity);
    match serde_json::to_writer(&mut body, value) {
        Ok(()) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None),
    }
}

/// Runs `work` (reading or writing the log) on a blocking thread and answers with its JSON, or
/// with the log's error.
async fn answer_json(work: impl FnOnce() -> Result<Value, LogError> + Send + 'static) -> Response {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => log_error(&e),
        Err(_) => log_error(&LogError::WriterGone),
    }
}

fn log_error(e: &LogError) -> Response {
    let status = match e {
        LogError::Halted { .. } => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, &e.to_string(), None)
}

/// `POST /v1/ingest`: an export file (`spool export`), applied in causal order as `spool ingest`
/// applies it; answered with its summary once durable.
async fn ingest(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    answer_json(move || {
        let summary = crate::sync::file::ingest(&app.log, std::io::Cursor::new(body), |_| {})?;
        app.committed.send_replace(());
        Ok(summary.to_json())
    })
    .await
}

/// Events sent in one read of a stream.
const STREAM_PAGE_EVENTS: usize = 256;

#[derive(serde::Deserialize)]
struct After {
    #[serde(default)]
    after: u64,
}

/// `GET /v1/events?after=POS`: Server-Sent Events, one per event after `POS` in position order
/// (`id` is the position, `data` the event as `spool log` prints it), then each new one as it
/// commits. Read a page at a time, only as the client takes them: memory stays bounded
/// however far behind the client is.
async fn events(State(app): State<Arc<App>>, Query(from): Query<After>) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let state = (
        app,
        from.after,
        std::collections::VecDeque::<(u64, String)>::new(),
    );
    let stream = futures_util::stream::unfold(state, |(app, mut after, mut queued)| async move {
        let mut stopping = app.stopping.subscribe();
        let mut committed = app.committed.subscribe();
        loop {
            if let Some((position, data)) = queued.pop_front() {
                let event = Event::default().id(position.to_string()).data(data);
                return Some((
                    Ok::<_, std::convert::Infallible>(event),
                    (app, after, queued),
                ));
            }
            if *stopping.borrow() {
                return None;
            }
            let reader = app.clone();
            let page =
                tokio::task::spawn_blocking(move || -> Result<Vec<(u64, String)>, LogError> {
                    let page = reader.log.read()?.scan(
                        after,
                        STREAM_PAGE_EVENTS,
                        &crate::log::Filter::default(),
                    )?;
                    Ok(page
                        .records
                        .iter()
                        .map(|r| (r.position, input::event_json(r).to_string()))
                        .collect())
                })
                .await;
            match page {
                Ok(Ok(page)) if !page.is_empty() => {
                    after = page.last().map_or(after, |(p, _)| *p);
                    queued.extend(page);
                }
                Ok(Ok(_)) => {
                    tokio::select! {
                        _ = committed.changed() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stopping.changed() => return None,
                    }
                }
                // A read that fails ends the stream; the client reconnects with its last id.
                _ => return None,
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Most events in one `GET /v1/log` page.
const LOG_PAGE_EVENTS: usize = 1_000;

#[derive(serde::Deserialize)]
struct LogQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
    stream: Option<String>,
    kind: Option<String>,
    origin: Option<String>,
}

/// `GET /v1/log?after=&limit=&stream=&kind=&origin=`: one page of events as `spool log` prints
/// them, and `next` (where the following page starts; null at the end).
async fn log_page(State(app): State<Arc<App>>, Query(q): Query<LogQuery>) -> Response {
    let origin = match q
        .origin
        .as_deref()
        .map(crate::event::Origin::from_hex)
        .transpose()
    {
        Ok(origin) => origin,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("origin: {e}"),
                Some("origin"),
            )
        }
    };
    let filter = crate::log::Filter {
        stream: q.stream,
        kind: q.kind,
        origin,
    };
    let limit = q.limit.unwrap_or(LOG_PAGE_EVENTS).clamp(1, LOG_PAGE_EVENTS);
    answer_json(move || {
        let page = app.log.read()?.scan(q.after, limit, &filter)?;
        let events: Vec<Value> = page.records.iter().map(input::event_json).collect();
        Ok(json!({"events": events, "next": page.last_examined}))
    })
    .await
}

/// `GET /v1/verify`: every hash, archive, chain and index checked, as `spool verify --json`.
async fn verify(State(app): State<Arc<App>>) -> Response {
    answer_json(move || {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let started = Instant::now();
        let report = app.log.verify(threads)?;
        Ok(report.to_json(started.elapsed().as_secs_f64()))
    })
    .await
}

/// `GET /v1/heads`: the version vector, as `spool heads --json` prints it.
async fn heads(State(app): State<Arc<App>>) -> Response {
    answer_json(move || {
        let heads = app.log.read()?.heads()?;
        let vector = Vector(heads.iter().map(|h| (h.origin, h.seq)).collect());
        Ok(vector.to_json())
    })
    .await
}

/// `GET /v1/status`: events, heads, waiting events, forks, the writer's counters and the
/// projection's lag.
async fn status(State(app): State<Arc<App>>) -> Response {
    answer_json(move || {
        let stats = app.log.stats()?;
        let reader = app.log.read()?;
        let writer = app.log.writer_stats();
        let projected = app.projected.load(std::sync::atomic::Ordering::Relaxed);
        Ok(json!({
            "node": app.log.origin(),
            "events": stats.events,
            "file_bytes": stats.file_bytes,
            "heads": stats.heads.iter().map(|h| json!({"origin": h.origin, "seq": h.seq, "hash": h.hash})).collect::<Vec<_>>(),
            "waiting": reader.pending()?,
            "forks": reader.forks()?,
            "halted": reader.halted()?,
            "writer": {"commits": writer.commits, "events": writer.events},
            "projection": {"position": projected, "lag_events": stats.events.saturating_sub(projected)},
        }))
    })
    .await
}

/// `GET /metrics`: Prometheus text.
async fn metrics(State(app): State<Arc<App>>, _: HeaderMap) -> Response {
    let writer = app.log.writer_stats();
    let last = app.log.read().and_then(|r| r.last_position()).unwrap_or(0);
    let projected = app.projected.load(std::sync::atomic::Ordering::Relaxed);
    let text = app.metrics.render(writer, last.saturating_sub(projected));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// A body streamed from a blocking job: bytes go out in pieces through a small bounded channel
/// (memory stays bounded however slow the client), and a client that goes away stops the job's
/// writes with an error. A body dropped before [`Streamed::finish`] ends in an error, so the
/// client sees it cut short rather than complete.
struct Streamed {
    sender: tokio::sync::mpsc::Sender<Result<axum::body::Bytes, std::io::Error>>,
    buffer: Vec<u8>,
    finished: bool,
}

/// Bytes gathered before a piece of a streamed body is sent.
const STREAM_PIECE_BYTES: usize = 64 * 1024;

impl Streamed {
    /// The writer, and the response whose body it feeds.
    fn new(content_type: &'static str) -> (Streamed, Response) {
        let (sender, receiver) = tokio::sync::mpsc::channel(8);
        let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|piece| (piece, receiver))
        });
        let response = (
            [(header::CONTENT_TYPE, content_type)],
            axum::body::Body::from_stream(stream),
        )
            .into_response();
        let writer = Streamed {
            sender,
            buffer: Vec::new(),
            finished: false,
        };
        (writer, response)
    }

    /// Sends what is left and ends the body whole.
    fn finish(mut self) -> std::io::Result<()> {
        std::io::Write::flush(&mut self)?;
        self.finished = true;
        Ok(())
    }

    /// Sends one JSON line if the channel has room, else drops it: a job's progress never
    /// waits for a slow client.
    fn line_if_room(&mut self, value: &Value) {
        let mut line = value.to_string();
        line.push('\n');
        let _ = self.sender.try_send(Ok(line.into()));
    }

    /// Sends one JSON line at once (a job's outcome).
    fn line(&mut self, value: &Value) -> std::io::Result<()> {
        serde_json::to_writer(&mut *self, value)?;
        std::io::Write::write_all(self, b"\n")?;
        std::io::Write::flush(self)
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        if !self.finished {
            let stopped = std::io::Error::other("the daemon stopped this answer midway");
            let _ = self.sender.blocking_send(Err(stopped));
        }
    }
}

impl std::io::Write for Streamed {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= STREAM_PIECE_BYTES {
            self.flush()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let piece = axum::body::Bytes::from(std::mem::take(&mut self.buffer));
        self.sender
            .blocking_send(Ok(piece))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client left"))
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportRequest {
    /// Origins (hex) to export; all when empty.
    #[serde(default)]
    origins: Vec<String>,
    /// A version vector, as `spool heads --json` prints it: only what it lacks is exported.
    #[serde(default)]
    since: Option<String>,
}

/// `POST /v1/export`: the export file of `spool export`, streamed as it is written.
async fn export(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let request: ExportRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string(), None),
    };
    let selection = match crate::sync::Selection::parse(&request.origins, request.since.as_deref())
    {
        Ok(selection) => selection,
        Err((part, e)) => {
            // The body's field: `origins` holds the origins.
            let field = if part == "origin" { "origins" } else { part };
            return error(
                StatusCode::BAD_REQUEST,
                &format!("{field}: {e}"),
                Some(field),
            );
        }
    };

    let (writer, response) = Streamed::new("application/octet-stream");
    tokio::task::spawn_blocking(move || {
        let written = app
            .log
            .read()
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|reader| {
                crate::sync::file::export(&reader, &selection, writer, |_| {})
                    .map_err(|e| std::io::Error::other(e.to_string()))
            });
        // A failed export drops the writer unfinished: the client sees the body cut short.
        match written.and_then(|(_, writer)| writer.finish()) {
            Ok(()) => {}
            Err(e) => tracing::warn!("an export stopped: {e}"),
        }
    });
    response
}

/// Runs a long job on a blocking thread and answers with its progress and outcome as JSON
/// lines: `{"progress": {"done", "total"}}` at most ten times a second, then `{"result": ...}`
/// or `{"error": "..."}`.
fn job(
    app: Arc<App>,
    work: impl FnOnce(&App, &mut dyn FnMut(u64, u64)) -> Result<Value, crate::jobs::JobError>
        + Send
        + 'static,
) -> Response {
    let (mut writer, response) = Streamed::new("application/x-ndjson");
    tokio::task::spawn_blocking(move || {
        let mut shown = Instant::now();
        let mut progress = |done: u64, total: u64| {
            if shown.elapsed() >= Duration::from_millis(100) {
                shown = Instant::now();
                // A client that left does not stop the job: it finishes what it started.
                writer.line_if_room(&json!({"progress": {"done": done, "total": total}}));
            }
        };
        let outcome = match work(&app, &mut progress) {
            Ok(result) => json!({"result": result}),
            Err(e) => json!({"error": e.to_string()}),
        };
        if writer.line(&outcome).is_ok() {
            let _ = writer.finish();
        }
    });
    response
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RebuildRequest {
    /// Where to build (an absolute path); the node's projection when absent.
    into: Option<PathBuf>,
    /// A position or an RFC 3339 time.
    as_of: Option<String>,
}

/// `POST /v1/jobs/rebuild`: `spool rebuild sqlite`. Rebuilding the node's own projection
/// closes the live projector's connection for the swap; it reopens on the new file.
async fn rebuild(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let request: RebuildRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string(), None),
    };
    let until = match crate::jobs::as_of(request.as_of.as_deref()) {
        Ok(until) => until,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string(), Some("as_of")),
    };
    let path = request.into.unwrap_or_else(|| app.projection.clone());
    if !path.is_absolute() {
        return error(
            StatusCode::BAD_REQUEST,
            "into: an absolute path is required",
            Some("into"),
        );
    }
    job(app, move |app, progress| {
        let reader = app.log.read()?;
        let (partial, summary) = crate::jobs::rebuild(&reader, &path, until, progress)?;
        drop(reader);
        if path == app.projection {
            let mut held = app.projection_db.lock().unwrap_or_else(|e| e.into_inner());
            held.take();
            crate::jobs::swap_in(&partial, &path)?;
            app.projected.store(0, std::sync::atomic::Ordering::Relaxed);
            app.committed.send_replace(());
        } else {
            crate::jobs::swap_in(&partial, &path)?;
        }
        Ok(summary)
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PostgresRequest {
    url: String,
    held_bytes_max: Option<usize>,
}

/// A Postgres job as `jobs` runs it.
type PostgresRun = fn(
    &crate::log::Reader,
    &crate::jobs::PostgresJob,
    &mut dyn FnMut(u64, u64),
) -> Result<Value, crate::jobs::JobError>;

/// Runs a Postgres job for this node on the body's `url` and `held_bytes_max`.
fn postgres_job(app: Arc<App>, body: &[u8], run: PostgresRun) -> Response {
    let request: PostgresRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string(), None),
    };
    job(app, move |app, progress| {
        let job = crate::jobs::PostgresJob {
            url: &request.url,
            node: app.log.origin(),
            held_bytes_max: request.held_bytes_max,
        };
        run(&app.log.read()?, &job, progress)
    })
}

/// `POST /v1/jobs/project-postgres`: one pass of `spool project postgres`.
async fn project_postgres(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    postgres_job(app, &body, |reader, job, progress| {
        let mut target = crate::jobs::postgres_target(job)?;
        crate::jobs::project_postgres(reader, &mut target, progress)
    })
}

/// `POST /v1/jobs/backfill-postgres`: `spool backfill postgres`.
async fn backfill_postgres(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    postgres_job(app, &body, |reader, job, progress| {
        crate::jobs::backfill_postgres(reader, job, progress)
    })
}

/// Keeps the SQLite projection up to the log: catches up after every commit (and every second,
/// for events ingested otherwise).
///
/// It runs on a thread of its own in `SCHED_IDLE` (see [`priority::set_thread_idle`]): appends
/// come first, and under a burst the projection falls behind (reported as its lag) and catches
/// up in larger transactions once the burst ends.
fn project_live(app: Arc<App>, runtime: tokio::runtime::Handle) {
    lower_priority();
    let mut stopping = app.stopping.subscribe();
    let mut committed = app.committed.subscribe();
    loop {
        if *stopping.borrow() {
            return;
        }
        {
            let mut held = app.projection_db.lock().unwrap_or_else(|e| e.into_inner());
            let open = match held.take() {
                Some(db) => Ok(db),
                None => Sqlite::open(&app.projection, Durability::Live).map_err(|e| e.to_string()),
            };
            let caught_up = open.and_then(|mut db| {
                let reader = app.log.read().map_err(|e| e.to_string())?;
                project::catch_up(&reader, &mut db, |_| {}).map_err(|e| e.to_string())?;
                let (position, _, _) = db.checkpoint().map_err(|e| e.to_string())?;
                app.projected
                    .store(position, std::sync::atomic::Ordering::Relaxed);
                Ok(db)
            });
            match caught_up {
                Ok(open) => *held = Some(open),
                // Reopened next time: a failed catch-up leaves nothing half done behind.
                Err(e) => tracing::warn!(
                    "the projection was not updated ({e}); `spool rebuild sqlite` rebuilds it"
                ),
            }
        }
        let stop = runtime.block_on(async {
            tokio::select! {
                // The commits of the next moment are taken together: one transaction for many.
                _ = committed.changed() => {
                    tokio::time::sleep(PROJECT_GATHER).await;
                    false
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => false,
                _ = stopping.changed() => true,
            }
        });
        if stop {
            return;
        }
    }
}

/// How long the live projector waits after a commit for more before it catches up.
const PROJECT_GATHER: Duration = Duration::from_millis(10);

/// Puts the calling thread in `SCHED_IDLE`, or where that is refused lowers it to
/// [`priority::PROJECTOR_NICE`]. Best effort: a refusal of both leaves the priority as it was.
fn lower_priority() {
    if !priority::set_thread_idle() && !priority::set_thread_nice(priority::PROJECTOR_NICE) {
        tracing::debug!("the projector runs at the daemon's priority");
    }
}
