//! Upgrading a log of an older format when it is opened.
//!
//! Format 1 → 2 adds `orders`: every event's causal order, computed in position order (each
//! event's predecessors sit at earlier positions, so their orders are known when it is reached).
//! The work is committed every [`UPGRADE_BLOCKS`] blocks, so memory stays bounded by the number
//! of origins; the format marker moves only in the last commit, so an upgrade cut short starts
//! over at the next open and rewrites the same orders.

use std::collections::HashMap;
use std::path::Path;

use redb::{Database, ReadableTable};

use super::{
    causal_order, check_entry, order_of, parse_block, LogError, EVENTS, EXTENTS, META, ORDERS,
};
use crate::event::{EventId, Origin};

/// Blocks per transaction of an upgrade (128 events at most each).
const UPGRADE_BLOCKS: usize = 8_192;

/// Computes and stores every event's causal order, then marks the log format 2.
pub(super) fn orders(db: &Database, path: &Path) -> Result<(), LogError> {
    tracing::info!(path = %path.display(), "upgrading the log to format 2 (causal orders)");
    // Per origin, the seq and order of the last event seen.
    let mut heads: HashMap<Origin, (u64, u64)> = HashMap::new();
    let mut next = 0u64;
    loop {
        let txn = db.begin_write()?;
        let mut done = true;
        {
            let events = txn.open_table(EVENTS)?;
            let extents = txn.open_table(EXTENTS)?;
            let mut orders = txn.open_table(ORDERS)?;
            let mut packed = Vec::new();
            let mut here: Vec<(EventId, u64)> = Vec::new();
            for (blocks, found) in events.range(next..)?.enumerate() {
                if blocks == UPGRADE_BLOCKS {
                    done = false;
                    break;
                }
                let (k, v) = found?;
                let first = k.value();
                let block = parse_block(first, v.value())?;
                packed.clear();
                here.clear();
                for (i, entry) in block.entries().enumerate() {
                    let position = first + i as u64;
                    let order = match check_entry(position, entry) {
                        Ok((_, event)) => {
                            let id = event.id();
                            let order = causal_order(id, event.hlc(), event.deps(), |p| {
                                if let Some(&(seq, order)) = heads.get(&p.origin) {
                                    if seq == p.seq {
                                        return Ok(Some(order));
                                    }
                                }
                                if let Some(&(_, order)) = here.iter().find(|(h, _)| *h == p) {
                                    return Ok(Some(order));
                                }
                                order_of(&extents, &orders, p)
                            })?;
                            heads.insert(id.origin, (id.seq, order));
                            here.push((id, order));
                            order
                        }
                        // Verify names the damaged event; its order is never used to project
                        // (reading it fails first).
                        Err(problem) => {
                            tracing::warn!(%problem, "no causal order for a damaged event");
                            0
                        }
                    };
                    packed.extend_from_slice(&order.to_le_bytes());
                }
                orders.insert(first, packed.as_slice())?;
                next = first + block.len() as u64;
            }
            if done {
                let mut meta = txn.open_table(META)?;
                meta.insert("format", super::LOG_FORMAT.to_le_bytes().as_slice())?;
            }
        }
        txn.commit()?;
        if done {
            return Ok(());
        }
    }
}
