//! The single writer: a thread that drains a bounded queue of append requests and commits as many
//! as fit in one durable redb transaction (group commit). One commit runs at a time: whoever
//! commits holds the writer's state, and a blocking appender that finds no commit under way and
//! nothing queued commits its own request on its own thread, through the same code.
//!
//! Invariants: a request's events are committed together or not at all; a reply is sent only after
//! the commit that holds the request is durable; after any storage error the writer is poisoned:
//! it commits nothing more and refuses every later request until the log is reopened (a failed
//! fsync may have dropped pages the kernel claimed were written, so retrying could acknowledge a
//! write that is not there).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use tokio::sync::oneshot;

use super::block::BlockBuilder;
use super::postings::Postings;
use super::wal::{self, Wal};
use super::{
    causal_order, check_entry, each_entry, entry_at, last_position, meta_u64, order_of,
    position_of, Appended, Corruption, Evidence, IngestReport, LogError, LogOptions, Refusal,
    Refused, Shipped, EVENTS, EVIDENCE_MAX, EXTENTS, FLUSHES, FORKS, HEADS, KEYS, META, PENDING,
    PENDING_EVENTS_MAX, REFUSED, SIGNATURES, STREAMS,
};
use crate::event::NewEvent;
use crate::event::{self, Dep, Event, EventId, Hash, Origin};
use crate::hlc::{Hlc, Observed};
use crate::kinds::vault::{Recipients, Registered};
use crate::membership::{Change, Membership};
use crate::sync::{Causal, Decision, Meta};

type Reply<T> = oneshot::Sender<Result<T, LogError>>;

/// What the writer is asked for, with where the answer goes. A group holds appends only, or
/// one ingest.
enum Request {
    Append(Vec<NewEvent>, Reply<Vec<Appended>>),
    Ingest(Vec<Shipped>, Reply<IngestReport>),
    Evidence(Vec<Evidence>, Reply<()>),
}

impl Request {
    fn refuse(self, error: LogError) {
        match self {
            Request::Append(_, reply) => drop(reply.send(Err(error))),
            Request::Ingest(_, reply) => drop(reply.send(Err(error))),
            Request::Evidence(_, reply) => drop(reply.send(Err(error))),
        }
    }
}

/// Counters the writer keeps; read at any time.
#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    events: AtomicU64,
}

impl Counters {
    /// Counts a durable commit of `events` new events.
    fn committed(&self, events: u64) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(events, Ordering::Relaxed);
    }
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
    shared: Arc<Shared>,
}

/// What the writer thread and an appender committing on its own thread share.
struct Shared {
    db: Arc<Database>,
    options: LogOptions,
    counters: Counters,
    /// Requests sent to the queue and not yet answered. An appender commits on its own thread
    /// only when there are none, so that it never goes ahead of them.
    queued: AtomicUsize,
    /// Acknowledged events held in memory and not yet in redb ([`Held`]): a reader that finds
    /// none begins at once; one that finds some has the writer publish them first.
    held: AtomicUsize,
    /// Whoever commits holds it: the writer thread for a group from the queue, or an appender
    /// that found it free (see [`Handle::append`]).
    core: Mutex<Core>,
}

/// What one commit at a time changes.
struct Core {
    state: State,
    /// Why every later request is refused, after a storage error.
    poisoned: Option<String>,
    kernel_cache: Option<KernelCache>,
}

impl Handle {
    pub(super) fn start(
        db: Arc<Database>,
        path: &std::path::Path,
        origin: Origin,
        options: LogOptions,
        segment: Box<dyn redb::StorageBackend>,
    ) -> Result<Handle, LogError> {
        let mut state = State::load(&db, origin, &options)?;
        let wal_path = path.with_extension("wal");
        let (segment, read) =
            Wal::open(segment, options.segment_bytes).map_err(|error| match error {
                wal::OpenError::Io(source) => LogError::Io {
                    path: wal_path.clone(),
                    source,
                },
                refused => LogError::Corrupt(Corruption::Wal {
                    path: wal_path.clone(),
                    detail: refused.to_string(),
                }),
            })?;
        replay(&db, &mut state, read, &wal_path)?;
        if state.fleet_changed || state.recipients_changed {
            // Read from the events at this open (a log from before they were saved): saved now,
            // so that the next open reads them back instead, whether or not this one appends.
            let txn = db.begin_write()?;
            state.save_fleet(&mut txn.open_table(META)?)?;
            txn.commit()?;
        }
        state.wal = Some(segment);
        state.wal_path = wal_path;
        let kernel_cache = match options.kernel_cache_bytes {
            0 => None,
            keep => Some(KernelCache::new(path, keep)?),
        };
        let (queue, requests) = mpsc::sync_channel(options.queue_requests_max);
        let depth = options.queue_requests_max;
        let shared = Arc::new(Shared {
            db,
            options,
            counters: Counters::default(),
            queued: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            core: Mutex::new(Core {
                state,
                poisoned: None,
                kernel_cache,
            }),
        });
        let writer = shared.clone();
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || {
                if !crate::priority::set_thread_nice(crate::priority::WRITER_NICE) {
                    tracing::debug!("the writer runs at the process's priority");
                }
                run(&writer, requests)
            })
            .map_err(|e| LogError::Storage(redb::Error::Io(e)))?;
        Ok(Handle {
            queue: Some(queue),
            thread: Some(thread),
            depth,
            shared,
        })
    }

    pub(super) fn stats(&self) -> WriterStats {
        WriterStats {
            commits: self.shared.counters.commits.load(Ordering::Relaxed),
            events: self.shared.counters.events.load(Ordering::Relaxed),
        }
    }

    /// Appends and waits for durability; blocks while the queue is full.
    ///
    /// When no commit is under way, the appender commits its request itself, on its own thread:
    /// a lone appender (a CLI append, a program writing one event at a time) then waits for the
    /// flush alone, not also for two hand-offs between threads. Otherwise the request joins the
    /// queue, and the writer commits it in the next group with the others waiting there. Either
    /// way one commit runs at a time, through the same code.
    pub(super) fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, LogError> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Append(events, reply);
        let idle = self.shared.queued.load(Ordering::Acquire) == 0;
        let request = match idle.then(|| self.shared.core.try_lock()) {
            Some(Ok(core)) => {
                // A bug that panics in a commit ends it as it would end the writer thread: the
                // mutex, dropped while unwinding, is poisoned and refuses every later request,
                // and this appender is told the writer is gone rather than unwound.
                let shared = &self.shared;
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    let mut core = core;
                    core.serve(shared, request, || None);
                }));
                None
            }
            Some(Err(std::sync::TryLockError::Poisoned(_))) => return Err(LogError::WriterGone),
            Some(Err(std::sync::TryLockError::WouldBlock)) | None => Some(request),
        };
        if let Some(request) = request {
            self.send(request)?;
        }
        answer.blocking_recv().map_err(|_| LogError::WriterGone)?
    }

    /// Ingests and waits for durability; blocks while the queue is full.
    pub(super) fn ingest(&self, events: Vec<Shipped>) -> Result<IngestReport, LogError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Ingest(events, reply))?;
        answer.blocking_recv().map_err(|_| LogError::WriterGone)?
    }

    /// Keeps refused events as evidence and waits for durability.
    pub(super) fn keep_evidence(&self, evidence: Vec<Evidence>) -> Result<(), LogError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Evidence(evidence, reply))?;
        answer.blocking_recv().map_err(|_| LogError::WriterGone)?
    }

    fn send(&self, request: Request) -> Result<(), LogError> {
        let queue = self.queue.as_ref().ok_or(LogError::WriterGone)?;
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        queue.send(request).map_err(|_| {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            LogError::WriterGone
        })
    }

    /// Queues without blocking; `Busy` when the queue is full. The answer arrives on the receiver.
    pub(super) fn submit(&self, events: Vec<NewEvent>) -> Result<Acknowledgement, LogError> {
        let (reply, answer) = oneshot::channel();
        let queue = self.queue.as_ref().ok_or(LogError::WriterGone)?;
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        let refused = match queue.try_send(Request::Append(events, reply)) {
            Ok(()) => return Ok(Acknowledgement(answer)),
            Err(TrySendError::Full(_)) => LogError::Busy(self.depth),
            Err(TrySendError::Disconnected(_)) => LogError::WriterGone,
        };
        self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        Err(refused)
    }

    /// Puts the acknowledged events held in memory into redb, so that a read begun next sees
    /// every event acknowledged before it. Costs one atomic load when none are held; otherwise
    /// it waits for a commit under way, then commits the held events (without a flush: the
    /// segment already holds them).
    pub(super) fn publish(&self) -> Result<(), LogError> {
        if self.shared.held.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        match self.shared.core.lock() {
            Ok(mut core) => core.publish(&self.shared),
            // A commit panicked and what it held is not built on: reads see what redb holds,
            // and the next open applies the rest again from the segment.
            Err(_) => Ok(()),
        }
    }
}

/// The answer to a submitted batch: a future that resolves once the batch is durable (or
/// refused). Whatever runs it, the caller needs no particular runtime's types.
pub struct Acknowledgement(oneshot::Receiver<Result<Vec<Appended>, LogError>>);

impl Acknowledgement {
    /// Waits for the answer on this thread (not inside an async runtime).
    pub fn wait(self) -> Result<Vec<Appended>, LogError> {
        self.0.blocking_recv().unwrap_or(Err(LogError::WriterGone))
    }
}

impl std::future::Future for Acknowledgement {
    type Output = Result<Vec<Appended>, LogError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(LogError::WriterGone)))
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

/// Held events are published into redb once their bytes reach this (or their count
/// `LogOptions::held_events_max`).
const HELD_BYTES_MAX: usize = 1024 * 1024;

