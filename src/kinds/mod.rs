//! The catalogue of event kinds: for each kind its current version, its JSON Schema (the contract
//! non-Rust clients send JSON against), and the mapping JSON ⇄ payload archive.
//!
//! Invariants: a payload archive of a released (kind, version) is decodable forever; an older
//! version is read through an upcaster into the current one. Data that passes `encode` satisfies
//! the kind's schema, and `decode(encode(x))` is `x` in canonical form.
//!
//! Boundary: knows serde_json, jsonschema and the rkyv payload types; nothing about the log or the
//! envelope. Adding a kind is adding a module here, its schema under `schemas/`, and one line in
//! [`CATALOGUE`].

/// Declares payload structs: serde (unknown fields refused, absent options left out), the JSON
/// Schema, and the rkyv archive.
macro_rules! payloads {
    ($( $(#[$m:meta])* pub struct $name:ident { $($body:tt)* } )*) => {$(
        #[serde_with::skip_serializing_none]
        #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
        #[serde(deny_unknown_fields)]
        $(#[$m])*
        pub struct $name { $($body)* }
    )*};
}

/// Declares closed sets of values, written in snake_case.
macro_rules! choices {
    ($( $(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $variant:ident),* $(,)? } )*) => {$(
        #[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[derive(schemars::JsonSchema, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
        #[serde(rename_all = "snake_case")]
        $(#[$m])*
        pub enum $name { $($(#[$vm])* $variant),* }
    )*};
}

pub mod activity;
pub mod devices;
pub mod fleet;
pub mod loom;
pub mod openclaw;
pub mod tasks;
pub mod types;
pub mod vault;

use std::collections::HashMap;
use std::sync::LazyLock;

use jsonschema::error::ValidationErrorKind;
use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use serde_json::Value;

/// A payload type: one version of one kind. The type is both the JSON form (serde, with the
/// JSON Schema derived from it) and the archived form (rkyv); a released version never changes.
pub trait Payload:
    serde::Serialize
    + serde::de::DeserializeOwned
    + schemars::JsonSchema
    + rkyv::Archive
    + for<'a> rkyv::Serialize<HighSerializer<Vec<u8>, ArenaHandle<'a>, rancor::Error>>
where
    Self::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<Self, HighDeserializer<rancor::Error>>,
{
    /// Rules the schema cannot state. `Err` names the field (a JSON pointer) and the problem.
    fn check(&self) -> Result<(), DataError> {
        Ok(())
    }

    /// Reads an earlier version's payload as this version. Only kinds with an upcaster override
    /// it, and list the versions it reads in their catalogue entry.
    fn upcast(version: u16, _payload: &[u8]) -> Result<Self, String> {
        Err(format!("no upcaster from version {version}"))
    }
}

/// One version of one event kind: what the log and the CLI need of it, without its type.
pub struct KindSpec {
    /// `domain.past_tense_verb`.
    pub name: &'static str,
    /// The version `encode` writes.
    pub version: u16,
    /// Versions `decode` reads (earlier ones through an upcaster), ending with `version`.
    pub readable: &'static [u16],
    /// The JSON Schema of `version`, as shipped under `schemas/`.
    pub schema: &'static str,
    encode: fn(&Value) -> Result<Vec<u8>, DataError>,
    decode: fn(bool, u16, &[u8]) -> Result<Value, String>,
    /// A stored payload as JSON of this version, after the rules the schema cannot state.
    stored: fn(bool, u16, &[u8]) -> Result<Value, DataError>,
    /// The schema derived from the type; a test keeps `schema` equal to it.
    derived_schema: fn(&str, u16) -> Value,
    /// A payload of a readable version into its typed current form (current versions only).
    body: Option<BodyFn>,
}

type BodyFn = fn(bool, u16, &[u8]) -> Result<Body, String>;

/// Registers payload types: `"kind" version => Variant(Type) [, reads [versions]];` for the
/// current versions (`Variant` names it in [`Body`]), `"kind" version => Type;` for superseded
/// ones. The schema file is `schemas/<kind>/v<version>.schema.json`.
macro_rules! catalogue {
    (
        current { $( $name:literal $v:literal => $variant:ident($ty:ty) $(, reads $old:expr)? ; )* }
        superseded { $( $sname:literal $sv:literal => $sty:ty ; )* }
    ) => {
        /// Every kind this build writes, at its current version, in `schema list` order.
        pub static CATALOGUE: &[&KindSpec] = &[$(
            &catalogue!(
                @spec $name $v $ty,
                catalogue!(@readable $v $(, $old)?),
                Some(|current, version, payload| typed::<$ty>(current, version, payload).map(Body::$variant))
            ),
        )*];

        /// A decoded payload of any kind, at its current version: what projectors match on.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Body { $( $variant($ty), )* }

        /// Decodes a stored payload (of any readable version) into its typed current form.
        pub fn body(kind: &str, version: u16, payload: &[u8]) -> Result<Body, PayloadError> {
            let spec = lookup(kind).ok_or_else(|| PayloadError::UnknownKind(kind.to_owned()))?;
            spec.check_readable(version)?;
            let body = spec.body.expect("every kind of the catalogue decodes to a Body");
            body(version == spec.version, version, payload).map_err(|problem| PayloadError::Invalid {
                kind: kind.to_owned(),
                version,
                problem,
            })
        }
        /// Earlier versions, still read (through their kind's upcaster), no longer written.
        pub static SUPERSEDED: &[&KindSpec] =
            &[$( &catalogue!(@spec $sname $sv $sty, &[$sv], None), )*];
    };
    (@spec $name:literal $v:literal $ty:ty, $readable:expr, $body:expr) => {
        KindSpec {
            name: $name,
            version: $v,
            readable: $readable,
            schema: include_str!(concat!("../../schemas/", $name, "/v", $v, ".schema.json")),
            encode: encode_as::<$ty>,
            decode: decode_as::<$ty>,
            stored: stored_as::<$ty>,
            derived_schema: derived_schema::<$ty>,
            body: $body,
        }
    };
    (@readable $v:literal) => { &[$v] };
    (@readable $v:literal, $old:expr) => { &$old };
}

catalogue! {
    current {
        "task.created" 1 => TaskCreated(tasks::TaskCreated);
        "task.edited" 1 => TaskEdited(tasks::TaskEdited);
        "task.moved" 1 => TaskMoved(tasks::TaskMoved);
        "task.archived" 1 => TaskArchived(tasks::TaskArchived);
        "task.scored" 1 => TaskScored(tasks::TaskScored);
        "task.score_overridden" 1 => TaskScoreOverridden(tasks::TaskScoreOverridden);
        "task.score_locked" 1 => TaskScoreLocked(tasks::TaskScoreLocked);
        "task.score_unlocked" 1 => TaskScoreUnlocked(tasks::TaskScoreUnlocked);
        "brief.added" 1 => BriefAdded(tasks::BriefAdded);
        "brief.consumed" 1 => BriefConsumed(tasks::BriefConsumed);
        "triage.run_started" 1 => TriageRunStarted(tasks::TriageRunStarted);
        "triage.run_completed" 1 => TriageRunCompleted(tasks::TriageRunCompleted);
        "triage.run_failed" 1 => TriageRunFailed(tasks::TriageRunFailed);
        "loom.workflow_mirrored" 1 => WorkflowMirrored(loom::WorkflowMirrored);
        "loom.workflow_registered" 1 => WorkflowRegistered(loom::WorkflowRegistered);
        "loom.workflow_unregistered" 1 => WorkflowUnregistered(loom::WorkflowUnregistered);
        "loom.run_started" 1 => RunStarted(loom::RunStarted);
        "loom.run_finished" 1 => RunFinished(loom::RunFinished);
        "loom.step_started" 1 => StepStarted(loom::StepStarted);
        "loom.step_finished" 2 => StepFinished(loom::StepFinished), reads [1, 2];
        "loom.step_acked" 1 => StepAcked(loom::StepAcked);
        "loom.job_enqueued" 1 => JobEnqueued(loom::JobEnqueued);
        "loom.job_claimed" 1 => JobClaimed(loom::JobClaimed);
        "loom.job_completed" 1 => JobCompleted(loom::JobCompleted);
        "loom.cron_run_mirrored" 1 => CronRunMirrored(loom::CronRunMirrored);
        "fleet.heartbeat_recorded" 1 => NodeHeartbeat(fleet::NodeHeartbeat);
        "bot.heartbeat_recorded" 1 => BotHeartbeat(fleet::BotHeartbeat);
        "bot.claimed" 1 => BotClaimed(fleet::BotClaimed);
        "bot.released" 1 => BotReleased(fleet::BotReleased);
        "activity.logged" 1 => Logged(activity::Logged);
        "vault.install_initialised" 1 => InstallInitialised(vault::InstallInitialised);
        "vault.recipient_added" 1 => RecipientAdded(vault::RecipientAdded);
        "vault.recipient_removed" 1 => RecipientRemoved(vault::RecipientRemoved);
        "vault.entry_written" 1 => EntryWritten(vault::EntryWritten);
        "vault.entry_rewrapped" 1 => EntryRewrapped(vault::EntryRewrapped);
        "vault.entry_unlocked" 1 => EntryUnlocked(vault::EntryUnlocked);
        "vault.entry_removed" 1 => EntryRemoved(vault::EntryRemoved);
        "pairing.requested" 1 => PairingRequested(devices::PairingRequested);
        "pairing.completed" 1 => PairingCompleted(devices::PairingCompleted);
        "pairing.expired" 1 => PairingExpired(devices::PairingExpired);
        "pairing.cancelled" 1 => PairingCancelled(devices::PairingCancelled);
        "pairing.attempt_failed" 1 => PairingAttemptFailed(devices::PairingAttemptFailed);
        "device.paired" 1 => DevicePaired(devices::DevicePaired);
        "device.revoked" 1 => DeviceRevoked(devices::DeviceRevoked);
        "openclaw.auth_profile_upserted" 1 => AuthProfileUpserted(openclaw::AuthProfileUpserted);
        "openclaw.session_created" 1 => SessionCreated(openclaw::SessionCreated);
        "openclaw.session_updated" 1 => SessionUpdated(openclaw::SessionUpdated);
        "openclaw.config_value_set" 1 => ConfigValueSet(openclaw::ConfigValueSet);
    }
    superseded {
        "loom.step_finished" 1 => loom::StepFinishedV1;
    }
}

/// Looks a kind up by name.
pub fn lookup(name: &str) -> Option<&'static KindSpec> {
    // Looked up once per event replayed: a fast hash (the names are ours, not an attacker's
    // keys to collide; an unknown name just misses).
    type ByName = HashMap<&'static str, &'static KindSpec, foldhash::fast::FixedState>;
    static BY_NAME: LazyLock<ByName> =
        LazyLock::new(|| CATALOGUE.iter().map(|k| (k.name, *k)).collect());
    BY_NAME.get(name).copied()
}

/// Compiled validators, by (kind, version), for the catalogue and superseded versions.
/// Looked up once per event encoded: a fast hash, as for [`lookup`].
type ByVersion = HashMap<(&'static str, u16), jsonschema::Validator, foldhash::fast::FixedState>;
static VALIDATORS: LazyLock<ByVersion> = LazyLock::new(|| {
    CATALOGUE
        .iter()
        .chain(SUPERSEDED)
        .map(|k| {
            let schema: Value = serde_json::from_str(k.schema)
                .unwrap_or_else(|e| panic!("schema of {} is not JSON: {e}", k.name));
            // Our patterns need no lookaround: the linear-time `regex` engine suffices.
            let validator = jsonschema::options()
                .with_pattern_options(jsonschema::PatternOptions::regex())
                .build(&schema)
                .unwrap_or_else(|e| panic!("schema of {} is not a JSON Schema: {e}", k.name));
            ((k.name, k.version), validator)
        })
        .collect()
});

fn encode_as<T: Payload>(data: &Value) -> Result<Vec<u8>, DataError>
where
    T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    // Read once plainly; only a refusal is read again, tracking the path, to name the field.
    let value = match T::deserialize(data) {
        Ok(value) => value,
        Err(_) => serde_path_to_error::deserialize::<_, T>(data).map_err(|e| DataError {
            field: pointer(e.path()),
            problem: e.into_inner().to_string(),
        })?,
    };
    value.check()?;
    Ok(to_payload(&value))
}

fn decode_as<T: Payload>(current: bool, version: u16, payload: &[u8]) -> Result<Value, String>
where
    T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    let value: T = typed(current, version, payload)?;
    serde_json::to_value(&value).map_err(|e| e.to_string())
}

fn stored_as<T: Payload>(current: bool, version: u16, payload: &[u8]) -> Result<Value, DataError>
where
    T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    let value: T = typed(current, version, payload)
        .map_err(|p| DataError::at("", &format!("is not a readable payload ({p})")))?;
    value.check()?;
    serde_json::to_value(&value).map_err(|e| DataError::at("", &e.to_string()))
}

fn typed<T: Payload>(current: bool, version: u16, payload: &[u8]) -> Result<T, String>
where
    T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    match current {
        true => from_payload(payload),
        false => T::upcast(version, payload),
    }
}

/// The JSON Schema of a payload type, titled with its kind and version.
fn derived_schema<T: Payload>(name: &str, version: u16) -> Value
where
    T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    let generator = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .into_generator();
    let mut schema = generator.into_root_schema_for::<T>().to_value();
    let object = schema
        .as_object_mut()
        .expect("a payload's schema is an object");
    object.insert("title".into(), format!("{name} v{version}").into());
    object.insert(
        "$id".into(),
        format!("https://spool.dev/schemas/{name}/v{version}.schema.json").into(),
    );
    schema
}

