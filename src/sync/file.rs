//! The file transport: an export file holds events as stored bytes, framed so that a cut or a
//! damaged file is detected, and [`ingest`] applies one through the log.
//!
//! Layout (little-endian):
//! - header: `SPOOLLOG` · format `u32` (2; 1 is read too) · reserved `u32` (0)
//! - frames: `len u32` · `hash [32]` · `len` stored bytes of one event (blake3 of them = hash)
//! - head frames (format 2), each right after the event it names: `u32::MAX - 1` · origin
//!   `[16]` · seq `u64` · hash `[32]` · the origin's key `[32]` · its signature `[64]` over that
//!   event as the origin's head ([`SignedHead`]); checked as it is read
//! - trailer: `u32::MAX` · `frames u64` (events) · blake3 of every frame byte before it `[32]`
//!
//! A file without its trailer was cut short; a frame whose bytes do not hash to its hash, or a
//! trailer whose count or digest disagrees, is damaged. Frames are in the exporting node's
//! position order, which is a causal order, so a full export applies without waiting.
//!
//! Invariant: reading never trusts a length before checking it against [`FRAME_BYTES_MAX`], and
//! never panics on any input.

use std::io::{self, Read, Write};

use crate::event::{EventId, Hash, Origin, PAYLOAD_BYTES_MAX};
use crate::identity::{NodeKey, PublicKey, SignedHead};
use crate::log::{Evidence, IngestReport, Log, LogError, Reader, Refused, Shipped, ShippedError};
use crate::sync::Selection;

