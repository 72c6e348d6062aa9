//! The peer-to-peer protocol: what a client and a storage daemon say to each other over
//! QUIC (ALPN [`ALPN`], TLS 1.3, the daemon's self-signed certificate pinned by its
//! SHA-256 fingerprint).
//!
//! One request per client-opened bidirectional stream. The client writes the request and
//! finishes its send side (PUT may stream chunk bytes for a while first); the daemon
//! writes the reply and finishes its side. All integers are big-endian. Every length is
//! checked against a hard bound before anything is allocated or read.
//!
//! ```text
//! request   = op u8 | body
//!
//! op 0x01 PUT     token_len u32 (1..=MAX_TOKEN_LEN) | token [token_len]
//!                 | count u16 (1..=MAX_ENTRIES)
//!                 | count × ( chunk_id [32] | size u32 (≤ MAX_CHUNK_SIZE) | bytes [size] )
//!         reply   count × record   (one per chunk, in request order, sent after the last
//!                 chunk once the server has confirmed the stored ones: an Ok is a chunk
//!                 the server knows is here; stored but unconfirmed answers Internal)
//!
//! op 0x02 GET     token_len u32 | token | chunk_id [32] | size u32
//!         reply   record [| len u32 (= size) | bytes [len]   when status = Ok]
//!
//! op 0x03 STREAM  token_len u32 | token | chunk_id [32] | size u32 (whole chunk)
//!         reply   record [| offset u32 | len u32 | bytes [len]   when status = Ok]
//!                 (the range is the one the stream token grants)
//!
//! op 0x04 DELETE  token_len u32 | token (a delete token; universal ones are refused
//!                 wrong_type) | count u16 (1..=MAX_ENTRIES)
//!                 | count × ( chunk_id [32] | size u32 )
//!         reply   count × record
//!
//! op 0x05 STATUS  auth [68]  (a control::ControlAuth, direction server→peer, kind
//!                 StatusCheck, over an empty body, for this daemon's peer id)
//!         reply   record [| free u64 | used u64 | chunks u64   when status = Ok]
//!
//! op 0x06 AUDIT   auth [68] (a control::ControlAuth, direction server→peer, kind Audit,
//!                 over the 60 challenge bytes, for this daemon's peer id)
//!                 | challenge [60] (see crate::audit: chunk_id | size | offset | len | nonce)
//!         reply   record [| len u32 (≤ audit::MAX_ANSWER_LEN) | answer [len]   when Ok]
//!                 (NotFound: no such chunk here; SizeMismatch: stored size differs)
//!
//! record    = status u8 | detail u8
//!   status  0 Ok            detail 0
//!           1 BadToken      detail = TokenReason (below)
//!           2 HashMismatch  the bytes' BLAKE3 is not the chunk id
//!           3 SizeMismatch  the announced size is not the token's size for that chunk
//!           4 NoSpace       over the lent capacity, or the disk is full (ENOSPC)
//!           5 NotFound      no such chunk here (GET, STREAM, DELETE)
//!           6 TooLarge      a chunk size above MAX_CHUNK_SIZE (a token length above
//!                           MAX_TOKEN_LEN is BadToken oversized)
//!           7 Malformed     a request that does not parse (unknown op, bad count, early end)
//!           8 BadControl    detail = ControlReason (below)
//!           9 Internal      the daemon failed (I/O, replay store); try another holder
//!   TokenReason  1 bad_mac  2 malformed  3 oversized  4 unsupported_version
//!                5 wrong_target  6 expired  7 not_yet_valid  8 replayed  9 wrong_type
//!                10 not_in_token
//!   ControlReason 1 malformed  2 unknown_peer  3 wrong_direction  4 wrong_kind  5 bad_mac
//!                6 stale  7 replayed
//! ```
//!
//! **Fatal records.** A refusal that concerns the whole request — a token that does not
//! open, a token or chunk that is too large, a malformed frame — is sent once and ends
//! the reply: the daemon finishes its side and stops reading (`STOP_SENDING` with code
//! [`STOP_REFUSED`]). Every chunk of a PUT or DELETE that has no record of its own gets
//! that last record. A refusal that concerns one chunk (not in the token, replayed, wrong
//! size, hash mismatch, no space) is that chunk's record; for PUT the daemon then reads
//! and discards the chunk's bytes so the next chunk's header is found.
//!
//! **Order of the checks on each PUT chunk**, and what a refusal costs the client:
//! size bound (TooLarge, fatal) → token kind, coverage and size (BadToken wrong_type or
//! not_in_token, SizeMismatch) → lent capacity (NoSpace) → replay claim (BadToken
//! replayed) → bytes to a temporary file while hashing (HashMismatch; NoSpace on ENOSPC;
//! Internal) → fsync, rename, fsync dir → Ok. Refusals before the replay claim leave the
//! token usable for that chunk; from the claim on, a retry needs a new token. A chunk the
//! daemon already holds needs no capacity: its bytes are hashed and checked, not written.
//!
//! **Why a PUT stream carries one token and many chunks.** A batch token can name up to
//! 4096 chunks and be ~180 KB long; sending it again with every chunk would cost quadratic
//! bytes and one token open (HMAC + AES-GCM-SIV) per chunk. Yet one stream per batch would
//! serialize the whole batch. So the client picks: it splits a batch over a few streams
//! (each carrying the token once) so that chunks travel in parallel, and the daemon
//! verifies the token once per stream and each chunk against it (claiming the chunk in
//! the replay store *before* it accepts any of the chunk's bytes).
//!
//! **Replay.** Every chunk operation claims (token txid, chunk id) in the daemon's
//! persistent replay store before acting, so a token is good for one operation on each
//! chunk it names (a universal token too: one operation per chunk; a universal token never
//! deletes), even across daemon
//! restarts, until it expires.
//!
//! **Limits.** A daemon refuses connections beyond its total and per-address caps (QUIC
//! `CONNECTION_REFUSED`), allows a bounded number of concurrent streams per connection
//! (QUIC flow control makes further streams wait), and resets a stream whose next bytes
//! take longer than its read timeout or whose whole request takes longer than its
//! request timeout. Uni-directional streams are not used (limit 0).
//!
//! **Why GET carries one chunk.** Reads are latency-bound and the drive reads chunks in
//! parallel; one stream per chunk lets QUIC interleave them without head-of-line
//! blocking, and the reply length is known up front.

