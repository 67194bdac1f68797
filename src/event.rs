//! The event: identifiers, the envelope, and its stored byte format.
//!
//! Invariant: the stored bytes of an event are `[1] ++ rkyv archive of StoredEvent` (envelope
//! format 1), or `[2] ++ signer [32] ++ the same archive` (format 2: an origin's first event,
//! carrying the public key the origin is bound to), little-endian with 32-bit relative pointers
//! and no alignment padding, and an event's hash is blake3 over exactly those bytes. Once released, this layout never changes: a new envelope field
//! means a new `ENVELOPE_FORMAT`, a new payload field a new version of that event kind.
//!
//! Boundary: this module knows rkyv and blake3 and nothing about storage, kinds or JSON. Bytes
//! handed to [`decode`] may come from a disk or a peer; they are checked, never trusted.

use std::fmt;

use rkyv::rancor;

/// The first byte of a stored event without a signer: the version of the envelope layout.
pub const ENVELOPE_FORMAT: u8 = 1;
/// The first byte of a stored event that carries its origin's public key (32 bytes after it).
pub const ENVELOPE_FORMAT_SIGNER: u8 = 2;

/// Upper bound on the encoded payload of one event (the kind's own archive).
pub const PAYLOAD_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Upper bound on a stream name, an actor, a kind name, an id or an idempotency key, in bytes.
pub const NAME_BYTES_MAX: usize = 256;
/// Upper bound on the number of `deps` entries (one per other origin).
pub const DEPS_MAX: usize = 1024;

/// A node's identity in the log: 16 random bytes made at `spool init`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Origin(pub [u8; 16]);

/// A blake3 hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    pub const ZERO: Hash = Hash([0; 32]);

    pub fn of(bytes: &[u8]) -> Hash {
        Hash(*blake3::hash(bytes).as_bytes())
    }
}

macro_rules! hex_newtype {
    ($ty:ident, $len:expr, $what:expr) => {
        impl $ty {
            pub fn to_hex(&self) -> String {
                self.hex(&mut [0; 2 * $len]).to_owned()
            }

            /// The lowercase hex digits, written into `buf` (no allocation).
            pub fn hex<'b>(&self, buf: &'b mut [u8; 2 * $len]) -> &'b str {
                hex::encode_to_slice(self.0, buf).expect("a buffer of twice the length");
                std::str::from_utf8(buf).expect("hex digits are ASCII")
            }

            /// Parses exactly `2 * len` hex digits.
            pub fn from_hex(text: &str) -> Result<Self, ParseIdError> {
                let mut out = [0u8; $len];
                hex::decode_to_slice(text, &mut out).map_err(|_| ParseIdError {
                    what: $what,
                    text: text.chars().take(80).collect(),
                    digits: 2 * $len,
                })?;
                Ok($ty(out))
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.hex(&mut [0; 2 * $len]))
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.hex(&mut [0; 2 * $len]))
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $ty::from_hex(&text).map_err(|_| {
                    serde::de::Error::custom(concat!(
                        $what,
                        ": must be ",
                        stringify!($len),
                        " bytes in hex"
                    ))
                })
            }
        }

        impl schemars::JsonSchema for $ty {
            fn inline_schema() -> bool {
                true
            }
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($ty).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "description": concat!("A ", $what, ": lowercase hex"),
                    "pattern": format!("^[0-9a-f]{{{}}}$", 2 * $len),
                })
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($ty), self.to_hex())
            }
        }
    };
}

hex_newtype!(Origin, 16, "origin id");
hex_newtype!(Hash, 32, "hash");

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what} must be {digits} hex digits, got {text:?}")]
pub struct ParseIdError {
    pub what: &'static str,
    pub text: String,
    pub digits: usize,
}

/// An event as a client asks for it; the writer adds origin, seq, hlc, deps and prev.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    pub stream: String,
    pub actor: String,
    pub kind: String,
    pub version: u16,
    pub correlation: Option<String>,
    pub causation: Option<String>,
    pub key: Option<String>,
    pub payload: Vec<u8>,
}

/// `(origin, seq)`: an event's identity, the same on every node.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Debug,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub struct EventId {
    pub origin: Origin,
    pub seq: u64,
}

/// One entry of the causal context: the highest seq of `origin` applied before this event.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Dep {
    pub origin: Origin,
    pub seq: u64,
}