/// A serde path (`a.b[2]`) as a JSON pointer (`/a/b/2`).
fn pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("/{index}")),
            Segment::Map { key } => {
                out.push('/');
                out.push_str(&key.replace('~', "~0").replace('/', "~1"));
            }
            Segment::Enum { variant } => out.push_str(&format!("/{variant}")),
            Segment::Unknown => {}
        }
    }
    out
}

/// Why a client's data was refused. `field` is a JSON pointer into the data (`""` for the whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("data{field}: {problem}")]
pub struct DataError {
    pub field: String,
    pub problem: String,
}

impl DataError {
    /// A problem with `field`, a JSON pointer into the data.
    pub fn at(field: &str, problem: &str) -> DataError {
        DataError {
            field: field.to_owned(),
            problem: problem.to_owned(),
        }
    }

    /// A problem with the data as a whole.
    pub fn whole(problem: &str) -> DataError {
        DataError::at("", problem)
    }
}

/// Why a stored payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("unknown event kind {0:?}")]
    UnknownKind(String),
    #[error("{kind} has no version {version} this build can read (it reads {readable:?})")]
    UnknownVersion {
        kind: String,
        version: u16,
        readable: &'static [u16],
    },
    #[error("{kind} v{version} payload is not a valid archive: {problem}")]
    Invalid {
        kind: String,
        version: u16,
        problem: String,
    },
}

