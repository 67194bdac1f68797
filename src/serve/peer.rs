//! Sync between peers: one exchange (`spool sync peer`), and the daemon's thread for each peer of
//! `[[peers]]`. Over TLS with the node keys (`peertls`: each side proves its key and must be a
//! current member of the other's fleet), the same protocol as files and the hub: version
//! vectors, every origin's events the other lacks as an export stream with its signed heads,
//! applied in causal order by the receiver's ingest (hash, chain, signature, membership, field
//! rules).
//!
//! An exchange runs both directions at once, each on a connection and a thread of its own:
//! - the push sends this node's export since the peer's heads to the peer's `/v1/ingest` in
//!   bounded pieces, each a whole export file, each answered once durable there;
//! - the pull reads the peer's `/v1/export` since this node's heads as it arrives, through a
//!   channel of [`PULL_CHUNKS`] chunks, into this node's ingest: when the log is slower than the
//!   network the channel fills, the socket is no longer read, and TCP holds the peer back.
//!
//! A cut loses at most what was in flight: every piece and batch applied stays applied, and the
//! next exchange starts from the heads. The daemon's thread runs an exchange when this node
//! commits, when the peer holds something new (a long poll, `/v1/peer/wait`), and at least every
//! [`EXCHANGE_EVERY`]; after a failure it waits 1 s, doubling to 60 s.

use std::sync::Arc;
use std::time::Duration;

use super::client::{in_pieces, Client};
use crate::event::Origin;
use crate::identity::{NodeKey, PublicKey};
use crate::log::Log;
use crate::peertls::Admit;
use crate::sync::file as shipping;
use crate::wire::{ExportRequest, Heads, IngestSummary, PeerState, PeerSummary, PeerWait};

/// Connecting (TCP, then the TLS handshake) may take this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer that sends nothing of an answer for this long is given up.
pub const SILENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a long poll of the peer waits for something new (the peer answers by then).
pub const WAIT: Duration = Duration::from_secs(25);
/// An exchange at least this often, woken or not: a missed wake only delays.
pub const EXCHANGE_EVERY: Duration = Duration::from_secs(30);
/// Export chunks in flight between the socket and this node's ingest.
pub const PULL_CHUNKS: usize = 16;
/// Waits between failed attempts grow to this.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// A peer to reach: where, and whom this node accepts there.
#[derive(Clone)]
pub struct Link {
    pub address: String,
    tls: tokio_rustls::TlsConnector,
}

impl Link {
    /// A link to `address`, presenting `key`; the peer's key must be one `admit` takes.
    pub fn new(address: &str, key: &NodeKey, admit: Admit) -> Result<Link, String> {
        let config = crate::peertls::client_config(key, admit)?;
        Ok(Link {
            address: address.to_owned(),
            tls: tokio_rustls::TlsConnector::from(config),
        })
    }

    /// TCP, then TLS, within [`CONNECT_TIMEOUT`]; the client, and the key the peer proved.
    pub async fn connect(&self) -> Result<(Client, PublicKey), String> {
        let connecting = async {
            let tcp = tokio::net::TcpStream::connect(&self.address)
                .await
                .map_err(|e| format!("connecting to {}: {e}", self.address))?;
            let _ = tcp.set_nodelay(true);
            let tls = self
                .tls
                .connect(crate::peertls::server_name(), tcp)
                .await
                .map_err(|e| format!("the TLS handshake with {}: {e}", self.address))?;
            let key = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(crate::peertls::key_of)
                .ok_or_else(|| format!("{} presented no node key", self.address))?;
            let client = Client::over(tls)
                .await
                .map_err(|e| format!("{}: {e}", self.address))?;
            Ok((client, key))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| {
                format!(
                    "{}: no connection within {} s",
                    self.address,
                    CONNECT_TIMEOUT.as_secs()
                )
            })?
    }
}

/// Whether `key` belongs to a current member of this node's fleet (a node of no fleet, made
/// before keys, has no peers).
pub fn member_key(log: &Log, key: &PublicKey) -> bool {
    let origin = crate::identity::origin_of(key);
    match log.fleet() {
        Ok(Some(fleet)) => fleet.member(origin).is_some_and(|m| m.revoked.is_none()),
        _ => false,
    }
}