/// The events of small groups acknowledged since redb's last commit: their segment record is
/// flushed, and only their keys are in redb, in the transaction left open for the next group.
/// They go into redb's blocks, with this node's head and last extent, when published: before a
/// read begins, at a bound, before any other kind of commit, and at close.
#[derive(Default)]
struct Held {
    first_position: u64,
    bytes: Vec<u8>,
    /// Per event, in position order: its hash, where its stored bytes end in `bytes`, and its
    /// causal order.
    events: Vec<(Hash, usize, u64)>,
    /// The keys the held events took, with their positions: put into the open transaction as
    /// each group is settled, and again into a new one if that transaction is dropped.
    keys: Vec<(String, u64)>,
    /// This node's head and last extent once the held events are in.
    head: (u64, Hash),
    extent: Option<Extent>,
    /// `LogOptions::held_events_max`.
    events_max: usize,
}

/// How far [`Held`] reached before a group: what a failed group is cut back to.
#[derive(Clone, Copy)]
struct Mark {
    events: usize,
    bytes: usize,
    keys: usize,
    head: (u64, Hash),
    extent: Option<Extent>,
}

impl Held {
    fn len(&self) -> usize {
        self.events.len()
    }

    fn full(&self) -> bool {
        self.events.len() >= self.events_max || self.bytes.len() >= HELD_BYTES_MAX
    }

    fn push(&mut self, position: u64, hash: &Hash, bytes: &[u8], order: u64) {
        if self.events.is_empty() {
            self.first_position = position;
        }
        self.bytes.extend_from_slice(bytes);
        self.events.push((*hash, self.bytes.len(), order));
    }

    /// The held event at `position`: its hash and stored bytes.
    fn get(&self, position: u64) -> Option<(&Hash, &[u8])> {
        let index = usize::try_from(position.checked_sub(self.first_position)?).ok()?;
        let (hash, end, _) = self.events.get(index)?;
        let start = index.checked_sub(1).map_or(0, |i| self.events[i].1);
        Some((hash, &self.bytes[start..*end]))
    }

    fn iter(&self) -> impl Iterator<Item = (&Hash, &[u8], u64)> {
        let starts = std::iter::once(0).chain(self.events.iter().map(|e| e.1));
        starts
            .zip(&self.events)
            .map(|(start, (hash, end, order))| (hash, &self.bytes[start..*end], *order))
    }

    fn mark(&self) -> Mark {
        Mark {
            events: self.events.len(),
            bytes: self.bytes.len(),
            keys: self.keys.len(),
            head: self.head,
            extent: self.extent,
        }
    }

    fn truncate(&mut self, mark: Mark) {
        self.events.truncate(mark.events);
        self.bytes.truncate(mark.bytes);
        self.keys.truncate(mark.keys);
        self.head = mark.head;
        self.extent = mark.extent;
    }

    /// Once redb holds them. The buffers are kept for the next groups: the bounds (and the
    /// size of a small group) bound them.
    fn clear(&mut self) {
        self.events.clear();
        self.bytes.clear();
        self.keys.clear();
        self.extent = None;
    }
}

/// What the writer keeps in memory between commits; loaded from the log at open.
struct State {
    origin: Origin,
    next_position: u64,
    /// Applied heads (the version vector) and the shipped events waiting for theirs.
    causal: Causal,
    /// The last extent of each origin.
    extents: HashMap<Origin, Extent>,
    /// The causal order of each origin's head.
    orders: HashMap<Origin, u64>,
    /// What this node applied from other origins since its own last event: the next own
    /// event's `deps`.
    deps: BTreeMap<Origin, u64>,
    /// Why own writes are stopped (a fork of this node's own origin), if they are.
    halted: Option<String>,
    /// The public key this node's origin is bound to: its first event carries it.
    signer: Option<[u8; 32]>,
    /// Who may write, when this node is in a fleet (`None`: every origin may).
    fleet: Option<Membership>,
    /// The membership changed since `meta.fleet` was written.
    fleet_changed: bool,
    /// The vault's recipients, which new entries must list only current ones of.
    recipients: Recipients,
    /// They changed since `meta.recipients` was written.
    recipients_changed: bool,
    /// The write-ahead segment small groups are made durable in (`None` only while opening).
    wal: Option<Wal>,
    wal_path: std::path::PathBuf,
    /// The small groups' events acknowledged since redb's last commit, and the transaction
    /// their keys are in (`Some` exactly while some are held).
    held: Held,
    open: Option<redb::WriteTransaction>,
    /// When redb last committed durably: a group after `durable_every` commits durably.
    durable_at: Instant,
    durable_every: std::time::Duration,
    clock: Hlc,
    /// Stream postings of positions after `meta.streams_to`.
    pending: Postings,
    stream_flush_events: usize,
    /// Chunk buffers and the block buffer, kept from one commit to the next so that encoding
    /// and packing do not regrow them.
    spare: Vec<Chunk>,
    block: BlockBuilder,
}

impl State {
    fn load(db: &Database, origin: Origin, options: &LogOptions) -> Result<State, LogError> {
        let txn = db.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        let next_position = last_position(&events)? + 1;
        let mut heads = Vec::new();
        let mut extents = HashMap::new();
        let mut orders = HashMap::new();
        let extent_table = txn.open_table(EXTENTS)?;
        for entry in txn.open_table(HEADS)?.iter()? {
            let (k, v) = entry?;
            let (seq, hash) = v.value();
            heads.push((Origin(k.value()), seq, Hash(hash)));
            let id = EventId {
                origin: Origin(k.value()),
                seq,
            };
            if let Some(order) = order_of(&extent_table, &events, id)? {
                orders.insert(id.origin, order);
            }
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
        let mut causal = Causal::new(heads);
        for entry in txn.open_table(PENDING)?.iter()? {
            let (k, v) = entry?;
            let (origin, seq) = k.value();
            // Checked when it was stored; a damaged one stays waiting and verify reports it.
            match pending_meta(v.value()) {
                Some(meta) => causal.wait(meta),
                None => tracing::warn!(origin = %Origin(origin), seq, "damaged waiting event"),
            }
        }
        let meta = txn.open_table(META)?;
        let clock = meta_u64(&meta, "clock")?;
        let deps = meta
            .get("deps")?
            .map(|v| decode_deps(v.value()))
            .unwrap_or_default();
        let halted = meta
            .get("halted")?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned());
        let (fleet, fleet_changed) = match options.fleet_root {
            Some(root) => {
                let (fleet, changed) = load_fleet(&meta, &events, root)?;
                (Some(fleet), changed)
            }
            None => (None, false),
        };
        let (recipients, recipients_changed) = load_recipients(&meta, &events)?;
        // Rebuild the postings not flushed before the last stop. A damaged entry is left out of
        // the index (reads and verify report it); it must not keep the node from opening.
        let mut pending = Postings::default();
        each_entry(
            &events,
            meta_u64(&meta, "streams_to")? + 1,
            |position, entry, _| {
                match check_entry(position, entry) {
                    Ok((_, event)) => pending.push(event.stream().to_owned(), position),
                    Err(problem) => tracing::warn!(%problem, "not indexing a damaged event"),
                }
                Ok(true)
            },
        )?;
        Ok(State {
            origin,
            next_position,
            causal,
            extents,
            orders,
            deps,
            halted,
            signer: options.signer,
            fleet,
            fleet_changed,
            recipients,
            recipients_changed,
            wal: None,
            wal_path: Default::default(),
            held: Held {
                events_max: options.held_events_max.max(1),
                ..Held::default()
            },
            open: None,
            durable_at: Instant::now(),
            durable_every: options.durable_every,
            clock: Hlc::new(clock, options.max_drift_ms),
            pending,
            stream_flush_events: options.stream_flush_events.max(1),
            spare: Vec::new(),
            block: BlockBuilder::default(),
        })
    }

    /// Takes in an applied event's membership change. A revocation of this node's own origin
    /// stops its own writes: the fleet refuses them from here on.
    fn observe(&mut self, id: EventId, deps: &BTreeMap<Origin, u64>, change: Change) {
        let Some(fleet) = self.fleet.as_mut() else {
            return;
        };
        if !fleet.observe(id, deps, change) {
            return;
        }
        self.fleet_changed = true;
        let own = EventId {
            origin: self.origin,
            seq: self.causal.head(self.origin).map_or(0, |(seq, _)| seq) + 1,
        };
        if let Err(revoked @ crate::membership::NotTaken::Revoked { .. }) = fleet.admits(own) {
            if self.halted.is_none() {
                self.halted = Some(format!(
                    "{revoked}; this node's key is revoked: see README, \"Revoking a node\""
                ));
            }
        }
    }

    /// redb has just committed durably: the segment's records are all in it.
    fn durable(&mut self) {
        if let Some(wal) = self.wal.as_mut() {
            wal.restart();
        }
        self.durable_at = Instant::now();
    }

    /// Takes in an applied event's change of the vault's recipients.
    fn register(&mut self, change: &Registered) {
        self.recipients_changed |= self.recipients.observe(change);
    }

    /// Writes what changed of the membership, the vault's recipients and the halt into `meta`.
    fn save_fleet(
        &mut self,
        meta: &mut redb::Table<'_, &'static str, &'static [u8]>,
    ) -> Result<(), LogError> {
        if let (true, Some(fleet)) = (self.fleet_changed, &self.fleet) {
            meta.insert("fleet", fleet.to_bytes().as_slice())?;
            self.fleet_changed = false;
        }
        if self.recipients_changed {
            meta.insert("recipients", self.recipients.to_bytes().as_slice())?;
            self.recipients_changed = false;
        }
        if let Some(reason) = &self.halted {
            meta.insert("halted", reason.as_bytes())?;
        }
        Ok(())
    }

