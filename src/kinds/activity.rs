//! `activity.logged`: one row of the seed's append-only `activity_log`.

use super::types::{JsonObject, Label, NonEmptyText};
use super::Payload;

payloads! {
    /// Something significant happened, for the orchestration board's activity feed.
    pub struct Logged {
        pub message: NonEmptyText,
        /// The program that logged it, such as `cli` or `loom`.
        pub source: Option<Label>,
        /// Free-form details.
        pub meta: Option<JsonObject>,
    }
}

impl Payload for Logged {}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::kinds::lookup;

    #[test]
    fn meta_is_kept_in_canonical_form() {
        let kind = lookup("activity.logged").unwrap();
        let data = json!({"message": "m", "meta": {"z": [1, {"b": 2, "a": 1}], "a": "x"}});
        let payload = kind.encode(&data).unwrap();
        assert_eq!(kind.decode(1, &payload).unwrap(), data);
        let reordered = json!({"meta": {"a": "x", "z": [1, {"a": 1, "b": 2}]}, "message": "m"});
        assert_eq!(kind.encode(&reordered).unwrap(), payload);
    }

    #[test]
    fn refusals_never_echo_the_value() {
        let kind = lookup("activity.logged").unwrap();
        let secret = "sk-live-0123456789abcdef".repeat(3000);
        let err = kind.encode(&json!({ "message": secret })).unwrap_err();
        assert_eq!(err.field, "/message");
        assert!(!err.to_string().contains("sk-live"), "{err}");
        assert!(err.problem.contains("longer than 65536"), "{err}");
        let err = kind
            .encode(&json!({"message": "m", "meta": []}))
            .unwrap_err();
        assert_eq!(err.field, "/meta");
    }

    #[test]
    fn nul_characters_are_refused() {
        let kind = lookup("activity.logged").unwrap();
        let err = kind.encode(&json!({"message": "a\u{0}b"})).unwrap_err();
        assert_eq!(err.field, "/message");
    }

    #[test]
    fn garbage_payload_is_an_error() {
        let kind = lookup("activity.logged").unwrap();
        assert!(kind.decode(1, &[1, 2, 3]).is_err());
        assert!(kind.decode(2, &[]).is_err());
    }
}
