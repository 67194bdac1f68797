//! Projections: tables derived from the log. A projector is a pure function from one event to
//! row writes; ONE replay loop feeds it events in position order and hands its writes to a
//! target, which commits them with the checkpoint they reach. Rebuild, as-of replay, live
//! catch-up and digest differ only in where the loop starts and stops and where it writes.
//!
//! Invariant (the convergence rule): the rows depend only on the set of events applied, not on
//! the order of concurrent ones. Append-only rows are keyed by event id and inserted if absent;
//! mutable rows carry a stamp (causal order, origin) per column group and a write lands only if
//! its stamp is newer (or older, for first-writer-wins facts). The causal order (`hlc::order`)
//! puts every event after what happened before it, so a causally later write always wins.
//!
//! Boundary: knows events and kinds; nothing about SQL engines (`sqlite` is the only target
//! module importing rusqlite).

pub mod merge;
pub mod postgres;
mod rows;
mod sql;
pub mod sqlite;

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use compact_str::CompactString;

use std::collections::BTreeMap;

use crate::event::{EventId, EventRef, Hash, Origin};
use crate::hlc;
use crate::kinds::{self, Body};
use crate::log::{Checked, LogError, Reader};
use merge::Merged;

/// A value in a row.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    Null,
    Int(i64),
    Real(f64),
    /// Text of up to 24 bytes (most ids, names and timestamps) is held inline: a projected
    /// event's values cost no allocation each.
    Text(CompactString),
    Blob(Vec<u8>),
}

impl Val {
    /// The bytes it holds beyond its own size (text and blobs): what a run of rows held
    /// before it is written is counted in.
    pub fn held_bytes(&self) -> usize {
        match self {
            Val::Text(t) => t.len(),
            Val::Blob(b) => b.len(),
            Val::Null | Val::Int(_) | Val::Real(_) => 0,
        }
    }
}

/// Bytes of row values a target holds in one run of inserts before it writes them, beside its
/// count of rows: rows of large events are written in runs as small in bytes as small ones.
pub const INSERT_RUN_BYTES: usize = 4 * 1024 * 1024;

/// Which of two stamped writes to a column group lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The newer stamp (last writer wins).
    Newer,
    /// The older stamp (first writer wins: a job claim).
    Older,
}

/// Columns written together under one stamp column.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub stamp: &'static str,
    pub rule: Rule,
    pub cols: Vec<(&'static str, Val)>,
}

/// One row write. Table and column names are the projector's constants, never event data.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// Insert if no row has this primary key (append-only rows keyed by event id).
    Insert {
        table: &'static str,
        cols: Vec<(&'static str, Val)>,
    },
    /// Create the row if absent; each group lands if its stamp wins under its rule.
    Upsert {
        table: &'static str,
        key: Vec<(&'static str, Val)>,
        stamp: [u8; 24],
        groups: Vec<Group>,
    },
}

/// What a projector knows of an event besides its payload.
pub struct Context<'a> {
    /// `<origin hex>:<seq>`: the key of append-only rows, equal on every node.
    pub id: CompactString,
    /// Causal order (big-endian, [`hlc::order`]) then origin: bytewise order is a total order
    /// of events in which every event follows what happened before it, whatever the clocks.
    pub stamp: [u8; 24],
    /// The physical time of the event's own HLC stamp (as its node's clock said, not raised
    /// past its predecessors), RFC 3339 UTC with milliseconds.
    pub at: CompactString,
    pub actor: &'a str,
    pub stream: &'a str,
}