impl KindSpec {
    /// Checks `data` against the schema and encodes it as this version.
    pub fn encode(&self, data: &Value) -> Result<Vec<u8>, DataError> {
        self.validate(data)?;
        (self.encode)(data)
    }

    /// A payload another node stored, of a version this build reads, as JSON of this version,
    /// once it decodes and passes the rules the schema cannot state; [`KindSpec::validate`]
    /// then checks it as `encode` checks a request. (Not encoded again: the bytes are the
    /// sender's, and its hash covers them.)
    pub fn stored_json(&self, version: u16, payload: &[u8]) -> Result<Value, DataError> {
        if !self.readable.contains(&version) {
            return Err(DataError::at(
                "",
                "is of a version this build does not read",
            ));
        }
        (self.stored)(version == self.version, version, payload)
    }

    /// `data` against this version's schema; the refusal names one field.
    pub fn validate(&self, data: &Value) -> Result<(), DataError> {
        let validator = &VALIDATORS[&(self.name, self.version)];
        if validator.is_valid(data) {
            return Ok(());
        }
        // One error is reported: a missing or unknown field first, as it explains the rest.
        let err = validator.iter_errors(data).min_by_key(|e| match e.kind() {
            ValidationErrorKind::Required { .. } => 0,
            ValidationErrorKind::AdditionalProperties { .. } => 1,
            _ => 2,
        });
        if let Some(err) = err {
            // An unknown property is named as a cut, escaped prefix (it is the client's text),
            // and the schema says what the object takes.
            let problem = match err.kind() {
                ValidationErrorKind::AdditionalProperties { unexpected } => format!(
                    "has a property {} v{} does not define ({}; `spool schema show {}` lists them)",
                    self.name,
                    self.version,
                    crate::input::shown(unexpected.first().map_or("", String::as_str)),
                    self.name
                ),
                // A missing property is named in the field (the schema's name, not the
                // client's text).
                ValidationErrorKind::Required { property } => {
                    let name = property.as_str().unwrap_or_default();
                    let name = name.replace('~', "~0").replace('/', "~1");
                    return Err(DataError {
                        field: format!("{}/{name}", err.instance_path()),
                        problem: "is required and missing".into(),
                    });
                }
                _ => without_value(&err.to_string(), err.instance()),
            };
            return Err(DataError {
                field: err.instance_path().to_string(),
                problem,
            });
        }
        Ok(())
    }

