//! The node's API as typed structures: what the daemon answers, what the CLI prints with `--json`,
//! and what the clients (the CLI over the socket, the TypeScript client) read back. One field has
//! one name and one shape whether or not the daemon runs.
//!
//! Invariant: every answer and every refusal is one of these types; nothing else builds the JSON
//! of an answer. Integers JavaScript cannot hold exactly (the stamp `hlc`) are strings. A
//! refusal ([`Problem`]) carries a stable [`Code`], a sentence, and where they apply a JSON
//! Pointer to the field and the index of the event in a batch; it never carries the value sent.
//!
//! Boundary: knows the log's and the jobs' results and errors, to render them; no HTTP, no I/O.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::{EventId, Hash, Origin};

/// A refusal's stable, machine-readable kind. The HTTP status follows from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// The body is not JSON, or not the shape the request takes.
    BadJson,
    /// A field has the wrong type, is missing, or breaks its rule.
    InvalidField,
    /// The event's kind is not in this build's catalogue.
    UnknownKind,
    /// The event's `data` does not match its kind's schema.
    InvalidData,
    /// Over a stated limit (bytes or count).
    TooLarge,
    /// A query parameter is unknown, repeated or malformed.
    BadQuery,
    /// A path a job was given breaks the rule of where jobs may write.
    PathRefused,
    /// An idempotency key already names an event made from a different request.
    KeyConflict,
    /// The HTTP listener needs its bearer token.
    Unauthorized,
    /// The caller may not use this door: on the peers' door, a key that is no current member
    /// of the fleet.
    Forbidden,
    NotFound,
    MethodNotAllowed,
    /// The request's head or body did not arrive in time.
    Timeout,
    /// The writer's queue (or the job, export or verify slots) is full: retry after `Retry-After`.
    Busy,
    /// A commit failed; the writer accepts nothing until the log is reopened.
    Poisoned,
    /// This node's own writes are stopped (a fork of its own origin: a stale copy).
    Halted,
    /// The log cannot be reached (another process holds it, the writer stopped).
    Unavailable,
    /// The log's bytes are not what they must be.
    Corrupt,
    /// Storage failed (I/O, redb).
    Storage,
    /// The SQLite projection failed.
    Sqlite,
    /// Postgres failed or could not be reached.
    Postgres,
    /// A file a job writes could not be written.
    File,
    /// A bug: logged with its place and counted.
    Internal,
    /// A code this client does not know (a newer daemon); never sent.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

impl Code {
    /// The HTTP status of a refusal with this code.
    pub fn status(self) -> u16 {
        match self {
            Code::BadJson
            | Code::InvalidField
            | Code::UnknownKind
            | Code::InvalidData
            | Code::BadQuery
            | Code::PathRefused => 400,
            Code::Unauthorized => 401,
            Code::Forbidden => 403,
            Code::NotFound => 404,
            Code::MethodNotAllowed => 405,
            Code::Timeout => 408,
            Code::KeyConflict | Code::Halted => 409,
            Code::TooLarge => 413,
            Code::Busy | Code::Unavailable => 503,
            Code::Poisoned
            | Code::Corrupt
            | Code::Storage
            | Code::Sqlite
            | Code::Postgres
            | Code::File
            | Code::Internal
            | Code::Unknown => 500,
        }
    }

    /// The request itself was wrong (retrying it unchanged cannot succeed): exit code 2.
    pub fn is_bad_request(self) -> bool {
        matches!(self.status(), 400 | 404 | 405 | 409 | 413)
    }
}

