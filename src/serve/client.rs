//! The client side of the daemon's socket, for the CLI and tests: one HTTP/1.1 request over
//! the node's Unix socket.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use serde::de::DeserializeOwned;

use crate::input::AppendRequest;
use crate::node::{Node, ProgressFn};
use crate::sync::file as shipping;
use crate::wire::{
    Ack, BackfillSummary, Code, ExportRequest, Heads, IngestSummary, JobLine, LogPage, LogQuery,
    PostgresRequest, Problem, ProjectSummary, RebuildRequest, RebuildSummary, Status, VerifyReport,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to the daemon: {0}")]
    Http(#[from] hyper::Error),
    #[error("a request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("writing the daemon's answer: {0}")]
    Write(std::io::Error),
}

/// A connection to the daemon, reused for any number of requests.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    /// Connects to the daemon's socket.
    pub async fn connect(socket: &Path) -> Result<Client, ClientError> {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: socket.display().to_string(),
                source,
            })?;
        Client::over(stream).await
    }

    /// Speaks HTTP/1.1 over a connection made elsewhere (a peer's TLS stream).
    pub async fn over(
        stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    ) -> Result<Client, ClientError> {
        let io = hyper_util::rt::TokioIo::new(stream);
        let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Client { sender })
    }

    /// Sends one request; returns the status and the body.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let mut answer = Vec::new();
        let (status, _) = self
            .send(method, path, body, |_, chunk| {
                answer.extend_from_slice(chunk);
                Ok(())
            })
            .await?;
        Ok((status, answer))
    }

    /// Sends one request and hands the answer's body to `chunk` piece by piece as it arrives
    /// (a long job's progress, an export), with the answer's status; returns the status and the
    /// answer's `Retry-After` (seconds). An error from `chunk` stops the reading and is
    /// returned; so does a body the daemon cut short (a job that failed midway).
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        mut chunk: impl FnMut(u16, &[u8]) -> std::io::Result<()>,
    ) -> Result<(u16, Option<u64>), ClientError> {
        self.sender.ready().await?;
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "spool")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                chunk(status, &data).map_err(ClientError::Write)?;
            }
        }
        Ok((status, retry_after))
    }
}

/// The node as the daemon serves it on its socket: every [`Node`] method is one request, and
/// the answer is read into the same wire type the daemon rendered.
pub struct Remote {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

/// How long in all a request the daemon answered `busy` keeps being sent again (each time
/// after its `Retry-After`), before the refusal is the answer.
const BUSY_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(30);
/// An ingest is sent in pieces of the size the log ingests a file in (each piece is durable
/// before the next is sent; the daemon's request limit is larger).
const INGEST_PIECE_EVENTS: usize = shipping::INGEST_BATCH_EVENTS;
const INGEST_PIECE_BYTES: usize = shipping::INGEST_BATCH_BYTES;

impl Remote {
    /// Connects to the daemon's socket: `None` when no daemon answers there (no socket, or a
    /// stale one). A socket this user may not use is an error naming it and the remedy.
    pub fn connect(socket: &Path) -> Result<Option<Remote>, Problem> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Problem::new(Code::Internal, format!("starting a runtime: {e}")))?;
        match runtime.block_on(Client::connect(socket)) {
            Ok(client) => Ok(Some(Remote { runtime, client })),
            Err(ClientError::Connect { source, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Err(Problem::new(
                    Code::Unavailable,
                    format!(
                        "{}: permission denied: `spool serve` holds this node's log and its socket \
                         does not let this user connect; run as the daemon's user, or set \
                         `[serve] socket_group` (and `socket_mode = \"0660\"`) in spool.toml \
                         and join that group",
                        socket.display()
                    ),
                ))
            }
            Err(_) => Ok(None),
        }
    }

    /// One request, its answer read as `T`; a refusal as the daemon's [`Problem`]. A `busy`
    /// answer is retried after its `Retry-After` when `retry` says so.
    fn call<T: DeserializeOwned>(
        &mut self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        retry: bool,
    ) -> Result<T, Problem> {
        let mut waited = std::time::Duration::ZERO;
        loop {
            let mut answer = Vec::new();
            let (status, retry_after) = self
                .runtime
                .block_on(self.client.send(method, path, body.clone(), |_, chunk| {
                    answer.extend_from_slice(chunk);
                    Ok(())
                }))
                .map_err(lost)?;
            if status == 200 {
                return serde_json::from_slice(&answer).map_err(|e| unreadable(&e));
            }
            let problem = refusal(status, &answer, retry_after);
            let wait =
                std::time::Duration::from_secs(problem.retry_after.unwrap_or(1).clamp(1, 30));
            if problem.code != Code::Busy || !retry || waited + wait > BUSY_WAIT_MAX {
                return Err(problem);
            }
            std::thread::sleep(wait);
            waited += wait;
        }
    }

