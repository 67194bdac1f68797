//! The Postgres hub transport: the fleet's logs in one table of a Postgres (Supabase) database.
//!
//! A node **pushes** what the hub lacks of every origin it holds, as an export would carry it
//! (stored bytes, the signed heads it keeps, its own head signed), by binary COPY into a staging
//! table and one idempotent insert per batch: a retry, or two nodes pushing the same events, adds
//! nothing; a different event at an (origin, seq) the hub holds goes to `spool_hub_forks` and
//! never replaces the stored one. It **pulls** what it lacks, origin by origin in seq order, in
//! batches cut after a signed head, each handed to [`file::ingest`] as an export file: the same
//! checks as a file (hash, chain, signature, membership, field rules), so a forged, altered,
//! reordered or truncated row is refused by name, and a refusal stops only that origin's pull.
//! `pg_notify('spool_hub')` after a push tells listeners there is something to pull.
//!
//! Invariant: nothing the hub says is trusted; memory is bounded by one batch each way.
//!
//! Boundary: SQL for the hub's two tables only (the projection's tables are `project::postgres`'s);
//! the connection (TLS, timeouts) is `project::postgres::connect`'s.

use std::collections::BTreeMap;
use std::io::Read;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::fallible_iterator::FallibleIterator as _;
use postgres::types::Type;
use postgres::Client;

use super::file::{self, ExportReader, ExportWriter};
use super::{Selection, Vector};
use crate::event::{Hash, Origin};
use crate::identity::{NodeKey, PublicKey, SignedHead};
use crate::log::{Log, LogError};
use crate::project::postgres::{connect, PostgresError, ROLES};

/// The hub's tables, made on first use (every statement idempotent).
pub const HUB: &str = include_str!("../../projections/postgres/hub.sql");
/// The channel a push notifies.
pub const CHANNEL: &str = "spool_hub";
/// Events per pushed batch (one COPY and one transaction).
pub const PUSH_BATCH: usize = 10_000;
/// Rows per pulled batch (cut after the last signed head in it).
pub const PULL_BATCH: i64 = 10_000;
/// Stored bytes per pulled batch, at most (plus one row's).
pub const PULL_BATCH_BYTES: i64 = 32 * 1024 * 1024;
/// Origins a node of no fleet reads from the hub, at most (a node in a fleet reads only its
/// members').
pub const HUB_ORIGINS_MAX: i64 = 4_096;
/// Serialises the hub's setup between nodes.
const HUB_LOCK: i64 = 0x7370_6f6f_6c00_0002;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("the hub: {0}")]
    Postgres(#[from] PostgresError),
    #[error("the hub: {0}")]
    Log(#[from] LogError),
    #[error("the hub: reading this node's log to push it: {0}")]
    Export(String),
    #[error("the hub: reading pulled rows as an export file: {0}")]
    Pull(String),
}

impl From<postgres::Error> for HubError {
    fn from(e: postgres::Error) -> HubError {
        HubError::Postgres(PostgresError::Sql(e))
    }
}

pub use crate::wire::HubSummary;

/// A connection to the hub.
pub struct Hub {
    client: Client,
    listening: bool,
}

impl Hub {
    /// Connects to the hub at `url` (TLS and timeouts as every Postgres connection) and makes
    /// its tables if they are missing.
    pub fn open(url: &str) -> Result<Hub, HubError> {
        let mut client = connect(url)?;
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&HUB_LOCK])?;
        tx.batch_execute(ROLES)?;
        tx.batch_execute(HUB)?;
        tx.commit()?;
        Ok(Hub {
            client,
            listening: false,
        })
    }

    /// One push, then one pull.
    pub fn sync(
        &mut self,
        log: &Log,
        signer: Option<&NodeKey>,
        mut progress: impl FnMut(&HubSummary),
    ) -> Result<HubSummary, HubError> {
        let mut summary = HubSummary::default();
        push(log, signer, &mut self.client, &mut summary, &mut progress)?;
        pull(log, &mut self.client, &mut summary, &mut progress)?;
        Ok(summary)
    }

    /// Waits until another node pushes (a notification on [`CHANNEL`]) or `at_most` passes;
    /// says which. Needs a session (a direct connection or a session pooler).
    pub fn wait(&mut self, at_most: std::time::Duration) -> Result<bool, HubError> {
        if !self.listening {
            self.client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
            self.listening = true;
        }
        let woke = self
            .client
            .notifications()
            .timeout_iter(at_most)
            .next()?
            .is_some();
        // Several pushes while this node synced wake it once.
        while self.client.notifications().iter().next()?.is_some() {}
        Ok(woke)
    }

    /// Publishes this node's projection digest and the vector of events it covers, and returns
    /// the nodes whose published vector is the same and whose digest is not: a divergence.
    pub fn compare(
        &mut self,
        node: Origin,
        covers: &Vector,
        digest: Hash,
    ) -> Result<Vec<Origin>, HubError> {
        let vector = covers.to_json().to_string();
        let digest = digest.to_hex();
        self.client.execute(
            "INSERT INTO spool_hub_nodes (origin, vector, digest) VALUES ($1, $2, $3) \
             ON CONFLICT (origin) DO UPDATE SET vector = EXCLUDED.vector, \
             digest = EXCLUDED.digest, published_at = now()",
            &[&node.0.as_slice(), &vector, &digest],
        )?;
        let rows = self.client.query(
            "SELECT origin FROM spool_hub_nodes WHERE origin <> $1 AND vector = $2 AND digest <> $3",
            &[&node.0.as_slice(), &vector, &digest],
        )?;
        Ok(rows
            .iter()
            .filter_map(|r| <[u8; 16]>::try_from(r.get::<_, Vec<u8>>(0)).ok())
            .map(Origin)
            .collect())
    }
}

