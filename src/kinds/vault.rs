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

    /// An entry was removed from the vault: its row keeps no ciphertext from here on. The log
    /// keeps what was written before (it is immutable), so rotating the secret is what makes
    /// an old copy useless.
    pub struct EntryRemoved {
        pub entry_id: Id,
        pub reason: Option<Text>,
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
impl Payload for RecipientAdded {
    /// The fingerprint is the key's: a fingerprint that names no key would let an entry list a
    /// recipient nobody can be.
    fn check(&self) -> Result<(), super::DataError> {
        if crate::vault::fingerprint(&self.public_key.0) != self.fingerprint.0 {
            return Err(super::DataError::at(
                "/fingerprint",
                "is not the fingerprint of public_key (blake3 of its age1 text, hex)",
            ));
        }
        Ok(())
    }
}
impl Payload for RecipientRemoved {}
impl Payload for EntryRemoved {}
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

/// A change an applied event makes to the vault's recipients: the fingerprint registered
/// (`vault.recipient_added`) or removed (`vault.recipient_removed`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    pub fingerprint: String,
    pub active: bool,
}

impl Registered {
    /// The change an event makes, if it makes one. A payload that does not decode (the log
    /// checked it when it was written) makes none.
    pub fn of(kind: &str, version: u16, payload: &[u8]) -> Option<Registered> {
        let active = match kind {
            "vault.recipient_added" => true,
            "vault.recipient_removed" => false,
            _ => return None,
        };
        let value = super::decode(kind, version, payload).ok()?;
        Some(Registered {
            fingerprint: value["fingerprint"].as_str()?.to_owned(),
            active,
        })
    }
}

/// The vault's recipients as a node's writer has applied their events: every fingerprint ever
/// registered, and whether its latest event (in this node's apply order) removed it. The
/// writer refuses a new entry, or a rewrap, that lists a fingerprint no current recipient has.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recipients {
    /// Fingerprint → still registered.
    fingerprints: std::collections::BTreeMap<String, bool>,
}

impl Recipients {
    /// Takes in an applied change; says whether it changed anything.
    pub fn observe(&mut self, change: &Registered) -> bool {
        self.fingerprints
            .insert(change.fingerprint.clone(), change.active)
            != Some(change.active)
    }

    /// Why a new event may not be written: an entry (written or rewrapped) listing a
    /// fingerprint that is not a current recipient's. Other events pass.
    pub fn refuses(&self, kind: &str, version: u16, payload: &[u8]) -> Option<super::DataError> {
        if kind != "vault.entry_written" && kind != "vault.entry_rewrapped" {
            return None;
        }
        let value = super::decode(kind, version, payload).ok()?;
        let listed = value["recipients"].as_array()?;
        listed.iter().enumerate().find_map(|(i, fingerprint)| {
            let problem = match self.fingerprints.get(fingerprint.as_str()?) {
                Some(true) => return None,
                Some(false) => "is the fingerprint of a removed vault recipient",
                None => "is not the fingerprint of a registered vault recipient",
            };
            Some(super::DataError::at(&format!("/recipients/{i}"), problem))
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a map of strings serialises")
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Recipients> {
        serde_json::from_slice(bytes).ok()
    }
}

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