    /// A long job: its progress lines shown through `progress`, then its result or error.
    fn job<T: DeserializeOwned>(
        &mut self,
        path: &str,
        body: Vec<u8>,
        progress: ProgressFn,
    ) -> Result<T, Problem> {
        let mut pending = Vec::new();
        let mut outcome: Option<Result<T, Problem>> = None;
        let mut refused = Vec::new();
        let (status, retry_after) = self
            .runtime
            .block_on(self.client.send("POST", path, body, |status, piece| {
                if status != 200 {
                    refused.extend_from_slice(piece);
                    return Ok(());
                }
                pending.extend_from_slice(piece);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    match serde_json::from_slice::<JobLine<T>>(&line) {
                        Ok(JobLine::Progress(p)) => progress(p.done, p.total),
                        Ok(JobLine::Result(result)) => outcome = Some(Ok(result)),
                        Ok(JobLine::Error(problem)) => outcome = Some(Err(problem)),
                        Err(e) => return Err(std::io::Error::other(e)),
                    }
                }
                Ok(())
            }))
            .map_err(lost)?;
        if status != 200 {
            return Err(refusal(status, &refused, retry_after));
        }
        outcome.unwrap_or_else(|| {
            Err(Problem::new(
                Code::Unavailable,
                "spool serve stopped before the job finished",
            ))
        })
    }
}

/// The daemon's refusal body as a [`Problem`] (one that is not one says so, with the status).
fn refusal(status: u16, body: &[u8], retry_after: Option<u64>) -> Problem {
    let mut problem = serde_json::from_slice::<Problem>(body).unwrap_or_else(|_| {
        Problem::new(
            Code::Unknown,
            format!("spool serve answered {status} without a readable reason"),
        )
    });
    problem.retry_after = retry_after;
    problem
}

fn lost(error: ClientError) -> Problem {
    Problem::new(Code::Unavailable, format!("spool serve: {error}"))
}

fn unreadable(error: &serde_json::Error) -> Problem {
    Problem::new(
        Code::Internal,
        format!("spool serve's answer is not what this client reads ({error}); are both the same version?"),
    )
}

