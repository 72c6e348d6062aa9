//! The server's HTTP API: request and response bodies (JSON), shared by the server, the
//! storage daemon and the drive. Paths are versioned under `/v1/`. Every endpoint except
//! register and login requires a [`crate::control::ControlAuth`] in the
//! [`crate::control::AUTH_HEADER`] header, of the [`MessageKind`] named below.
//!
//! Errors come back as a 4xx/5xx status with an [`ApiError`] body.

use serde::{Deserialize, Serialize};

use crate::control::MessageKind;
use crate::ids::{ChunkId, Fingerprint, PeerId, TransactionId};
use crate::token::Token;

/// Most bytes a request body may have; the server refuses larger ones with 413.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Largest sealed root record the server keeps.
pub const MAX_ROOT_BYTES: usize = 64 << 10;
/// Most versions one root drop request may name.
pub const MAX_ROOT_DROP: usize = 1024;
/// Most chunks one put, get or release request may name.
pub const MAX_CHUNKS_PER_REQUEST: usize = 4096;
/// Longest user name.
pub const MAX_NAME_LEN: usize = 64;

/// Endpoint paths and the message kind each one's authentication must carry.
pub mod path {
    /// `POST`, unauthenticated (invite-gated, rate-limited): [`super::RegisterRequest`].
    pub const REGISTER: &str = "/v1/register";
    /// `POST`, unauthenticated (rate-limited): [`super::LoginRequest`].
    pub const LOGIN: &str = "/v1/login";
    /// `POST` [`super::HeartbeatRequest`] → [`super::HeartbeatResponse`].
    pub const HEARTBEAT: &str = "/v1/heartbeat";
    /// `POST` [`super::PutRequest`] → [`super::PutResponse`].
    pub const PUT: &str = "/v1/put";
    /// `POST` [`super::ConfirmRequest`] (from the target) → [`super::ConfirmResponse`].
    pub const CONFIRM: &str = "/v1/confirm";
    /// `POST` [`super::GetRequest`] → [`super::GetResponse`].
    pub const GET: &str = "/v1/get";
    /// `POST` [`super::ReleaseRequest`] → [`super::ReleaseResponse`].
    pub const RELEASE: &str = "/v1/release";
    /// `POST` [`super::ReportRequest`] → `{}`.
    pub const REPORT: &str = "/v1/report";
    /// `POST` [`super::StatusRequest`] → [`super::StatusResponse`].
    pub const STATUS: &str = "/v1/status";
    /// `POST` [`super::PutRootRequest`] → [`super::PutRootResponse`] (409 `stale_root`
    /// when the version is not newer than the latest kept one).
    pub const ROOT: &str = "/v1/root";
    /// `POST` [`super::GetRootRequest`] → [`super::GetRootResponse`].
    pub const ROOT_GET: &str = "/v1/root/get";
    /// `POST` [`super::DropRootsRequest`] → [`super::DropRootsResponse`] (409
    /// `latest_root` when it names the latest kept version).
    pub const ROOT_DROP: &str = "/v1/root/drop";
    /// `POST` [`super::InventoryRequest`] (from a storage daemon) →
    /// [`super::InventoryResponse`].
    pub const INVENTORY: &str = "/v1/inventory";
    /// `GET`: `ok`.
    pub const HEALTHZ: &str = "/healthz";
    /// `GET`: Prometheus text format.
    pub const METRICS: &str = "/metrics";
}

/// The message kind an authenticated endpoint expects, by path.
pub fn kind_for_path(p: &str) -> Option<MessageKind> {
    Some(match p {
        path::HEARTBEAT => MessageKind::Heartbeat,
        path::PUT => MessageKind::Put,
        path::CONFIRM => MessageKind::Confirm,
        path::GET => MessageKind::Get,
        path::RELEASE => MessageKind::Release,
        path::REPORT => MessageKind::Report,
        path::STATUS => MessageKind::Status,
        path::ROOT | path::ROOT_GET | path::ROOT_DROP => MessageKind::Root,
        path::INVENTORY => MessageKind::Inventory,
        _ => return None,
    })
}

/// Defines [`Reason`] with one wire name per variant, so the name is written once.
macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal,)*) => {
        /// Why the server refused a request: the `reason` of an [`ApiError`]. The server
        /// sends it and clients act on it through this one type, never a string literal.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $($(#[doc = $doc])* $variant,)*
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// Its name on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name,)*
                }
            }
        }
    };
}

