//! The log: one redb file per node holding every origin's events.
//!
//! Tables (byte-level spec in ARCHITECTURE.md):
//! - `events`:  first position of a block → block of `hash ++ stored bytes` entries, each with
//!   its causal order (`block.rs`; `hlc::order`: the stamp raised past its predecessors',
//!   computed when the event takes its position, equal on every node; projections pick winners
//!   by it); positions are gapless from 1 and are this node's apply order
//! - `extents`: (origin, first seq) → (first position, length): runs of one origin's consecutive
//!   seqs at consecutive positions; the `(origin, seq) → position` index
//! - `heads`:   origin → (seq, hash) of its highest event: the version vector
//! - `streams`: (first position of a flush, stream) → that flush's positions in the stream; keyed
//!   flush-first so that a flush appends to the tree instead of rewriting it. The positions after
//!   `meta.streams_to` are not flushed yet and are found by scanning the tail
//! - `flushes`: first position of a flush → its last position
//! - `keys`:    idempotency key → position
//! - `pending`: (origin, seq) → `hash ++ stored bytes` of a shipped event waiting for its
//!   predecessor or deps; moved into `events` in the commit that applies what it waits for
//! - `forks`:   (origin, seq, hash) → stored bytes of a shipped event refused because another
//!   event holds its (origin, seq): evidence, never applied
//! - `signatures`: (origin, seq) → key ++ signature: a signed head that came with a shipped
//!   event (checked before it reaches the log), kept so that a relay can pass it on
//! - `refused`: (origin, seq, hash) → reason length (u16 LE) ++ reason ++ stored bytes: a shipped
//!   event refused for who wrote it or how it was signed (not a member, revoked, a forged or
//!   missing signature, seq 0, too many deps): evidence, never applied; at most
//!   [`EVIDENCE_MAX`] kept
//! - `meta`:    `format`, `origin`, `clock`, `streams_to`, `deps` (what this node applied from
//!   other origins since its own last event), `halted` (why own writes are stopped, if they are),
//!   `fleet` (the membership as of the last commit, JSON, when the node is in a fleet)
//!
//! Invariants: positions are gapless; each origin's events sit at increasing positions with seqs
//! 1, 2, 3 … and each `prev` is the hash of the one before; heads, extents, streams and keys agree
//! with `events` after every commit, because they are written in the same transaction. Nothing is
//! acknowledged before its commit is durable; a failed commit poisons the writer until reopened.
//!
//! Boundary: the only module that imports redb. Knows the event byte format, not kinds or JSON;
//! asks `membership` (the one module that reads membership payloads) who may write.

mod block;
mod postings;
mod upgrade;
mod verify;
pub mod wal;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use block::Block;

use crate::event::NewEvent;
use crate::event::{self, DecodeError, EventId, EventRef, Hash, Origin};
use crate::identity::{PublicKey, SignedHead};
use crate::sync::Meta;

pub use verify::VerifyReport;
pub use writer::{Acknowledgement, WriterStats};

/// A shipped event whose bytes match its claimed hash and decode: ready for [`Log::ingest`],
/// which decides where it goes.
#[derive(Clone, Debug)]
pub struct Shipped {
    pub meta: Meta,
    pub hlc: u64,
    pub stream: String,
    /// Its idempotency key, if it has one.
    pub key: Option<String>,
    /// The key its origin is bound to, on an origin's first event (envelope format 2).
    pub signer: Option<[u8; 32]>,
    pub bytes: Vec<u8>,
    /// The origin's signature over this event as its head, already verified
    /// ([`Shipped::signed`]): kept with the event, so that a relay passes it on.
    /// (Boxed, as `change` is: most events have neither, and ingest moves each event a few
    /// times between its reading thread, the held-back runs and the writer.)
    pub signed: Option<Box<(PublicKey, [u8; 64])>>,
    /// The membership change it makes, if it is a `device.paired` or `device.revoked`.
    pub change: Option<Box<crate::membership::Change>>,
    /// The vault recipient it registers or removes, if it is a `vault.recipient_*`.
    pub recipient: Option<Box<crate::kinds::vault::Registered>>,
}

/// Why shipped bytes are not an event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShippedError {
    #[error(
        "{}hash mismatch: the bytes hash to {actual}, the sender claims {claimed}",
        name_prefix(id)
    )]
    HashMismatch {
        id: Option<EventId>,
        claimed: Hash,
        actual: Hash,
    },
    #[error("not an event: {0}")]
    Undecodable(DecodeError),
    /// The caller's rules refused what the event says.
    #[error("origin {} seq {}: {problem}", id.origin, id.seq)]
    Refused {
        id: EventId,
        problem: String,
        /// The refused event's bytes, to keep as evidence.
        bytes: Vec<u8>,
    },
}

fn name_prefix(id: &Option<EventId>) -> String {
    match id {
        Some(id) => format!("origin {} seq {}: ", id.origin, id.seq),
        None => String::new(),
    }
}

impl Shipped {
    /// Checks that `bytes` hash to `claimed` and decode as an event.
    pub fn verify(claimed: Hash, bytes: Vec<u8>) -> Result<Shipped, ShippedError> {
        Shipped::verify_then(claimed, bytes, |_| Ok(()))
    }

