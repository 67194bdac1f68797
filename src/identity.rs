//! A node's identity: its ed25519 signing key, the origin bound to that key, and signed heads.
//!
//! Invariants: a node's origin is [`origin_of`] its public key, so anyone holding the key can
//! check that an origin's events are its own; a [`SignedHead`] names (origin, seq, hash) and
//! verifies only under the key its origin is bound to (strict verification: no malleable
//! signatures, no weak keys); the secret key lives only in the home's `node.key` (mode 0600),
//! is never formatted (`Debug` shows the public key) and never leaves this module as bytes.
//!
//! Boundary: the only module that imports ed25519-dalek. Knows nothing of the log or the wire.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use crate::event::{Hash, Origin};

/// A node's public key (ed25519, compressed).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Reads 64 hex digits; `Err` says what is wrong without echoing the text.
    pub fn from_hex(text: &str) -> Result<PublicKey, IdentityError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes)
            .map_err(|_| IdentityError::BadPublicKey("not 64 hex digits".into()))?;
        VerifyingKey::from_bytes(&bytes)
            .map_err(|_| IdentityError::BadPublicKey("not an ed25519 public key".into()))?;
        Ok(PublicKey(bytes))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The origin bound to `key`: the first 16 bytes of a blake3 key derivation over it.
pub fn origin_of(key: &PublicKey) -> Origin {
    let derived = blake3::derive_key("spool 2026 origin of a node key", &key.0);
    Origin(derived[..16].try_into().expect("16 of 32 bytes"))
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a node key ({problem})")]
    BadKeyFile { path: String, problem: String },
    #[error("{path}: the node key is readable by others (mode {mode:o}); `chmod 600 {path}`")]
    Exposed { path: String, mode: u32 },
    #[error("public key: {0}")]
    BadPublicKey(String),
    #[error("origin {origin} seq {seq}: the signature does not verify under the origin's key")]
    BadSignature { origin: Origin, seq: u64 },
    #[error("origin {origin}: the key offered is bound to origin {bound}, not to it")]
    WrongKey { origin: Origin, bound: Origin },
}

/// What a node key file holds: a line naming the format, then the secret key's 64 hex digits.
const KEY_FILE_HEADER: &str = "spool node key v1";

/// A node's signing key.
pub struct NodeKey {
    key: SigningKey,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey(public {})", self.public())
    }
}

impl NodeKey {
    /// The key with these secret bytes (a test's fixed key; a node's comes from [`generate`]).
    ///
    /// [`generate`]: NodeKey::generate
    pub fn from_secret(secret: [u8; 32]) -> NodeKey {
        NodeKey {
            key: SigningKey::from_bytes(&secret),
        }
    }

    /// A new key from the operating system's randomness.
    pub fn generate() -> NodeKey {
        let secret: [u8; 32] = rand::random();
        NodeKey {
            key: SigningKey::from_bytes(&secret),
        }
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key().to_bytes())
    }

    /// The secret key as PKCS#8 (DER), for the TLS stack of peer connections (`peertls`);
    /// it never leaves the process.
    pub fn to_pkcs8_der(&self) -> Vec<u8> {
        use ed25519_dalek::pkcs8::EncodePrivateKey as _;
        self.key
            .to_pkcs8_der()
            .map(|document| document.as_bytes().to_vec())
            .expect("an ed25519 key always encodes")
    }

    /// A secret for `context` derived from this key (blake3's key derivation): one key, many
    /// purposes, none revealing another.
    pub fn derive(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, self.key.as_bytes())
    }

    /// The origin bound to this key.
    pub fn origin(&self) -> Origin {
        origin_of(&self.public())
    }

    /// Writes the key to a new file at `path`, readable by its owner only, and syncs it.
    pub fn save_new(&self, path: &Path) -> Result<(), IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let text = format!("{KEY_FILE_HEADER}\n{}\n", hex::encode(self.key.to_bytes()));
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// Reads the key at `path`; refuses one that others may read, or that is not a key file
    /// (saying what is wrong, never what it holds).
    pub fn load(path: &Path) -> Result<NodeKey, IdentityError> {
        let name = path.display().to_string();
        let io = |source| IdentityError::Io {
            path: name.clone(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Exposed { path: name, mode });
        }
        let bad = |problem: &str| IdentityError::BadKeyFile {
            path: name.clone(),
            problem: problem.to_owned(),
        };
        // A key file is under 100 bytes: never read more than a little past that.
        let mut text = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(std::fs::File::open(path).map_err(io)?, 257),
            &mut text,
        )
        .map_err(io)?;
        if text.len() > 256 {
            return Err(bad("longer than a key file"));
        }
        let text = std::str::from_utf8(&text).map_err(|_| bad("not text"))?;
        let mut lines = text.lines();
        if lines.next() != Some(KEY_FILE_HEADER) {
            return Err(bad("its first line is not the key file's header"));
        }
        let mut secret = [0u8; 32];
        hex::decode_to_slice(lines.next().unwrap_or_default().trim(), &mut secret)
            .map_err(|_| bad("its second line is not 64 hex digits"))?;
        Ok(NodeKey {
            key: SigningKey::from_bytes(&secret),
        })
    }

    /// Signs this node's head: its origin, the head's seq and the head event's hash.
    pub fn sign_head(&self, seq: u64, hash: Hash) -> SignedHead {
        let origin = self.origin();
        let signature = self.key.sign(&SignedHead::message(origin, seq, hash));
        SignedHead {
            origin,
            seq,
            hash,
            signature: signature.to_bytes(),
        }
    }
}

