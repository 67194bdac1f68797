//! A block: consecutive events of one commit stored as one redb value, so that redb's per-record
//! cost is paid once per block instead of once per event.
//!
//! Layout (little-endian, log format 2): entries · `order: u64` × count · `end: u32` × count ·
//! `count: u32`, where entry i spans `end[i-1]..end[i]` (`end[-1]` = 0) and is `hash[32] ++
//! stored event bytes`, and `order[i]` is its causal order (`hlc::order`). The footer comes last
//! so that a block is built in place, in one buffer. Log format 1 had no orders ([`Layout::V1`]:
//! read only to upgrade it).
//!
//! Invariant: a block is a container only. An event's bytes and hash are the same whatever block
//! holds it, so sync and export ship events, never blocks. `Block::parse` checks the header against
//! the value's length and never panics on any input.

/// Events per block at most (a block closes when the next event would pass either bound).
pub const BLOCK_EVENTS_MAX: usize = 128;
/// Entry bytes per block before it closes (a single larger event gets a block of its own). With
/// its footer and redb's leaf overhead a full block stays inside a 32 KiB allocation; at 64 KiB
/// it spilled into 128 KiB and doubled the bytes written (measured with `benches/append.rs`).
pub const BLOCK_BYTES_TARGET: usize = 28 * 1024;

/// A block value's layout: its log format's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Log format 1: entries · end u32 × count · count u32.
    V1,
    /// Log format 2: entries · order u64 × count · end u32 × count · count u32.
    V2,
}

/// Builds one block.
#[derive(Default)]
pub struct BlockBuilder {
    buffer: Vec<u8>,
    ends: Vec<u32>,
    orders: Vec<u64>,
}

impl BlockBuilder {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The order of the `i`th event pushed since the last `clear`.
    pub fn order(&self, i: usize) -> Option<u64> {
        self.orders.get(i).copied()
    }

    /// Whether an event of `bytes` stored bytes still fits.
    pub fn fits(&self, bytes: usize) -> bool {
        self.is_empty()
            || (self.len() < BLOCK_EVENTS_MAX
                && self.buffer.len() + 32 + bytes <= BLOCK_BYTES_TARGET)
    }

    pub fn push(&mut self, hash: &[u8; 32], bytes: &[u8], order: u64) {
        self.buffer.extend_from_slice(hash);
        self.buffer.extend_from_slice(bytes);
        self.ends.push(self.buffer.len() as u32);
        self.orders.push(order);
    }

    /// Appends the footer and gives the block's bytes; `clear` readies the builder for the next.
    pub fn seal(&mut self) -> &[u8] {
        for order in &self.orders {
            self.buffer.extend_from_slice(&order.to_le_bytes());
        }
        for end in &self.ends {
            self.buffer.extend_from_slice(&end.to_le_bytes());
        }
        self.buffer
            .extend_from_slice(&(self.ends.len() as u32).to_le_bytes());
        &self.buffer
    }

    /// Empties the builder. Its buffers are kept (a builder is reused from block to block and
    /// commit to commit), except what a single large event grew them past two full blocks.
    pub fn clear(&mut self) {
        self.buffer.clear();
        self.buffer.shrink_to(2 * BLOCK_BYTES_TARGET);
        self.ends.clear();
        self.orders.clear();
    }
}

/// A checked view of a block's bytes.
pub struct Block<'a> {
    entries: &'a [u8],
    /// Empty in a [`Layout::V1`] block.
    orders: &'a [u8],
    ends: &'a [u8],
}