    /// As [`Shipped::verify`], then `check` on the decoded event (the rules a receiver applies
    /// to what it says), without decoding it a second time.
    pub fn verify_then(
        claimed: Hash,
        bytes: Vec<u8>,
        check: impl FnOnce(&EventRef<'_>) -> Result<(), String>,
    ) -> Result<Shipped, ShippedError> {
        let actual = Hash::of(&bytes);
        let view = event::decode(&bytes);
        if actual != claimed {
            return Err(ShippedError::HashMismatch {
                id: view.ok().map(|v| v.id()),
                claimed,
                actual,
            });
        }
        let view = view.map_err(ShippedError::Undecodable)?;
        // What no chain can hold, whatever the caller's rules: checked here so that no path
        // into the log classifies it as something else (seq 0 as a fork).
        let bound = view
            .signer()
            .map(|key| crate::identity::origin_of(&crate::identity::PublicKey(key)));
        let structural = if view.seq() == 0 {
            Some("seq: must be 1 or more".to_owned())
        } else if bound.is_some() && view.seq() != 1 {
            Some("signer: only an origin's first event carries its key".to_owned())
        } else if bound.is_some_and(|o| o != view.origin()) {
            Some(format!(
                "signer: the key is bound to origin {}, not to this event's origin",
                bound.expect("checked above")
            ))
        } else if view.deps_len() > event::DEPS_MAX {
            Some(format!(
                "deps: names more origins than the limit of {}",
                event::DEPS_MAX
            ))
        } else {
            None
        };
        if let Some(problem) = structural.or_else(|| check(&view).err()) {
            let id = view.id();
            return Err(ShippedError::Refused { id, problem, bytes });
        }
        Ok(Shipped {
            meta: Meta::of(actual, &view),
            hlc: view.hlc(),
            stream: view.stream().to_owned(),
            key: view.key().map(str::to_owned),
            signer: view.signer(),
            change: crate::membership::Change::of(view.kind(), view.version(), view.payload())
                .map(Box::new),
            recipient: crate::kinds::vault::Registered::of(
                view.kind(),
                view.version(),
                view.payload(),
            )
            .map(Box::new),
            bytes,
            signed: None,
        })
    }

    /// Attaches the origin's signature over this event as its head, after checking it: `key`
    /// must be the key the origin is bound to, and the signature its over (origin, seq, hash).
    pub fn signed(mut self, key: PublicKey, signature: [u8; 64]) -> Result<Shipped, ShippedError> {
        let head = SignedHead {
            origin: self.meta.id.origin,
            seq: self.meta.id.seq,
            hash: self.meta.hash,
            signature,
        };
        head.verify(&key).map_err(|e| ShippedError::Refused {
            id: self.meta.id,
            problem: e.to_string(),
            bytes: Vec::new(),
        })?;
        self.signed = Some(Box::new((key, signature)));
        Ok(self)
    }
}

/// Why ingest stopped at an event. Nothing after it in the request was looked at.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[serde(tag = "refusal", rename_all = "snake_case")]
pub enum Refusal {
    #[error("fork: this node holds a different event ({stored}) at that (origin, seq); the shipped one is kept as evidence")]
    Fork { stored: Hash },
    #[error("fork: a different event ({waiting}) already waits at that (origin, seq); the shipped one is kept as evidence")]
    ForkWaiting { waiting: Hash },
    #[error("fork of this node's own origin: it holds {stored} at that seq, so this home wrote a seq twice (restored from an old copy?). Own writes are stopped; see README, \"A forked home\"")]
    OwnFork { stored: Hash },
    #[error("broken chain link: its prev is {actual} but the event before it is {expected}")]
    BrokenLink { expected: Hash, actual: Hash },
    #[error("{PENDING_EVENTS_MAX} shipped events already wait for their dependencies")]
    TooManyWaiting,
    /// Its origin may not write in this fleet (kept as evidence in `refused`).
    #[error("{0}")]
    #[serde(untagged)]
    NotTaken(#[from] crate::membership::NotTaken),
}

/// The event ingest stopped at.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Refused {
    /// Its index in the ingest request.
    pub index: usize,
    pub id: EventId,
    pub hash: Hash,
    #[serde(flatten)]
    pub reason: Refusal,
}

/// What one ingest did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct IngestReport {
    /// Events of the request moved into local positions at once.
    pub applied: u64,
    /// Events of the request put to wait for their predecessor or deps.
    pub waited: u64,
    /// Waiting events (of this request or earlier ones) moved into local positions because
    /// their wait ended.
    pub released: u64,
    /// Shipped events waiting for their predecessor or deps after it (from any ingest).
    pub waiting: u64,
    /// Events this node already held (or already had waiting).
    pub duplicates: u64,
    /// Stamps more than the allowed drift ahead of this node's clock (the clock was clamped).
    pub clamped: u64,
    /// Where it stopped, if it did.
    pub refused: Option<Refused>,
}

impl IngestReport {
    pub fn add(&mut self, other: &IngestReport) {
        self.applied += other.applied;
        self.waited += other.waited;
        self.released += other.released;
        self.waiting = other.waiting;
        self.duplicates += other.duplicates;
        self.clamped += other.clamped;
    }
}

/// The version of the table layout. A log with a higher one is refused, not misread; one with
/// a lower one is upgraded when opened (format 1's blocks lack causal orders).
pub const LOG_FORMAT: u32 = 2;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const EXTENTS: TableDefinition<([u8; 16], u64), (u64, u64)> = TableDefinition::new("extents");
const HEADS: TableDefinition<[u8; 16], (u64, [u8; 32])> = TableDefinition::new("heads");
const STREAMS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("streams");
const FLUSHES: TableDefinition<u64, u64> = TableDefinition::new("flushes");
const KEYS: TableDefinition<&str, u64> = TableDefinition::new("keys");
/// (origin, seq) → the origin's key [32] ++ its signature [64] over that event as its head.
const SIGNATURES: TableDefinition<([u8; 16], u64), &[u8]> = TableDefinition::new("signatures");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const PENDING: TableDefinition<([u8; 16], u64), &[u8]> = TableDefinition::new("pending");
/// (origin, seq, hash of the refused event).
type ForkKey = ([u8; 16], u64, [u8; 32]);
const FORKS: TableDefinition<ForkKey, &[u8]> = TableDefinition::new("forks");
/// (origin, seq, hash) → reason length (u16 LE) ++ reason ++ stored bytes.
const REFUSED: TableDefinition<ForkKey, &[u8]> = TableDefinition::new("refused");

/// Refused events kept as evidence; past it a refusal is still reported, not kept.
pub const EVIDENCE_MAX: u64 = 10_000;

/// A shipped event refused for who wrote it or how it came signed, kept as evidence.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Evidence {
    pub id: EventId,
    pub hash: Hash,
    pub reason: String,
    #[serde(skip)]
    pub bytes: Vec<u8>,
}

impl Evidence {
    fn value(&self) -> Vec<u8> {
        let reason = &self.reason.as_bytes()[..self.reason.len().min(4096)];
        let mut value = Vec::with_capacity(2 + reason.len() + self.bytes.len());
        value.extend_from_slice(&(reason.len() as u16).to_le_bytes());
        value.extend_from_slice(reason);
        value.extend_from_slice(&self.bytes);
        value
    }

    fn read(key: ForkKey, value: &[u8]) -> Evidence {
        let len = value
            .get(..2)
            .map_or(0, |l| u16::from_le_bytes([l[0], l[1]]) as usize);
        let reason = value.get(2..2 + len).unwrap_or_default();
        Evidence {
            id: EventId {
                origin: Origin(key.0),
                seq: key.1,
            },
            hash: Hash(key.2),
            reason: String::from_utf8_lossy(reason).into_owned(),
            bytes: value.get(2 + len..).unwrap_or_default().to_vec(),
        }
    }
}