/// Every refusal: `{"code", "message", "field"?, "index"?}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error, JsonSchema)]
#[error("{}", self.sentence())]
pub struct Problem {
    pub code: Code,
    pub message: String,
    /// A JSON Pointer (RFC 6901) into the request: `/data/reasoning`, `/kind`; `""` is the
    /// request itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The refused event's index in a batch (from 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// Seconds to wait before retrying (the `Retry-After` header, not in the body).
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl Problem {
    pub fn new(code: Code, message: impl Into<String>) -> Problem {
        Problem {
            code,
            message: message.into(),
            field: None,
            index: None,
            retry_after: None,
        }
    }

    /// Names the field, given as a path in any of the spellings the parsers use
    /// (`data.reasoning`, `data/reasoning`, `[2].data`); stored as a JSON Pointer.
    pub fn field(mut self, path: &str) -> Problem {
        self.field = Some(pointer(path));
        self
    }

    pub fn index(mut self, index: Option<usize>) -> Problem {
        self.index = index;
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> Problem {
        self.retry_after = Some(seconds);
        self
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// The message, with the event's index when a batch was refused.
    fn sentence(&self) -> String {
        match self.index {
            Some(i) => format!("event {i}: {}", self.message),
            None => self.message.clone(),
        }
    }

    /// The answer to a request that hit a bug.
    pub fn internal() -> Problem {
        Problem::new(
            Code::Internal,
            "spool hit a bug answering this request (its log says where); nothing was changed by it",
        )
    }
}

/// A field path as a JSON Pointer: `data.items[2].title`, `data/items/2/title` and
/// `/data/items/2/title` all become `/data/items/2/title`. A name holding `/` or `~` is escaped
/// as RFC 6901 says. `(the request)` and `.` are the root, `""`.
pub fn pointer(path: &str) -> String {
    if path == "(the request)" || path == "." || path.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    for part in path
        .split(['.', '/', '['])
        .map(|p| p.trim_end_matches(']'))
        .filter(|p| !p.is_empty())
    {
        out.push('/');
        out.push_str(&part.replace('~', "~0").replace('/', "~1"));
    }
    out
}

impl From<&crate::input::InputError> for Problem {
    fn from(error: &crate::input::InputError) -> Problem {
        use crate::input::InputError;
        let inner = match error {
            InputError::Line { error, .. } => error.as_ref(),
            other => other,
        };
        let code = match inner {
            InputError::Field { .. } => Code::InvalidField,
            InputError::UnknownKind(_) => Code::UnknownKind,
            InputError::Data { .. } => Code::InvalidData,
            InputError::PayloadTooLarge { .. }
            | InputError::BatchTooLarge
            | InputError::BatchSize
            | InputError::BatchBytesTooLarge
            | InputError::LineTooLong => Code::TooLarge,
            InputError::Json(_)
            | InputError::Empty
            | InputError::Read(_)
            | InputError::Line { .. } => Code::BadJson,
        };
        let problem = Problem::new(code, error.to_string());
        match inner {
            InputError::Field { field, .. } => problem.field(field),
            InputError::Data { error, .. } => problem.field(&format!("data{}", error.field)),
            InputError::UnknownKind(_) => problem.field("kind"),
            _ => problem,
        }
    }
}

impl From<&crate::input::BodyError> for Problem {
    fn from(error: &crate::input::BodyError) -> Problem {
        let mut problem = Problem::from(&error.error).index(error.index);
        if let Some(field) = &error.field {
            problem = problem.field(field);
        }
        problem
    }
}

/// Seconds a client told `busy` by the writer waits before retrying.
pub const RETRY_AFTER_SECONDS: u64 = 1;

impl From<&crate::log::LogError> for Problem {
    fn from(error: &crate::log::LogError) -> Problem {
        use crate::log::LogError;
        let code = match error {
            LogError::Halted { .. } => Code::Halted,
            LogError::Poisoned { .. } => Code::Poisoned,
            LogError::Busy(_) => {
                return Problem::new(Code::Busy, error.to_string()).retry_after(RETRY_AFTER_SECONDS)
            }
            LogError::KeyConflict { index, .. } => {
                return Problem::new(Code::KeyConflict, error.to_string())
                    .field("key")
                    .index(Some(*index))
            }
            LogError::Unregistered { index, error } => {
                return Problem::new(Code::InvalidData, error.to_string())
                    .field(&format!("data{}", error.field))
                    .index(Some(*index))
            }
            LogError::Locked { .. } | LogError::WriterGone => Code::Unavailable,
            LogError::Corrupt(_) => Code::Corrupt,
            _ => Code::Storage,
        };
        Problem::new(code, error.to_string())
    }
}

impl From<crate::log::LogError> for Problem {
    fn from(error: crate::log::LogError) -> Problem {
        Problem::from(&error)
    }
}

impl From<crate::jobs::JobError> for Problem {
    fn from(error: crate::jobs::JobError) -> Problem {
        use crate::files::FileError;
        use crate::jobs::JobError;
        let code = match &error {
            JobError::AsOf { .. } => {
                let rule = "as_of: must be a log position or an RFC 3339 time";
                return Problem::new(Code::InvalidField, rule).field("as_of");
            }
            JobError::Log(e) => return Problem::from(e),
            JobError::Sqlite(_) => Code::Sqlite,
            JobError::Postgres(_) => Code::Postgres,
            JobError::File(FileError::Refused { .. }) => {
                return Problem::new(Code::PathRefused, error.to_string()).field("into")
            }
            JobError::File(FileError::Io { .. }) => Code::File,
        };
        Problem::new(code, error.to_string())
    }
}

/// The acknowledgement of one appended event, sent once it is durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Ack {
    pub origin: Origin,
    pub seq: u64,
    pub position: u64,
    pub hash: Hash,
    /// True when the idempotency key named an earlier event made from the same request: nothing
    /// was written, and this is that event.
    pub duplicate: bool,
}

impl From<&crate::log::Appended> for Ack {
    fn from(a: &crate::log::Appended) -> Ack {
        Ack {
            origin: a.origin,
            seq: a.seq,
            position: a.position,
            hash: a.hash,
            duplicate: a.existing,
        }
    }
}

/// One event as `spool log` prints it, `GET /v1/log` pages it and `GET /v1/events` streams it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    /// Where this node applied it (its own order; differs between nodes).
    pub position: u64,
    pub origin: Origin,
    pub seq: u64,
    pub hash: Hash,
    pub prev: Hash,
    /// The hybrid logical clock stamp, a u64 as a decimal string (above 2^53).
    pub hlc: String,
    /// The stamp's wall-clock part, RFC 3339 with milliseconds.
    pub time: String,
    pub deps: Vec<Dep>,
    pub stream: String,
    pub actor: String,
    pub kind: String,
    pub version: u16,
    pub correlation: Option<String>,
    pub causation: Option<String>,
    pub key: Option<String>,
    /// The payload decoded to JSON; null when this build cannot read its kind or version.
    pub data: Value,
    /// Why `data` is null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_error: Option<String>,
    /// The public key (64 hex digits) the origin is bound to: on an origin's first event only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Dep {
    pub origin: Origin,
    pub seq: u64,
}

impl From<&crate::log::Record> for Event {
    fn from(record: &crate::log::Record) -> Event {
        use std::time::{Duration, UNIX_EPOCH};
        let e = record.event().to_event();
        let time = UNIX_EPOCH + Duration::from_millis(crate::hlc::physical_ms(e.hlc));
        let (data, data_error) = match crate::kinds::decode(&e.kind, e.version, &e.payload) {
            Ok(data) => (data, None),
            Err(error) => (Value::Null, Some(error.to_string())),
        };
        Event {
            position: record.position,
            origin: e.origin,
            seq: e.seq,
            hash: record.hash,
            prev: e.prev,
            hlc: e.hlc.to_string(),
            time: humantime::format_rfc3339_millis(time).to_string(),
            deps: e
                .deps
                .iter()
                .map(|d| Dep {
                    origin: d.origin,
                    seq: d.seq,
                })
                .collect(),
            stream: e.stream,
            actor: e.actor,
            kind: e.kind,
            version: e.version,
            correlation: e.correlation,
            causation: e.causation,
            key: e.key,
            signer: e.signer.map(hex::encode),
            data,
            data_error,
        }
    }
}

/// What `GET /v1/log` and `spool log` read: events after `after` passing the filters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// Only events after this log position (an event stream: or after `Last-Event-ID`).
    #[serde(default)]
    pub after: u64,
    /// At most this many events in a page (1 000 at most; a larger limit reads 1 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Only events of this stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Only events of this kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Only events of this origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

impl LogQuery {
    pub fn filter(&self) -> crate::log::Filter {
        crate::log::Filter {
            stream: self.stream.clone(),
            kind: self.kind.clone(),
            origin: self.origin,
        }
    }
}

/// One page of events, and where the next page starts (null at the log's end).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LogPage {
    pub events: Vec<Event>,
    pub next: Option<u64>,
}

