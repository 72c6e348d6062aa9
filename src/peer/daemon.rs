//! The storage daemon: lends disk to other peers over QUIC, only under tokens the server
//! sealed with this peer's key.
//!
//! Every stream is one request ([`super::wire`]). Before a single chunk byte is accepted
//! the token is opened (MAC, target, validity window) and the chunk checked against it and
//! claimed in the persistent replay store; the bytes then go to a temporary file while
//! being hashed, and only a chunk whose BLAKE3 and size match becomes visible
//! ([`super::store`]). Stored chunks are confirmed to the server; refusals are reported.
//! Chunks are deleted only on the server's word: its drop orders, a delete token, or an
//! inventory reconciliation (a chunk the server expects on nobody's behalf here, last
//! stored longer ago than the grace period: one stored but never confirmed).
//!
//! Resource bounds, so a slow or hostile client cannot pin unbounded memory or slots:
//! a maximum number of connections (in total and per source IP), of concurrent streams per
//! connection, QUIC flow-control windows per stream and per connection, a fixed-size write
//! buffer per upload, an idle timeout per connection, and a read (and write) timeout and
//! an overall timeout per request. See [`Limits::memory_bound`].

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use quinn::crypto::rustls::QuicServerConfig;
use quinn::{IdleTimeout, RecvStream, SendStream, TransportConfig, VarInt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

mod audit;
mod rendezvous;
mod repair;

pub use rendezvous::Reachability;

use super::link::ServerLink;
use super::store::{ChunkStore, StoreError};
use super::wire::{self, Op, Refusal};
use crate::api::{
    ConfirmRequest, HeartbeatRequest, InventoryRequest, ReportRequest, MAX_CHUNKS_PER_REQUEST,
};
use crate::control::{now_ms, now_secs, ControlAuth, ControlVerifier, Direction, MessageKind};
use crate::ids::{ChunkId, Fingerprint, PeerId, TransactionId};
use crate::keys::TransactionKey;
use crate::replay::{ReplayError, ReplayStore};
use crate::tls::{CertKey, TlsError};
use crate::token::{Authorization, TokenVerifier, TxKind};

/// Largest piece read from a stream or a file at a time.
const IO_PIECE: usize = 256 << 10;
/// Refusal reports waiting to be sent; beyond this they are dropped, so a flood of bad
/// requests cannot grow memory.
const REPORT_QUEUE: usize = 256;
/// Least time between two refusal reports.
const REPORT_SPACING: Duration = Duration::from_millis(50);
/// Confirms waiting to be sent; a full queue slows uploads down rather than losing them.
const CONFIRM_QUEUE: usize = 1024;

/// Resource limits of a daemon.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Most simultaneous connections from one IP address.
    pub max_connections_per_ip: usize,
    /// Most simultaneous streams (requests) per connection.
    pub max_streams_per_connection: u32,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// A request whose next bytes take longer than this to arrive, or whose reply the
    /// client does not accept for this long, is dropped.
    pub read_timeout: Duration,
    /// A request that takes longer than this in all is dropped, however steadily it
    /// trickles (a slow-loris client cannot hold a stream forever).
    pub request_timeout: Duration,
    /// QUIC flow-control window per stream (bytes a client may send ahead).
    pub stream_receive_window: u32,
    /// QUIC flow-control window per connection (all its streams together).
    pub connection_receive_window: u32,
    /// Bytes queued for sending per connection.
    pub send_window: u64,
}

impl Default for Limits {
    /// Defaults sized for a home machine. Under a full-scale attack from 64 addresses
    /// [`Limits::memory_bound`] is 64 connections × (4 MiB receive window, 8 streams ×
    /// 256 KiB write buffers, 4 MiB send window) = 640 MiB; in normal use, a few MiB per
    /// active client.
    fn default() -> Self {
        Limits {
            max_connections: 64,
            max_connections_per_ip: 16,
            max_streams_per_connection: 8,
            idle_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(20),
            request_timeout: Duration::from_secs(600),
            stream_receive_window: 1 << 20,
            connection_receive_window: 4 << 20,
            send_window: 4 << 20,
        }
    }
}

impl Limits {
    /// The most memory all connections together can make the daemon hold for request and
    /// reply bytes: per connection, its receive window (bytes received but not yet read),
    /// one write buffer per stream (bytes read but not yet on disk) and its send window
    /// (bytes written but not yet acknowledged). Tokens are read into memory too, but
    /// only as their bytes arrive, within the same receive window.
    pub fn memory_bound(&self) -> u64 {
        let per_conn = u64::from(self.connection_receive_window)
            + u64::from(self.max_streams_per_connection) * super::store::WRITE_BUF as u64
            + self.send_window;
        self.max_connections as u64 * per_conn
    }