const MAGIC: &[u8; 8] = b"SPOOLLOG";
/// The version of the file layout.
pub const FILE_FORMAT: u32 = 2;
/// Marks a head frame.
const HEAD_MARK: u32 = u32::MAX - 1;
/// A head frame's bytes after its mark.
const HEAD_BYTES: usize = 16 + 8 + 32 + 32 + 64;
/// A node signs its own head in an export at least this often (own events), and at its last.
pub const SIGN_EVERY_EVENTS: u64 = 1_000;
const HEADER_BYTES: u64 = 16;
const TRAILER_MARK: u32 = u32::MAX;
/// Stored bytes of one event at most (its payload limit plus room for the envelope).
pub const FRAME_BYTES_MAX: usize = PAYLOAD_BYTES_MAX + 1024 * 1024;
/// Events handed to the log per ingest request.
pub const INGEST_BATCH_EVENTS: usize = 10_000;
/// Stored bytes handed to the log per ingest request (a batch ends at whichever bound it meets
/// first; one batch is checked while the one before commits, so ingest holds about twice this).
pub const INGEST_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// Why an export file could not be read further. `offset` is the byte offset of the frame.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("not a spool export file (no SPOOLLOG header)")]
    NotAnExport,
    #[error("export format {0} is newer than this build reads (format {FILE_FORMAT})")]
    NewerFormat(u32),
    #[error("a damaged export header: {0}")]
    BadHeader(&'static str),
    #[error("the file is cut short at byte {offset}, after {frames} complete events (no trailer)")]
    Truncated { offset: u64, frames: u64 },
    #[error("damaged frame at byte {offset} (event {index} of the file): {problem}")]
    Damaged {
        offset: u64,
        index: u64,
        problem: String,
    },
    #[error("damaged trailer at byte {offset}: {problem}")]
    BadTrailer { offset: u64, problem: String },
    #[error("a forged or damaged signed head at byte {offset}: {problem}")]
    BadHead { offset: u64, problem: String },
    #[error("reading: {0}")]
    Io(#[from] io::Error),
}

/// Writes an export file.
pub struct ExportWriter<W: Write> {
    out: W,
    frames: u64,
    digest: blake3::Hasher,
}

impl<W: Write> ExportWriter<W> {
    pub fn new(mut out: W) -> io::Result<Self> {
        out.write_all(MAGIC)?;
        out.write_all(&FILE_FORMAT.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        Ok(ExportWriter {
            out,
            frames: 0,
            digest: blake3::Hasher::new(),
        })
    }

    pub fn push(&mut self, hash: &Hash, bytes: &[u8]) -> io::Result<()> {
        let len = (bytes.len() as u32).to_le_bytes();
        for part in [&len[..], &hash.0[..], bytes] {
            self.digest.update(part);
            self.out.write_all(part)?;
        }
        self.frames += 1;
        Ok(())
    }

    /// Writes a head frame: `key`'s signature over the event just pushed, as its origin's head.
    pub fn push_head(&mut self, key: &PublicKey, head: &SignedHead) -> io::Result<()> {
        let mut frame = Vec::with_capacity(4 + HEAD_BYTES);
        frame.extend_from_slice(&HEAD_MARK.to_le_bytes());
        frame.extend_from_slice(&head.origin.0);
        frame.extend_from_slice(&head.seq.to_le_bytes());
        frame.extend_from_slice(&head.hash.0);
        frame.extend_from_slice(&key.0);
        frame.extend_from_slice(&head.signature);
        self.digest.update(&frame);
        self.out.write_all(&frame)
    }

    /// Writes a shipped event and, if it came with one, its signed head.
    pub fn push_shipped(&mut self, shipped: &Shipped) -> io::Result<()> {
        self.push(&shipped.meta.hash, &shipped.bytes)?;
        if let Some((key, signature)) = shipped.signed.as_deref() {
            let id = shipped.meta.id;
            let head = SignedHead {
                origin: id.origin,
                seq: id.seq,
                hash: shipped.meta.hash,
                signature: *signature,
            };
            self.push_head(key, &head)?;
        }
        Ok(())
    }

    /// Writes the trailer; returns the number of events and the sink.
    pub fn finish(mut self) -> io::Result<(u64, W)> {
        self.out.write_all(&TRAILER_MARK.to_le_bytes())?;
        self.out.write_all(&self.frames.to_le_bytes())?;
        self.out.write_all(self.digest.finalize().as_bytes())?;
        self.out.flush()?;
        Ok((self.frames, self.out))
    }
}

/// Bytes of the trailer that ends an export file: the mark, the event count, the digest.
pub const TRAILER_BYTES: usize = 4 + 8 + 32;

/// The event count an export file's last [`TRAILER_BYTES`] give, if they are a trailer (a file
/// copied as it streams is seen to be whole this way; `ExportReader` checks it fully).
pub fn trailer_count(tail: &[u8]) -> Option<u64> {
    let at = tail.len().checked_sub(TRAILER_BYTES)?;
    let trailer = &tail[at..];
    (trailer[..4] == TRAILER_MARK.to_le_bytes()).then(|| {
        let mut count = [0; 8];
        count.copy_from_slice(&trailer[4..12]);
        u64::from_le_bytes(count)
    })
}

/// One event read from a file, its hash checked against its bytes.
#[derive(Debug)]
pub struct Frame {
    pub offset: u64,
    pub index: u64,
    pub shipped: Shipped,
}

/// Reads an export file frame by frame, in bounded memory.
pub struct ExportReader<R: Read> {
    input: R,
    offset: u64,
    frames: u64,
    digest: blake3::Hasher,
    done: bool,
    /// The file's format: 1 has no head frames.
    format: u32,
    /// A frame's length (or mark) read ahead, to see whether a head frame follows an event.
    peeked: Option<[u8; 4]>,
    /// The event a refusal named (seq 0, too many deps, a head that does not verify), to keep.
    evidence: Option<Evidence>,
}

impl<R: Read> ExportReader<R> {
    pub fn new(mut input: R) -> Result<Self, FileError> {
        let mut header = [0u8; HEADER_BYTES as usize];
        if read_full(&mut input, &mut header)? < header.len() || &header[..8] != MAGIC {
            return Err(FileError::NotAnExport);
        }
        let format = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if format > FILE_FORMAT {
            return Err(FileError::NewerFormat(format));
        }
        if format == 0 {
            return Err(FileError::BadHeader("format 0 was never written"));
        }
        if header[12..16] != [0; 4] {
            return Err(FileError::BadHeader("its reserved field is not zero"));
        }
        Ok(ExportReader {
            input,
            offset: HEADER_BYTES,
            frames: 0,
            digest: blake3::Hasher::new(),
            done: false,
            format,
            peeked: None,
            evidence: None,
        })
    }

    /// The event the last error refused, if it named one: kept by [`ingest`] as evidence.
    pub fn take_evidence(&mut self) -> Option<Evidence> {
        self.evidence.take()
    }

    /// The next event, `None` after a good trailer.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FileError> {
        if self.done {
            return Ok(None);
        }
        let truncated = |r: &Self| FileError::Truncated {
            offset: r.offset,
            frames: r.frames,
        };
        let len = match self.peeked.take() {
            Some(len) => len,
            None => {
                let mut len = [0u8; 4];
                if read_full(&mut self.input, &mut len)? < 4 {
                    return Err(truncated(self));
                }
                len
            }
        };
        let len_value = u32::from_le_bytes(len);
        if len_value == TRAILER_MARK {
            return self.trailer().map(|()| None);
        }
        if len_value == HEAD_MARK {
            return Err(FileError::BadHead {
                offset: self.offset,
                problem: "it does not follow the event it names".into(),
            });
        }
        let damaged = |r: &Self, problem: String| FileError::Damaged {
            offset: r.offset,
            index: r.frames,
            problem,
        };
        let len_usize = len_value as usize;
        if len_usize > FRAME_BYTES_MAX || len_usize == 0 {
            return Err(damaged(
                self,
                format!("frame length {len_value} is out of bounds"),
            ));
        }
        let mut hash = [0u8; 32];
        if read_full(&mut self.input, &mut hash)? < 32 {
            return Err(truncated(self));
        }
        let mut bytes = vec![0u8; len_usize];
        if read_full(&mut self.input, &mut bytes)? < len_usize {
            return Err(truncated(self));
        }
        for part in [&len[..], &hash[..], &bytes[..]] {
            self.digest.update(part);
        }
        // What `append` would refuse is refused here too, by name, before it reaches the log.
        let check = |event: &crate::event::EventRef<'_>| {
            crate::input::check_shipped(event).map_err(|e| e.to_string())
        };
        let shipped = match Shipped::verify_then(Hash(hash), bytes, check) {
            Ok(shipped) => shipped,
            Err(e) => {
                if let ShippedError::Refused { id, problem, bytes } = &e {
                    self.evidence = Some(Evidence {
                        id: *id,
                        hash: Hash(hash),
                        reason: problem.clone(),
                        bytes: bytes.clone(),
                    });
                }
                return Err(damaged(self, e.to_string()));
            }
        };
        let offset = self.offset;
        self.offset += 4 + 32 + len_usize as u64;
        self.frames += 1;
        let shipped = self.signed_head_after(shipped)?;
        Ok(Some(Frame {
            offset,
            index: self.frames - 1,
            shipped,
        }))
    }

    /// Reads the head frame after an event, if one follows, and attaches it to the event once
    /// checked: it must name that event, and its key must be the origin's and sign it.
    fn signed_head_after(&mut self, shipped: Shipped) -> Result<Shipped, FileError> {
        if self.format < 2 {
            return Ok(shipped);
        }
        let mut len = [0u8; 4];
        if read_full(&mut self.input, &mut len)? < 4 {
            return Err(FileError::Truncated {
                offset: self.offset,
                frames: self.frames,
            });
        }
        if u32::from_le_bytes(len) != HEAD_MARK {
            self.peeked = Some(len);
            return Ok(shipped);
        }
        let mut body = [0u8; HEAD_BYTES];
        if read_full(&mut self.input, &mut body)? < HEAD_BYTES {
            return Err(FileError::Truncated {
                offset: self.offset,
                frames: self.frames,
            });
        }
        self.digest.update(&len);
        self.digest.update(&body);
        let bad = |problem: String| FileError::BadHead {
            offset: self.offset,
            problem,
        };
        let id = EventId {
            origin: Origin(body[..16].try_into().expect("16 bytes")),
            seq: u64::from_le_bytes(body[16..24].try_into().expect("8 bytes")),
        };
        let hash = Hash(body[24..56].try_into().expect("32 bytes"));
        if id != shipped.meta.id || hash != shipped.meta.hash {
            return Err(bad(format!(
                "it names origin {} seq {}, not the event before it (origin {} seq {})",
                id.origin, id.seq, shipped.meta.id.origin, shipped.meta.id.seq
            )));
        }
        let key = PublicKey(body[56..88].try_into().expect("32 bytes"));
        let signature: [u8; 64] = body[88..].try_into().expect("64 bytes");
        // Heads are sparse (one in a thousand events at most, from an honest sender): the copy
        // kept for evidence costs little.
        let (meta, bytes) = (shipped.meta.clone(), shipped.bytes.clone());
        let shipped = match shipped.signed(key, signature) {
            Ok(shipped) => shipped,
            Err(e) => {
                self.evidence = Some(Evidence {
                    id: meta.id,
                    hash: meta.hash,
                    reason: format!("signed head: {e}"),
                    bytes,
                });
                return Err(bad(e.to_string()));
            }
        };
        self.offset += (4 + HEAD_BYTES) as u64;
        Ok(shipped)
    }

    fn trailer(&mut self) -> Result<(), FileError> {
        let mut rest = [0u8; 40];
        if read_full(&mut self.input, &mut rest)? < 40 {
            return Err(FileError::Truncated {
                offset: self.offset,
                frames: self.frames,
            });
        }
        let bad = |problem: String| FileError::BadTrailer {
            offset: self.offset,
            problem,
        };
        let count = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        if count != self.frames {
            return Err(bad(format!(
                "it counts {count} events, the file holds {}",
                self.frames
            )));
        }
        if rest[8..] != *self.digest.finalize().as_bytes() {
            return Err(bad("the digest of the frames does not match".into()));
        }
        let mut extra = [0u8; 1];
        if read_full(&mut self.input, &mut extra)? != 0 {
            return Err(bad("bytes follow the trailer".into()));
        }
        self.done = true;
        Ok(())
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The export of `selection` handed to `consume` as it is written: a thread of its own writes
/// it into a pipe, and `consume` reads it (frame by frame, through an [`ExportReader`]) in
/// bounded memory, the frames a file would carry. `consume` may stop early (a refusal): the
/// export then ends on the closed pipe. Returns what `consume` returned and how the export ended.
pub fn through_pipe<T>(
    reader: &Reader,
    selection: &Selection,
    signer: Option<&NodeKey>,
    consume: impl FnOnce(io::PipeReader) -> T,
) -> io::Result<(T, Result<(), String>)> {
    let (pipe_in, pipe_out) = io::pipe()?;
    Ok(std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            export(
                reader,
                selection,
                io::BufWriter::new(pipe_out),
                signer,
                |_| {},
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        });
        let consumed = consume(pipe_in);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err("the export thread failed".into()));
        (consumed, written)
    }))
}