/// Who this node accepts at the other end: whom `member` takes (a current member of the fleet,
/// see [`member_key`]), and only `pinned` if one is given.
pub fn admit(
    member: impl Fn(&PublicKey) -> bool + Send + Sync + 'static,
    pinned: Option<Origin>,
) -> Admit {
    Arc::new(move |key: &PublicKey| {
        pinned.is_none_or(|p| p == crate::identity::origin_of(key)) && member(key)
    })
}

/// A runtime for one connection's thread.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime: {e}"))
}

/// One request with its answer read whole as `T`, each read of it within [`SILENT_TIMEOUT`].
async fn call<T: serde::de::DeserializeOwned>(
    client: &mut Client,
    address: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<T, String> {
    let (status, answer) = tokio::time::timeout(SILENT_TIMEOUT, client.request(method, path, body))
        .await
        .map_err(|_| format!("{address}: no answer to {path} within {SILENT_TIMEOUT:?}"))?
        .map_err(|e| format!("{address}: {path}: {e}"))?;
    if status != 200 {
        let said = serde_json::from_slice::<crate::wire::Problem>(&answer)
            .map(|p| p.message)
            .unwrap_or_else(|_| "no reason given".into());
        return Err(format!("{address} refused {path} ({status}): {said}"));
    }
    serde_json::from_slice(&answer)
        .map_err(|e| format!("{address}: {path}: an unreadable answer: {e}"))
}

/// Which ways an exchange runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ways {
    /// Send what the peer lacks.
    pub push: bool,
    /// Take what this node lacks.
    pub pull: bool,
}

impl Ways {
    pub const BOTH: Ways = Ways {
        push: true,
        pull: true,
    };
}

/// One exchange with the peer at `link`: both directions at once.
pub fn exchange(log: &Log, signer: Option<&NodeKey>, link: &Link) -> Result<PeerSummary, String> {
    exchange_ways(log, signer, link, Ways::BOTH)
}

/// One exchange, the ways asked (at least one), each on its own connection and thread.
pub fn exchange_ways(
    log: &Log,
    signer: Option<&NodeKey>,
    link: &Link,
    ways: Ways,
) -> Result<PeerSummary, String> {
    let (pushed, pulled) = std::thread::scope(|s| {
        let push = ways.push.then(|| s.spawn(|| push(log, signer, link)));
        let pull = ways.pull.then(|| s.spawn(|| pull(log, link)));
        let joined = |h: Option<std::thread::ScopedJoinHandle<'_, _>>, what: &str| {
            h.map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(format!("the {what} thread failed")))
            })
        };
        (joined(push, "push"), joined(pull, "pull"))
    });
    let (peer_a, sent) = pushed.transpose()?.unzip();
    let (peer_b, received) = pulled.transpose()?.unzip();
    let (sent, received) = (sent.unwrap_or_default(), received.unwrap_or_default());
    let refused = [&sent, &received]
        .into_iter()
        .find_map(|s| s.stopped.clone().filter(|_| !s.ok));
    Ok(PeerSummary {
        peer: peer_a.or(peer_b).map(|k| crate::identity::origin_of(&k)),
        sent: sent.read.saturating_sub(sent.duplicates),
        sent_applied: sent.applied + sent.released,
        received: received.read,
        applied: received.applied,
        released: received.released,
        waiting: received.waited,
        refused,
        divergent: false,
    })
}

/// Whether the peer's projection covers the same events as this node's (`own`) and has
/// another digest: a divergence. `false` when the two cover different events (one is behind).
pub fn diverges(
    link: &Link,
    own: Option<(crate::sync::Vector, crate::event::Hash)>,
) -> Result<bool, String> {
    let Some((covers, digest)) = own else {
        return Ok(false);
    };
    let runtime = runtime()?;
    let theirs: Option<crate::wire::ProjectionDigest> = runtime.block_on(async {
        let (mut client, _) = link.connect().await?;
        call(
            &mut client,
            &link.address,
            "GET",
            "/v1/peer/digest",
            Vec::new(),
        )
        .await
    })?;
    Ok(theirs.is_some_and(|t| t.covers == covers.0 && t.digest != digest.to_hex()))
}