reasons! {
    /// The request is not what the endpoint takes.
    BadRequest = "bad_request",
    /// The body is not valid JSON for the endpoint.
    BadJson = "bad_json",
    /// A field or header is malformed.
    Malformed = "malformed",
    /// The body or a list in it is past its bound.
    TooLarge = "too_large",
    /// No such endpoint (or object).
    NotFound = "not_found",
    /// The endpoint takes another HTTP method.
    MethodNotAllowed = "method_not_allowed",
    /// The request took too long.
    Timeout = "timeout",
    /// Too many requests from this address or peer: retry later.
    RateLimited = "rate_limited",
    /// The server failed; the detail is in its log.
    Internal = "internal",
    /// Registration needs a valid, unspent invite.
    BadInvite = "bad_invite",
    /// The peer name is taken.
    NameTaken = "name_taken",
    /// The peer name is not acceptable.
    BadName = "bad_name",
    /// The password is not acceptable.
    BadPassword = "bad_password",
    /// The lent size is not acceptable.
    BadLend = "bad_lend",
    /// The storage address is not acceptable.
    BadAddress = "bad_address",
    /// Wrong name or password.
    BadCredentials = "bad_credentials",
    /// The peer is not registered.
    UnknownPeer = "unknown_peer",
    /// A control message in the wrong direction.
    WrongDirection = "wrong_direction",
    /// A control message for another kind of endpoint.
    WrongKind = "wrong_kind",
    /// A control message whose MAC does not verify under the peer's key.
    BadMac = "bad_mac",
    /// A control message outside the accepted clock window.
    Stale = "stale",
    /// A control message seen before.
    Replayed = "replayed",
    /// Storing this would exceed the user's quota.
    OverQuota = "over_quota",
    /// Not enough distinct online peers with room for the copies asked for.
    NotEnoughPeers = "not_enough_peers",
    /// A root version not above the latest stored one.
    StaleRoot = "stale_root",
    /// The latest root cannot be dropped.
    LatestRoot = "latest_root",
    /// A root record past its bound.
    RootTooLarge = "root_too_large",
}

impl Reason {
    /// The reason named `name`, if this build knows it (a newer server may send others).
    pub fn parse(name: &str) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| r.as_str() == name)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error body: a stable machine-readable reason and a sentence for the user.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    /// Stable reason, e.g. `over_quota`, `bad_mac`, `replayed`, `bad_invite`.
    pub reason: String,
    /// What went wrong and what to do next.
    pub message: String,
}

/// How the user's data key is kept.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyMode {
    /// The server derives it from its master secret and the peer id; login restores it.
    #[default]
    Escrow,
    /// Derived on the client from a recovery passphrase the server never sees.
    Passphrase,
}

/// Register a new peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// Unique user name, 1..=64 chars of `[A-Za-z0-9._-]`.
    pub name: String,
    /// Login password (kept only as an Argon2id hash).
    pub password: String,
    /// One-time invite code (required unless the server runs with open registration).
    pub invite: Option<String>,
    /// Bytes this peer lends to others.
    pub lend_bytes: u64,
    /// `host:port` where the storage daemon listens (QUIC).
    pub quic_addr: String,
    /// SHA-256 of the daemon's QUIC certificate, pinned by clients.
    pub cert_fingerprint: Fingerprint,
    /// How the data key is kept.
    #[serde(default)]
    pub key_mode: KeyMode,
}

/// The new peer's identity and secrets, sent this once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// Assigned id.
    pub peer_id: PeerId,
    /// The transaction key, hex (64 digits).
    pub transaction_key: String,
    /// The escrowed data key, hex, in escrow mode.
    pub data_key: Option<String>,
    /// Bytes this peer may store (all replicas counted).
    pub quota_bytes: u64,
}

/// Log in again (after a reinstall).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginRequest {
    /// User name.
    pub name: String,
    /// Password.
    pub password: String,
}

/// Keys recovered by a login.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginResponse {
    /// The peer's id.
    pub peer_id: PeerId,
    /// The transaction key, hex.
    pub transaction_key: String,
    /// The escrowed data key, hex, in escrow mode.
    pub data_key: Option<String>,
    /// How the data key is kept.
    pub key_mode: KeyMode,
    /// What the peer registered with.
    pub lend_bytes: u64,
    /// The daemon address on record.
    pub quic_addr: String,
    /// Bytes this peer may store.
    pub quota_bytes: u64,
}

/// A storage daemon's periodic report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// Where the daemon listens now.
    pub quic_addr: String,
    /// Fingerprint of its current QUIC certificate.
    pub cert_fingerprint: Fingerprint,
    /// Bytes of lent space still free.
    pub free_bytes: u64,
    /// Bytes stored for others.
    pub used_bytes: u64,
    /// Chunks dropped since the last heartbeat (after the server released them).
    #[serde(default)]
    pub dropped: Vec<ChunkId>,
}

