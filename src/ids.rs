//! Identifiers that travel between peers and the server: small `Copy` types, so a peer id
//! can never be passed where a chunk id is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a textual identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdParseError {
    /// Not the expected number of hex digits.
    #[error("expected {expected} hex digits, got {got} characters")]
    Length {
        /// Hex digits the identifier needs.
        expected: usize,
        /// Characters that were given.
        got: usize,
    },
    /// A character that is not a hex digit.
    #[error("not a hex string")]
    NotHex,
    /// Upper-case hex digits: identifiers have one spelling, lower-case, so that two
    /// strings never name the same id.
    #[error("hex digits must be lower-case")]
    UpperCase,
}

fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], IdParseError> {
    if s.len() != 2 * N {
        return Err(IdParseError::Length {
            expected: 2 * N,
            got: s.len(),
        });
    }
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(IdParseError::UpperCase);
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|_| IdParseError::NotHex)?;
    Ok(out)
}

/// A peer's identity, assigned by the server at registration (random, so ids cannot be
/// enumerated). Shown as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct PeerId(pub u64);

impl PeerId {
    /// Big-endian bytes, as they appear on the wire.
    pub fn to_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({self})")
    }
}

impl FromStr for PeerId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(PeerId(u64::from_be_bytes(parse_hex::<8>(s)?)))
    }
}

impl From<PeerId> for String {
    fn from(p: PeerId) -> String {
        p.to_string()
    }
}

impl TryFrom<String> for PeerId {
    type Error = IdParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// A stored chunk's address: the BLAKE3-256 hash of the bytes a peer stores (ciphertext),
/// so any holder can check integrity without the data key.
///
/// On the wire (JSON) it is 64 lowercase hex digits, written and read without a heap
/// allocation: a put or get names up to thousands of them, and the server spent a few
/// percent of its time building and parsing their strings.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of these stored bytes.
    pub fn of(bytes: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(bytes).as_bytes())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 hex digits, in a buffer of the caller's.
    fn hex<'a>(&self, buf: &'a mut [u8; 64]) -> &'a str {
        hex::encode_to_slice(self.0, buf).expect("64 digits for 32 bytes");
        std::str::from_utf8(buf).expect("hex digits are ASCII")
    }
}

impl Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.hex(&mut [0; 64]))
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Digits;
        impl serde::de::Visitor<'_> for Digits {
            type Value = ChunkId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a chunk id (64 lowercase hex digits)")
            }
            // Borrowed, transient and owned strings all arrive here.
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ChunkId, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Digits)
    }
}

/// Stored bytes found to hash to their [`ChunkId`]. [`VerifiedChunk::check`] is the only
/// way to make one, so whoever is handed one (a chunk opened for a read) need not hash it
/// again: every fetch hashes once, where the bytes arrive.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifiedChunk {
    id: ChunkId,
    bytes: Vec<u8>,
}

impl VerifiedChunk {
    /// `bytes` if they hash to `id`; otherwise the id they do hash to.
    pub fn check(id: ChunkId, bytes: Vec<u8>) -> Result<VerifiedChunk, ChunkId> {
        let got = ChunkId::of(&bytes);
        if got == id {
            Ok(VerifiedChunk { id, bytes })
        } else {
            Err(got)
        }
    }

    /// The id the bytes hash to.
    pub fn id(&self) -> ChunkId {
        self.id
    }

    /// The stored bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The stored bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

impl fmt::Debug for VerifiedChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VerifiedChunk({:?}, {} bytes)",
            self.id,
            self.bytes.len()
        )
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hex(&mut [0; 64]))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A prefix is enough to tell chunks apart in logs.
        write!(f, "ChunkId({}…)", &hex::encode(&self.0[..6]))
    }
}

impl FromStr for ChunkId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(ChunkId(parse_hex::<32>(s)?))
    }
}

impl From<ChunkId> for String {
    fn from(c: ChunkId) -> String {
        c.to_string()
    }
}

impl TryFrom<String> for ChunkId {
    type Error = IdParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// A transaction's number, unique per server; it names one token and keys the replay store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct TransactionId(pub u64);

impl fmt::Display for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tx{}", self.0)
    }
}

/// SHA-256 of a DER certificate, as pinned by clients (server TLS, peer QUIC).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Fingerprint {
        use sha2::Digest;
        Fingerprint(sha2::Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = IdParseError;
    /// Accepts 64 hex digits, optionally with colons and a `sha256:` prefix.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let s = s
            .strip_prefix("sha256:")
            .or_else(|| s.strip_prefix("SHA256:"))
            .unwrap_or(s);
        if s.len() > 200 {
            return Err(IdParseError::Length {
                expected: 64,
                got: s.len(),
            });
        }
        let clean: String = s.chars().filter(|c| *c != ':').collect();
        Ok(Fingerprint(parse_hex::<32>(&clean.to_ascii_lowercase())?))
    }
}

impl From<Fingerprint> for String {
    fn from(c: Fingerprint) -> String {
        c.to_string()
    }
}

impl TryFrom<String> for Fingerprint {
    type Error = IdParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let p = PeerId(0x0123_4567_89ab_cdef);
        assert_eq!(p.to_string().parse::<PeerId>().unwrap(), p);
        let c = ChunkId::of(b"hello");
        assert_eq!(c.to_string().parse::<ChunkId>().unwrap(), c);
        assert!("zz".parse::<PeerId>().is_err());
        let upper = c.to_string().to_uppercase();
        assert_eq!(upper.parse::<ChunkId>(), Err(IdParseError::UpperCase));
        assert!("0123456789ABCDEF".parse::<PeerId>().is_err());
    }

    #[test]
    fn chunk_ids_in_json_are_lowercase_hex_and_bad_ones_are_refused() {
        let c = ChunkId::of(b"hello");
        let json = serde_json::to_string(&vec![c, c]).unwrap();
        assert_eq!(json, format!("[\"{c}\",\"{c}\"]"));
        assert_eq!(c.to_string(), hex::encode(c.0));
        assert_eq!(serde_json::from_str::<Vec<ChunkId>>(&json).unwrap(), [c, c]);
        // Read from a reader (transient strings) and with an escaped digit (an owned one).
        let escaped = json.replacen(
            &c.to_string()[..1],
            &format!("\\u00{:x}", c.to_string().as_bytes()[0]),
            1,
        );
        assert_ne!(escaped, json);
        assert_eq!(
            serde_json::from_str::<Vec<ChunkId>>(&escaped).unwrap(),
            [c, c]
        );
        assert_eq!(
            serde_json::from_reader::<_, Vec<ChunkId>>(json.as_bytes()).unwrap(),
            [c, c]
        );
        for bad in [
            format!("\"{}\"", c.to_string().to_uppercase()),
            format!("\"{}\"", &c.to_string()[..63]),
            format!("\"{}0\"", c),
            format!("\"{}g\"", &c.to_string()[..63]),
            "42".to_string(),
            "null".to_string(),
        ] {
            assert!(serde_json::from_str::<ChunkId>(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fingerprint_accepts_colons_and_prefix() {
        let f = Fingerprint::of_der(b"cert");
        let hexed = f.to_string();
        let colons: Vec<String> = hexed
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8(c.to_vec()).unwrap().to_uppercase())
            .collect();
        let pretty = format!("sha256:{}", colons.join(":"));
        assert_eq!(pretty.parse::<Fingerprint>().unwrap(), f);
        assert_eq!(hexed.parse::<Fingerprint>().unwrap(), f);
        assert!("sha256:abcd".parse::<Fingerprint>().is_err());
    }
}