/// Writes the events `selection` wants, in position order, as an export file, each signed head
/// this node keeps after the event it names, and, with `signer` (this node's key), its own
/// head signed after every [`SIGN_EVERY_EVENTS`] of its own events and after its last. Returns
/// the number of events written. `progress` is called with each position examined.
pub fn export<W: Write>(
    reader: &Reader,
    selection: &Selection,
    out: W,
    signer: Option<&NodeKey>,
    mut progress: impl FnMut(u64),
) -> Result<(u64, W), ExportError> {
    let mut file = ExportWriter::new(out)?;
    // The signed heads kept (one per signed run: a small part of the log) and this node's head.
    let mut kept = std::collections::HashMap::new();
    let heads = reader.heads()?;
    for head in &heads {
        for (key, signed) in reader.signed_heads(head.origin)? {
            kept.insert((signed.origin, signed.seq), (key, signed));
        }
    }
    let own = signer.map(|key| {
        let head = heads.iter().find(|h| h.origin == key.origin());
        (key, head.map_or(0, |h| h.seq))
    });
    let mut unsigned_own = 0u64;
    let mut after = 0;
    loop {
        let page = reader.scan(after, 4096, &Default::default())?;
        let Some(last) = page.last_examined else {
            break;
        };
        for record in &page.records {
            let id = record.event().id();
            if !selection.wants(id) {
                continue;
            }
            file.push(&record.hash, record.bytes())?;
            match own {
                Some((key, head_seq)) if id.origin == key.origin() => {
                    unsigned_own += 1;
                    if unsigned_own >= SIGN_EVERY_EVENTS || id.seq == head_seq {
                        file.push_head(&key.public(), &key.sign_head(id.seq, record.hash))?;
                        unsigned_own = 0;
                    }
                }
                _ => {
                    if let Some((key, head)) = kept.get(&(id.origin, id.seq)) {
                        file.push_head(key, head)?;
                    }
                }
            }
        }
        progress(last);
        after = last;
    }
    Ok(file.finish()?)
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("writing: {0}")]
    Io(#[from] io::Error),
}

