//! The single writer: a thread that drains a bounded queue of append requests and commits as many
//! as fit in one durable redb transaction (group commit).
//!
//! Invariants: a request's events are committed together or not at all; a reply is sent only after
//! the commit that holds the request is durable; after any storage error the writer is poisoned:
//! it commits nothing more and refuses every later request until the log is reopened (a failed
//! fsync may have dropped pages the kernel claimed were written, so retrying could acknowledge a
//! write that is not there).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable};
use tokio::sync::oneshot;

use super::{
    Appended, Corruption, LogError, LogOptions, Record, EVENTS, EXTENTS, HEADS, KEYS, META, STREAMS,
};
use crate::event::{self, Event, Hash, Origin};
use crate::hlc::Hlc;
use crate::input::NewEvent;

type Reply = oneshot::Sender<Result<Vec<Appended>, LogError>>;

struct Request {
    events: Vec<NewEvent>,
    reply: Reply,
}

/// Counters the writer keeps; read at any time.
#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    events: AtomicU64,
}

/// What the writer has committed since the log was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Durable commits.
    pub commits: u64,
    /// Events written by them (idempotent repeats not counted).
    pub events: u64,
}

/// The appenders' side of the writer.
pub(super) struct Handle {
    queue: Option<SyncSender<Request>>,
    thread: Option<JoinHandle<()>>,
    depth: usize,
    counters: Arc<Counters>,
}