    /// The QUIC transport settings these limits imply (also used by the benchmark's raw
    /// baseline, so both run with the same windows).
    pub fn transport_config(&self) -> Result<TransportConfig, DaemonError> {
        let mut t = TransportConfig::default();
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_streams_per_connection))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .max_idle_timeout(Some(
                IdleTimeout::try_from(self.idle_timeout)
                    .map_err(|_| DaemonError::Config("idle timeout out of range".into()))?,
            ))
            .stream_receive_window(VarInt::from_u32(self.stream_receive_window))
            .receive_window(VarInt::from_u32(self.connection_receive_window))
            .send_window(self.send_window);
        Ok(t)
    }
}

/// Everything a daemon needs to run.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// This peer's id.
    pub peer_id: PeerId,
    /// This peer's transaction key (opens tokens, checks status checks).
    pub key: TransactionKey,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Address announced in heartbeats (`host:port`); defaults to the bound address,
    /// which is useless to others when listening on `0.0.0.0`: set it then.
    pub advertise: Option<String>,
    /// Where chunks live.
    pub storage_dir: PathBuf,
    /// Bytes lent to others.
    pub capacity_bytes: u64,
    /// The QUIC certificate, whose fingerprint the server hands out to clients.
    pub cert: CertKey,
    /// Where the replay store lives.
    pub state_dir: PathBuf,
    /// Time between heartbeats, unless the server asks for another interval.
    pub heartbeat_interval: Duration,
    /// Time between prunes of expired replay entries.
    pub prune_interval: Duration,
    /// Resource limits.
    pub limits: Limits,
    /// The server's rendezvous (peers behind NAT): when set, the daemon keeps a QUIC
    /// connection to the server from its own socket and takes punch and relay orders.
    pub rendezvous: Option<crate::peer::rendezvous::RendezvousConfig>,
}

impl DaemonConfig {
    /// A configuration with default intervals and limits.
    pub fn new(
        peer_id: PeerId,
        key: TransactionKey,
        listen: SocketAddr,
        storage_dir: PathBuf,
        capacity_bytes: u64,
        cert: CertKey,
        state_dir: PathBuf,
    ) -> DaemonConfig {
        DaemonConfig {
            peer_id,
            key,
            listen,
            advertise: None,
            storage_dir,
            capacity_bytes,
            cert,
            state_dir,
            heartbeat_interval: Duration::from_secs(30),
            prune_interval: Duration::from_secs(300),
            limits: Limits::default(),
            rendezvous: None,
        }
    }
}

/// Why a daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Binding the socket or creating directories failed.
    #[error("daemon I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The certificate or TLS configuration was refused.
    #[error("daemon TLS: {0}")]
    Tls(#[from] TlsError),
    /// The chunk store could not be opened.
    #[error("chunk store: {0}")]
    Store(#[from] StoreError),
    /// The replay store could not be opened.
    #[error("replay store: {0}")]
    Replay(#[from] ReplayError),
    /// A setting is out of range.
    #[error("daemon configuration: {0}")]
    Config(String),
}

/// State shared by every connection and stream.
struct Shared {
    me: PeerId,
    key: TransactionKey,
    verifier: TokenVerifier,
    control: ControlVerifier,
    replay: ReplayStore,
    store: Arc<ChunkStore>,
    limits: Limits,
    reports: mpsc::Sender<ReportRequest>,
    /// Confirms for the server, each with a way to tell the uploader it went through.
    confirms: mpsc::Sender<(ConfirmRequest, oneshot::Sender<bool>)>,
    /// Chunks deleted since the last successful heartbeat.
    dropped: Mutex<Vec<ChunkId>>,
    /// Audits answered at once (each holds one whole chunk in memory).
    audits: tokio::sync::Semaphore,
    /// Test-only misbehaviour (debug builds only), see [`audit::Cheat`].
    cheat: Option<audit::Cheat>,
    /// The server's rendezvous, also for the repair client.
    rendezvous: Option<crate::peer::rendezvous::RendezvousConfig>,
}

impl Shared {
    fn report(&self, requester: Option<PeerId>, txid: Option<TransactionId>, why: Refusal) {
        tracing::info!(
            ?requester,
            ?txid,
            reason = why.reason(),
            "refused a request"
        );
        let req = ReportRequest::Rejected {
            requester,
            txid,
            reason: why.reason().to_string(),
        };
        if self.reports.try_send(req).is_err() {
            tracing::debug!("report queue full; dropping a refusal report");
        }
    }

    fn note_dropped(&self, chunk: ChunkId) {
        let mut d = self.dropped.lock().unwrap_or_else(|e| e.into_inner());
        if d.len() < 4 * MAX_CHUNKS_PER_REQUEST {
            d.push(chunk);
        }
    }
}

/// Counts connections in total and per IP; a slot is freed when its guard drops.
#[derive(Default)]
struct ConnTracker {
    inner: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

struct ConnGuard {
    tracker: Arc<ConnTracker>,
    ip: IpAddr,
}

impl ConnTracker {
    fn admit(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Option<ConnGuard> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let per_ip = g.1.get(&ip).copied().unwrap_or(0);
        if g.0 >= limits.max_connections || per_ip >= limits.max_connections_per_ip {
            return None;
        }
        g.0 += 1;
        *g.1.entry(ip).or_insert(0) += 1;
        Some(ConnGuard {
            tracker: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut g = self.tracker.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = g.0.saturating_sub(1);
        if let Some(n) = g.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.ip);
            }
        }
    }
}

/// The storage daemon. Start one with [`Daemon::run`].
#[derive(Debug)]
pub struct Daemon;

/// A daemon that is serving; stop it with [`RunningDaemon::shutdown`].
pub struct RunningDaemon {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    fingerprint: Fingerprint,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    reach: watch::Receiver<Option<Reachability>>,
}

impl std::fmt::Debug for RunningDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RunningDaemon({} at {})",
            self.shared.me, self.local_addr
        )
    }
}

