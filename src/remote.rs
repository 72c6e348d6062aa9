//! The glue between the parts of a user's machine and the network: the drive's
//! [`ChunkBackend`] over the coordination server and the storage peers, and the storage
//! daemon's [`ServerLink`] over the server's HTTPS API.
//!
//! A put asks the server for placements (one batch token per target), sends each target
//! its chunks over QUIC, and retries what failed on other peers. A get asks the server
//! for holders (one batch get token each) and tries them in turn, online first; a chunk
//! whose hash is wrong is reported and the next holder is asked.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::api::{
    ChunkRef, ConfirmRequest, GetRequest, HeartbeatRequest, HeartbeatResponse, Placement,
    PutRequest, ReleaseRequest, ReportRequest, MAX_CHUNKS_PER_REQUEST,
};
use crate::client::{ClientError, ServerClient};
use crate::drive::backend::{BackendError, ChunkBackend, Quota};
use crate::ids::{ChunkId, PeerId};
use crate::peer::client::{PeerAddr, PeerClient, PeerError};
use crate::peer::link::{LinkError, ServerLink};

/// How many times a put moves failed chunks to other peers before giving up (the drive
/// keeps the data staged and tries again later).
const PUT_ATTEMPTS: usize = 3;
/// Chunks per put request: bounded so a huge file does not make one huge token.
const PUT_BATCH: usize = 256;

/// The drive's chunk storage on other peers.
pub struct RemoteBackend {
    rt: Arc<tokio::runtime::Runtime>,
    server: ServerClient,
    peers: PeerClient,
    replicas: u8,
}

impl std::fmt::Debug for RemoteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RemoteBackend({}, {} replicas)",
            self.server.base_url(),
            self.replicas
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
            PeerClient::new()?
        };
        Ok(RemoteBackend {
            rt,
            server,
            peers,
            replicas: replicas.max(1),
        })
    }

    async fn put_batch(&self, chunks: &[(ChunkId, Vec<u8>)]) -> Result<(), BackendError> {
        let bytes: HashMap<ChunkId, &[u8]> =
            chunks.iter().map(|(id, b)| (*id, b.as_slice())).collect();
        let mut todo: Vec<ChunkRef> = chunks
            .iter()
            .map(|(id, b)| ChunkRef {
                id: *id,
                size: b.len() as u32,
            })
            .collect();
        let mut exclude: Vec<PeerId> = Vec::new();
        let mut last_error = String::from("no placement");
        for _ in 0..PUT_ATTEMPTS {
            let resp = self
                .server
                .put(&PutRequest {
                    chunks: todo.clone(),
                    replicas: self.replicas,
                    exclude: exclude.clone(),
                })
                .await;
            let resp = match resp {
                Ok(r) => r,
                Err(e) if e.reason() == Some("over_quota") => {
                    // The drive turns this into ENOSPC; the numbers are for its logs.
                    let needed = todo.iter().map(|c| u64::from(c.size)).sum();
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
        }
        Err(BackendError::Unavailable(format!(
            "{} chunks could not be stored: {last_error}",
            todo.len()
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

    /// The quota as the drive counts it: each chunk once (the server counts every replica).
    async fn quota_async(&self) -> Result<Quota, BackendError> {
        let st = self.server.status().await.map_err(unavailable)?;
        let r = u64::from(self.replicas);
        Ok(Quota {
            total_bytes: st.quota_bytes / r,
            used_bytes: st.used_bytes / r,
        })
    }

    async fn get_async(&self, id: ChunkId, size: u32) -> Result<Vec<u8>, BackendError> {
        let resp = self
            .server
            .get(&GetRequest { chunks: vec![id] })
            .await
            .map_err(unavailable)?;
        let mut last = None;
        for p in resp.placements.iter().filter(|p| p.chunks.contains(&id)) {
            let addr = match PeerAddr::of_placement(p).await {
                Ok(a) => a,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            match self.peers.get(&addr, &p.token, &id, size).await {
                Ok(bytes) => return Ok(bytes),
                Err(e) => {
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

    fn get(&self, id: ChunkId, size: u32) -> Result<Vec<u8>, BackendError> {
        self.rt.block_on(self.get_async(id, size))
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
        let st = self
            .rt
            .block_on(self.server.status())
            .map_err(unavailable)?;
        // The server counts every replica; the drive counts each chunk once.
        let r = u64::from(self.replicas);
        Ok(Quota {
            total_bytes: st.quota_bytes / r,
            used_bytes: st.used_bytes / r,
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
        self.server
            .confirm(&req)
            .await
            .map(|_| ())
            .map_err(link_error)
    }

    async fn report(&self, req: ReportRequest) -> Result<(), LinkError> {
        self.server.report(&req).await.map_err(link_error)
    }

    async fn heartbeat(&self, req: HeartbeatRequest) -> Result<HeartbeatResponse, LinkError> {
        self.server.heartbeat(&req).await.map_err(link_error)
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
                if e.reason() == Some("stale_root") {
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