/// The node: its id and label.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NodeName {
    pub id: Origin,
    pub label: String,
}

/// An origin's highest event held here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Head {
    pub origin: Origin,
    pub seq: u64,
    pub hash: Hash,
    /// The origin is this node.
    pub local: bool,
}

/// Two events at one (origin, seq): the one held and the one refused (kept as evidence).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Fork {
    pub id: EventId,
    pub refused: Hash,
    pub held: Option<Hash>,
}

/// An event refused for who wrote it or how it came signed, kept as evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RefusedEvent {
    pub id: EventId,
    pub hash: Hash,
    pub reason: String,
}

/// The fleet a node is in (`spool fleet`): its root and every member it knows of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Fleet {
    pub root: Origin,
    pub members: Vec<crate::membership::Member>,
}

impl From<&crate::membership::Membership> for Fleet {
    fn from(fleet: &crate::membership::Membership) -> Fleet {
        Fleet {
            root: fleet.root(),
            members: fleet.members().cloned().collect(),
        }
    }
}

/// Refused events a status lists at most (`refused_count` counts them all).
pub const STATUS_REFUSED_MAX: usize = 100;

/// `spool status --json` and `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Status {
    pub node: NodeName,
    pub home: String,
    pub events: u64,
    pub file_bytes: u64,
    pub heads: Vec<Head>,
    /// Shipped events waiting for their predecessor or deps.
    pub waiting: u64,
    pub forks: Vec<Fork>,
    /// Events refused for who wrote them or how they came signed (the first
    /// [`STATUS_REFUSED_MAX`]), kept as evidence.
    pub refused: Vec<RefusedEvent>,
    pub refused_count: u64,
    /// The fleet this node takes events from; `None` for a node made before keys, which
    /// takes every origin's.
    pub fleet: Option<Fleet>,
    /// Why this node's own writes are stopped, if they are.
    pub halted: Option<String>,
    /// Events the projection skipped: kinds or versions this build cannot read.
    pub unreadable: u64,
    /// Present only when the daemon answered: its writer, projector and panics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<DaemonStatus>,
}