    fn check_readable(&self, version: u16) -> Result<(), PayloadError> {
        match self.readable.contains(&version) {
            true => Ok(()),
            false => Err(PayloadError::UnknownVersion {
                kind: self.name.to_owned(),
                version,
                readable: self.readable,
            }),
        }
    }

    /// Decodes a payload of any readable version into JSON of this version.
    pub fn decode(&self, version: u16, payload: &[u8]) -> Result<Value, PayloadError> {
        self.check_readable(version)?;
        (self.decode)(version == self.version, version, payload).map_err(|problem| {
            PayloadError::Invalid {
                kind: self.name.to_owned(),
                version,
                problem,
            }
        })
    }

    /// The schema derived from the payload type. A test keeps `schema` equal to it, so the
    /// shipped contract and the code cannot drift apart.
    pub fn derived_schema(&self) -> Value {
        (self.derived_schema)(self.name, self.version)
    }

    /// The schema's one-line description (the payload type's doc comment).
    pub fn description(&self) -> String {
        serde_json::from_str::<Value>(self.schema)
            .ok()
            .and_then(|s| s["description"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// jsonschema's messages begin with the offending value; a refusal must name the field and the
/// rule, never echo the value (it may be a secret, or a megabyte).
fn without_value(message: &str, value: &Value) -> String {
    match message.strip_prefix(value.to_string().as_str()) {
        Some(rest) => format!("the value{rest}"),
        None => message.to_owned(),
    }
}

/// Decodes a stored payload by kind name and version.
pub fn decode(kind: &str, version: u16, payload: &[u8]) -> Result<Value, PayloadError> {
    lookup(kind)
        .ok_or_else(|| PayloadError::UnknownKind(kind.to_owned()))?
        .decode(version, payload)
}

/// Archives a payload value.
fn to_payload<T>(value: &T) -> Vec<u8>
where
    T: for<'a> rkyv::Serialize<HighSerializer<Vec<u8>, ArenaHandle<'a>, rancor::Error>>,
{
    // Written into a buffer the thread keeps, then copied out at its size: grown from empty for
    // each payload, the reallocations were half of this function's samples in the serve bench.
    use std::cell::Cell;
    thread_local!(static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) });
    /// A buffer grown past this (by a large payload) is not kept.
    const SCRATCH_KEPT_BYTES: usize = 64 * 1024;
    let scratch = SCRATCH.take();
    let mut written = rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, scratch)
        .expect("serializing an owned payload into memory cannot fail");
    let payload = written.as_slice().to_vec();
    if written.capacity() <= SCRATCH_KEPT_BYTES {
        written.clear();
        SCRATCH.set(written);
    }
    payload
}

/// Checks and unarchives a payload.
fn from_payload<T>(bytes: &[u8]) -> Result<T, String>
where
    T: rkyv::Archive,
    T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    rkyv::from_bytes::<T, rancor::Error>(bytes).map_err(|e| e.to_string())
}