impl<'a> Context<'a> {
    /// The context of `event`, whose causal order is `order`.
    pub fn of(event: &'a EventRef<'a>, order: u64) -> Context<'a> {
        let id: EventId = event.id();
        let mut stamp = [0u8; 24];
        stamp[..8].copy_from_slice(&order.to_be_bytes());
        stamp[8..].copy_from_slice(&id.origin.0);
        let mut hex = [0u8; 32];
        hex::encode_to_slice(id.origin.0, &mut hex).expect("32 hex digits for 16 bytes");
        let mut text = CompactString::with_capacity(32 + 1 + 20);
        text.push_str(std::str::from_utf8(&hex).expect("hex digits"));
        text.push(':');
        text.push_str(itoa::Buffer::new().format(id.seq));
        Context {
            id: text,
            stamp,
            at: time_text(hlc::physical_ms(event.hlc())),
            actor: event.actor(),
            stream: event.stream(),
        }
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds.
pub fn time_text(ms: u64) -> CompactString {
    thread_local! {
        /// The last one formatted: events of one burst share their millisecond.
        static LAST: std::cell::RefCell<(u64, CompactString)> = const { std::cell::RefCell::new((u64::MAX, CompactString::const_new(""))) };
    }
    LAST.with_borrow_mut(|(last, text)| {
        if *last != ms {
            text.clear();
            let _ = write!(
                text,
                "{}",
                humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms))
            );
            *last = ms;
        }
        text.clone()
    })
}

/// The tables that only ever receive [`Write::Insert`] (rows keyed by event id): a bulk load
/// from an empty table may build their key index after the rows, since each event is applied
/// once. A test checks this list against every kind's writes.
pub const APPEND_ONLY: &[&str] = &[
    "activity_log",
    "pairing_attempts",
    "score_history",
    "score_overrides",
    "spool_unreadable",
    "vault_access_log",
];

/// The table listing the events a projection skipped because this build cannot read them.
pub const UNREADABLE: &str = "spool_unreadable";

/// The row that records an event this build cannot read: the projection skips the event and
/// lists it, so it never stops, and an upgraded build's rebuild projects it.
fn unreadable(ctx: &Context<'_>, kind: &str, version: u16, error: &kinds::PayloadError) -> Write {
    let problem = match error {
        kinds::PayloadError::UnknownKind(_) => "a kind this build does not know".to_owned(),
        kinds::PayloadError::UnknownVersion { .. } => {
            "a version this build does not read".to_owned()
        }
        kinds::PayloadError::Invalid { problem, .. } => format!("not a valid payload: {problem}"),
    };
    Write::Insert {
        table: UNREADABLE,
        cols: vec![
            ("id", Val::Text(ctx.id.clone())),
            ("kind", Val::Text(kind.into())),
            ("version", Val::Int(i64::from(version))),
            ("stream", Val::Text(ctx.stream.into())),
            ("problem", Val::Text(problem.into())),
            ("created_at", Val::Text(ctx.at.clone())),
        ],
    }
}

/// The local tables' projector: the writes one event makes.
pub fn writes(ctx: &Context<'_>, body: &Body) -> Vec<Write> {
    rows::writes(ctx, body)
}

/// Where a replay writes: a target holding the projected rows and their checkpoint.
pub trait Target {
    type Error: std::error::Error + Send + Sync + 'static;

    /// What the target has applied.
    fn checkpoint(&mut self) -> Result<Checkpoint, Self::Error>;
    /// How many bytes of merged mutable rows the replay may hold before it commits (memory
    /// the target bounds; the replay holds at most twice this, one batch written while the
    /// next one fills).
    fn held_bytes_max(&self) -> usize;
    /// Opens a transaction.
    fn begin(&mut self) -> Result<(), Self::Error>;
    /// An append-only row: inserted if no row has its key.
    fn insert(
        &mut self,
        table: &'static str,
        cols: Vec<(&'static str, Val)>,
    ) -> Result<(), Self::Error>;
    /// Writes the batch's merged mutable rows (in table and key order; each group lands only
    /// if its stamp wins against the stored one), records the checkpoint (the last position
    /// examined and its hash, the heads applied; `applied` more events applied) and commits it
    /// with the rows it covers.
    fn commit(
        &mut self,
        rows: Vec<merge::Row>,
        position: u64,
        hash: Hash,
        applied: u64,
        heads: &Applied,
    ) -> Result<(), Self::Error>;
}

/// Per origin, the highest event a projection applied: its seq and hash. Events of one origin
/// are applied in seq order, so this names exactly the set applied, the same way on every
/// node and in any apply order: it survives a restore that re-ingests events in another order,
/// where positions do not.
pub type Applied = BTreeMap<Origin, (u64, Hash)>;

/// What a target has applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// The last position of this node's log examined (0: none), and its event's hash.
    pub position: u64,
    pub hash: Hash,
    /// The heads applied; `None` in a checkpoint written before they were kept (then the
    /// position must still name this log's event).
    pub heads: Option<Applied>,
}

