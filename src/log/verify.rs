//! `verify`: one pass over `events` in position order, split into contiguous ranges of blocks
//! checked in parallel, then stitched: every block header, hash and archive, every origin's chain
//! and seq run, every signed head kept, every causal order (recomputed from the event and its predecessors' stored
//! orders, so checking each one alone checks them all), the gapless positions, the extents and
//! the heads.
//!
//! Invariant: memory is bounded by the number of origins and by `PROBLEMS_MAX`, never by the log.

use std::collections::HashMap;

use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata};

use super::{
    causal_order, check_entry, entry_at, last_position, order_of, parse_block, position_of,
    split_signature, Corruption, LogError, EVENTS, EXTENTS, FORKS, HEADS, PENDING, REFUSED,
    SIGNATURES,
};
use crate::event::{EventId, Hash, Origin};
use crate::identity::SignedHead;

/// Problems kept in a report (all are counted).
pub const PROBLEMS_MAX: usize = 64;

/// What `verify` found.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    pub events: u64,
    pub origins: u64,
    pub bytes: u64,
    /// Signed heads checked.
    pub signatures: u64,
    /// Refused events kept as evidence (not a problem of this log: `spool status` lists them).
    pub refused: u64,
    /// The first problems, in position order.
    pub problems: Vec<Corruption>,
    pub problems_total: u64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems_total == 0
    }

    /// The report as `spool verify --json` prints it and the daemon answers it; `seconds` is
    /// how long the check took.
    pub fn to_json(&self, seconds: f64) -> serde_json::Value {
        let problems: Vec<serde_json::Value> = self
            .problems
            .iter()
            .map(|p| {
                let mut v = serde_json::to_value(p).expect("a report serializes");
                v["message"] = p.to_string().into();
                v
            })
            .collect();
        serde_json::json!({
            "ok": self.ok(),
            "events": self.events,
            "origins": self.origins,
            "bytes": self.bytes,
            "seconds": seconds,
            "problems_total": self.problems_total,
            "problems": problems,
        })
    }
}

/// One origin's events within one range.
#[derive(Clone, Copy)]
struct Fragment {
    first_position: u64,
    first_seq: u64,
    first_prev: Hash,
    last_seq: u64,
    last_hash: Hash,
}

#[derive(Default)]
struct Problems {
    kept: Vec<Corruption>,
    total: u64,
}

impl Problems {
    fn push(&mut self, problem: Corruption) {
        self.total += 1;
        if self.kept.len() < PROBLEMS_MAX {
            self.kept.push(problem);
        }
    }
}

#[derive(Default)]
struct RangeResult {
    /// First position of the range's first block, and the position after its last block.
    span: Option<(u64, u64)>,
    fragments: HashMap<Origin, Fragment>,
    /// Origins in first-seen order, so stitching is deterministic.
    order: Vec<Origin>,
    events: u64,
    bytes: u64,
    problems: Problems,
}

pub(super) fn verify(txn: &ReadTransaction, threads: usize) -> Result<VerifyReport, LogError> {
    let last = last_position(&txn.open_table(EVENTS)?)?;
    let threads = threads.clamp(1, 64) as u64;
    let step = last.div_ceil(threads).max(1);
    let ranges: Vec<(u64, u64)> = (0..threads)
        .map(|i| (1 + i * step, ((i + 1) * step).min(last)))
        .filter(|(a, b)| a <= b)
        .collect();
    let results: Vec<Result<RangeResult, LogError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranges
            .iter()
            .map(|&(a, b)| scope.spawn(move || check_range(txn, a, b)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });

    let mut report = VerifyReport::default();
    let mut problems = Problems::default();
    let mut chains: HashMap<Origin, (u64, Hash)> = HashMap::new();
    let mut next_position = 1;
    for result in results {
        let result = result?;
        if let Some((first, after)) = result.span {
            if first != next_position {
                problems.push(Corruption::PositionGap {
                    position: next_position,
                    found: Some(first),
                });
            }
            next_position = after;
        }
        report.events += result.events;
        report.bytes += result.bytes;
        let unkept = result.problems.total - result.problems.kept.len() as u64;
        for p in result.problems.kept {
            problems.push(p);
        }
        problems.total += unkept;
        for origin in result.order {
            let f = result.fragments[&origin];
            let (seq, hash) = chains.get(&origin).copied().unwrap_or((0, Hash::ZERO));
            link(
                &mut problems,
                origin,
                f.first_position,
                f.first_seq,
                f.first_prev,
                seq,
                hash,
            );
            chains.insert(origin, (f.last_seq, f.last_hash));
        }
    }
    if next_position != last + 1 {
        problems.push(Corruption::PositionGap {
            position: next_position,
            found: None,
        });
    }
    check_heads(txn, &chains, &mut problems)?;
    check_extents(txn, last, &mut problems)?;
    check_shipping(txn, &mut problems)?;
    report.signatures = check_signatures(txn, &mut problems)?;
    report.refused = txn.open_table(REFUSED)?.len()?;
    report.origins = chains.len() as u64;
    problems.kept.sort_by_key(Corruption::position);
    report.problems = problems.kept;
    report.problems_total = problems.total;
    Ok(report)
}