use std::fmt;

use crate::control::{ControlError, AUTH_LEN};
use crate::ids::ChunkId;
use crate::token::{TokenError, MAX_CHUNK_SIZE, MAX_ENTRIES, MAX_TOKEN_LEN};

/// The QUIC ALPN protocol id of this version of the peer protocol.
pub const ALPN: &[u8] = b"peerstash-peer/1";
/// The TLS server name clients use (the certificate is pinned, not name-checked).
pub const SERVER_NAME: &str = "peer.peerstash";
/// Application error code a daemon uses to stop reading a refused request.
pub const STOP_REFUSED: u32 = 1;
/// Application error code for closing a connection on shutdown.
pub const CLOSE_SHUTDOWN: u32 = 0;
/// Application error code for refusing a connection (too many).
pub const CLOSE_BUSY: u32 = 2;
/// Length of a chunk header inside PUT or DELETE: chunk id and size.
pub const CHUNK_HEADER_LEN: usize = 36;
/// Length of a reply record.
pub const RECORD_LEN: usize = 2;

/// The operation a stream asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Store chunks under a put (or universal) token.
    Put = 1,
    /// Fetch one whole chunk under a get token.
    Get = 2,
    /// Fetch the byte range a stream token grants.
    Stream = 3,
    /// Drop chunks under a delete token.
    Delete = 4,
    /// The server asks whether the daemon is up and how full it is.
    StatusCheck = 5,
    /// The server asks for a proof that the daemon holds a chunk.
    Audit = 6,
}

impl Op {
    /// Parse the op byte.
    pub fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Put,
            2 => Op::Get,
            3 => Op::Stream,
            4 => Op::Delete,
            5 => Op::StatusCheck,
            6 => Op::Audit,
            _ => return None,
        })
    }
}