/// An origin's head (seq and the hash of its event there) signed by the origin's key: through
/// the chain of `prev` hashes it vouches for every event of the origin up to `seq`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignedHead {
    pub origin: Origin,
    pub seq: u64,
    pub hash: Hash,
    pub signature: [u8; 64],
}

impl std::fmt::Debug for SignedHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SignedHead({} seq {} {})",
            self.origin,
            self.seq,
            self.hash.to_hex()
        )
    }
}

impl SignedHead {
    /// The bytes signed: a context string, then origin, seq (LE) and hash.
    fn message(origin: Origin, seq: u64, hash: Hash) -> Vec<u8> {
        let mut message = b"spool 2026 signed head\0".to_vec();
        message.extend_from_slice(&origin.0);
        message.extend_from_slice(&seq.to_le_bytes());
        message.extend_from_slice(&hash.0);
        message
    }

    /// Checks the signature under `key`, which must be the key the origin is bound to.
    pub fn verify(&self, key: &PublicKey) -> Result<(), IdentityError> {
        let bound = origin_of(key);
        if bound != self.origin {
            return Err(IdentityError::WrongKey {
                origin: self.origin,
                bound,
            });
        }
        let bad = || IdentityError::BadSignature {
            origin: self.origin,
            seq: self.seq,
        };
        let key = VerifyingKey::from_bytes(&key.0).map_err(|_| bad())?;
        let signature = Signature::from_bytes(&self.signature);
        key.verify_strict(
            &SignedHead::message(self.origin, self.seq, self.hash),
            &signature,
        )
        .map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_head_verifies_under_its_key_only() {
        let key = NodeKey::generate();
        let head = key.sign_head(7, Hash([3; 32]));
        assert_eq!(head.origin, key.origin());
        head.verify(&key.public()).unwrap();

        let mut later = head;
        later.seq = 8;
        assert!(matches!(
            later.verify(&key.public()),
            Err(IdentityError::BadSignature { seq: 8, .. })
        ));
        let mut other_hash = head;
        other_hash.hash = Hash([4; 32]);
        assert!(other_hash.verify(&key.public()).is_err());
        let mut flipped = head;
        flipped.signature[10] ^= 1;
        assert!(flipped.verify(&key.public()).is_err());

        // Another member's key cannot vouch for this origin, nor re-sign it as its own.
        let other = NodeKey::generate();
        assert!(matches!(
            head.verify(&other.public()),
            Err(IdentityError::WrongKey { .. })
        ));
        let mut resigned = other.sign_head(7, Hash([3; 32]));
        resigned.origin = head.origin;
        assert!(resigned.verify(&key.public()).is_err());
    }

    #[test]
    fn a_key_file_is_private_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let key = NodeKey::generate();
        key.save_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = NodeKey::load(&path).unwrap();
        assert_eq!(loaded.public(), key.public());
        assert!(
            key.save_new(&path).is_err(),
            "an existing key is never replaced"
        );

        let secret = std::fs::read_to_string(&path).unwrap();
        let secret = secret.lines().nth(1).unwrap();
        assert!(!format!("{key:?}").contains(secret));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = NodeKey::load(&path).unwrap_err();
        assert!(
            matches!(err, IdentityError::Exposed { mode: 0o640, .. }),
            "{err}"
        );

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "spool node key v1\nnot hex at all\n").unwrap();
        let err = NodeKey::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("64 hex digits") && !err.contains("not hex at all"),
            "{err}"
        );
    }

    #[test]
    fn a_public_key_is_checked_and_binds_one_origin() {
        let key = NodeKey::generate();
        let public = PublicKey::from_hex(&key.public().to_hex()).unwrap();
        assert_eq!(origin_of(&public), key.origin());
        assert_ne!(origin_of(&NodeKey::generate().public()), key.origin());
        assert!(PublicKey::from_hex("zz").is_err());
        assert!(PublicKey::from_hex(&"ab".repeat(31)).is_err());
    }
}