/// What the hub holds of `origins`: the highest seq of each (absent: none). One index probe
/// per origin.
fn hub_holds(client: &mut Client, origins: &[Origin]) -> Result<Vector, HubError> {
    let keys: Vec<&[u8]> = origins.iter().map(|o| o.0.as_slice()).collect();
    let rows = client.query(
        "SELECT o, (SELECT max(seq) FROM spool_hub_events e WHERE e.origin = o) \
         FROM unnest($1::bytea[]) AS o",
        &[&keys],
    )?;
    Ok(vector_of(&rows))
}

/// Every origin the hub holds, at most [`HUB_ORIGINS_MAX`] (in origin order), for a node that
/// takes every origin's events (made before keys: no fleet to name them). One index probe per
/// origin (a skip scan), not a pass over every row.
fn hub_origins(client: &mut Client) -> Result<Vector, HubError> {
    let rows = client.query(
        "WITH RECURSIVE o(origin, n) AS ( \
           (SELECT origin, 1 FROM spool_hub_events ORDER BY origin LIMIT 1) \
           UNION ALL \
           SELECT (SELECT e.origin FROM spool_hub_events e WHERE e.origin > o.origin \
                   ORDER BY e.origin LIMIT 1), n + 1 \
           FROM o WHERE o.origin IS NOT NULL AND n < $1) \
         SELECT origin, (SELECT max(seq) FROM spool_hub_events e WHERE e.origin = o.origin) \
         FROM o WHERE origin IS NOT NULL",
        &[&HUB_ORIGINS_MAX],
    )?;
    Ok(vector_of(&rows))
}

/// (origin, max seq) rows as a vector; a malformed row or an origin with none is left out.
fn vector_of(rows: &[postgres::Row]) -> Vector {
    let mut vector = BTreeMap::new();
    for row in rows {
        let origin: Vec<u8> = row.get(0);
        let seq: Option<i64> = row.get(1);
        if let (Ok(origin), Some(Ok(seq))) = (<[u8; 16]>::try_from(origin), seq.map(u64::try_from))
        {
            vector.insert(Origin(origin), seq);
        }
    }
    Vector(vector)
}