/// What the server wants the daemon to know.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct HeartbeatResponse {
    /// Chunks nobody references any more: the daemon may delete them.
    pub drop: Vec<ChunkId>,
    /// Seconds until the next heartbeat is due.
    pub interval_secs: u64,
    /// Chunks to copy here from a live holder, to bring them back to their replica
    /// target after a peer was lost (at most [`MAX_REPAIRS_PER_HEARTBEAT`]).
    #[serde(default)]
    pub repairs: Vec<RepairOrder>,
    /// Seconds between two inventory reconciliations ([`InventoryRequest`]); 0 (and
    /// absent, from older servers): do not reconcile.
    #[serde(default)]
    pub reconcile_secs: u64,
    /// A chunk the server does not expect on this daemon is deleted once no put has
    /// stored it for this many seconds.
    #[serde(default)]
    pub orphan_grace_secs: u64,
}

/// A storage daemon's inventory check: of these chunks on its disk, which does the server
/// not expect it to hold? At most [`MAX_CHUNKS_PER_REQUEST`] chunks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InventoryRequest {
    /// Chunks stored on the daemon's disk.
    pub chunks: Vec<ChunkId>,
}

/// The server's answer to an [`InventoryRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InventoryResponse {
    /// The named chunks the daemon holds for nobody: no owner has a location on it, and
    /// no placement on it is pending (expired ones count until the server forgets them).
    pub unknown: Vec<ChunkId>,
}

/// Most shards (data + parity) in one erasure-coded stripe.
pub const MAX_STRIPE_SHARDS: usize = 32;

/// Most repair orders one heartbeat response carries.
pub const MAX_REPAIRS_PER_HEARTBEAT: usize = 64;

/// Make one chunk on the daemon that receives this order, then store it under
/// `put.token` (a put token sealed for this daemon) and confirm `put.txid` like any
/// stored chunk. Exactly one of `source` and `rebuild` is set:
/// - `source`: copy the chunk from a live holder, under a get token sealed for that
///   holder (naming this daemon as requester), checking its hash;
/// - `rebuild`: the chunk is a shard of an erasure-coded stripe whose holder was lost:
///   fetch `k` other shards of the stripe and recompute it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepairOrder {
    /// The chunk (or shard).
    pub chunk: ChunkId,
    /// Its stored size.
    pub size: u32,
    /// A live holder and the get token for it.
    #[serde(default)]
    pub source: Option<Placement>,
    /// How to recompute a lost shard.
    #[serde(default)]
    pub rebuild: Option<Rebuild>,
    /// This daemon and the put token that lets it store the chunk.
    pub put: Placement,
}

/// Recompute shard `index` of `stripe` from other shards.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rebuild {
    /// The stripe: geometry and every shard's id.
    pub stripe: StripeRef,
    /// Which shard to recompute (0-based, data shards first).
    pub index: u8,
    /// Live holders of other shards, each with a get token for the shards it lists.
    pub sources: Vec<Placement>,
}

/// A chunk stored as an erasure-coded stripe (see `peerstash::erasure`): `data` + `parity`
/// shards, each stored as a chunk of its own on a distinct peer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StripeRef {
    /// The chunk's id (BLAKE3 of its stored bytes).
    pub chunk: ChunkId,
    /// The chunk's stored size.
    pub chunk_size: u32,
    /// Data shards (`k`).
    pub data: u8,
    /// Parity shards (`m`).
    pub parity: u8,
    /// The shards, data first, each with its own id and size.
    pub shards: Vec<ChunkRef>,
}

/// A chunk to store.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkRef {
    /// BLAKE3 of the stored (encrypted) bytes.
    pub id: ChunkId,
    /// Stored size in bytes.
    pub size: u32,
}

/// Ask where to store chunks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PutRequest {
    /// The chunks.
    pub chunks: Vec<ChunkRef>,
    /// Distinct peers each chunk should live on.
    pub replicas: u8,
    /// Peers to avoid (e.g. ones that just failed).
    #[serde(default)]
    pub exclude: Vec<PeerId>,
    /// Chunks to store erasure-coded instead: each stripe's shards go to distinct peers,
    /// one copy each (`replicas` does not apply to them). Placements name shards.
    #[serde(default)]
    pub stripes: Vec<StripeRef>,
}

