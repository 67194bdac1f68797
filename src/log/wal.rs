//! The write-ahead segment (`log.wal` beside `log.redb`): a small group of appends is made
//! durable by one sequential write and one `fdatasync` here, then committed to redb without a
//! flush (`Durability::None`). A durable redb commit (at most a second or a segment apart, and
//! every ingest) makes everything before it durable in redb, and the segment starts again from
//! its beginning. At open the writer applies again what the segment holds past redb's heads.
//!
//! The file is written full of zeros once, so that a record overwrites allocated blocks and its
//! flush carries no metadata. A record is
//! `magic[4] · len u32 · blake3(len · payload)[..16] · payload`, and the payload is
//! `count u32 · (hash[32] · len u32 · stored event bytes) × count`. Reading stops at the first
//! frame that is not whole (a torn write, zeros, or what an earlier pass left behind).
//!
//! The storage is a [`redb::StorageBackend`], as the log's is, so the fault tests tear and drop
//! unflushed writes of both files through one layer.

use std::io;

use redb::StorageBackend;

use crate::event::Hash;

/// The segment's size. A group whose record does not fit in what is left commits to redb
/// durably instead, and the segment starts again.
pub const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// A group whose events take more bytes than this commits to redb durably: a large group is
/// already mostly sequential writes there, and would be written twice here (at 256 KiB, 64
/// clients' 100-event requests, 100-150 KB a group, lost a tenth: benches/RESULTS.md).
pub const RECORD_BYTES_MAX: usize = 64 * 1024;
/// A segment is never larger: a larger file was not written by spool, and is refused by name
/// rather than read into memory.
pub const SEGMENT_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// A record's payload is never longer (the writer commits such a group to redb durably), so
/// reading a frame never allocates more, whatever its header claims.
pub const RECORD_LEN_MAX: usize = 1024 * 1024;
const MAGIC: [u8; 4] = *b"spw1";
const HEADER: usize = 4 + 4 + 16;
/// Zeros are written in pieces of this size when the segment is made.
const ZERO_PIECE: usize = 1024 * 1024;

/// One event of a record: its hash and its stored bytes.
pub type Logged = (Hash, Vec<u8>);

/// Why a segment could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("is {len} bytes, more than a segment can be (64 MiB): spool did not write it")]
    TooLarge { len: u64 },
}

/// What an open read from the segment.
#[derive(Debug, Default)]
pub struct Read {
    /// The records from the segment's start, in order, up to the first frame that is not whole.
    pub records: Vec<Vec<Logged>>,
    /// Whole records after that frame, with their offsets.
    pub beyond: Vec<(u64, Vec<Logged>)>,
}

pub struct Wal {
    storage: Box<dyn StorageBackend>,
    /// The segment's size.
    size: u64,
    /// Where the next record goes.
    end: u64,
    /// The record being built (kept from one group to the next).
    record: Vec<u8>,
}

impl Wal {
    /// Opens the segment on `storage`, making it full size first if it is short, and reads the
    /// records it holds: in order up to the first frame that is not whole, and then every whole
    /// frame after it. `size` is at most [`SEGMENT_BYTES_MAX`]; a file larger than that is
    /// refused.
    pub fn open(storage: Box<dyn StorageBackend>, size: u64) -> Result<(Wal, Read), OpenError> {
        let len = storage.len()?;
        if len > SEGMENT_BYTES_MAX {
            return Err(OpenError::TooLarge { len });
        }
        // A segment made larger before (by another `size`) is read whole, and kept at its size.
        let size = size.min(SEGMENT_BYTES_MAX).max(len);
        if len < size {
            let zeros = vec![0u8; ZERO_PIECE];
            let mut at = len;
            while at < size {
                let n = (size - at).min(ZERO_PIECE as u64) as usize;
                storage.write(at, &zeros[..n])?;
                at += n as u64;
            }
            storage.sync_data()?;
        }
        let mut bytes = vec![0u8; size as usize];
        storage.read(0, &mut bytes)?;
        let mut read = Read::default();
        let mut at = 0;
        while let Some((events, next)) = frame(&bytes, at) {
            read.records.push(events);
            at = next;
        }
        // Past the first frame that is not whole: an older pass's records (events redb holds),
        // or, if a record in the middle was damaged, the records it hides.
        let mut from = at + 1;
        while let Some(found) = bytes
            .get(from..)
            .and_then(|rest| memchr::memmem::find(rest, &MAGIC))
        {
            let start = from + found;
            from = match frame(&bytes, start) {
                Some((events, next)) => {
                    read.beyond.push((start as u64, events));
                    next
                }
                None => start + 1,
            };
        }
        let wal = Wal {
            storage,
            size,
            end: 0,
            record: Vec::new(),
        };
        Ok((wal, read))
    }

