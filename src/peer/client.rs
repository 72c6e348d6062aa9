//! [`PeerClient`]: stores and fetches chunks on other peers' daemons over QUIC, pinning
//! each daemon's certificate by the fingerprint the server handed out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, RecvStream, SendStream, TransportConfig};

use super::rendezvous::{self, RendezvousClient, RendezvousConfig};
use super::wire::{self, ControlReason, Op, Refusal, TokenReason};
use crate::api::Route;
use crate::audit::{Answer, Challenge, MAX_ANSWER_LEN};
use crate::control::ControlAuth;
use crate::ids::{ChunkId, Fingerprint, PeerId, VerifiedChunk};
use crate::tls::pinned_client_config;
use crate::token::{ByteRange, Token, MAX_CHUNK_SIZE, MAX_ENTRIES, MAX_TOKEN_LEN};

/// Why a reply stopped when the daemon finished it cleanly before every record was sent.
const ENDED_EARLY: &str = "the reply ended early";

/// How many streams one put spreads a batch over: enough to keep a connection busy while
/// the daemon fsyncs, few enough that the token is sent only a handful of times.
const PUT_STREAMS: usize = 4;

/// Why a peer operation failed. The refusal variants mirror the wire's status codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The QUIC connection could not be set up (unreachable, wrong certificate, refused).
    #[error("cannot connect to peer at {addr}: {reason}")]
    Connect {
        /// Where we tried.
        addr: SocketAddr,
        /// Why it failed.
        reason: String,
    },
    /// The connection or stream broke mid-request.
    #[error("connection to the peer broke: {0}")]
    Connection(String),
    /// The peer did not answer in time.
    #[error("the peer did not answer in time")]
    Timeout,
    /// The peer's reply does not follow the protocol.
    #[error("the peer sent an invalid reply: {0}")]
    Protocol(String),
    /// The peer refused the token.
    #[error("the peer refused the token: {0}")]
    BadToken(TokenReason),
    /// The peer found that the bytes sent do not hash to the chunk id.
    #[error("the peer says the chunk bytes do not hash to the chunk id")]
    HashMismatch,
    /// The chunk size is not the token's.
    #[error("the chunk size does not match the token")]
    SizeMismatch,
    /// The peer has no room (lent capacity used up, or disk full).
    #[error("the peer has no space left")]
    NoSpace,
    /// The peer does not hold the chunk.
    #[error("the peer does not hold this chunk")]
    NotFound,
    /// A size above the protocol's limits.
    #[error("the request exceeds the protocol's size limits")]
    TooLarge,
    /// The peer could not parse the request.
    #[error("the peer could not parse the request")]
    Malformed,
    /// The peer refused a status check's authentication.
    #[error("the peer refused the status check: {0:?}")]
    BadControl(ControlReason),
    /// The peer failed internally.
    #[error("the peer failed internally")]
    Internal,
    /// The bytes a peer returned do not hash to the chunk asked for.
    #[error("the peer returned a corrupt chunk (asked {expected:?}, got {got:?})")]
    CorruptChunk {
        /// The chunk asked for.
        expected: ChunkId,
        /// The hash of what came back.
        got: ChunkId,
    },
    /// The request was refused locally before sending (out of the protocol's bounds).
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
}

impl From<Refusal> for PeerError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::BadToken(t) => PeerError::BadToken(t),
            Refusal::HashMismatch => PeerError::HashMismatch,
            Refusal::SizeMismatch => PeerError::SizeMismatch,
            Refusal::NoSpace => PeerError::NoSpace,
            Refusal::NotFound => PeerError::NotFound,
            Refusal::TooLarge => PeerError::TooLarge,
            Refusal::Malformed => PeerError::Malformed,
            Refusal::BadControl(c) => PeerError::BadControl(c),
            Refusal::Internal => PeerError::Internal,
        }
    }
}

impl PeerError {
    /// Whether the peer itself refused (as opposed to the network failing): a refusal
    /// will not go away by retrying the same request on the same peer.
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            PeerError::Connect { .. }
                | PeerError::Connection(_)
                | PeerError::Timeout
                | PeerError::Protocol(_)
        )
    }
}

fn broke(e: impl std::fmt::Display) -> PeerError {
    PeerError::Connection(e.to_string())
}