/// Shipped events that may wait for their dependencies at once; past it ingest is refused
/// (each costs about 100 bytes of memory in the writer).
pub const PENDING_EVENTS_MAX: usize = 1_000_000;

/// Writer tuning; every queue and batch is bounded.
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// A received stamp further than this ahead of the physical clock is clamped.
    pub max_drift_ms: u64,
    /// Most events in one group commit (a single larger request still commits alone, whole).
    /// Not more: a group's answers go out only when it is durable, so a large group leaves the
    /// request threads idle while it commits, and then the writer idle while they parse the
    /// next requests; smaller groups keep both at work.
    pub group_events_max: usize,
    /// Most payload bytes in one group commit (likewise).
    pub group_bytes_max: usize,
    /// Requests that may wait for the writer before appenders block (or are told busy).
    pub queue_requests_max: usize,
    /// Stream postings are kept in memory and written with the commit that takes them past this
    /// many events (or at a clean close): one insert per stream per flush, not per commit.
    /// Readers scan the unflushed tail, so this also bounds that scan (plus one group).
    pub stream_flush_events: usize,
    /// redb's page cache, shared by the writer and every reader of this process. Bounded well
    /// below redb's default (1 GiB): a replay reads the whole log once, and every page it
    /// cached would be fresh memory the process keeps; a cache that recycles its pages made
    /// a rebuild from an opened log faster, not slower.
    pub cache_bytes: usize,
    /// How much of the end of the log file the writer leaves in the kernel's page cache; the
    /// pages before it are dropped as the writer adds to it (0: all stay, as the kernel decides). A
    /// node's log is opened with 256 MiB (`[log] kernel_cache_bytes`); see the writer's
    /// `KernelCache`.
    pub kernel_cache_bytes: u64,
    /// The public key this node's origin is bound to (`identity`): the origin's first event
    /// carries it. `None` for a node made before keys.
    pub signer: Option<[u8; 32]>,
    /// The root of the fleet this node is in: only members' events are taken (`membership`).
    /// `None` (a node made before keys, or a test of the log alone): every origin's are.
    pub fleet_root: Option<Origin>,
    /// A group commits to redb durably once the last durable commit is older than this; the
    /// groups between are made durable in the write-ahead segment (`wal`). It bounds what a
    /// crash leaves to apply again at open, and how long redb keeps the pages its unflushed
    /// commits replaced.
    pub durable_every: std::time::Duration,
    /// The write-ahead segment's size: a group whose record does not fit in what is left
    /// commits to redb durably, and the segment starts again. At most
    /// [`wal::SEGMENT_BYTES_MAX`] (a larger value is taken as that).
    pub segment_bytes: u64,
    /// Small groups' events acknowledged and held in memory at most (with at most 1 MiB of
    /// their bytes): they are durable in the segment, and reach redb's tables together, when a
    /// read begins, at this bound, before any other commit, and at close. At least 1.
    pub held_events_max: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            max_drift_ms: 60_000,
            group_events_max: 1_000,
            group_bytes_max: 64 * 1024 * 1024,
            queue_requests_max: 1024,
            stream_flush_events: 65_536,
            cache_bytes: 64 * 1024 * 1024,
            kernel_cache_bytes: 0,
            signer: None,
            fleet_root: None,
            durable_every: std::time::Duration::from_secs(1),
            segment_bytes: wal::SEGMENT_BYTES,
            held_events_max: 512,
        }
    }
}

/// Where an appended event landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub origin: Origin,
    pub seq: u64,
    pub position: u64,
    pub hash: Hash,
    /// True when an idempotency key matched an earlier event and nothing was written.
    pub existing: bool,
}

/// An origin's highest event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub origin: Origin,
    pub seq: u64,
    pub hash: Hash,
}

/// Stored bytes that are not what they must be. Carries the facts, not a sentence.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Corruption {
    #[error("{}: {detail}; move it aside to open the log without it (what it held past the log is then lost)", path.display())]
    Wal { path: PathBuf, detail: String },
    #[error(
        "event at position {position}{}: hash mismatch, expected {expected}, actual {actual}",
        name(id)
    )]
    HashMismatch {
        position: u64,
        id: Option<EventId>,
        expected: Hash,
        actual: Hash,
    },
    #[error("event at position {position}{}: {error}", name(id))]
    BadArchive {
        position: u64,
        id: Option<EventId>,
        error: DecodeError,
    },
    #[error("event at position {position}: stored value is {len} bytes, too short to hold a hash and an event")]
    Truncated { position: u64, len: usize },
    #[error("block at position {first_position}: {detail}")]
    BadBlock { first_position: u64, detail: String },
    #[error("waiting event (origin {}, seq {}): {detail}", id.origin, id.seq)]
    BadPending { id: EventId, detail: String },
    #[error("fork: origin {} seq {} has two events, {} held and {refused} refused (kept as evidence)", id.origin, id.seq, held.map_or("none".to_owned(), |h| h.to_hex()))]
    Fork {
        id: EventId,
        held: Option<Hash>,
        refused: Hash,
    },
    #[error("event at position {position} (origin {}, seq {}): chain broken, prev should be {expected} (hash of seq {}) but is {actual}", id.origin, id.seq, id.seq - 1)]
    ChainBreak {
        position: u64,
        id: EventId,
        expected: Hash,
        actual: Hash,
    },
    #[error(
        "event at position {position} (origin {origin}): seq {actual} where seq {expected} was due"
    )]
    SeqGap {
        position: u64,
        origin: Origin,
        expected: u64,
        actual: u64,
    },
    #[error(
        "position {position}: missing from the position index (next stored position is {found:?})"
    )]
    PositionGap { position: u64, found: Option<u64> },
    #[error("origin {origin}: head says seq {head_seq} hash {head_hash}, the log ends at seq {log_seq} hash {log_hash}")]
    HeadMismatch {
        origin: Origin,
        head_seq: u64,
        head_hash: Hash,
        log_seq: u64,
        log_hash: Hash,
    },
    #[error("event at position {position}: causal order {found} where {expected} was due")]
    Order {
        position: u64,
        expected: u64,
        found: u64,
    },
    #[error("origin {} seq {}: the signature kept for it {detail}", id.origin, id.seq)]
    BadSignature { id: EventId, detail: String },
    #[error(
        "origin {origin} seq {seq}: the index points at position {position}, which holds {found:?}"
    )]
    IndexMismatch {
        origin: Origin,
        seq: u64,
        position: u64,
        found: Option<EventId>,
    },
}

