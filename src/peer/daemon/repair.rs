//! Repair orders: make a chunk here because one of its holders was lost — copy it from a
//! live holder, or, for a shard of an erasure-coded stripe, recompute it from `k` other
//! shards.
//!
//! The server's heartbeat response carries the orders (see [`RepairOrder`]). Each is
//! checked like anything from the network: the put token must open under this daemon's
//! own key and cover exactly the chunk; every fetched chunk or shard must hash to its id,
//! and a recomputed shard too; the chunk is stored through the same crash-safe writer as
//! a PUT and confirmed through the same queue, so the server commits the new location
//! only once the bytes are on disk.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::Shared;
use crate::api::{ConfirmRequest, Rebuild, RepairOrder, MAX_STRIPE_SHARDS};
use crate::control::now_secs;
use crate::erasure::{self, ErasureError, Geometry};
use crate::ids::PeerId;
use crate::peer::{PeerAddr, PeerClient, PeerError, StoreError};
use crate::token::{TokenError, TxKind, MAX_CHUNK_SIZE};

/// Orders (one heartbeat's worth each) waiting for the worker; beyond this they are
/// dropped, and the server hands the repairs out again once their tokens expire.
pub(super) const QUEUE: usize = 8;
/// Copies in flight at once.
const PARALLEL: usize = 4;
/// A holder that does not answer this fast is skipped (the order is retried later).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why one order was not carried out.
#[derive(Debug, thiserror::Error)]
enum RepairError {
    #[error("bad order: {0}")]
    BadOrder(&'static str),
    #[error("put token refused: {0}")]
    Token(#[from] TokenError),
    #[error("local store: {0}")]
    Store(#[from] StoreError),
    #[error("fetching from the holder: {0}")]
    Fetch(#[from] PeerError),
    #[error("rebuilding the shard: {0}")]
    Rebuild(#[from] ErasureError),
    #[error("the server did not commit the copy")]
    NotConfirmed,
}

/// Run orders as they come, until `stop`.
pub(super) async fn worker(
    shared: Arc<Shared>,
    mut orders: mpsc::Receiver<Vec<RepairOrder>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut client: Option<PeerClient> = None;
    loop {
        let batch = tokio::select! {
            b = orders.recv() => match b { Some(b) => b, None => return },
            _ = stop.changed() => return,
        };
        if client.is_none() {
            match PeerClient::new() {
                Ok(c) => {
                    // Repairs reach holders behind NAT like any client does.
                    let c = match &shared.rendezvous {
                        Some(r) => c.with_rendezvous(r.clone()),
                        None => c,
                    };
                    client = Some(c.with_connect_timeout(CONNECT_TIMEOUT))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a QUIC client for repairs");
                    continue;
                }
            }
        }
        let Some(c) = client.as_ref() else { continue };
        let shared = &*shared;
        // Owned orders and plain futures: the combinators stay 'static-friendly.
        let run = async {
            let (mut done, mut failed) = (0usize, 0usize);
            let mut pending = futures_util::stream::FuturesUnordered::new();
            let mut orders = batch.into_iter();
            loop {
                while pending.len() < PARALLEL {
                    let Some(o) = orders.next() else { break };
                    pending.push(async move {
                        let r = repair_one(shared, c, &o).await;
                        (o, r)
                    });
                }
                let Some((o, r)) = pending.next().await else {
                    break;
                };
                match r {
                    Ok(()) => {
                        done += 1;
                        tracing::debug!(chunk = ?o.chunk, from = ?from(&o), "repaired a chunk");
                    }
                    Err(e) => {
                        failed += 1;
                        tracing::warn!(chunk = ?o.chunk, from = ?from(&o), error = %e, "repair failed");
                    }
                }
            }
            tracing::info!(done, failed, "repair orders carried out");
        };
        tokio::select! {
            _ = run => {}
            _ = stop.changed() => return,
        }
    }
}

/// Where an order's bytes come from (for logs).
fn from(o: &RepairOrder) -> Vec<PeerId> {
    match (&o.source, &o.rebuild) {
        (Some(p), _) => vec![p.target],
        (None, Some(r)) => r.sources.iter().map(|p| p.target).collect(),
        (None, None) => Vec::new(),
    }
}

async fn repair_one(
    shared: &Shared,
    client: &PeerClient,
    o: &RepairOrder,
) -> Result<(), RepairError> {
    if o.put.target != shared.me {
        return Err(RepairError::BadOrder("addressed to another peer"));
    }
    if o.size == 0 || o.size > MAX_CHUNK_SIZE {
        return Err(RepairError::BadOrder("chunk size out of range"));
    }
    if o.put.chunks != [o.chunk] {
        return Err(RepairError::BadOrder("the put token is for other chunks"));
    }
    // Only what a put token sealed under our own key covers gets stored, and each such
    // grant is used once, as for a PUT from a client.
    let auth = shared.verifier.open(o.put.token.as_bytes(), now_secs())?;
    auth.check(TxKind::Put, &o.chunk, u64::from(o.size))?;
    let need = if shared.store.contains(&o.chunk) {
        0
    } else {
        u64::from(o.size)
    };
    let reservation = shared.store.reserve(need)?;
    auth.permit(TxKind::Put, &o.chunk, u64::from(o.size), &shared.replay)?;
    let bytes = match (&o.source, &o.rebuild) {
        (Some(src), None) => {
            if src.target == shared.me || !src.chunks.contains(&o.chunk) {
                return Err(RepairError::BadOrder("the source does not hold the chunk"));
            }
            let holder = PeerAddr::of_placement(src).await?;
            // `get` checks the bytes hash to the chunk id: a lying holder is caught here.
            client
                .get(&holder, &src.token, &o.chunk, o.size)
                .await?
                .into_bytes()
        }
        (None, Some(rb)) => rebuild(shared.me, client, o, rb).await?,
        _ => {
            return Err(RepairError::BadOrder(
                "needs exactly one way to get the bytes",
            ))
        }
    };
    let mut writer = shared.store.writer(o.chunk, o.size, reservation).await?;
    writer.write(&bytes).await?;
    writer.commit().await?;
    let (done_tx, done_rx) = oneshot::channel();
    let req = ConfirmRequest {
        txid: auth.claims().txid,
        chunks: vec![o.chunk],
    };
    if shared.confirms.send((req, done_tx)).await.is_ok() && done_rx.await.unwrap_or(false) {
        Ok(())
    } else {
        Err(RepairError::NotConfirmed)
    }
}

/// Recompute shard `rb.index` of a stripe from `k` other shards, each fetched under its
/// holder's get token and hash-checked; the result must hash to the order's chunk id.
async fn rebuild(
    me: PeerId,
    client: &PeerClient,
    o: &RepairOrder,
    rb: &Rebuild,
) -> Result<Vec<u8>, RepairError> {
    let st = &rb.stripe;
    let index = rb.index as usize;
    let g = Geometry::from_stored(st.data, st.parity, st.chunk_size, o.size)
        .map_err(|_| RepairError::BadOrder("impossible stripe geometry"))?;
    if st.shards.len() != g.total()
        || st.shards.get(index).map(|s| (s.id, s.size)) != Some((o.chunk, o.size))
        || rb.sources.len() > MAX_STRIPE_SHARDS
    {
        return Err(RepairError::BadOrder("the stripe does not name this shard"));
    }
    let mut got: Vec<(usize, Vec<u8>)> = Vec::with_capacity(g.data as usize);
    let mut last = None;
    'sources: for p in rb.sources.iter().filter(|p| p.target != me) {
        let Ok(holder) = PeerAddr::of_placement(p).await else {
            continue;
        };
        for id in &p.chunks {
            if got.len() == g.data as usize {
                break 'sources;
            }
            let Some(j) = st.shards.iter().position(|s| s.id == *id) else {
                continue;
            };
            if j == index || got.iter().any(|(i, _)| *i == j) {
                continue;
            }
            match client.get(&holder, &p.token, id, o.size).await {
                Ok(bytes) => got.push((j, bytes.into_bytes())),
                Err(e) => last = Some(e),
            }
        }
    }
    if got.len() < g.data as usize {
        if let Some(e) = last {
            return Err(e.into());
        }
    }
    Ok(erasure::rebuild_shard(
        &g, &got, &st.chunk, index, &o.chunk,
    )?)
}
