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

mod activity;

use std::sync::OnceLock;

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use serde_json::Value;

/// One event kind.
pub struct KindSpec {
    /// `domain.past_tense_verb`.
    pub name: &'static str,
    /// The version `encode` writes and `decode` returns.
    pub version: u16,
    /// Versions `decode` reads (the current one and those with an upcaster).
    pub readable: &'static [u16],
    /// The JSON Schema of the current version, as shipped under `schemas/`.
    pub schema: &'static str,
    /// Typed JSON (already schema-valid) into a payload archive.
    encode: fn(&Value) -> Result<Vec<u8>, String>,
    /// A payload archive of a readable version into JSON of the current version.
    decode: fn(u16, &[u8]) -> Result<Value, String>,
    validator: &'static OnceLock<jsonschema::Validator>,
}

/// Every kind this build knows.
pub static CATALOGUE: &[&KindSpec] = &[&activity::LOGGED];

/// Looks a kind up by name.
pub fn lookup(name: &str) -> Option<&'static KindSpec> {
    CATALOGUE.iter().copied().find(|k| k.name == name)
}

/// Why a client's data was refused. `field` is a JSON pointer into the data (`""` for the whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("data{field}: {problem}")]
pub struct DataError {
    pub field: String,
    pub problem: String,
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
    /// Checks `data` against the schema and encodes it as this kind's current version.
    pub fn encode(&self, data: &Value) -> Result<Vec<u8>, DataError> {
        let validator = self.validator.get_or_init(|| {
            let schema: Value = serde_json::from_str(self.schema)
                .unwrap_or_else(|e| panic!("schema of {} is not JSON: {e}", self.name));
            jsonschema::validator_for(&schema)
                .unwrap_or_else(|e| panic!("schema of {} is not a JSON Schema: {e}", self.name))
        });
        if let Some(err) = validator.iter_errors(data).next() {
            return Err(DataError {
                field: err.instance_path().to_string(),
                problem: without_value(&err.to_string(), err.instance()),
            });
        }
        (self.encode)(data).map_err(|problem| DataError {
            field: String::new(),
            problem,
        })
    }

    /// Decodes a payload of any readable version into JSON of the current version.
    pub fn decode(&self, version: u16, payload: &[u8]) -> Result<Value, PayloadError> {
        if !self.readable.contains(&version) {
            return Err(PayloadError::UnknownVersion {
                kind: self.name.to_owned(),
                version,
                readable: self.readable,
            });
        }
        (self.decode)(version, payload).map_err(|problem| PayloadError::Invalid {
            kind: self.name.to_owned(),
            version,
            problem,
        })
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
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, Vec::new())
        .expect("serializing an owned payload into memory cannot fail")
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

/// Serializes `meta`-like free-form JSON in canonical form (sorted keys, no spaces).
fn canonical_json(value: &Value) -> String {
    fn sort(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sort(v)))
                        .collect(),
                )
            }
            Value::Array(items) => Value::Array(items.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    sort(value).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_compiles_and_names_its_kind() {
        for kind in CATALOGUE {
            let schema: Value = serde_json::from_str(kind.schema).unwrap();
            jsonschema::validator_for(&schema).unwrap();
            let title = schema["title"].as_str().unwrap();
            assert_eq!(title, format!("{} v{}", kind.name, kind.version));
            assert!(kind.readable.contains(&kind.version));
        }
    }

    #[test]
    fn kind_names_are_unique_and_well_formed() {
        let mut names: Vec<_> = CATALOGUE.iter().map(|k| k.name).collect();
        for name in &names {
            let (domain, verb) = name.split_once('.').unwrap();
            assert!(!domain.is_empty() && !verb.is_empty(), "{name}");
            assert!(name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_'));
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CATALOGUE.len());
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