/// The stored form of [`Applied`]: `{"<origin hex>": {"seq": n, "hash": "<hex>"}}`.
pub fn heads_text(heads: &Applied) -> String {
    let map: serde_json::Map<String, serde_json::Value> = heads
        .iter()
        .map(|(o, (seq, hash))| {
            let v = serde_json::json!({ "seq": seq, "hash": hash.to_hex() });
            (o.to_hex(), v)
        })
        .collect();
    serde_json::Value::Object(map).to_string()
}

/// The stored heads of a checkpoint at most (about 4 000 origins): a database another process
/// can write is not trusted to hold a sane value.
pub const HEADS_TEXT_BYTES_MAX: usize = 512 * 1024;

/// Reads [`heads_text`]'s form back; `Err` says what is wrong with it (never what it holds).
pub fn parse_heads(text: &str) -> Result<Applied, String> {
    if text.len() > HEADS_TEXT_BYTES_MAX {
        return Err(format!(
            "the checkpoint's heads are {} bytes, more than the {HEADS_TEXT_BYTES_MAX} a \
             checkpoint holds",
            text.len()
        ));
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Head {
        seq: u64,
        hash: String,
    }
    let map: BTreeMap<String, Head> = serde_json::from_str(text).map_err(|e| {
        format!(
            "the checkpoint's heads are not readable (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    map.into_iter()
        .map(|(origin, head)| {
            let origin = Origin::from_hex(&origin)
                .map_err(|_| "the checkpoint's heads name an origin that is not 32 hex digits")?;
            let hash = Hash::from_hex(&head.hash)
                .map_err(|_| "the checkpoint's heads hold a hash that is not 64 hex digits")?;
            Ok((origin, (head.seq, hash)))
        })
        .collect()
}

/// Which events a replay applies.
#[derive(Clone, Copy, Debug, Default)]
pub struct Until {
    /// Positions up to this one (inclusive).
    pub position: Option<u64>,
    /// Only events whose causal order is at or before this time (ms since the epoch). Causally
    /// closed: a happened-before predecessor always has a smaller order, whatever the clocks.
    pub time_ms: Option<u64>,
}

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("projection: {0}")]
    Target(E),
    #[error(
        "the projection's checkpoint (position {position}, event {expected}) is not this log's \
         event at that position (it holds {}): the log was restored or replaced since; \
         `spool rebuild sqlite` rebuilds the SQLite tables and `spool backfill postgres` the \
         Postgres ones",
        .found.map_or_else(|| "none".to_owned(), |h| h.to_hex())
    )]
    Diverged {
        position: u64,
        expected: Hash,
        found: Option<Hash>,
    },
    #[error(
        "the projection holds origin {origin} seq {seq} as event {expected}, this log holds {} \
         there: the log was replaced by one that forked (see README, \"A forked home\"); \
         `spool rebuild sqlite` rebuilds the SQLite tables and `spool backfill postgres` the \
         Postgres ones",
        .found.map_or_else(|| "nothing".to_owned(), |h| h.to_hex())
    )]
    Forked {
        origin: Origin,
        seq: u64,
        expected: Hash,
        found: Option<Hash>,
    },
    #[error(
        "the projection holds origin {origin} up to seq {seq}, this log only up to seq {held}: \
         the log was restored from an older copy; ingest a peer's export that holds those events \
         (README, \"Restoring a node\"), or rebuild the tables from this log (`spool rebuild \
         sqlite`, `spool backfill postgres`)"
    )]
    Behind { origin: Origin, seq: u64, held: u64 },
    #[error("starting the projecting thread: {0}")]
    Thread(std::io::Error),
}

