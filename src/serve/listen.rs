//! The daemon's doors: accepting connections on the socket and on loopback HTTP, and the bounds
//! every connection and request lives within. A client may lie, stall or flood; none of that may
//! hold the daemon, its memory or its shutdown.
//!
//! - At most [`CONNECTIONS_MAX`] connections at once (both listeners together); one more is told
//!   503 and closed, and the descriptors left keep the log and its readers working.
//! - A request head must arrive within [`HEAD_TIMEOUT`] (also how long an idle keep-alive
//!   connection is kept), and a whole body within [`BODY_TIMEOUT`].
//! - Bodies held in memory across all requests are bounded by [`BODIES_BYTES_MAX`]: a request
//!   takes its share before its bytes are read, and a request waits (not reading) while the
//!   budget is spent.
//! - SIGTERM: every connection is asked to finish its request and close; after
//!   [`DRAIN_TIMEOUT`] the connections left are closed (only durable events were acknowledged).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use axum::Router;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use super::reply::refuse;
use crate::wire::Code;

/// Connections served at once, on both listeners.
pub const CONNECTIONS_MAX: usize = 512;
/// Time to send a request's head, and how long an idle connection is kept.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to send a request's whole body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Request bodies held in memory at once, across every connection: one batch of the largest
/// size, or many smaller ones.
pub const BODIES_BYTES_MAX: usize = crate::input::BATCH_BYTES_MAX;
/// How long SIGTERM waits for open requests before closing their connections.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The budget's unit: permits are KiB, so the whole budget fits a semaphore's `u32` requests.
const BUDGET_UNIT: usize = 1024;

/// The answer to a connection beyond [`CONNECTIONS_MAX`], written without reading anything.
const FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
retry-after: 1\r\nconnection: close\r\ncontent-length: 79\r\n\r\n\
{\"code\":\"busy\",\"message\":\"too many connections: the daemon serves 512 at once\"}";

/// What the accept loops share.
#[derive(Clone)]
pub struct Doors {
    connections: Arc<Semaphore>,
    bodies: Arc<Semaphore>,
}

impl Default for Doors {
    fn default() -> Doors {
        Doors {
            connections: Arc::new(Semaphore::new(CONNECTIONS_MAX)),
            bodies: Arc::new(Semaphore::new(BODIES_BYTES_MAX / BUDGET_UNIT)),
        }
    }
}

/// Who is at the other end of a peer connection: the node key its TLS handshake proved.
#[derive(Clone, Copy, Debug)]
pub struct Caller(pub crate::identity::PublicKey);

/// A listener: the Unix socket, a TCP address, or the peers' TLS address.
pub trait Listener: Send + 'static {
    /// What `accept` gives.
    type Raw: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// What requests are read from.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Whether a connection beyond the cap is told so in plain HTTP (not on a TLS door).
    const PLAIN: bool = true;
    fn accept_stream(&self) -> impl Future<Output = std::io::Result<Self::Raw>> + Send;
    /// Readies an accepted connection for requests (the TLS handshake, within
    /// [`HEAD_TIMEOUT`]), on the connection's own task; `None` ends it.
    fn ready(
        &self,
        raw: Self::Raw,
    ) -> impl Future<Output = Option<(Self::Stream, Option<Caller>)>> + Send + 'static;
}

impl Listener for tokio::net::UnixListener {
    type Raw = tokio::net::UnixStream;
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> std::io::Result<Self::Raw> {
        self.accept().await.map(|(stream, _)| stream)
    }
    fn ready(
        &self,
        raw: Self::Raw,
    ) -> impl Future<Output = Option<(Self::Stream, Option<Caller>)>> + Send + 'static {
        std::future::ready(Some((raw, None)))
    }
}

