//! The vault's cryptography, on the client: age X25519 identities and recipients, entries
//! encrypted to every current recipient as standard armored age files (the `age` command reads
//! them), and a device's identity kept under a passphrase (Argon2id over the install's salt,
//! then ChaCha20-Poly1305). Nothing here writes an event or a file: `cli::vault` does, and only
//! ciphertext and fingerprints ever reach an event.

use std::io::{Read, Write};
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use chacha20poly1305::aead::{Aead, KeyInit};
use zeroize::Zeroizing;

/// The key derivation's parameters, as `vault.install_initialised` records them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kdf {
    pub salt: Vec<u8>,
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Kdf {
    /// A new install's: a random 16-byte salt, 64 MiB, 3 passes, 1 lane (RFC 9106's second
    /// recommended setting).
    pub fn generate() -> Kdf {
        Kdf {
            salt: rand::random::<[u8; 16]>().to_vec(),
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }

    fn key(&self, passphrase: &[u8]) -> Result<Zeroizing<[u8; 32]>, VaultError> {
        let params =
            argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
                .map_err(|e| VaultError::Install(e.to_string()))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut key = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(passphrase, &self.salt, key.as_mut())
            .map_err(|e| VaultError::Install(e.to_string()))?;
        Ok(key)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("the passphrase does not open this device's vault identity")]
    WrongPassphrase,
    #[error("the vault identity file is damaged or not one spool wrote")]
    BadIdentityFile,
    #[error("the install's key derivation: {0}")]
    Install(String),
    #[error("not a recipient: {0}")]
    BadRecipient(String),
    #[error("encrypting: {0}")]
    Encrypt(String),
    #[error("the ciphertext is not an age file this device can read: {0}")]
    Decrypt(String),
}

/// What a sealed identity file begins with.
const SEALED: &[u8] = b"spool vault identity v1\n";

/// A device's identity.
pub struct Identity(age::x25519::Identity);

impl Identity {
    pub fn generate() -> Identity {
        Identity(age::x25519::Identity::generate())
    }

    /// Its public half, `age1…`.
    pub fn recipient(&self) -> String {
        self.0.to_public().to_string()
    }

    /// The identity sealed under `passphrase`: the file's bytes.
    pub fn seal(&self, passphrase: &[u8], kdf: &Kdf) -> Result<Vec<u8>, VaultError> {
        let key = kdf.key(passphrase)?;
        let cipher = chacha20poly1305::ChaCha20Poly1305::new(key.as_ref().into());
        let nonce: [u8; 12] = rand::random();
        let secret = self.0.to_string();
        let sealed = cipher
            .encrypt(&nonce.into(), secret.expose_secret().as_bytes())
            .map_err(|_| VaultError::Encrypt("sealing the identity".into()))?;
        let mut out = SEALED.to_vec();
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a sealed identity file with `passphrase`.
    pub fn open(sealed: &[u8], passphrase: &[u8], kdf: &Kdf) -> Result<Identity, VaultError> {
        let body = sealed
            .strip_prefix(SEALED)
            .filter(|b| b.len() > 12)
            .ok_or(VaultError::BadIdentityFile)?;
        let (nonce, ciphertext) = body.split_at(12);
        let key = kdf.key(passphrase)?;
        let cipher = chacha20poly1305::ChaCha20Poly1305::new(key.as_ref().into());
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| VaultError::BadIdentityFile)?;
        let secret = Zeroizing::new(
            cipher
                .decrypt(&nonce.into(), ciphertext)
                .map_err(|_| VaultError::WrongPassphrase)?,
        );
        let text = std::str::from_utf8(&secret).map_err(|_| VaultError::BadIdentityFile)?;
        age::x25519::Identity::from_str(text)
            .map(Identity)
            .map_err(|_| VaultError::BadIdentityFile)
    }

    /// Decrypts an armored age file to this identity.
    pub fn decrypt(&self, armored: &str) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let reader = age::armor::ArmoredReader::new(armored.as_bytes());
        let decryptor =
            age::Decryptor::new(reader).map_err(|e| VaultError::Decrypt(e.to_string()))?;
        let mut plain = Zeroizing::new(Vec::new());
        decryptor
            .decrypt(std::iter::once(&self.0 as &dyn age::Identity))
            .map_err(|e| VaultError::Decrypt(e.to_string()))?
            .read_to_end(&mut plain)
            .map_err(|e| VaultError::Decrypt(e.to_string()))?;
        Ok(plain)
    }
}

/// A recipient's fingerprint: blake3 of its `age1…` text, hex. Computed, never taken from a user.
pub fn fingerprint(recipient: &str) -> String {
    blake3::hash(recipient.as_bytes()).to_hex().to_string()
}