/// Brings `target` up to the end of the log from its checkpoint, after checking that the
/// checkpoint names an event of this log. Returns the number of events applied.
pub fn catch_up<T: Target>(
    reader: &Reader,
    target: &mut T,
    progress: impl FnMut(u64),
) -> Result<u64, ReplayError<T::Error>> {
    resume(reader, target, Until::default(), progress)
}

/// Continues `target` from its checkpoint up to `until`, after checking that every head it
/// applied is this log's event. Starts at the first event not applied (after a restore, the
/// log may hold the same events in another order) and skips the applied ones after it. Returns
/// the number of events applied.
pub fn resume<T: Target>(
    reader: &Reader,
    target: &mut T,
    until: Until,
    progress: impl FnMut(u64),
) -> Result<u64, ReplayError<T::Error>> {
    let checkpoint = target.checkpoint().map_err(ReplayError::Target)?;
    let heads = match checkpoint.heads {
        Some(heads) => {
            check_heads(reader, &heads)?;
            heads
        }
        None if checkpoint.position == 0 => Applied::new(),
        None => {
            // Written before checkpoints kept heads: its position must be this log's event.
            let (position, expected) = (checkpoint.position, checkpoint.hash);
            let found = reader.get(position)?.map(|r| r.hash);
            if found != Some(expected) {
                return Err(ReplayError::Diverged {
                    position,
                    expected,
                    found,
                });
            }
            reader.applied_at(position)?
        }
    };
    let from = match reader.first_not_in(&heads)? {
        Some(position) => position - 1,
        None => reader.last_position()?,
    };
    replay_from(reader, target, from, heads, until, progress)
}

/// Checks that this log holds each of `heads`: the same event at each origin's seq.
fn check_heads<E: std::error::Error + 'static>(
    reader: &Reader,
    heads: &Applied,
) -> Result<(), ReplayError<E>> {
    for (&origin, &(seq, expected)) in heads {
        let held = reader.head_seq(origin)?;
        if held < seq {
            return Err(ReplayError::Behind { origin, seq, held });
        }
        let found = match reader.position_of(EventId { origin, seq })? {
            Some(position) => reader.get(position)?.map(|r| r.hash),
            None => None,
        };
        if found != Some(expected) {
            return Err(ReplayError::Forked {
                origin,
                seq,
                expected,
                found,
            });
        }
    }
    Ok(())
}

/// Most events in one transaction of the replay; a target may ask to commit sooner
/// ([`Target::held_bytes_max`]).
pub const REPLAY_BATCH_EVENTS: u64 = 1_000_000;
/// Events the reading thread reads and the projecting thread hands over at a time.
const REPLAY_CHUNK_EVENTS: usize = 1_000;
/// Stored bytes in one chunk at most (past its first event): a log of large events is read
/// ahead in as many bytes as one of small events, not a thousand times more.
const REPLAY_CHUNK_BYTES: usize = 1024 * 1024;
/// Chunks read and checked ahead of the projecting thread (with one being read and one being
/// projected, at most ten chunks of events in memory). One ahead left both cores a quarter idle.
const REPLAY_CHUNKS_READ_AHEAD: usize = 8;
/// Steps in flight between the projecting thread and the applying one.
const REPLAY_CHUNKS_QUEUED: usize = 64;