/// Pushes every event this node holds past the hub's vector, in batches of [`PUSH_BATCH`].
fn push(
    log: &Log,
    signer: Option<&NodeKey>,
    client: &mut Client,
    summary: &mut HubSummary,
    progress: &mut impl FnMut(&HubSummary),
) -> Result<(), HubError> {
    let reader = log.read()?;
    let held: Vec<Origin> = reader.heads()?.iter().map(|h| h.origin).collect();
    let selection = Selection {
        since: hub_holds(client, &held)?,
        origins: Vec::new(),
    };
    let (copied, written) = file::through_pipe(&reader, &selection, signer, |exported| {
        copy_frames(exported, client, summary, progress)
    })
    .map_err(|e| HubError::Export(e.to_string()))?;
    copied?;
    written.map_err(HubError::Export)?;
    if summary.pushed > 0 {
        // The planner's picture of the table after it grew (else a pull's range scans may be
        // planned as if it were empty: a pass over every row per batch).
        client.batch_execute("ANALYZE spool_hub_events")?;
        // Only when something is new: a node listening on its own pushes would otherwise wake
        // itself for ever.
        client.execute("SELECT pg_notify($1, '')", &[&CHANNEL])?;
    }
    Ok(())
}

/// Reads an export stream's frames and writes them into the hub a batch at a time.
fn copy_frames(
    input: impl Read,
    client: &mut Client,
    summary: &mut HubSummary,
    progress: &mut impl FnMut(&HubSummary),
) -> Result<(), HubError> {
    let bad = |e: file::FileError| HubError::Export(e.to_string());
    let mut reader = ExportReader::new(std::io::BufReader::new(input)).map_err(bad)?;
    let mut batch = Vec::with_capacity(PUSH_BATCH);
    loop {
        let frame = reader.next_frame().map_err(bad)?;
        let ended = frame.is_none();
        if let Some(frame) = frame {
            batch.push(frame.shipped);
        }
        if batch.len() >= PUSH_BATCH || (ended && !batch.is_empty()) {
            write_batch(client, &batch, summary)?;
            batch.clear();
            progress(summary);
        }
        if ended {
            return Ok(());
        }
    }
}

/// One batch: COPY into a staging table, fork evidence for differing events, then the new rows
/// (and heads for rows that had none), in one transaction.
fn write_batch(
    client: &mut Client,
    batch: &[crate::log::Shipped],
    summary: &mut HubSummary,
) -> Result<(), HubError> {
    let mut tx = client.transaction()?;
    tx.batch_execute(
        "CREATE TEMP TABLE IF NOT EXISTS spool_hub_staging \
           (origin bytea, seq bigint, hash bytea, bytes bytea, head bytea) ON COMMIT DELETE ROWS",
    )?;
    {
        let sink = tx
            .copy_in("COPY spool_hub_staging (origin, seq, hash, bytes, head) FROM STDIN BINARY")?;
        let types = [
            Type::BYTEA,
            Type::INT8,
            Type::BYTEA,
            Type::BYTEA,
            Type::BYTEA,
        ];
        let mut writer = BinaryCopyInWriter::new(sink, &types);
        for s in batch {
            let head = s.signed.as_deref().map(|(key, signature)| {
                let mut head = key.0.to_vec();
                head.extend_from_slice(signature);
                head
            });
            let seq = i64::try_from(s.meta.id.seq).unwrap_or(i64::MAX);
            writer.write(&[
                &s.meta.id.origin.0.as_slice(),
                &seq,
                &s.meta.hash.0.as_slice(),
                &s.bytes.as_slice(),
                &head,
            ])?;
        }
        writer.finish()?;
    }
    let inserted = tx.execute(
        "INSERT INTO spool_hub_events (origin, seq, hash, bytes, head) \
         SELECT origin, seq, hash, bytes, head FROM spool_hub_staging \
         ON CONFLICT (origin, seq) DO NOTHING",
        &[],
    )?;
    // Each origin's share of what was new: every staged row when all were (the common case,
    // counted here), else asked of the hub below.
    let mut by_origin: BTreeMap<Origin, u64> = BTreeMap::new();
    if inserted == batch.len() as u64 {
        for s in batch {
            *by_origin.entry(s.meta.id.origin).or_default() += 1;
        }
    }
    let mut forks = 0;
    if inserted < batch.len() as u64 {
        // Some were there already (a retry, another node's push) or differ (a fork). The
        // planner knows the staging rows' number only once analysed: without it the joins may
        // scan the whole hub.
        tx.batch_execute("ANALYZE spool_hub_staging")?;
        forks = tx.execute(
            "INSERT INTO spool_hub_forks (origin, seq, hash, bytes) \
             SELECT s.origin, s.seq, s.hash, s.bytes FROM spool_hub_staging s \
             JOIN spool_hub_events e ON e.origin = s.origin AND e.seq = s.seq AND e.hash <> s.hash \
             ON CONFLICT DO NOTHING",
            &[],
        )?;
        // Each origin's share of what was new: the rows this transaction wrote.
        for row in tx.query(
            "SELECT s.origin, count(*) FROM spool_hub_staging s \
             JOIN spool_hub_events e ON e.origin = s.origin AND e.seq = s.seq \
             WHERE e.xmin = pg_current_xact_id()::xid GROUP BY s.origin",
            &[],
        )? {
            let (origin, count): (Vec<u8>, i64) = (row.get(0), row.get(1));
            if let Ok(origin) = <[u8; 16]>::try_from(origin) {
                by_origin.insert(Origin(origin), u64::try_from(count).unwrap_or(0));
            }
        }
        // A head that came with an event the hub holds without one.
        tx.execute(
            "UPDATE spool_hub_events e SET head = s.head FROM spool_hub_staging s \
             WHERE e.origin = s.origin AND e.seq = s.seq AND e.hash = s.hash \
               AND e.head IS NULL AND s.head IS NOT NULL",
            &[],
        )?;
    }
    tx.commit()?;
    for (origin, count) in by_origin {
        summary.origins.entry(origin).or_default().pushed += count;
    }
    summary.pushed += inserted;
    summary.forks += forks;
    summary.already_there += (batch.len() as u64).saturating_sub(inserted + forks);
    Ok(())
}