/// Which token check failed, as carried in a `BadToken` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TokenReason {
    /// A detail byte this version does not know.
    Unknown = 0,
    /// Signature does not verify: forged, tampered, or sealed with another key.
    BadMac = 1,
    /// Does not parse (truncated, bad lengths, bad fields).
    Malformed = 2,
    /// Longer than any token can be.
    Oversized = 3,
    /// A version or flag this daemon does not speak.
    UnsupportedVersion = 4,
    /// Addressed to another peer.
    WrongTarget = 5,
    /// Past its expiry.
    Expired = 6,
    /// Issued in the future.
    NotYetValid = 7,
    /// Already used for this chunk.
    Replayed = 8,
    /// The token's kind does not allow this operation.
    WrongType = 9,
    /// The chunk is not one the token covers.
    NotInToken = 10,
}

impl TokenReason {
    fn from_u8(b: u8) -> TokenReason {
        use TokenReason::*;
        match b {
            1 => BadMac,
            2 => Malformed,
            3 => Oversized,
            4 => UnsupportedVersion,
            5 => WrongTarget,
            6 => Expired,
            7 => NotYetValid,
            8 => Replayed,
            9 => WrongType,
            10 => NotInToken,
            _ => Unknown,
        }
    }

    /// The same stable name as [`TokenError::reason`].
    pub fn as_str(self) -> &'static str {
        use TokenReason::*;
        match self {
            Unknown => "unknown",
            BadMac => "bad_mac",
            Malformed => "malformed",
            Oversized => "oversized",
            UnsupportedVersion => "unsupported_version",
            WrongTarget => "wrong_target",
            Expired => "expired",
            NotYetValid => "not_yet_valid",
            Replayed => "replayed",
            WrongType => "wrong_type",
            NotInToken => "not_in_token",
        }
    }
}

impl fmt::Display for TokenReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which control-message check failed, as carried in a `BadControl` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ControlReason {
    /// A detail byte this version does not know.
    Unknown = 0,
    /// Not a well-formed authentication block.
    Malformed = 1,
    /// Not for this daemon's peer.
    UnknownPeer = 2,
    /// Sent the wrong way (a reflected message).
    WrongDirection = 3,
    /// Not the kind of control message this operation takes.
    WrongKind = 4,
    /// The MAC does not verify.
    BadMac = 5,
    /// Timestamp outside the window.
    Stale = 6,
    /// Counter not above the last one accepted.
    Replayed = 7,
}

impl ControlReason {
    fn from_u8(b: u8) -> ControlReason {
        use ControlReason::*;
        match b {
            1 => Malformed,
            2 => UnknownPeer,
            3 => WrongDirection,
            4 => WrongKind,
            5 => BadMac,
            6 => Stale,
            7 => Replayed,
            _ => Unknown,
        }
    }
}

impl From<&ControlError> for ControlReason {
    fn from(e: &ControlError) -> Self {
        match e {
            ControlError::Malformed(_) => ControlReason::Malformed,
            ControlError::UnknownPeer(_) => ControlReason::UnknownPeer,
            ControlError::WrongDirection => ControlReason::WrongDirection,
            ControlError::WrongKind { .. } => ControlReason::WrongKind,
            ControlError::BadMac => ControlReason::BadMac,
            ControlError::Stale { .. } => ControlReason::Stale,
            ControlError::Replayed { .. } => ControlReason::Replayed,
        }
    }
}

/// A daemon's refusal, as one reply record carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Refusal {
    /// The token failed a check.
    #[error("token refused: {0}")]
    BadToken(TokenReason),
    /// The bytes' hash is not the chunk id.
    #[error("chunk bytes do not hash to the chunk id")]
    HashMismatch,
    /// The announced size is not the token's.
    #[error("chunk size does not match the token")]
    SizeMismatch,
    /// Over the lent capacity or the disk is full.
    #[error("no space left on the peer")]
    NoSpace,
    /// The chunk is not stored there.
    #[error("chunk not found on the peer")]
    NotFound,
    /// A size or length above the protocol's bounds.
    #[error("request exceeds the protocol's size limits")]
    TooLarge,
    /// The request does not parse.
    #[error("malformed request")]
    Malformed,
    /// A status check's authentication failed.
    #[error("control message refused: {0:?}")]
    BadControl(ControlReason),
    /// The daemon failed.
    #[error("the peer failed internally")]
    Internal,
}

