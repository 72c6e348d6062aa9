//! The glue between the parts of a user's machine and the network: the drive's
//! [`ChunkBackend`] over the coordination server and the storage peers, and the storage
//! daemon's [`ServerLink`] over the server's HTTPS API.
//!
//! A put asks the server for placements (one batch token per target), sends each target
//! its chunks over QUIC, and retries what failed on other peers. A get asks the server
//! for the holders of a whole window of chunks at once (one batch get token each), keeps
//! several transfers in flight spread over the holders, and for each chunk tries its
//! holders in turn, online and least busy first; a chunk whose hash is wrong is reported
//! and the next holder is asked.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::api::{
    ChunkRef, ConfirmRequest, GetRequest, HeartbeatRequest, HeartbeatResponse, Placement,
    PutRequest, Reason, ReleaseRequest, ReportRequest, StripeRef, MAX_CHUNKS_PER_REQUEST,
};
use crate::client::{ClientError, ServerClient};
use crate::drive::backend::{BackendError, ChunkBackend, GetDone, Quota};
use crate::erasure::{self, Geometry};
use crate::ids::{ChunkId, PeerId, VerifiedChunk};
use crate::peer::client::{PeerAddr, PeerClient, PeerError};
use crate::peer::link::{LinkError, ServerLink};

/// How many times a put moves failed chunks to other peers before giving up (the drive
/// keeps the data staged and tries again later).
const PUT_ATTEMPTS: usize = 3;
/// Chunks per put request: bounded so a huge file does not make one huge token.
const PUT_BATCH: usize = 256;
/// A holder that could not be reached is asked last for this long, so a peer that just
/// died costs one connect timeout, not one per chunk read.
const SUSPECT_FOR: Duration = Duration::from_secs(60);

/// How a drive's chunks are kept on peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redundancy {
    /// Whole copies on this many distinct peers.
    Replicas(u8),
    /// Reed-Solomon erasure coding: `data` + `parity` shards on distinct peers; any
    /// `data` of them rebuild the chunk.
    Erasure {
        /// Data shards (`k`).
        data: u8,
        /// Parity shards (`m`).
        parity: u8,
    },
}

impl Redundancy {
    /// Stored bytes per chunk byte, as a fraction (numerator, denominator).
    fn overhead(&self) -> (u64, u64) {
        match *self {
            Redundancy::Replicas(r) => (u64::from(r.max(1)), 1),
            Redundancy::Erasure { data, parity } => {
                (u64::from(data) + u64::from(parity), u64::from(data.max(1)))
            }
        }
    }
}

/// Transfers one [`ChunkBackend::get_many`] keeps in flight: enough to keep every
/// holder's connection busy, few enough to bound the bytes in memory (chunks are 1 MiB on
/// average, 4 MiB at most).
const GET_IN_FLIGHT: usize = 16;

/// Each chunk's holders in a get response, in the server's order.
type Holders<'a> = HashMap<ChunkId, Vec<&'a Placement>>;

/// Counts a transfer against a peer while it runs, so concurrent reads pick the least
/// busy holder.
struct Busy<'a> {
    map: &'a std::sync::Mutex<HashMap<PeerId, usize>>,
    peer: PeerId,
}

impl<'a> Busy<'a> {
    fn on(map: &'a std::sync::Mutex<HashMap<PeerId, usize>>, peer: PeerId) -> Busy<'a> {
        *map.lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer)
            .or_default() += 1;
        Busy { map, peer }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.peer);
            }
        }
    }
}

/// The drive's chunk storage on other peers.
pub struct RemoteBackend {
    rt: Arc<tokio::runtime::Runtime>,
    server: ServerClient,
    peers: PeerClient,
    replicas: u8,
    redundancy: Redundancy,
    /// Holders that failed to answer lately, and when.
    suspects: std::sync::Mutex<HashMap<PeerId, std::time::Instant>>,
    /// Transfers running now, per holder.
    busy: std::sync::Mutex<HashMap<PeerId, usize>>,
}

impl std::fmt::Debug for RemoteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RemoteBackend({}, {:?})",
            self.server.base_url(),
            self.redundancy
        )
    }
}

fn unavailable(e: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable(e.to_string())
}

