//! The single writer: a thread that drains a bounded queue of append requests and commits as many
//! as fit in one durable redb transaction (group commit).
//!
//! Invariants: a request's events are committed together or not at all; a reply is sent only after
//! the commit that holds the request is durable; after any storage error the writer is poisoned:
//! it commits nothing more and refuses every later request until the log is reopened (a failed
//! fsync may have dropped pages the kernel claimed were written, so retrying could acknowledge a
//! write that is not there).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable};
use tokio::sync::oneshot;

use super::block::BlockBuilder;
use super::{
    check_entry, each_entry, last_position, meta_u64, Appended, Corruption, LogError, LogOptions,
    EVENTS, EXTENTS, FLUSHES, HEADS, KEYS, META, STREAMS,
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
    /// Stream postings of positions after `meta.streams_to`.
    pending: HashMap<String, Vec<u64>>,
    pending_events: usize,
    stream_flush_events: usize,
}

impl State {
    fn load(db: &Database, origin: Origin, options: &LogOptions) -> Result<State, LogError> {
        let txn = db.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        let next_position = last_position(&events)? + 1;
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
        let meta = txn.open_table(META)?;
        let clock = meta_u64(&meta, "clock")?;
        // Rebuild the postings not flushed before the last stop. A damaged entry is left out of
        // the index (reads and verify report it); it must not keep the node from opening.
        let mut pending: HashMap<String, Vec<u64>> = HashMap::new();
        let mut pending_events = 0;
        each_entry(
            &events,
            meta_u64(&meta, "streams_to")? + 1,
            |position, entry| {
                match check_entry(position, entry) {
                    Ok((_, event)) => pending
                        .entry(event.stream().to_owned())
                        .or_default()
                        .push(position),
                    Err(problem) => tracing::warn!(%problem, "not indexing a damaged event"),
                }
                pending_events += 1;
                Ok(true)
            },
        )?;
        Ok(State {
            origin,
            next_position,
            heads,
            extents,
            clock: Hlc::new(clock, options.max_drift_ms),
            pending,
            pending_events,
            stream_flush_events: options.stream_flush_events.max(1),
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
        match commit_group(db, &mut state, &mut group) {
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
    if poisoned.is_none() {
        if let Err(error) = flush_at_close(db, &mut state) {
            tracing::warn!(%error, "stream index not flushed at close; the next open rebuilds it");
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
    group: &mut [Request],
) -> Result<Vec<Vec<Appended>>, LogError> {
    let txn = db.begin_write()?;
    let mut results = Vec::with_capacity(group.len());
    {
        let mut events = txn.open_table(EVENTS)?;
        let mut keys = txn.open_table(KEYS)?;
        let mut keyed_here: HashMap<String, Appended> = HashMap::new();
        let origin = state.origin;
        // This node's chain and extent, carried through the group and stored once at its end.
        let (mut head_seq, mut head_hash) =
            state.heads.get(&origin).copied().unwrap_or((0, Hash::ZERO));
        let mut extent = state.extents.get(&origin).copied();
        let first_position = state.next_position;
        let mut block = BlockBuilder::default();
        let mut block_first = state.next_position;
        let mut encoded = Vec::new();
        let now = now_ms();
        for request in group.iter_mut() {
            let mut out = Vec::with_capacity(request.events.len());
            for new in request.events.drain(..) {
                if let Some(key) = &new.key {
                    if let Some(first) = keyed_here.get(key) {
                        out.push(Appended {
                            existing: true,
                            ..*first
                        });
                        continue;
                    }
                    if let Some(position) = keys.get(key.as_str())?.map(|v| v.value()) {
                        let record =
                            super::entry_at(&events, position)?.ok_or(Corruption::PositionGap {
                                position,
                                found: None,
                            })?;
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
                let seq = head_seq + 1;
                let position = state.next_position;
                match state.pending.get_mut(new.stream.as_str()) {
                    Some(positions) => positions.push(position),
                    None => {
                        state.pending.insert(new.stream.clone(), vec![position]);
                    }
                }
                let key = new.key.clone();
                let event = Event {
                    origin,
                    seq,
                    hlc: state.clock.tick(now),
                    prev: head_hash,
                    // A node's own events name what it applied from other origins since its
                    // previous event; this log holds no other origin's events yet.
                    deps: Vec::new(),
                    stream: new.stream,
                    actor: new.actor,
                    kind: new.kind,
                    version: new.version,
                    correlation: new.correlation,
                    causation: new.causation,
                    key: new.key,
                    payload: new.payload,
                };
                encoded = event::encode_into(event, encoded);
                let hash = Hash::of(&encoded);
                if !block.fits(encoded.len()) {
                    events.insert(block_first, block.seal())?;
                    block.clear();
                    block_first = position;
                }
                block.push(&hash.0, &encoded);
                let appended = Appended {
                    origin,
                    seq,
                    position,
                    hash,
                    existing: false,
                };
                if let Some(key) = key {
                    keys.insert(key.as_str(), position)?;
                    keyed_here.insert(key, appended);
                }
                extent = Some(match extent {
                    Some(e)
                        if e.first_seq + e.len == seq && e.first_position + e.len == position =>
                    {
                        Extent {
                            len: e.len + 1,
                            ..e
                        }
                    }
                    _ => Extent {
                        first_seq: seq,
                        first_position: position,
                        len: 1,
                    },
                });
                (head_seq, head_hash) = (seq, hash);
                state.next_position += 1;
                state.pending_events += 1;
                out.push(appended);
            }
            results.push(out);
        }
        if !block.is_empty() {
            events.insert(block_first, block.seal())?;
        }
        if let (true, Some(e)) = (state.next_position > first_position, extent) {
            // Only the last extent can have changed: a group's own events are consecutive.
            txn.open_table(EXTENTS)?
                .insert((origin.0, e.first_seq), (e.first_position, e.len))?;
            txn.open_table(HEADS)?
                .insert(origin.0, (head_seq, head_hash.0))?;
            state.extents.insert(origin, e);
            state.heads.insert(origin, (head_seq, head_hash));
        }
        let mut meta = txn.open_table(META)?;
        meta.insert("clock", state.clock.last().to_le_bytes().as_slice())?;
        if state.pending_events >= state.stream_flush_events {
            flush_streams(state, &txn, &mut meta)?;
        }
    }
    txn.commit()?;
    Ok(results)
}

/// Writes the stream postings held in memory and moves `streams_to` up to the last position.
fn flush_streams(
    state: &mut State,
    txn: &redb::WriteTransaction,
    meta: &mut redb::Table<&'static str, &'static [u8]>,
) -> Result<(), LogError> {
    let mut streams = txn.open_table(STREAMS)?;
    let first = meta_u64(meta, "streams_to")? + 1;
    let last = state.next_position - 1;
    txn.open_table(FLUSHES)?.insert(first, last)?;
    let mut value = Vec::new();
    // Sorted, so the inserts walk the index in key order.
    let mut pending: Vec<(String, Vec<u64>)> =
        std::mem::take(&mut state.pending).into_iter().collect();
    pending.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    for (stream, positions) in pending {
        value.clear();
        for p in &positions {
            value.extend_from_slice(&p.to_le_bytes());
        }
        streams.insert((first, stream.as_str()), value.as_slice())?;
    }
    state.pending_events = 0;
    meta.insert("streams_to", last.to_le_bytes().as_slice())?;
    Ok(())
}

/// At a clean stop: flush the stream postings so the next open has no tail to rescan.
fn flush_at_close(db: &Database, state: &mut State) -> Result<(), LogError> {
    if state.pending_events == 0 {
        return Ok(());
    }
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        flush_streams(state, &txn, &mut meta)?;
    }
    txn.commit()?;
    Ok(())
}
