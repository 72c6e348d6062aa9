//! Chunk sealing: AES-256-GCM-SIV under a subkey of the user's data key, with a nonce
//! derived from the plaintext so that one user's identical chunks seal to identical bytes
//! (and therefore the same [`ChunkId`]) — that is what makes deduplication work without
//! the backend ever seeing plaintext.

use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce, Tag};
use zeroize::Zeroizing;

use crate::ids::{ChunkId, VerifiedChunk};
use crate::keys::DataKey;

const NONCE_CONTEXT: &str = "peerstash 2026-11 chunk nonce v1";
const ENC_CONTEXT: &str = "peerstash 2026-11 chunk encryption v1";

/// Bytes a sealed chunk adds to its plaintext: the 12-byte nonce and the 16-byte tag.
pub const SEAL_OVERHEAD: usize = 12 + 16;

/// Why a stored chunk could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The bytes do not hash to the id they were fetched under (corrupt or substituted).
    #[error("chunk {expected} does not match its id (got {got})")]
    IdMismatch {
        /// The id that was asked for.
        expected: ChunkId,
        /// BLAKE3 of the bytes that came back.
        got: ChunkId,
    },
    /// Shorter than a nonce and a tag.
    #[error("stored chunk is too short ({0} bytes)")]
    TooShort(usize),
    /// The hash matched but authentication failed: sealed under another data key.
    #[error("chunk does not decrypt under this data key")]
    Decrypt,
}

/// A sealed chunk: its id and the bytes the backend stores (`nonce || ciphertext`).
#[derive(Debug, Clone)]
pub struct SealedChunk {
    /// BLAKE3 of `stored`.
    pub id: ChunkId,
    /// `nonce || AES-256-GCM-SIV(plaintext)`.
    pub stored: Vec<u8>,
}

/// A chunk's plaintext, decrypted where it arrived: the nonce stays in front of it in the
/// buffer, since moving the whole chunk down by 12 bytes cost a copy per chunk read.
#[derive(Clone, PartialEq, Eq)]
pub struct Plaintext {
    buf: Vec<u8>,
    start: usize,
}

impl Plaintext {
    /// The plaintext as a vector of its own (moving it to the front of the buffer).
    pub fn into_vec(mut self) -> Vec<u8> {
        self.buf.drain(..self.start);
        self.buf
    }
}

impl std::ops::Deref for Plaintext {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl std::fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Plaintext({} bytes)", self.len())
    }
}

/// Seals and opens chunks for one data key.
pub struct ChunkSealer {
    cipher: Aes256GcmSiv,
    nonce_key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for ChunkSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkSealer(<secret>)")
    }
}

impl ChunkSealer {
    /// Derive the encryption and nonce subkeys from `key`. Separate subkeys keep the
    /// nonce derivation from ever exposing anything about the encryption key.
    pub fn new(key: &DataKey) -> Self {
        let enc = Zeroizing::new(blake3::derive_key(ENC_CONTEXT, key.expose_secret()));
        let nonce_key = Zeroizing::new(blake3::derive_key(NONCE_CONTEXT, key.expose_secret()));
        let cipher = Aes256GcmSiv::new_from_slice(&enc[..]).expect("32-byte key");
        ChunkSealer { cipher, nonce_key }
    }

    /// Encrypt `plain`. Deterministic: the same key and plaintext give the same id.
    pub fn seal(&self, plain: &[u8]) -> SealedChunk {
        let mac = blake3::keyed_hash(&self.nonce_key, plain);
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&mac.as_bytes()[..12]);
        // nonce || ciphertext || tag, encrypted where it lies: one copy of the plaintext.
        let mut stored = Vec::with_capacity(plain.len() + SEAL_OVERHEAD);
        stored.extend_from_slice(&nonce);
        stored.extend_from_slice(plain);
        let tag = self
            .cipher
            .encrypt_inout_detached(&Nonce::from(nonce), &[], (&mut stored[12..]).into())
            .expect("AES-GCM-SIV encryption of a chunk cannot fail");
        stored.extend_from_slice(&tag);
        SealedChunk {
            id: ChunkId::of(&stored),
            stored,
        }
    }

    /// Verify that `stored` is the chunk `id` and decrypt it.
    pub fn open(&self, id: ChunkId, stored: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.open_owned(id, stored.to_vec())
    }

    /// [`open`](Self::open), decrypting in the buffer it is given (no second copy of
    /// the chunk).
    pub fn open_owned(&self, id: ChunkId, stored: Vec<u8>) -> Result<Vec<u8>, CryptoError> {
        let chunk = VerifiedChunk::check(id, stored)
            .map_err(|got| CryptoError::IdMismatch { expected: id, got })?;
        self.open_verified(chunk).map(Plaintext::into_vec)
    }

    /// Decrypt a chunk whose hash was checked where it arrived, in its own buffer.
    pub fn open_verified(&self, chunk: VerifiedChunk) -> Result<Plaintext, CryptoError> {
        let mut stored = chunk.into_bytes();
        if stored.len() < SEAL_OVERHEAD {
            return Err(CryptoError::TooShort(stored.len()));
        }
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&stored[..12]);
        let end = stored.len() - 16;
        let (body, tag) = stored.split_at_mut(end);
        let tag = Tag::try_from(&tag[..]).expect("16 bytes");
        self.cipher
            .decrypt_inout_detached(&Nonce::from(nonce), &[], (&mut body[12..]).into(), &tag)
            .map_err(|_| CryptoError::Decrypt)?;
        stored.truncate(end);
        Ok(Plaintext {
            buf: stored,
            start: 12,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_dedupe_and_tamper() {
        let key = DataKey::generate().unwrap();
        let s = ChunkSealer::new(&key);
        let a = s.seal(b"hello chunk");
        let b = s.seal(b"hello chunk");
        assert_eq!(a.id, b.id, "same user + plaintext dedupes");
        assert_eq!(s.open(a.id, &a.stored).unwrap(), b"hello chunk");
        assert!(!a.stored.windows(5).any(|w| w == b"hello"));
        let mut bad = a.stored.clone();
        bad[20] ^= 1;
        assert!(matches!(
            s.open(a.id, &bad),
            Err(CryptoError::IdMismatch { .. })
        ));
        let other = ChunkSealer::new(&DataKey::generate().unwrap());
        assert_ne!(other.seal(b"hello chunk").id, a.id);
        assert_eq!(other.open(a.id, &a.stored), Err(CryptoError::Decrypt));
        assert!(matches!(
            s.open(ChunkId::of(b"x"), b"x"),
            Err(CryptoError::TooShort(1))
        ));
        assert_eq!(s.open(s.seal(b"").id, &s.seal(b"").stored).unwrap(), b"");
    }

    /// Chunks sealed before the in-place code (`Aead::encrypt`: ciphertext then tag, after
    /// the nonce) are the very bytes sealed now, and open the same way.
    #[test]
    fn in_place_sealing_matches_the_stored_format() {
        use aes_gcm_siv::aead::Aead;
        let key = DataKey::from_bytes([3; 32]);
        let s = ChunkSealer::new(&key);
        let plain: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let a = s.seal(&plain);
        let ct = s
            .cipher
            .encrypt(&Nonce::try_from(&a.stored[..12]).unwrap(), &plain[..])
            .unwrap();
        assert_eq!(&a.stored[12..], &ct[..]);
        assert_eq!(s.open_owned(a.id, a.stored.clone()).unwrap(), plain);
    }
}
