//! `peerstash verify`: read the drive's chunks back from *every* holder the server lists
//! (all of them, or a random sample), check each copy's hash and that the chunk opens
//! under the drive's key, and say what is unreadable.
//!
//! A read only needs one good copy; verify looks at every copy, so a holder that lost or
//! corrupted its copy is found while the other copies are still there. Each bad copy is
//! reported to the server ([`ReportRequest::BadChunk`]); the server answers a report by
//! auditing that location at once (it does not take an owner's word against a holder),
//! and a failed audit has the copy replaced.
//!
//! A striped (erasure-coded) chunk is checked shard by shard: each shard's hash against
//! its id on every holder. Shards cannot be opened one by one, so the decryption check
//! covers replicated chunks.

use std::collections::HashMap;

use crate::api::{GetRequest, ReportRequest, MAX_CHUNKS_PER_REQUEST};
use crate::client::server_api::{ClientError, ServerClient};
use crate::drive::crypto::ChunkSealer;
use crate::ids::{ChunkId, PeerId};
use crate::peer::{PeerAddr, PeerClient, PeerError};

/// Why a verification could not run (bad copies are findings, not errors).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The server could not be asked where the chunks are.
    #[error("asking the server where the chunks are: {0}")]
    Server(#[from] ClientError),
    /// The sample is not a percentage.
    #[error("the sample must be a percentage above 0 and at most 100, not {0}")]
    BadSample(f64),
    /// No randomness for the sample.
    #[error("no randomness for the sample: {0}")]
    Random(String),
}

/// One copy that did not read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadCopy {
    /// The chunk (or shard).
    pub chunk: ChunkId,
    /// Its holder.
    pub holder: PeerId,
    /// What went wrong.
    pub why: String,
}

/// What a verification found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Chunks checked.
    pub chunks: usize,
    /// Copies (or shards) read.
    pub copies: usize,
    /// Copies that were missing, corrupt or did not open (reported to the server).
    pub bad: Vec<BadCopy>,
    /// Holders that could not be reached (not reported: the server sees them go quiet).
    pub unreachable: Vec<BadCopy>,
    /// Chunks with no good copy at all (for a striped chunk: fewer good shards than it
    /// needs).
    pub unreadable: Vec<ChunkId>,
}

/// Pick about `percent` % of `chunks` at random (at least one, if any); all of them at 100.
pub fn sample(
    mut chunks: Vec<(ChunkId, u32)>,
    percent: f64,
) -> Result<Vec<(ChunkId, u32)>, VerifyError> {
    if !(percent > 0.0 && percent <= 100.0) {
        return Err(VerifyError::BadSample(percent));
    }
    let want = ((chunks.len() as f64 * percent / 100.0).ceil() as usize).min(chunks.len());
    // A partial Fisher-Yates shuffle: the first `want` are a uniform sample.
    for i in 0..want {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).map_err(|e| VerifyError::Random(e.to_string()))?;
        let j = i + (u64::from_le_bytes(r) % (chunks.len() - i) as u64) as usize;
        chunks.swap(i, j);
    }
    chunks.truncate(want);
    Ok(chunks)
}

/// Read every copy of every chunk in `chunks` (id, stored size) back from its holders.
pub async fn verify(
    server: &ServerClient,
    peers: &PeerClient,
    sealer: &ChunkSealer,
    chunks: &[(ChunkId, u32)],
) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport::default();
    for batch in chunks.chunks(MAX_CHUNKS_PER_REQUEST) {
        let sizes: HashMap<ChunkId, u32> = batch.iter().copied().collect();
        let ids: Vec<ChunkId> = batch.iter().map(|(id, _)| *id).collect();
        let resp = server.get(&GetRequest { chunks: ids }).await?;
        report.chunks += batch.len();
        report.unreadable.extend(resp.missing.iter().copied());
        // Shard id → (its chunk, its size); and how many good shards each striped chunk
        // has, against how many it needs.
        let mut shard_of: HashMap<ChunkId, (ChunkId, u32)> = HashMap::new();
        let mut good_shards: HashMap<ChunkId, (usize, usize)> = HashMap::new();
        for st in &resp.stripes {
            good_shards.insert(st.chunk, (0, usize::from(st.data)));
            for sh in &st.shards {
                shard_of.insert(sh.id, (st.chunk, sh.size));
            }
        }
        let mut good: HashMap<ChunkId, usize> = HashMap::new();
        for p in &resp.placements {
            let addr = PeerAddr::of_placement(p).await;
            for id in &p.chunks {
                let (size, striped) = match (shard_of.get(id), sizes.get(id)) {
                    (Some((_, size)), _) => (*size, true),
                    (None, Some(size)) => (*size, false),
                    (None, None) => continue,
                };
                report.copies += 1;
                let got = match &addr {
                    Ok(a) => peers.get(a, &p.token, id, size).await,
                    Err(e) => Err(e.clone()),
                };
                let checked = match got {
                    Ok(_) if striped => Ok(()),
                    Ok(chunk) => sealer
                        .open_verified(chunk)
                        .map(|_| ())
                        .map_err(|e| (false, e.to_string())),
                    // The holder could not be reached: that says nothing about the copy.
                    Err(
                        e @ (PeerError::Connect { .. }
                        | PeerError::Connection(_)
                        | PeerError::Timeout),
                    ) => Err((true, e.to_string())),
                    Err(e) => Err((false, e.to_string())),
                };
                let bad = |why: String| BadCopy {
                    chunk: *id,
                    holder: p.target,
                    why,
                };
                match checked {
                    Ok(()) => {
                        if let Some((chunk, _)) = shard_of.get(id) {
                            if let Some(g) = good_shards.get_mut(chunk) {
                                g.0 += 1;
                            }
                        } else {
                            *good.entry(*id).or_default() += 1;
                        }
                    }
                    Err((true, why)) => report.unreachable.push(bad(why)),
                    Err((false, why)) => {
                        let _ = server
                            .report(&ReportRequest::BadChunk {
                                holder: p.target,
                                chunk: *id,
                            })
                            .await;
                        report.bad.push(bad(why));
                    }
                }
            }
        }
        for (id, _) in batch {
            let readable = match good_shards.get(id) {
                Some((ok, need)) => ok >= need,
                None => good.get(id).copied().unwrap_or(0) > 0,
            };
            if !readable && !report.unreadable.contains(id) {
                report.unreadable.push(*id);
            }
        }
    }
    Ok(report)
}