    /// Starts a record (the events follow through [`Wal::push`]).
    pub fn begin(&mut self) {
        self.record.clear();
        self.record.extend_from_slice(&[0u8; HEADER + 4]);
    }

    /// Adds an event to the record begun.
    pub fn push(&mut self, hash: &Hash, bytes: &[u8]) {
        self.record.extend_from_slice(&hash.0);
        self.record
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.record.extend_from_slice(bytes);
    }

    /// Whether the record begun fits in what is left of the segment, and is not longer than a
    /// record can be.
    pub fn fits(&self) -> bool {
        self.record.len() - HEADER <= RECORD_LEN_MAX
            && self.end + self.record.len() as u64 <= self.size
    }

    /// Writes the record begun (of `count` events) after the last and flushes it: once this
    /// returns, the record survives a crash.
    pub fn commit(&mut self, count: u32) -> io::Result<()> {
        let payload_len = (self.record.len() - HEADER) as u32;
        self.record[HEADER..HEADER + 4].copy_from_slice(&count.to_le_bytes());
        self.record[0..4].copy_from_slice(&MAGIC);
        self.record[4..8].copy_from_slice(&payload_len.to_le_bytes());
        let sum = checksum(&self.record[4..8], &self.record[HEADER..]);
        self.record[8..HEADER].copy_from_slice(&sum);
        self.storage.write(self.end, &self.record)?;
        self.storage.sync_data()?;
        self.end += self.record.len() as u64;
        Ok(())
    }

    /// Starts the segment again: redb has made durable everything its records held. The old
    /// records stay until overwritten; each names events redb now holds, so reading them again
    /// applies nothing.
    pub fn restart(&mut self) {
        self.end = 0;
    }

    /// Bytes of records since the segment last started.
    pub fn used(&self) -> u64 {
        self.end
    }
}

fn checksum(len: &[u8], payload: &[u8]) -> [u8; 16] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(len);
    hasher.update(payload);
    let mut out = [0u8; 16];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    out
}

/// The record at `at` of the segment's `bytes` and where the next one starts, or `None` if no
/// whole record is there.
fn frame(bytes: &[u8], at: usize) -> Option<(Vec<Logged>, usize)> {
    let header = bytes.get(at..at.checked_add(HEADER)?)?;
    if header[0..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    if !(4..=RECORD_LEN_MAX).contains(&len) {
        return None;
    }
    let end = at + HEADER + len;
    let payload = bytes.get(at + HEADER..end)?;
    if checksum(&header[4..8], payload) != header[8..HEADER] {
        return None;
    }
    parse(payload).map(|events| (events, end))
}

/// A checked payload's events; `None` if its own lengths do not add up (a record this build
/// did not write).
fn parse(payload: &[u8]) -> Option<Vec<Logged>> {
    let (count, mut rest) = payload.split_at_checked(4)?;
    let count = u32::from_le_bytes(count.try_into().ok()?);
    let mut events = Vec::with_capacity((count as usize).min(rest.len() / 36));
    for _ in 0..count {
        let (hash, after) = rest.split_at_checked(32)?;
        let (len, after) = after.split_at_checked(4)?;
        let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
        let (bytes, after) = after.split_at_checked(len)?;
        events.push((Hash(hash.try_into().ok()?), bytes.to_vec()));
        rest = after;
    }
    rest.is_empty().then_some(events)
}

/// A segment in a file, read and written in place.
pub struct SegmentFile(pub std::fs::File);

impl std::fmt::Debug for SegmentFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SegmentFile")
    }
}