    /// Records that `count` events of `origin` from `seq` on sit at consecutive positions from
    /// `position`, and returns the extent that now ends there.
    fn place(&mut self, origin: Origin, seq: u64, position: u64, count: u64) -> Extent {
        let extent = match self.extents.get(&origin) {
            Some(e) if e.first_seq + e.len == seq && e.first_position + e.len == position => {
                Extent {
                    len: e.len + count,
                    ..*e
                }
            }
            _ => Extent {
                first_seq: seq,
                first_position: position,
                len: count,
            },
        };
        self.extents.insert(origin, extent);
        extent
    }
}

/// The metadata of a `pending` entry (`hash ++ stored bytes`), if it decodes.
fn pending_meta(entry: &[u8]) -> Option<Meta> {
    let (hash, bytes) = entry.split_at_checked(32)?;
    let view = event::decode(bytes).ok()?;
    Some(Meta::of(Hash(hash.try_into().ok()?), &view))
}

/// The membership for `root`: as saved in `meta.fleet` if it is for that root, else read from
/// the log's membership events in position order (each counted only if its origin is a member
/// there); the flag says it was read and is not saved yet.
pub(super) fn load_fleet<M, E>(
    meta: &M,
    events: &E,
    root: Origin,
) -> Result<(Membership, bool), LogError>
where
    M: ReadableTable<&'static str, &'static [u8]>,
    E: ReadableTable<u64, &'static [u8]>,
{
    if let Some(saved) = meta.get("fleet")? {
        if let Some(fleet) = Membership::from_bytes(saved.value()) {
            if fleet.root() == root {
                return Ok((fleet, false));
            }
        }
    }
    let mut fleet = Membership::new(root);
    each_entry(events, 1, |_, entry, _| {
        // Damaged entries are verify's to report; they change no membership.
        if let Some(event) = entry.get(32..).and_then(|b| event::decode(b).ok()) {
            if let Some(change) = Change::of(event.kind(), event.version(), event.payload()) {
                if fleet.admits(event.id()).is_ok() {
                    let deps = event.deps().iter().map(|d| (d.origin, d.seq)).collect();
                    fleet.observe(event.id(), &deps, change);
                }
            }
        }
        Ok(true)
    })?;
    Ok((fleet, true))
}

/// The vault's recipients: as saved in `meta.recipients`, else read from the log's
/// `vault.recipient_*` events in position order (a log written before they were saved); the flag
/// says they were read and are not saved yet.
fn load_recipients<M, E>(meta: &M, events: &E) -> Result<(Recipients, bool), LogError>
where
    M: ReadableTable<&'static str, &'static [u8]>,
    E: ReadableTable<u64, &'static [u8]>,
{
    if let Some(saved) = meta.get("recipients")? {
        if let Some(recipients) = Recipients::from_bytes(saved.value()) {
            return Ok((recipients, false));
        }
    }
    let mut recipients = Recipients::default();
    each_entry(events, 1, |_, entry, _| {
        // Damaged entries are verify's to report; they register nothing.
        if let Some(event) = entry.get(32..).and_then(|b| event::decode(b).ok()) {
            if let Some(change) = Registered::of(event.kind(), event.version(), event.payload()) {
                recipients.observe(&change);
            }
        }
        Ok(true)
    })?;
    Ok((recipients, true))
}

/// Keeps refused events as evidence, up to [`EVIDENCE_MAX`].
fn keep_evidence(db: &Database, evidence: &[Evidence]) -> Result<(), LogError> {
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(REFUSED)?;
        for e in evidence {
            put_evidence(&mut table, e)?;
        }
    }
    txn.commit()?;
    Ok(())
}

fn put_evidence(
    table: &mut redb::Table<'_, ForkKey, &'static [u8]>,
    evidence: &Evidence,
) -> Result<(), LogError> {
    if table.len()? >= EVIDENCE_MAX {
        tracing::warn!(origin = %evidence.id.origin, seq = evidence.id.seq, "evidence is full; refused event not kept");
        return Ok(());
    }
    let key = (evidence.id.origin.0, evidence.id.seq, evidence.hash.0);
    table.insert(key, evidence.value().as_slice())?;
    Ok(())
}

/// `meta.deps`: (origin, seq) pairs, 24 bytes each.
fn encode_deps(deps: &BTreeMap<Origin, u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(deps.len() * 24);
    for (origin, seq) in deps {
        out.extend_from_slice(&origin.0);
        out.extend_from_slice(&seq.to_le_bytes());
    }
    out
}

fn decode_deps(bytes: &[u8]) -> BTreeMap<Origin, u64> {
    bytes
        .chunks_exact(24)
        .map(|c| {
            let origin = Origin(c[..16].try_into().expect("16 bytes"));
            (
                origin,
                u64::from_le_bytes(c[16..].try_into().expect("8 bytes")),
            )
        })
        .collect()
}

/// The writer thread: takes the requests from the queue, a group at a time, until the queue is
/// closed; then flushes the stream postings for a quick next open.
fn run(shared: &Shared, requests: Receiver<Request>) {
    let mut held: Option<Request> = None;
    // Requests taken from the queue and not yet answered.
    let mut taken = 0;
    loop {
        let first = match held.take() {
            Some(request) => request,
            None => match requests.recv() {
                Ok(request) => {
                    taken += 1;
                    request
                }
                Err(_) => break,
            },
        };
        match shared.core.lock() {
            Ok(mut core) => {
                held = core.serve(shared, first, || {
                    let request = requests.try_recv().ok();
                    taken += usize::from(request.is_some());
                    request
                });
            }
            // A commit panicked: what it left half-done must not be built on.
            Err(_) => first.refuse(LogError::WriterGone),
        }
        let answered = taken - usize::from(held.is_some());
        shared.queued.fetch_sub(answered, Ordering::AcqRel);
        taken -= answered;
    }
    let Ok(mut core) = shared.core.lock() else {
        return;
    };
    if core.poisoned.is_none() {
        if let Err(error) = flush_at_close(&shared.db, &mut core.state) {
            tracing::warn!(
                %error,
                "not committed at close; the next open applies the segment again and rebuilds \
                 the stream index"
            );
        }
    }
}