/// Whether `text` is a standard age X25519 recipient (`age1…`).
pub fn recipient(text: &str) -> Result<age::x25519::Recipient, VaultError> {
    age::x25519::Recipient::from_str(text.trim())
        .map_err(|_| VaultError::BadRecipient("not an age X25519 recipient (age1…)".into()))
}

/// `plaintext` encrypted to every one of `recipients` (`age1…`), as an armored age file.
pub fn encrypt(plaintext: &[u8], recipients: &[String]) -> Result<String, VaultError> {
    let parsed: Vec<age::x25519::Recipient> = recipients
        .iter()
        .map(|r| recipient(r))
        .collect::<Result<_, _>>()?;
    let encryptor =
        age::Encryptor::with_recipients(parsed.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| VaultError::Encrypt(e.to_string()))?;
    let mut out = Vec::new();
    let armored = age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor)
        .map_err(|e| VaultError::Encrypt(e.to_string()))?;
    let mut writer = encryptor
        .wrap_output(armored)
        .map_err(|e| VaultError::Encrypt(e.to_string()))?;
    writer
        .write_all(plaintext)
        .map_err(|e| VaultError::Encrypt(e.to_string()))?;
    writer
        .finish()
        .and_then(|armor| armor.finish())
        .map_err(|e| VaultError::Encrypt(e.to_string()))?;
    String::from_utf8(out).map_err(|e| VaultError::Encrypt(e.to_string()))
}

/// Whether `armored` is a parseable age file (its header read, nothing decrypted); how many
/// X25519 recipients its header names.
pub fn check_ciphertext(armored: &str) -> Result<usize, VaultError> {
    let reader = age::armor::ArmoredReader::new(armored.as_bytes());
    age::Decryptor::new(reader).map_err(|e| VaultError::Decrypt(e.to_string()))?;
    // The header is text up to its MAC line: one `-> X25519 …` stanza per recipient.
    let mut binary = Vec::new();
    let mut reader = age::armor::ArmoredReader::new(armored.as_bytes());
    let mut chunk = [0u8; 4096];
    while !binary.windows(5).any(|w| w == b"\n--- ") {
        let n = reader
            .read(&mut chunk)
            .map_err(|e| VaultError::Decrypt(e.to_string()))?;
        if n == 0 || binary.len() > HEADER_BYTES_MAX {
            return Err(VaultError::Decrypt("its header does not end".into()));
        }
        binary.extend_from_slice(&chunk[..n]);
    }
    let end = binary
        .windows(5)
        .position(|w| w == b"\n--- ")
        .unwrap_or(binary.len());
    Ok(binary[..end]
        .split(|&b| b == b'\n')
        .filter(|line| line.starts_with(b"-> X25519 "))
        .count())
}

/// A header longer than this is refused (64 recipients' stanzas take about 8 KiB).
const HEADER_BYTES_MAX: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> Kdf {
        Kdf {
            memory_kib: 8 * 1024,
            iterations: 1,
            ..Kdf::generate()
        }
    }

    #[test]
    fn an_entry_opens_for_each_recipient_and_no_other() {
        let (a, b, c) = (
            Identity::generate(),
            Identity::generate(),
            Identity::generate(),
        );
        let sealed = encrypt(b"sb_secret_1", &[a.recipient(), b.recipient()]).unwrap();
        assert!(sealed.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
        assert_eq!(check_ciphertext(&sealed).unwrap(), 2);
        assert_eq!(a.decrypt(&sealed).unwrap().as_slice(), b"sb_secret_1");
        assert_eq!(b.decrypt(&sealed).unwrap().as_slice(), b"sb_secret_1");
        assert!(c.decrypt(&sealed).is_err());
        let forged = "-----BEGIN AGE ENCRYPTED FILE-----\nAAAA\n-----END AGE ENCRYPTED FILE-----\n";
        assert!(check_ciphertext(forged).is_err());
    }

    #[test]
    fn an_identity_opens_with_its_passphrase_only() {
        let kdf = quick();
        let id = Identity::generate();
        let sealed = id.seal(b"correct horse", &kdf).unwrap();
        let secret = id.0.to_string();
        let text = String::from_utf8_lossy(&sealed);
        assert!(
            !text.contains(secret.expose_secret()),
            "the identity in the clear"
        );
        let opened = Identity::open(&sealed, b"correct horse", &kdf).unwrap();
        assert_eq!(opened.recipient(), id.recipient());
        assert!(matches!(
            Identity::open(&sealed, b"wrong", &kdf),
            Err(VaultError::WrongPassphrase)
        ));
        assert_eq!(fingerprint(&id.recipient()).len(), 64);
    }
}
