//! Reed-Solomon erasure coding of chunks: `k` data shards and `m` parity shards, any `k`
//! of which rebuild the chunk. The same durability as replication for less lent space:
//! 4+2 survives two lost peers at 1.5× the size, where three replicas cost 3×.
//!
//! A stored chunk (already sealed: ciphertext) of `len` bytes is cut into `k` pieces of
//! `shard_len` bytes — `len / k` rounded up to a multiple of [`SHARD_ALIGN`], the last
//! piece zero-padded — and `m` parity shards of the same length are computed
//! (reed-solomon-simd). Each shard is stored as a chunk of its own, prefixed by a
//! [`SHARD_HEADER`]-byte header (its index, then the first 15 bytes of the chunk id) so
//! that no two shards anywhere share bytes — without it the zero padding of a small chunk
//! would give identical shards — and addressed by the BLAKE3 hash of those stored bytes,
//! so any holder can check it. The server records which shards make up which chunk (a
//! *stripe*) and places them on distinct peers. Rebuilding checks every fetched shard's
//! hash (the fetcher does) and header, then the rebuilt chunk's hash against its id.

use crate::ids::{ChunkId, VerifiedChunk};
use crate::token::MAX_CHUNK_SIZE;

/// Shard lengths are multiples of this (the coder works on 64-byte blocks).
pub const SHARD_ALIGN: usize = 64;
/// Bytes before each stored shard: its index, then the first 15 bytes of the chunk id.
pub const SHARD_HEADER: usize = 16;
/// Most data shards, and most parity shards, in a stripe.
pub const MAX_SHARDS: u8 = 32;

/// Why a stripe could not be made or rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErasureError {
    /// `k` or `m` out of range.
    #[error("erasure coding needs 1 to {MAX_SHARDS} data and 1 to {MAX_SHARDS} parity shards, not {0}+{1}")]
    Geometry(u8, u8),
    /// The chunk is empty or larger than a chunk may be.
    #[error("a chunk of {0} bytes cannot be striped")]
    Size(usize),
    /// Fewer than `k` good shards.
    #[error("only {have} of the {need} shards needed to rebuild")]
    TooFew {
        /// Good shards given.
        have: usize,
        /// Shards needed (`k`).
        need: usize,
    },
    /// The rebuilt bytes do not hash to what they should.
    #[error("the rebuilt bytes do not match their id")]
    Mismatch,
    /// The coder refused (a bug or inconsistent shard lengths).
    #[error("erasure coder: {0}")]
    Coder(String),
}

/// The shape of a stripe: `data` + `parity` shards of `shard_len` coded bytes (plus the
/// header when stored) for a chunk of `chunk_len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Data shards (`k`).
    pub data: u8,
    /// Parity shards (`m`).
    pub parity: u8,
    /// Bytes of the chunk.
    pub chunk_len: u32,
    /// Bytes of each shard.
    pub shard_len: u32,
}

impl Geometry {
    /// The geometry for a chunk of `chunk_len` bytes cut `data`+`parity`.
    pub fn new(data: u8, parity: u8, chunk_len: usize) -> Result<Geometry, ErasureError> {
        if data == 0 || parity == 0 || data > MAX_SHARDS || parity > MAX_SHARDS {
            return Err(ErasureError::Geometry(data, parity));
        }
        if chunk_len == 0 || chunk_len > MAX_CHUNK_SIZE as usize {
            return Err(ErasureError::Size(chunk_len));
        }
        let per = chunk_len.div_ceil(data as usize);
        let shard_len = per.div_ceil(SHARD_ALIGN) * SHARD_ALIGN;
        Ok(Geometry {
            data,
            parity,
            chunk_len: chunk_len as u32,
            shard_len: shard_len as u32,
        })
    }

    /// Check a geometry received from elsewhere (it must be what [`Geometry::new`] gives).
    pub fn check(&self) -> Result<(), ErasureError> {
        let expect = Geometry::new(self.data, self.parity, self.chunk_len as usize)?;
        if expect != *self {
            return Err(ErasureError::Coder("inconsistent shard length".into()));
        }
        Ok(())
    }

    /// Shards in all.
    pub fn total(&self) -> usize {
        self.data as usize + self.parity as usize
    }

    /// Bytes of each stored shard (header included).
    pub fn stored_len(&self) -> u32 {
        self.shard_len + SHARD_HEADER as u32
    }

