//! Authenticated control messages between a peer and the server, in both directions.
//!
//! Every request a peer sends the server (and every status check the server sends a
//! peer) carries a [`ControlAuth`]: who sends, which way, what kind of message, a channel
//! and a counter, a timestamp, and an HMAC-SHA256 under the peer's control subkey over all
//! of it plus the BLAKE3 hash of the body. The receiver accepts a message only if the MAC
//! verifies, the timestamp is inside its window (and not before the receiver started, so a
//! restart does not reopen the window), and the counter is strictly greater than the last
//! one accepted on that channel. Channels let one peer keep several requests in flight:
//! each channel is strictly ordered, and a sender uses one channel per concurrent request.
//!
//! Wire form (68 bytes, sent as 136 hex digits in the `x-peerstash-auth` HTTP header or as
//! raw bytes over QUIC): `version u8 | direction u8 | peer u64 | kind u16 | channel u64 |
//! counter u64 | timestamp_ms u64 | mac [32]`.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::ids::PeerId;
use crate::keys::{ControlKey, TransactionKey};

/// The HTTP header that carries a control message's authentication.
pub const AUTH_HEADER: &str = "x-peerstash-auth";
/// Encoded length of a [`ControlAuth`].
pub const AUTH_LEN: usize = 68;
/// Default acceptance window for timestamps, either side of the receiver's clock.
pub const DEFAULT_WINDOW_MS: u64 = 120_000;

const VERSION: u8 = 1;
const MAC_DOMAIN: &[u8] = b"peerstash/control/v1";

/// Which way a message travels; part of the MAC, so a message cannot be reflected back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A peer asking the server.
    PeerToServer = 1,
    /// The server asking a peer (online checks).
    ServerToPeer = 2,
}

/// What a control message is for; part of the MAC, so a body cannot be replayed to another
/// endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MessageKind {
    /// Peer reports online, free space, address.
    Heartbeat = 1,
    /// Client asks where to store chunks.
    Put = 2,
    /// Target reports what it stored.
    Confirm = 3,
    /// Client asks where its chunks are.
    Get = 4,
    /// Client releases chunks it no longer references.
    Release = 5,
    /// Peer or client reports a failure (bad token, bad hash, failed transfer).
    Report = 6,
    /// Peer asks for its account status (quota, peers online).
    Status = 7,
    /// Server checks that a peer is online.
    StatusCheck = 8,
    /// Reserved: no endpoint uses it (chunks to drop travel in heartbeat responses).
    Releases = 9,
    /// Peer reads or writes its encrypted root pointer (snapshots).
    Root = 10,
    /// Storage daemon asks which of the chunks on its disk the server expects it to hold.
    Inventory = 11,
    /// Server audits a chunk a peer holds (see [`crate::audit`]).
    Audit = 12,
    /// Peer to server over the rendezvous connection: a daemon announcing how it is
    /// reached, or a client asking to reach a peer behind NAT (see `peer::rendezvous`).
    Rendezvous = 13,
    /// Server to peer over the daemon's rendezvous connection: punch towards a client, or
    /// join a relay session.
    RendezvousOrder = 14,
}

impl MessageKind {
    fn from_u16(v: u16) -> Option<MessageKind> {
        use MessageKind::*;
        Some(match v {
            1 => Heartbeat,
            2 => Put,
            3 => Confirm,
            4 => Get,
            5 => Release,
            6 => Report,
            7 => Status,
            8 => StatusCheck,
            9 => Releases,
            10 => Root,
            11 => Inventory,
            12 => Audit,
            13 => Rendezvous,
            14 => RendezvousOrder,
            _ => return None,
        })
    }
}

/// Why a control message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// Not a well-formed authentication block.
    #[error("malformed control authentication: {0}")]
    Malformed(&'static str),
    /// The sender is not a known peer.
    #[error("unknown peer {0}")]
    UnknownPeer(PeerId),
    /// Sent the other way round (a reflected message).
    #[error("message direction is wrong")]
    WrongDirection,
    /// Authenticated for another kind of request.
    #[error("message kind {found:?} where {expected:?} was expected")]
    WrongKind {
        /// The endpoint's kind.
        expected: MessageKind,
        /// The message's kind.
        found: MessageKind,
    },
    /// The MAC does not verify: wrong key, tampered or impersonated.
    #[error("control message MAC does not verify (wrong key, tampered or impersonated)")]
    BadMac,
    /// Timestamp outside the window, or from before the receiver started.
    #[error("control message timestamp {timestamp_ms} is outside the accepted window")]
    Stale {
        /// The message's timestamp.
        timestamp_ms: u64,
    },
    /// Counter not strictly greater than the last one accepted on this channel.
    #[error("control message counter {counter} is not above {last} (replay)")]
    Replayed {
        /// The message's counter.
        counter: u64,
        /// The last accepted counter on the channel.
        last: u64,
    },
}