/// Where a daemon is and which certificate it must present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// Its UDP address (its own, private one when it sits behind NAT).
    pub addr: SocketAddr,
    /// SHA-256 of its certificate, from the server.
    pub fingerprint: Fingerprint,
    /// How to get there.
    pub via: Via,
}

/// How a connection to a daemon is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Via {
    /// Straight to its address.
    #[default]
    Direct,
    /// Hole punching through the server's rendezvous (the relay when it fails).
    Punch(PeerId),
    /// The server's relay.
    Relay(PeerId),
}

impl PeerAddr {
    /// A daemon reached at `addr` directly.
    pub fn direct(addr: SocketAddr, fingerprint: Fingerprint) -> PeerAddr {
        PeerAddr {
            addr,
            fingerprint,
            via: Via::Direct,
        }
    }

    /// Resolve a `host:port` as the server hands it out (e.g. in an
    /// [`crate::api::Placement`]), pinning `fingerprint`.
    pub async fn lookup(host_port: &str, fingerprint: Fingerprint) -> Result<PeerAddr, PeerError> {
        let unresolved = |reason: String| PeerError::Connect {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            reason: format!("cannot resolve {host_port:?}: {reason}"),
        };
        if let Ok(addr) = host_port.parse() {
            return Ok(PeerAddr::direct(addr, fingerprint));
        }
        let addr = tokio::net::lookup_host(host_port)
            .await
            .map_err(|e| unresolved(e.to_string()))?
            .next()
            .ok_or_else(|| unresolved("no address".into()))?;
        Ok(PeerAddr::direct(addr, fingerprint))
    }

    /// The target of a placement, by the route the server gave.
    pub async fn of_placement(p: &crate::api::Placement) -> Result<PeerAddr, PeerError> {
        let mut a = Self::lookup(&p.addr, p.fingerprint).await?;
        a.via = match p.route {
            Route::Direct => Via::Direct,
            Route::Punch => Via::Punch(p.target),
            Route::Relay => Via::Relay(p.target),
        };
        Ok(a)
    }
}

/// A daemon's answer to a status check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSpace {
    /// Lent bytes still free.
    pub free_bytes: u64,
    /// Bytes stored for others.
    pub used_bytes: u64,
    /// Chunks stored.
    pub chunks: u64,
}

/// Silence after which a connection to a daemon counts as dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(8);
/// Pings on a quiet connection, well inside [`IDLE_TIMEOUT`].
const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// How long a failed connection attempt is remembered.
const FAILED_CONNECT_MEMORY: Duration = Duration::from_secs(2);

#[derive(Default)]
enum SlotState {
    #[default]
    Empty,
    Up(Connection),
    Down {
        until: Instant,
        error: PeerError,
    },
}

type Slot = Arc<tokio::sync::Mutex<SlotState>>;

/// A client of storage daemons. Keeps one QUIC connection per daemon and reuses it.
/// Must be created inside a tokio runtime.
pub struct PeerClient {
    endpoint: quinn::Endpoint,
    conns: Mutex<HashMap<PeerAddr, Slot>>,
    op_timeout: Duration,
    connect_timeout: Duration,
    rendezvous: Option<RendezvousClient>,
}

/// How long a punched connection may take before the relay is tried: the daemon has
/// punched before the server answers, so a punch that works answers within a few
/// round trips.
const PUNCH_TIMEOUT: Duration = Duration::from_secs(4);

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerClient")
    }
}

impl PeerClient {
    /// A client on an ephemeral UDP port of all IPv4 interfaces.
    pub fn new() -> Result<PeerClient, PeerError> {
        Self::bind("0.0.0.0:0".parse().expect("valid address"))
    }

    /// A client bound to `addr`.
    pub fn bind(addr: SocketAddr) -> Result<PeerClient, PeerError> {
        let endpoint = quinn::Endpoint::client(addr).map_err(|e| PeerError::Connect {
            addr,
            reason: format!("binding the client socket: {e}"),
        })?;
        Ok(PeerClient {
            endpoint,
            conns: Mutex::new(HashMap::new()),
            op_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            rendezvous: None,
        })
    }

    /// Reach daemons behind NAT through the server's rendezvous described by `cfg`
    /// (without it, only [`Via::Direct`] addresses can be reached).
    pub fn with_rendezvous(mut self, cfg: RendezvousConfig) -> PeerClient {
        self.rendezvous = Some(RendezvousClient::new(cfg));
        self
    }