impl RemoteBackend {
    /// A backend storing `replicas` copies of each chunk, driving its async clients on
    /// `rt` (callers are plain threads: FUSE workers and the uploader).
    pub fn new(
        rt: Arc<tokio::runtime::Runtime>,
        server: ServerClient,
        replicas: u8,
    ) -> Result<RemoteBackend, PeerError> {
        let peers = {
            let _guard = rt.enter();
            let c = PeerClient::new()?;
            match server.rendezvous() {
                Some(r) => c.with_rendezvous(r),
                None => c,
            }
        };
        Ok(RemoteBackend {
            rt,
            server,
            peers,
            replicas: replicas.max(1),
            redundancy: Redundancy::Replicas(replicas.max(1)),
            suspects: std::sync::Mutex::new(HashMap::new()),
            busy: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Store new chunks erasure-coded, `data` + `parity` shards each, instead of as
    /// replicas (chunks stored before keep their form; reads handle both).
    pub fn with_erasure(mut self, data: u8, parity: u8) -> RemoteBackend {
        self.redundancy = Redundancy::Erasure { data, parity };
        self
    }

    async fn put_batch(&self, chunks: &[(ChunkId, Vec<u8>)]) -> Result<(), BackendError> {
        // What goes over the wire: whole chunks, or each chunk's shards.
        let mut owned: HashMap<ChunkId, Cow<'_, [u8]>> = HashMap::new();
        let mut todo: Vec<ChunkRef> = Vec::new();
        let mut stripes: Vec<StripeRef> = Vec::new();
        for (id, b) in chunks {
            match self.redundancy {
                Redundancy::Replicas(_) => {
                    todo.push(ChunkRef {
                        id: *id,
                        size: b.len() as u32,
                    });
                    owned.insert(*id, Cow::Borrowed(b.as_slice()));
                }
                Redundancy::Erasure { data, parity } => {
                    let (g, shards) = erasure::encode(b, data, parity).map_err(unavailable)?;
                    let mut refs = Vec::with_capacity(shards.len());
                    for s in shards {
                        let sid = ChunkId::of(&s);
                        refs.push(ChunkRef {
                            id: sid,
                            size: g.stored_len(),
                        });
                        owned.insert(sid, Cow::Owned(s));
                    }
                    stripes.push(StripeRef {
                        chunk: *id,
                        chunk_size: b.len() as u32,
                        data,
                        parity,
                        shards: refs,
                    });
                }
            }
        }
        let bytes: HashMap<ChunkId, &[u8]> = owned.iter().map(|(k, v)| (*k, &**v)).collect();
        let mut exclude: Vec<PeerId> = Vec::new();
        let mut last_error = String::from("no placement");
        for _ in 0..PUT_ATTEMPTS {
            let resp = self
                .server
                .put(&PutRequest {
                    chunks: todo.clone(),
                    replicas: self.replicas,
                    exclude: exclude.clone(),
                    stripes: stripes.clone(),
                })
                .await;
            let resp = match resp {
                Ok(r) => r,
                Err(e) if e.refused() == Some(Reason::OverQuota) => {
                    // The drive turns this into ENOSPC; the numbers are for its logs.
                    let needed = todo.iter().map(|c| u64::from(c.size)).sum::<u64>()
                        + stripes.iter().map(|s| u64::from(s.chunk_size)).sum::<u64>();
                    let available = self
                        .quota_async()
                        .await
                        .map(|q| q.total_bytes.saturating_sub(q.used_bytes))
                        .unwrap_or(0);
                    return Err(BackendError::OverQuota { needed, available });
                }
                Err(e) => return Err(unavailable(e)),
            };
            let sends = resp
                .placements
                .iter()
                .map(|p| self.send_placement(p, &bytes));
            let results = futures_util::future::join_all(sends).await;
            let mut failed: HashSet<ChunkId> = HashSet::new();
            for (p, res) in resp.placements.iter().zip(results) {
                if let Err((chunks, why)) = res {
                    last_error = format!("peer {}: {why}", p.target);
                    exclude.push(p.target);
                    let _ = self
                        .server
                        .report(&ReportRequest::TransferFailed {
                            target: p.target,
                            txid: p.txid,
                            chunks: chunks.clone(),
                        })
                        .await;
                    failed.extend(chunks);
                }
            }
            if failed.is_empty() {
                return Ok(());
            }
            todo.retain(|c| failed.contains(&c.id));
            // The server places again only the shards that still lack a holder.
            stripes.retain(|s| s.shards.iter().any(|sh| failed.contains(&sh.id)));
        }
        Err(BackendError::Unavailable(format!(
            "{} chunks could not be stored: {last_error}",
            todo.len() + stripes.len()
        )))
    }

    /// Send one placement's chunks; on failure, the chunks that did not make it.
    async fn send_placement(
        &self,
        p: &Placement,
        bytes: &HashMap<ChunkId, &[u8]>,
    ) -> Result<(), (Vec<ChunkId>, String)> {
        let all = || (p.chunks.clone(), String::new());
        let addr = PeerAddr::of_placement(p)
            .await
            .map_err(|e| (all().0, e.to_string()))?;
        let batch: Vec<(ChunkId, &[u8])> = p
            .chunks
            .iter()
            .filter_map(|id| bytes.get(id).map(|b| (*id, *b)))
            .collect();
        let results = self
            .peers
            .put(&addr, &p.token, &batch)
            .await
            .map_err(|e| (all().0, e.to_string()))?;
        let mut failed = Vec::new();
        let mut why = String::new();
        for ((id, _), r) in batch.iter().zip(results) {
            if let Err(e) = r {
                why = e.to_string();
                failed.push(*id);
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err((failed, why))
        }
    }

    /// The quota as the drive counts it: each chunk once (the server counts every replica
    /// or shard).
    async fn quota_async(&self) -> Result<Quota, BackendError> {
        let st = self.server.quota().await.map_err(unavailable)?;
        let (num, den) = self.redundancy.overhead();
        Ok(Quota {
            total_bytes: st.quota_bytes / num * den,
            used_bytes: st.used_bytes / num * den,
        })
    }

    /// Fetch `wants` with one token request per [`MAX_CHUNKS_PER_REQUEST`] chunks and up
    /// to [`GET_IN_FLIGHT`] transfers at once, handing each result to `done` as it lands.
    async fn get_many_async(&self, wants: &[(ChunkId, u32)], done: &mut GetDone<'_>) {
        for (g, group) in wants.chunks(MAX_CHUNKS_PER_REQUEST).enumerate() {
            let base = g * MAX_CHUNKS_PER_REQUEST;
            let ids = group.iter().map(|(id, _)| *id).collect();
            let resp = match self.server.get(&GetRequest { chunks: ids }).await {
                Ok(r) => r,
                Err(e) => {
                    for i in 0..group.len() {
                        done(base + i, Err(unavailable(&e)));
                    }
                    continue;
                }
            };
            let stripes: HashMap<ChunkId, &StripeRef> =
                resp.stripes.iter().map(|s| (s.chunk, s)).collect();
            let mut holders: HashMap<ChunkId, Vec<&Placement>> = HashMap::new();
            for p in &resp.placements {
                for c in &p.chunks {
                    holders.entry(*c).or_default().push(p);
                }
            }
            let fetch = |i: usize| {
                let (id, size) = group[i];
                let (stripes, holders) = (&stripes, &holders);
                async move {
                    let r = match stripes.get(&id) {
                        Some(st) => self.get_striped(st, size, holders).await,
                        None => self.fetch_from_holders(holders, id, size).await,
                    };
                    (i, r)
                }
            };
            let mut flying = futures_util::stream::FuturesUnordered::new();
            let mut next = 0;
            while next < group.len() || !flying.is_empty() {
                while flying.len() < GET_IN_FLIGHT && next < group.len() {
                    flying.push(fetch(next));
                    next += 1;
                }
                if let Some((i, r)) = futures_util::StreamExt::next(&mut flying).await {
                    done(base + i, r);
                }
            }
        }
    }

    /// Rebuild a striped chunk from its shards: the data shards at once, then parity
    /// shards one by one for any that failed.
    async fn get_striped(
        &self,
        st: &StripeRef,
        size: u32,
        holders: &Holders<'_>,
    ) -> Result<VerifiedChunk, BackendError> {
        let stored_len = st.shards.first().map_or(0, |s| s.size);
        if st.chunk_size != size {
            return Err(BackendError::Corrupt(st.chunk));
        }
        let g = Geometry::from_stored(st.data, st.parity, st.chunk_size, stored_len)
            .map_err(|_| BackendError::Corrupt(st.chunk))?;
        let k = st.data as usize;
        let fetch = |i: usize| {
            let sh = st.shards[i];
            async move { (i, self.fetch_from_holders(holders, sh.id, sh.size).await) }
        };
        // First the k shards most likely to come back (a holder that just failed us, or
        // none at all, last; data shards before parity: no decoding), all at once; then
        // the others one by one while some are missing.
        let order: Vec<usize> = {
            let sus = self.suspects.lock().unwrap_or_else(|e| e.into_inner());
            let doubtful = |i: usize| {
                holders
                    .get(&st.shards[i].id)
                    .and_then(|h| h.first())
                    .is_none_or(|p| !p.online || sus.contains_key(&p.target))
            };
            let mut o: Vec<usize> = (0..st.shards.len()).collect();
            o.sort_by_key(|&i| (doubtful(i), i >= k));
            o
        };
        let mut got = Vec::with_capacity(k);
        let mut last = None;
        let first = order.iter().take(k).map(|&i| fetch(i));
        for (i, r) in futures_util::future::join_all(first).await {
            match r {
                Ok(b) => got.push((i, b.into_bytes())),
                Err(e) => last = Some(e),
            }
        }
        for &i in order.iter().skip(k) {
            if got.len() >= k {
                break;
            }
            match fetch(i).await {
                (i, Ok(b)) => got.push((i, b.into_bytes())),
                (_, Err(e)) => last = Some(e),
            }
        }
        if got.len() < k {
            return Err(last.unwrap_or(BackendError::NotFound(st.chunk)));
        }
        erasure::rebuild(&g, &got, &st.chunk).map_err(|e| {
            tracing::warn!(chunk = ?st.chunk, error = %e, "rebuilding a striped chunk failed");
            BackendError::Corrupt(st.chunk)
        })
    }

    /// Fetch chunk (or shard) `id` from the first of its holders that serves bytes with
    /// the right hash, reporting the ones that serve wrong bytes. Holders are tried
    /// online first, then least busy (so a window of reads spreads over every holder),
    /// and ones that just failed us last.
    async fn fetch_from_holders(
        &self,
        holders: &Holders<'_>,
        id: ChunkId,
        size: u32,
    ) -> Result<VerifiedChunk, BackendError> {
        let mut last = None;
        let mut holders: Vec<&Placement> = holders.get(&id).cloned().unwrap_or_default();
        {
            let mut sus = self.suspects.lock().unwrap_or_else(|e| e.into_inner());
            sus.retain(|_, t| t.elapsed() < SUSPECT_FOR);
            let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            // A stable sort keeps the server's order among equals.
            holders.sort_by_key(|p| {
                (
                    sus.contains_key(&p.target),
                    !p.online,
                    busy.get(&p.target).copied().unwrap_or(0),
                )
            });
        }
        for p in holders {
            let addr = match PeerAddr::of_placement(p).await {
                Ok(a) => a,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let fetched = {
                let _busy = Busy::on(&self.busy, p.target);
                self.peers.get(&addr, &p.token, &id, size).await
            };
            match fetched {
                Ok(bytes) => {
                    self.suspects
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&p.target);
                    return Ok(bytes);
                }
                Err(e) => {
                    if matches!(
                        e,
                        PeerError::Connect { .. } | PeerError::Connection(_) | PeerError::Timeout
                    ) {
                        self.suspects
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(p.target, std::time::Instant::now());
                    }
                    if matches!(e, PeerError::CorruptChunk { .. } | PeerError::HashMismatch) {
                        let _ = self
                            .server
                            .report(&ReportRequest::BadChunk {
                                holder: p.target,
                                chunk: id,
                            })
                            .await;
                    }
                    tracing::warn!(holder = %p.target, chunk = ?id, error = %e, "fetch failed; trying the next holder");
                    last = Some(e);
                }
            }
        }
        match last {
            None => Err(BackendError::NotFound(id)),
            Some(PeerError::CorruptChunk { .. }) | Some(PeerError::HashMismatch) => {
                Err(BackendError::Corrupt(id))
            }
            Some(e) => Err(unavailable(e)),
        }
    }
}

impl ChunkBackend for RemoteBackend {
    fn put(&self, chunks: &[(ChunkId, Vec<u8>)]) -> Result<(), BackendError> {
        self.rt.block_on(async {
            for batch in chunks.chunks(PUT_BATCH) {
                self.put_batch(batch).await?;
            }
            Ok(())
        })
    }

    fn get(&self, id: ChunkId, size: u32) -> Result<VerifiedChunk, BackendError> {
        let mut out = Err(BackendError::NotFound(id));
        self.get_many(&[(id, size)], &mut |_, r| out = r);
        out
    }

    fn get_many(&self, wants: &[(ChunkId, u32)], done: &mut GetDone<'_>) {
        self.rt.block_on(self.get_many_async(wants, done))
    }

    fn release(&self, ids: &[ChunkId]) -> Result<(), BackendError> {
        self.rt.block_on(async {
            for batch in ids.chunks(MAX_CHUNKS_PER_REQUEST) {
                self.server
                    .release(&ReleaseRequest {
                        chunks: batch.to_vec(),
                    })
                    .await
                    .map_err(unavailable)?;
            }
            Ok(())
        })
    }

    fn quota(&self) -> Result<Quota, BackendError> {
        let st = self.rt.block_on(self.server.quota()).map_err(unavailable)?;
        // The server counts every replica or shard; the drive counts each chunk once.
        let (num, den) = self.redundancy.overhead();
        Ok(Quota {
            total_bytes: st.quota_bytes / num * den,
            used_bytes: st.used_bytes / num * den,
        })
    }
}

/// The storage daemon's link to the server: the authenticated HTTPS client.
#[derive(Clone)]
pub struct HttpLink {
    server: Arc<ServerClient>,
}

impl HttpLink {
    /// Wrap a client that carries this peer's identity.
    pub fn new(server: ServerClient) -> HttpLink {
        HttpLink {
            server: Arc::new(server),
        }
    }
}

fn link_error(e: ClientError) -> LinkError {
    LinkError(e.to_string())
}

impl ServerLink for HttpLink {
    async fn confirm(&self, req: ConfirmRequest) -> Result<(), LinkError> {
        let done = self.server.confirm(&req).await.map_err(link_error)?;
        match done.unexpected.len() {
            0 => Ok(()),
            n => Err(LinkError(format!(
                "the server expected {n} of these {} chunks nowhere (placement expired)",
                req.chunks.len()
            ))),
        }
    }

    async fn report(&self, req: ReportRequest) -> Result<(), LinkError> {
        self.server.report(&req).await.map_err(link_error)
    }

    async fn heartbeat(&self, req: HeartbeatRequest) -> Result<HeartbeatResponse, LinkError> {
        self.server.heartbeat(&req).await.map_err(link_error)
    }

    async fn inventory(
        &self,
        req: crate::api::InventoryRequest,
    ) -> Result<crate::api::InventoryResponse, LinkError> {
        self.server
            .call(crate::api::path::INVENTORY, &req)
            .await
            .map_err(link_error)
    }
}

/// Default time between heartbeats of a daemon started from the command line.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

impl crate::drive::RootStore for RemoteBackend {
    fn put_root(&self, version: u64, sealed: &[u8]) -> Result<Vec<u64>, crate::drive::RootError> {
        self.rt
            .block_on(self.server.put_root(&crate::api::PutRootRequest {
                version,
                sealed: hex::encode(sealed),
            }))
            .map(|r| r.kept)
            .map_err(|e| {
                if e.refused() == Some(Reason::StaleRoot) {
                    crate::drive::RootError::Stale
                } else {
                    crate::drive::RootError::Unavailable(e.to_string())
                }
            })
    }

    fn drop_roots(&self, versions: &[u64]) -> Result<Vec<u64>, crate::drive::RootError> {
        let mut kept = Vec::new();
        for batch in versions.chunks(crate::api::MAX_ROOT_DROP) {
            kept = self
                .rt
                .block_on(self.server.drop_roots(&crate::api::DropRootsRequest {
                    versions: batch.to_vec(),
                }))
                .map_err(|e| crate::drive::RootError::Unavailable(e.to_string()))?
                .kept;
        }
        Ok(kept)
    }

    fn kept_roots(&self) -> Result<Vec<(u64, i64)>, crate::drive::RootError> {
        self.rt.block_on(async {
            let unavailable = |e: ClientError| crate::drive::RootError::Unavailable(e.to_string());
            let req = crate::api::GetRootRequest::default();
            let kept = self.server.get_root(&req).await.map_err(unavailable)?.kept;
            let mut out = Vec::with_capacity(kept.len());
            for v in kept {
                let req = crate::api::GetRootRequest { version: Some(v) };
                // A version dropped meanwhile is left out.
                if let Some(r) = self.server.get_root(&req).await.map_err(unavailable)?.root {
                    out.push((v, (r.created_ms / 1000) as i64));
                }
            }
            Ok(out)
        })
    }

    fn get_root(&self) -> Result<Option<(u64, Vec<u8>)>, crate::drive::RootError> {
        let resp = self
            .rt
            .block_on(self.server.get_root(&crate::api::GetRootRequest::default()))
            .map_err(|e| crate::drive::RootError::Unavailable(e.to_string()))?;
        match resp.root {
            None => Ok(None),
            Some(r) => {
                let sealed = hex::decode(&r.sealed).map_err(|_| {
                    crate::drive::RootError::Unavailable(
                        "the server sent a root that is not hex".into(),
                    )
                })?;
                Ok(Some((r.version, sealed)))
            }
        }
    }
}