impl ControlError {
    /// A short stable name for metrics and HTTP error bodies.
    pub fn reason(&self) -> crate::api::Reason {
        use crate::api::Reason;
        match self {
            ControlError::Malformed(_) => Reason::Malformed,
            ControlError::UnknownPeer(_) => Reason::UnknownPeer,
            ControlError::WrongDirection => Reason::WrongDirection,
            ControlError::WrongKind { .. } => Reason::WrongKind,
            ControlError::BadMac => Reason::BadMac,
            ControlError::Stale { .. } => Reason::Stale,
            ControlError::Replayed { .. } => Reason::Replayed,
        }
    }
}

/// The authentication block of one control message.
#[derive(Clone, PartialEq, Eq)]
pub struct ControlAuth {
    /// The peer whose key authenticates the message (the sender, or for server→peer
    /// messages, the addressee).
    pub peer: PeerId,
    /// Which way it travels.
    pub direction: Direction,
    /// What it is for.
    pub kind: MessageKind,
    /// Sender-chosen channel; counters are ordered per channel.
    pub channel: u64,
    /// Strictly increasing per channel.
    pub counter: u64,
    /// Sender's clock, unix milliseconds.
    pub timestamp_ms: u64,
    /// HMAC-SHA256 under the control subkey.
    pub mac: [u8; 32],
}

impl fmt::Debug for ControlAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlAuth")
            .field("peer", &self.peer)
            .field("direction", &self.direction)
            .field("kind", &self.kind)
            .field("channel", &self.channel)
            .field("counter", &self.counter)
            .field("timestamp_ms", &self.timestamp_ms)
            .finish_non_exhaustive()
    }
}

fn compute_mac(key: &ControlKey, a: &ControlAuth, body: &[u8]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&key.0).expect("any key length");
    m.update(MAC_DOMAIN);
    m.update(&a.signed_fields());
    m.update(blake3::hash(body).as_bytes());
    m
}

impl ControlAuth {
    fn signed_fields(&self) -> [u8; AUTH_LEN - 32] {
        let mut b = [0u8; AUTH_LEN - 32];
        b[0] = VERSION;
        b[1] = self.direction as u8;
        b[2..10].copy_from_slice(&self.peer.to_bytes());
        b[10..12].copy_from_slice(&(self.kind as u16).to_be_bytes());
        b[12..20].copy_from_slice(&self.channel.to_be_bytes());
        b[20..28].copy_from_slice(&self.counter.to_be_bytes());
        b[28..36].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        b
    }

    /// The 68-byte wire form.
    pub fn encode(&self) -> [u8; AUTH_LEN] {
        let mut b = [0u8; AUTH_LEN];
        b[..AUTH_LEN - 32].copy_from_slice(&self.signed_fields());
        b[AUTH_LEN - 32..].copy_from_slice(&self.mac);
        b
    }

    /// Hex of the wire form, for the HTTP header.
    pub fn to_header(&self) -> String {
        hex::encode(self.encode())
    }

    /// Parse the wire form; nothing is trusted until [`ControlVerifier::verify`].
    pub fn decode(b: &[u8]) -> Result<ControlAuth, ControlError> {
        if b.len() != AUTH_LEN {
            return Err(ControlError::Malformed("length"));
        }
        if b[0] != VERSION {
            return Err(ControlError::Malformed("version"));
        }
        let direction = match b[1] {
            1 => Direction::PeerToServer,
            2 => Direction::ServerToPeer,
            _ => return Err(ControlError::Malformed("direction")),
        };
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
        let kind = MessageKind::from_u16(u16::from_be_bytes([b[10], b[11]]))
            .ok_or(ControlError::Malformed("kind"))?;
        Ok(ControlAuth {
            peer: PeerId(u64_at(2)),
            direction,
            kind,
            channel: u64_at(12),
            counter: u64_at(20),
            timestamp_ms: u64_at(28),
            mac: b[36..68].try_into().unwrap(),
        })
    }

    /// Parse the hex header form.
    pub fn from_header(s: &str) -> Result<ControlAuth, ControlError> {
        if s.len() != 2 * AUTH_LEN {
            return Err(ControlError::Malformed("length"));
        }
        let mut b = [0u8; AUTH_LEN];
        hex::decode_to_slice(s, &mut b).map_err(|_| ControlError::Malformed("hex"))?;
        Self::decode(&b)
    }
}

/// Signs control messages on one channel. A channel is strictly ordered: send one message
/// at a time on it, or use several channels for concurrent requests.
pub struct ControlSigner {
    peer: PeerId,
    direction: Direction,
    key: ControlKey,
    channel: u64,
    counter: AtomicU64,
}