#[allow(clippy::len_without_is_empty)] // A parsed block is never empty.
impl<'a> Block<'a> {
    /// Checks the footer against the value; `Err` says what is wrong.
    pub fn parse(value: &'a [u8]) -> Result<Block<'a>, String> {
        Block::parse_as(value, Layout::V2)
    }

    /// As [`Block::parse`], for a value of `layout`.
    pub fn parse_as(value: &'a [u8], layout: Layout) -> Result<Block<'a>, String> {
        let per_event = match layout {
            Layout::V1 => 4,
            Layout::V2 => 12,
        };
        let size = value.len();
        let count = size
            .checked_sub(4)
            .map(|at| u32::from_le_bytes(value[at..].try_into().expect("4 bytes")) as usize)
            .ok_or_else(|| format!("block of {size} bytes has no footer"))?;
        if count == 0 {
            return Err("block holds no events".into());
        }
        let footer = count
            .checked_mul(per_event)
            .and_then(|n| n.checked_add(4))
            .filter(|&n| n <= size)
            .ok_or_else(|| {
                format!("block footer claims {count} events but the block is {size} bytes")
            })?;
        let ends_at = size - 4 - 4 * count;
        let block = Block {
            entries: &value[..size - footer],
            orders: &value[size - footer..ends_at],
            ends: &value[ends_at..size - 4],
        };
        let mut start = 0usize;
        for i in 0..count {
            let end = block.end(i);
            if end < start + 32 || end > block.entries.len() {
                return Err(format!(
                    "entry {i} spans {start}..{end} of {} entry bytes",
                    block.entries.len()
                ));
            }
            start = end;
        }
        if start != block.entries.len() {
            return Err(format!(
                "entries end at {start} but the block holds {} entry bytes",
                block.entries.len()
            ));
        }
        Ok(block)
    }

    pub fn len(&self) -> usize {
        self.ends.len() / 4
    }

    fn end(&self, i: usize) -> usize {
        u32::from_le_bytes(self.ends[4 * i..4 * i + 4].try_into().expect("4 bytes")) as usize
    }

    /// Entry `i` (`hash ++ stored bytes`); `i` must be below `len()`.
    pub fn entry(&self, i: usize) -> &'a [u8] {
        let start = if i == 0 { 0 } else { self.end(i - 1) };
        &self.entries[start..self.end(i)]
    }

    pub fn entries(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        (0..self.len()).map(|i| self.entry(i))
    }

    /// The causal order of entry `i` (`i` below `len()`); `None` in a [`Layout::V1`] block.
    pub fn order(&self, i: usize) -> Option<u64> {
        let bytes = self.orders.get(8 * i..8 * i + 8)?;
        Some(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
    }
}

/// The same block in the format-1 layout (no orders), as an older build wrote it: for tests of
/// the upgrade.
#[cfg(test)]
pub fn as_v1(value: &[u8]) -> Vec<u8> {
    let block = Block::parse(value).expect("a format-2 block");
    let mut out = block.entries.to_vec();
    out.extend_from_slice(block.ends);
    out.extend_from_slice(&(block.len() as u32).to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(events: &[&[u8]]) -> Vec<u8> {
        let mut b = BlockBuilder::default();
        for (i, e) in events.iter().enumerate() {
            b.push(&[i as u8; 32], e, 100 + i as u64);
        }
        let out = b.seal().to_vec();
        b.clear();
        assert!(b.is_empty());
        out
    }

    #[test]
    fn round_trips() {
        let bytes = build(&[b"one", b"", b"three"]);
        let block = Block::parse(&bytes).unwrap();
        assert_eq!(block.len(), 3);
        let entries: Vec<&[u8]> = block.entries().collect();
        assert_eq!(&entries[0][32..], b"one");
        assert_eq!(&entries[1][..32], &[1; 32]);
        assert_eq!(&entries[2][32..], b"three");
        assert_eq!((block.order(0), block.order(2)), (Some(100), Some(102)));
    }

    #[test]
    fn closes_at_its_bounds() {
        let mut b = BlockBuilder::default();
        assert!(
            b.fits(10 * BLOCK_BYTES_TARGET),
            "an empty block takes any event"
        );
        for _ in 0..BLOCK_EVENTS_MAX {
            assert!(b.fits(10));
            b.push(&[0; 32], &[0; 10], 0);
        }
        assert!(!b.fits(10));
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let bytes = build(&[b"alpha", b"beta", b"gamma"]);
        for cut in 0..bytes.len() {
            if let Ok(block) = Block::parse(&bytes[..cut]) {
                block.entries().for_each(drop);
            }
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[i] ^= 1 << bit;
                if let Ok(block) = Block::parse(&damaged) {
                    block.entries().for_each(drop);
                    assert!((0..block.len()).all(|i| block.order(i).is_some()));
                }
                if let Ok(block) = Block::parse_as(&damaged, Layout::V1) {
                    block.entries().for_each(drop);
                }
            }
        }
        assert!(Block::parse(&[]).is_err());
        assert!(Block::parse(&0u32.to_le_bytes()).is_err());
        assert!(Block::parse(&u32::MAX.to_le_bytes()).is_err());
    }
}