    /// The geometry of a stripe whose stored shards are `stored_len` bytes.
    pub fn from_stored(
        data: u8,
        parity: u8,
        chunk_len: u32,
        stored_len: u32,
    ) -> Result<Geometry, ErasureError> {
        let g = Geometry {
            data,
            parity,
            chunk_len,
            shard_len: stored_len.saturating_sub(SHARD_HEADER as u32),
        };
        g.check()?;
        Ok(g)
    }
}

fn header(index: usize, chunk: &ChunkId) -> [u8; SHARD_HEADER] {
    let mut h = [0u8; SHARD_HEADER];
    h[0] = index as u8;
    h[1..].copy_from_slice(&chunk.0[..SHARD_HEADER - 1]);
    h
}

fn stored(index: usize, chunk: &ChunkId, coded: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SHARD_HEADER + coded.len());
    out.extend_from_slice(&header(index, chunk));
    out.extend_from_slice(coded);
    out
}

fn coder(e: reed_solomon_simd::Error) -> ErasureError {
    ErasureError::Coder(e.to_string())
}

/// Cut `chunk` into its `data` + `parity` stored shards (data shards first, each with its
/// header).
pub fn encode(
    chunk: &[u8],
    data: u8,
    parity: u8,
) -> Result<(Geometry, Vec<Vec<u8>>), ErasureError> {
    let g = Geometry::new(data, parity, chunk.len())?;
    let id = ChunkId::of(chunk);
    let n = g.shard_len as usize;
    let mut shards: Vec<Vec<u8>> = (0..data as usize)
        .map(|i| {
            let start = (i * n).min(chunk.len());
            let end = ((i + 1) * n).min(chunk.len());
            let mut s = chunk[start..end].to_vec();
            s.resize(n, 0);
            s
        })
        .collect();
    let parity_shards =
        reed_solomon_simd::encode(data as usize, parity as usize, &shards).map_err(coder)?;
    shards.extend(parity_shards);
    let shards = shards
        .iter()
        .enumerate()
        .map(|(i, s)| stored(i, &id, s))
        .collect();
    Ok((g, shards))
}

/// Rebuild chunk `id` from at least `k` stored shards given as `(index, bytes)` (each
/// already checked against its own id by whoever fetched it), and check it hashes to `id`.
pub fn rebuild(
    g: &Geometry,
    shards: &[(usize, Vec<u8>)],
    id: &ChunkId,
) -> Result<VerifiedChunk, ErasureError> {
    let originals = originals(g, shards, id)?;
    let mut chunk = Vec::with_capacity(g.data as usize * g.shard_len as usize);
    for s in &originals {
        chunk.extend_from_slice(s);
    }
    chunk.truncate(g.chunk_len as usize);
    VerifiedChunk::check(*id, chunk).map_err(|_| ErasureError::Mismatch)
}

/// Recompute stored shard `index` (data or parity) of chunk `chunk` from at least `k`
/// other stored shards, and check it hashes to `id`.
pub fn rebuild_shard(
    g: &Geometry,
    shards: &[(usize, Vec<u8>)],
    chunk: &ChunkId,
    index: usize,
    id: &ChunkId,
) -> Result<Vec<u8>, ErasureError> {
    if index >= g.total() {
        return Err(ErasureError::Coder(format!("no shard {index}")));
    }
    let mut originals = originals(g, shards, chunk)?;
    let shard = if index < g.data as usize {
        originals.swap_remove(index)
    } else {
        let mut parity = reed_solomon_simd::encode(g.data as usize, g.parity as usize, &originals)
            .map_err(coder)?;
        parity.swap_remove(index - g.data as usize)
    };
    let shard = stored(index, chunk, &shard);
    if ChunkId::of(&shard) != *id {
        return Err(ErasureError::Mismatch);
    }
    Ok(shard)
}