impl Listener for tokio::net::TcpListener {
    type Raw = tokio::net::TcpStream;
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> std::io::Result<Self::Raw> {
        let (stream, _) = self.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
    fn ready(
        &self,
        raw: Self::Raw,
    ) -> impl Future<Output = Option<(Self::Stream, Option<Caller>)>> + Send + 'static {
        std::future::ready(Some((raw, None)))
    }
}

/// The peers' door: TCP on any address, TLS with the node key (`peertls`); a connection whose
/// key the acceptor's verifier refuses, that speaks plaintext, or that does not finish its
/// handshake within [`HEAD_TIMEOUT`] is closed before any request is read.
pub struct TlsListener {
    pub tcp: tokio::net::TcpListener,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl Listener for TlsListener {
    type Raw = tokio::net::TcpStream;
    type Stream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    const PLAIN: bool = false;
    async fn accept_stream(&self) -> std::io::Result<Self::Raw> {
        self.tcp.accept_stream().await
    }
    fn ready(
        &self,
        raw: Self::Raw,
    ) -> impl Future<Output = Option<(Self::Stream, Option<Caller>)>> + Send + 'static {
        let acceptor = self.acceptor.clone();
        async move {
            let address = raw.peer_addr().ok();
            let tls = match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(raw)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    // Debug only: anyone who can reach the port could fill the log.
                    tracing::debug!(?address, "a peer connection was refused: {e}");
                    return None;
                }
                Err(_) => {
                    tracing::debug!(?address, "a peer did not finish its TLS handshake");
                    return None;
                }
            };
            let key = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(crate::peertls::key_of)?;
            Some((tls, Some(Caller(key))))
        }
    }
}

impl Doors {
    /// Serves `router` on `listener` until `stop` turns true, then drains (see the module).
    pub async fn serve<L: Listener>(
        &self,
        listener: L,
        router: Router,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut connections = tokio::task::JoinSet::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT);
        loop {
            let stream = tokio::select! {
                accepted = listener.accept_stream() => accepted,
                _ = stop.wait_for(|stopping| *stopping) => break,
                // Reap finished connections as they end, so the set stays as large as what is open.
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let stream = match stream {
                Ok(stream) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: wait for some to be closed.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                if L::PLAIN {
                    connections.spawn(turn_away(stream));
                }
                continue;
            };
            let ready = listener.ready(stream);
            let (router, http) = (router.clone(), http.clone());
            let mut stop = stop.clone();
            connections.spawn(async move {
                let _permit = permit;
                let Some((stream, caller)) = ready.await else {
                    return;
                };
                let router = match caller {
                    Some(caller) => router.layer(axum::Extension(caller)),
                    None => router,
                };
                let service = hyper_util::service::TowerToHyperService::new(router);
                let connection =
                    http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => return,
                    _ = stop.wait_for(|stopping| *stopping) => {}
                }
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            });
        }
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "{} connections were still open {DRAIN_TIMEOUT:?} after the stop; closed",
                connections.len()
            );
            connections.abort_all();
        }
    }

    /// Middleware: reads the request's body within its limit, [`BODY_TIMEOUT`] and the shared
    /// budget, before any handler sees it; the share is returned when the answer is made.
    pub async fn read_body(
        &self,
        request: Request,
        limit: usize,
        next: axum::middleware::Next,
    ) -> Response {
        let (parts, body) = request.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return too_large(limit);
        }
        let read = tokio::time::timeout(BODY_TIMEOUT, self.collect(body, limit, declared)).await;
        let (bytes, share) = match read {
            Ok(Ok(read)) => read,
            Ok(Err(refusal)) => return refusal,
            Err(_) => {
                let mut response = refuse(
                    Code::Timeout,
                    format!("the request's body did not arrive within {BODY_TIMEOUT:?}"),
                );
                close(&mut response);
                return response;
            }
        };
        let response = next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await;
        drop(share);
        response
    }

    /// The body's bytes and their share of the budget: the declared length taken at once (so
    /// two large requests cannot each hold half and wait for the rest), else piece by piece.
    async fn collect(
        &self,
        body: Body,
        limit: usize,
        declared: Option<u64>,
    ) -> Result<(Vec<u8>, Option<tokio::sync::OwnedSemaphorePermit>), Response> {
        let units = |bytes: usize| bytes.div_ceil(BUDGET_UNIT) as u32;
        let mut share: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let mut taken = 0u32;
        if let Some(n) = declared.filter(|&n| n > 0) {
            taken = units(n as usize);
            share = Some(self.take(taken).await?);
        }
        // A declared length is a claim: memory is taken as bytes arrive, not for the claim.
        const CLAIMED_BYTES_TAKEN_MAX: u64 = 1024 * 1024;
        let mut bytes =
            Vec::with_capacity(declared.unwrap_or(0).min(CLAIMED_BYTES_TAKEN_MAX) as usize);
        let mut stream = body.into_data_stream();
        while let Some(piece) = stream.next().await {
            let piece =
                piece.map_err(|_| refuse(Code::BadJson, "the request's body was cut short"))?;
            if bytes.len() + piece.len() > limit {
                return Err(too_large(limit));
            }
            bytes.extend_from_slice(&piece);
            let needed = units(bytes.len());
            if needed > taken {
                let more = self.take(needed - taken).await?;
                taken = needed;
                match &mut share {
                    Some(share) => share.merge(more),
                    None => share = Some(more),
                }
            }
        }
        Ok((bytes, share))
    }

    async fn take(&self, units: u32) -> Result<tokio::sync::OwnedSemaphorePermit, Response> {
        self.bodies
            .clone()
            .acquire_many_owned(units)
            .await
            .map_err(|_| refuse(Code::Unavailable, "the daemon is stopping"))
    }
}