/// This node's export since the peer's heads, to the peer's ingest in pieces.
fn push(
    log: &Log,
    signer: Option<&NodeKey>,
    link: &Link,
) -> Result<(PublicKey, IngestSummary), String> {
    let runtime = runtime()?;
    let (mut client, peer) = runtime.block_on(link.connect())?;
    let theirs: Heads = runtime.block_on(call(
        &mut client,
        &link.address,
        "GET",
        "/v1/heads",
        Vec::new(),
    ))?;
    let selection = crate::sync::Selection {
        since: crate::sync::Vector(theirs),
        origins: Vec::new(),
    };
    let reader = log.read().map_err(|e| e.to_string())?;
    let (sent, written) = shipping::through_pipe(&reader, &selection, signer, |exported| {
        let reader = shipping::ExportReader::new(std::io::BufReader::new(exported))
            .map_err(|e| e.to_string())?;
        in_pieces(reader, |body| {
            runtime
                .block_on(call(&mut client, &link.address, "POST", "/v1/ingest", body))
                .map_err(|e| crate::wire::Problem::new(crate::wire::Code::Unavailable, e))
        })
        .map_err(|p| p.message)
    })
    .map_err(|e| format!("a pipe: {e}"))?;
    // A refusal by the peer ends the reading early, and with it the export's pipe.
    match sent {
        Ok(sent) if !sent.ok => Ok((peer, sent)),
        Ok(sent) => written
            .map(|()| (peer, sent))
            .map_err(|e| format!("reading this node's log to send it: {e}")),
        Err(e) => Err(e),
    }
}

/// The peer's export since this node's heads, into this node's ingest as it arrives.
fn pull(log: &Log, link: &Link) -> Result<(PublicKey, IngestSummary), String> {
    let runtime = runtime()?;
    let (mut client, peer) = runtime.block_on(link.connect())?;
    let ours = crate::node::heads(log).map_err(|p| p.message)?;
    let request = ExportRequest {
        origins: Vec::new(),
        since: Some(serde_json::to_string(&ours).unwrap_or_default()),
    };
    let body = serde_json::to_vec(&request).unwrap_or_default();
    let (chunks, arriving) = std::sync::mpsc::sync_channel::<Vec<u8>>(PULL_CHUNKS);
    std::thread::scope(|s| {
        let ingest = s.spawn(move || {
            let input = ChannelReader {
                arriving,
                current: Vec::new(),
                at: 0,
            };
            crate::node::ingest(log, input).map_err(|p| p.message)
        });
        let mut refused = Vec::new();
        let read = runtime.block_on(async {
            tokio::time::timeout(
                SILENT_TIMEOUT * 10,
                client.send("POST", "/v1/export", body, |status, piece| {
                    if status != 200 {
                        refused.extend_from_slice(piece);
                        return Ok(());
                    }
                    // Blocks while ingest is behind: backpressure to the socket.
                    chunks
                        .send(piece.to_vec())
                        .map_err(|_| std::io::Error::other("ingest stopped"))
                }),
            )
            .await
        });
        drop(chunks);
        let ingested = ingest
            .join()
            .unwrap_or_else(|_| Err("the ingest thread failed".into()));
        match read {
            Ok(Ok((200, _))) => {}
            Ok(Ok((status, _))) => {
                let said = serde_json::from_slice::<crate::wire::Problem>(&refused)
                    .map(|p| p.message)
                    .unwrap_or_else(|_| "no reason given".into());
                return Err(format!(
                    "{} refused /v1/export ({status}): {said}",
                    link.address
                ));
            }
            // Cut short: what arrived whole was ingested; ingest names where it stopped.
            Ok(Err(_)) | Err(_) => {}
        }
        ingested.map(|summary| (peer, summary))
    })
}