/// Events of one origin held back at most, and their stored bytes, until a signed head covers
/// them (a signed head follows at least every 1 000 of an origin's events from this build).
pub const UNCONFIRMED_EVENTS_MAX: usize = 100_000;
pub const UNCONFIRMED_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Whether an origin's events must come with signed heads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Keyed {
    /// Its first event carries its key: every event must be covered by a signed head.
    Yes,
    /// Made before keys: its events are taken as they come.
    No,
    /// This node holds none of it yet, and the file does not start it.
    Unknown,
}

/// Holds back a keyed origin's events until a signed head after them confirms the run (its
/// hash at the head, each `prev` linking back), so that no event a signature does not vouch
/// for reaches the log: a forged event of this node's own origin is refused here by name, and
/// never mistaken for a fork that would stop the node's writes.
struct Confirmation<'l> {
    /// Read once per origin, at its first event in the file (a snapshot is not held open).
    log: &'l Log,
    /// (foldhash, seeded per process: looked up once per event, keyed by what a file says.)
    keyed: foldhash::HashMap<Origin, Keyed>,
    held: foldhash::HashMap<Origin, Vec<Frame>>,
    held_events: usize,
    held_bytes: usize,
    /// The events a refusal named, to keep as evidence.
    evidence: Vec<Evidence>,
}

