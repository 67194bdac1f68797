//! `activity.logged`: one row of the seed's append-only `activity_log`.

use std::sync::OnceLock;

use serde_json::{Map, Value};

use super::{canonical_json, from_payload, to_payload, KindSpec};

pub static LOGGED: KindSpec = KindSpec {
    name: "activity.logged",
    version: 1,
    readable: &[1],
    schema: include_str!("../../schemas/activity.logged/v1.schema.json"),
    encode: encode_logged,
    decode: decode_logged,
    validator: {
        static V: OnceLock<jsonschema::Validator> = OnceLock::new();
        &V
    },
};

/// JSON form (what clients send).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LoggedJson {
    message: String,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    meta: Option<Map<String, Value>>,
}

/// Archived form, v1. Frozen.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct LoggedV1 {
    message: String,
    source: Option<String>,
    /// Canonical JSON text of the `meta` object.
    meta: Option<String>,
}

fn encode_logged(data: &Value) -> Result<Vec<u8>, String> {
    let json: LoggedJson = serde_json::from_value(data.clone()).map_err(|e| e.to_string())?;
    Ok(to_payload(&LoggedV1 {
        message: json.message,
        source: json.source,
        meta: json.meta.map(|m| canonical_json(&Value::Object(m))),
    }))
}

fn decode_logged(_version: u16, payload: &[u8]) -> Result<Value, String> {
    let v: LoggedV1 = from_payload(payload)?;
    let mut out = Map::new();
    out.insert("message".into(), Value::String(v.message));
    if let Some(source) = v.source {
        out.insert("source".into(), Value::String(source));
    }
    if let Some(meta) = v.meta {
        let meta: Value = serde_json::from_str(&meta).map_err(|e| format!("meta: {e}"))?;
        out.insert("meta".into(), meta);
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_json_through_the_payload() {
        let data =
            json!({"message": "board refreshed", "source": "cli", "meta": {"z": [1, 2], "a": "x"}});
        let payload = LOGGED.encode(&data).unwrap();
        assert_eq!(LOGGED.decode(1, &payload).unwrap(), data);
        let minimal = json!({"message": "m"});
        assert_eq!(
            LOGGED.decode(1, &LOGGED.encode(&minimal).unwrap()).unwrap(),
            minimal
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (json!({"message": 5}), "/message"),
            (json!({"message": ""}), "/message"),
            (json!({"message": "m", "meta": []}), "/meta"),
            (json!({"message": "m", "colour": "red"}), ""),
            (json!({"source": "cli"}), ""),
            (json!("just a string"), ""),
        ];
        for (data, field) in cases {
            let err = LOGGED.encode(&data).unwrap_err();
            assert_eq!(err.field, field, "{data}: {err}");
        }
        let err = LOGGED
            .encode(&json!({"message": "m", "colour": "red"}))
            .unwrap_err();
        assert!(err.problem.contains("colour"), "{err}");
        let err = LOGGED.encode(&json!({"source": "cli"})).unwrap_err();
        assert!(err.problem.contains("message"), "{err}");
    }

    #[test]
    fn refusals_never_echo_the_value() {
        let secret = "sk-live-0123456789abcdef".repeat(3000);
        let err = LOGGED.encode(&json!({ "message": secret })).unwrap_err();
        assert_eq!(err.field, "/message");
        assert!(!err.to_string().contains("sk-live"), "{err}");
        assert!(err.problem.contains("longer than 65536"), "{err}");
        let err = LOGGED.encode(&json!({"message": 12345})).unwrap_err();
        assert!(!err.to_string().contains("12345"), "{err}");
        assert!(err.problem.contains("not of type \"string\""), "{err}");
    }

    #[test]
    fn garbage_payload_is_an_error() {
        assert!(LOGGED.decode(1, &[1, 2, 3]).is_err());
        assert!(LOGGED.decode(2, &[]).is_err());
    }
}
