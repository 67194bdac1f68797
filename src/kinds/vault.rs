//! The vault (OptimalVault: `vault_install`, `vault_recipients`, `vault_entries`,
//! `vault_access_log`). Secrets are age-encrypted on the client to every current recipient
//! before they become an event: payloads carry ciphertext and key fingerprints only, and the
//! schema refuses anything that is not age armor where ciphertext belongs.

use super::types::{AgeArmor, AgeRecipient, Hex32, Id, Label, Salt, Text};
use super::Payload;

choices! {
    /// The key-derivation function of a vault install.
    pub enum Kdf { Argon2id }
}

payloads! {
    /// A vault install chose its key-derivation parameters (the T11 hardening salt).
    pub struct InstallInitialised {
        pub install_id: Id,
        pub kdf: Kdf,
        pub salt: Salt,
        #[schemars(range(min = 8192, max = 4194304))]
        pub memory_kib: u32,
        #[schemars(range(min = 1, max = 64))]
        pub iterations: u32,
        #[schemars(range(min = 1, max = 64))]
        pub parallelism: u32,
    }

    /// An age public key became a vault recipient (one per device and label).
    pub struct RecipientAdded {
        pub recipient_id: Id,
        pub device_id: Id,
        pub label: Label,
        pub public_key: AgeRecipient,
        /// blake3 of the `public_key` string, hex.
        pub fingerprint: Hex32,
    }

    /// A recipient was removed. Entries must then be rewrapped without it; it can still read
    /// ciphertext it already had, so rotating the secret is the real revocation.
    pub struct RecipientRemoved {
        pub recipient_id: Id,
        pub fingerprint: Hex32,
        pub reason: Option<Text>,
    }

    /// A secret entry was written, encrypted to the listed recipients.
    pub struct EntryWritten {
        pub entry_id: Id,
        pub ciphertext: AgeArmor,
        /// Fingerprints of the recipients the ciphertext is encrypted to.
        #[schemars(length(min = 1, max = 64))]
        pub recipients: Vec<Hex32>,
    }

    /// An entry was re-encrypted to a new set of recipients (after one was added or removed).
    pub struct EntryRewrapped {
        pub entry_id: Id,
        pub ciphertext: AgeArmor,
        #[schemars(length(min = 1, max = 64))]
        pub recipients: Vec<Hex32>,
        pub reason: Option<Label>,
    }

    /// A device decrypted an entry (the access log).
    pub struct EntryUnlocked {
        pub entry_id: Id,
        pub device_id: Id,
        /// The recipient key that decrypted it.
        pub recipient: Hex32,
        pub purpose: Option<Text>,
    }
}

impl Payload for InstallInitialised {}
impl Payload for RecipientAdded {}
impl Payload for RecipientRemoved {}
impl Payload for EntryWritten {
    fn check(&self) -> Result<(), super::DataError> {
        entry(&self.ciphertext, &self.recipients)
    }
}
impl Payload for EntryRewrapped {
    fn check(&self) -> Result<(), super::DataError> {
        entry(&self.ciphertext, &self.recipients)
    }
}

/// An entry's ciphertext is an age file whose header names as many recipients as the entry
/// lists (the header does not say who they are: X25519 stanzas carry only an ephemeral key).
fn entry(ciphertext: &AgeArmor, recipients: &[Hex32]) -> Result<(), super::DataError> {
    let named = crate::vault::check_ciphertext(&ciphertext.0)
        .map_err(|_| super::DataError::at("/ciphertext", "is not a parseable age file"))?;
    if named != recipients.len() {
        return Err(super::DataError::at(
            "/recipients",
            &format!(
                "lists {} recipients; the ciphertext's header is encrypted to {named}",
                recipients.len()
            ),
        ));
    }
    Ok(())
}
impl Payload for EntryUnlocked {}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::kinds::lookup;

    const FINGERPRINT: &str = "8cd03722eebe24b3c248b79f88ccc009491c250a8d2f0f91f3478ca10dc19c67";

    #[test]
    fn plaintext_where_ciphertext_belongs_is_refused() {
        let kind = lookup("vault.entry_written").unwrap();
        for plaintext in [
            "sb_secret_abc123",
            "-----BEGIN AGE ENCRYPTED FILE-----\nsecret",
        ] {
            let data =
                json!({"entry_id": "k", "ciphertext": plaintext, "recipients": [FINGERPRINT]});
            let err = kind.encode(&data).unwrap_err();
            assert_eq!(err.field, "/ciphertext", "{err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[test]
    fn an_entry_needs_a_recipient_and_fingerprints_are_hex() {
        let kind = lookup("vault.entry_rewrapped").unwrap();
        let one = crate::vault::Identity::generate().recipient();
        let armor = crate::vault::encrypt(b"s", &[one]).unwrap();
        let armor = armor.as_str();
        let none = json!({"entry_id": "k", "ciphertext": armor, "recipients": []});
        assert_eq!(kind.encode(&none).unwrap_err().field, "/recipients");
        let upper = FINGERPRINT.to_uppercase();
        let bad = json!({"entry_id": "k", "ciphertext": armor, "recipients": [upper]});
        assert_eq!(kind.encode(&bad).unwrap_err().field, "/recipients/0");
        let good = json!({"entry_id": "k", "ciphertext": armor, "recipients": [FINGERPRINT]});
        kind.encode(&good).unwrap();
        // Two recipients listed for a file encrypted to one.
        let more =
            json!({"entry_id": "k", "ciphertext": armor, "recipients": [FINGERPRINT, FINGERPRINT]});
        assert_eq!(kind.encode(&more).unwrap_err().field, "/recipients");
    }

    /// Armor around bytes that are no age file (the defect the issue reproduced).
    #[test]
    fn armor_around_nothing_is_refused() {
        let kind = lookup("vault.entry_written").unwrap();
        let armor = "-----BEGIN AGE ENCRYPTED FILE-----\nAAAA\n-----END AGE ENCRYPTED FILE-----\n";
        let data = json!({"entry_id": "k", "ciphertext": armor, "recipients": [FINGERPRINT]});
        let err = kind.encode(&data).unwrap_err();
        assert_eq!(err.field, "/ciphertext");
        assert!(err.problem.contains("not a parseable age file"), "{err}");
    }
}