/// What only a running daemon knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DaemonStatus {
    /// Durable commits and events written since it started.
    pub commits: u64,
    pub appended: u64,
    /// The live projection's position and how far behind the log it is.
    pub projected: u64,
    pub lag_events: u64,
    /// Bugs hit since it started.
    pub panics: u64,
    /// Event streams (SSE) open now.
    pub streams: u64,
    /// The hub sync, when `[hub] url` (or `SPOOL_HUB_URL`) is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<HubStatus>,
    /// The peers of `[[peers]]`, in order.
    #[serde(default)]
    pub peers: Vec<PeerStatus>,
}

/// `spool sync hub --json`: what one push and pull with the hub did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HubSummary {
    /// Events this node sent that the hub did not hold.
    pub pushed: u64,
    /// Events it sent that the hub held already.
    pub already_there: u64,
    /// Events it sent at an (origin, seq) where the hub holds another: kept as fork evidence.
    pub forks: u64,
    /// Events read from the hub, and what ingest made of them.
    pub pulled: u64,
    pub applied: u64,
    pub released: u64,
    pub waiting: u64,
    /// Per origin (every origin the hub or this node holds): what the hub holds of it, what
    /// this node holds, what was pushed and pulled, why its pull was refused.
    pub origins: BTreeMap<Origin, HubOrigin>,
    /// Nodes whose published projection covers the same events as this node's and whose
    /// digest differs (see `sync::hub::Hub::compare`).
    pub divergent: Vec<Origin>,
}