/// Reads free-form JSON (`meta`, a config value) from a deserializer straight into canonical text
/// (sorted keys, no spaces): equal to [`canonical_json`] of the `Value` it would build, without
/// building one. A payload is read from the request's `Value`, whose maps come in key order, so
/// the text is written as it is read; a map whose keys come out of order (or twice) is read back
/// and sorted. In the serve bench's profile, building the `Value` and then its text took a tenth of
/// the request threads' samples, for a two-key `meta`.
fn canonical_json_from<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
    use std::borrow::Cow;

    /// Writes the value it reads, canonical, at the end of the buffer.
    struct Canonical<'b>(&'b mut Vec<u8>);

    /// An object key, borrowed from the input where the deserializer allows.
    struct Key;

    impl<'de> DeserializeSeed<'de> for Key {
        type Value = Cow<'de, str>;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for Key {
        type Value = Cow<'de, str>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object key")
        }
        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(v))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v.to_owned()))
        }
        fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v))
        }
    }

    impl Canonical<'_> {
        fn write(&mut self, value: &(impl serde::Serialize + ?Sized)) {
            serde_json::to_writer(&mut *self.0, value).expect("writing JSON into memory");
        }
    }

    impl<'de> DeserializeSeed<'de> for Canonical<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Canonical<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            self.0.extend_from_slice(b"null");
            Ok(())
        }
        fn visit_none<E>(self) -> Result<(), E> {
            self.0.extend_from_slice(b"null");
            Ok(())
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
        fn visit_bool<E>(mut self, v: bool) -> Result<(), E> {
            self.write(&v);
            Ok(())
        }
        fn visit_i64<E>(mut self, v: i64) -> Result<(), E> {
            self.write(&v);
            Ok(())
        }
        fn visit_u64<E>(mut self, v: u64) -> Result<(), E> {
            self.write(&v);
            Ok(())
        }
        fn visit_f64<E>(mut self, v: f64) -> Result<(), E> {
            // As a `Value` holds it: a number, or null where JSON has none.
            self.write(&Value::from(v));
            Ok(())
        }
        fn visit_str<E>(mut self, v: &str) -> Result<(), E> {
            self.write(v);
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            self.0.push(b'[');
            let mut first = true;
            loop {
                let comma = self.0.len();
                if !first {
                    self.0.push(b',');
                }
                if seq.next_element_seed(Canonical(self.0))?.is_none() {
                    self.0.truncate(comma);
                    break;
                }
                first = false;
            }
            self.0.push(b']');
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let start = self.0.len();
            self.0.push(b'{');
            let mut last: Option<Cow<'de, str>> = None;
            let mut in_order = true;
            while let Some(key) = map.next_key_seed(Key)? {
                if let Some(last) = &last {
                    in_order &= last.as_ref() < key.as_ref();
                    self.0.push(b',');
                }
                Canonical(self.0).write(key.as_ref());
                self.0.push(b':');
                map.next_value_seed(Canonical(self.0))?;
                last = Some(key);
            }
            self.0.push(b'}');
            if !in_order {
                // Its values are canonical already: reading it back sorts its keys, and keeps
                // the last of a repeated key, as a `Value` read from the same input would.
                let object: Value = serde_json::from_slice(&self.0[start..])
                    .expect("the text just written is JSON");
                self.0.truncate(start);
                self.0.extend_from_slice(canonical_json(&object).as_bytes());
            }
            Ok(())
        }
    }

    let mut out = Vec::new();
    Canonical(&mut out).deserialize(d)?;
    Ok(String::from_utf8(out).expect("JSON text is UTF-8"))
}