/// One target peer and the batch token that lets the requester use it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Placement {
    /// The peer to contact.
    pub target: PeerId,
    /// Its QUIC address.
    pub addr: String,
    /// Its certificate fingerprint, to pin.
    pub fingerprint: Fingerprint,
    /// The token's transaction id (for confirms and reports).
    pub txid: TransactionId,
    /// Unix seconds when the token expires.
    pub expires_at: u64,
    /// The sealed token (hex in JSON).
    pub token: Token,
    /// The chunks the token covers on this target.
    pub chunks: Vec<ChunkId>,
    /// Whether the server heard from this peer lately (absent from older servers: taken
    /// as online). Readers spread their fetches over online holders.
    #[serde(default = "online_by_default")]
    pub online: bool,
    /// How to reach it: directly at `addr` (the default, and what older servers mean), or
    /// through the server's rendezvous when it sits behind NAT (see `docs/PROTOCOL.md`,
    /// "Peers behind NAT"). `addr` is then its own, private, address.
    #[serde(default, skip_serializing_if = "Route::is_direct")]
    pub route: Route,
}

fn online_by_default() -> bool {
    true
}

/// How a client reaches a storage daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Connect to its address: it is public, or its router forwards a port to it.
    #[default]
    Direct,
    /// Behind a NAT that keeps one public port per socket: ask the server to have it
    /// punch towards us, then connect to the address the server saw it from (falling back
    /// on the relay).
    Punch,
    /// Behind a NAT that picks a new port per destination: only a relay reaches it.
    Relay,
}

impl Route {
    /// Whether this is [`Route::Direct`].
    pub fn is_direct(&self) -> bool {
        *self == Route::Direct
    }
}

/// Where to send each chunk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PutResponse {
    /// One per target.
    pub placements: Vec<Placement>,
    /// Chunks already stored with enough replicas: nothing to send.
    pub already_stored: Vec<ChunkId>,
}

/// A target reports what it stored under a put token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfirmRequest {
    /// The token's transaction id.
    pub txid: TransactionId,
    /// Chunks stored and fsynced.
    pub chunks: Vec<ChunkId>,
}

/// How many locations were committed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfirmResponse {
    /// Locations committed by this confirm.
    pub committed: usize,
    /// Chunks the server did not expect on this daemon (no pending placement, no
    /// location): the daemon must tell the uploader they are not stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unexpected: Vec<ChunkId>,
}

/// Ask for holders of chunks the requester owns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetRequest {
    /// The chunks.
    pub chunks: Vec<ChunkId>,
}

/// Get tokens, one per holder (online holders first).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetResponse {
    /// One per holder; a chunk may appear in several.
    pub placements: Vec<Placement>,
    /// Chunks with no committed holder (or not owned by the requester).
    pub missing: Vec<ChunkId>,
    /// Chunks stored as stripes: fetch `k` of their shards (the placements name shards).
    #[serde(default)]
    pub stripes: Vec<StripeRef>,
}

/// Release chunks no longer referenced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseRequest {
    /// The chunks.
    pub chunks: Vec<ChunkId>,
}

/// How many were released.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseResponse {
    /// Chunks released.
    pub released: usize,
}

/// Every reason a storage daemon puts in a [`ReportRequest::Rejected`]: the names of
/// `peer::wire::Refusal::reason` (token reasons included). The server counts any other
/// string as `other`, so a peer cannot grow the server's metrics with made-up reasons.
pub const REJECTED_REASONS: &[&str] = &[
    "unknown",
    "bad_mac",
    "malformed",
    "oversized",
    "unsupported_version",
    "wrong_target",
    "expired",
    "not_yet_valid",
    "replayed",
    "wrong_type",
    "not_in_token",
    "hash_mismatch",
    "size_mismatch",
    "no_space",
    "not_found",
    "too_large",
    "malformed_request",
    "bad_control",
    "internal",
];

/// Something that went wrong between peers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReportRequest {
    /// A daemon refused a token or a chunk.
    Rejected {
        /// Who presented it (from the token when it opened, else unknown).
        requester: Option<PeerId>,
        /// The token's transaction id, when known.
        txid: Option<TransactionId>,
        /// A [`crate::token::TokenError::reason`] or a daemon reason.
        reason: String,
    },
    /// A client received a chunk whose hash was wrong.
    BadChunk {
        /// The holder that sent it.
        holder: PeerId,
        /// The chunk asked for.
        chunk: ChunkId,
    },
    /// A client could not complete a transfer.
    TransferFailed {
        /// The target.
        target: PeerId,
        /// The token's transaction id.
        txid: TransactionId,
        /// Chunks not stored.
        chunks: Vec<ChunkId>,
    },
}