impl Refusal {
    /// The status and detail bytes.
    pub fn encode(self) -> [u8; RECORD_LEN] {
        match self {
            Refusal::BadToken(r) => [1, r as u8],
            Refusal::HashMismatch => [2, 0],
            Refusal::SizeMismatch => [3, 0],
            Refusal::NoSpace => [4, 0],
            Refusal::NotFound => [5, 0],
            Refusal::TooLarge => [6, 0],
            Refusal::Malformed => [7, 0],
            Refusal::BadControl(r) => [8, r as u8],
            Refusal::Internal => [9, 0],
        }
    }

    /// A short stable name, for failure reports to the server.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::BadToken(r) => r.as_str(),
            Refusal::HashMismatch => "hash_mismatch",
            Refusal::SizeMismatch => "size_mismatch",
            Refusal::NoSpace => "no_space",
            Refusal::NotFound => "not_found",
            Refusal::TooLarge => "too_large",
            Refusal::Malformed => "malformed_request",
            Refusal::BadControl(_) => "bad_control",
            Refusal::Internal => "internal",
        }
    }
}

impl From<&TokenError> for Refusal {
    fn from(e: &TokenError) -> Self {
        use TokenReason as R;
        match e {
            TokenError::BadMac => Refusal::BadToken(R::BadMac),
            TokenError::Malformed(_) => Refusal::BadToken(R::Malformed),
            TokenError::Oversized(_) => Refusal::BadToken(R::Oversized),
            TokenError::UnsupportedVersion(_) => Refusal::BadToken(R::UnsupportedVersion),
            TokenError::WrongTarget { .. } => Refusal::BadToken(R::WrongTarget),
            TokenError::Expired { .. } => Refusal::BadToken(R::Expired),
            TokenError::NotYetValid { .. } => Refusal::BadToken(R::NotYetValid),
            TokenError::Replayed => Refusal::BadToken(R::Replayed),
            TokenError::WrongType { .. } => Refusal::BadToken(R::WrongType),
            TokenError::NotInToken(_) => Refusal::BadToken(R::NotInToken),
            TokenError::SizeMismatch { .. } => Refusal::SizeMismatch,
            TokenError::ReplayStore(_) => Refusal::Internal,
        }
    }
}

/// A reply record that does not parse: the peer speaks another protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown status byte {0} in a reply")]
pub struct UnknownStatus(pub u8);

/// Encode a record: `Ok(())` or a refusal.
pub fn encode_record(r: Result<(), Refusal>) -> [u8; RECORD_LEN] {
    match r {
        Ok(()) => [0, 0],
        Err(e) => e.encode(),
    }
}

/// Decode a record.
pub fn decode_record(b: [u8; RECORD_LEN]) -> Result<Result<(), Refusal>, UnknownStatus> {
    Ok(Err(match b[0] {
        0 => return Ok(Ok(())),
        1 => Refusal::BadToken(TokenReason::from_u8(b[1])),
        2 => Refusal::HashMismatch,
        3 => Refusal::SizeMismatch,
        4 => Refusal::NoSpace,
        5 => Refusal::NotFound,
        6 => Refusal::TooLarge,
        7 => Refusal::Malformed,
        8 => Refusal::BadControl(ControlReason::from_u8(b[1])),
        9 => Refusal::Internal,
        s => return Err(UnknownStatus(s)),
    }))
}

/// The start of a token-carrying request: op, token length, token.
pub fn encode_token_head(op: Op, token: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(5 + token.len() + 2);
    b.push(op as u8);
    b.extend_from_slice(&(token.len() as u32).to_be_bytes());
    b.extend_from_slice(token);
    b
}

