//! The OpenClaw stores of `openclaw-persistence.md`: auth profiles, sessions and config. A
//! credential never enters the log: profiles and secret-looking config values carry a vault
//! reference instead.

use super::types::{ConfigPath, Id, Json, Label, Text, VaultRef};
use super::{DataError, Payload};

choices! {
    /// How an auth profile authenticates.
    pub enum AuthMode { ApiKey, Oauth }
}

payloads! {
    /// An agent's auth profile was created or replaced (`auth-profiles.json`).
    pub struct AuthProfileUpserted {
        pub agent_id: Id,
        /// `provider:profileId`.
        pub profile_id: Id,
        pub provider: Label,
        pub mode: AuthMode,
        /// Where the key or tokens are kept.
        pub credential_ref: VaultRef,
        pub expires_at_ms: Option<u64>,
        pub email: Option<Label>,
    }

    /// A session was created (`sessions.json`).
    pub struct SessionCreated {
        pub session_id: Id,
        /// The routing key.
        pub session_key: Id,
        pub agent_id: Option<Id>,
        pub session_file: Option<Text>,
    }

    /// A session's entry changed; absent fields are unchanged.
    #[schemars(extend("minProperties" = 2))]
    pub struct SessionUpdated {
        pub session_id: Id,
        pub session_key: Option<Id>,
        pub session_file: Option<Text>,
    }

    /// A config value was set (`setConfigValueAtPath`), globally or for one agent.
    pub struct ConfigValueSet {
        pub path: ConfigPath,
        pub value: Json,
        /// Set for a per-agent override.
        pub agent_id: Option<Id>,
    }
}

/// Path segments under which a value is a credential.
const SECRET_WORDS: [&str; 6] = ["key", "token", "secret", "password", "credential", "auth"];

impl Payload for AuthProfileUpserted {}
impl Payload for SessionCreated {}

impl Payload for SessionUpdated {
    fn check(&self) -> Result<(), DataError> {
        match self.session_key.is_some() || self.session_file.is_some() {
            true => Ok(()),
            false => Err(DataError::whole("names no field to change")),
        }
    }
}

impl Payload for ConfigValueSet {
    /// A value at a secret-looking path (`memory.embedding.apiKey`) must be a vault reference.
    fn check(&self) -> Result<(), DataError> {
        let last = self.path.0.rsplit('.').next().unwrap_or_default();
        let last = last.to_ascii_lowercase();
        if !SECRET_WORDS.iter().any(|w| last.contains(w)) {
            return Ok(());
        }
        let value: serde_json::Value = serde_json::from_str(&self.value.0).unwrap_or_default();
        match value.as_str() {
            Some(s) if s.starts_with("vault:") => Ok(()),
            _ => Err(DataError::at(
                "/value",
                "is at a secret-looking path, so it must be a vault reference \"vault:<entry_id>\", not the secret",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::kinds::lookup;

    #[test]
    fn a_secret_looking_config_value_must_be_a_vault_reference() {
        let kind = lookup("openclaw.config_value_set").unwrap();
        let plain = json!({"path": "memory.embedding.apiKey", "value": "sk-proj-abc"});
        let err = kind.encode(&plain).unwrap_err();
        assert_eq!(err.field, "/value");
        assert!(!err.to_string().contains("sk-proj"), "{err}");
        let nested = json!({"path": "gateway.auth", "value": {"token": "t0k3n"}});
        assert_eq!(kind.encode(&nested).unwrap_err().field, "/value");
        kind.encode(&json!({"path": "memory.embedding.apiKey", "value": "vault:openai"}))
            .unwrap();
        kind.encode(&json!({"path": "gateway.port", "value": 18789}))
            .unwrap();
    }

    #[test]
    fn an_auth_profile_carries_a_vault_reference_not_a_key() {
        let kind = lookup("openclaw.auth_profile_upserted").unwrap();
        let data = json!({
            "agent_id": "main", "profile_id": "openai:default", "provider": "openai",
            "mode": "api_key", "credential_ref": "sk-proj-abc",
        });
        assert_eq!(kind.encode(&data).unwrap_err().field, "/credential_ref");
    }
}
