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
mod hub;
mod listen;
mod metrics;
mod pair;
pub mod peer;
mod reply;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

pub use listen::{BODIES_BYTES_MAX, BODY_TIMEOUT, CONNECTIONS_MAX, DRAIN_TIMEOUT, HEAD_TIMEOUT};
pub use reply::panic_message;
use reply::{busy, problem, refuse};

use crate::input;
use crate::log::{Log, LogError};
use crate::node;
use crate::priority;
use crate::project::sqlite::Sqlite;
use crate::project::{self};
use crate::wire::{self, Ack, Code, LogQuery, Problem};

/// Largest request body (JSON), one event or a batch: the same as a batch `spool append` reads.
pub const REQUEST_BYTES_MAX: usize = input::BATCH_BYTES_MAX;
/// Largest ingest request (an export file; `spool ingest` sends larger files in pieces).
pub const INGEST_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Largest pairing request (a code and a label).
pub const PAIR_REQUEST_BYTES_MAX: usize = 4 * 1024;
/// Largest peer wait (a version vector of every member).
pub const PEER_WAIT_BYTES_MAX: usize = 512 * 1024;
/// The socket's name in the node home.
pub const SOCKET: &str = "spool.sock";
/// Exports streamed at once; one more is told busy.
pub const EXPORTS_MAX: usize = 4;
/// Jobs (rebuild, Postgres) running at once; one more is told busy. A target is rebuilt by one
/// job at a time.
pub const JOBS_MAX: usize = 2;
/// Verifies running at once (each uses every core); one more is told busy.
pub const VERIFIES_MAX: usize = 1;
/// How long a streamed answer (an export, a job's outcome) waits for a client that reads
/// nothing before it is ended.
pub const STREAM_STALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("serve.socket_group names no group on this machine")]
    NoSuchGroup,
    #[error("{path}: giving it the group of serve.socket_group: {source} (the daemon's user must be a member of that group)")]
    Share {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("--http {0}: only a loopback address is served (127.0.0.0/8 or ::1); other nodes reach this one through `[peer] listen`, with TLS and the node keys")]
    NotLoopback(std::net::SocketAddr),
    #[error("{0}: peers need a node key and a fleet (a home made before keys has neither)")]
    NoFleet(&'static str),
    #[error("the peers' door: {0}")]
    Peer(String),
}

/// Where and how the daemon listens.
pub struct Options {
    /// The Unix socket (in the node home).
    pub socket: PathBuf,
    /// A loopback HTTP address, and the bearer token it requires.
    pub http: Option<(std::net::SocketAddr, String)>,
    /// Where jobs may write; its home's projection is the one kept live.
    pub places: crate::jobs::Places,
    /// The node's id and label, for its status.
    pub name: wire::NodeName,
    /// Who besides the daemon's user may use the socket (`[serve]` of `spool.toml`).
    pub access: crate::home::ServeConfig,
    /// The node's key: exports carry the node's own heads signed with it.
    pub key: Option<Arc<crate::identity::NodeKey>>,
    /// The fleet's Postgres hub to keep synced with (`[hub] url`, `SPOOL_HUB_URL`).
    pub hub: Option<String>,
    /// The peers' door (`[peer] listen`): TLS with the node key, fleet members only.
    pub peer_listen: Option<std::net::SocketAddr>,
    /// The peers to keep synced with (`[[peers]]`).
    pub peers: Vec<crate::home::PeerEntry>,
}

struct App {
    log: Log,
    key: Option<Arc<crate::identity::NodeKey>>,
    name: wire::NodeName,
    home: PathBuf,
    /// Event streams open now.
    streams: std::sync::atomic::AtomicU64,
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
    /// Events the projection skipped: kinds or versions this build cannot read.
    unreadable: std::sync::atomic::AtomicU64,
    places: crate::jobs::Places,
    exports: Arc<tokio::sync::Semaphore>,
    jobs: Arc<tokio::sync::Semaphore>,
    verifies: Arc<tokio::sync::Semaphore>,
    /// The targets being rebuilt.
    rebuilding: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
    doors: listen::Doors,
    /// The hub sync's report, when there is a hub.
    hub: Option<std::sync::Mutex<wire::HubStatus>>,
    /// Each peer's sync report, in the order of `[[peers]]`.
    peers: std::sync::Mutex<Vec<wire::PeerStatus>>,
    /// One pairing request at a time.
    pairing: tokio::sync::Mutex<()>,
    /// Until when (ms since the epoch) a pending pairing code lets the peers' door admit a key
    /// that is no member, to `/v1/pair/join` only.
    pairing_open_until: std::sync::atomic::AtomicU64,
    /// Where the peers' door listens.
    peer_address: Option<std::net::SocketAddr>,
    /// The live projection's digest, by the events it covers.
    digests: crate::jobs::DigestCache,
}

