//! Field types shared by payloads: each is a string or JSON value with the constraint of its
//! JSON Schema, archived as a plain string so the archive stays the simplest layout.
//!
//! The schema is the only place a constraint lives: `KindSpec::encode` validates against it
//! before deserializing, and `Payload::check` adds what a schema cannot say.

use std::borrow::Cow;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::canonical_json_from;

macro_rules! string_type {
    ($(#[$doc:meta])* $name:ident, $schema:tt) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
        #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl JsonSchema for $name {
            fn inline_schema() -> bool {
                true
            }
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!($schema)
            }
        }
    };
}

string_type!(
    /// An identifier: a UUID, a slug, a host name.
    Id,
    {"type": "string", "minLength": 1, "maxLength": 256, "pattern": "^[^\\u0000-\\u001f\\u007f]+$"}
);
string_type!(
    /// A short label: a lane, a status, a model, a tag.
    Label,
    {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[^\\u0000-\\u001f\\u007f]+$"}
);
string_type!(
    /// A one-line title.
    Title,
    {"type": "string", "minLength": 1, "maxLength": 512, "pattern": "^[^\\u0000-\\u001f\\u007f]+$"}
);
string_type!(
    /// Free text up to 64 KiB characters.
    Text,
    {"type": "string", "maxLength": 65536, "pattern": "^[^\\u0000]*$"}
);
string_type!(
    /// Free text that must not be empty.
    NonEmptyText,
    {"type": "string", "minLength": 1, "maxLength": 65536, "pattern": "^[^\\u0000]*$"}
);
string_type!(
    /// The last 4 KiB of a program's output.
    Tail,
    {"type": "string", "maxLength": 4096, "pattern": "^[^\\u0000]*$"}
);
string_type!(
    /// An age-encrypted file in ASCII armor, as the vault client produces it. Never plaintext.
    AgeArmor,
    {
        "type": "string",
        "maxLength": 1048576,
        "pattern": "^-----BEGIN AGE ENCRYPTED FILE-----\\r?\\n[A-Za-z0-9+/=\\r\\n]+-----END AGE ENCRYPTED FILE-----\\r?\\n?$"
    }
);
string_type!(
    /// An age X25519 recipient (public key), `age1` and 58 bech32 characters.
    AgeRecipient,
    {"type": "string", "pattern": "^age1[02-9ac-hj-np-z]{58}$"}
);
string_type!(
    /// 32 bytes as 64 lowercase hex digits: a key fingerprint (blake3 of the recipient or public
    /// key string), a keyed hash, an Ed25519 public key.
    Hex32,
    {"type": "string", "pattern": "^[0-9a-f]{64}$"}
);
string_type!(
    /// A salt: 16 to 64 bytes as lowercase hex.
    Salt,
    {"type": "string", "pattern": "^([0-9a-f]{2}){16,64}$"}
);
string_type!(
    /// A reference to a vault entry, `vault:<entry_id>`: where a credential lives instead of the
    /// credential itself.
    VaultRef,
    {"type": "string", "maxLength": 262, "pattern": "^vault:[^\\u0000-\\u001f\\u007f]+$"}
);
string_type!(
    /// A dotted config path such as `memory.embedding.model`.
    ConfigPath,
    {"type": "string", "maxLength": 512, "pattern": "^[A-Za-z0-9_$-]+(\\.[A-Za-z0-9_$-]+)*$"}
);

/// Any JSON value, stored as canonical JSON text (keys sorted, no spaces) so equal values have
/// equal bytes.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Json(pub String);

/// A JSON object, stored like [`Json`].
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JsonObject(pub String);

macro_rules! json_type {
    ($name:ident, $schema:tt) => {
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let value: Value =
                    serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
                value.serialize(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                canonical_json_from(d).map($name)
            }
        }

        impl JsonSchema for $name {
            fn inline_schema() -> bool {
                true
            }
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!($schema)
            }
        }
    };
}

json_type!(Json, {});
json_type!(JsonObject, {"type": "object"});