/// Every signed head kept must verify under the key kept with it (bound to its origin), over
/// the event this node holds at its (origin, seq). One not held yet is checked once it is.
fn check_signatures(txn: &ReadTransaction, problems: &mut Problems) -> Result<u64, LogError> {
    let events = txn.open_table(EVENTS)?;
    let extents = txn.open_table(EXTENTS)?;
    let mut checked = 0;
    for entry in txn.open_table(SIGNATURES)?.iter()? {
        checked += 1;
        let (k, v) = entry?;
        let (origin, seq) = k.value();
        let id = EventId {
            origin: Origin(origin),
            seq,
        };
        let Some((key, signature)) = split_signature(v.value()) else {
            problems.push(Corruption::BadSignature {
                id,
                detail: format!("is {} bytes, not a key and a signature", v.value().len()),
            });
            continue;
        };
        let Some(position) = position_of(&extents, id)? else {
            continue;
        };
        let Some(hash) = entry_at(&events, position).ok().flatten().map(|r| r.hash) else {
            continue; // The damaged event is named on its own.
        };
        let head = SignedHead {
            origin: id.origin,
            seq,
            hash,
            signature,
        };
        if let Err(e) = head.verify(&key) {
            problems.push(Corruption::BadSignature {
                id,
                detail: format!("does not hold: {e}"),
            });
        }
    }
    Ok(checked)
}

/// Waiting shipped events must be intact; every fork kept as evidence is a problem to report.
fn check_shipping(txn: &ReadTransaction, problems: &mut Problems) -> Result<(), LogError> {
    for entry in txn.open_table(PENDING)?.iter()? {
        let (k, v) = entry?;
        let (origin, seq) = k.value();
        let id = EventId {
            origin: Origin(origin),
            seq,
        };
        let checked = check_entry(0, v.value()).map(|(_, e)| e.id());
        match checked {
            Ok(found) if found == id => {}
            Ok(found) => problems.push(Corruption::BadPending {
                id,
                detail: format!("holds origin {} seq {}", found.origin, found.seq),
            }),
            Err(e) => problems.push(Corruption::BadPending {
                id,
                detail: e.to_string(),
            }),
        }
    }
    let heads = txn.open_table(EVENTS)?;
    let extents = txn.open_table(EXTENTS)?;
    for entry in txn.open_table(FORKS)?.iter()? {
        let (k, _) = entry?;
        let (origin, seq, refused) = k.value();
        let id = EventId {
            origin: Origin(origin),
            seq,
        };
        let held = match position_of(&extents, id)? {
            Some(position) => entry_at(&heads, position).ok().flatten().map(|r| r.hash),
            None => None,
        };
        problems.push(Corruption::Fork {
            id,
            held,
            refused: Hash(refused),
        });
    }
    Ok(())
}

/// Checks that event `seq` of `origin` (whose `prev` is `prev`) follows `(last_seq, last_hash)`.
fn link(
    problems: &mut Problems,
    origin: Origin,
    position: u64,
    seq: u64,
    prev: Hash,
    last_seq: u64,
    last_hash: Hash,
) {
    if seq != last_seq + 1 {
        problems.push(Corruption::SeqGap {
            position,
            origin,
            expected: last_seq + 1,
            actual: seq,
        });
    } else if prev != last_hash {
        problems.push(Corruption::ChainBreak {
            position,
            id: EventId { origin, seq },
            expected: last_hash,
            actual: prev,
        });
    }
}