/// 413, closing the connection: the body it did not read cannot be skipped.
fn too_large(limit: usize) -> Response {
    let mut response = refuse(
        Code::TooLarge,
        format!("the request's body is over the limit of {limit} bytes"),
    );
    close(&mut response);
    response
}

/// Marks an answer as the connection's last.
pub fn close(response: &mut Response) {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// Tells a connection beyond the cap that the daemon is full, without reading from it.
async fn turn_away<S: AsyncWrite + Unpin>(mut stream: S) {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(FULL)).await;
}

/// Raises this process's descriptor limit to what it may (the hard limit), so the cap of
/// connections, the log, its readers and the projection fit; best effort.
pub fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max.min(65_536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    /// A handler that panics answers 500 `internal` in JSON, and the daemon serves the next
    /// request: the panic is caught, not a dropped connection.
    #[test]
    fn a_handler_that_panics_answers_internal_and_the_next_request_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let stop = tokio::sync::watch::Sender::new(false);
        let router = axum::Router::new()
            .route(
                "/boom",
                axum::routing::get(|| async {
                    let v: Vec<u8> = Vec::new();
                    v[1].to_string()
                }),
            )
            .route("/fine", axum::routing::get(|| async { "fine" }))
            .layer(axum::middleware::from_fn(super::super::reply::catch_panic))
            .layer(axum::middleware::from_fn(
                super::super::reply::json_failures,
            ));
        let listener = runtime
            .block_on(async { tokio::net::UnixListener::bind(&path) })
            .unwrap();
        let doors = super::Doors::default();
        let served = runtime.spawn({
            let stop = stop.subscribe();
            async move { doors.serve(listener, router, stop).await }
        });
        let get = |route: &str| {
            let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
            write!(
                s,
                "GET {route} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            answer
        };
        let answer = get("/boom");
        assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
        assert!(answer.contains(r#""code":"internal""#), "{answer}");
        assert!(get("/fine").ends_with("fine"));
        stop.send_replace(true);
        runtime.block_on(served).unwrap();
    }

    #[test]
    fn the_full_answer_declares_its_length() {
        let text = std::str::from_utf8(super::FULL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(body.contains(&super::CONNECTIONS_MAX.to_string()));
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }
}