/// What the projecting thread hands the applying one.
enum Step {
    /// The append-only rows of consecutive events, and the last one examined.
    Inserts {
        rows: Vec<(&'static str, Vec<(&'static str, Val)>)>,
        tail: u64,
    },
    /// The end of a batch: its merged mutable rows and its checkpoint.
    Commit {
        rows: Vec<merge::Row>,
        tail: (u64, Hash),
        applied: u64,
        heads: Applied,
    },
}

/// The events a replay examines: positions `(from, last]`, those not covered by `heads` (which
/// it moves as it applies), within `until`.
struct Range {
    from: u64,
    last: u64,
    heads: Applied,
    until: Until,
}

/// THE replay loop: applies the events after position `from` (up to `until`) to `target`, in
/// position order, committing with the checkpoint whenever the merged rows reach the target's
/// memory bound, after [`REPLAY_BATCH_EVENTS`], and at the end. Calls `progress(position)` as
/// events are applied. Returns the number of events applied.
///
/// Three threads, with a bounded queue between each two: one reads and checks events; one
/// decodes and projects them and merges their writes to mutable rows (the pure part); the
/// caller's writes rows to the target. An error anywhere stops all three; the open transaction
/// is then never committed.
pub fn replay<T: Target>(
    reader: &Reader,
    target: &mut T,
    from: u64,
    until: Until,
    progress: impl FnMut(u64),
) -> Result<u64, ReplayError<T::Error>> {
    replay_from(reader, target, from, Applied::new(), until, progress)
}

/// [`replay`] into a target that has applied `heads`: events they cover are skipped.
fn replay_from<T: Target>(
    reader: &Reader,
    target: &mut T,
    from: u64,
    heads: Applied,
    until: Until,
    mut progress: impl FnMut(u64),
) -> Result<u64, ReplayError<T::Error>> {
    let last = match until.position {
        Some(p) => p.min(reader.last_position()?),
        None => reader.last_position()?,
    };
    if from >= last {
        return Ok(0);
    }
    let held_bytes_max = target.held_bytes_max();
    let (send, receive) = std::sync::mpsc::sync_channel(REPLAY_CHUNKS_QUEUED);
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("spool-project".into())
            .spawn_scoped(scope, move || {
                let range = Range {
                    from,
                    last,
                    heads,
                    until,
                };
                if let Err(error) = project_range(reader, range, held_bytes_max, &send) {
                    let _ = send.send(Err(error));
                }
            })
            .map_err(ReplayError::Thread)?;
        let mut applied = 0;
        let mut open = false;
        for step in receive {
            if !open {
                target.begin().map_err(ReplayError::Target)?;
                open = true;
            }
            match step? {
                Step::Inserts { rows, tail } => {
                    for (table, cols) in rows {
                        target.insert(table, cols).map_err(ReplayError::Target)?;
                    }
                    progress(tail);
                }
                Step::Commit {
                    rows,
                    tail: (position, hash),
                    applied: batch,
                    heads,
                } => {
                    target
                        .commit(rows, position, hash, batch, &heads)
                        .map_err(ReplayError::Target)?;
                    (applied, open) = (applied + batch, false);
                }
            }
        }
        Ok(applied)
    })
}