/// A chunk header (PUT, DELETE) or a chunk reference (GET, STREAM).
pub fn encode_chunk_header(chunk: &ChunkId, size: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[..32].copy_from_slice(chunk.as_bytes());
    b[32..].copy_from_slice(&size.to_be_bytes());
    b
}

/// Parse a chunk header. Sizes above [`MAX_CHUNK_SIZE`] are the caller's to refuse.
pub fn decode_chunk_header(b: &[u8; CHUNK_HEADER_LEN]) -> (ChunkId, u32) {
    let mut id = [0u8; 32];
    id.copy_from_slice(&b[..32]);
    (
        ChunkId(id),
        u32::from_be_bytes(b[32..].try_into().expect("4 bytes")),
    )
}

/// Check a token length prefix against the bound before anything is allocated.
pub fn check_token_len(len: u32) -> Result<usize, Refusal> {
    let len = len as usize;
    if len == 0 {
        Err(Refusal::BadToken(TokenReason::Malformed))
    } else if len > MAX_TOKEN_LEN {
        Err(Refusal::BadToken(TokenReason::Oversized))
    } else {
        Ok(len)
    }
}

/// Check a chunk count (PUT, DELETE).
pub fn check_count(count: u16) -> Result<usize, Refusal> {
    let count = usize::from(count);
    if count == 0 || count > MAX_ENTRIES {
        Err(Refusal::Malformed)
    } else {
        Ok(count)
    }
}

/// Check a chunk size.
pub fn check_size(size: u32) -> Result<(), Refusal> {
    if size > MAX_CHUNK_SIZE {
        Err(Refusal::TooLarge)
    } else {
        Ok(())
    }
}

/// Encoded length of a status-check request's body.
pub const STATUS_AUTH_LEN: usize = AUTH_LEN;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let all = [
            Ok(()),
            Err(Refusal::BadToken(TokenReason::Replayed)),
            Err(Refusal::BadToken(TokenReason::NotInToken)),
            Err(Refusal::HashMismatch),
            Err(Refusal::SizeMismatch),
            Err(Refusal::NoSpace),
            Err(Refusal::NotFound),
            Err(Refusal::TooLarge),
            Err(Refusal::Malformed),
            Err(Refusal::BadControl(ControlReason::Stale)),
            Err(Refusal::Internal),
        ];
        for r in all {
            assert_eq!(decode_record(encode_record(r)).unwrap(), r);
        }
        assert_eq!(decode_record([200, 0]), Err(UnknownStatus(200)));
    }

    #[test]
    fn every_report_reason_is_in_the_closed_set_the_server_counts() {
        // Every detail byte, known or not, and every other refusal.
        let mut all: Vec<Refusal> = (0..=255u8)
            .map(|b| Refusal::BadToken(TokenReason::from_u8(b)))
            .collect();
        all.extend((0..=255u8).map(|b| Refusal::BadControl(ControlReason::from_u8(b))));
        all.extend([
            Refusal::HashMismatch,
            Refusal::SizeMismatch,
            Refusal::NoSpace,
            Refusal::NotFound,
            Refusal::TooLarge,
            Refusal::Malformed,
            Refusal::Internal,
        ]);
        for r in all {
            assert!(
                crate::api::REJECTED_REASONS.contains(&r.reason()),
                "{r:?} reports {:?}, which the server would count as other",
                r.reason()
            );
        }
    }

    #[test]
    fn bounds_are_enforced() {
        assert!(check_token_len(0).is_err());
        assert_eq!(
            check_token_len(MAX_TOKEN_LEN as u32 + 1),
            Err(Refusal::BadToken(TokenReason::Oversized))
        );
        assert!(check_count(0).is_err());
        assert!(check_count(MAX_ENTRIES as u16 + 1).is_err());
        assert_eq!(check_size(MAX_CHUNK_SIZE + 1), Err(Refusal::TooLarge));
        let c = ChunkId::of(b"x");
        assert_eq!(decode_chunk_header(&encode_chunk_header(&c, 7)), (c, 7));
    }
}