fn name(id: &Option<EventId>) -> String {
    match id {
        Some(id) => format!(" (origin {}, seq {})", id.origin, id.seq),
        None => String::new(),
    }
}

impl Corruption {
    /// The log position the problem shows at, for ordering reports.
    pub fn position(&self) -> u64 {
        match self {
            Corruption::HashMismatch { position, .. }
            | Corruption::BadArchive { position, .. }
            | Corruption::Truncated { position, .. }
            | Corruption::ChainBreak { position, .. }
            | Corruption::SeqGap { position, .. }
            | Corruption::PositionGap { position, .. }
            | Corruption::Order { position, .. }
            | Corruption::IndexMismatch { position, .. } => *position,
            Corruption::BadBlock { first_position, .. } => *first_position,
            Corruption::HeadMismatch { .. }
            | Corruption::BadPending { .. }
            | Corruption::BadSignature { .. }
            | Corruption::Fork { .. }
            | Corruption::Wal { .. } => u64::MAX,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: not a spool log ({reason})")]
    NotALog { path: PathBuf, reason: String },
    #[error("{path}: log format {found} is newer than this build reads (format {LOG_FORMAT}); use a newer spool")]
    NewerFormat { path: PathBuf, found: u32 },
    #[error("{path}: this log belongs to node {found}, not {expected}")]
    WrongNode {
        path: PathBuf,
        expected: Origin,
        found: Origin,
    },
    #[error("{path}: the log is open in another process (is `spool serve` running?)")]
    Locked { path: PathBuf },
    #[error("{path} already exists")]
    Exists { path: PathBuf },
    #[error("storage: {0}")]
    Storage(#[from] redb::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the writer is poisoned by a failed commit ({cause}); nothing more is accepted until the log is reopened")]
    Poisoned { cause: String },
    #[error("the writer's queue of {0} requests is full; retry")]
    Busy(usize),
    #[error("the writer has stopped")]
    WriterGone,
    #[error("corrupt log: {0}")]
    Corrupt(#[from] Corruption),
    #[error("this node's own writes are stopped: {reason}")]
    Halted { reason: String },
    #[error("key: this idempotency key already names an event made from a different request (keys are per node); use a new key")]
    KeyConflict {
        /// The event of the batch whose key conflicts.
        index: usize,
    },
    /// A vault entry lists a fingerprint that is not a current recipient's, as this node's
    /// applied `vault.recipient_*` events say.
    #[error("{error}")]
    Unregistered {
        /// The event of the batch that lists it.
        index: usize,
        error: crate::kinds::DataError,
    },
}

macro_rules! from_redb {
    ($($ty:ty),*) => {$(
        impl From<$ty> for LogError {
            fn from(e: $ty) -> Self {
                LogError::Storage(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// An event read from the log, with its hash and archive already checked.
///
/// Invariant: made only by [`Record::check`], and its bytes are never changed after (the field
/// is private and nothing hands out a mutable reference), so [`Record::event`] reads them
/// without checking the archive again.
#[derive(Clone, Debug)]
pub struct Record {
    pub position: u64,
    pub hash: Hash,
    bytes: Vec<u8>,
}

impl Record {
    /// Checks a stored entry (`hash ++ stored bytes`): its hash and its archive.
    fn check(position: u64, entry: &[u8]) -> Result<Record, Corruption> {
        let (hash, _) = check_entry(position, entry)?;
        Ok(Record {
            position,
            hash,
            bytes: entry[32..].to_vec(),
        })
    }

    /// The checked event.
    pub fn event(&self) -> EventRef<'_> {
        // SAFETY: `check` validated these bytes as an archive (the struct's invariant), and
        // they have not changed since.
        unsafe { event::decode_checked_before(&self.bytes) }
    }

    /// The stored bytes (the envelope format byte, then the archive).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Consecutive events read from the log, each checked (hash and archive) as it was copied
/// here ([`Reader::read_checked`]), with their causal orders. The bytes are private and never
/// change after the check, so reading an event does not validate its archive again.
#[derive(Default)]
pub struct Checked {
    bytes: Vec<u8>,
    /// Per event: its position, its hash, its causal order and where its bytes end in `bytes`.
    events: Vec<(u64, Hash, u64, usize)>,
}

/// One event of a [`Checked`] run.
pub struct CheckedEvent<'a> {
    pub position: u64,
    pub hash: Hash,
    /// Its causal order ([`crate::hlc::order`]).
    pub order: u64,
    pub event: EventRef<'a>,
}

impl Checked {
    /// The events in position order.
    pub fn iter(&self) -> impl Iterator<Item = CheckedEvent<'_>> {
        let mut start = 0;
        self.events
            .iter()
            .map(move |&(position, hash, order, end)| {
                let bytes = &self.bytes[start..end];
                start = end;
                CheckedEvent {
                    position,
                    hash,
                    order,
                    // SAFETY: `read_checked` validated these bytes as an archive (the struct's
                    // invariant), and they have not changed since.
                    event: unsafe { event::decode_checked_before(bytes) },
                }
            })
    }

    /// The last event's position and hash.
    pub fn last(&self) -> Option<(u64, Hash)> {
        self.events
            .last()
            .map(|&(position, hash, ..)| (position, hash))
    }
}

/// Checks an entry without copying it: the stored hash against blake3 of the bytes, then the
/// archive.
fn check_entry(position: u64, entry: &[u8]) -> Result<(Hash, EventRef<'_>), Corruption> {
    if entry.len() <= 32 {
        return Err(Corruption::Truncated {
            position,
            len: entry.len(),
        });
    }
    let (hash, bytes) = entry.split_at(32);
    let expected = Hash(hash.try_into().expect("split at 32"));
    let actual = Hash::of(bytes);
    let view = event::decode(bytes);
    if actual != expected {
        return Err(Corruption::HashMismatch {
            position,
            id: view.ok().map(|v| v.id()),
            expected,
            actual,
        });
    }
    match view {
        Ok(view) => Ok((expected, view)),
        Err(error) => Err(Corruption::BadArchive {
            position,
            id: None,
            error,
        }),
    }
}

fn parse_block(first_position: u64, value: &[u8]) -> Result<Block<'_>, Corruption> {
    Block::parse(value).map_err(|detail| Corruption::BadBlock {
        first_position,
        detail,
    })
}

/// `read(block, index)` on the block holding `position` in an `events` table (`None` past the
/// last position).
fn in_block_at<T, R>(
    events: &T,
    position: u64,
    read: impl FnOnce(&Block<'_>, usize) -> Result<R, LogError>,
) -> Result<Option<R>, LogError>
where
    T: ReadableTable<u64, &'static [u8]>,
{
    let Some(found) = events.range(..=position)?.next_back() else {
        return Ok(None);
    };
    let (k, v) = found?;
    let first = k.value();
    let block = parse_block(first, v.value())?;
    let index = (position - first) as usize;
    if index >= block.len() {
        return Ok(None);
    }
    read(&block, index).map(Some)
}

/// The checked event at `position` in an `events` table.
fn entry_at<T>(events: &T, position: u64) -> Result<Option<Record>, LogError>
where
    T: ReadableTable<u64, &'static [u8]>,
{
    in_block_at(events, position, |block, i| {
        Ok(Record::check(position, block.entry(i))?)
    })
}

/// Calls `visit(position, entry, order)` for every event from `from` on, in position order,
/// with its causal order, until it returns `false`. Entries are not checked here; `visit`
/// decides.
fn each_entry<T>(
    events: &T,
    from: u64,
    mut visit: impl FnMut(u64, &[u8], u64) -> Result<bool, LogError>,
) -> Result<(), LogError>
where
    T: ReadableTable<u64, &'static [u8]>,
{
    let start = match events.range(..=from)?.next_back() {
        Some(found) => found?.0.value(),
        None => from,
    };
    for found in events.range(start..)? {
        let (k, v) = found?;
        let first = k.value();
        let block = parse_block(first, v.value())?;
        for (i, entry) in block.entries().enumerate() {
            let position = first + i as u64;
            let order = block.order(i).expect("a format-2 block has orders");
            if position >= from && !visit(position, entry, order)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The causal order stored for the event at `position`.
fn order_at<T>(events: &T, position: u64) -> Result<Option<u64>, LogError>
where
    T: ReadableTable<u64, &'static [u8]>,
{
    Ok(in_block_at(events, position, |block, i| Ok(block.order(i)))?.flatten())
}

/// The causal order stored for `(origin, seq)`, if this log holds it.
fn order_of<X, E>(extents: &X, events: &E, id: EventId) -> Result<Option<u64>, LogError>
where
    X: ReadableTable<([u8; 16], u64), (u64, u64)>,
    E: ReadableTable<u64, &'static [u8]>,
{
    match position_of(extents, id)? {
        Some(position) => order_at(events, position),
        None => Ok(None),
    }
}

/// A `signatures` value: the key and the signature, if it has their length.
fn split_signature(value: &[u8]) -> Option<(PublicKey, [u8; 64])> {
    let (key, signature) = value.split_first_chunk::<32>()?;
    Some((PublicKey(*key), signature.try_into().ok()?))
}

/// The causal order of the event `id` stamped `hlc` whose deps are `deps`: its stamp raised
/// past the orders of its predecessor in the chain and of its deps, as `lookup` finds them
/// (`None` for an event not held, as seq 0 never is). The one computation behind the writer's,
/// the upgrade's and verify's orders.
fn causal_order(
    id: EventId,
    hlc: u64,
    deps: impl IntoIterator<Item = event::Dep>,
    mut lookup: impl FnMut(EventId) -> Result<Option<u64>, LogError>,
) -> Result<u64, LogError> {
    let prev = (id.seq > 1).then(|| EventId {
        origin: id.origin,
        seq: id.seq - 1,
    });
    let deps = deps.into_iter().map(|d| EventId {
        origin: d.origin,
        seq: d.seq,
    });
    let mut order = hlc;
    for p in prev.into_iter().chain(deps).filter(|p| p.seq > 0) {
        if let Some(before) = lookup(p)? {
            order = crate::hlc::order(order, [before]);
        }
    }
    Ok(order)
}

/// The highest position in an `events` table (0 when empty).
fn last_position<T>(events: &T) -> Result<u64, LogError>
where
    T: ReadableTable<u64, &'static [u8]>,
{
    let Some(found) = events.last()? else {
        return Ok(0);
    };
    let (k, v) = found;
    let first = k.value();
    let block = parse_block(first, v.value())?;
    Ok(first + block.len() as u64 - 1)
}

/// Reads a little-endian u64 from `meta` (0 when absent).
fn meta_u64<T>(meta: &T, key: &str) -> Result<u64, LogError>
where
    T: ReadableTable<&'static str, &'static [u8]>,
{
    Ok(meta
        .get(key)?
        .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0))
}

/// The position of `(origin, seq)` in an `extents` table.
fn position_of<T>(extents: &T, id: EventId) -> Result<Option<u64>, LogError>
where
    T: ReadableTable<([u8; 16], u64), (u64, u64)>,
{
    let mut range = extents.range((id.origin.0, 0u64)..=(id.origin.0, id.seq))?;
    let Some(entry) = range.next_back() else {
        return Ok(None);
    };
    let (k, v) = entry?;
    let (_, first_seq) = k.value();
    let (first_position, len) = v.value();
    Ok((id.seq < first_seq + len).then(|| first_position + (id.seq - first_seq)))
}

/// Two events at one (origin, seq): the one held and the one refused.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Fork {
    pub id: EventId,
    pub refused: Hash,
    /// The event this node applied there (none if the refused one clashed with a waiting one).
    pub held: Option<Hash>,
}

/// One page of a scan.
#[derive(Clone, Debug, Default)]
pub struct Page {
    /// The events that passed the filter.
    pub records: Vec<Record>,
    /// The last position examined; `None` when there was nothing after `after`.
    pub last_examined: Option<u64>,
}

/// What `scan` keeps.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub stream: Option<String>,
    pub kind: Option<String>,
    pub origin: Option<Origin>,
}

/// Size and counts of a log.
#[derive(Clone, Debug)]
pub struct Stats {
    pub events: u64,
    pub heads: Vec<Head>,
    pub file_bytes: u64,
}

/// The write-ahead segment's file beside the log at `path` (`log.wal` for `log.redb`), emptied
/// when `fresh`.
fn segment_file(path: &Path, fresh: bool) -> Result<Box<dyn redb::StorageBackend>, LogError> {
    use std::os::unix::fs::OpenOptionsExt;
    let wal = path.with_extension("wal");
    // It holds events as the log does: the owner's only.
    let file = std::fs::OpenOptions::new()
        .mode(0o600)
        .read(true)
        .write(true)
        .create(true)
        .truncate(fresh)
        .open(&wal)
        .map_err(|source| LogError::Io { path: wal, source })?;
    Ok(Box::new(wal::SegmentFile(file)))
}

/// An open log: one writer thread, any number of concurrent snapshot readers.
pub struct Log {
    db: Arc<Database>,
    path: PathBuf,
    origin: Origin,
    fleet_root: Option<Origin>,
    writer: writer::Handle,
}

impl Log {
    /// Creates a new log file for node `origin`; refuses an existing path.
    pub fn create(path: &Path, origin: Origin, options: LogOptions) -> Result<Log, LogError> {
        if path.exists() {
            return Err(LogError::Exists {
                path: path.to_owned(),
            });
        }
        let db = Database::builder()
            .set_cache_size(options.cache_bytes)
            .create(path)
            .map_err(|e| open_error(path, e))?;
        // A segment without its log holds nothing this log can use.
        let segment = segment_file(path, true)?;
        Self::init(db, path, origin, options, segment)
    }

    /// Opens the log of node `origin`.
    pub fn open(path: &Path, origin: Origin, options: LogOptions) -> Result<Log, LogError> {
        if !path.is_file() {
            return Err(LogError::NotALog {
                path: path.to_owned(),
                reason: "no such file".into(),
            });
        }
        let db = Database::builder()
            .set_cache_size(options.cache_bytes)
            .open(path)
            .map_err(|e| open_error(path, e))?;
        // Opened only once redb holds the log's lock: one process writes the segment.
        let segment = segment_file(path, false)?;
        Self::start(db, path, origin, options, segment)
    }

    /// Creates or opens a log on caller-supplied storage for the log and its write-ahead
    /// segment (fault-injection tests).
    pub fn with_backend(
        backend: impl redb::StorageBackend,
        segment: impl redb::StorageBackend,
        label: &Path,
        origin: Origin,
        options: LogOptions,
        create: bool,
    ) -> Result<Log, LogError> {
        let db = Database::builder()
            .set_cache_size(options.cache_bytes)
            .create_with_backend(backend)
            .map_err(|e| open_error(label, e))?;
        let segment = Box::new(segment);
        if create {
            Self::init(db, label, origin, options, segment)
        } else {
            Self::start(db, label, origin, options, segment)
        }
    }

    fn init(
        db: Database,
        path: &Path,
        origin: Origin,
        options: LogOptions,
        segment: Box<dyn redb::StorageBackend>,
    ) -> Result<Log, LogError> {
        let txn = db.begin_write()?;
        {
            txn.open_table(EVENTS)?;
            txn.open_table(EXTENTS)?;
            txn.open_table(HEADS)?;
            txn.open_table(STREAMS)?;
            txn.open_table(FLUSHES)?;
            txn.open_table(KEYS)?;
            txn.open_table(PENDING)?;
            txn.open_table(FORKS)?;
            txn.open_table(SIGNATURES)?;
            txn.open_table(REFUSED)?;
            let mut meta = txn.open_table(META)?;
            meta.insert("format", LOG_FORMAT.to_le_bytes().as_slice())?;
            meta.insert("origin", origin.0.as_slice())?;
            meta.insert("clock", 0u64.to_le_bytes().as_slice())?;
            meta.insert("streams_to", 0u64.to_le_bytes().as_slice())?;
        }
        txn.commit()?;
        Self::start(db, path, origin, options, segment)
    }

    fn start(
        db: Database,
        path: &Path,
        origin: Origin,
        options: LogOptions,
        segment: Box<dyn redb::StorageBackend>,
    ) -> Result<Log, LogError> {
        let format = check_meta(&db, path, origin)?;
        // Logs made before shipping existed lack its tables; opening them creates them.
        let txn = db.begin_write()?;
        txn.open_table(PENDING)?;
        txn.open_table(FORKS)?;
        txn.open_table(SIGNATURES)?;
        txn.open_table(REFUSED)?;
        txn.commit()?;
        if format < 2 {
            upgrade::orders(&db, path)?;
        }
        let db = Arc::new(db);
        let fleet_root = options.fleet_root;
        let writer = writer::Handle::start(db.clone(), path, origin, options, segment)?;
        Ok(Log {
            db,
            path: path.to_owned(),
            origin,
            fleet_root,
            writer,
        })
    }

    /// The root of the fleet this log takes members' events for; `None`: it takes every
    /// origin's (a node made before keys).
    pub fn fleet_root(&self) -> Option<Origin> {
        self.fleet_root
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a batch atomically and returns once it is durable. Events whose idempotency key
    /// is already in the log are not written; their first event is returned with `existing`.
    pub fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, LogError> {
        self.writer.append(events)
    }

    /// Queues a batch without blocking: `Busy` when the writer's queue is full. The answer (once
    /// the batch is durable) arrives on the receiver.
    pub fn submit(&self, events: Vec<NewEvent>) -> Result<Acknowledgement, LogError> {
        self.writer.submit(events)
    }

    /// Applies shipped events in causal order (see [`crate::sync::Causal`]): each is applied
    /// once its predecessor and deps are, kept waiting durably until then, skipped if already
    /// held, and a fork or a broken chain link stops the ingest there (what came before it is
    /// committed). Returns once durable.
    pub fn ingest(&self, events: Vec<Shipped>) -> Result<IngestReport, LogError> {
        self.writer.ingest(events)
    }

    /// Keeps events refused before they reached [`Log::ingest`] (a forged or missing signature,
    /// seq 0, too many deps) as evidence in `refused`; returns once durable.
    pub fn keep_evidence(&self, evidence: Vec<Evidence>) -> Result<(), LogError> {
        self.writer.keep_evidence(evidence)
    }

    /// Commits and events written since this log was opened.
    pub fn writer_stats(&self) -> WriterStats {
        self.writer.stats()
    }

    /// A consistent snapshot for reading, holding every event acknowledged before it began.
    /// It never blocks the writer. When the writer holds acknowledged events in memory (small
    /// groups since redb's last commit), it first waits for a commit under way and has them
    /// committed.
    pub fn read(&self) -> Result<Reader, LogError> {
        self.writer.publish()?;
        Ok(Reader {
            txn: self.db.begin_read()?,
        })
    }

    /// The fleet's membership (`None` for a log of no fleet), read without waiting for a commit
    /// under way, as a peer's TLS handshake needs: a group that changes the membership is never
    /// held in the writer's memory, so what redb holds is what every acknowledged event made.
    pub fn fleet(&self) -> Result<Option<crate::membership::Membership>, LogError> {
        let reader = Reader {
            txn: self.db.begin_read()?,
        };
        reader.fleet(self.fleet_root)
    }

    /// Checks every event's hash and archive, every origin's chain, the position index, the
    /// extents and the heads, using `threads` threads.
    pub fn verify(&self, threads: usize) -> Result<VerifyReport, LogError> {
        self.writer.publish()?;
        verify::verify(&self.db.begin_read()?, threads)
    }

    pub fn stats(&self) -> Result<Stats, LogError> {
        let reader = self.read()?;
        Ok(Stats {
            events: reader.last_position()?,
            heads: reader.heads()?,
            file_bytes: std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0),
        })
    }
}

fn open_error(path: &Path, e: redb::DatabaseError) -> LogError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => LogError::Locked {
            path: path.to_owned(),
        },
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::WouldBlock =>
        {
            LogError::Locked {
                path: path.to_owned(),
            }
        }
        // redb reports a foreign or cut-short file as InvalidData / UnexpectedEof; any other I/O
        // failure (permissions, a failing disk) is about reading the file, not its contents.
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if !matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            LogError::Io {
                path: path.to_owned(),
                source: io,
            }
        }
        other => LogError::NotALog {
            path: path.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// Checks that the file is a log of `origin` in a format this build reads; returns the format.
fn check_meta(db: &Database, path: &Path, origin: Origin) -> Result<u32, LogError> {
    let not_a_log = |reason: &str| LogError::NotALog {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let txn = db.begin_read()?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Err(not_a_log("no meta table")),
        Err(e) => return Err(e.into()),
    };
    let format = meta
        .get("format")?
        .and_then(|v| <[u8; 4]>::try_from(v.value()).ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| not_a_log("no format marker"))?;
    if format > LOG_FORMAT {
        return Err(LogError::NewerFormat {
            path: path.to_owned(),
            found: format,
        });
    }
    let found = meta
        .get("origin")?
        .and_then(|v| <[u8; 16]>::try_from(v.value()).ok())
        .map(Origin)
        .ok_or_else(|| not_a_log("no origin"))?;
    if found != origin {
        return Err(LogError::WrongNode {
            path: path.to_owned(),
            expected: origin,
            found,
        });
    }
    Ok(format)
}

/// A snapshot of the log.
pub struct Reader {
    txn: redb::ReadTransaction,
}

impl Reader {
    /// The highest position (0 for an empty log); positions are 1..=this.
    pub fn last_position(&self) -> Result<u64, LogError> {
        last_position(&self.txn.open_table(EVENTS)?)
    }

    /// The event at `position`, checked.
    pub fn get(&self, position: u64) -> Result<Option<Record>, LogError> {
        entry_at(&self.txn.open_table(EVENTS)?, position)
    }

    /// Reads the events after `after`, at most `limit` of them and, past the first, at most
    /// `bytes_max` of stored bytes, into `into` (replacing what it held and keeping its
    /// buffers), each checked as it is copied: the replay's read, on a thread of its own.
    /// Returns the last position read (`None` when there was nothing after `after`).
    pub fn read_checked(
        &self,
        after: u64,
        limit: usize,
        bytes_max: usize,
        into: &mut Checked,
    ) -> Result<Option<u64>, LogError> {
        into.bytes.clear();
        into.events.clear();
        let events = self.txn.open_table(EVENTS)?;
        let from = after.saturating_add(1);
        each_entry(&events, from, |position, entry, order| {
            let full = !into.events.is_empty() && into.bytes.len() + entry.len() > bytes_max;
            if into.events.len() == limit || full {
                return Ok(false);
            }
            let (hash, _) = check_entry(position, entry)?;
            into.bytes.extend_from_slice(&entry[32..]);
            into.events.push((position, hash, order, into.bytes.len()));
            Ok(true)
        })?;
        Ok(into.events.last().map(|&(position, ..)| position))
    }

    /// Examines up to `limit` events after `after` (those of `filter.stream` only, when given)
    /// and returns the ones that pass `filter`, in position order.
    pub fn scan(&self, after: u64, limit: usize, filter: &Filter) -> Result<Page, LogError> {
        let events = self.txn.open_table(EVENTS)?;
        let mut page = Page::default();
        let everything =
            filter.kind.is_none() && filter.origin.is_none() && filter.stream.is_none();
        let mut keep = |record: Record| {
            page.last_examined = Some(record.position);
            if everything {
                page.records.push(record);
                return;
            }
            let e = record.event();
            if filter.kind.as_deref().is_none_or(|k| e.kind() == k)
                && filter.origin.is_none_or(|o| e.origin() == o)
                && filter.stream.as_deref().is_none_or(|s| e.stream() == s)
            {
                page.records.push(record);
            }
        };
        if let Some(stream) = &filter.stream {
            for position in self.stream_positions(stream, after, limit)? {
                let record = entry_at(&events, position)?.ok_or(Corruption::PositionGap {
                    position,
                    found: None,
                })?;
                keep(record);
            }
        } else {
            let mut examined = 0;
            each_entry(&events, after.saturating_add(1), |position, entry, _| {
                if examined == limit {
                    return Ok(false);
                }
                examined += 1;
                keep(Record::check(position, entry)?);
                Ok(true)
            })?;
        }
        Ok(page)
    }

    /// Positions of `stream` after `after`, at most `limit`, ascending: the flushed postings,
    /// then a scan of the tail not flushed yet (bounded by the writer's flush threshold).
    pub fn stream_positions(
        &self,
        stream: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<u64>, LogError> {
        let streams_to = meta_u64(&self.txn.open_table(META)?, "streams_to")?;
        let streams = self.txn.open_table(STREAMS)?;
        let flushes = self.txn.open_table(FLUSHES)?;
        let mut out = Vec::new();
        for flush in flushes.iter()? {
            let (first, last) = flush?;
            if last.value() <= after {
                continue;
            }
            let Some(v) = streams.get((first.value(), stream))? else {
                continue;
            };
            for chunk in v.value().chunks_exact(8) {
                let position = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
                if position > after {
                    if out.len() == limit {
                        return Ok(out);
                    }
                    out.push(position);
                }
            }
        }
        let events = self.txn.open_table(EVENTS)?;
        each_entry(
            &events,
            after.max(streams_to).saturating_add(1),
            |position, entry, _| {
                if out.len() == limit {
                    return Ok(false);
                }
                let (_, event) = check_entry(position, entry)?;
                if event.stream() == stream {
                    out.push(position);
                }
                Ok(true)
            },
        )?;
        Ok(out)
    }

    /// Every origin's head: the version vector.
    pub fn heads(&self) -> Result<Vec<Head>, LogError> {
        let heads = self.txn.open_table(HEADS)?;
        let mut out = Vec::new();
        for entry in heads.iter()? {
            let (k, v) = entry?;
            let (seq, hash) = v.value();
            out.push(Head {
                origin: Origin(k.value()),
                seq,
                hash: Hash(hash),
            });
        }
        Ok(out)
    }

    /// The position of `(origin, seq)`, if this node holds it.
    pub fn position_of(&self, id: EventId) -> Result<Option<u64>, LogError> {
        position_of(&self.txn.open_table(EXTENTS)?, id)
    }

    /// The key carried by `origin`'s first event: `None` when this node does not hold it,
    /// `Some(None)` for an origin made before keys.
    pub fn signer_of(&self, origin: Origin) -> Result<Option<Option<[u8; 32]>>, LogError> {
        let id = EventId { origin, seq: 1 };
        let Some(position) = self.position_of(id)? else {
            return Ok(None);
        };
        Ok(self.get(position)?.map(|r| r.event().signer()))
    }

    /// The highest seq held of `origin` (0 for none).
    pub fn head_seq(&self, origin: Origin) -> Result<u64, LogError> {
        let heads = self.txn.open_table(HEADS)?;
        Ok(heads.get(origin.0)?.map_or(0, |v| v.value().0))
    }

    /// Per origin, the highest event at or before `position`: its seq and hash (one pass over
    /// the extents, then one read per origin).
    pub fn applied_at(
        &self,
        position: u64,
    ) -> Result<std::collections::BTreeMap<Origin, (u64, Hash)>, LogError> {
        let extents = self.txn.open_table(EXTENTS)?;
        let mut seqs = std::collections::BTreeMap::new();
        for entry in extents.iter()? {
            let (k, v) = entry?;
            let ((origin, first_seq), (first_position, len)) = (k.value(), v.value());
            if first_position > position || len == 0 {
                continue;
            }
            let seq = first_seq + len.min(position - first_position + 1) - 1;
            let held = seqs.entry(Origin(origin)).or_insert(0);
            *held = seq.max(*held);
        }
        let events = self.txn.open_table(EVENTS)?;
        let mut out = std::collections::BTreeMap::new();
        for (origin, seq) in seqs {
            let id = EventId { origin, seq };
            // The extent just read holds it.
            let Some(at) = position_of(&extents, id)? else {
                continue;
            };
            let record = entry_at(&events, at)?.ok_or(Corruption::PositionGap {
                position: at,
                found: None,
            })?;
            out.insert(origin, (seq, record.hash));
        }
        Ok(out)
    }

    /// The first position holding an event past `heads` (the events of origins they lack, or
    /// after their seq), if any.
    pub fn first_not_in(
        &self,
        heads: &std::collections::BTreeMap<Origin, (u64, Hash)>,
    ) -> Result<Option<u64>, LogError> {
        let extents = self.txn.open_table(EXTENTS)?;
        let mut first: Option<u64> = None;
        for head in self.heads()? {
            let seq = heads.get(&head.origin).map_or(0, |h| h.0);
            if head.seq <= seq {
                continue;
            }
            let id = EventId {
                origin: head.origin,
                seq: seq + 1,
            };
            if let Some(position) = position_of(&extents, id)? {
                first = Some(first.map_or(position, |f| f.min(position)));
            }
        }
        Ok(first)
    }

    /// The signed heads of `origin` this node keeps (received with its events), in seq order,
    /// each with the key that signed it.
    pub fn signed_heads(&self, origin: Origin) -> Result<Vec<(PublicKey, SignedHead)>, LogError> {
        let table = self.txn.open_table(SIGNATURES)?;
        let extents = self.txn.open_table(EXTENTS)?;
        let events = self.txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        for entry in table.range((origin.0, 0u64)..=(origin.0, u64::MAX))? {
            let (k, v) = entry?;
            let (_, seq) = k.value();
            let Some((key, signature)) = split_signature(v.value()) else {
                continue; // Verify names it.
            };
            let id = EventId { origin, seq };
            let Some(position) = position_of(&extents, id)? else {
                continue; // Still waiting for its dependencies.
            };
            let Some(record) = entry_at(&events, position)? else {
                continue;
            };
            out.push((
                key,
                SignedHead {
                    origin,
                    seq,
                    hash: record.hash,
                    signature,
                },
            ));
        }
        Ok(out)
    }

    /// Shipped events waiting for their dependencies.
    pub fn pending(&self) -> Result<u64, LogError> {
        Ok(self.txn.open_table(PENDING)?.len()?)
    }

    /// Refused forks kept as evidence: (origin, seq, the refused event's hash, the hash held).
    pub fn forks(&self) -> Result<Vec<Fork>, LogError> {
        let forks = self.txn.open_table(FORKS)?;
        let mut out = Vec::new();
        for entry in forks.iter()? {
            let (k, _) = entry?;
            let (origin, seq, hash) = k.value();
            let id = EventId {
                origin: Origin(origin),
                seq,
            };
            let held = match self.position_of(id)? {
                Some(position) => self.get(position)?.map(|r| r.hash),
                None => None,
            };
            out.push(Fork {
                id,
                refused: Hash(hash),
                held,
            });
        }
        Ok(out)
    }

    /// Events refused for who wrote them or how they came signed, kept as evidence.
    pub fn refused(&self) -> Result<Vec<Evidence>, LogError> {
        let table = self.txn.open_table(REFUSED)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            out.push(Evidence::read(k.value(), v.value()));
        }
        Ok(out)
    }

    /// The fleet as of the last commit (`None` for a log that takes every origin's events).
    /// A log whose saved membership is missing or for another root is read from its events.
    pub fn fleet(
        &self,
        root: Option<Origin>,
    ) -> Result<Option<crate::membership::Membership>, LogError> {
        let Some(root) = root else {
            return Ok(None);
        };
        let meta = self.txn.open_table(META)?;
        let events = self.txn.open_table(EVENTS)?;
        writer::load_fleet(&meta, &events, root).map(|(fleet, _)| Some(fleet))
    }

    /// Why this node's own writes are stopped, if they are.
    pub fn halted(&self) -> Result<Option<String>, LogError> {
        let meta = self.txn.open_table(META)?;
        let reason = meta.get("halted")?;
        Ok(reason.map(|v| String::from_utf8_lossy(v.value()).into_owned()))
    }

    /// How many events the log holds (positions are gapless).
    pub fn len(&self) -> Result<u64, LogError> {
        self.last_position()
    }

    pub fn is_empty(&self) -> Result<bool, LogError> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
mod tests;