impl StorageBackend for SegmentFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, out, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, data, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment in memory, shared by the opens of one test.
    #[derive(Debug, Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl StorageBackend for Shared {
        fn len(&self) -> io::Result<u64> {
            Ok(self.0.lock().unwrap().len() as u64)
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            let data = self.0.lock().unwrap();
            out.copy_from_slice(&data[offset as usize..offset as usize + out.len()]);
            Ok(())
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.0.lock().unwrap().resize(len as usize, 0);
            Ok(())
        }
        fn sync_data(&self) -> io::Result<()> {
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            let mut held = self.0.lock().unwrap();
            let end = offset as usize + data.len();
            if held.len() < end {
                held.resize(end, 0);
            }
            held[offset as usize..end].copy_from_slice(data);
            Ok(())
        }
    }

    fn record(wal: &mut Wal, events: &[&[u8]]) {
        wal.begin();
        for bytes in events {
            wal.push(&Hash::of(bytes), bytes);
        }
        wal.commit(events.len() as u32).unwrap();
    }

    #[test]
    fn records_read_back_in_order_and_reading_stops_at_a_torn_one() {
        let memory = Shared::default();
        let (mut wal, none) = Wal::open(Box::new(memory.clone()), SEGMENT_BYTES).unwrap();
        assert!(none.records.is_empty() && none.beyond.is_empty());
        assert_eq!(memory.len().unwrap(), SEGMENT_BYTES);
        record(&mut wal, &[b"one", b"two"]);
        record(&mut wal, &[b"three"]);
        let second = wal.used();
        record(&mut wal, &[b"four"]);
        let (_, read) = Wal::open(Box::new(memory.clone()), SEGMENT_BYTES).unwrap();
        let bytes: Vec<Vec<&[u8]>> = read
            .records
            .iter()
            .map(|r| r.iter().map(|(_, b)| b.as_slice()).collect())
            .collect();
        assert_eq!(
            bytes,
            [vec![&b"one"[..], b"two"], vec![b"three"], vec![b"four"]]
        );
        assert_eq!(read.records[0][0].0, Hash::of(b"one"));
        assert!(read.beyond.is_empty());
        // The last record torn: a byte of its payload changed.
        let mut data = memory.0.lock().unwrap().clone();
        data[second as usize + HEADER + 6] ^= 1;
        *memory.0.lock().unwrap() = data;
        let (_, read) = Wal::open(Box::new(memory.clone()), SEGMENT_BYTES).unwrap();
        assert_eq!(read.records.len(), 2);
        assert!(read.beyond.is_empty());
        // Started again: a shorter record over the first leaves the old second one's tail,
        // which is no whole frame, and ends the records in order; the old second one, still
        // whole after it, is found beyond (the old third is the torn one).
        let (mut wal, _) = Wal::open(Box::new(memory.clone()), SEGMENT_BYTES).unwrap();
        wal.restart();
        record(&mut wal, &[b"x"]);
        let (_, read) = Wal::open(Box::new(memory), SEGMENT_BYTES).unwrap();
        assert_eq!(read.records.len(), 1);
        assert_eq!(read.records[0][0].1, b"x");
        let beyond: Vec<&[u8]> = read.beyond.iter().map(|(_, r)| r[0].1.as_slice()).collect();
        assert_eq!(beyond, [&b"three"[..]]);
    }
}