/// Events of one refused run kept as evidence (the rest are counted in the refusal).
const EVIDENCE_PER_REFUSAL: usize = 64;

impl Confirmation<'_> {
    fn keyed(&mut self, shipped: &Shipped) -> Result<Keyed, FileError> {
        let origin = shipped.meta.id.origin;
        if self.log.fleet_root().is_some() {
            // A node in a fleet takes members' events only, and every member has a key.
            return Ok(Keyed::Yes);
        }
        if shipped.meta.id.seq == 1 {
            let keyed = match shipped.signer {
                Some(_) => Keyed::Yes,
                None => Keyed::No,
            };
            self.keyed.insert(origin, keyed);
            return Ok(keyed);
        }
        if let Some(&keyed) = self.keyed.get(&origin) {
            return Ok(keyed);
        }
        let reader = self.log.read().map_err(io_of)?;
        let keyed = match reader.signer_of(origin).map_err(io_of)? {
            Some(Some(_)) => Keyed::Yes,
            Some(None) => Keyed::No,
            None => Keyed::Unknown,
        };
        self.keyed.insert(origin, keyed);
        Ok(keyed)
    }

    /// Takes the next frame; gives the frames it confirms, in file order.
    fn take(&mut self, frame: Frame) -> Result<Vec<Frame>, FileError> {
        if self.keyed(&frame.shipped)? == Keyed::No {
            return Ok(vec![frame]);
        }
        let origin = frame.shipped.meta.id.origin;
        if frame.shipped.signed.is_none() {
            self.held_events += 1;
            self.held_bytes += frame.shipped.bytes.len();
            if self.held_events > UNCONFIRMED_EVENTS_MAX || self.held_bytes > UNCONFIRMED_BYTES_MAX
            {
                let e = FileError::BadHead {
                    offset: frame.offset,
                    problem: format!(
                        "more than {UNCONFIRMED_EVENTS_MAX} events or {} MiB without a signed \
                         head covering them (origin {} from seq {})",
                        UNCONFIRMED_BYTES_MAX >> 20,
                        origin,
                        self.held
                            .get(&origin)
                            .and_then(|h| h.first())
                            .map_or(frame.shipped.meta.id.seq, |f| f.shipped.meta.id.seq)
                    ),
                };
                let run = self.held.remove(&origin).unwrap_or_default();
                self.keep(&run, &e);
                return Err(e);
            }
            self.held.entry(origin).or_default().push(frame);
            return Ok(Vec::new());
        }
        // A signed head: it vouches for the run held back before it, link by link.
        let mut run = self.held.remove(&origin).unwrap_or_default();
        run.push(frame);
        let linked = run
            .windows(2)
            .try_for_each(|pair| check_link(&pair[0], &pair[1]));
        if let Err(e) = linked {
            self.keep(&run, &e);
            return Err(e);
        }
        let frame = run.pop().expect("pushed above");
        for f in &run {
            self.held_events -= 1;
            self.held_bytes -= f.shipped.bytes.len();
        }
        run.push(frame);
        Ok(run)
    }

    /// At the file's end: the events no signed head covered. A keyed origin's are refused by
    /// name; those of an origin this node knows nothing of, with no signed head in the file,
    /// are taken as an origin made before keys would be.
    fn finish(&mut self) -> Result<Vec<Frame>, FileError> {
        let mut out = Vec::new();
        let mut origins: Vec<Origin> = self.held.keys().copied().collect();
        origins.sort();
        for origin in origins {
            let run = self.held.remove(&origin).unwrap_or_default();
            let Some(first) = run.first() else {
                continue;
            };
            let must_sign = self.log.fleet_root().is_some();
            if must_sign || self.keyed.get(&origin) == Some(&Keyed::Yes) {
                let last = run.last().expect("a first has a last");
                let e = FileError::BadHead {
                    offset: first.offset,
                    problem: format!(
                        "origin {origin} seq {} to {}: no signed head covers them, so none was \
                         ingested",
                        first.shipped.meta.id.seq, last.shipped.meta.id.seq
                    ),
                };
                self.keep(&run, &e);
                return Err(e);
            }
            out.extend(run);
        }
        out.sort_by_key(|f| f.offset);
        Ok(out)
    }
}