/// Ask for the requester's account. `{}` asks for everything.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusRequest {
    /// Count the requester's chunks and how many are below their replica target (a scan
    /// of everything it stores). The drive polls its quota with `false`: the figures cost
    /// time in proportion to the data stored, the quota does not.
    #[serde(default = "figures_by_default")]
    pub figures: bool,
}

fn figures_by_default() -> bool {
    true
}

/// The requester's account.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusResponse {
    /// The peer asking.
    pub peer_id: PeerId,
    /// Its name.
    pub name: String,
    /// Peers online now.
    pub peers_online: usize,
    /// Peers registered.
    pub peers_total: usize,
    /// Bytes it may store (all replicas counted).
    pub quota_bytes: u64,
    /// Bytes it stores now (all replicas counted, confirmed and pending).
    pub used_bytes: u64,
    /// Bytes it lends.
    pub lend_bytes: u64,
    /// Bytes of others' chunks it holds.
    pub holding_bytes: u64,
    /// Of those, bytes that passed an audit: what its quota grows with (lend 1.5, store
    /// 1). Absent when the server runs no audits (the quota then follows the lent figure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audited_bytes: Option<u64>,
    /// Distinct chunks it stores (absent when the request asked for no figures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<u64>,
    /// Of those, chunks with fewer online holders than its replica target (repair brings
    /// them back once a lost holder stays away past the server's grace period). Absent
    /// when the request asked for no figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks_below_target: Option<u64>,
    /// Its replica target (the replicas its last put asked for). Absent when the request
    /// asked for no figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u8>,
    /// Its own storage daemon's audit record, as the server keeps it.
    #[serde(default)]
    pub standing: Option<PeerStanding>,
    /// How other peers reach its storage daemon, as the daemon's live rendezvous
    /// connection tells the server: `public`, `mapped` (its router forwards a port, and
    /// the server reached the daemon through it), `punch` (behind NAT, hole punching) or
    /// `relay` (behind a symmetric NAT). Absent while the daemon has no such connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reach: Option<String>,
    /// The address the server sees that connection come from (the daemon's public side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reach_addr: Option<String>,
    /// With `mapped`: the protocol the router made the mapping with (`PCP`, `NAT-PMP`,
    /// `UPnP-IGD`), as the daemon says; absent from daemons that do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped_by: Option<String>,
}

/// A storage daemon's audit record and standing (see `docs/SECURITY.md`, audits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStanding {
    /// Audits passed.
    pub audits_passed: u64,
    /// Audits failed or unanswered.
    pub audits_failed: u64,
    /// Weighted pass rate of the audits it answered, 0 to 1.
    pub reputation: f64,
    /// Weighted share of its audits it answered, 0 to 1.
    pub uptime: f64,
    /// `good`, `suspended` or `disqualified`.
    pub standing: String,
    /// Whether the server places new chunks on it.
    pub receiving_placements: bool,
}

/// Store a new sealed root record (the encrypted pointer to the drive's latest snapshot).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PutRootRequest {
    /// Snapshot version: must be greater than every version the server kept.
    pub version: u64,
    /// The sealed root record, hex (at most [`MAX_ROOT_BYTES`] bytes once decoded).
    pub sealed: String,
}

/// What the server keeps after a root put.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PutRootResponse {
    /// Versions kept, newest first.
    pub kept: Vec<u64>,
}

/// Ask for a sealed root record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GetRootRequest {
    /// A given version, or `None` for the latest.
    #[serde(default)]
    pub version: Option<u64>,
}

/// A sealed root record, if the peer has one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetRootResponse {
    /// The record's version, creation time (ms since the epoch) and sealed bytes (hex);
    /// `None` when the peer never stored a root (or that version is not kept).
    pub root: Option<RootRecord>,
    /// Versions kept, newest first.
    pub kept: Vec<u64>,
}

/// A kept sealed root record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootRecord {
    /// Snapshot version.
    pub version: u64,
    /// When the server received it (ms since the epoch).
    pub created_ms: u64,
    /// The sealed record, hex.
    pub sealed: String,
}

/// Forget earlier sealed root records (expired snapshots). Versions the server does not
/// keep are ignored; the latest kept version cannot be dropped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DropRootsRequest {
    /// Versions to forget (at most [`MAX_ROOT_DROP`]).
    pub versions: Vec<u64>,
}

/// What the server keeps after a drop.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DropRootsResponse {
    /// Versions kept, newest first.
    pub kept: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::Reason;

    #[test]
    fn every_reason_has_its_own_name_and_parses_back() {
        let mut names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(*r));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len(), "two reasons share a name");
        assert_eq!(Reason::parse("made_up"), None);
    }
}