/// The projecting side of [`replay`]: sends the append-only rows of the events in
/// `(from, last]` a chunk at a time, and their merged mutable rows at the end of each batch.
/// The events are read and checked a chunk ahead on a thread of its own (hashing them was a
/// fifth of this thread's work), whose buffers come back to it to be filled again. Stops early,
/// without error, when the applying side has stopped.
fn project_range<E: std::error::Error + 'static>(
    reader: &Reader,
    range: Range,
    held_bytes_max: usize,
    send: &std::sync::mpsc::SyncSender<Result<Step, ReplayError<E>>>,
) -> Result<(), ReplayError<E>> {
    let Range {
        from,
        last,
        mut heads,
        until,
    } = range;
    let (read, chunks) =
        std::sync::mpsc::sync_channel::<Result<Checked, LogError>>(REPLAY_CHUNKS_READ_AHEAD);
    let (recycle, empty) = std::sync::mpsc::channel::<Checked>();
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("spool-read".into())
            .spawn_scoped(scope, move || {
                let mut after = from;
                while after < last {
                    let limit = REPLAY_CHUNK_EVENTS.min((last - after) as usize);
                    let mut chunk = empty.try_recv().unwrap_or_default();
                    match reader.read_checked(after, limit, REPLAY_CHUNK_BYTES, &mut chunk) {
                        Ok(Some(end)) => after = end,
                        Ok(None) => return,
                        Err(error) => {
                            let _ = read.send(Err(error));
                            return;
                        }
                    }
                    if read.send(Ok(chunk)).is_err() {
                        return;
                    }
                }
            })
            .map_err(ReplayError::Thread)?;
        let mut merged = Merged::default();
        let mut batch = 0;
        let mut tail = None;
        for chunk in chunks {
            let chunk = chunk?;
            let mut rows = Vec::with_capacity(REPLAY_CHUNK_EVENTS);
            for checked in chunk.iter() {
                let (position, order, event) = (checked.position, checked.order, checked.event);
                if until.time_ms.is_some_and(|t| hlc::physical_ms(order) > t) {
                    continue;
                }
                let (origin, seq) = (event.origin(), event.seq());
                match heads.get_mut(&origin) {
                    Some(head) if seq <= head.0 => continue,
                    Some(head) => *head = (seq, checked.hash),
                    None => {
                        heads.insert(origin, (seq, checked.hash));
                    }
                }
                let ctx = Context::of(&event, order);
                let written = match kinds::body(event.kind(), event.version(), event.payload()) {
                    Ok(body) => writes(&ctx, &body),
                    Err(error) => {
                        tracing::debug!("position {position}: skipped, {error}");
                        vec![unreadable(&ctx, event.kind(), event.version(), &error)]
                    }
                };
                for write in written {
                    match write {
                        Write::Insert { table, cols } => rows.push((table, cols)),
                        Write::Upsert {
                            table,
                            key,
                            stamp,
                            groups,
                        } => merged.add(table, key, stamp, groups),
                    }
                }
                batch += 1;
            }
            let Some(end) = chunk.last() else {
                break;
            };
            let _ = recycle.send(chunk);
            tail = Some(end);
            if send.send(Ok(Step::Inserts { rows, tail: end.0 })).is_err() {
                return Ok(());
            }
            if merged.bytes() >= held_bytes_max || batch >= REPLAY_BATCH_EVENTS {
                let step = Step::Commit {
                    rows: std::mem::take(&mut merged).into_rows(),
                    tail: end,
                    applied: std::mem::take(&mut batch),
                    heads: heads.clone(),
                };
                tail = None;
                if send.send(Ok(step)).is_err() {
                    return Ok(());
                }
            }
        }
        if let Some(tail) = tail {
            let step = Step::Commit {
                rows: merged.into_rows(),
                tail,
                applied: batch,
                heads,
            };
            let _ = send.send(Ok(step));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_heads_round_trip_and_bad_ones_are_refused_without_echo() {
        let heads: Applied = [(Origin([1; 16]), (7, Hash([2; 32])))].into();
        assert_eq!(parse_heads(&heads_text(&heads)).unwrap(), heads);
        let err = parse_heads(r#"{"zz": {"seq": "secret-ish", "hash": "x"}}"#).unwrap_err();
        assert!(
            err.contains("not readable") && !err.contains("secret-ish"),
            "{err}"
        );
        let huge = format!("\"{}\"", "a".repeat(HEADS_TEXT_BYTES_MAX));
        assert!(parse_heads(&huge).unwrap_err().contains("more than"));
        let err = parse_heads(r#"{"zzsecret": {"seq": 1, "hash": "00"}}"#).unwrap_err();
        assert!(!err.contains("zzsecret"), "{err}");
    }
}