fn json(value: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Pairing runs in the daemon only (its peers' door takes the joins).
impl Remote {
    pub fn pair_code(
        &mut self,
        request: &crate::wire::PairCodeRequest,
    ) -> Result<crate::wire::PairCode, Problem> {
        self.call("POST", "/v1/pair/code", json(request), false)
    }

    pub fn pairings(&mut self) -> Result<Vec<crate::wire::Pairing>, Problem> {
        self.call("GET", "/v1/pair", Vec::new(), false)
    }

    pub fn pair_cancel(
        &mut self,
        request: &crate::wire::PairCancel,
    ) -> Result<serde_json::Value, Problem> {
        self.call("POST", "/v1/pair/cancel", json(request), false)
    }
}

impl Node for Remote {
    fn append(&mut self, requests: Vec<AppendRequest>) -> Result<Vec<Ack>, Problem> {
        self.call("POST", "/v1/events", json(&requests), true)
    }

    fn status(&mut self) -> Result<Status, Problem> {
        self.call("GET", "/v1/status", Vec::new(), false)
    }

    fn heads(&mut self) -> Result<Heads, Problem> {
        self.call("GET", "/v1/heads", Vec::new(), false)
    }

    fn log(&mut self, query: &LogQuery) -> Result<LogPage, Problem> {
        let query = serde_urlencoded::to_string(query)
            .map_err(|e| Problem::new(Code::Internal, e.to_string()))?;
        self.call("GET", &format!("/v1/log?{query}"), Vec::new(), false)
    }

    fn verify(&mut self) -> Result<VerifyReport, Problem> {
        self.call("GET", "/v1/verify", Vec::new(), true)
    }

    fn export(&mut self, request: &ExportRequest, out: &mut dyn Write) -> Result<u64, Problem> {
        let mut tail: Vec<u8> = Vec::new();
        let mut refused = Vec::new();
        let (status, retry_after) = self
            .runtime
            .block_on(
                self.client
                    .send("POST", "/v1/export", json(request), |status, piece| {
                        if status != 200 {
                            refused.extend_from_slice(piece);
                            return Ok(());
                        }
                        out.write_all(piece)?;
                        tail.extend_from_slice(piece);
                        tail.drain(..tail.len().saturating_sub(shipping::TRAILER_BYTES));
                        Ok(())
                    }),
            )
            .map_err(lost)?;
        if status != 200 {
            return Err(refusal(status, &refused, retry_after));
        }
        shipping::trailer_count(&tail).ok_or_else(|| {
            Problem::new(
                Code::Unavailable,
                "the daemon's export ended without its trailer",
            )
        })
    }

    /// The file's frames are checked here and sent in bounded pieces, each an export file of
    /// its own; the summaries add up to the one a single ingest gives.
    fn ingest(&mut self, input: Box<dyn Read + Send>) -> Result<IngestSummary, Problem> {
        match shipping::ExportReader::new(input) {
            Ok(reader) => in_pieces(reader, |body| self.call("POST", "/v1/ingest", body, true)),
            Err(e) => Ok(IngestSummary {
                ok: false,
                stopped: Some(e.to_string()),
                ..Default::default()
            }),
        }
    }

    fn rebuild(
        &mut self,
        request: &RebuildRequest,
        progress: ProgressFn,
    ) -> Result<RebuildSummary, Problem> {
        self.job("/v1/jobs/rebuild", json(request), progress)
    }

    fn project_postgres(
        &mut self,
        request: &PostgresRequest,
        progress: ProgressFn,
    ) -> Result<ProjectSummary, Problem> {
        self.job("/v1/jobs/project-postgres", json(request), progress)
    }

    fn backfill_postgres(
        &mut self,
        request: &PostgresRequest,
        progress: ProgressFn,
    ) -> Result<BackfillSummary, Problem> {
        self.job("/v1/jobs/backfill-postgres", json(request), progress)
    }

    /// Waits (at most [`PROJECTED_WAIT`]) until the daemon's projection holds every event its
    /// log held when asked, so a read follows the writes before it.
    fn projection(&mut self) -> Result<PathBuf, Problem> {
        let started = std::time::Instant::now();
        let first = self.status()?;
        let mut status = first.clone();
        loop {
            let projected = status.daemon.as_ref().map_or(0, |d| d.projected);
            if projected >= first.events {
                break;
            }
            if started.elapsed() > PROJECTED_WAIT {
                tracing::warn!(
                    "the projection is {} events behind the log; reading it as it is",
                    first.events.saturating_sub(projected)
                );
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            status = self.status()?;
        }
        Ok(PathBuf::from(&status.home).join(crate::jobs::PROJECTION))
    }
}

/// Sends an export's frames as bounded pieces (at most [`INGEST_PIECE_EVENTS`] events and
/// about [`INGEST_PIECE_BYTES`] bytes), each an export file of its own with the signed heads
/// that came with its events, through `send` (a node's `/v1/ingest`); stops at the first piece
/// not taken whole. The summaries add up to the one a single ingest gives.
pub fn in_pieces<R: Read>(
    mut reader: shipping::ExportReader<R>,
    mut send: impl FnMut(Vec<u8>) -> Result<IngestSummary, Problem>,
) -> Result<IngestSummary, Problem> {
    let mut total = IngestSummary {
        ok: true,
        ..Default::default()
    };
    loop {
        let mut piece = shipping::ExportWriter::new(Vec::new())
            .map_err(|e| Problem::new(Code::Internal, e.to_string()))?;
        let (mut events, mut bytes, mut file_error) = (0, 0, None);
        while events < INGEST_PIECE_EVENTS && bytes < INGEST_PIECE_BYTES {
            match reader.next_frame() {
                Ok(Some(frame)) => {
                    // With its signed head, if one came with it: a piece never parts them.
                    piece
                        .push_shipped(&frame.shipped)
                        .map_err(|e| Problem::new(Code::Internal, e.to_string()))?;
                    events += 1;
                    bytes += frame.shipped.bytes.len();
                }
                Ok(None) => break,
                Err(e) => {
                    file_error = Some(e);
                    break;
                }
            }
        }
        if events > 0 {
            let (_, body) = piece
                .finish()
                .map_err(|e| Problem::new(Code::Internal, e.to_string()))?;
            let answer = send(body)?;
            total.add(&answer);
            if !answer.ok {
                return Ok(total);
            }
        }
        if let Some(e) = file_error {
            total.ok = false;
            total.stopped = Some(format!("{e}; everything before it was ingested"));
            return Ok(total);
        }
        if events < INGEST_PIECE_EVENTS && bytes < INGEST_PIECE_BYTES {
            return Ok(total);
        }
    }
}

/// Longest wait for the daemon's projection to reach the log's end before reading it anyway.
const PROJECTED_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
