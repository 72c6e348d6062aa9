//! Secrets on disk: files written with mode 0600, and transaction keys encrypted at rest
//! under a key derived from the server's master secret.

use std::path::Path;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use peerstash::keys::random_bytes;
use peerstash::{MasterSecret, PeerId, TransactionKey};

/// Why a secret could not be stored or read back.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// File system trouble.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The stored ciphertext does not decrypt: wrong master secret or a tampered row.
    #[error("an encrypted key does not decrypt (wrong master secret or tampered database)")]
    Decrypt,
    /// The OS random generator failed.
    #[error("random generator: {0}")]
    Rng(String),
}

/// Write `bytes` to `path` with mode 0600, atomically (temp file + rename), so a crash
/// never leaves a half-written secret.
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> Result<(), SecretError> {
    peerstash::keys::write_secret_file(path, bytes).map_err(|source| SecretError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Encrypts transaction keys for the database with AES-256-GCM-SIV. The peer id is the
/// associated data, so a row's key cannot be swapped into another peer's row.
pub struct AtRest {
    cipher: Aes256GcmSiv,
}

impl AtRest {
    /// The at-rest cipher of `master`.
    pub fn new(master: &MasterSecret) -> AtRest {
        let mut k = master.at_rest_key();
        let cipher = Aes256GcmSiv::new_from_slice(&k).expect("32-byte key");
        zeroize::Zeroize::zeroize(&mut k);
        AtRest { cipher }
    }

    /// `nonce (12) || ciphertext+tag` of `key`, bound to `peer`.
    pub fn seal(&self, peer: PeerId, key: &TransactionKey) -> Result<Vec<u8>, SecretError> {
        let mut nonce = [0u8; 12];
        random_bytes(&mut nonce).map_err(|e| SecretError::Rng(e.to_string()))?;
        let aad = peer.to_bytes();
        let ct = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: key.expose_secret(),
                    aad: &aad,
                },
            )
            .map_err(|_| SecretError::Decrypt)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Inverse of [`AtRest::seal`].
    pub fn open(&self, peer: PeerId, blob: &[u8]) -> Result<TransactionKey, SecretError> {
        if blob.len() != 12 + 32 + 16 {
            return Err(SecretError::Decrypt);
        }
        let nonce: [u8; 12] = blob[..12].try_into().expect("length checked");
        let aad = peer.to_bytes();
        let mut pt = self
            .cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &blob[12..],
                    aad: &aad,
                },
            )
            .map_err(|_| SecretError::Decrypt)?;
        let bytes: [u8; 32] = pt.as_slice().try_into().map_err(|_| SecretError::Decrypt)?;
        zeroize::Zeroize::zeroize(&mut pt);
        Ok(TransactionKey::from_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_rest_round_trip_is_bound_to_peer() {
        let m = MasterSecret::generate().unwrap();
        let a = AtRest::new(&m);
        let k = TransactionKey::generate().unwrap();
        let blob = a.seal(PeerId(7), &k).unwrap();
        assert_eq!(a.open(PeerId(7), &blob).unwrap(), k);
        assert!(a.open(PeerId(8), &blob).is_err());
        let other = AtRest::new(&MasterSecret::generate().unwrap());
        assert!(other.open(PeerId(7), &blob).is_err());
    }

    #[test]
    fn secret_files_are_0600() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        write_secret_file(&p, b"x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
