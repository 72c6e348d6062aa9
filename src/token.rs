//! The token: the server's signed, encrypted grant of permission for one peer-to-peer
//! transaction (a batch of chunk operations) addressed to one target peer.
//!
//! Wire format (version 1), all integers big-endian; docs/PROTOCOL.md has the table:
//!
//! ```text
//! header (18 B, clear, authenticated): version u8 | flags u8 | target u64 | txid u64
//! body   (encrypted, AES-256-GCM-SIV, nonce = txid || "ptok", aad = header):
//!        requester u64 | kind u8 | issued_at u64 | expires_at u64 | count u16 | entries
//!        entry = chunk [32] | size u32 [| offset u32 | len u32 when kind = stream]
//! tag    (32 B): HMAC-SHA256 over header || ciphertext
//! ```
//!
//! Opening checks, in this order: length bounds, version, flags, target, MAC (constant
//! time) — and only then decrypts and parses. Time and per-chunk checks follow.

use std::fmt;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ids::{ChunkId, PeerId, TransactionId};
use crate::keys::{TokenKeys, TransactionKey};
use crate::replay::{ReplayError, ReplayStore};

/// The only token version this code writes and reads.
pub const VERSION: u8 = 1;
/// Flag bit reserved for group tokens (verifiable by every holder of a group key).
pub const FLAG_GROUP: u8 = 0x01;
/// Most grants one token may carry.
pub const MAX_ENTRIES: usize = 4096;
/// Largest chunk any token may grant (and a storage daemon accepts).
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Longest validity a token may claim; a longer one is malformed.
pub const MAX_LIFETIME_SECS: u64 = 24 * 3600;
/// Default allowance for clocks that disagree between server and peer.
pub const DEFAULT_SKEW_SECS: u64 = 60;

const HEADER_LEN: usize = 18;
const BODY_FIXED_LEN: usize = 27;
const ENTRY_LEN: usize = 36;
const STREAM_ENTRY_LEN: usize = 44;
const AEAD_TAG_LEN: usize = 16;
const MAC_LEN: usize = 32;
const NONCE_SUFFIX: &[u8; 4] = b"ptok";

/// Smallest well-formed token (a universal token with no entries).
pub const MIN_TOKEN_LEN: usize = HEADER_LEN + BODY_FIXED_LEN + AEAD_TAG_LEN + MAC_LEN;
/// Largest well-formed token: anything longer is refused before any work is done.
pub const MAX_TOKEN_LEN: usize = MIN_TOKEN_LEN + MAX_ENTRIES * STREAM_ENTRY_LEN;

/// What a token allows. `Universal` is the patent's peak-load type: put, get or stream of
/// the listed chunks (or, with no entries, of any chunk up to [`MAX_CHUNK_SIZE`]) — but
/// never delete: the server cannot know what a universal token was used for, so a delete
/// under one would leave the server listing a location that no longer exists (and, for a
/// chunk another owner stores too, destroy their copy). Deletes need a delete token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TxKind {
    /// Store the listed chunks.
    Put = 1,
    /// Fetch the listed chunks whole.
    Get = 2,
    /// Fetch a byte range of each listed chunk.
    Stream = 3,
    /// Put, get or stream (peak-load mode; off by default on the server). Not delete.
    Universal = 4,
    /// Drop the listed chunks.
    Delete = 5,
}

impl TxKind {
    fn from_u8(b: u8) -> Option<TxKind> {
        Some(match b {
            1 => TxKind::Put,
            2 => TxKind::Get,
            3 => TxKind::Stream,
            4 => TxKind::Universal,
            5 => TxKind::Delete,
            _ => return None,
        })
    }

    /// Whether a token of this kind permits `op`.
    pub fn allows(self, op: TxKind) -> bool {
        self == op || (self == TxKind::Universal && op != TxKind::Delete)
    }
}

/// A byte range inside a chunk, for stream tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub offset: u32,
    /// Number of bytes.
    pub len: u32,
}

/// One chunk a token covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// BLAKE3 of the stored bytes.
    pub chunk: ChunkId,
    /// Exact stored size.
    pub size: u32,
    /// For stream tokens only: the part to send.
    pub range: Option<ByteRange>,
}

impl Grant {
    /// A whole-chunk grant (put, get, delete, universal).
    pub fn whole(chunk: ChunkId, size: u32) -> Grant {
        Grant {
            chunk,
            size,
            range: None,
        }
    }
}