/// The envelope and payload of an event, as the writer builds it and a reader gets it back.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Event {
    pub origin: Origin,
    pub seq: u64,
    pub hlc: u64,
    pub prev: Hash,
    pub deps: Vec<Dep>,
    pub stream: String,
    pub actor: String,
    pub kind: String,
    pub version: u16,
    pub correlation: Option<String>,
    pub causation: Option<String>,
    pub key: Option<String>,
    /// The kind's own archive (see `kinds`); opaque here.
    pub payload: Vec<u8>,
    /// The public key the origin is bound to (`identity::origin_of`), carried by the origin's
    /// first event only: with it any node can check the origin's signed heads.
    pub signer: Option<[u8; 32]>,
}

impl Event {
    pub fn id(&self) -> EventId {
        EventId {
            origin: self.origin,
            seq: self.seq,
        }
    }
}

/// The archived layout of format 1. Field order and types are frozen.
///
/// `prev` is the last field, so it is the last 32 stored bytes (rkyv writes the root struct last,
/// and this archive format has no padding): an event can be encoded before its predecessor is
/// hashed, and [`chain`] fills it in (see the writer).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct StoredEvent {
    origin: [u8; 16],
    seq: u64,
    hlc: u64,
    deps: Vec<StoredDep>,
    stream: String,
    actor: String,
    kind: String,
    version: u16,
    correlation: Option<String>,
    causation: Option<String>,
    key: Option<String>,
    payload: Vec<u8>,
    prev: [u8; 32],
}

/// Bytes of `prev` at the end of every stored event.
const PREV_BYTES: usize = 32;

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct StoredDep {
    origin: [u8; 16],
    seq: u64,
}

/// Why stored bytes could not be read as an event. Says nothing about where they came from:
/// callers add the origin, seq or position they expected.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodeError {
    #[error("empty event bytes")]
    Empty,
    #[error("unknown envelope format {0} (this build reads formats 1 and 2)")]
    UnknownFormat(u8),
    #[error("invalid archive: {0}")]
    Archive(String),
}

/// Encodes an event into its stored bytes.
pub fn encode(event: &Event) -> Vec<u8> {
    encode_into(&mut event.clone(), Vec::new())
}

/// Encodes an event into its stored bytes, reusing `out`'s allocation. The event's fields are
/// moved into the archive and back, so `event` is unchanged and nothing is copied twice.
pub fn encode_into(event: &mut Event, mut out: Vec<u8>) -> Vec<u8> {
    out.clear();
    append_stored(event, out)
}

/// Sets `prev` in the stored bytes of one event (they end with it) and gives the event's hash.
/// With [`encode_into`] of an event whose `prev` is not yet known, it lets the writer encode
/// events on one thread while another hashes the chain.
pub fn chain(bytes: &mut [u8], prev: Hash) -> Hash {
    let at = bytes.len() - PREV_BYTES;
    bytes[at..].copy_from_slice(&prev.0);
    Hash::of(bytes)
}

/// Appends an event's stored bytes to `out`. Relative pointers make the bytes the same wherever
/// in `out` they start.
pub fn append_stored(event: &mut Event, mut out: Vec<u8>) -> Vec<u8> {
    use std::mem::take;
    let mut stored = StoredEvent {
        origin: event.origin.0,
        seq: event.seq,
        hlc: event.hlc,
        prev: event.prev.0,
        deps: event
            .deps
            .iter()
            .map(|d| StoredDep {
                origin: d.origin.0,
                seq: d.seq,
            })
            .collect(),
        stream: take(&mut event.stream),
        actor: take(&mut event.actor),
        kind: take(&mut event.kind),
        version: event.version,
        correlation: take(&mut event.correlation),
        causation: take(&mut event.causation),
        key: take(&mut event.key),
        payload: take(&mut event.payload),
    };
    match event.signer {
        Some(signer) => {
            out.push(ENVELOPE_FORMAT_SIGNER);
            out.extend_from_slice(&signer);
        }
        None => out.push(ENVELOPE_FORMAT),
    }
    // Serializing plain owned data into a Vec has no failure mode but allocation.
    let out = rkyv::api::high::to_bytes_in::<_, rancor::Error>(&stored, out)
        .expect("serializing an owned event into memory cannot fail");
    event.stream = take(&mut stored.stream);
    event.actor = take(&mut stored.actor);
    event.kind = take(&mut stored.kind);
    event.correlation = take(&mut stored.correlation);
    event.causation = take(&mut stored.causation);
    event.key = take(&mut stored.key);
    event.payload = take(&mut stored.payload);
    out
}

/// A checked, zero-copy view of stored bytes.
pub struct EventRef<'a> {
    archived: &'a ArchivedStoredEvent,
    signer: Option<&'a [u8; 32]>,
}