/// Checks the blocks whose first position lies in `first..=last`.
fn check_range(txn: &ReadTransaction, first: u64, last: u64) -> Result<RangeResult, LogError> {
    let events = txn.open_table(EVENTS)?;
    let extents = txn.open_table(EXTENTS)?;
    // Per origin, the seq and stored order of its last event in this range.
    let mut stored_orders: HashMap<Origin, (u64, u64)> = HashMap::new();
    let mut out = RangeResult::default();
    for found in events.range(first..=last)? {
        let (k, v) = found?;
        let block_first = k.value();
        let value = v.value();
        out.bytes += value.len() as u64;
        let (start, after) = out.span.get_or_insert((block_first, block_first));
        if block_first != *after && block_first != *start {
            out.problems.push(Corruption::PositionGap {
                position: *after,
                found: Some(block_first),
            });
        }
        let block = match parse_block(block_first, value) {
            Ok(block) => block,
            Err(problem) => {
                // Its events cannot be counted; the next block shows up as a gap too.
                out.problems.push(problem);
                continue;
            }
        };
        *after = block_first + block.len() as u64;
        for (i, entry) in block.entries().enumerate() {
            let position = block_first + i as u64;
            out.events += 1;
            let (hash, event) = match check_entry(position, entry) {
                Ok(checked) => checked,
                Err(problem) => {
                    out.problems.push(problem);
                    continue;
                }
            };
            let (origin, seq, prev) = (event.origin(), event.seq(), event.prev());
            let found = block.order(i).expect("a format-2 block has orders");
            // A predecessor whose order cannot be read is reported at its own position. The
            // common case (the origin's previous event was just seen, no deps) costs no lookup.
            let expected = match stored_orders.get(&origin) {
                Some(&(prev_seq, prev)) if event.deps_len() == 0 && prev_seq + 1 == seq => {
                    crate::hlc::order(event.hlc(), [prev])
                }
                _ => causal_order(
                    event.id(),
                    event.hlc(),
                    event.deps(),
                    |p| match stored_orders.get(&p.origin) {
                        Some(&(seq, order)) if seq == p.seq => Ok(Some(order)),
                        _ => Ok(order_of(&extents, &events, p).ok().flatten()),
                    },
                )?,
            };
            if found != expected {
                out.problems.push(Corruption::Order {
                    position,
                    expected,
                    found,
                });
            }
            stored_orders.insert(origin, (seq, found));
            match out.fragments.get_mut(&origin) {
                Some(f) => {
                    link(
                        &mut out.problems,
                        origin,
                        position,
                        seq,
                        prev,
                        f.last_seq,
                        f.last_hash,
                    );
                    f.last_seq = seq;
                    f.last_hash = hash;
                }
                None => {
                    out.order.push(origin);
                    out.fragments.insert(
                        origin,
                        Fragment {
                            first_position: position,
                            first_seq: seq,
                            first_prev: prev,
                            last_seq: seq,
                            last_hash: hash,
                        },
                    );
                }
            }
        }
    }
    Ok(out)
}

fn check_heads(
    txn: &ReadTransaction,
    chains: &HashMap<Origin, (u64, Hash)>,
    problems: &mut Problems,
) -> Result<(), LogError> {
    let heads = txn.open_table(HEADS)?;
    let mut seen = 0;
    for entry in heads.iter()? {
        let (k, v) = entry?;
        let origin = Origin(k.value());
        let (head_seq, head_hash) = v.value();
        let (log_seq, log_hash) = chains.get(&origin).copied().unwrap_or((0, Hash::ZERO));
        if chains.contains_key(&origin) {
            seen += 1;
        }
        if (head_seq, Hash(head_hash)) != (log_seq, log_hash) {
            problems.push(Corruption::HeadMismatch {
                origin,
                head_seq,
                head_hash: Hash(head_hash),
                log_seq,
                log_hash,
            });
        }
    }
    if seen != chains.len() {
        for (&origin, &(log_seq, log_hash)) in chains {
            if heads.get(origin.0)?.is_none() {
                problems.push(Corruption::HeadMismatch {
                    origin,
                    head_seq: 0,
                    head_hash: Hash::ZERO,
                    log_seq,
                    log_hash,
                });
            }
        }
    }
    Ok(())
}

/// Each origin's extents must cover seqs 1.. contiguously, their ends must hold the events they
/// name, and together they must cover every position once.
fn check_extents(
    txn: &ReadTransaction,
    last: u64,
    problems: &mut Problems,
) -> Result<(), LogError> {
    let extents = txn.open_table(EXTENTS)?;
    let events = txn.open_table(EVENTS)?;
    let mut covered = 0u64;
    let mut next_seq: HashMap<Origin, u64> = HashMap::new();
    for entry in extents.iter()? {
        let (k, v) = entry?;
        let (origin, first_seq) = k.value();
        let origin = Origin(origin);
        let (first_position, len) = v.value();
        let due = next_seq.get(&origin).copied().unwrap_or(1);
        let mut bad = |seq: u64, position: u64, found: Option<EventId>| {
            problems.push(Corruption::IndexMismatch {
                origin,
                seq,
                position,
                found,
            })
        };
        if first_seq != due || len == 0 {
            bad(due, first_position, None);
        }
        for (seq, position) in [
            (first_seq, first_position),
            (
                first_seq + len.saturating_sub(1),
                first_position + len.saturating_sub(1),
            ),
        ] {
            let found = entry_at(&events, position)
                .ok()
                .flatten()
                .map(|r| r.event().id());
            if found != Some(EventId { origin, seq }) {
                bad(seq, position, found);
            }
        }
        next_seq.insert(origin, first_seq + len);
        covered += len;
    }
    if covered != last {
        problems.push(Corruption::PositionGap {
            position: covered.min(last) + 1,
            found: None,
        });
    }
    Ok(())
}