/// Everything a token says, before sealing or after a successful open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    /// The peer allowed to ask.
    pub requester: PeerId,
    /// The peer that must carry out the operation (whose key seals the token).
    pub target: PeerId,
    /// What is allowed.
    pub kind: TxKind,
    /// Unique per server; keys the replay store.
    pub txid: TransactionId,
    /// Unix seconds when issued.
    pub issued_at: u64,
    /// Unix seconds after which the token is dead.
    pub expires_at: u64,
    /// The chunks covered (1..=MAX_ENTRIES; 0 allowed for universal tokens).
    pub grants: Vec<Grant>,
}

/// Why a token was refused. Each variant is one thing an attacker might try.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The HMAC does not verify under the target's key: forged or tampered.
    #[error("token signature does not verify (forged or tampered)")]
    BadMac,
    /// Structurally wrong: truncated, bad lengths, unknown kind, impossible times.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// Longer than any token may be.
    #[error("token of {0} bytes exceeds the {MAX_TOKEN_LEN}-byte limit")]
    Oversized(usize),
    /// A version (or flag) this code does not speak.
    #[error("unsupported token version {0}")]
    UnsupportedVersion(u8),
    /// Addressed to a different peer.
    #[error("token is for peer {found}, not for this peer ({expected})")]
    WrongTarget {
        /// This peer.
        expected: PeerId,
        /// The token's target.
        found: PeerId,
    },
    /// Past its expiry (plus the skew allowance).
    #[error("token expired at {expires_at} (now {now})")]
    Expired {
        /// Token expiry, unix seconds.
        expires_at: u64,
        /// Verifier's clock.
        now: u64,
    },
    /// Issued in the future (beyond the skew allowance).
    #[error("token not valid before {issued_at} (now {now})")]
    NotYetValid {
        /// Token issue time, unix seconds.
        issued_at: u64,
        /// Verifier's clock.
        now: u64,
    },
    /// This transaction (for this chunk) was already used.
    #[error("token already used for this chunk (replay)")]
    Replayed,
    /// The token's kind does not allow the operation asked for.
    #[error("a {token:?} token cannot authorize a {wanted:?}")]
    WrongType {
        /// The token's kind.
        token: TxKind,
        /// The operation attempted.
        wanted: TxKind,
    },
    /// The presented chunk is not one the token covers.
    #[error("chunk {0:?} is not covered by this token")]
    NotInToken(ChunkId),
    /// The chunk is covered, but with another size.
    #[error("chunk size {got} does not match the token's {expected}")]
    SizeMismatch {
        /// Size in the token.
        expected: u32,
        /// Size presented.
        got: u64,
    },
    /// The replay store could not be read or written; refuse rather than risk a replay.
    #[error("replay store failure: {0}")]
    ReplayStore(String),
}

impl TokenError {
    /// A short stable name for metrics and failure reports.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::BadMac => "bad_mac",
            TokenError::Malformed(_) => "malformed",
            TokenError::Oversized(_) => "oversized",
            TokenError::UnsupportedVersion(_) => "unsupported_version",
            TokenError::WrongTarget { .. } => "wrong_target",
            TokenError::Expired { .. } => "expired",
            TokenError::NotYetValid { .. } => "not_yet_valid",
            TokenError::Replayed => "replayed",
            TokenError::WrongType { .. } => "wrong_type",
            TokenError::NotInToken(_) => "not_in_token",
            TokenError::SizeMismatch { .. } => "size_mismatch",
            TokenError::ReplayStore(_) => "replay_store",
        }
    }
}

impl From<ReplayError> for TokenError {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::Replayed => TokenError::Replayed,
            ReplayError::Db(m) => TokenError::ReplayStore(m),
        }
    }
}

/// A sealed token: opaque bytes that only the target peer can open.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Vec<u8>);

impl Token {
    /// Wrap received bytes (nothing is checked until [`TokenVerifier::open`]).
    pub fn from_bytes(bytes: Vec<u8>) -> Token {
        Token(bytes)
    }
    /// The wire bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// The wire bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
    /// Hex, for JSON transport.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }
    /// Parse hex from JSON, refusing anything longer than a token can be.
    pub fn from_hex(s: &str) -> Result<Token, TokenError> {
        if s.len() > 2 * MAX_TOKEN_LEN {
            return Err(TokenError::Oversized(s.len() / 2));
        }
        hex::decode(s)
            .map(Token)
            .map_err(|_| TokenError::Malformed("not hex"))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({} bytes)", self.0.len())
    }
}

