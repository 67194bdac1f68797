//! Device pairing and paired devices (`pairing_tokens`, `devices`). A pairing code is 8
//! characters from A-Z and 2-9 with a 60-minute TTL; only a keyed hash of it is ever stored.

use super::types::{Hex32, Id, Label, Text};
use super::Payload;

choices! {
    /// Why a pairing attempt was refused.
    pub enum AttemptFailure { WrongCode, Expired, AlreadyUsed, TooManyAttempts }
}

payloads! {
    /// The cockpit minted a pairing code for a device.
    pub struct PairingRequested {
        pub pairing_id: Id,
        /// Keyed blake3 of the code, hex. Never the code.
        pub code_hash: Hex32,
        pub user_id: Id,
        pub device_id: Id,
        pub account_id: Option<Id>,
        /// When the code stops working (ms since the Unix epoch).
        pub expires_at_ms: u64,
    }

    /// A device presented the right code in time; the code is used up.
    pub struct PairingCompleted {
        pub pairing_id: Id,
        pub device_id: Id,
    }

    /// A pairing code reached its TTL unused.
    pub struct PairingExpired {
        pub pairing_id: Id,
    }

    /// A pending pairing was withdrawn (by the user, or to keep at most 3 pending).
    pub struct PairingCancelled {
        pub pairing_id: Id,
        pub reason: Option<Text>,
    }

    /// A pairing attempt was refused; too many lock the pairing.
    pub struct PairingAttemptFailed {
        /// The pairing the attempt named, if the code matched any.
        pub pairing_id: Option<Id>,
        pub device_id: Id,
        pub failure: AttemptFailure,
    }

    /// A device was paired, with its capability flags and JWT signing key.
    pub struct DevicePaired {
        pub device_id: Id,
        pub label: Label,
        #[schemars(length(max = 32))]
        pub capabilities: Vec<Label>,
        /// Ed25519 public key, hex.
        pub signing_public_key: Hex32,
        pub pairing_id: Option<Id>,
    }

    /// A device lost its access.
    pub struct DeviceRevoked {
        pub device_id: Id,
        pub reason: Option<Text>,
    }
}

impl Payload for PairingRequested {}
impl Payload for PairingCompleted {}
impl Payload for PairingExpired {}
impl Payload for PairingCancelled {}
impl Payload for PairingAttemptFailed {}
impl Payload for DevicePaired {}
impl Payload for DeviceRevoked {}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::kinds::lookup;

    #[test]
    fn a_pairing_code_itself_is_never_accepted() {
        let kind = lookup("pairing.requested").unwrap();
        let mut data = json!({
            "pairing_id": "p", "code_hash": "ab".repeat(32), "user_id": "u",
            "device_id": "d", "expires_at_ms": 1,
        });
        kind.encode(&data).unwrap();
        data["code"] = json!("K7M2QX9A");
        let err = kind.encode(&data).unwrap_err();
        assert!(err.problem.contains("code"), "{err}");
        assert!(!err.to_string().contains("K7M2QX9A"), "{err}");
        data.as_object_mut().unwrap().remove("code");
        data["code_hash"] = json!("K7M2QX9A");
        assert_eq!(kind.encode(&data).unwrap_err().field, "/code_hash");
    }
}