    /// Give up on any single operation after `t` (default 120 s).
    pub fn with_timeout(mut self, t: Duration) -> PeerClient {
        self.op_timeout = t;
        self
    }

    /// Give up connecting to a peer after `t` (default 10 s): an offline peer is common,
    /// and the caller should move on to another holder quickly.
    pub fn with_connect_timeout(mut self, t: Duration) -> PeerClient {
        self.connect_timeout = t;
        self
    }

    async fn connect(&self, peer: &PeerAddr) -> Result<Connection, PeerError> {
        let target = match peer.via {
            Via::Direct => return self.dial(peer, peer.addr, self.connect_timeout).await,
            Via::Punch(t) | Via::Relay(t) => t,
        };
        let Some(rv) = &self.rendezvous else {
            return Err(PeerError::Connect {
                addr: peer.addr,
                reason: "the peer is behind NAT and this client has no rendezvous server".into(),
            });
        };
        let fail = |e: rendezvous::NatError| PeerError::Connect {
            addr: peer.addr,
            reason: e.to_string(),
        };
        if let Via::Punch(_) = peer.via {
            match rv.punch(&self.endpoint, target).await {
                Ok(public) => match self.dial(peer, public, PUNCH_TIMEOUT).await {
                    Ok(c) => {
                        tracing::debug!(peer = %target, %public, "connected by hole punching");
                        return Ok(c);
                    }
                    Err(e) => {
                        tracing::info!(peer = %target, error = %e, "hole punching failed; trying the relay")
                    }
                },
                Err(e) => tracing::info!(peer = %target, error = %e, "no punch; trying the relay"),
            }
        }
        let (relay, grant) = rv.relay(&self.endpoint, target).await.map_err(fail)?;
        let local: std::net::IpAddr = if relay.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        let inner = rendezvous::start_proxy(relay, &grant, rendezvous::ROLE_CLIENT, local, None)
            .await
            .map_err(fail)?;
        // The TLS handshake inside is end to end with the daemon, pinned as always: the
        // relay only ever moves its encrypted datagrams.
        let c = self.dial(peer, inner, self.connect_timeout).await?;
        tracing::debug!(peer = %target, %relay, "connected through the relay");
        Ok(c)
    }