impl Confirmation<'_> {
    /// Keeps the first events of a refused run as evidence.
    fn keep(&mut self, run: &[Frame], error: &FileError) {
        let reason = error.to_string();
        self.evidence
            .extend(run.iter().take(EVIDENCE_PER_REFUSAL).map(|f| Evidence {
                id: f.shipped.meta.id,
                hash: f.shipped.meta.hash,
                reason: reason.clone(),
                bytes: f.shipped.bytes.clone(),
            }));
    }
}

/// `after` must be the event right after `before` in their origin's chain.
fn check_link(before: &Frame, after: &Frame) -> Result<(), FileError> {
    let (b, a) = (&before.shipped.meta, &after.shipped.meta);
    if a.id.seq == b.id.seq + 1 && a.prev == b.hash {
        return Ok(());
    }
    Err(FileError::BadHead {
        offset: before.offset,
        problem: format!(
            "origin {} seq {} is not on the chain the signed head after it vouches for",
            b.id.origin, b.id.seq
        ),
    })
}

fn io_of(e: LogError) -> FileError {
    FileError::Io(io::Error::other(e.to_string()))
}

/// What [`ingest`] did, and why it stopped if it did not reach the trailer.
#[derive(Debug, Default)]
pub struct IngestSummary {
    pub report: IngestReport,
    /// Events read from the file.
    pub frames: u64,
    /// The file was unreadable from here on.
    pub file_error: Option<FileError>,
    /// The log refused this event (file offset, refusal).
    pub refused: Option<(u64, Refused)>,
    /// Events the file's refusal named, kept as evidence (`spool status` lists them).
    pub evidence_kept: u64,
}