/// What the daemon's sync with the fleet's Postgres hub has done since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HubStatus {
    /// Completed push-and-pull rounds.
    pub syncs: u64,
    /// When the last one ended (ms since the Unix epoch).
    pub last_sync_ms: Option<u64>,
    /// Events pushed that the hub lacked, and events pulled and applied (or released).
    pub pushed: u64,
    pub pulled: u64,
    pub applied: u64,
    /// Events the hub holds that this node does not (summed over origins) at the last round.
    pub lag_events: u64,
    /// Per origin, at the last round (`pushed` and `pulled` since the daemon started).
    pub origins: BTreeMap<Origin, HubOrigin>,
    /// The last error (connecting, or in a round), if the last attempt failed.
    pub last_error: Option<String>,
    /// Nodes that published a projection of the same events as this node's with another
    /// digest: a divergence (also `spool_hub_divergent_nodes` in `/metrics`).
    pub divergent: Vec<Origin>,
}

/// One origin in the hub sync.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HubOrigin {
    /// The highest seq the hub held of it when the pull began (0: none).
    pub hub_holds: u64,
    /// The highest seq this node held of it when the pull ended (0: none).
    pub held: u64,
    /// Events of it the hub holds that this node does not: `hub_holds - held`, or 0.
    pub lag: u64,
    /// Events of it this node pushed that the hub lacked, and pulled from the hub.
    pub pushed: u64,
    pub pulled: u64,
    /// Why its pull stopped before the hub's last event (by name, as ingest says it), if it did.
    pub refused: Option<String>,
}

impl HubSummary {
    /// The origins whose pull was refused, and why.
    pub fn refused(&self) -> impl Iterator<Item = (&Origin, &str)> {
        self.origins
            .iter()
            .filter_map(|(o, h)| h.refused.as_deref().map(|why| (o, why)))
    }
}

/// `POST /v1/peer/wait`, on the peers' door only: answered as soon as this node holds an event
/// `since` lacks, or after `wait_ms` (at most 30 000) with what it holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerWait {
    pub since: Heads,
    pub wait_ms: u64,
}

/// The answer to [`PeerWait`]: the node's version vector (its projection's digest is
/// `GET /v1/peer/digest`'s, computed only when an exchange finds both sides equal).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PeerState {
    pub heads: Heads,
}

/// A projection's digest (`spool digest sqlite`) and the vector of the events it covers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProjectionDigest {
    pub covers: Heads,
    pub digest: String,
}

/// `spool sync peer --json`: one exchange with a peer, both directions at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PeerSummary {
    /// The peer's node: the key its TLS certificate proved, as an origin.
    pub peer: Option<Origin>,
    /// Events sent that the peer lacked, and how many it applied (or released).
    pub sent: u64,
    pub sent_applied: u64,
    /// Events received from it, and what this node's ingest made of them.
    pub received: u64,
    pub applied: u64,
    pub released: u64,
    pub waiting: u64,
    /// Why either side stopped taking the other's events (by name), if one did.
    pub refused: Option<String>,
    /// Its projection covers the same events as this node's and has another digest.
    pub divergent: bool,
}