impl Handle {
    pub(super) fn start(
        db: Arc<Database>,
        origin: Origin,
        options: LogOptions,
    ) -> Result<Handle, LogError> {
        let state = State::load(&db, origin, &options)?;
        let (queue, requests) = mpsc::sync_channel(options.queue_requests_max);
        let depth = options.queue_requests_max;
        let counters = Arc::new(Counters::default());
        let writer_counters = counters.clone();
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || run(&db, state, requests, &options, &writer_counters))
            .map_err(|e| LogError::Storage(redb::Error::Io(e)))?;
        Ok(Handle {
            queue: Some(queue),
            thread: Some(thread),
            depth,
            counters,
        })
    }

    pub(super) fn stats(&self) -> WriterStats {
        WriterStats {
            commits: self.counters.commits.load(Ordering::Relaxed),
            events: self.counters.events.load(Ordering::Relaxed),
        }
    }

    /// Appends and waits for durability; blocks while the queue is full.
    pub(super) fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, LogError> {
        let (reply, answer) = oneshot::channel();
        let queue = self.queue.as_ref().ok_or(LogError::WriterGone)?;
        queue
            .send(Request { events, reply })
            .map_err(|_| LogError::WriterGone)?;
        answer.blocking_recv().map_err(|_| LogError::WriterGone)?
    }

    /// Queues without blocking; `Busy` when the queue is full. The answer arrives on the receiver.
    #[allow(dead_code)] // The daemon's entry point (issue 7); exercised by the tests below.
    pub(super) fn submit(
        &self,
        events: Vec<NewEvent>,
    ) -> Result<oneshot::Receiver<Result<Vec<Appended>, LogError>>, LogError> {
        let (reply, answer) = oneshot::channel();
        let queue = self.queue.as_ref().ok_or(LogError::WriterGone)?;
        match queue.try_send(Request { events, reply }) {
            Ok(()) => Ok(answer),
            Err(TrySendError::Full(_)) => Err(LogError::Busy(self.depth)),
            Err(TrySendError::Disconnected(_)) => Err(LogError::WriterGone),
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what it holds and exit.
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A run of one origin's consecutive seqs at consecutive positions.
#[derive(Clone, Copy)]
struct Extent {
    first_seq: u64,
    first_position: u64,
    len: u64,
}

/// What the writer keeps in memory between commits; loaded from the log at open.
struct State {
    origin: Origin,
    next_position: u64,
    heads: HashMap<Origin, (u64, Hash)>,
    extents: HashMap<Origin, Extent>,
    clock: Hlc,
}

impl State {
    fn load(db: &Database, origin: Origin, options: &LogOptions) -> Result<State, LogError> {
        let txn = db.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        let next_position = events.last()?.map(|(k, _)| k.value()).unwrap_or(0) + 1;
        let mut heads = HashMap::new();
        let mut extents = HashMap::new();
        let extent_table = txn.open_table(EXTENTS)?;
        for entry in txn.open_table(HEADS)?.iter()? {
            let (k, v) = entry?;
            let (seq, hash) = v.value();
            heads.insert(Origin(k.value()), (seq, Hash(hash)));
            if let Some(last) = extent_table
                .range((k.value(), 0u64)..=(k.value(), u64::MAX))?
                .next_back()
            {
                let (ek, ev) = last?;
                let (first_position, len) = ev.value();
                extents.insert(
                    Origin(k.value()),
                    Extent {
                        first_seq: ek.value().1,
                        first_position,
                        len,
                    },
                );
            }
        }
        let clock = txn
            .open_table(META)?
            .get("clock")?
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0);
        Ok(State {
            origin,
            next_position,
            heads,
            extents,
            clock: Hlc::new(clock, options.max_drift_ms),
        })
    }
}

fn run(
    db: &Database,
    mut state: State,
    requests: Receiver<Request>,
    options: &LogOptions,
    counters: &Counters,
) {
    let mut poisoned: Option<String> = None;
    while let Ok(first) = requests.recv() {
        let mut events = first.events.len();
        let mut bytes = payload_bytes(&first);
        let mut group = vec![first];
        while events < options.group_events_max && bytes < options.group_bytes_max {
            let Ok(next) = requests.try_recv() else { break };
            events += next.events.len();
            bytes += payload_bytes(&next);
            group.push(next);
        }
        if let Some(cause) = &poisoned {
            for request in group {
                let _ = request.reply.send(Err(LogError::Poisoned {
                    cause: cause.clone(),
                }));
            }
            continue;
        }
        match commit_group(db, &mut state, &group) {
            Ok(results) => {
                let written = results.iter().flatten().filter(|a| !a.existing).count();
                counters.commits.fetch_add(1, Ordering::Relaxed);
                counters.events.fetch_add(written as u64, Ordering::Relaxed);
                for (request, result) in group.into_iter().zip(results) {
                    let _ = request.reply.send(Ok(result));
                }
            }
            Err(error) => {
                let cause = error.to_string();
                tracing::error!(%cause, "commit failed; the writer is poisoned until the log is reopened");
                for request in group {
                    let _ = request.reply.send(Err(LogError::Poisoned {
                        cause: cause.clone(),
                    }));
                }
                poisoned = Some(cause);
            }
        }
    }
}

fn payload_bytes(request: &Request) -> usize {
    request.events.iter().map(|e| e.payload.len()).sum()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes every request of the group in one transaction and commits it durably.
fn commit_group(
    db: &Database,
    state: &mut State,
    group: &[Request],
) -> Result<Vec<Vec<Appended>>, LogError> {
    let txn = db.begin_write()?;
    let mut results = Vec::with_capacity(group.len());
    {
        let mut events = txn.open_table(EVENTS)?;
        let mut keys = txn.open_table(KEYS)?;
        let mut postings: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
        let mut touched: Vec<Origin> = Vec::new();
        let mut closed_extents: Vec<(Origin, Extent)> = Vec::new();
        let now = now_ms();
        let mut value = Vec::new();
        for request in group {
            let mut out = Vec::with_capacity(request.events.len());
            for new in &request.events {
                if let Some(key) = &new.key {
                    if let Some(position) = keys.get(key.as_str())?.map(|v| v.value()) {
                        let stored = events.get(position)?.ok_or(Corruption::PositionGap {
                            position,
                            found: None,
                        })?;
                        let record = Record::check(position, stored.value())?;
                        let event = record.event();
                        out.push(Appended {
                            origin: event.origin(),
                            seq: event.seq(),
                            position,
                            hash: record.hash,
                            existing: true,
                        });
                        continue;
                    }
                }
                let origin = state.origin;
                let (head_seq, head_hash) =
                    state.heads.get(&origin).copied().unwrap_or((0, Hash::ZERO));
                let event = Event {
                    origin,
                    seq: head_seq + 1,
                    hlc: state.clock.tick(now),
                    prev: head_hash,
                    // A node's own events name what it applied from other origins since its
                    // previous event; this log holds no other origin's events yet.
                    deps: Vec::new(),
                    stream: new.stream.clone(),
                    actor: new.actor.clone(),
                    kind: new.kind.clone(),
                    version: new.version,
                    correlation: new.correlation.clone(),
                    causation: new.causation.clone(),
                    key: new.key.clone(),
                    payload: new.payload.clone(),
                };
                let bytes = event::encode(&event);
                let hash = Hash::of(&bytes);
                let position = state.next_position;
                value.clear();
                value.extend_from_slice(&hash.0);
                value.extend_from_slice(&bytes);
                events.insert(position, value.as_slice())?;
                if let Some(key) = &new.key {
                    keys.insert(key.as_str(), position)?;
                }
                postings
                    .entry(new.stream.as_str())
                    .or_default()
                    .extend_from_slice(&position.to_le_bytes());
                if let Some(closed) = place(state, origin, event.seq, position) {
                    closed_extents.push((origin, closed));
                }
                state.heads.insert(origin, (event.seq, hash));
                if !touched.contains(&origin) {
                    touched.push(origin);
                }
                state.next_position += 1;
                out.push(Appended {
                    origin,
                    seq: event.seq,
                    position,
                    hash,
                    existing: false,
                });
            }
            results.push(out);
        }
        let mut streams = txn.open_table(STREAMS)?;
        for (stream, positions) in &postings {
            let first =
                u64::from_le_bytes(positions[..8].try_into().expect("one position at least"));
            streams.insert((*stream, first), positions.as_slice())?;
        }
        let mut extents = txn.open_table(EXTENTS)?;
        let mut heads = txn.open_table(HEADS)?;
        for (origin, e) in closed_extents {
            extents.insert((origin.0, e.first_seq), (e.first_position, e.len))?;
        }
        for origin in touched {
            let e = state.extents[&origin];
            extents.insert((origin.0, e.first_seq), (e.first_position, e.len))?;
            let (seq, hash) = state.heads[&origin];
            heads.insert(origin.0, (seq, hash.0))?;
        }
        txn.open_table(META)?
            .insert("clock", state.clock.last().to_le_bytes().as_slice())?;
    }
    txn.commit()?;
    Ok(results)
}

/// Records that `(origin, seq)` sits at `position`, growing the origin's last extent when it can.
/// Returns the extent this one closes, which the commit must write in its final length.
fn place(state: &mut State, origin: Origin, seq: u64, position: u64) -> Option<Extent> {
    match state.extents.get_mut(&origin) {
        Some(e) if e.first_seq + e.len == seq && e.first_position + e.len == position => {
            e.len += 1;
            None
        }
        _ => state.extents.insert(
            origin,
            Extent {
                first_seq: seq,
                first_position: position,
                len: 1,
            },
        ),
    }
}