/// Runs the daemon until SIGTERM or SIGINT; returns once the log is closed.
pub fn run(log: Log, options: Options) -> Result<(), ServeError> {
    if let Some((addr, _)) = &options.http {
        if !addr.ip().is_loopback() {
            return Err(ServeError::NotLoopback(*addr));
        }
    }
    if options.key.is_none() || log.fleet_root().is_none() {
        if options.peer_listen.is_some() {
            return Err(ServeError::NoFleet("[peer] listen"));
        }
        if !options.peers.is_empty() {
            return Err(ServeError::NoFleet("[[peers]]"));
        }
    }
    no_huge_pages();
    listen::raise_descriptor_limit();
    reply::count_panics();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("spool-serve")
        .build()?;
    let app = Arc::new(App {
        log,
        key: options.key.clone(),
        name: options.name.clone(),
        home: options.places.home.clone(),
        streams: Default::default(),
        stopping: tokio::sync::watch::Sender::new(false),
        metrics: metrics::Metrics::default(),
        committed: tokio::sync::watch::Sender::new(()),
        projection: options.places.projection(),
        projection_db: Default::default(),
        projected: Default::default(),
        unreadable: Default::default(),
        places: options.places.clone(),
        exports: Arc::new(tokio::sync::Semaphore::new(EXPORTS_MAX)),
        jobs: Arc::new(tokio::sync::Semaphore::new(JOBS_MAX)),
        verifies: Arc::new(tokio::sync::Semaphore::new(VERIFIES_MAX)),
        rebuilding: Default::default(),
        doors: listen::Doors::default(),
        hub: options.hub.as_ref().map(|_| Default::default()),
        peers: std::sync::Mutex::new(
            options
                .peers
                .iter()
                .map(|p| wire::PeerStatus {
                    address: p.address.clone(),
                    ..Default::default()
                })
                .collect(),
        ),
        pairing: Default::default(),
        pairing_open_until: Default::default(),
        peer_address: options.peer_listen,
        digests: Default::default(),
    });
    pair::open(&app);
    runtime.block_on(serve(app.clone(), options))?;
    // A job still running (a Postgres server that went silent) is not waited for: what it
    // wrote is its own, and every acknowledged event is already durable.
    runtime.shutdown_timeout(DRAIN_TIMEOUT);
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
    share(&options)?;
    let projector = {
        let (app, runtime) = (app.clone(), tokio::runtime::Handle::current());
        std::thread::Builder::new()
            .name("spool-projector".into())
            .spawn(move || project_live(app, runtime))?
    };
    let hub = match options.hub.clone() {
        Some(url) => {
            let app = app.clone();
            Some(
                std::thread::Builder::new()
                    .name("spool-hub".into())
                    .spawn(move || hub::keep_synced(&app, &url))?,
            )
        }
        None => None,
    };
    let mut peer_threads = Vec::new();
    if let Some(key) = &app.key {
        for (index, entry) in options.peers.iter().enumerate() {
            let pinned = entry
                .origin
                .as_deref()
                .and_then(|o| crate::event::Origin::from_hex(o).ok());
            let members = app.clone();
            let admit = peer::admit(move |k| peer::member_key(&members.log, k), pinned);
            let link = peer::Link::new(&entry.address, key, admit).map_err(ServeError::Peer)?;
            let app = app.clone();
            peer_threads.push(
                std::thread::Builder::new()
                    .name(format!("spool-peer-{index}"))
                    .spawn(move || peer::keep_synced(&app, index, link))?,
            );
        }
    }
    let routes = |token: Option<String>| {
        let router = Router::new()
            .route("/v1/events", post(append).get(events))
            .route("/v1/ingest", post(ingest))
            .route("/v1/log", get(log_page))
            .route("/v1/export", post(export))
            .route("/v1/jobs/rebuild", post(rebuild))
            .route("/v1/jobs/project-postgres", post(project_postgres))
            .route("/v1/jobs/backfill-postgres", post(backfill_postgres))
            .route("/v1/verify", get(verify))
            .route("/v1/heads", get(heads))
            .route("/v1/status", get(status))
            .route("/v1/pair", get(pair::list))
            .route("/v1/pair/code", post(pair::code))
            .route("/v1/pair/cancel", post(pair::cancel))
            .route("/v1/openapi.json", get(openapi))
            .route("/metrics", get(metrics))
            .fallback(|| async { refuse(Code::NotFound, "no such endpoint (README lists them)") })
            .method_not_allowed_fallback(|| async {
                refuse(
                    Code::MethodNotAllowed,
                    "this endpoint does not take this method",
                )
            });
        // Bodies are read (within their limit, time and the shared budget) before any handler.
        let router = router
            .layer(axum::middleware::from_fn_with_state(app.clone(), read_body))
            .layer(DefaultBodyLimit::disable());
        // The socket is guarded by its file mode: only the HTTP listener checks a token, and
        // before a byte of the body is read.
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
            .layer(axum::middleware::from_fn(reply::catch_panic))
            .layer(axum::middleware::from_fn(reply::json_failures))
            .with_state(app.clone())
    };
    let mut servers = tokio::task::JoinSet::new();
    let (doors, stop, unix_routes) = (app.doors.clone(), app.stopping.subscribe(), routes(None));
    servers.spawn(async move { doors.serve(unix, unix_routes, stop).await });
    if let Some((addr, token)) = options.http {
        let tcp = tokio::net::TcpListener::bind(addr).await?;
        let (doors, stop, tcp_routes) = (
            app.doors.clone(),
            app.stopping.subscribe(),
            routes(Some(token)),
        );
        servers.spawn(async move { doors.serve(tcp, tcp_routes, stop).await });
    }
    if let (Some(addr), Some(key)) = (options.peer_listen, &app.key) {
        // Members, and while a pairing code is pending anyone (who may then only pair).
        let members = app.clone();
        let admit = peer::admit(
            move |k| peer::member_key(&members.log, k) || pair_open(&members),
            None,
        );
        let config = crate::peertls::server_config(key, admit).map_err(ServeError::Peer)?;
        let tcp = tokio::net::TcpListener::bind(addr).await?;
        let door = listen::TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(config),
        };
        let (doors, stop, peer_routes) = (
            app.doors.clone(),
            app.stopping.subscribe(),
            peer_routes(&app),
        );
        tracing::info!(%addr, "spool serve: the peers' door is open");
        servers.spawn(async move { doors.serve(door, peer_routes, stop).await });
    }
    tracing::info!(socket = %options.socket.display(), "spool serve: listening");
    // The handlers are in place before anyone hears "ready": a SIGTERM sent at once (systemd
    // stopping a unit that just started) ends the daemon cleanly, not by the default action.
    let stop_signal = shutdown_signal()?;
    // Under systemd (`Type=notify`), ready once every listener is bound; elsewhere a no-op.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    stop_signal.await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("spool serve: stopping; answering what was accepted");
    app.stopping.send_replace(true);
    while servers.join_next().await.is_some() {}
    let _ = tokio::task::spawn_blocking(move || projector.join()).await;
    // They look at `stopping` between rounds; a round in progress is bounded by its
    // connections' timeouts.
    for thread in hub.into_iter().chain(peer_threads) {
        let joined = tokio::task::spawn_blocking(move || thread.join());
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, joined).await;
    }
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