/// What the daemon's sync with one peer of `[[peers]]` has done since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PeerStatus {
    /// As configured.
    pub address: String,
    /// The peer's node, once a handshake proved its key.
    pub peer: Option<Origin>,
    /// Whether the last attempt to reach it succeeded.
    pub reachable: bool,
    /// Completed exchanges, and when the last one ended (ms since the Unix epoch).
    pub syncs: u64,
    pub last_sync_ms: Option<u64>,
    /// Events sent that it lacked, and events received from it, since the daemon started.
    pub sent: u64,
    pub received: u64,
    /// Events it held that this node did not, at the last exchange.
    pub lag_events: u64,
    /// Why the last attempt failed or was refused, if it was.
    pub last_error: Option<String>,
    /// Its projection of the same events has another digest (a divergence).
    pub divergent: bool,
}

/// `POST /v1/pair/code` (the socket): mint a pairing code.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PairCodeRequest {
    /// What the code is for (a device's name), as the pairing records it.
    #[serde(default)]
    pub device: Option<String>,
}

/// A minted code: give the code, an address and the fingerprint to the new device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PairCode {
    pub pairing_id: String,
    /// Shown once; only its keyed hash is stored.
    pub code: String,
    pub expires_at_ms: u64,
    /// Where the peers' door listens (`[peer] listen`).
    pub address: Option<String>,
    /// This node's origin: the hash of its key, which `spool pair join --origin` pins.
    pub fingerprint: Origin,
}

/// One of this node's pairing codes (never the code).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Pairing {
    pub pairing_id: String,
    pub device: String,
    pub expires_at_ms: u64,
    /// `pending`, `completed`, `expired` or `cancelled`.
    pub state: String,
    /// The device it admitted, once completed.
    pub device_id: Option<String>,
}

/// `POST /v1/pair/cancel` (the socket).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PairCancel {
    pub pairing_id: String,
}

/// `POST /v1/pair/join`, on the peers' door: a new device presents a code (its key is the one
/// its TLS handshake proved). Answered with an export of the member's log, which admits it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PairJoin {
    pub code: String,
    pub label: String,
}

/// `spool heads --json` and `GET /v1/heads`: the version vector, `{"<origin hex>": seq}`.
pub type Heads = BTreeMap<Origin, u64>;

/// `spool ingest --json` and `POST /v1/ingest`. Each event read lands in exactly one of
/// `applied`, `waited` and `duplicates` (for a whole file: `read = applied + waited +
/// duplicates`); the log grew by `applied + released`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct IngestSummary {
    /// True when the whole input was read and nothing was refused.
    pub ok: bool,
    /// Events read.
    pub read: u64,
    /// Of those, applied at once.
    pub applied: u64,
    /// Of those, put to wait for their predecessor or deps.
    pub waited: u64,
    /// Of those, already held or already waiting.
    pub duplicates: u64,
    /// Waiting events (of this input or earlier ones) applied because their wait ended.
    pub released: u64,
    /// Events waiting on this node now, from any input.
    pub waiting: u64,
    /// Stamps far ahead of this node's clock (clamped).
    pub clamped: u64,
    /// Why it stopped before the end, if it did.
    pub stopped: Option<String>,
    /// The event refused, if one was.
    pub refused: Option<Value>,
    /// Events a refusal named, kept as evidence (`spool status` lists them).
    #[serde(default)]
    pub evidence_kept: u64,
}

impl IngestSummary {
    /// Adds a later piece of the same input (the daemon is sent a large file in pieces).
    pub fn add(&mut self, piece: &IngestSummary) {
        self.read += piece.read;
        self.applied += piece.applied;
        self.waited += piece.waited;
        self.duplicates += piece.duplicates;
        self.released += piece.released;
        self.clamped += piece.clamped;
        self.evidence_kept += piece.evidence_kept;
        self.waiting = piece.waiting;
        self.ok = piece.ok;
        self.stopped.clone_from(&piece.stopped);
        self.refused.clone_from(&piece.refused);
    }
}