impl fmt::Debug for ControlSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ControlSigner({}, channel {:x})",
            self.peer, self.channel
        )
    }
}

impl ControlSigner {
    /// A signer for messages about `peer` travelling `direction`, on a fresh random
    /// channel.
    pub fn new(peer: PeerId, key: &TransactionKey, direction: Direction) -> ControlSigner {
        let channel = crate::keys::random_u64().unwrap_or_else(|_| now_ms() ^ 0x5eed);
        ControlSigner {
            peer,
            direction,
            key: key.control_key(),
            channel,
            counter: AtomicU64::new(0),
        }
    }

    /// Authenticate `body` as a message of `kind`, stamped `now_ms`. The counter is the
    /// larger of the previous counter plus one and the clock in microseconds, so it keeps
    /// rising across restarts without any state on disk.
    pub fn sign(&self, kind: MessageKind, body: &[u8], now_ms: u64) -> ControlAuth {
        let floor = now_ms.saturating_mul(1000);
        let prev = self
            .counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                Some(c.saturating_add(1).max(floor))
            })
            .expect("closure never refuses");
        let counter = prev.saturating_add(1).max(floor);
        let mut a = ControlAuth {
            peer: self.peer,
            direction: self.direction,
            kind,
            channel: self.channel,
            counter,
            timestamp_ms: now_ms,
            mac: [0; 32],
        };
        a.mac = compute_mac(&self.key, &a, body)
            .finalize()
            .into_bytes()
            .into();
        a
    }
}

#[derive(Clone, Copy)]
struct ChannelState {
    last_counter: u64,
    last_seen_ms: u64,
}

/// Checks control messages arriving at one receiver (the server, or one peer).
pub struct ControlVerifier {
    direction: Direction,
    window_ms: u64,
    floor_ms: u64,
    channels: Mutex<HashMap<(PeerId, u64), ChannelState>>,
}

impl fmt::Debug for ControlVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ControlVerifier({:?})", self.direction)
    }
}

impl ControlVerifier {
    /// A verifier for messages travelling `direction`, started at `started_ms`: anything
    /// stamped before the start is refused, since its counter state was lost.
    pub fn new(direction: Direction, started_ms: u64) -> ControlVerifier {
        ControlVerifier {
            direction,
            window_ms: DEFAULT_WINDOW_MS,
            floor_ms: started_ms,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// How far a message's stamp may be from the receiver's clock, in milliseconds.
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// Set the timestamp window.
    pub fn with_window_ms(mut self, ms: u64) -> ControlVerifier {
        self.window_ms = ms;
        self
    }

    /// Everything [`ControlVerifier::verify`] checks but the counter: direction, kind,
    /// MAC and timestamp. For a receiver that keeps channel counters elsewhere (server
    /// instances sharing a database).
    pub fn check(
        &self,
        auth: &ControlAuth,
        key: &TransactionKey,
        kind: MessageKind,
        body: &[u8],
        now_ms: u64,
    ) -> Result<(), ControlError> {
        if auth.direction != self.direction {
            return Err(ControlError::WrongDirection);
        }
        if auth.kind != kind {
            return Err(ControlError::WrongKind {
                expected: kind,
                found: auth.kind,
            });
        }
        compute_mac(&key.control_key(), auth, body)
            .verify_slice(&auth.mac)
            .map_err(|_| ControlError::BadMac)?;
        let lo = now_ms.saturating_sub(self.window_ms).max(self.floor_ms);
        if auth.timestamp_ms < lo || auth.timestamp_ms > now_ms + self.window_ms {
            return Err(ControlError::Stale {
                timestamp_ms: auth.timestamp_ms,
            });
        }
        Ok(())
    }

    /// Verify a message for endpoint `kind` with body `body`, keyed by the peer's
    /// transaction key, and record its counter.
    pub fn verify(
        &self,
        auth: &ControlAuth,
        key: &TransactionKey,
        kind: MessageKind,
        body: &[u8],
        now_ms: u64,
    ) -> Result<(), ControlError> {
        self.check(auth, key, kind, body, now_ms)?;
        let mut chans = self.channels.lock().expect("not poisoned");
        if chans.len() > 100_000 {
            // Channels idle past the window cannot accept a replay anyway (stale stamp).
            let cutoff = now_ms.saturating_sub(2 * self.window_ms);
            chans.retain(|_, s| s.last_seen_ms >= cutoff);
        }
        let slot = chans
            .entry((auth.peer, auth.channel))
            .or_insert(ChannelState {
                last_counter: 0,
                last_seen_ms: now_ms,
            });
        if auth.counter <= slot.last_counter {
            return Err(ControlError::Replayed {
                counter: auth.counter,
                last: slot.last_counter,
            });
        }
        slot.last_counter = auth.counter;
        slot.last_seen_ms = now_ms;
        Ok(())
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix time in seconds.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}