/// The `k` coded data shards, decoding the missing ones from parity. A stored shard with
/// the wrong length or header is left out.
fn originals(
    g: &Geometry,
    shards: &[(usize, Vec<u8>)],
    chunk: &ChunkId,
) -> Result<Vec<Vec<u8>>, ErasureError> {
    g.check()?;
    let (k, n) = (g.data as usize, g.shard_len as usize);
    let mut have: Vec<Option<&[u8]>> = vec![None; g.total()];
    for (i, s) in shards {
        if *i < have.len() && s.len() == SHARD_HEADER + n && s[..SHARD_HEADER] == header(*i, chunk)
        {
            have[*i] = Some(&s[SHARD_HEADER..]);
        }
    }
    let count = have.iter().filter(|s| s.is_some()).count();
    if count < k {
        return Err(ErasureError::TooFew {
            have: count,
            need: k,
        });
    }
    if have[..k].iter().all(|s| s.is_some()) {
        return Ok(have[..k]
            .iter()
            .map(|s| s.unwrap_or_default().to_vec())
            .collect());
    }
    let original: Vec<(usize, &[u8])> = (0..k).filter_map(|i| have[i].map(|s| (i, s))).collect();
    let recovery: Vec<(usize, &[u8])> = (k..g.total())
        .filter_map(|i| have[i].map(|s| (i - k, s)))
        .collect();
    let mut restored =
        reed_solomon_simd::decode(k, g.parity as usize, original, recovery).map_err(coder)?;
    (0..k)
        .map(|i| match have[i] {
            Some(s) => Ok(s.to_vec()),
            None => restored
                .remove(&i)
                .ok_or_else(|| ErasureError::Coder(format!("shard {i} not restored"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn any_k_of_k_plus_m_rebuild_the_chunk_and_every_shard() {
        for (k, m, len) in [
            (2u8, 1u8, 1usize),
            (2, 1, 4097),
            (4, 2, 1 << 20),
            (3, 3, 1000),
        ] {
            let chunk = bytes(len, k);
            let id = ChunkId::of(&chunk);
            let (g, shards) = encode(&chunk, k, m).unwrap();
            assert_eq!(shards.len(), g.total());
            assert!(shards.iter().all(|s| s.len() == g.stored_len() as usize));
            // Every shard distinct, even for a chunk shorter than k shards.
            let ids: std::collections::HashSet<ChunkId> =
                shards.iter().map(|s| ChunkId::of(s)).collect();
            assert_eq!(ids.len(), shards.len());
            // Every way of losing m shards.
            let total = g.total();
            for lost in 0..(1u32 << total) {
                if lost.count_ones() != m as u32 {
                    continue;
                }
                let kept: Vec<(usize, Vec<u8>)> = (0..total)
                    .filter(|i| lost & (1 << i) == 0)
                    .map(|i| (i, shards[i].clone()))
                    .collect();
                assert_eq!(rebuild(&g, &kept, &id).unwrap().into_bytes(), chunk);
                for i in (0..total).filter(|i| lost & (1 << i) != 0) {
                    let sid = ChunkId::of(&shards[i]);
                    assert_eq!(rebuild_shard(&g, &kept, &id, i, &sid).unwrap(), shards[i]);
                }
            }
            // One too many lost.
            let few: Vec<(usize, Vec<u8>)> = (0..k as usize - 1)
                .map(|i| (i, shards[i].clone()))
                .collect();
            assert!(matches!(
                rebuild(&g, &few, &id),
                Err(ErasureError::TooFew { .. })
            ));
        }
    }

    #[test]
    fn a_wrong_shard_never_rebuilds_wrong_bytes() {
        let chunk = bytes(10_000, 9);
        let id = ChunkId::of(&chunk);
        let (g, mut shards) = encode(&chunk, 4, 2).unwrap();
        shards[1][SHARD_HEADER + 7] ^= 1;
        let kept: Vec<(usize, Vec<u8>)> = [1, 2, 3, 4]
            .iter()
            .map(|&i| (i, shards[i].clone()))
            .collect();
        assert_eq!(rebuild(&g, &kept, &id), Err(ErasureError::Mismatch));
        assert!(Geometry::new(0, 1, 10).is_err());
        assert!(Geometry::new(2, 1, 0).is_err());
        let bad = Geometry { shard_len: 64, ..g };
        assert!(bad.check().is_err());
        // A shard of another stripe, or under another index, is not used.
        let (_, other) = encode(&bytes(10_000, 10), 4, 2).unwrap();
        let mixed: Vec<(usize, Vec<u8>)> = vec![
            (0, other[0].clone()),
            (2, shards[2].clone()),
            (3, shards[3].clone()),
            (4, shards[5].clone()),
        ];
        assert!(matches!(
            rebuild(&g, &mixed, &id),
            Err(ErasureError::TooFew { .. })
        ));
    }
}