/// The bytes of a channel of chunks, as a reader.
struct ChannelReader {
    arriving: std::sync::mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.current.len() {
            match self.arriving.recv() {
                Ok(chunk) => (self.current, self.at) = (chunk, 0),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Waits (on a connection of its own) until the peer holds something `since` lacks, or
/// [`WAIT`] passes; the peer's state.
pub async fn wait_for_news(link: &Link, since: Heads) -> Result<PeerState, String> {
    let (mut client, _) = link.connect().await?;
    let request = PeerWait {
        since,
        wait_ms: WAIT.as_millis() as u64,
    };
    let body = serde_json::to_vec(&request).unwrap_or_default();
    call(&mut client, &link.address, "POST", "/v1/peer/wait", body).await
}

/// Whether `theirs` holds an event `ours` lacks.
pub fn ahead(theirs: &Heads, ours: &Heads) -> bool {
    theirs
        .iter()
        .any(|(origin, seq)| ours.get(origin).is_none_or(|s| s < seq))
}

/// The daemon's thread for the peer at `index` of `[[peers]]`.
pub(super) fn keep_synced(app: &Arc<super::App>, index: usize, link: Link) {
    let Ok(runtime) = runtime() else {
        return;
    };
    let mut stopping = app.stopping.subscribe();
    let mut committed = app.committed.subscribe();
    let mut backoff = Duration::from_secs(1);
    let report = |change: &dyn Fn(&mut crate::wire::PeerStatus)| {
        let mut peers = app.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(status) = peers.get_mut(index) {
            change(status);
        }
    };
    runtime.block_on(async {
        // What is due: both ways at first, after a failure and every EXCHANGE_EVERY; a push
        // when this node committed; a pull when the peer holds something new.
        let mut due = Ways::BOTH;
        let none = Ways {
            push: false,
            pull: false,
        };
        let mut waiting: Option<std::pin::Pin<Box<dyn std::future::Future<Output = _>>>> = None;
        loop {
            if *stopping.borrow() {
                return;
            }
            if due != none {
                let ways = std::mem::replace(&mut due, none);
                committed.mark_unchanged();
                let (app2, link2) = (app.clone(), link.clone());
                let done = tokio::task::spawn_blocking(move || {
                    let outcome = exchange_ways(&app2.log, app2.key.as_deref(), &link2, ways);
                    let ours = crate::node::heads(&app2.log).unwrap_or_default();
                    (outcome, ours)
                })
                .await;
                match done {
                    Ok((Ok(summary), _)) => {
                        backoff = Duration::from_secs(1);
                        if ways == Ways::BOTH && summary.sent + summary.received == 0 {
                            // Both hold the same events: once their projections have caught
                            // up, their digests must agree.
                            let (app2, link2) = (app.clone(), link.clone());
                            let compared = tokio::task::spawn_blocking(move || {
                                let own = app2.digests.get(&app2.projection).ok().flatten();
                                diverges(&link2, own)
                            })
                            .await;
                            if let Ok(Ok(divergent)) = compared {
                                report(&|s| s.divergent = divergent);
                            }
                        }
                        if summary.applied + summary.released > 0 {
                            app.committed.send_replace(());
                            committed.mark_unchanged();
                        }
                        report(&|s| {
                            s.reachable = true;
                            s.peer = summary.peer;
                            s.syncs += 1;
                            s.last_sync_ms = now_ms();
                            s.sent += summary.sent;
                            s.received += summary.received;
                            s.last_error = summary.refused.clone();
                        });
                    }
                    Ok((Err(error), _)) => {
                        tracing::warn!(peer = %link.address, %error, "peer sync");
                        report(&|s| {
                            s.reachable = false;
                            s.last_error = Some(error.clone());
                        });
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = stopping.wait_for(|s| *s) => return,
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        due = Ways::BOTH;
                        continue;
                    }
                    Err(_) => return,
                }
            }
            if waiting.is_none() {
                let ours = crate::node::heads(&app.log).unwrap_or_default();
                let link = link.clone();
                waiting = Some(Box::pin(async move {
                    let state = wait_for_news(&link, ours.clone()).await;
                    (state, ours)
                }));
            }
            let Some(wait) = waiting.as_mut() else {
                continue;
            };
            tokio::select! {
                (state, since) = wait => {
                    waiting = None;
                    match state {
                        Ok(state) => {
                            let lag = lag(&state.heads, &since);
                            report(&|s| s.lag_events = lag);
                            due.pull |= ahead(&state.heads, &since);
                        }
                        // Unreachable: an exchange finds out why, and backs off.
                        Err(_) => due = Ways::BOTH,
                    }
                }
                _ = committed.changed() => due.push = true,
                _ = tokio::time::sleep(EXCHANGE_EVERY) => due = Ways::BOTH,
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    });
}

/// Events `theirs` holds that `ours` does not.
fn lag(theirs: &Heads, ours: &Heads) -> u64 {
    theirs
        .iter()
        .map(|(o, seq)| seq.saturating_sub(ours.get(o).copied().unwrap_or(0)))
        .sum()
}

fn now_ms() -> Option<u64> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}