/// Splits stored bytes into the signer (format 2) and the archive.
fn split(bytes: &[u8]) -> Result<(Option<&[u8; 32]>, &[u8]), DecodeError> {
    let (&format, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
    match format {
        ENVELOPE_FORMAT => Ok((None, rest)),
        ENVELOPE_FORMAT_SIGNER => {
            let (signer, archive) = rest
                .split_first_chunk::<32>()
                .ok_or_else(|| DecodeError::Archive("format 2 without its signer".into()))?;
            Ok((Some(signer), archive))
        }
        other => Err(DecodeError::UnknownFormat(other)),
    }
}

/// Checks stored bytes (format byte and archive structure) and gives a view of them.
/// Does not check the hash: the caller knows which hash the bytes must have.
pub fn decode(bytes: &[u8]) -> Result<EventRef<'_>, DecodeError> {
    let (signer, archive) = split(bytes)?;
    let archived = rkyv::access::<ArchivedStoredEvent, rancor::Error>(archive)
        .map_err(|e| DecodeError::Archive(e.to_string()))?;
    Ok(EventRef { archived, signer })
}

/// Reads stored bytes that [`decode`] accepted before, without checking the archive again.
///
/// # Safety
/// `bytes` must be bytes `decode` returned `Ok` for, unchanged since.
pub unsafe fn decode_checked_before(bytes: &[u8]) -> EventRef<'_> {
    let signer =
        (bytes[0] == ENVELOPE_FORMAT_SIGNER).then(|| bytes[1..33].try_into().expect("32 bytes"));
    let at = if signer.is_some() { 33 } else { 1 };
    // SAFETY: the caller's promise: a validated archive after the format byte (and signer).
    let archived = unsafe { rkyv::access_unchecked::<ArchivedStoredEvent>(&bytes[at..]) };
    EventRef { archived, signer }
}