impl From<&crate::sync::file::IngestSummary> for IngestSummary {
    fn from(summary: &crate::sync::file::IngestSummary) -> IngestSummary {
        let r = &summary.report;
        let stopped = summary.stopped();
        IngestSummary {
            ok: stopped.is_none(),
            read: summary.frames,
            applied: r.applied,
            waited: r.waited,
            duplicates: r.duplicates,
            released: r.released,
            waiting: r.waiting,
            clamped: r.clamped,
            stopped,
            refused: summary
                .refused
                .as_ref()
                .and_then(|(_, refused)| serde_json::to_value(refused).ok()),
            evidence_kept: summary.evidence_kept,
        }
    }
}

/// `spool verify --json` and `GET /v1/verify`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VerifyReport {
    pub ok: bool,
    pub events: u64,
    pub origins: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// Signed heads checked.
    pub signatures: u64,
    /// Refused events kept as evidence (not a problem: `spool status` lists them).
    pub refused: u64,
    pub problems_total: u64,
    /// The first problems, in position order: each its facts and a sentence.
    pub problems: Vec<VerifyProblem>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VerifyProblem {
    pub message: String,
    #[serde(flatten)]
    pub facts: serde_json::Map<String, Value>,
}

impl VerifyReport {
    pub fn of(report: &crate::log::VerifyReport, seconds: f64) -> VerifyReport {
        VerifyReport {
            ok: report.ok(),
            events: report.events,
            origins: report.origins,
            bytes: report.bytes,
            seconds,
            signatures: report.signatures,
            refused: report.refused,
            problems_total: report.problems_total,
            problems: report
                .problems
                .iter()
                .map(|p| VerifyProblem {
                    message: p.to_string(),
                    facts: match serde_json::to_value(p) {
                        Ok(Value::Object(facts)) => facts,
                        _ => Default::default(),
                    },
                })
                .collect(),
        }
    }
}

/// `spool export`'s selection, as `POST /v1/export` takes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// Origins (32 hex digits) to export; every origin when empty.
    #[serde(default)]
    pub origins: Vec<String>,
    /// A version vector (as `spool heads --json` prints it, or `hex:seq,...`): only what it
    /// lacks is exported.
    #[serde(default)]
    pub since: Option<String>,
}

/// `POST /v1/jobs/rebuild`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RebuildRequest {
    /// Where to build (an absolute path); the node's projection when absent.
    #[serde(default)]
    pub into: Option<std::path::PathBuf>,
    /// A position or an RFC 3339 time.
    #[serde(default)]
    pub as_of: Option<String>,
}

/// `POST /v1/jobs/project-postgres` and `/v1/jobs/backfill-postgres`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresRequest {
    pub url: String,
    #[serde(default)]
    pub held_bytes_max: Option<usize>,
}

impl std::fmt::Debug for PostgresRequest {
    // The URL may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresRequest")
            .field("held_bytes_max", &self.held_bytes_max)
            .finish_non_exhaustive()
    }
}

/// A rebuild's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RebuildSummary {
    pub path: std::path::PathBuf,
    pub applied: u64,
    pub position: u64,
    pub seconds: f64,
    pub events_per_second: f64,
}

/// One pass of projecting into Postgres.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProjectSummary {
    /// Events applied by this pass.
    pub applied: u64,
    /// The checkpoint's position after it.
    pub position: u64,
    /// Events this node has applied there in all.
    pub events: u64,
    pub seconds: f64,
    /// Deadlocked transactions retried.
    pub retries: u64,
}

/// A Postgres backfill's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BackfillSummary {
    pub applied: u64,
    pub resumed_from: u64,
    pub pinned: u64,
    pub tail: u64,
    pub position: u64,
    pub events: u64,
    pub seconds: f64,
    pub events_per_second: f64,
}

/// How far a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// One line of a job's answer (JSON lines): progress, then the result or the error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[schemars(rename = "JobLineOf{T}")]
pub enum JobLine<T> {
    Progress(Progress),
    Result(T),
    Error(Problem),
}
