//! Upgrading a log of an older format when it is opened.
//!
//! Format 1 → 2 gives every block its events' causal orders: each block is read in the format-1
//! layout, the orders are computed in position order (an event's predecessors sit at earlier
//! positions, so their orders are known when it is reached) and the block is written again in
//! the format-2 layout, under the same key. The events' bytes and hashes do not change. The work
//! is committed every [`UPGRADE_BLOCKS`] blocks, so memory stays bounded by that and the number
//! of origins; the format marker and the blocks upgraded so far (`upgraded_to`) move in each
//! commit, so an upgrade cut short goes on where it stopped at the next open.

use std::collections::HashMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable};

use super::block::{Block, BlockBuilder, Layout};
use super::{
    causal_order, check_entry, meta_u64, order_of, Corruption, LogError, EVENTS, EXTENTS, META,
};
use crate::event::{EventId, Origin};

/// Blocks per transaction of an upgrade (128 events and about 28 KiB at most each).
const UPGRADE_BLOCKS: usize = 1_024;

/// Rewrites every block of a format-1 log with its causal orders, then marks the log format 2.
pub(super) fn orders(db: &Database, path: &Path) -> Result<(), LogError> {
    tracing::info!(path = %path.display(), "upgrading the log to format 2 (causal orders)");
    // Per origin, the seq and order of the last event seen.
    let mut heads: HashMap<Origin, (u64, u64)> = HashMap::new();
    let mut next = {
        let txn = db.begin_read()?;
        meta_u64(&txn.open_table(META)?, "upgraded_to")?
    };
    loop {
        let txn = db.begin_write()?;
        let done;
        {
            let mut events = txn.open_table(EVENTS)?;
            let extents = txn.open_table(EXTENTS)?;
            // Old blocks, read before any is replaced (bounded by UPGRADE_BLOCKS).
            let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
            for found in events.range(next..)? {
                if batch.len() == UPGRADE_BLOCKS {
                    break;
                }
                let (k, v) = found?;
                batch.push((k.value(), v.value().to_vec()));
            }
            done = batch.len() < UPGRADE_BLOCKS;
            let mut builder = BlockBuilder::default();
            for (first, value) in batch {
                let block = match Block::parse_as(&value, Layout::V1) {
                    Ok(block) => block,
                    Err(detail) => {
                        // Left as it is: verify names it either way.
                        let problem = Corruption::BadBlock {
                            first_position: first,
                            detail,
                        };
                        tracing::warn!(%problem, "not upgrading a damaged block");
                        next = first + 1;
                        continue;
                    }
                };
                builder.clear();
                for (i, entry) in block.entries().enumerate() {
                    let position = first + i as u64;
                    let order = match check_entry(position, entry) {
                        Ok((_, event)) => {
                            let id = event.id();
                            let order = causal_order(id, event.hlc(), event.deps(), |p| {
                                match heads.get(&p.origin) {
                                    Some(&(seq, order)) if seq == p.seq => Ok(Some(order)),
                                    // An earlier block (already rewritten) or this one.
                                    _ => match position_in(&builder, first, &extents, p)? {
                                        Some(order) => Ok(Some(order)),
                                        None => order_of(&extents, &events, p),
                                    },
                                }
                            })?;
                            heads.insert(id.origin, (id.seq, order));
                            order
                        }
                        // Verify names the damaged event; its order is never used to project
                        // (reading it fails first).
                        Err(problem) => {
                            tracing::warn!(%problem, "no causal order for a damaged event");
                            0
                        }
                    };
                    let (hash, bytes) = entry.split_at(32);
                    builder.push(hash.try_into().expect("32 bytes"), bytes, order);
                }
                let len = block.len() as u64;
                events.insert(first, builder.seal())?;
                next = first + len;
            }
            let mut meta = txn.open_table(META)?;
            meta.insert("upgraded_to", next.to_le_bytes().as_slice())?;
            if done {
                meta.insert("format", super::LOG_FORMAT.to_le_bytes().as_slice())?;
                meta.remove("upgraded_to")?;
            }
        }
        txn.commit()?;
        if done {
            return Ok(());
        }
    }
}

/// The order of `p` if it is one of the events already pushed into the block being rebuilt
/// (which starts at position `first`).
fn position_in<X>(
    builder: &BlockBuilder,
    first: u64,
    extents: &X,
    p: EventId,
) -> Result<Option<u64>, LogError>
where
    X: ReadableTable<([u8; 16], u64), (u64, u64)>,
{
    let Some(position) = super::position_of(extents, p)? else {
        return Ok(None);
    };
    Ok(position
        .checked_sub(first)
        .and_then(|i| builder.order(i as usize)))
}