impl serde::Serialize for Token {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Token {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Token, D::Error> {
        let s = String::deserialize(d)?;
        Token::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

fn nonce_for(txid: TransactionId) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&txid.0.to_be_bytes());
    n[8..].copy_from_slice(NONCE_SUFFIX);
    Nonce::from(n)
}

fn mac_state(keys: &TokenKeys) -> Hmac<Sha256> {
    <Hmac<Sha256> as KeyInit>::new_from_slice(&keys.mac).expect("HMAC takes any key length")
}

fn cipher(keys: &TokenKeys) -> Aes256GcmSiv {
    Aes256GcmSiv::new_from_slice(&keys.enc).expect("32-byte AES-256 key")
}

impl TokenClaims {
    /// Check the claims are ones a verifier would accept structurally.
    fn validate(&self) -> Result<(), TokenError> {
        if self.grants.len() > MAX_ENTRIES {
            return Err(TokenError::Malformed("too many entries"));
        }
        if self.grants.is_empty() && self.kind != TxKind::Universal {
            return Err(TokenError::Malformed("no entries"));
        }
        if self.expires_at <= self.issued_at || self.expires_at - self.issued_at > MAX_LIFETIME_SECS
        {
            return Err(TokenError::Malformed("validity window"));
        }
        for g in &self.grants {
            if g.size > MAX_CHUNK_SIZE {
                return Err(TokenError::Malformed("chunk size above limit"));
            }
            match (self.kind == TxKind::Stream, g.range) {
                (true, Some(r)) => {
                    if u64::from(r.offset) + u64::from(r.len) > u64::from(g.size) {
                        return Err(TokenError::Malformed("range outside chunk"));
                    }
                }
                (false, None) => {}
                _ => return Err(TokenError::Malformed("range only in stream tokens")),
            }
        }
        Ok(())
    }

    fn encode_body(&self) -> Vec<u8> {
        let entry_len = if self.kind == TxKind::Stream {
            STREAM_ENTRY_LEN
        } else {
            ENTRY_LEN
        };
        let mut b = Vec::with_capacity(BODY_FIXED_LEN + entry_len * self.grants.len());
        b.extend_from_slice(&self.requester.to_bytes());
        b.push(self.kind as u8);
        b.extend_from_slice(&self.issued_at.to_be_bytes());
        b.extend_from_slice(&self.expires_at.to_be_bytes());
        b.extend_from_slice(&(self.grants.len() as u16).to_be_bytes());
        for g in &self.grants {
            b.extend_from_slice(g.chunk.as_bytes());
            b.extend_from_slice(&g.size.to_be_bytes());
            if let Some(r) = g.range {
                b.extend_from_slice(&r.offset.to_be_bytes());
                b.extend_from_slice(&r.len.to_be_bytes());
            }
        }
        b
    }

    /// Encrypt and sign these claims under the target's token keys.
    pub fn seal(&self, keys: &TokenKeys) -> Result<Token, TokenError> {
        self.validate()?;
        let mut out = Vec::with_capacity(MIN_TOKEN_LEN + self.grants.len() * STREAM_ENTRY_LEN);
        out.push(VERSION);
        out.push(0);
        out.extend_from_slice(&self.target.to_bytes());
        out.extend_from_slice(&self.txid.0.to_be_bytes());
        let body = self.encode_body();
        let ct = cipher(keys)
            .encrypt(
                &nonce_for(self.txid),
                Payload {
                    msg: &body,
                    aad: &out[..HEADER_LEN],
                },
            )
            .map_err(|_| TokenError::Malformed("encryption failed"))?;
        out.extend_from_slice(&ct);
        let mut mac = mac_state(keys);
        mac.update(&out);
        out.extend_from_slice(&mac.finalize().into_bytes());
        Ok(Token(out))
    }
}

/// Strict reader over a decrypted body: every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TokenError> {
        if self.buf.len() < n {
            return Err(TokenError::Malformed("truncated body"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, TokenError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, TokenError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, TokenError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, TokenError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

/// Opens tokens addressed to one peer. Build one per peer and keep it: it holds the
/// derived subkeys.
pub struct TokenVerifier {
    me: PeerId,
    keys: TokenKeys,
    skew: u64,
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenVerifier({})", self.me)
    }
}

impl TokenVerifier {
    /// A verifier for peer `me`, holding `key`.
    pub fn new(me: PeerId, key: &TransactionKey) -> TokenVerifier {
        TokenVerifier {
            me,
            keys: key.token_keys(),
            skew: DEFAULT_SKEW_SECS,
        }
    }

    /// Set the clock-skew allowance in seconds.
    pub fn with_skew(mut self, secs: u64) -> TokenVerifier {
        self.skew = secs;
        self
    }

    /// Authenticate, decrypt, parse and time-check a token. `now` is unix seconds.
    /// Per-chunk checks and replay protection follow in [`Authorization::permit`].
    pub fn open(&self, token: &[u8], now: u64) -> Result<Authorization, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Oversized(token.len()));
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(TokenError::Malformed("truncated"));
        }
        if token[0] != VERSION {
            return Err(TokenError::UnsupportedVersion(token[0]));
        }
        if token[1] != 0 {
            // Group tokens (FLAG_GROUP) and any other flag are not spoken yet.
            return Err(TokenError::UnsupportedVersion(token[0]));
        }
        let target = PeerId(be_u64(&token[2..10]));
        if target != self.me {
            return Err(TokenError::WrongTarget {
                expected: self.me,
                found: target,
            });
        }
        let (signed, tag) = token.split_at(token.len() - MAC_LEN);
        let mut mac = mac_state(&self.keys);
        mac.update(signed);
        mac.verify_slice(tag).map_err(|_| TokenError::BadMac)?;

        let txid = TransactionId(be_u64(&token[10..18]));
        let body = cipher(&self.keys)
            .decrypt(
                &nonce_for(txid),
                Payload {
                    msg: &signed[HEADER_LEN..],
                    aad: &signed[..HEADER_LEN],
                },
            )
            .map_err(|_| TokenError::Malformed("ciphertext does not authenticate"))?;
        let claims = parse_body(&body, target, txid)?;

        if now + self.skew < claims.issued_at {
            return Err(TokenError::NotYetValid {
                issued_at: claims.issued_at,
                now,
            });
        }
        if now > claims.expires_at + self.skew {
            return Err(TokenError::Expired {
                expires_at: claims.expires_at,
                now,
            });
        }
        Ok(Authorization { claims })
    }
}