    /// A pinned QUIC connection to `peer`'s daemon at `to`.
    async fn dial(
        &self,
        peer: &PeerAddr,
        to: SocketAddr,
        timeout: Duration,
    ) -> Result<Connection, PeerError> {
        let fail = |reason: String| PeerError::Connect {
            addr: peer.addr,
            reason,
        };
        let tls = pinned_client_config(peer.fingerprint, &[wire::ALPN])
            .map_err(|e| fail(e.to_string()))?;
        let quic = QuicClientConfig::try_from(tls).map_err(|e| fail(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        let mut t = TransportConfig::default();
        t.max_concurrent_uni_streams(0u8.into());
        // A holder that dies mid-transfer is noticed within IDLE_TIMEOUT (keep-alives
        // hold a quiet pooled connection open meanwhile), and its chunks are then fetched
        // from another holder: reads stall seconds, not the 30 s QUIC default.
        t.keep_alive_interval(Some(KEEP_ALIVE));
        t.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("a small timeout fits"),
        ));
        cfg.transport_config(Arc::new(t));
        let connecting = self
            .endpoint
            .connect_with(cfg, to, wire::SERVER_NAME)
            .map_err(|e| fail(e.to_string()))?;
        match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(fail(e.to_string())),
            Err(_) => Err(fail("timed out".into())),
        }
    }

    async fn connection(&self, peer: &PeerAddr) -> Result<Connection, PeerError> {
        // One slot per peer, locked while connecting: concurrent requests to a peer share
        // one connection, and a slow handshake to one peer holds up no other peer.
        let slot = self.lock().entry(*peer).or_default().clone();
        let mut state = slot.lock().await;
        match &*state {
            SlotState::Up(c) if c.close_reason().is_none() => return Ok(c.clone()),
            // Requests queued behind a failed attempt fail at once instead of each
            // waiting out its own connect timeout.
            SlotState::Down { until, error } if Instant::now() < *until => {
                return Err(error.clone())
            }
            _ => {}
        }
        match self.connect(peer).await {
            Ok(c) => {
                *state = SlotState::Up(c.clone());
                Ok(c)
            }
            Err(e) => {
                *state = SlotState::Down {
                    until: Instant::now() + FAILED_CONNECT_MEMORY,
                    error: e.clone(),
                };
                Err(e)
            }
        }
    }

    /// Send requests for `peer` over `conn` from now on (until it closes): the server
    /// reaches a daemon behind NAT over the connection that daemon opened to it.
    pub fn adopt(&self, peer: PeerAddr, conn: Connection) {
        self.lock()
            .insert(peer, Arc::new(tokio::sync::Mutex::new(SlotState::Up(conn))));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerAddr, Slot>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Open a bidirectional stream to a daemon (retrying once on a fresh connection if
    /// the cached one has died). Exposed for diagnostics and protocol tests; normal
    /// callers use the typed operations.
    pub async fn open_raw(&self, peer: &PeerAddr) -> Result<(SendStream, RecvStream), PeerError> {
        let conn = self.connection(peer).await?;
        match conn.open_bi().await {
            Ok(s) => Ok(s),
            Err(_) => {
                // The cached connection died (idle timeout, daemon restart): reconnect.
                let conn = self.connection(peer).await?;
                conn.open_bi().await.map_err(broke)
            }
        }
    }

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, PeerError>>,
    ) -> Result<T, PeerError> {
        tokio::time::timeout(self.op_timeout, f)
            .await
            .unwrap_or(Err(PeerError::Timeout))
    }

    /// Store chunks under a put (or universal) token. Returns one result per chunk, in
    /// order; the outer error is for a request that could not be made at all.
    pub async fn put<B: AsRef<[u8]> + Sync>(
        &self,
        peer: &PeerAddr,
        token: &Token,
        chunks: &[(ChunkId, B)],
    ) -> Result<Vec<Result<(), PeerError>>, PeerError> {
        check_token(token)?;
        if chunks.len() > MAX_ENTRIES {
            return Err(PeerError::InvalidRequest("too many chunks for one token"));
        }
        if chunks
            .iter()
            .any(|(_, b)| b.as_ref().len() > MAX_CHUNK_SIZE as usize)
        {
            return Err(PeerError::InvalidRequest(
                "chunk larger than the protocol allows",
            ));
        }
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        // Connect once up front: an unreachable peer is one error, not one per stream.
        self.connection(peer).await?;
        let per = chunks.len().div_ceil(PUT_STREAMS);
        let groups = chunks.chunks(per).map(|g| self.put_group(peer, token, g));
        let results = self
            .timed(async { Ok(futures_util::future::join_all(groups).await) })
            .await;
        match results {
            Ok(r) => Ok(r.into_iter().flatten().collect()),
            Err(e) => Ok(vec![Err(e); chunks.len()]),
        }
    }

    async fn put_group<B: AsRef<[u8]> + Sync>(
        &self,
        peer: &PeerAddr,
        token: &Token,
        group: &[(ChunkId, B)],
    ) -> Vec<Result<(), PeerError>> {
        let (mut send, mut recv) = match self.open_raw(peer).await {
            Ok(s) => s,
            Err(e) => return vec![Err(e); group.len()],
        };
        let writer = async {
            let mut head = wire::encode_token_head(Op::Put, token.as_bytes());
            head.extend_from_slice(&(group.len() as u16).to_be_bytes());
            send.write_all(&head).await?;
            for (id, bytes) in group {
                let bytes = bytes.as_ref();
                send.write_all(&wire::encode_chunk_header(id, bytes.len() as u32))
                    .await?;
                send.write_all(bytes).await?;
            }
            let _ = send.finish();
            Ok::<(), quinn::WriteError>(())
        };
        let (written, replies) = tokio::join!(writer, read_records(&mut recv, group.len()));
        fill(replies, written.err().map(broke), group.len())
    }

    /// Fetch a whole chunk under a get (or universal) token, and check its hash.
    pub async fn get(
        &self,
        peer: &PeerAddr,
        token: &Token,
        chunk: &ChunkId,
        size: u32,
    ) -> Result<VerifiedChunk, PeerError> {
        self.timed(async {
            let (_, bytes) = self.fetch(peer, Op::Get, token, chunk, size).await?;
            VerifiedChunk::check(*chunk, bytes).map_err(|got| PeerError::CorruptChunk {
                expected: *chunk,
                got,
            })
        })
        .await
    }

    /// Fetch the byte range a stream token grants on a chunk of `size` bytes. A range
    /// cannot be hash-checked on its own; the returned range must be `range`.
    pub async fn stream(
        &self,
        peer: &PeerAddr,
        token: &Token,
        chunk: &ChunkId,
        size: u32,
        range: ByteRange,
    ) -> Result<Vec<u8>, PeerError> {
        self.timed(async {
            let (got, bytes) = self.fetch(peer, Op::Stream, token, chunk, size).await?;
            if got != range {
                return Err(PeerError::Protocol(format!(
                    "asked for bytes {}+{}, got {}+{}",
                    range.offset, range.len, got.offset, got.len
                )));
            }
            Ok(bytes)
        })
        .await
    }

    async fn fetch(
        &self,
        peer: &PeerAddr,
        op: Op,
        token: &Token,
        chunk: &ChunkId,
        size: u32,
    ) -> Result<(ByteRange, Vec<u8>), PeerError> {
        check_token(token)?;
        if size > MAX_CHUNK_SIZE {
            return Err(PeerError::InvalidRequest(
                "chunk larger than the protocol allows",
            ));
        }
        let (mut send, mut recv) = self.open_raw(peer).await?;
        let mut req = wire::encode_token_head(op, token.as_bytes());
        req.extend_from_slice(&wire::encode_chunk_header(chunk, size));
        send.write_all(&req).await.map_err(broke)?;
        let _ = send.finish();
        read_record(&mut recv).await??;
        let offset = if op == Op::Stream {
            read_u32(&mut recv).await?
        } else {
            0
        };
        let len = read_u32(&mut recv).await?;
        // Bound the allocation by what the request allows, not by what the peer claims.
        if u64::from(offset) + u64::from(len) > u64::from(size) {
            return Err(PeerError::Protocol(format!(
                "reply of {len} bytes at {offset} for a chunk of {size}"
            )));
        }
        if op == Op::Get && len != size {
            return Err(PeerError::Protocol(format!(
                "reply of {len} bytes, expected {size}"
            )));
        }
        // Gathered from QUIC's own buffers: no zero-filled buffer to copy into.
        let want = len as usize;
        let mut buf = Vec::with_capacity(want);
        while buf.len() < want {
            match recv
                .read_chunk(want - buf.len(), true)
                .await
                .map_err(broke)?
            {
                Some(c) => buf.extend_from_slice(&c.bytes),
                None => return Err(broke("the reply ended early")),
            }
        }
        Ok((ByteRange { offset, len }, buf))
    }

    /// Delete chunks under a delete token. One result per chunk, in order.
    pub async fn delete(
        &self,
        peer: &PeerAddr,
        token: &Token,
        chunks: &[(ChunkId, u32)],
    ) -> Result<Vec<Result<(), PeerError>>, PeerError> {
        check_token(token)?;
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        if chunks.len() > MAX_ENTRIES {
            return Err(PeerError::InvalidRequest("too many chunks for one token"));
        }
        self.timed(async {
            let (mut send, mut recv) = self.open_raw(peer).await?;
            let mut req = wire::encode_token_head(Op::Delete, token.as_bytes());
            req.extend_from_slice(&(chunks.len() as u16).to_be_bytes());
            for (id, size) in chunks {
                req.extend_from_slice(&wire::encode_chunk_header(id, *size));
            }
            let written = send.write_all(&req).await;
            let _ = send.finish();
            let replies = read_records(&mut recv, chunks.len()).await;
            Ok(fill(replies, written.err().map(broke), chunks.len()))
        })
        .await
    }

    /// Send a server-signed request (`op`, its control block, then `body`) and read the
    /// daemon's status record; the stream the reply follows on.
    async fn control_request(
        &self,
        peer: &PeerAddr,
        op: Op,
        auth: &ControlAuth,
        body: &[u8],
    ) -> Result<RecvStream, PeerError> {
        let (mut send, mut recv) = self.open_raw(peer).await?;
        let mut req = vec![op as u8];
        req.extend_from_slice(&auth.encode());
        req.extend_from_slice(body);
        send.write_all(&req).await.map_err(broke)?;
        let _ = send.finish();
        read_record(&mut recv).await??;
        Ok(recv)
    }

    /// Ask a daemon for its free and used space, authenticated as the server (`auth` is
    /// a server→peer StatusCheck control message over an empty body).
    pub async fn status_check(
        &self,
        peer: &PeerAddr,
        auth: &ControlAuth,
    ) -> Result<PeerSpace, PeerError> {
        self.timed(async {
            let mut recv = self
                .control_request(peer, Op::StatusCheck, auth, &[])
                .await?;
            let mut b = [0u8; 24];
            recv.read_exact(&mut b).await.map_err(broke)?;
            let at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
            Ok(PeerSpace {
                free_bytes: at(0),
                used_bytes: at(8),
                chunks: at(16),
            })
        })
        .await
    }

    /// Audit a chunk: send the server-signed challenge, return the holder's answer
    /// (unchecked: [`crate::audit::Challenge::verify`] decides).
    pub async fn audit(
        &self,
        peer: &PeerAddr,
        auth: &ControlAuth,
        challenge: &Challenge,
    ) -> Result<Answer, PeerError> {
        self.timed(async {
            let mut recv = self
                .control_request(peer, Op::Audit, auth, &challenge.encode())
                .await?;
            let len = read_u32(&mut recv).await? as usize;
            if len > MAX_ANSWER_LEN {
                return Err(PeerError::Protocol("audit answer too long".into()));
            }
            let mut b = vec![0u8; len];
            recv.read_exact(&mut b).await.map_err(broke)?;
            Answer::decode(&b).map_err(|e| PeerError::Protocol(e.to_string()))
        })
        .await
    }

    /// Close every connection (politely, so daemons free the slots at once).
    pub fn close(&self) {
        for (_, slot) in self.lock().drain() {
            if let Ok(mut state) = slot.try_lock() {
                if let SlotState::Up(c) = std::mem::take(&mut *state) {
                    c.close(0u8.into(), b"bye");
                }
            }
        }
    }
}

