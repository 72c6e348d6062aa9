//! The chunk room: a chunk's plaintext from its reference — fetched through the
//! [`ChunkBackend`] (which checks the BLAKE3 id), opened under the data key, checked for
//! length — with a byte-bounded LRU cache of plaintext, single-flight fetches (the
//! kernel's read-ahead asks for one chunk several times at once) and read-ahead of the
//! next chunk. It knows nothing of files, handles or the index's locks: reads call it
//! without holding the model's lock.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use lru::LruCache;

use super::backend::{BackendError, ChunkBackend};
use super::crypto::ChunkSealer;
use super::index::ChunkRef;
use crate::ids::ChunkId;

/// Decrypted chunks, bounded by bytes.
struct ChunkCache {
    lru: LruCache<ChunkId, Arc<Vec<u8>>>,
    bytes: usize,
    cap: usize,
}

impl ChunkCache {
    fn get(&mut self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.lru.get(id).cloned()
    }

    fn put(&mut self, id: ChunkId, data: Arc<Vec<u8>>) {
        self.bytes += data.len();
        if let Some(old) = self.lru.put(id, data) {
            self.bytes -= old.len();
        }
        while self.bytes > self.cap {
            match self.lru.pop_lru() {
                Some((_, v)) => self.bytes -= v.len(),
                None => break,
            }
        }
    }
}

/// Fetching, verifying and opening chunks, shared by reads and the uploader.
pub(crate) struct Chunks {
    backend: Arc<dyn ChunkBackend>,
    sealer: ChunkSealer,
    cache: Mutex<ChunkCache>,
    prefetching: Mutex<HashSet<ChunkId>>,
    inflight: Mutex<HashMap<ChunkId, Arc<Mutex<()>>>>,
}

impl Chunks {
    /// Chunks from `backend` under `sealer`, caching up to `cache_bytes` of plaintext.
    pub(crate) fn new(
        backend: Arc<dyn ChunkBackend>,
        sealer: ChunkSealer,
        cache_bytes: usize,
    ) -> Chunks {
        Chunks {
            backend,
            sealer,
            cache: Mutex::new(ChunkCache {
                lru: LruCache::unbounded(),
                bytes: 0,
                cap: cache_bytes,
            }),
            prefetching: Mutex::new(HashSet::new()),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// Where chunks are stored.
    pub(crate) fn backend(&self) -> &Arc<dyn ChunkBackend> {
        &self.backend
    }

    /// The data key's sealer.
    pub(crate) fn sealer(&self) -> &ChunkSealer {
        &self.sealer
    }

    /// A chunk's plaintext: from the cache, or fetched, verified and opened.
    pub(crate) fn fetch(&self, c: &ChunkRef) -> Result<Arc<Vec<u8>>, BackendError> {
        if let Some(hit) = self.cache.lock().unwrap().get(&c.id) {
            return Ok(hit);
        }
        // Single flight: only the first caller fetches and opens, the others then find
        // the chunk in the cache.
        let gate = self
            .inflight
            .lock()
            .unwrap()
            .entry(c.id)
            .or_insert_with(|| Arc::new(Mutex::new(())))
            .clone();
        let guard = gate.lock().unwrap_or_else(|e| e.into_inner());
        let res = self.fetch_uncached(c);
        drop(guard);
        let mut inflight = self.inflight.lock().unwrap();
        // Clones are only taken under this lock: 2 means the map's and ours.
        if Arc::strong_count(&gate) <= 2 {
            inflight.remove(&c.id);
        }
        res
    }

    fn fetch_uncached(&self, c: &ChunkRef) -> Result<Arc<Vec<u8>>, BackendError> {
        if let Some(hit) = self.cache.lock().unwrap().get(&c.id) {
            return Ok(hit);
        }
        let stored = self.backend.get(c.id, c.stored)?;
        // The backend checked the hash: a chunk that does not open, or opens to the wrong
        // length, was sealed under another key or is not this file's.
        let plain = self.sealer.open(c.id, &stored).map_err(|e| {
            tracing::error!("chunk {}: {e}", c.id);
            BackendError::Corrupt(c.id)
        })?;
        if plain.len() != c.len as usize {
            tracing::error!("chunk {} has the wrong length", c.id);
            return Err(BackendError::Corrupt(c.id));
        }
        let plain = Arc::new(plain);
        self.cache.lock().unwrap().put(c.id, plain.clone());
        Ok(plain)
    }

    /// Fetch `c` in the background unless it is cached or on its way.
    pub(crate) fn prefetch(self: &Arc<Self>, c: ChunkRef) {
        if self.cache.lock().unwrap().lru.contains(&c.id) {
            return;
        }
        if !self.prefetching.lock().unwrap().insert(c.id) {
            return;
        }
        let me = self.clone();
        std::thread::spawn(move || {
            let _ = me.fetch(&c);
            me.prefetching.lock().unwrap().remove(&c.id);
        });
    }
}