impl EventRef<'_> {
    pub fn origin(&self) -> Origin {
        Origin(self.archived.origin)
    }
    pub fn seq(&self) -> u64 {
        self.archived.seq.to_native()
    }
    pub fn id(&self) -> EventId {
        EventId {
            origin: self.origin(),
            seq: self.seq(),
        }
    }
    pub fn hlc(&self) -> u64 {
        self.archived.hlc.to_native()
    }
    pub fn prev(&self) -> Hash {
        Hash(self.archived.prev)
    }
    pub fn deps(&self) -> Vec<Dep> {
        self.archived
            .deps
            .iter()
            .map(|d| Dep {
                origin: Origin(d.origin),
                seq: d.seq.to_native(),
            })
            .collect()
    }
    pub fn actor(&self) -> &str {
        self.archived.actor.as_str()
    }
    pub fn stream(&self) -> &str {
        self.archived.stream.as_str()
    }
    pub fn kind(&self) -> &str {
        self.archived.kind.as_str()
    }
    pub fn version(&self) -> u16 {
        self.archived.version.to_native()
    }
    pub fn key(&self) -> Option<&str> {
        self.archived.key.as_ref().map(|k| k.as_str())
    }
    pub fn payload(&self) -> &[u8] {
        self.archived.payload.as_slice()
    }
    pub fn correlation(&self) -> Option<&str> {
        self.archived.correlation.as_ref().map(|k| k.as_str())
    }
    pub fn causation(&self) -> Option<&str> {
        self.archived.causation.as_ref().map(|k| k.as_str())
    }
    pub fn deps_len(&self) -> usize {
        self.archived.deps.len()
    }
    /// The public key the origin is bound to, on the origin's first event (format 2).
    pub fn signer(&self) -> Option<[u8; 32]> {
        self.signer.copied()
    }

    /// Copies the view into an owned event.
    pub fn to_event(&self) -> Event {
        let a = self.archived;
        let opt = |s: &rkyv::option::ArchivedOption<rkyv::string::ArchivedString>| {
            s.as_ref().map(|s| s.as_str().to_owned())
        };
        Event {
            origin: self.origin(),
            seq: self.seq(),
            hlc: self.hlc(),
            prev: self.prev(),
            deps: a
                .deps
                .iter()
                .map(|d| Dep {
                    origin: Origin(d.origin),
                    seq: d.seq.to_native(),
                })
                .collect(),
            stream: a.stream.as_str().to_owned(),
            actor: a.actor.as_str().to_owned(),
            kind: a.kind.as_str().to_owned(),
            version: self.version(),
            correlation: opt(&a.correlation),
            causation: opt(&a.causation),
            key: opt(&a.key),
            payload: a.payload.as_slice().to_vec(),
            signer: self.signer(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Event {
        Event {
            origin: Origin([7; 16]),
            seq: 3,
            hlc: (1_700_000_000_000 << 16) | 5,
            prev: Hash([9; 32]),
            deps: vec![Dep {
                origin: Origin([1; 16]),
                seq: 42,
            }],
            stream: "task/abc".into(),
            actor: "agent:triage".into(),
            kind: "activity.logged".into(),
            version: 1,
            correlation: Some("corr-1".into()),
            causation: None,
            key: Some("k-1".into()),
            payload: vec![1, 2, 3, 4],
            signer: None,
        }
    }

    #[test]
    fn round_trips_through_stored_bytes() {
        let event = sample();
        let bytes = encode(&event);
        assert_eq!(bytes[0], ENVELOPE_FORMAT);
        let view = decode(&bytes).unwrap();
        assert_eq!(view.to_event(), event);
        assert_eq!(view.id(), event.id());
        assert_eq!(view.key(), Some("k-1"));
    }

    #[test]
    fn a_first_event_carries_its_signer_in_format_2() {
        let event = Event {
            seq: 1,
            signer: Some([5; 32]),
            ..sample()
        };
        let bytes = encode(&event);
        assert_eq!(bytes[0], ENVELOPE_FORMAT_SIGNER);
        assert_eq!(bytes[1..33], [5; 32]);
        let view = decode(&bytes).unwrap();
        assert_eq!(view.signer(), Some([5; 32]));
        assert_eq!(view.to_event(), event);
        // SAFETY: `decode` accepted these bytes just above.
        let again = unsafe { decode_checked_before(&bytes) };
        assert_eq!(again.to_event(), event);
        assert_eq!(bytes[bytes.len() - PREV_BYTES..], event.prev.0);
        assert!(decode(&bytes[..20]).is_err());
        assert_eq!(
            encode(&Event {
                signer: None,
                ..event
            })[0],
            ENVELOPE_FORMAT,
            "every other event keeps format 1, byte for byte"
        );
    }

    #[test]
    fn encoding_is_deterministic_and_leaves_the_event_as_it_was() {
        assert_eq!(encode(&sample()), encode(&sample()));
        let mut event = sample();
        let bytes = encode_into(&mut event, vec![1, 2, 3]);
        assert_eq!(event, sample());
        assert_eq!(bytes, encode(&sample()));
    }

    #[test]
    fn prev_is_the_last_stored_bytes() {
        let event = sample();
        let bytes = encode(&event);
        assert_eq!(bytes[bytes.len() - PREV_BYTES..], event.prev.0);
    }

    #[test]
    fn appended_then_chained_is_the_plain_encoding() {
        let mut out = vec![0xee; 5]; // Bytes already in the buffer must not matter.
        let mut ends = vec![out.len()];
        let mut events = Vec::new();
        for i in 0..3u8 {
            let mut e = sample();
            e.seq = u64::from(i) + 1;
            e.payload = vec![i; 100 * usize::from(i)];
            let mut unchained = Event {
                prev: Hash::ZERO,
                ..e.clone()
            };
            out = append_stored(&mut unchained, out);
            ends.push(out.len());
            events.push(e);
        }
        for (i, e) in events.iter().enumerate() {
            let bytes = &mut out[ends[i]..ends[i + 1]];
            assert_eq!(chain(bytes, e.prev), Hash::of(&encode(e)));
            assert_eq!(*bytes, encode(e)[..]);
        }
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        assert_eq!(decode(&[]).err(), Some(DecodeError::Empty));
        assert_eq!(
            decode(&[9, 0, 0]).err(),
            Some(DecodeError::UnknownFormat(9))
        );
        let mut bytes = encode(&sample());
        // Truncations and single-byte changes anywhere must never panic.
        for cut in 0..bytes.len() {
            let _ = decode(&bytes[..cut]).map(|v| v.to_event());
        }
        for i in 1..bytes.len() {
            bytes[i] ^= 0xff;
            let _ = decode(&bytes).map(|v| v.to_event());
            bytes[i] ^= 0xff;
        }
    }

    #[test]
    fn hex_ids_parse_and_name_what_was_wrong() {
        let o = Origin([0xab; 16]);
        assert_eq!(Origin::from_hex(&o.to_hex()).unwrap(), o);
        let err = Origin::from_hex("xyz").unwrap_err();
        assert!(err.to_string().contains("origin id must be 32 hex digits"));
    }
}