impl Core {
    /// Commits `first`, with the appends `more` gives after it in one group when `first` is an
    /// append, and answers each request. Returns a request `more` gave that does not belong in
    /// the group: the next one to serve.
    fn serve(
        &mut self,
        shared: &Shared,
        first: Request,
        mut more: impl FnMut() -> Option<Request>,
    ) -> Option<Request> {
        let (db, options, counters) = (&*shared.db, &shared.options, &shared.counters);
        let state = &mut self.state;
        if let Some(cause) = &self.poisoned {
            first.refuse(LogError::Poisoned {
                cause: cause.clone(),
            });
            return None;
        }
        let mut held = None;
        // About what the commit adds to the file (payloads, or shipped events): `kernel_cache`.
        let bytes_written: u64;
        let outcome = match first {
            Request::Evidence(evidence, reply) => {
                bytes_written = evidence.iter().map(|e| e.bytes.len() as u64).sum();
                let outcome = publish(db, state).and_then(|()| keep_evidence(db, &evidence));
                if outcome.is_ok() {
                    state.durable();
                }
                let _ = reply.send(outcome.as_ref().map(|_| ()).map_err(poison_of));
                outcome
            }
            Request::Ingest(events, reply) => {
                bytes_written = events.iter().map(|e| e.bytes.len() as u64).sum();
                let outcome =
                    publish(db, state).and_then(|()| commit_ingest(db, state, events, false));
                if let Ok(report) = &outcome {
                    state.durable();
                    counters.committed(report.applied + report.released);
                }
                let _ = reply.send(outcome.as_ref().map(Clone::clone).map_err(poison_of));
                outcome.map(|_| ())
            }
            Request::Append(events, reply) => {
                // The group's size; its payload bytes are also what the commit adds to the file.
                let (mut n, mut bytes) = (events.len(), payload_bytes(&events));
                let mut group = vec![(events, reply)];
                while n < options.group_events_max && bytes < options.group_bytes_max {
                    match more() {
                        Some(Request::Append(events, reply)) => {
                            n += events.len();
                            bytes += payload_bytes(&events);
                            group.push((events, reply));
                        }
                        Some(other) => {
                            held = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                if let Some(reason) = &state.halted {
                    for (_, reply) in group {
                        let reason = reason.clone();
                        let _ = reply.send(Err(LogError::Halted { reason }));
                    }
                    return held;
                }
                bytes_written = bytes as u64;
                match commit_group(db, state, &mut group, bytes) {
                    Ok(results) => {
                        let written = results
                            .iter()
                            .flatten()
                            .flatten()
                            .filter(|a: &&Appended| !a.existing)
                            .count();
                        // Counted before anyone is answered, so an answered appender sees it,
                        // and a read it begins publishes what is held.
                        counters.committed(written as u64);
                        shared.held.store(state.held.len(), Ordering::Release);
                        for ((_, reply), result) in group.into_iter().zip(results) {
                            let _ = reply.send(result);
                        }
                        // After the answers: the appenders do not wait for it.
                        match state.held.full() {
                            true => publish(db, state),
                            false => Ok(()),
                        }
                    }
                    Err(error) => {
                        for (_, reply) in group {
                            let _ = reply.send(Err(poison_of(&error)));
                        }
                        Err(error)
                    }
                }
            }
        };
        if let (Ok(()), Some(cache)) = (&outcome, &mut self.kernel_cache) {
            // After the answers: appenders do not wait for it.
            cache.after_commit(bytes_written);
        }
        shared.held.store(self.state.held.len(), Ordering::Release);
        if let Err(error) = outcome {
            self.poison(&error);
        }
        held
    }

    /// Publishes the held events for a reader (see [`Handle::publish`]).
    fn publish(&mut self, shared: &Shared) -> Result<(), LogError> {
        if self.poisoned.is_some() {
            // What was held was salvaged when the writer was poisoned.
            return Ok(());
        }
        let outcome = publish(&shared.db, &mut self.state);
        shared.held.store(self.state.held.len(), Ordering::Release);
        outcome.map_err(|error| {
            self.poison(&error);
            poison_of(&error)
        })
    }

    fn poison(&mut self, error: &LogError) {
        let cause = error.to_string();
        tracing::error!(%cause, "commit failed; the writer is poisoned until the log is reopened");
        self.poisoned = Some(cause);
    }
}

/// How much the writer's commits write between its drops of the log's older cached pages.
pub(super) const KERNEL_CACHE_STEP: u64 = 16 * 1024 * 1024;

/// Keeps only the newest part of the log file in the kernel's page cache: each time commits have
/// written another [`KERNEL_CACHE_STEP`], the pages before the file's last `keep` bytes are
/// dropped (`posix_fadvise(DONTNEED)`; the writer has just made them durable, so they are
/// clean). Counted in bytes written, not by the file's growth: redb grows the file ahead of its
/// data and then fills it (so what stays cached of the newest events is `keep` less the file's
/// unused tail). A long-running node's log would otherwise fill the memory the node's other
/// programs use with pages that only a rebuild or an export reads again, and those read the log
/// once, in order. The live projector and event streams read the newest events, which stay.
///
/// It also keeps appends off the kernel's slow path: a growing cache takes pages the machine has
/// not used lately, each costing far more than one just freed (on the 2-core VM the benches ran on,
/// touching 21 GiB of memory took 60 s the first time, 25 s the next). With 64 clients sending
/// 100-event requests the writer's share of its samples copying into new cache pages
/// (`copy_folio_from_iter_atomic`) rose from 1-3% to 30-44% once the cache had grown. Three
/// interleaved pairs of the serve bench's 100-event loads (3 rounds each) gave 64-client medians of
/// 345 658, 325 820 and 322 661 events/s with 256 MiB kept, every round above 316 000,
/// against 285 001, 267 490 and 324 838 with all kept, its rounds as low as 246 494.
struct KernelCache {
    file: std::fs::File,
    keep: u64,
    /// Bytes committed since the last drop.
    written: u64,
}

impl KernelCache {
    fn new(path: &std::path::Path, keep: u64) -> Result<KernelCache, LogError> {
        let file = std::fs::File::open(path).map_err(|source| LogError::Io {
            path: path.to_owned(),
            source,
        })?;
        Ok(KernelCache {
            file,
            keep,
            written: 0,
        })
    }

    /// After a commit that wrote about `written` bytes. Best effort: a failure costs only
    /// memory, and is logged.
    fn after_commit(&mut self, written: u64) {
        use std::os::fd::AsRawFd;
        self.written += written;
        if self.written < KERNEL_CACHE_STEP {
            return;
        }
        self.written = 0;
        let len = match self.file.metadata() {
            Ok(meta) => meta.len(),
            Err(error) => {
                tracing::debug!(%error, "the log's size is unknown; its cached pages stay");
                return;
            }
        };
        let Some(before) = len.checked_sub(self.keep).filter(|&b| b > 0) else {
            return;
        };
        // SAFETY: advice on an open descriptor; it changes no data.
        let refused = unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                0,
                before as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        if refused != 0 {
            tracing::debug!(errno = refused, "the kernel kept the log's older pages");
        }
    }
}

fn payload_bytes(events: &[NewEvent]) -> usize {
    events.iter().map(|e| e.payload.len()).sum()
}

/// What every request of a failed commit is told.
fn poison_of(error: &LogError) -> LogError {
    LogError::Poisoned {
        cause: error.to_string(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// New events per chunk: the unit handed between the encoder and the hasher.
const CHUNK_EVENTS: usize = 256;
/// A group with at least this many new events has its chain hashed on a helper thread while the
/// writer encodes the next chunk and stores the last (hashing is about a third of the work).
const PARALLEL_EVENTS_MIN: usize = 4 * CHUNK_EVENTS;
/// Chunk buffers kept between groups: as many as a group in flight uses at once, so the
/// memory held stays bounded whatever the largest group was.
const SPARE_CHUNKS: usize = 4;

/// Consecutive new events, encoded with `prev` still unset, then chained.
#[derive(Default)]
struct Chunk {
    bytes: Vec<u8>,
    ends: Vec<usize>,
    hashes: Vec<Hash>,
}

impl Chunk {
    /// Sets each event's `prev` and hashes it, in order.
    fn chain(&mut self, prev: &mut Hash) {
        let mut start = 0;
        for &end in &self.ends {
            *prev = event::chain(&mut self.bytes[start..end], *prev);
            self.hashes.push(*prev);
            start = end;
        }
    }

    fn events(&self) -> impl Iterator<Item = (&[u8], &Hash)> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(&self.ends)
            .map(|(start, &end)| &self.bytes[start..end])
            .zip(&self.hashes)
    }
}

/// Makes every request of the group (`payload_bytes` of payloads) durable and visible to the
/// writer's next group.
///
/// A request reusing a key for a different request is refused whole first. A cheap sequential
/// pass then settles which events are new (idempotency keys) and gives each its seq, position
/// and stamp. The new events are encoded in chunks and each chunk's chain of hashes finished in
/// order.
///
/// A small group is durable once its record in the segment is flushed, and is held: its events
/// stay in memory ([`Held`]), its keys in redb's transaction left open for the next group, until
/// they are published. Any other group (large, or the first after `durable_every`, or one whose
/// record does not fit in the segment) goes into redb's blocks after what is held, with the
/// head, extent and meta, in a durable commit. A small group that changes the membership or the
/// vault's recipients is not held either: once its record is flushed it commits the same way
/// without a flush, so that their saved forms in `meta` describe the events redb holds.
///
/// After a failure what was held before the group is salvaged (see [`salvage`]).
fn commit_group(
    db: &Database,
    state: &mut State,
    group: &mut [(Vec<NewEvent>, Reply<Vec<Appended>>)],
    payload_bytes: usize,
) -> Result<Vec<Result<Vec<Appended>, LogError>>, LogError> {
    let mark = state.held.mark();
    let txn = match state.open.take() {
        Some(txn) => txn,
        None => db.begin_write()?,
    };
    let outcome = commit_group_in(state, txn, group, payload_bytes);
    if outcome.is_err() {
        salvage(db, state, mark);
    }
    outcome
}

fn commit_group_in(
    state: &mut State,
    txn: redb::WriteTransaction,
    group: &mut [(Vec<NewEvent>, Reply<Vec<Appended>>)],
    payload_bytes: usize,
) -> Result<Vec<Result<Vec<Appended>, LogError>>, LogError> {
    let logged = state.wal.is_some()
        && state.durable_at.elapsed() < state.durable_every
        && payload_bytes <= wal::RECORD_BYTES_MAX;
    let (head_seq, head_hash) = state.causal.head(state.origin).unwrap_or((0, Hash::ZERO));
    let first_position = state.next_position;
    let mut settled = settle(&txn, state, group, head_seq)?;
    let hold = logged && !state.fleet_changed && !state.recipients_changed;
    if !hold {
        apply_held(&txn, state, false)?;
    }
    if let (true, Some(wal)) = (logged, state.wal.as_mut()) {
        wal.begin();
    }
    let written = settled.new_events.len() as u64;
    if hold {
        // Kept to put into a new transaction if the open one is dropped (`salvage`).
        let keyed = (first_position..).zip(&settled.new_events);
        let keys = keyed.filter_map(|(at, e)| Some((e.key.clone()?, at)));
        state.held.keys.extend(keys);
    }
    let new_events = std::mem::take(&mut settled.new_events);
    let orders = std::mem::take(&mut settled.orders);
    let mut fresh = settled.fresh.iter();
    let answers = &mut settled.answers;
    let sink = match (hold, logged) {
        (true, _) => Sink::Held,
        (false, true) => Sink::Logged,
        (false, false) => Sink::Blocks,
    };
    let head_hash = write_events(&txn, state, sink, new_events, orders, head_hash, |h| {
        answers[*fresh.next().expect("one answer per new event")].hash = h;
    })?;
    for &(at, first) in &settled.repeats {
        settled.answers[at].hash = settled.answers[first].hash;
    }
    state.next_position += written;
    if written > 0 {
        advance_head(
            &txn,
            state,
            sink,
            head_seq,
            first_position,
            written,
            head_hash,
        )?;
    }
    // The segment's record is flushed before redb commits: a crash after it applies the group
    // again at open; one before it loses a group nobody was told of.
    let flushed = match (logged, state.wal.as_mut()) {
        (true, Some(wal)) if written == 0 || wal.fits() => {
            if written > 0 {
                wal.commit(written as u32).map_err(|source| LogError::Io {
                    path: state.wal_path.clone(),
                    source,
                })?;
            }
            true
        }
        _ => false,
    };
    if hold && flushed {
        if state.held.len() > 0 {
            state.open = Some(txn);
        }
        return Ok(settled.results());
    }
    if hold {
        // Its record did not fit: into redb, durably, with what is held.
        apply_held(&txn, state, false)?;
    }
    {
        let mut meta = txn.open_table(META)?;
        meta.insert("clock", state.clock.last().to_le_bytes().as_slice())?;
        if written > 0 {
            meta.insert("deps", [].as_slice())?;
        }
        state.save_fleet(&mut meta)?;
        if state.pending.len() >= state.stream_flush_events {
            flush_streams(state, &txn, &mut meta)?;
        }
    }
    let mut txn = txn;
    if flushed {
        txn.set_durability(redb::Durability::None)?;
    }
    txn.commit()?;
    state.held.clear();
    if !flushed {
        state.durable();
    }
    Ok(settled.results())
}

/// Where a group's new events go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sink {
    /// Into redb's blocks, head and extent, in the group's transaction.
    Blocks,
    /// Into the segment's record, and into redb's as `Blocks`.
    Logged,
    /// Into the segment's record, and into [`Held`] with this node's head and extent in
    /// memory only.
    Held,
}

/// Puts the held events into `txn`: into blocks from their first position on, with this node's
/// head and last extent, the clock and the deps they took, and, with `keys`, their keys (which
/// a dropped transaction took with it). The caller clears them once `txn` is committed.
fn apply_held(txn: &redb::WriteTransaction, state: &mut State, keys: bool) -> Result<(), LogError> {
    if state.held.len() == 0 {
        return Ok(());
    }
    let held = &state.held;
    {
        let mut table = txn.open_table(EVENTS)?;
        let block = std::mem::take(&mut state.block);
        let mut blocks = Blocks::new(&mut table, held.first_position, block);
        for (hash, bytes, order) in held.iter() {
            blocks.push(hash, bytes, order)?;
        }
        state.block = blocks.close()?;
    }
    if keys {
        let mut table = txn.open_table(KEYS)?;
        for (key, position) in &held.keys {
            table.insert(key.as_str(), position)?;
        }
    }
    if let Some(extent) = held.extent {
        txn.open_table(EXTENTS)?.insert(
            (state.origin.0, extent.first_seq),
            (extent.first_position, extent.len),
        )?;
    }
    txn.open_table(HEADS)?
        .insert(state.origin.0, (held.head.0, held.head.1 .0))?;
    let mut meta = txn.open_table(META)?;
    meta.insert("clock", state.clock.last().to_le_bytes().as_slice())?;
    meta.insert("deps", [].as_slice())?;
    Ok(())
}

/// Commits the held events into redb without a flush (the segment holds them), with the stream
/// postings once enough have gathered. After a failure what was held is salvaged (see
/// [`salvage`]), and the error returned poisons the writer.
fn publish(db: &Database, state: &mut State) -> Result<(), LogError> {
    let Some(txn) = state.open.take() else {
        return Ok(());
    };
    let mark = state.held.mark();
    let outcome = publish_in(state, txn);
    match outcome {
        Ok(()) => state.held.clear(),
        Err(_) => salvage(db, state, mark),
    }
    outcome
}

fn publish_in(state: &mut State, mut txn: redb::WriteTransaction) -> Result<(), LogError> {
    apply_held(&txn, state, false)?;
    if state.pending.len() >= state.stream_flush_events {
        let mut meta = txn.open_table(META)?;
        flush_streams(state, &txn, &mut meta)?;
    }
    txn.set_durability(redb::Durability::None)?;
    txn.commit()?;
    Ok(())
}

/// After a failed commit: puts the events acknowledged before it (held, durable in the segment)
/// into redb in a new transaction, without the failed group, so that reads go on seeing every
/// acknowledged event until the log is reopened. Best effort: the writer is poisoned whatever
/// happens here, and the next open applies them again from the segment.
fn salvage(db: &Database, state: &mut State, mark: Mark) {
    // Dropped first: it holds the failed group's keys, and redb makes one write at a time.
    drop(state.open.take());
    state.held.truncate(mark);
    if state.held.len() > 0 {
        let mut again = || -> Result<(), LogError> {
            let mut txn = db.begin_write()?;
            apply_held(&txn, state, true)?;
            txn.set_durability(redb::Durability::None)?;
            txn.commit()?;
            Ok(())
        };
        if let Err(error) = again() {
            tracing::error!(
                %error,
                "events acknowledged since redb's last commit stay out of reads until the log \
                 is reopened, which applies them again from the segment"
            );
        }
    }
    state.held.clear();
}

/// What the sequential pass over a group settled.
struct Settled {
    /// One per event of the group, in order; a new event's hash is filled in once chained.
    answers: Vec<Appended>,
    /// The answers of new events, in position order.
    fresh: Vec<usize>,
    /// Answers repeating a key first written in this group: (answer, the first one's answer).
    repeats: Vec<(usize, usize)>,
    /// Events per request.
    lens: Vec<usize>,
    /// Per request, why it is refused whole (none of it written): an event whose key names a
    /// different request, or a vault entry listing a recipient that is not current.
    conflicts: Vec<Option<LogError>>,
    /// The events to write, in position order (prev and hash not yet set).
    new_events: Vec<Event>,
    /// Their causal orders.
    orders: Vec<u64>,
}

impl Settled {
    /// Each request's answer: its events' answers, or why it was refused whole.
    fn results(self) -> Vec<Result<Vec<Appended>, LogError>> {
        let mut answers = self.answers.into_iter();
        self.lens
            .into_iter()
            .zip(self.conflicts)
            .map(|(n, refused)| match refused {
                Some(refused) => Err(refused),
                None => Ok(answers.by_ref().take(n).collect()),
            })
            .collect()
    }
}

/// Settles which events of the group are new (a key already stored, or given earlier in the
/// group, answers with that event), records the new events' keys, and gives each new event its
/// seq, position, stamp and deps.
fn settle(
    txn: &redb::WriteTransaction,
    state: &mut State,
    group: &mut [(Vec<NewEvent>, Reply<Vec<Appended>>)],
    head_seq: u64,
) -> Result<Settled, LogError> {
    let (origin, first_position) = (state.origin, state.next_position);
    let events = txn.open_table(EVENTS)?;
    let mut keys = txn.open_table(KEYS)?;
    // A request reusing a key for a different request is refused whole before anything is
    // placed (most groups carry no key: nothing to look up).
    let keyed = group
        .iter()
        .any(|(batch, _)| batch.iter().any(|e| e.key.is_some()));
    let mut conflicts: Vec<Option<LogError>> = match keyed {
        true => key_conflicts(&events, &state.held, &keys, group)?
            .into_iter()
            .map(|conflict| conflict.map(|index| LogError::KeyConflict { index }))
            .collect(),
        false => (0..group.len()).map(|_| None).collect(),
    };
    unregistered(&keys, &state.recipients, group, &mut conflicts)?;
    for ((batch, _), conflict) in group.iter_mut().zip(&conflicts) {
        if conflict.is_some() {
            batch.clear();
        }
    }
    let total: usize = group.iter().map(|(batch, _)| batch.len()).sum();
    let mut out = Settled {
        answers: Vec::with_capacity(total),
        fresh: Vec::with_capacity(total),
        repeats: Vec::new(),
        lens: Vec::with_capacity(group.len()),
        conflicts,
        new_events: Vec::with_capacity(total),
        orders: Vec::with_capacity(total),
    };
    let mut keyed_here: HashMap<String, usize> = HashMap::new();
    let now = now_ms();
    for (batch, _) in group.iter_mut() {
        out.lens.push(batch.len());
        for new in batch.drain(..) {
            if let Some(key) = &new.key {
                if let Some(&first) = keyed_here.get(key) {
                    out.repeats.push((out.answers.len(), first));
                    let repeat = Appended {
                        existing: true,
                        ..out.answers[first]
                    };
                    out.answers.push(repeat);
                    continue;
                }
                if let Some(position) = keys.get(key.as_str())?.map(|v| v.value()) {
                    out.answers
                        .push(stored_answer(&events, &state.held, position)?);
                    continue;
                }
            }
            let seq = head_seq + 1 + out.fresh.len() as u64;
            let position = first_position + out.fresh.len() as u64;
            if let Some(key) = &new.key {
                keys.insert(key.as_str(), position)?;
                keyed_here.insert(key.clone(), out.answers.len());
            }
            out.fresh.push(out.answers.len());
            out.answers.push(Appended {
                origin,
                seq,
                position,
                hash: Hash::ZERO, // Known once the chain reaches it.
                existing: false,
            });
            let hlc = state.clock.tick(now);
            let change = match state.fleet {
                Some(_) => Change::of(&new.kind, new.version, &new.payload),
                None => None,
            };
            if let (Some(Change::Revoked { device_id }), Some(fleet)) = (&change, &state.fleet) {
                // A revocation names the revoked origins' heads here, so that every node cuts
                // them at the same event: the last one causally before it.
                for named in fleet.named_by(device_id) {
                    if let Some((head, _)) = state.causal.head(named).filter(|_| named != origin) {
                        let seen = state.deps.entry(named).or_default();
                        *seen = (*seen).max(head);
                    }
                }
            }
            // What this node applied from other origins since its previous event (each such
            // origin's head); the events after it in the chain imply it.
            let deps: Vec<Dep> = std::mem::take(&mut state.deps)
                .into_iter()
                .map(|(origin, seq)| Dep { origin, seq })
                .collect();
            let order = crate::hlc::order(
                hlc,
                std::iter::once(origin)
                    .chain(deps.iter().map(|d| d.origin))
                    .filter_map(|o| state.orders.get(&o).copied()),
            );
            state.orders.insert(origin, order);
            out.orders.push(order);
            if let Some(change) = change {
                let named = deps.iter().map(|d| (d.origin, d.seq)).collect();
                state.observe(EventId { origin, seq }, &named, change);
            }
            if let Some(change) = Registered::of(&new.kind, new.version, &new.payload) {
                state.register(&change);
            }
            out.new_events.push(Event {
                origin,
                seq,
                hlc,
                prev: Hash::ZERO, // Set by `Chunk::chain`.
                deps,
                stream: new.stream,
                actor: new.actor,
                kind: new.kind,
                version: new.version,
                correlation: new.correlation,
                causation: new.causation,
                key: new.key,
                payload: new.payload,
                signer: state.signer.filter(|_| seq == 1),
            });
        }
    }
    Ok(out)
}

/// Encodes `new_events` in chunks, chains each chunk's hashes on `head_hash` in order (on a
/// helper thread for a large group, while the next chunk is encoded), and puts them where
/// `sink` says from the next position on; `hashed` is told each event's hash in order. Returns
/// the new head's hash.
fn write_events(
    txn: &redb::WriteTransaction,
    state: &mut State,
    sink: Sink,
    new_events: Vec<Event>,
    orders: Vec<u64>,
    mut head_hash: Hash,
    mut hashed: impl FnMut(Hash),
) -> Result<Hash, LogError> {
    let written = new_events.len();
    let first_position = state.next_position;
    let mut table = match sink {
        Sink::Blocks | Sink::Logged => Some(txn.open_table(EVENTS)?),
        Sink::Held => None,
    };
    let mut blocks = table
        .as_mut()
        .map(|table| Blocks::new(table, first_position, std::mem::take(&mut state.block)));
    let held = &mut state.held;
    let mut at = first_position;
    let mut spare = std::mem::take(&mut state.spare);
    let mut orders = orders.into_iter();
    let mut wal = state.wal.as_mut().filter(|_| sink != Sink::Blocks);
    let mut store = |chunk: Chunk, spare: &mut Vec<Chunk>| -> Result<(), LogError> {
        for (bytes, hash) in chunk.events() {
            let order = orders.next().expect("one order per new event");
            match blocks.as_mut() {
                Some(blocks) => blocks.push(hash, bytes, order)?,
                None => held.push(at, hash, bytes, order),
            }
            at += 1;
            if let Some(wal) = wal.as_mut() {
                wal.push(hash, bytes);
            }
            hashed(*hash);
        }
        spare.push(chunk);
        Ok(())
    };
    let mut position = first_position;
    let mut events = new_events.into_iter();
    let pending = &mut state.pending;
    let mut encode = |spare: &mut Vec<Chunk>| {
        let mut chunk: Chunk = spare.pop().unwrap_or_default();
        chunk.bytes.clear();
        chunk.ends.clear();
        chunk.hashes.clear();
        for mut event in events.by_ref().take(CHUNK_EVENTS) {
            chunk.bytes = event::append_stored(&mut event, std::mem::take(&mut chunk.bytes));
            chunk.ends.push(chunk.bytes.len());
            pending.push(event.stream, position);
            position += 1;
        }
        (!chunk.ends.is_empty()).then_some(chunk)
    };
    if written < PARALLEL_EVENTS_MIN {
        while let Some(mut chunk) = encode(&mut spare) {
            chunk.chain(&mut head_hash);
            store(chunk, &mut spare)?;
        }
    } else {
        let prev = &mut head_hash;
        std::thread::scope(|scope| -> Result<(), LogError> {
            // Unbounded, but never longer than the group's chunks.
            let (to_hash, unhashed) = mpsc::channel::<Chunk>();
            let (to_store, hashed) = mpsc::channel();
            scope.spawn(move || {
                for mut chunk in unhashed {
                    chunk.chain(prev);
                    if to_store.send(chunk).is_err() {
                        return; // The writer failed and stopped listening.
                    }
                }
            });
            while let Some(chunk) = encode(&mut spare) {
                to_hash.send(chunk).map_err(|_| LogError::WriterGone)?;
                while let Ok(chunk) = hashed.try_recv() {
                    store(chunk, &mut spare)?;
                }
            }
            drop(to_hash);
            hashed.into_iter().try_for_each(|c| store(c, &mut spare))
        })?;
    }
    if let Some(blocks) = blocks {
        state.block = blocks.close()?;
    }
    spare.truncate(SPARE_CHUNKS);
    state.spare = spare;
    Ok(head_hash)
}

/// Records the node's own `written` new events, consecutive from `first_position`: they extend
/// the last extent or start one, and move the head.
fn advance_head(
    txn: &redb::WriteTransaction,
    state: &mut State,
    sink: Sink,
    head_seq: u64,
    first_position: u64,
    written: u64,
    head_hash: Hash,
) -> Result<(), LogError> {
    let origin = state.origin;
    let extent = state.place(origin, head_seq + 1, first_position, written);
    let head = (head_seq + written, head_hash);
    state.causal.set_head(origin, head.0, head.1);
    if sink == Sink::Held {
        (state.held.head, state.held.extent) = (head, Some(extent));
        return Ok(());
    }
    txn.open_table(EXTENTS)?.insert(
        (origin.0, extent.first_seq),
        (extent.first_position, extent.len),
    )?;
    txn.open_table(HEADS)?
        .insert(origin.0, (head.0, head.1 .0))?;
    Ok(())
}

/// Refuses (in `refused`) each request not refused yet that writes a vault entry listing a
/// fingerprint that is not a current recipient's, counting the recipients the group's earlier
/// requests, and the request's own earlier events, add or remove. An event whose key is
/// already stored is not new and is not asked.
fn unregistered(
    keys: &impl ReadableTable<&'static str, u64>,
    recipients: &Recipients,
    group: &[(Vec<NewEvent>, Reply<Vec<Appended>>)],
    refused: &mut [Option<LogError>],
) -> Result<(), LogError> {
    let vault = |new: &NewEvent| new.kind.starts_with("vault.");
    if !group.iter().any(|(batch, _)| batch.iter().any(vault)) {
        return Ok(());
    }
    let mut now = recipients.clone();
    for ((batch, _), refused) in group.iter().zip(refused) {
        if refused.is_some() || !batch.iter().any(vault) {
            continue;
        }
        let mut trial = now.clone();
        for (index, new) in batch.iter().enumerate().filter(|(_, new)| vault(new)) {
            if let Some(key) = new.key.as_deref() {
                if keys.get(key)?.is_some() {
                    continue;
                }
            }
            if let Some(error) = trial.refuses(&new.kind, new.version, &new.payload) {
                *refused = Some(LogError::Unregistered { index, error });
                break;
            }
            if let Some(change) = Registered::of(&new.kind, new.version, &new.payload) {
                trial.observe(&change);
            }
        }
        if refused.is_none() {
            now = trial;
        }
    }
    Ok(())
}

/// For each request of the group, the index of its first event whose idempotency key already
/// names a different event: one in the log, or one earlier in the group. Such a request is
/// refused whole. The same request again is a duplicate, not a conflict.
fn key_conflicts(
    events: &impl ReadableTable<u64, &'static [u8]>,
    held: &Held,
    keys: &impl ReadableTable<&'static str, u64>,
    group: &[(Vec<NewEvent>, Reply<Vec<Appended>>)],
) -> Result<Vec<Option<usize>>, LogError> {
    let mut keyed: HashMap<&str, &NewEvent> = HashMap::new();
    let mut conflicts = Vec::with_capacity(group.len());
    for (batch, _) in group {
        let mut mine: HashMap<&str, &NewEvent> = HashMap::new();
        let mut conflict = None;
        for (index, new) in batch.iter().enumerate() {
            let Some(key) = new.key.as_deref() else {
                continue;
            };
            let same = match mine.get(key).or_else(|| keyed.get(key)) {
                Some(earlier) => same_request(earlier, new),
                None => match keys.get(key)?.map(|v| v.value()) {
                    Some(position) => {
                        same_as_stored(&record_at(events, held, position)?.event(), new)
                    }
                    None => {
                        mine.insert(key, new);
                        true
                    }
                },
            };
            if !same {
                conflict = Some(index);
                break;
            }
        }
        if conflict.is_none() {
            keyed.extend(mine);
        }
        conflicts.push(conflict);
    }
    Ok(conflicts)
}

/// Two requests are the same when every field a client gives is (data compared encoded).
fn same_request(a: &NewEvent, b: &NewEvent) -> bool {
    a == b
}

fn same_as_stored(stored: &event::EventRef<'_>, new: &NewEvent) -> bool {
    stored.kind() == new.kind
        && stored.version() == new.version
        && stored.stream() == new.stream
        && stored.actor() == new.actor
        && stored.correlation() == new.correlation.as_deref()
        && stored.causation() == new.causation.as_deref()
        && stored.payload() == new.payload.as_slice()
}

/// Applies shipped events in one transaction (see [`Log::ingest`](super::Log::ingest)): for
/// each, in order, the clock observes its stamp, [`Causal::decide`] says what to do, and a
/// helper does it. A refusal stops the request there (what came before it commits), unless
/// `whole`: then nothing commits unless every event applied (the caller drops `state`).
fn commit_ingest(
    db: &Database,
    state: &mut State,
    shipped: Vec<Shipped>,
    whole: bool,
) -> Result<IngestReport, LogError> {
    let count = shipped.len() as u64;
    let txn = db.begin_write()?;
    let mut report = IngestReport::default();
    let now = now_ms();
    {
        let mut events = txn.open_table(EVENTS)?;
        let mut tables = Shipping {
            blocks: Blocks::new(
                &mut events,
                state.next_position,
                std::mem::take(&mut state.block),
            ),
            pending: txn.open_table(PENDING)?,
            forks: txn.open_table(FORKS)?,
            extents: txn.open_table(EXTENTS)?,
            keys: txn.open_table(KEYS)?,
            signatures: txn.open_table(SIGNATURES)?,
            refused: txn.open_table(REFUSED)?,
            here: Default::default(),
            moved: HashSet::new(),
        };
        for (index, shipped) in shipped.into_iter().enumerate() {
            if let Observed::Clamped { .. } = state.clock.observe(shipped.hlc, now) {
                report.clamped += 1;
            }
            let stored = tables.held(state, shipped.meta.id)?;
            let decision = state.causal.decide(&shipped.meta, |_| stored);
            // Who wrote it is asked of what would be taken (a duplicate or a fork is not).
            let not_taken = match (&decision, &state.fleet) {
                (Decision::Apply | Decision::Wait, Some(fleet)) => {
                    fleet.admits(shipped.meta.id).err()
                }
                _ => None,
            };
            // A signed head that came with an event is kept with it, unless the event is refused.
            let refusal = match (not_taken, decision) {
                (Some(not_taken), _) => Some(Refusal::NotTaken(not_taken)),
                (None, decision) => match decision {
                    Decision::Duplicate => {
                        tables.keep_signature(&shipped)?;
                        report.duplicates += 1;
                        None
                    }
                    Decision::Wait if state.causal.waiting() >= PENDING_EVENTS_MAX => {
                        Some(Refusal::TooManyWaiting)
                    }
                    Decision::Wait => {
                        tables.keep_signature(&shipped)?;
                        tables.wait(state, &shipped)?;
                        report.waited += 1;
                        None
                    }
                    Decision::Apply => {
                        tables.keep_signature(&shipped)?;
                        report.applied += 1;
                        tables.apply_releasing(state, shipped, index, &mut report)?;
                        if report.refused.is_some() {
                            break;
                        }
                        continue;
                    }
                    Decision::Fork { stored } if shipped.meta.id.origin == state.origin => {
                        Some(Refusal::OwnFork { stored })
                    }
                    Decision::Fork { stored } => Some(Refusal::Fork { stored }),
                    Decision::ForkWaiting { waiting } => Some(Refusal::ForkWaiting { waiting }),
                    Decision::BrokenLink { expected } => Some(Refusal::BrokenLink {
                        expected,
                        actual: shipped.meta.prev,
                    }),
                },
            };
            if let Some(reason) = refusal {
                report.refused = Some(tables.refuse(state, &shipped, index, reason, stored)?);
                break;
            }
        }
        report.waiting = state.causal.waiting() as u64;
        tables.close(&txn, state)?;
    }
    {
        let mut meta = txn.open_table(META)?;
        meta.insert("clock", state.clock.last().to_le_bytes().as_slice())?;
        meta.insert("deps", encode_deps(&state.deps).as_slice())?;
        state.save_fleet(&mut meta)?;
        if state.pending.len() >= state.stream_flush_events {
            flush_streams(state, &txn, &mut meta)?;
        }
    }
    if whole && (report.refused.is_some() || report.applied != count) {
        txn.abort()?;
        return Ok(report);
    }
    txn.commit()?;
    Ok(report)
}

/// A `forks` entry's key: origin, seq, the refused event's hash.
type ForkKey = ([u8; 16], u64, [u8; 32]);

/// The tables an ingest writes, and what it applied in this transaction.
struct Shipping<'t, 'txn> {
    blocks: Blocks<'t, 'txn>,
    pending: redb::Table<'txn, ([u8; 16], u64), &'static [u8]>,
    forks: redb::Table<'txn, ForkKey, &'static [u8]>,
    extents: redb::Table<'txn, ([u8; 16], u64), (u64, u64)>,
    /// Idempotency keys: this node's own events coming back (a restored home ingesting what
    /// it wrote after its backup) bring their keys back; other nodes' events bring theirs when
    /// this node has not used them.
    keys: redb::Table<'txn, &'static str, u64>,
    /// The signed heads that came with events (verified by `Shipped::signed`).
    signatures: redb::Table<'txn, ([u8; 16], u64), &'static [u8]>,
    /// Events refused for who wrote them.
    refused: redb::Table<'txn, ForkKey, &'static [u8]>,
    /// Events applied in this transaction, which the tables cannot show yet: hash and order.
    here: foldhash::HashMap<EventId, (Hash, u64)>,
    /// Origins whose head moved.
    moved: HashSet<Origin>,
}

impl Shipping<'_, '_> {
    /// The hash of the event held at `id`, if any (only an id at or below the head can be).
    fn held(&self, state: &State, id: EventId) -> Result<Option<Hash>, LogError> {
        let (head_seq, _) = state.causal.head(id.origin).unwrap_or((0, Hash::ZERO));
        if id.seq > head_seq {
            return Ok(None);
        }
        if let Some((hash, _)) = self.here.get(&id) {
            return Ok(Some(*hash));
        }
        match position_of(&self.extents, id)? {
            Some(position) => Ok(entry_at(&*self.blocks.table, position)?.map(|r| r.hash)),
            None => Ok(None),
        }
    }

    /// Keeps the signature that came with a shipped event (a refused event's is not kept).
    fn keep_signature(&mut self, shipped: &Shipped) -> Result<(), LogError> {
        if let Some((key, signature)) = shipped.signed.as_deref() {
            let mut value = [0u8; 96];
            value[..32].copy_from_slice(&key.0);
            value[32..].copy_from_slice(signature);
            let id = shipped.meta.id;
            self.signatures
                .insert((id.origin.0, id.seq), value.as_slice())?;
        }
        Ok(())
    }

    /// Keeps a shipped event waiting, durably, for its predecessor or deps.
    fn wait(&mut self, state: &mut State, shipped: &Shipped) -> Result<(), LogError> {
        let meta = &shipped.meta;
        let mut entry = meta.hash.0.to_vec();
        entry.extend_from_slice(&shipped.bytes);
        self.pending
            .insert((meta.id.origin.0, meta.id.seq), entry.as_slice())?;
        state.causal.wait(meta.clone());
        Ok(())
    }

    /// Applies a shipped event, then every waiting event it completes (moved out of
    /// `pending`); a waiting event released onto a predecessor it does not name is kept as
    /// evidence and refuses the request.
    fn apply_releasing(
        &mut self,
        state: &mut State,
        shipped: Shipped,
        index: usize,
        report: &mut IngestReport,
    ) -> Result<(), LogError> {
        let id = shipped.meta.id;
        self.apply(state, shipped)?;
        // A revocation may have come while they waited: each is asked again.
        let fleet = &state.fleet;
        let admits = |id: EventId| fleet.as_ref().is_none_or(|f| f.admits(id).is_ok());
        let (ready, broken, not_taken) = state.causal.released(id, admits);
        for meta in ready {
            let released = take_pending(&mut self.pending, meta.id)?
                .and_then(|bytes| Shipped::verify(meta.hash, bytes).ok())
                .ok_or_else(|| Corruption::BadPending {
                    id: meta.id,
                    detail: "missing or damaged".into(),
                })?;
            self.apply(state, released)?;
            report.released += 1;
        }
        for meta in not_taken {
            let bytes = take_pending(&mut self.pending, meta.id)?.unwrap_or_default();
            let reason = state
                .fleet
                .as_ref()
                .and_then(|f| f.admits(meta.id).err())
                .expect("refused by it above");
            put_evidence(
                &mut self.refused,
                &Evidence {
                    id: meta.id,
                    hash: meta.hash,
                    reason: reason.to_string(),
                    bytes,
                },
            )?;
            report.refused.get_or_insert(Refused {
                index,
                id: meta.id,
                hash: meta.hash,
                reason: Refusal::NotTaken(reason),
            });
        }
        for (bad, expected) in broken {
            let bytes = take_pending(&mut self.pending, bad.id)?.unwrap_or_default();
            self.forks
                .insert((bad.id.origin.0, bad.id.seq, bad.hash.0), bytes.as_slice())?;
            report.refused.get_or_insert(Refused {
                index,
                id: bad.id,
                hash: bad.hash,
                reason: Refusal::BrokenLink {
                    expected,
                    actual: bad.prev,
                },
            });
        }
        Ok(())
    }

    fn apply(&mut self, state: &mut State, shipped: Shipped) -> Result<(), LogError> {
        if let Some(key) = shipped.key.as_deref() {
            // This node's own events bring their keys back (a restore); another node's event
            // gives its key to this node too, unless this node already used it: a retry sent
            // to any node that holds the first event is answered with it.
            let own = shipped.meta.id.origin == state.origin;
            if own || self.keys.get(key)?.is_none() {
                self.keys.insert(key, state.next_position)?;
            }
        }
        apply(
            state,
            &mut self.blocks,
            &mut self.extents,
            &mut self.here,
            &mut self.moved,
            shipped,
        )
    }

    /// Refuses a shipped event: kept in `forks` as evidence (unless refused for room), and a
    /// fork of this node's own origin stops its own writes.
    fn refuse(
        &mut self,
        state: &mut State,
        shipped: &Shipped,
        index: usize,
        reason: Refusal,
        stored: Option<Hash>,
    ) -> Result<Refused, LogError> {
        let (id, hash) = (shipped.meta.id, shipped.meta.hash);
        match &reason {
            Refusal::TooManyWaiting => {}
            Refusal::NotTaken(not_taken) => put_evidence(
                &mut self.refused,
                &Evidence {
                    id,
                    hash,
                    reason: not_taken.to_string(),
                    bytes: shipped.bytes.clone(),
                },
            )?,
            _ => {
                self.forks
                    .insert((id.origin.0, id.seq, hash.0), shipped.bytes.as_slice())?;
            }
        }
        if let Refusal::OwnFork { .. } = reason {
            state.halted = Some(format!(
                "origin {} seq {} was written twice ({} held, {} shipped); this home is a stale copy",
                id.origin,
                id.seq,
                stored.map(|h| h.to_hex()).unwrap_or_default(),
                hash
            ));
        }
        Ok(Refused {
            index,
            id,
            hash,
            reason,
        })
    }

    /// Closes the blocks and records each moved origin's last extent and head.
    fn close(mut self, txn: &redb::WriteTransaction, state: &mut State) -> Result<(), LogError> {
        state.block = self.blocks.close()?;
        let mut heads = txn.open_table(HEADS)?;
        for origin in self.moved {
            let extent = state.extents[&origin];
            self.extents.insert(
                (origin.0, extent.first_seq),
                (extent.first_position, extent.len),
            )?;
            let (seq, hash) = state.causal.head(origin).expect("applied above");
            heads.insert(origin.0, (seq, hash.0))?;
        }
        Ok(())
    }
}

/// Removes a waiting event from `pending` and gives its stored bytes (the entry after its hash).
fn take_pending(
    pending: &mut redb::Table<([u8; 16], u64), &'static [u8]>,
    id: EventId,
) -> Result<Option<Vec<u8>>, LogError> {
    let entry = pending.remove((id.origin.0, id.seq))?;
    Ok(entry.and_then(|v| v.value().get(32..).map(<[u8]>::to_vec)))
}

/// Puts one shipped event at the next position and records it everywhere but the tables
/// written once per commit (heads, the last extent of each origin).
fn apply(
    state: &mut State,
    blocks: &mut Blocks,
    extents: &mut redb::Table<([u8; 16], u64), (u64, u64)>,
    here: &mut foldhash::HashMap<EventId, (Hash, u64)>,
    moved: &mut HashSet<Origin>,
    shipped: Shipped,
) -> Result<(), LogError> {
    let id = shipped.meta.id;
    let position = state.next_position;
    if let Some(change) = shipped.change.as_deref().cloned() {
        let deps = shipped
            .meta
            .deps
            .iter()
            .map(|d| (d.origin, d.seq))
            .collect();
        state.observe(id, &deps, change);
    }
    if let Some(change) = shipped.recipient.as_deref() {
        state.register(change);
    }
    // Its predecessor and deps are applied (that is why it is applied now): the origin's
    // head, this transaction's events, or the tables.
    let order = causal_order(id, shipped.hlc, shipped.meta.deps.iter().copied(), |p| {
        if state
            .causal
            .head(p.origin)
            .is_some_and(|(seq, _)| seq == p.seq)
        {
            if let Some(&order) = state.orders.get(&p.origin) {
                return Ok(Some(order));
            }
        }
        if let Some(&(_, order)) = here.get(&p) {
            return Ok(Some(order));
        }
        // Earlier in this transaction but in a block already written, or committed before.
        order_of(&*extents, &*blocks.table, p)
    })?;
    blocks.push(&shipped.meta.hash, &shipped.bytes, order)?;
    state.orders.insert(id.origin, order);
    state.pending.push(shipped.stream, position);
    let before = state.extents.get(&id.origin).copied();
    let extent = state.place(id.origin, id.seq, position, 1);
    if let Some(old) = before.filter(|b| b.first_seq != extent.first_seq) {
        // The old extent is complete: store it before starting the new one.
        extents.insert((id.origin.0, old.first_seq), (old.first_position, old.len))?;
    }
    if id.origin != state.origin {
        let seen = state.deps.entry(id.origin).or_default();
        *seen = (*seen).max(id.seq);
    }
    here.insert(id, (shipped.meta.hash, order));
    moved.insert(id.origin);
    state.causal.applied(&shipped.meta);
    state.next_position += 1;
    Ok(())
}

/// The answer for an idempotency key already in the log.
fn stored_answer(
    events: &impl ReadableTable<u64, &'static [u8]>,
    held: &Held,
    position: u64,
) -> Result<Appended, LogError> {
    let record = record_at(events, held, position)?;
    let event = record.event();
    Ok(Appended {
        origin: event.origin(),
        seq: event.seq(),
        position,
        hash: record.hash,
        existing: true,
    })
}

/// The event a stored key names: a held one, or one in the table.
fn record_at(
    events: &impl ReadableTable<u64, &'static [u8]>,
    held: &Held,
    position: u64,
) -> Result<super::Record, LogError> {
    let record = match held.get(position) {
        Some((hash, bytes)) => {
            let entry = [hash.0.as_slice(), bytes].concat();
            Some(super::Record::check(position, &entry)?)
        }
        None => super::entry_at(events, position)?,
    };
    Ok(record.ok_or(Corruption::PositionGap {
        position,
        found: None,
    })?)
}

/// Packs consecutive events, with their causal orders, into blocks and inserts each block as it
/// fills.
struct Blocks<'t, 'txn> {
    table: &'t mut redb::Table<'txn, u64, &'static [u8]>,
    block: BlockBuilder,
    first: u64,
}

impl<'t, 'txn> Blocks<'t, 'txn> {
    /// Packs events from position `first` on into `block`'s buffers (cleared; kept by the caller).
    fn new(
        table: &'t mut redb::Table<'txn, u64, &'static [u8]>,
        first: u64,
        mut block: BlockBuilder,
    ) -> Self {
        block.clear();
        Blocks {
            table,
            block,
            first,
        }
    }

    fn push(&mut self, hash: &Hash, bytes: &[u8], order: u64) -> Result<(), LogError> {
        if !self.block.fits(bytes.len()) {
            let events = self.block.len() as u64;
            self.table.insert(self.first, self.block.seal())?;
            self.block.clear();
            self.first += events;
        }
        self.block.push(&hash.0, bytes, order);
        Ok(())
    }

    /// Writes the last block and gives back the builder, for the next commit.
    fn close(mut self) -> Result<BlockBuilder, LogError> {
        if !self.block.is_empty() {
            self.table.insert(self.first, self.block.seal())?;
        }
        Ok(self.block)
    }
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
    for (stream, positions) in state.pending.drain() {
        value.clear();
        for p in &positions {
            value.extend_from_slice(&p.to_le_bytes());
        }
        streams.insert((first, stream.as_str()), value.as_slice())?;
    }
    meta.insert("streams_to", last.to_le_bytes().as_slice())?;
    Ok(())
}

/// At a clean stop: commit what is held and flush the stream postings, durably, so the next open
/// has no segment to apply and no tail to rescan.
fn flush_at_close(db: &Database, state: &mut State) -> Result<(), LogError> {
    let logged = state.wal.as_ref().is_some_and(|w| w.used() > 0);
    if state.pending.len() == 0 && !logged && state.open.is_none() {
        return Ok(());
    }
    let txn = match state.open.take() {
        Some(txn) => txn,
        None => db.begin_write()?,
    };
    apply_held(&txn, state, false)?;
    {
        let mut meta = txn.open_table(META)?;
        if state.pending.len() > 0 {
            flush_streams(state, &txn, &mut meta)?;
        }
    }
    txn.commit()?;
    state.held.clear();
    state.durable();
    Ok(())
}

/// Applies again the segment's events that redb lost (committed without a flush before a crash):
/// this node's own, from the seq after its head in redb on, in one durable commit, then starts
/// the segment again. Events redb holds are skipped (records from before the segment started
/// again). Nothing but appends are ever in the segment, and every other commit is durable, so
/// the lost events take the same positions, orders and keys again (the ingest path of an origin's
/// own events, as a restore uses).
///
/// Every record past redb's head is the current pass's, and they follow one another: a gap in
/// them, or a whole record past the first frame that is not whole holding an event after the
/// ones applied, means a record in the middle was damaged, and hides events that may have been
/// acknowledged. That is refused by name rather than dropped without a word.
fn replay(
    db: &Database,
    state: &mut State,
    read: wal::Read,
    path: &std::path::Path,
) -> Result<(), LogError> {
    let own = state.origin;
    let mut next = state.causal.head(own).map_or(0, |(seq, _)| seq) + 1;
    let mut lost = Vec::new();
    let damaged = |detail: String| {
        LogError::Corrupt(Corruption::Wal {
            path: path.to_owned(),
            detail,
        })
    };
    // The seq of an event the segment holds: one of this node's own, or the segment is not
    // this log's. Only the events applied again are hashed (`Shipped::verify`); the records'
    // checksums cover the rest.
    let own_seq = |bytes: &[u8]| match event::decode(bytes) {
        Ok(view) if view.id().origin == own => Ok(view.id().seq),
        Ok(view) => Err(damaged(format!(
            "holds an event of origin {}",
            view.id().origin
        ))),
        Err(error) => Err(damaged(error.to_string())),
    };
    for (hash, bytes) in read.records.into_iter().flatten() {
        let seq = own_seq(&bytes)?;
        if seq < next {
            continue;
        }
        if seq > next {
            return Err(damaged(format!(
                "its records skip from seq {next} to seq {seq}: a record between them is \
                 damaged, or the log was restored without this file"
            )));
        }
        lost.push(Shipped::verify(hash, bytes).map_err(|e| damaged(e.to_string()))?);
        next += 1;
    }
    for (at, record) in &read.beyond {
        for (_, bytes) in record {
            let seq = own_seq(bytes)?;
            if seq >= next {
                return Err(damaged(format!(
                    "a damaged record before byte {at} hides the records after it (seq {seq} \
                     on), or the log was restored without this file"
                )));
            }
        }
    }
    if lost.is_empty() {
        return Ok(());
    }
    let count = lost.len() as u64;
    // The first lost event took the deps the durable `meta.deps` still names.
    state.deps.clear();
    // Whole or not at all: a segment that does not follow the log leaves no trace in it.
    let report = commit_ingest(db, state, lost, true)?;
    if let Some(refused) = report.refused {
        return Err(damaged(format!(
            "its events do not follow the log's own (seq {}: {})",
            refused.id.seq, refused.reason
        )));
    }
    if report.applied != count {
        return Err(damaged(format!(
            "{} of its {count} events applied again",
            report.applied
        )));
    }
    tracing::info!(
        events = count,
        "applied again what the write-ahead segment held"
    );
    state.durable_at = Instant::now();
    Ok(())
}