impl IngestSummary {
    /// Why the ingest stopped before the file's end, if it did.
    pub fn stopped(&self) -> Option<String> {
        match (&self.file_error, &self.refused) {
            (_, Some((offset, refused))) => Some(format!(
                "refused origin {} seq {} ({}, event at byte {offset}): {}; nothing after it was read",
                refused.id.origin, refused.id.seq, refused.hash, refused.reason
            )),
            (Some(error), None) => Some(format!("{error}; everything before it was ingested")),
            (None, None) => None,
        }
    }
}

/// Reads an export file and ingests it in batches, each durable before the next is sent; a
/// reading thread checks the next batch's frames while the log commits the current one. A file
/// error or a refusal stops it; everything before that point is applied.
pub fn ingest(
    log: &Log,
    input: impl Read + Send,
    mut progress: impl FnMut(&IngestSummary),
) -> Result<IngestSummary, LogError> {
    let mut summary = IngestSummary::default();
    let mut reader = match ExportReader::new(input) {
        Ok(reader) => reader,
        Err(e) => {
            summary.file_error = Some(e);
            return Ok(summary);
        }
    };
    let mut confirmation = Some(Confirmation {
        log,
        keyed: Default::default(),
        held: Default::default(),
        held_events: 0,
        held_bytes: 0,
        evidence: Vec::new(),
    });
    std::thread::scope(|scope| {
        // One batch checked ahead of the one being committed: memory stays bounded.
        let (batches, checked) = std::sync::mpsc::sync_channel(1);
        scope.spawn(move || loop {
            let mut batch = Vec::new();
            let mut offsets = Vec::new();
            let mut error = None;
            let mut bytes = 0;
            let mut ended = false;
            let full = |events: usize, bytes: usize| {
                events >= INGEST_BATCH_EVENTS || bytes >= INGEST_BATCH_BYTES
            };
            while !full(batch.len(), bytes) {
                let confirmed = match reader.next_frame() {
                    Ok(Some(frame)) => match confirmation.as_mut() {
                        Some(c) => c.take(frame),
                        None => Ok(vec![frame]),
                    },
                    Ok(None) => {
                        ended = true;
                        confirmation
                            .as_mut()
                            .map_or(Ok(Vec::new()), Confirmation::finish)
                    }
                    Err(e) => Err(e),
                };
                match confirmed {
                    Ok(frames) => {
                        for frame in frames {
                            offsets.push(frame.offset);
                            bytes += frame.shipped.bytes.len();
                            batch.push(frame.shipped);
                        }
                    }
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
                if ended {
                    break;
                }
            }
            let mut evidence: Vec<Evidence> = reader.take_evidence().into_iter().collect();
            if let Some(c) = confirmation.as_mut() {
                evidence.append(&mut c.evidence);
            }
            let last = ended || error.is_some();
            if batches.send((batch, offsets, error, evidence)).is_err() || last {
                return; // Done, or the log refused and nobody listens.
            }
        });
        for (batch, offsets, error, evidence) in checked {
            summary.frames += batch.len() as u64;
            if !batch.is_empty() {
                let report = log.ingest(batch)?;
                summary.report.add(&report);
                if let Some(refused) = report.refused {
                    summary.refused = Some((offsets[refused.index], refused));
                    return Ok(summary);
                }
            }
            if !evidence.is_empty() {
                summary.evidence_kept += evidence.len() as u64;
                log.keep_evidence(evidence)?;
            }
            summary.file_error = error;
            progress(&summary);
        }
        Ok(summary)
    })
}