fn parse_body(body: &[u8], target: PeerId, txid: TransactionId) -> Result<TokenClaims, TokenError> {
    let mut r = Reader { buf: body };
    let requester = PeerId(r.u64()?);
    let kind = TxKind::from_u8(r.u8()?).ok_or(TokenError::Malformed("unknown kind"))?;
    let issued_at = r.u64()?;
    let expires_at = r.u64()?;
    let count = usize::from(r.u16()?);
    if count > MAX_ENTRIES {
        return Err(TokenError::Malformed("too many entries"));
    }
    let entry_len = if kind == TxKind::Stream {
        STREAM_ENTRY_LEN
    } else {
        ENTRY_LEN
    };
    if r.buf.len() != count * entry_len {
        return Err(TokenError::Malformed("entry count does not match length"));
    }
    let mut grants = Vec::with_capacity(count);
    for _ in 0..count {
        let chunk = ChunkId(r.take(32)?.try_into().unwrap());
        let size = r.u32()?;
        let range = if kind == TxKind::Stream {
            Some(ByteRange {
                offset: r.u32()?,
                len: r.u32()?,
            })
        } else {
            None
        };
        grants.push(Grant { chunk, size, range });
    }
    let claims = TokenClaims {
        requester,
        target,
        kind,
        txid,
        issued_at,
        expires_at,
        grants,
    };
    claims.validate()?;
    Ok(claims)
}

/// A token that opened: authentic, for this peer, within its validity window.
#[derive(Debug, Clone)]
pub struct Authorization {
    claims: TokenClaims,
}

impl Authorization {
    /// What the token says.
    pub fn claims(&self) -> &TokenClaims {
        &self.claims
    }

    /// Check that this token permits `op` on `chunk` of `size` bytes, then record the use
    /// in the replay store so the same token cannot authorize that chunk again.
    /// Returns the matching grant (for stream tokens it carries the range to send).
    pub fn permit(
        &self,
        op: TxKind,
        chunk: &ChunkId,
        size: u64,
        replay: &ReplayStore,
    ) -> Result<Grant, TokenError> {
        let grant = self.check(op, chunk, size)?;
        replay.claim(self.claims.txid, chunk, self.claims.expires_at)?;
        Ok(grant)
    }

    /// The checks of [`permit`](Self::permit) without consuming the grant.
    pub fn check(&self, op: TxKind, chunk: &ChunkId, size: u64) -> Result<Grant, TokenError> {
        if !self.claims.kind.allows(op) {
            return Err(TokenError::WrongType {
                token: self.claims.kind,
                wanted: op,
            });
        }
        let grant = if self.claims.grants.is_empty() {
            // Only universal tokens may be empty: they cover any chunk within the limit.
            if size > u64::from(MAX_CHUNK_SIZE) {
                return Err(TokenError::SizeMismatch {
                    expected: MAX_CHUNK_SIZE,
                    got: size,
                });
            }
            Grant::whole(*chunk, size as u32)
        } else {
            *self
                .claims
                .grants
                .iter()
                .find(|g| &g.chunk == chunk)
                .ok_or(TokenError::NotInToken(*chunk))?
        };
        if u64::from(grant.size) != size {
            return Err(TokenError::SizeMismatch {
                expected: grant.size,
                got: size,
            });
        }
        Ok(grant)
    }
}