/// Pulls, origin by origin, what the hub holds past this node's heads.
fn pull(
    log: &Log,
    client: &mut Client,
    summary: &mut HubSummary,
    progress: &mut impl FnMut(&HubSummary),
) -> Result<(), HubError> {
    // A node in a fleet reads only its members' rows (whatever else the hub holds is not its
    // fleet's, and is never fetched); as members' events admit new members, their rows are
    // read in the next pass.
    let mut done = std::collections::BTreeSet::new();
    for pass in 0.. {
        let reader = log.read()?;
        let fleet = reader.fleet(log.fleet_root())?;
        let hub = match &fleet {
            Some(fleet) => {
                let members: Vec<Origin> = fleet
                    .members()
                    .map(|m| m.origin)
                    .filter(|o| !done.contains(o))
                    .collect();
                if members.is_empty() {
                    break;
                }
                hub_holds(client, &members)?
            }
            None if pass == 0 => hub_origins(client)?,
            None => break,
        };
        let held: BTreeMap<Origin, u64> =
            reader.heads()?.iter().map(|h| (h.origin, h.seq)).collect();
        drop(reader);
        done.extend(fleet.iter().flat_map(|f| f.members().map(|m| m.origin)));
        for (&origin, &hub_seq) in &hub.0 {
            let mut from = held.get(&origin).copied().unwrap_or(0);
            // A revoked member's rows past its cut are not read: none could be taken.
            let cut = fleet
                .as_ref()
                .and_then(|f| f.member(origin))
                .and_then(|m| m.revoked.as_ref())
                .map(|r| r.through);
            let mut refused = None;
            while from < hub_seq {
                if cut.is_some_and(|through| from >= through) {
                    refused = Some(format!(
                        "revoked in this fleet after seq {}; the hub's rows past it were not read",
                        cut.unwrap_or_default()
                    ));
                    break;
                }
                match pull_batch(log, client, origin, from, summary)? {
                    Pulled::Through(seq) if seq > from => from = seq,
                    Pulled::Through(_) => break,
                    Pulled::Stopped(why) => {
                        refused = Some(why);
                        break;
                    }
                }
                progress(summary);
            }
            let entry = summary.origins.entry(origin).or_default();
            entry.hub_holds = hub_seq;
            entry.refused = refused;
        }
    }
    // What this node holds now: the pull's own, and whatever else its writer applied (an
    // origin released by another's events).
    for head in log.read()?.heads()?.iter() {
        let entry = summary.origins.entry(head.origin).or_default();
        entry.held = head.seq;
        entry.lag = entry.hub_holds.saturating_sub(head.seq);
    }
    for entry in summary.origins.values_mut().filter(|e| e.held == 0) {
        entry.lag = entry.hub_holds;
    }
    Ok(())
}