/// Sets who may use the socket: its user only (0600), or with `[serve] socket_group` that
/// group too (0660), and then the home becomes traversable by the group (g+x: its members can
/// reach the socket, not list the home) and the HTTP token readable by it.
fn share(options: &Options) -> Result<(), ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = options.access.mode().map_err(ServeError::Config)?;
    let set_mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    };
    set_mode(&options.socket, mode)?;
    let Some(group) = &options.access.socket_group else {
        return Ok(());
    };
    let gid = group_id(group).ok_or(ServeError::NoSuchGroup)?;
    let home = &options.places.home;
    let token = home.join(crate::home::SERVE_TOKEN);
    for path in [&options.socket, home, &token] {
        if path == &token && !token.exists() {
            continue;
        }
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|source| ServeError::Share {
            path: path.clone(),
            source,
        })?;
    }
    let home_mode = std::fs::metadata(home)?.permissions().mode() & 0o7777;
    set_mode(home, home_mode | 0o010)?;
    if token.exists() {
        set_mode(&token, 0o640)?;
    }
    Ok(())
}

/// The id of the group named `name`, if there is one.
fn group_id(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is to a live local of the size given; getgrnam_r writes only there.
    let status = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut group,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    (status == 0 && !found.is_null()).then_some(group.gr_gid)
}