impl Drop for PeerClient {
    fn drop(&mut self) {
        self.close();
    }
}

fn check_token(token: &Token) -> Result<(), PeerError> {
    let n = token.as_bytes().len();
    if n == 0 || n > MAX_TOKEN_LEN {
        return Err(PeerError::InvalidRequest("token length out of bounds"));
    }
    Ok(())
}

async fn read_u32(recv: &mut RecvStream) -> Result<u32, PeerError> {
    let mut b = [0u8; 4];
    recv.read_exact(&mut b).await.map_err(broke)?;
    Ok(u32::from_be_bytes(b))
}

/// Read one record. The outer error is a broken stream (or one that ended with no
/// record); the inner one is the peer's refusal.
async fn read_record(recv: &mut RecvStream) -> Result<Result<(), PeerError>, PeerError> {
    let mut b = [0u8; wire::RECORD_LEN];
    match recv.read_exact(&mut b).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(_)) => {
            return Err(PeerError::Protocol(ENDED_EARLY.into()))
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(broke(e)),
    }
    let r = wire::decode_record(b).map_err(|e| PeerError::Protocol(e.to_string()))?;
    Ok(r.map_err(PeerError::from))
}

/// Up to `n` records; stops at the end of the stream. The error is why it stopped early.
async fn read_records(
    recv: &mut RecvStream,
    n: usize,
) -> (Vec<Result<(), PeerError>>, Option<PeerError>) {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match read_record(recv).await {
            Ok(r) => out.push(r),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

/// Complete a list of per-chunk records: a daemon ends the reply early only after a
/// fatal record, which then applies to every chunk without its own record. Without one,
/// the missing chunks get why the stream broke.
fn fill(
    replies: (Vec<Result<(), PeerError>>, Option<PeerError>),
    write_err: Option<PeerError>,
    n: usize,
) -> Vec<Result<(), PeerError>> {
    let (mut out, read_err) = replies;
    if out.len() < n {
        let clean_end = matches!(&read_err, Some(PeerError::Protocol(m)) if m == ENDED_EARLY);
        let rest = match out.last() {
            Some(Err(e)) if clean_end => e.clone(),
            _ => read_err
                .or(write_err)
                .unwrap_or_else(|| PeerError::Protocol("missing replies".into())),
        };
        out.resize(n, Err(rest));
    }
    out
}