enum Pulled {
    /// Ingested through this seq.
    Through(u64),
    /// Refused: why (by name, as ingest says it).
    Stopped(String),
}

/// Reads up to [`PULL_BATCH`] of `origin`'s rows after `from`, cut after the last one with a
/// signed head, and ingests them as an export file.
fn pull_batch(
    log: &Log,
    client: &mut Client,
    origin: Origin,
    from: u64,
    summary: &mut HubSummary,
) -> Result<Pulled, HubError> {
    let after = i64::try_from(from).unwrap_or(i64::MAX);
    // Bounded in bytes as in rows: a row longer than a frame may be is not fetched (its length
    // is), and the batch ends once the rows before one add up to PULL_BATCH_BYTES.
    let rows = client.query(
        "SELECT seq, hash, CASE WHEN len <= $4 THEN bytes END, head, len FROM ( \
           SELECT seq, hash, bytes, head, octet_length(bytes)::bigint AS len, \
                  sum(octet_length(bytes)) OVER (ORDER BY seq) AS upto \
           FROM spool_hub_events WHERE origin = $1 AND seq > $2 ORDER BY seq LIMIT $3) r \
         WHERE upto - len < $5 ORDER BY seq",
        &[
            &origin.0.as_slice(),
            &after,
            &PULL_BATCH,
            &(file::FRAME_BYTES_MAX as i64),
            &PULL_BATCH_BYTES,
        ],
    )?;
    if let Some(row) = rows
        .iter()
        .find(|r| r.get::<_, Option<Vec<u8>>>(2).is_none())
    {
        let (seq, len): (i64, i64) = (row.get(0), row.get(4));
        return Ok(Pulled::Stopped(format!(
            "the hub's row at seq {seq} is {len} bytes, more than an event may be ({} bytes); \
             nothing of it past seq {from} was taken",
            file::FRAME_BYTES_MAX
        )));
    }
    let Some(last_headed) = rows
        .iter()
        .rposition(|r| r.get::<_, Option<Vec<u8>>>(3).is_some())
    else {
        return Ok(Pulled::Stopped(format!(
            "the hub holds {} event(s) of it after seq {from} and no signed head covering them \
             (not pushed whole yet, or truncated); none was taken",
            rows.len()
        )));
    };
    let mut file = ExportWriter::new(Vec::new()).map_err(|e| HubError::Pull(e.to_string()))?;
    let mut through = from;
    for row in &rows[..=last_headed] {
        let seq: i64 = row.get(0);
        let hash: Vec<u8> = row.get(1);
        let bytes: Vec<u8> = row.get(2);
        let head: Option<Vec<u8>> = row.get(3);
        let (Ok(hash), Ok(seq)) = (<[u8; 32]>::try_from(hash), u64::try_from(seq)) else {
            return Ok(Pulled::Stopped(format!(
                "the hub's row after seq {through} is malformed (its hash or seq)"
            )));
        };
        let written = file.push(&Hash(hash), &bytes).and_then(|()| match head {
            Some(head) if head.len() == 96 => {
                let signed = SignedHead {
                    origin,
                    seq,
                    hash: Hash(hash),
                    signature: head[32..].try_into().expect("64 bytes"),
                };
                let key = PublicKey(head[..32].try_into().expect("32 bytes"));
                file.push_head(&key, &signed)
            }
            _ => Ok(()),
        });
        written.map_err(|e| HubError::Pull(e.to_string()))?;
        through = seq;
    }
    let (_, bytes) = file.finish().map_err(|e| HubError::Pull(e.to_string()))?;
    let ingested = file::ingest(log, std::io::Cursor::new(bytes), |_| {})?;
    summary.pulled += ingested.frames;
    summary.origins.entry(origin).or_default().pulled += ingested.frames;
    summary.applied += ingested.report.applied;
    summary.released += ingested.report.released;
    summary.waiting = ingested.report.waiting;
    Ok(match ingested.stopped() {
        Some(why) => Pulled::Stopped(why),
        None => Pulled::Through(through),
    })
}