/// Serializes free-form JSON in canonical form (sorted keys, no spaces), without copying it: maps
/// already in key order (serde_json's are) are written as they are.
fn canonical_json(value: &Value) -> String {
    struct Sorted<'a>(&'a Value);

    impl serde::Serialize for Sorted<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::{SerializeMap, SerializeSeq};
            match self.0 {
                Value::Object(map) => {
                    let mut out = s.serialize_map(Some(map.len()))?;
                    if map.keys().is_sorted() {
                        for (k, v) in map {
                            out.serialize_entry(k, &Sorted(v))?;
                        }
                    } else {
                        let mut entries: Vec<_> = map.iter().collect();
                        entries.sort_by(|a, b| a.0.cmp(b.0));
                        for (k, v) in entries {
                            out.serialize_entry(k, &Sorted(v))?;
                        }
                    }
                    out.end()
                }
                Value::Array(items) => {
                    let mut out = s.serialize_seq(Some(items.len()))?;
                    for v in items {
                        out.serialize_element(&Sorted(v))?;
                    }
                    out.end()
                }
                other => other.serialize(s),
            }
        }
    }
    serde_json::to_string(&Sorted(value)).expect("a JSON value serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_compiles_and_names_its_kind() {
        for kind in CATALOGUE.iter().chain(SUPERSEDED) {
            assert!(VALIDATORS.contains_key(&(kind.name, kind.version)));
            let schema: Value = serde_json::from_str(kind.schema).unwrap();
            let title = schema["title"].as_str().unwrap();
            assert_eq!(title, format!("{} v{}", kind.name, kind.version));
            assert_eq!(schema["additionalProperties"], false, "{title}");
        }
        for kind in CATALOGUE {
            assert_eq!(kind.readable.last(), Some(&kind.version));
            assert_eq!(lookup(kind.name).map(|k| k.version), Some(kind.version));
        }
    }

    #[test]
    fn a_serde_path_becomes_a_json_pointer() {
        let data = serde_json::json!({"steps": [{"name": "a/b", "x": 1}]});
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Step {
            name: String,
            x: String,
        }
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Def {
            steps: Vec<Step>,
        }
        let err = serde_path_to_error::deserialize::<_, Def>(&data)
            .err()
            .unwrap();
        assert_eq!(pointer(err.path()), "/steps/0/x");
    }

    #[test]
    fn string_patterns_refuse_what_they_exclude() {
        let spec = lookup("vault.recipient_added").unwrap();
        let good = serde_json::json!({
            "recipient_id": "r1", "device_id": "d1", "label": "laptop",
            "public_key": format!("age1{}", "q".repeat(58)),
            "fingerprint": crate::vault::fingerprint(&format!("age1{}", "q".repeat(58))),
        });
        assert!(spec.encode(&good).is_ok());
        for (field, bad) in [
            ("/recipient_id", serde_json::json!("a\u{7}b")),
            ("/device_id", serde_json::json!("d\u{7f}")),
            ("/label", serde_json::json!("line\nbreak")),
            (
                "/public_key",
                serde_json::json!(format!("age1{}", "b".repeat(58))),
            ),
            ("/fingerprint", serde_json::json!("AB".repeat(32))),
        ] {
            let mut data = good.clone();
            data[&field[1..]] = bad;
            let err = spec.encode(&data).unwrap_err();
            assert_eq!(err.field, field, "{err:?}");
        }
    }

    #[test]
    fn canonical_json_read_from_a_deserializer_equals_that_of_the_value_it_would_build() {
        let texts = [
            r#"{"b":1,"a":{"d":[{"z":1,"y":2}],"c":null}}"#,
            r#"{"a":1,"a":2,"b":[]}"#,
            r#"{"z":{"b":"x\"\u0001é","a":[1.5,-2,1e300,0.1]},"y":true,"":false}"#,
            r#"[{"b":{},"a":[[],{}]},"s",18446744073709551615,-9223372036854775808]"#,
            r#""just a string""#,
            "3.0",
        ];
        for text in texts {
            let value: Value = serde_json::from_str(text).unwrap();
            let expected = canonical_json(&value);
            assert_eq!(canonical_json_from(&value).unwrap(), expected, "{text}");
            assert_eq!(
                canonical_json_from(value.clone()).unwrap(),
                expected,
                "{text}"
            );
            let de = &mut serde_json::Deserializer::from_str(text);
            assert_eq!(canonical_json_from(de).unwrap(), expected, "{text}");
        }
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let v: Value =
            serde_json::from_str(r#"{"b":1,"a":{"d":[{"z":1,"y":2}],"c":null}}"#).unwrap();
        assert_eq!(
            canonical_json(&v),
            r#"{"a":{"c":null,"d":[{"y":2,"z":1}]},"b":1}"#
        );
    }
}