/// Installs the SIGTERM and SIGINT handlers now; the future ends at the first of them.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
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
        return refuse(Code::Unauthorized, "a bearer token is required");
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /v1/events`: one event (an object) or a batch (an array), all-or-nothing.
async fn append(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let started = Instant::now();
    let (events, single) = match input::parse_body(&body) {
        Ok(body) => (body.events, body.single),
        Err(refused) => {
            app.metrics.refused.inc();
            return problem(Problem::from(&refused));
        }
    };
    let answer = match app.log.submit(events) {
        Ok(answer) => answer,
        Err(LogError::Busy(_)) => {
            app.metrics.busy.inc();
            return busy(
                "busy: the writer's queue is full; retry",
                wire::RETRY_AFTER_SECONDS,
            );
        }
        Err(e) => return problem(Problem::from(&e)),
    };
    match answer.await {
        Ok(appended) => {
            let written = appended.iter().filter(|a| !a.existing).count() as u64;
            app.metrics
                .appended(written, appended.len() as u64, started.elapsed());
            app.committed.send_replace(());
            let acks: Vec<Ack> = appended.iter().map(Ack::from).collect();
            match single {
                true => json_sized(&acks.first(), ACK_JSON_BYTES),
                false => json_sized(&acks, ACK_JSON_BYTES * acks.len() + 2),
            }
        }
        Err(e) => {
            if let LogError::KeyConflict { .. } = e {
                app.metrics.refused.inc();
            }
            let mut refused = Problem::from(&e);
            if single {
                refused.index = None; // One event: no batch to name a place in.
            }
            problem(refused)
        }
    }
}

/// Room for one event's acknowledgement in JSON: 160 bytes with one-digit numbers, up to 38
/// more for the largest.
const ACK_JSON_BYTES: usize = 200;

/// `value` as a JSON answer, serialized into a buffer of `capacity` bytes made once (axum's
/// `Json` starts from 128 bytes and regrows: eight times for a 100-event answer).
fn json_sized(value: &impl serde::Serialize, capacity: usize) -> Response {
    let mut body = Vec::with_capacity(capacity);
    match serde_json::to_writer(&mut body, value) {
        Ok(()) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(_) => reply::internal(),
    }
}

/// Runs `work` (reading or writing the log) on a blocking thread and answers with its JSON, or
/// with its refusal.
async fn answer<T: serde::Serialize + Send + 'static>(
    work: impl FnOnce() -> Result<T, Problem> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(p)) => problem(p),
        // The panic hook logged and counted it.
        Err(_) => reply::internal(),
    }
}

/// `POST /v1/ingest`: an export file (`spool export`), applied in causal order as `spool ingest`
/// applies it; answered with its summary once durable (200 with `ok: false` when the file is
/// cut or an event is refused: what came before it is applied).
async fn ingest(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    answer(move || {
        let summary = node::ingest(&app.log, std::io::Cursor::new(body))?;
        app.committed.send_replace(());
        Ok(summary)
    })
    .await
}

/// Events sent in one read of a stream.
const STREAM_PAGE_EVENTS: usize = 256;

/// A query string's parameters, each taken once by name; a parameter this endpoint does not
/// take, a repeated one or a bad value is refused naming the parameter, never quoting it.
struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    fn parse(raw: Option<&str>, known: &[&'static str]) -> Result<QueryParams, Problem> {
        let bad = |message: String| Problem::new(Code::BadQuery, message);
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
            .map_err(|_| bad("the query string is not URL-encoded".into()))?;
        for (i, (name, _)) in pairs.iter().enumerate() {
            let Some(&name) = known.iter().find(|k| **k == name) else {
                let takes = known.join(", ");
                return Err(bad(format!(
                    "an unknown query parameter; this endpoint takes {takes}"
                )));
            };
            if pairs[..i].iter().any(|(n, _)| n == name) {
                return Err(bad(format!("{name}: given twice")).field(name));
            }
        }
        Ok(QueryParams(pairs))
    }

    fn text(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn number(&self, name: &'static str) -> Result<Option<u64>, Problem> {
        self.text(name).map(number(name)).transpose()
    }

    /// The events a log page or a stream selects.
    fn log_query(&self) -> Result<LogQuery, Problem> {
        let origin = self
            .text("origin")
            .map(crate::event::Origin::from_hex)
            .transpose()
            .map_err(|_| {
                Problem::new(Code::BadQuery, "origin: must be 32 hex digits").field("origin")
            })?;
        Ok(LogQuery {
            after: self.number("after")?.unwrap_or(0),
            limit: self.number("limit")?,
            stream: self.text("stream").map(str::to_owned),
            kind: self.text("kind").map(str::to_owned),
            origin,
        })
    }
}

/// Reads a whole number named `name`, refusing it by name.
fn number(name: &'static str) -> impl Fn(&str) -> Result<u64, Problem> {
    move |text| {
        text.parse::<u64>().map_err(|_| {
            let message = format!("{name}: must be a whole number from 0 to 2^64 - 1");
            Problem::new(Code::BadQuery, message).field(name)
        })
    }
}

/// The filters `GET /v1/log` and `GET /v1/events` take.
const LOG_PARAMS: [&str; 5] = ["after", "limit", "stream", "kind", "origin"];

/// `GET /v1/events?after=&stream=&kind=&origin=`: Server-Sent Events, one per event after
/// `after` that passes the filters, in position order (`id` is the position, `data` the event
/// as `spool log` prints it), then each new one as it commits. A reconnecting client's
/// `Last-Event-ID` takes the place of `after`, so it resumes after the last event it saw. Read a
/// page at a time, only as the client takes them: memory stays bounded however far behind the
/// client is.
async fn events(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let last_id = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("-"))
        .map(number("Last-Event-ID"))
        .transpose();
    let selected = QueryParams::parse(query.as_deref(), &LOG_PARAMS[..])
        .and_then(|q| q.log_query())
        .and_then(|mut q| {
            if q.limit.is_some() {
                let message = "limit: a stream has no limit; close it when done";
                return Err(Problem::new(Code::BadQuery, message).field("limit"));
            }
            if let Some(last) = last_id? {
                q.after = last;
            }
            Ok(q)
        });
    let query = match selected {
        Ok(query) => query,
        Err(refused) => return problem(refused),
    };
    let filter = Arc::new(query.filter());
    let stream_guard = Arc::new(StreamCount::open(&app));
    let state = (
        app,
        query.after,
        std::collections::VecDeque::<(u64, String)>::new(),
    );
    let stream = futures_util::stream::unfold(state, move |(app, mut after, mut queued)| {
        let (filter, guard) = (filter.clone(), stream_guard.clone());
        async move {
            let _open = guard;
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
                let (reader, filter) = (app.clone(), filter.clone());
                type Read = Result<(Option<u64>, Vec<(u64, String)>), LogError>;
                let page = tokio::task::spawn_blocking(move || -> Read {
                    let page = reader
                        .log
                        .read()?
                        .scan(after, STREAM_PAGE_EVENTS, &filter)?;
                    let events = page
                        .records
                        .iter()
                        .map(|r| {
                            let event = wire::Event::from(r);
                            (
                                r.position,
                                serde_json::to_string(&event).unwrap_or_default(),
                            )
                        })
                        .collect();
                    Ok((page.last_examined, events))
                })
                .await;
                match page {
                    Ok(Ok((Some(last), page))) => {
                        after = last;
                        queued.extend(page);
                    }
                    Ok(Ok((None, _))) => {
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
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Counts an open event stream while it lives.
struct StreamCount(Arc<App>);

impl StreamCount {
    fn open(app: &Arc<App>) -> StreamCount {
        app.streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        StreamCount(app.clone())
    }
}

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0
            .streams
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `GET /v1/log?after=&limit=&stream=&kind=&origin=`: one page of events as `spool log` prints
/// them, and `next` (where the following page starts; null at the end).
async fn log_page(State(app): State<Arc<App>>, RawQuery(query): RawQuery) -> Response {
    let query =
        match QueryParams::parse(query.as_deref(), &LOG_PARAMS[..]).and_then(|q| q.log_query()) {
            Ok(query) => query,
            Err(refused) => return problem(refused),
        };
    answer(move || node::log_page(&app.log, &query)).await
}

/// `GET /v1/verify`: every hash, archive, chain and index checked, as `spool verify --json`.
async fn verify(State(app): State<Arc<App>>) -> Response {
    let Ok(running) = app.verifies.clone().try_acquire_owned() else {
        return busy("a verify is already running; retry when it ends", 5);
    };
    answer(move || {
        let _running = running;
        node::verify(&app.log)
    })
    .await
}

/// `GET /v1/heads`: the version vector, as `spool heads --json` prints it.
async fn heads(State(app): State<Arc<App>>) -> Response {
    answer(move || node::heads(&app.log)).await
}

/// The peers' door serves only what sync needs, and only to current members of the fleet (the
/// TLS handshake admitted the caller's key; a revocation since is seen at its next request).
fn peer_routes(app: &Arc<App>) -> Router {
    Router::new()
        .route("/v1/heads", get(heads))
        .route("/v1/export", post(export))
        .route("/v1/ingest", post(ingest))
        .route("/v1/peer/wait", post(peer_wait))
        .route("/v1/pair/join", post(pair::join))
        .route("/v1/peer/digest", get(peer_digest))
        .fallback(|| async { refuse(Code::NotFound, "no such endpoint on the peers' door") })
        .method_not_allowed_fallback(|| async {
            refuse(
                Code::MethodNotAllowed,
                "this endpoint does not take this method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(app.clone(), read_body))
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            members_only,
        ))
        .layer(axum::middleware::from_fn(reply::catch_panic))
        .layer(axum::middleware::from_fn(reply::json_failures))
        .with_state(app.clone())
}

/// Bodies are read (within their limit, time and the shared budget) before any handler.
async fn read_body(
    State(app): State<Arc<App>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = match request.uri().path() {
        "/v1/ingest" => INGEST_BYTES_MAX,
        // Small requests, one of them open to a key that is no member yet.
        "/v1/pair/join" | "/v1/pair/code" | "/v1/pair/cancel" => PAIR_REQUEST_BYTES_MAX,
        "/v1/peer/wait" => PEER_WAIT_BYTES_MAX,
        _ => REQUEST_BYTES_MAX,
    };
    app.doors.read_body(request, limit, next).await
}

/// Refuses a request whose caller is no longer a current member (checked before its body is
/// read).
async fn members_only(
    State(app): State<Arc<App>>,
    caller: Option<axum::Extension<listen::Caller>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(axum::Extension(listen::Caller(key))) = caller else {
        return refuse(Code::Forbidden, "the peers' door serves fleet members only");
    };
    if request.uri().path() == "/v1/pair/join" {
        // A device that is no member yet; the handler refuses members.
        return next.run(request).await;
    }
    let member = {
        let app = app.clone();
        tokio::task::spawn_blocking(move || peer::member_key(&app.log, &key))
            .await
            .unwrap_or(false)
    };
    if !member {
        return refuse(
            Code::Forbidden,
            "this node key is not a current member of the fleet",
        );
    }
    next.run(request).await
}

/// Whether a pending pairing code holds the peers' door open to keys that are no member.
fn pair_open(app: &App) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now < app
        .pairing_open_until
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// `GET /v1/peer/digest`, on the peers' door: the live projection's digest and the events it
/// covers (`null` before its first checkpoint), for the divergence alarm.
async fn peer_digest(State(app): State<Arc<App>>) -> Response {
    answer(move || {
        let digest = app
            .digests
            .get(&app.projection)
            .map_err(|e| Problem::new(Code::Sqlite, e.to_string()))?;
        Ok(digest.map(|(covers, digest)| wire::ProjectionDigest {
            covers: covers.0,
            digest: digest.to_hex(),
        }))
    })
    .await
}

/// Longest wait a peer may ask for.
const PEER_WAIT_MAX: Duration = Duration::from_secs(30);

/// `POST /v1/peer/wait`: answered with this node's heads as soon as it holds an event `since`
/// lacks, when `wait_ms` (at most 30 s) pass, or when the daemon stops.
async fn peer_wait(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let request = match json_request::<wire::PeerWait>(&body) {
        Ok(request) => request,
        Err(refused) => return problem(refused),
    };
    let until =
        tokio::time::Instant::now() + Duration::from_millis(request.wait_ms).min(PEER_WAIT_MAX);
    let mut committed = app.committed.subscribe();
    let mut stopping = app.stopping.subscribe();
    loop {
        committed.mark_unchanged();
        let reading = app.clone();
        let heads = match tokio::task::spawn_blocking(move || node::heads(&reading.log)).await {
            Ok(Ok(heads)) => heads,
            Ok(Err(p)) => return problem(p),
            Err(_) => return reply::internal(),
        };
        if peer::ahead(&heads, &request.since) || tokio::time::Instant::now() >= until {
            return Json(wire::PeerState { heads }).into_response();
        }
        tokio::select! {
            _ = committed.changed() => {}
            _ = tokio::time::sleep_until(until) => {}
            _ = stopping.wait_for(|s| *s) => {}
        }
        if *app.stopping.borrow() {
            return busy("the daemon is stopping", 1);
        }
    }
}

/// `GET /v1/status`: `spool status --json`, with what only the daemon knows (`daemon`).
async fn status(State(app): State<Arc<App>>) -> Response {
    answer(move || {
        use std::sync::atomic::Ordering::Relaxed;
        let unreadable = app.unreadable.load(Relaxed);
        let mut status = node::status(&app.log, &app.name, &app.home, unreadable)?;
        let writer = app.log.writer_stats();
        let projected = app.projected.load(Relaxed);
        status.daemon = Some(wire::DaemonStatus {
            commits: writer.commits,
            appended: writer.events,
            projected,
            lag_events: status.events.saturating_sub(projected),
            panics: reply::PANICS.load(Relaxed),
            streams: app.streams.load(Relaxed),
            hub: app
                .hub
                .as_ref()
                .map(|h| h.lock().unwrap_or_else(|e| e.into_inner()).clone()),
            peers: app.peers.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        });
        Ok(status)
    })
    .await
}

/// `GET /v1/openapi.json`: the API's description (made once).
async fn openapi() -> Response {
    static DOCUMENT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let body = DOCUMENT
        .get_or_init(|| serde_json::to_vec_pretty(&crate::openapi::document()).unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response()
}

/// `GET /metrics`: Prometheus text, classic unless `Accept` asks for OpenMetrics.
async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = metrics::Format::from_accept(accept);
    let read = tokio::task::spawn_blocking(move || -> Result<String, Problem> {
        use std::sync::atomic::Ordering::Relaxed;
        let reader = app.log.read()?;
        let last = reader.last_position()?;
        let projected = app.projected.load(Relaxed);
        let now = metrics::Now {
            writer: app.log.writer_stats(),
            panics: reply::PANICS.load(Relaxed),
            lag: last.saturating_sub(projected),
            unreadable: app.unreadable.load(Relaxed),
            waiting: reader.pending()?,
            forks: reader.forks()?.len() as u64,
            halted: reader.halted()?.is_some(),
            streams: app.streams.load(Relaxed),
            log_bytes: std::fs::metadata(app.log.path()).map_or(0, |m| m.len()),
            hub: app
                .hub
                .as_ref()
                .map(|h| h.lock().unwrap_or_else(|e| e.into_inner()).clone()),
            peers: app.peers.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        };
        Ok(app.metrics.render(&now, format))
    })
    .await;
    match read {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, format.content_type())], text).into_response(),
        Ok(Err(refused)) => problem(refused),
        Err(_) => reply::internal(),
    }
}

/// A body streamed from a blocking job: bytes go out in pieces through a small bounded channel
/// (memory stays bounded however slow the client), and a client that goes away stops the job's
/// writes with an error. A body dropped before [`Streamed::finish`] ends in an error, so the
/// client sees it cut short rather than complete.
struct Streamed {
    sender: tokio::sync::mpsc::Sender<Result<axum::body::Bytes, std::io::Error>>,
    buffer: Vec<u8>,
    finished: bool,
    runtime: tokio::runtime::Handle,
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
            runtime: tokio::runtime::Handle::current(),
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
    fn line_if_room(&mut self, value: &impl serde::Serialize) {
        let mut line = serde_json::to_string(value).unwrap_or_default();
        line.push('\n');
        let _ = self.sender.try_send(Ok(line.into()));
    }

    /// Sends one JSON line at once (a job's outcome).
    fn line(&mut self, value: &impl serde::Serialize) -> std::io::Result<()> {
        serde_json::to_writer(&mut *self, value)?;
        std::io::Write::write_all(self, b"\n")?;
        std::io::Write::flush(self)
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        if !self.finished {
            // Never waits: a client that reads nothing sees the connection end instead.
            let stopped = std::io::Error::other("the daemon stopped this answer midway");
            let _ = self.sender.try_send(Err(stopped));
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
        let sent = self
            .runtime
            .block_on(self.sender.send_timeout(Ok(piece), STREAM_STALL_TIMEOUT));
        match sent {
            Ok(()) => Ok(()),
            Err(tokio::sync::mpsc::error::SendTimeoutError::Timeout(_)) => {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client read nothing for 30 s",
                ))
            }
            Err(tokio::sync::mpsc::error::SendTimeoutError::Closed(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the client left",
            )),
        }
    }
}

/// `POST /v1/export`: the export file of `spool export`, streamed as it is written.
async fn export(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let selection = match json_request::<wire::ExportRequest>(&body)
        .and_then(|request| node::selection(&request))
    {
        Ok(selection) => selection,
        Err(refused) => return problem(refused),
    };
    let Ok(running) = app.exports.clone().try_acquire_owned() else {
        return busy(&format!("{EXPORTS_MAX} exports are running; retry"), 5);
    };
    let (mut writer, response) = Streamed::new("application/octet-stream");
    tokio::task::spawn_blocking(move || {
        let _running = running;
        // A failed export drops the writer unfinished: the client sees the body cut short.
        match node::export(&app.log, &selection, app.key.as_deref(), &mut writer) {
            Ok(_) => {
                let _ = writer.finish();
            }
            Err(e) => tracing::warn!("an export stopped: {e}"),
        }
    });
    response
}

/// Runs a long job on a blocking thread and answers with its progress and outcome as JSON
/// lines ([`wire::JobLine`]): `{"progress": {"done", "total"}}` at most ten times a second,
/// then `{"result": ...}` or `{"error": {"code", "message"}}`.
fn job<T: serde::Serialize>(
    app: Arc<App>,
    work: impl FnOnce(&App, &mut dyn FnMut(u64, u64)) -> Result<T, Problem> + Send + 'static,
) -> Response {
    let Ok(running) = app.jobs.clone().try_acquire_owned() else {
        return busy(
            &format!("{JOBS_MAX} jobs are running; retry when one ends"),
            5,
        );
    };
    let (mut writer, response) = Streamed::new("application/x-ndjson");
    tokio::task::spawn_blocking(move || {
        let _running = running;
        let mut shown = Instant::now();
        let mut progress = |done: u64, total: u64| {
            if shown.elapsed() >= Duration::from_millis(100) {
                shown = Instant::now();
                // A client that left does not stop the job: it finishes what it started.
                let line = wire::JobLine::<()>::Progress(wire::Progress { done, total });
                writer.line_if_room(&line);
            }
        };
        let outcome = match work(&app, &mut progress) {
            Ok(result) => wire::JobLine::Result(result),
            Err(e) => wire::JobLine::Error(e),
        };
        if writer.line(&outcome).is_ok() {
            let _ = writer.finish();
        }
    });
    response
}

/// A JSON request body as `T`; a refusal names the field and the rule, never the value or an
/// unknown field's name.
fn json_request<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut *de);
    let invalid = |message: String| Problem::new(Code::BadJson, message);
    if parsed.is_ok() && de.end().is_err() {
        return Err(invalid("the body has bytes after its JSON value".into()));
    }
    parsed.map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            let (line, column) = (inner.line(), inner.column());
            return invalid(format!(
                "the body is not valid JSON (line {line}, column {column})"
            ));
        }
        let text = inner.to_string();
        if let Some(name) = text
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name)
        {
            let message = format!("{name}: is missing");
            return Problem::new(Code::InvalidField, message).field(name);
        }
        if text.starts_with("unknown field") {
            // Named by the object holding it: the unknown name is the client's text.
            let message = "the body has a field this request does not take".to_owned();
            let holder = field.rsplit_once('.').map_or("", |(holder, _)| holder);
            return Problem::new(Code::InvalidField, message).field(holder);
        }
        if field == "." {
            return invalid("the body is not a JSON object of this request's fields".into());
        }
        let message = format!("{field}: a value of the wrong type or out of range");
        Problem::new(Code::InvalidField, message).field(&field)
    })
}

/// `POST /v1/jobs/rebuild`: `spool rebuild sqlite`. Rebuilding the node's own projection
/// closes the live projector's connection for the swap; it reopens on the new file.
async fn rebuild(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let request: wire::RebuildRequest = match json_request(&body) {
        Ok(r) => r,
        Err(refused) => return problem(refused),
    };
    let planned = crate::jobs::as_of(request.as_of.as_deref())
        .map_err(Problem::from)
        .and_then(|until| Ok((until, node::rebuild_target(&app.places, &request)?)));
    let (until, target) = match planned {
        Ok(planned) => planned,
        Err(refused) => return problem(refused),
    };
    // One rebuild of a target at a time; the claim ends with the job.
    let claimed = Rebuilding::claim(&app, target.path());
    let Some(claimed) = claimed else {
        return busy("this target is being rebuilt; retry when that job ends", 5);
    };
    job(app, move |app, progress| {
        let _claimed = claimed;
        let reader = app.log.read()?;
        let (partial, summary) = crate::jobs::rebuild(&reader, &target, until, progress)?;
        drop(reader);
        if let crate::jobs::RebuildTarget::Live(_) = target {
            let mut held = app.projection_db.lock().unwrap_or_else(|e| e.into_inner());
            held.take();
            crate::jobs::swap_in(partial, &target)?;
            app.projected.store(0, std::sync::atomic::Ordering::Relaxed);
            app.committed.send_replace(());
        } else {
            crate::jobs::swap_in(partial, &target)?;
        }
        Ok(summary)
    })
}

/// A target claimed by a rebuild, released when dropped.
struct Rebuilding {
    app: Arc<App>,
    path: PathBuf,
}

impl Rebuilding {
    fn claim(app: &Arc<App>, path: &Path) -> Option<Rebuilding> {
        let mut claimed = app.rebuilding.lock().unwrap_or_else(|e| e.into_inner());
        claimed.insert(path.to_owned()).then(|| Rebuilding {
            app: app.clone(),
            path: path.to_owned(),
        })
    }
}

impl Drop for Rebuilding {
    fn drop(&mut self) {
        let mut claimed = self
            .app
            .rebuilding
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        claimed.remove(&self.path);
    }
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

/// Runs a Postgres job of this node on the body's request.
fn postgres_job<T: serde::Serialize>(
    app: Arc<App>,
    body: &[u8],
    run: impl FnOnce(
            &crate::log::Reader,
            &crate::jobs::PostgresJob,
            &mut dyn FnMut(u64, u64),
        ) -> Result<T, crate::jobs::JobError>
        + Send
        + 'static,
) -> Response {
    let request: wire::PostgresRequest = match json_request(body) {
        Ok(r) => r,
        Err(refused) => return problem(refused),
    };
    job(app, move |app, progress| {
        let job = crate::jobs::PostgresJob::of(&request, app.log.origin());
        Ok(run(&app.log.read()?, &job, progress)?)
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
                None => app
                    .log
                    .read()
                    .map_err(crate::jobs::JobError::from)
                    .and_then(|reader| crate::jobs::open_projection(&reader, &app.projection))
                    .map_err(|e| e.to_string()),
            };
            let caught_up = open.and_then(|mut db| {
                let reader = app.log.read().map_err(|e| e.to_string())?;
                project::catch_up(&reader, &mut db, |_| {}).map_err(|e| e.to_string())?;
                let (position, _, _) = db.checkpoint().map_err(|e| e.to_string())?;
                let unreadable = db.unreadable().map_err(|e| e.to_string())?;
                app.projected
                    .store(position, std::sync::atomic::Ordering::Relaxed);
                app.unreadable
                    .store(unreadable, std::sync::atomic::Ordering::Relaxed);
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