impl Daemon {
    /// Open the stores, bind the QUIC endpoint and start serving, heartbeating and
    /// pruning. Temporary files from a previous run are removed before the first request.
    pub async fn run<L: ServerLink>(
        config: DaemonConfig,
        link: L,
    ) -> Result<RunningDaemon, DaemonError> {
        if config.limits.max_connections == 0 || config.limits.max_streams_per_connection == 0 {
            return Err(DaemonError::Config("limits must be positive".into()));
        }
        let (storage_dir, capacity, state_dir) = (
            config.storage_dir.clone(),
            config.capacity_bytes,
            config.state_dir.clone(),
        );
        let (store, replay) = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&state_dir)?;
            let store = ChunkStore::open(&storage_dir, capacity)?;
            let replay = ReplayStore::open(&state_dir.join("replay.sqlite"))?;
            replay.prune(now_secs())?;
            Ok::<_, DaemonError>((store, replay))
        })
        .await
        .map_err(|e| DaemonError::Config(format!("start-up task failed: {e}")))??;

        let crypto = config.cert.server_config(&[wire::ALPN])?;
        let crypto = QuicServerConfig::try_from(crypto)
            .map_err(|e| DaemonError::Config(format!("QUIC TLS config: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(config.limits.transport_config()?));
        // Handshakes in flight count against the same budget as connections.
        server.max_incoming(config.limits.max_connections.max(1) * 2);
        let endpoint = quinn::Endpoint::server(server, config.listen)?;
        let local_addr = endpoint.local_addr()?;

        let (schedule_tx, schedule_rx) = watch::channel(Reconcile::default());
        let (reports_tx, reports_rx) = mpsc::channel(REPORT_QUEUE);
        let (confirms_tx, confirms_rx) = mpsc::channel(CONFIRM_QUEUE);
        let (repairs_tx, repairs_rx) = mpsc::channel(repair::QUEUE);
        let shared = Arc::new(Shared {
            me: config.peer_id,
            verifier: TokenVerifier::new(config.peer_id, &config.key),
            control: ControlVerifier::new(Direction::ServerToPeer, now_ms()),
            key: config.key.clone(),
            replay,
            store: Arc::new(store),
            limits: config.limits.clone(),
            reports: reports_tx,
            confirms: confirms_tx,
            dropped: Mutex::new(Vec::new()),
            audits: tokio::sync::Semaphore::new(audit::AUDITS_AT_ONCE),
            cheat: audit::Cheat::from_env(),
            rendezvous: config.rendezvous.clone(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let link = Arc::new(link);
        let fingerprint = config.cert.fingerprint();
        let advertise = config
            .advertise
            .clone()
            .unwrap_or_else(|| local_addr.to_string());

        let (reach_tx, reach) = watch::channel(None);
        let mut tasks = Vec::new();
        if let Some(rv) = config.rendezvous.clone() {
            tasks.push(tokio::spawn(rendezvous::run(
                endpoint.clone(),
                shared.clone(),
                rv,
                advertise.parse().ok(),
                reach_tx,
                stop_rx.clone(),
            )));
        }
        tasks.extend([
            tokio::spawn(accept_loop(
                endpoint.clone(),
                shared.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(confirm_loop(link.clone(), confirms_rx, stop_rx.clone())),
            tokio::spawn(report_loop(link.clone(), reports_rx, stop_rx.clone())),
            tokio::spawn(repair::worker(shared.clone(), repairs_rx, stop_rx.clone())),
            tokio::spawn(reconcile_loop(
                link.clone(),
                shared.clone(),
                schedule_rx,
                stop_rx.clone(),
            )),
            tokio::spawn(heartbeat_loop(
                link,
                shared.clone(),
                repairs_tx,
                schedule_tx,
                (advertise, fingerprint),
                config.heartbeat_interval,
                stop_rx.clone(),
            )),
            tokio::spawn(prune_loop(shared.clone(), config.prune_interval, stop_rx)),
        ]);
        tracing::info!(peer = %config.peer_id, addr = %local_addr, "storage daemon listening");
        Ok(RunningDaemon {
            endpoint,
            local_addr,
            fingerprint,
            shared,
            stop,
            tasks,
            reach,
        })
    }
}

impl RunningDaemon {
    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The certificate fingerprint clients pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// How the server's rendezvous sees this daemon (None: no hello connection now).
    pub fn reachability(&self) -> Option<Reachability> {
        *self.reach.borrow()
    }

    /// Bytes of stored chunks.
    pub fn used_bytes(&self) -> u64 {
        self.shared.store.used()
    }

    /// Lent bytes still free.
    pub fn free_bytes(&self) -> u64 {
        self.shared.store.free()
    }

    /// Number of stored chunks.
    pub fn chunk_count(&self) -> u64 {
        self.shared.store.chunk_count()
    }

    /// The chunk store (read-only use: paths, accounting).
    pub fn store(&self) -> &ChunkStore {
        &self.shared.store
    }

    /// Stop accepting, close every connection, flush queued confirms and reports, and
    /// wait (briefly) for the background tasks.
    pub async fn shutdown(self) {
        self.endpoint
            .close(VarInt::from_u32(wire::CLOSE_SHUTDOWN), b"shutdown");
        let _ = self.stop.send(true);
        for mut t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), &mut t)
                .await
                .is_err()
            {
                // E.g. a heartbeat stuck on an unreachable server: do not leave it behind.
                tracing::warn!("a daemon task did not stop in time; aborting it");
                t.abort();
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        // Requests in flight hold the shared state (and so the storage lock and the replay
        // store); wait for them to unwind so a restart in the same process finds both free.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.shared) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let tracker = Arc::new(ConnTracker::default());
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = stop.changed() => break,
        };
        let Some(incoming) = incoming else { break };
        let ip = incoming.remote_address().ip();
        let Some(guard) = tracker.admit(ip, &shared.limits) else {
            tracing::debug!(%ip, "connection refused: too many connections");
            incoming.refuse();
            continue;
        };
        tokio::spawn(serve_connection(incoming, guard, shared.clone()));
    }
}

async fn serve_connection(incoming: quinn::Incoming, _guard: ConnGuard, shared: Arc<Shared>) {
    let conn = match tokio::time::timeout(shared.limits.read_timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("handshake timed out");
            return;
        }
    };
    // quinn enforces max_streams_per_connection: the client cannot open more streams
    // than that until some finish, so this loop spawns a bounded number of tasks.
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(serve_stream(shared.clone(), send, recv));
    }
}

/// How reading a request ended when it did not succeed.
enum ReadFail {
    /// Refuse the request with this record (then stop reading).
    Refuse(Refusal),
    /// The stream or connection went away, or timed out: nobody to answer.
    Gone,
}

async fn read_exact(recv: &mut RecvStream, buf: &mut [u8], t: Duration) -> Result<(), ReadFail> {
    match tokio::time::timeout(t, recv.read_exact(buf)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(quinn::ReadExactError::FinishedEarly(_))) => {
            Err(ReadFail::Refuse(Refusal::Malformed))
        }
        _ => Err(ReadFail::Gone),
    }
}

async fn read_u16(recv: &mut RecvStream, t: Duration) -> Result<u16, ReadFail> {
    let mut b = [0u8; 2];
    read_exact(recv, &mut b, t).await?;
    Ok(u16::from_be_bytes(b))
}

async fn read_token(recv: &mut RecvStream, t: Duration) -> Result<Vec<u8>, ReadFail> {
    let mut b = [0u8; 4];
    read_exact(recv, &mut b, t).await?;
    // The bound is checked before the buffer is allocated.
    let len = wire::check_token_len(u32::from_be_bytes(b)).map_err(ReadFail::Refuse)?;
    // Grow with the bytes that actually arrive, so announcing a long token and then
    // trickling costs the daemon nothing beyond what flow control already admits.
    let mut token = Vec::with_capacity(len.min(4096));
    while token.len() < len {
        match tokio::time::timeout(t, recv.read_chunk(len - token.len(), true)).await {
            Ok(Ok(Some(c))) => token.extend_from_slice(&c.bytes),
            Ok(Ok(None)) => return Err(ReadFail::Refuse(Refusal::Malformed)),
            _ => return Err(ReadFail::Gone),
        }
    }
    Ok(token)
}

async fn read_chunk_header(recv: &mut RecvStream, t: Duration) -> Result<(ChunkId, u32), ReadFail> {
    let mut b = [0u8; wire::CHUNK_HEADER_LEN];
    read_exact(recv, &mut b, t).await?;
    let (id, size) = wire::decode_chunk_header(&b);
    wire::check_size(size).map_err(ReadFail::Refuse)?;
    Ok((id, size))
}

/// Send a final record, finish, and tell the client to stop sending.
async fn refuse(send: &mut SendStream, recv: &mut RecvStream, r: Refusal, t: Duration) {
    let _ = tokio::time::timeout(t, send.write_all(&r.encode())).await;
    let _ = send.finish();
    let _ = recv.stop(VarInt::from_u32(wire::STOP_REFUSED));
}

async fn serve_stream(shared: Arc<Shared>, send: SendStream, mut recv: RecvStream) {
    let t = shared.limits.read_timeout;
    let mut op = [0u8; 1];
    let op = match read_exact(&mut recv, &mut op, t).await {
        Ok(()) => Op::from_u8(op[0]),
        Err(_) => return,
    };
    serve_op(shared, op, send, recv).await
}

/// Serve one request whose op byte was read already.
async fn serve_op(shared: Arc<Shared>, op: Option<Op>, mut send: SendStream, mut recv: RecvStream) {
    let t = shared.limits.read_timeout;
    let serve = async {
        match op {
            Some(Op::Put) => serve_put(&shared, &mut send, &mut recv).await,
            Some(Op::Get) => serve_get(&shared, &mut send, &mut recv, false).await,
            Some(Op::Stream) => serve_get(&shared, &mut send, &mut recv, true).await,
            Some(Op::Delete) => serve_delete(&shared, &mut send, &mut recv).await,
            Some(Op::StatusCheck) => serve_status(&shared, &mut send, &mut recv).await,
            Some(Op::Audit) => audit::serve(&shared, &mut send, &mut recv).await,
            None => Err(ReadFail::Refuse(Refusal::Malformed)),
        }
    };
    // Cancelling mid-upload is safe: dropping the chunk writer removes its temporary file.
    let outcome = tokio::time::timeout(shared.limits.request_timeout, serve)
        .await
        .unwrap_or(Err(ReadFail::Gone));
    match outcome {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(ReadFail::Refuse(r)) => {
            shared.report(None, None, r);
            refuse(&mut send, &mut recv, r, t).await;
        }
        Err(ReadFail::Gone) => {
            let _ = send.reset(VarInt::from_u32(wire::STOP_REFUSED));
        }
    }
}

/// Open the token; on failure, report and refuse the whole request.
fn open_token(shared: &Shared, token: &[u8]) -> Result<Authorization, ReadFail> {
    shared.verifier.open(token, now_secs()).map_err(|e| {
        let r = Refusal::from(&e);
        if r == Refusal::Internal {
            tracing::error!(error = %e, "token check failed internally");
        }
        ReadFail::Refuse(r)
    })
}

fn who(auth: &Authorization) -> (Option<PeerId>, Option<TransactionId>) {
    (Some(auth.claims().requester), Some(auth.claims().txid))
}

/// Write reply bytes. A client that stops granting flow-control credit (never reads)
/// gets the same timeout as one that stops sending.
async fn write(send: &mut SendStream, t: Duration, b: &[u8]) -> Result<(), ReadFail> {
    match tokio::time::timeout(t, send.write_all(b)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(ReadFail::Gone),
    }
}

/// Read and discard `n` bytes (a refused chunk), so the next header is found. Nothing is
/// kept: memory stays at one QUIC piece.
async fn drain(recv: &mut RecvStream, mut n: u64, t: Duration) -> Result<(), ReadFail> {
    while n > 0 {
        let piece = n.min(IO_PIECE as u64) as usize;
        match tokio::time::timeout(t, recv.read_chunk(piece, true)).await {
            Ok(Ok(Some(c))) => n -= c.bytes.len() as u64,
            Ok(Ok(None)) => return Err(ReadFail::Refuse(Refusal::Malformed)),
            _ => return Err(ReadFail::Gone),
        }
    }
    Ok(())
}

fn store_refusal(e: &StoreError) -> Refusal {
    match e {
        StoreError::NoSpace => Refusal::NoSpace,
        StoreError::NotFound => Refusal::NotFound,
        StoreError::HashMismatch => Refusal::HashMismatch,
        StoreError::SizeMismatch { .. } => Refusal::SizeMismatch,
        StoreError::Io(_) | StoreError::InUse(_) => {
            tracing::error!(error = %e, "chunk store failed");
            Refusal::Internal
        }
    }
}

async fn serve_put(
    shared: &Shared,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), ReadFail> {
    let t = shared.limits.read_timeout;
    let token = read_token(recv, t).await?;
    let auth = open_token(shared, &token)?;
    drop(token);
    let (requester, txid) = who(&auth);
    let count = wire::check_count(read_u16(recv, t).await?).map_err(ReadFail::Refuse)?;
    let mut stored = Vec::new();
    // Records are held back until the server has the locations: an acknowledged chunk is
    // one the uploader can count as stored (its fsync depends on it).
    let mut records: Vec<Result<(), Refusal>> = Vec::new();
    let mut result = Ok(());
    for _ in 0..count {
        let (chunk, size) = match read_chunk_header(recv, t).await {
            Ok(h) => h,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        match receive_chunk(shared, &auth, recv, chunk, size).await {
            Ok(Ok(())) => {
                stored.push(chunk);
                records.push(Ok(()));
            }
            Ok(Err(r)) => {
                shared.report(requester, txid, r);
                records.push(Err(r));
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let mut confirmed = true;
    if !stored.is_empty() {
        let req = ConfirmRequest {
            txid: auth.claims().txid,
            chunks: stored,
        };
        let (done_tx, done_rx) = oneshot::channel();
        // Waits when the queue is full: uploads slow down instead of confirms getting lost.
        confirmed =
            shared.confirms.send((req, done_tx)).await.is_ok() && done_rx.await.unwrap_or(false);
    }
    if result.is_ok() || matches!(result, Err(ReadFail::Refuse(_))) {
        let mut out = Vec::new();
        for r in &records {
            // Stored but unknown to the server: not durable as far as the uploader can
            // tell, so it must place the chunk again.
            let r = if r.is_ok() && !confirmed {
                Err(Refusal::Internal)
            } else {
                *r
            };
            out.extend_from_slice(&wire::encode_record(r));
        }
        if !out.is_empty() {
            write(send, t, &out).await?;
        }
    }
    if let Err(ReadFail::Refuse(r)) = &result {
        shared.report(requester, txid, *r);
        refuse(send, recv, *r, t).await;
        return Ok(());
    }
    result
}

/// Refuse one chunk of a PUT: consume its bytes and answer with its record.
async fn refuse_chunk(
    recv: &mut RecvStream,
    size: u32,
    t: Duration,
    r: Refusal,
) -> Result<Result<(), Refusal>, ReadFail> {
    drain(recv, u64::from(size), t).await?;
    Ok(Err(r))
}

/// Receive one chunk. The outer error means the stream is unusable; the inner one is the
/// chunk's refusal (its bytes were consumed, the stream goes on).
async fn receive_chunk(
    shared: &Shared,
    auth: &Authorization,
    recv: &mut RecvStream,
    chunk: ChunkId,
    size: u32,
) -> Result<Result<(), Refusal>, ReadFail> {
    let t = shared.limits.read_timeout;
    // Kind, coverage and size first: cheap, and they burn nothing.
    if let Err(e) = auth.check(TxKind::Put, &chunk, u64::from(size)) {
        return refuse_chunk(recv, size, t, Refusal::from(&e)).await;
    }
    let need = if shared.store.contains(&chunk) {
        0
    } else {
        u64::from(size)
    };
    let reservation = match shared.store.reserve(need) {
        Ok(r) => r,
        Err(e) => return refuse_chunk(recv, size, t, store_refusal(&e)).await,
    };
    // Claim the grant before accepting any bytes: the same token can never be used twice
    // for this chunk, even if this upload then fails.
    if let Err(e) = auth.permit(TxKind::Put, &chunk, u64::from(size), &shared.replay) {
        return refuse_chunk(recv, size, t, Refusal::from(&e)).await;
    }
    let mut writer = match shared.store.writer(chunk, size, reservation).await {
        Ok(w) => w,
        Err(e) => return refuse_chunk(recv, size, t, store_refusal(&e)).await,
    };
    let mut left = u64::from(size);
    while left > 0 {
        let piece = left.min(IO_PIECE as u64) as usize;
        let bytes = match tokio::time::timeout(t, recv.read_chunk(piece, true)).await {
            Ok(Ok(Some(c))) => c.bytes,
            // Dropping the writer removes the temporary file.
            Ok(Ok(None)) => return Err(ReadFail::Refuse(Refusal::Malformed)),
            _ => return Err(ReadFail::Gone),
        };
        left -= bytes.len() as u64;
        if let Err(e) = writer.write(&bytes).await {
            drop(writer);
            drain(recv, left, t).await?;
            return Ok(Err(store_refusal(&e)));
        }
    }
    Ok(writer
        .commit()
        .await
        .map(|_| ())
        .map_err(|e| store_refusal(&e)))
}

async fn serve_get(
    shared: &Shared,
    send: &mut SendStream,
    recv: &mut RecvStream,
    ranged: bool,
) -> Result<(), ReadFail> {
    let t = shared.limits.read_timeout;
    let token = read_token(recv, t).await?;
    let (chunk, size) = read_chunk_header(recv, t).await?;
    let auth = open_token(shared, &token)?;
    let (requester, txid) = who(&auth);
    if shared.cheat == Some(audit::Cheat::HashesOnly) {
        // Test-only: a peer that kept no bytes has none to serve.
        return write(send, t, &Refusal::NotFound.encode()).await;
    }
    let op = if ranged { TxKind::Stream } else { TxKind::Get };
    let refused = |r: Refusal| {
        shared.report(requester, txid, r);
        r
    };
    let grant = match auth.permit(op, &chunk, u64::from(size), &shared.replay) {
        Ok(g) => g,
        Err(e) => return write(send, t, &refused(Refusal::from(&e)).encode()).await,
    };
    let (offset, n) = match (ranged, grant.range) {
        (true, Some(r)) => (r.offset, r.len),
        _ => (0, size),
    };
    let bytes = match shared
        .store
        .read_chunk(&chunk, u64::from(size), u64::from(offset), n as usize)
        .await
    {
        Ok(b) => b,
        Err(e @ StoreError::SizeMismatch { .. }) => {
            tracing::error!(?chunk, error = %e, "stored chunk has the wrong size");
            return write(send, t, &Refusal::Internal.encode()).await;
        }
        Err(e) => return write(send, t, &store_refusal(&e).encode()).await,
    };
    let mut head = wire::encode_record(Ok(())).to_vec();
    if ranged {
        head.extend_from_slice(&offset.to_be_bytes());
    }
    head.extend_from_slice(&n.to_be_bytes());
    write(send, t, &head).await?;
    // Handed to QUIC as it is: no copy into the send buffer.
    match tokio::time::timeout(t, send.write_chunk(bytes.into())).await {
        Ok(Ok(())) => {}
        _ => return Err(ReadFail::Gone),
    }
    Ok(())
}

async fn serve_delete(
    shared: &Shared,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), ReadFail> {
    let t = shared.limits.read_timeout;
    let token = read_token(recv, t).await?;
    let auth = open_token(shared, &token)?;
    let (requester, txid) = who(&auth);
    let count = wire::check_count(read_u16(recv, t).await?).map_err(ReadFail::Refuse)?;
    for _ in 0..count {
        let (chunk, size) = read_chunk_header(recv, t).await?;
        let r = match auth.permit(TxKind::Delete, &chunk, u64::from(size), &shared.replay) {
            Err(e) => {
                let r = Refusal::from(&e);
                shared.report(requester, txid, r);
                Err(r)
            }
            Ok(_) => match shared.store.delete(&chunk).await {
                Ok(_) => {
                    shared.note_dropped(chunk);
                    Ok(())
                }
                Err(e) => Err(store_refusal(&e)),
            },
        };
        write(send, t, &wire::encode_record(r)).await?;
    }
    Ok(())
}

async fn serve_status(
    shared: &Shared,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), ReadFail> {
    let t = shared.limits.read_timeout;
    let mut b = [0u8; wire::STATUS_AUTH_LEN];
    read_exact(recv, &mut b, t).await?;
    let checked = ControlAuth::decode(&b).and_then(|auth| {
        if auth.peer != shared.me {
            return Err(crate::control::ControlError::UnknownPeer(auth.peer));
        }
        shared
            .control
            .verify(&auth, &shared.key, MessageKind::StatusCheck, b"", now_ms())
    });
    if let Err(e) = checked {
        return Err(ReadFail::Refuse(Refusal::BadControl((&e).into())));
    }
    let mut reply = wire::encode_record(Ok(())).to_vec();
    reply.extend_from_slice(&shared.store.free().to_be_bytes());
    reply.extend_from_slice(&shared.store.used().to_be_bytes());
    reply.extend_from_slice(&shared.store.chunk_count().to_be_bytes());
    write(send, t, &reply).await
}

async fn confirm_loop<L: ServerLink>(
    link: Arc<L>,
    mut rx: mpsc::Receiver<(ConfirmRequest, oneshot::Sender<bool>)>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (req, done) = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => return },
            _ = stop.changed() => break,
        };
        let _ = done.send(confirm_with_retries(&*link, req).await);
    }
    // Shutting down: flush what is queued, once each.
    while let Ok((req, done)) = rx.try_recv() {
        let ok = link.confirm(req).await;
        if let Err(e) = &ok {
            tracing::warn!(error = %e, "confirm lost at shutdown");
        }
        let _ = done.send(ok.is_ok());
    }
}

/// Whether the server took the confirm (after a few tries).
async fn confirm_with_retries<L: ServerLink>(link: &L, req: ConfirmRequest) -> bool {
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=4 {
        match link.confirm(req.clone()).await {
            Ok(()) => return true,
            Err(e) if attempt < 4 => {
                tracing::warn!(txid = %req.txid, error = %e, "confirm failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => tracing::warn!(txid = %req.txid, error = %e, "confirm failed; giving up"),
        }
    }
    false
}

async fn report_loop<L: ServerLink>(
    link: Arc<L>,
    mut rx: mpsc::Receiver<ReportRequest>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let req = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => return },
            _ = stop.changed() => break,
        };
        if let Err(e) = link.report(req).await {
            tracing::debug!(error = %e, "refusal report not delivered");
        }
        // At most one report per spacing: a flood of bad requests must not turn the
        // daemon into an amplifier against the server (the bounded queue drops the rest).
        tokio::select! {
            _ = tokio::time::sleep(REPORT_SPACING) => {}
            _ = stop.changed() => break,
        }
    }
    while let Ok(req) = rx.try_recv() {
        let _ = link.report(req).await;
    }
}

async fn heartbeat_loop<L: ServerLink>(
    link: Arc<L>,
    shared: Arc<Shared>,
    repairs: mpsc::Sender<Vec<crate::api::RepairOrder>>,
    schedule: watch::Sender<Reconcile>,
    (advertise, fingerprint): (String, Fingerprint),
    default_interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut interval = default_interval;
    loop {
        // At most what one request may carry; the rest goes with the next heartbeats.
        let dropped: Vec<ChunkId> = {
            let mut d = shared.dropped.lock().unwrap_or_else(|e| e.into_inner());
            let n = d.len().min(MAX_CHUNKS_PER_REQUEST);
            d.drain(..n).collect()
        };
        let req = HeartbeatRequest {
            quic_addr: advertise.clone(),
            cert_fingerprint: fingerprint,
            free_bytes: shared.store.free(),
            used_bytes: shared.store.used(),
            dropped: dropped.clone(),
        };
        let sent = SystemTime::now();
        match link.heartbeat(req).await {
            Ok(resp) => {
                for chunk in resp.drop.iter().take(MAX_CHUNKS_PER_REQUEST) {
                    // A put that stored the chunk after this heartbeat left was placed
                    // after the server decided the drop: keep it (the placement cancelled
                    // the order; if its confirm fails, reconciling removes it).
                    match shared.store.delete_unless_stored_since(chunk, sent).await {
                        Ok(Some(_)) | Err(StoreError::NotFound) => shared.note_dropped(*chunk),
                        Ok(None) => {
                            tracing::debug!(?chunk, "not dropped: stored again since")
                        }
                        Err(e) => {
                            tracing::warn!(?chunk, error = %e, "could not drop a released chunk")
                        }
                    }
                }
                schedule.send_if_modified(|s| {
                    let new = Reconcile {
                        every: Duration::from_secs(resp.reconcile_secs),
                        grace: Duration::from_secs(resp.orphan_grace_secs),
                    };
                    std::mem::replace(s, new) != new
                });
                if !resp.repairs.is_empty() {
                    let mut orders = resp.repairs;
                    orders.truncate(crate::api::MAX_REPAIRS_PER_HEARTBEAT);
                    if repairs.try_send(orders).is_err() {
                        tracing::info!("repair queue full; the server will hand these out again");
                    }
                }
                interval = if resp.interval_secs > 0 {
                    Duration::from_secs(resp.interval_secs.clamp(1, 3600))
                } else {
                    default_interval
                };
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                // Not delivered: send these again next time.
                let mut d = shared.dropped.lock().unwrap_or_else(|e| e.into_inner());
                d.splice(0..0, dropped);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}

/// When to reconcile the store with the server, as the server last said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Reconcile {
    /// Between two reconciliations; zero: never.
    every: Duration,
    /// How long after the last put that stored it a chunk nobody expects here stays.
    grace: Duration,
}

/// Reconcile the chunk store with the server on the server's schedule: delete what the
/// server does not expect here (a chunk stored but never confirmed, a drop order lost).
async fn reconcile_loop<L: ServerLink>(
    link: Arc<L>,
    shared: Arc<Shared>,
    mut schedule: watch::Receiver<Reconcile>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let every = schedule.borrow_and_update().every;
        let wait = async {
            if every.is_zero() {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep(every).await
            }
        };
        tokio::select! {
            _ = wait => {}
            // A new schedule: start waiting again with it.
            r = schedule.changed() => {
                if r.is_err() {
                    return;
                }
                continue;
            }
            _ = stop.changed() => return,
        }
        let grace = schedule.borrow().grace;
        let deleted = tokio::select! {
            d = reconcile(&*link, &shared, grace) => d,
            _ = stop.changed() => return,
        };
        if deleted > 0 {
            tracing::info!(deleted, "deleted chunks the server does not expect here");
        }
    }
}

/// One pass over the store, a directory (`chunks/xx`) at a time: ask the server about the
/// chunks no put has stored for `grace`, and delete those it does not expect here unless
/// a put stored them again since the question was asked. Returns how many were deleted.
async fn reconcile<L: ServerLink>(link: &L, shared: &Arc<Shared>, grace: Duration) -> usize {
    let mut deleted = 0;
    for prefix in 0..=255u8 {
        let Some(before) = SystemTime::now().checked_sub(grace) else {
            return deleted;
        };
        let store = shared.store.clone();
        let old =
            match tokio::task::spawn_blocking(move || store.stored_before(prefix, before)).await {
                Ok(Ok(old)) => old,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "reconcile: listing the chunk store failed");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reconcile: listing task failed");
                    continue;
                }
            };
        for batch in old.chunks(MAX_CHUNKS_PER_REQUEST) {
            let req = InventoryRequest {
                chunks: batch.to_vec(),
            };
            let unknown = match link.inventory(req).await {
                Ok(r) => r.unknown,
                Err(e) => {
                    // Nothing is deleted without an answer; try again next round.
                    tracing::warn!(error = %e, "reconcile: inventory check failed");
                    return deleted;
                }
            };
            // Only what was asked about, whatever the answer names.
            let asked: HashSet<&ChunkId> = batch.iter().collect();
            for chunk in unknown.iter().filter(|c| asked.contains(c)) {
                match shared.store.delete_unless_stored_since(chunk, before).await {
                    Ok(Some(_)) => {
                        deleted += 1;
                        // Clears a drop order for it, if the server has one.
                        shared.note_dropped(*chunk);
                    }
                    Ok(None) | Err(StoreError::NotFound) => {}
                    Err(e) => tracing::warn!(?chunk, error = %e, "reconcile: delete failed"),
                }
            }
        }
    }
    deleted
}

async fn prune_loop(shared: Arc<Shared>, every: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        match shared.replay.prune(now_secs()) {
            Ok(n) if n > 0 => tracing::debug!(pruned = n, "pruned expired replay entries"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning the replay store failed"),
        }
    }
}
