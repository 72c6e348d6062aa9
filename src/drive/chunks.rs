//! The chunk room: a chunk's plaintext from its reference — fetched through the
//! [`ChunkBackend`] (which checks the BLAKE3 id), opened under the data key, checked for
//! length — with a byte-bounded LRU cache of plaintext, single-flight fetches (the
//! kernel's read-ahead asks for one chunk several times at once) and a read-ahead queue
//! served by a few worker threads, each fetching a batch of chunks with one token request
//! and several transfers in flight, and opening them off the FUSE threads. It knows
//! nothing of files, handles or the index's locks: reads call it without holding the
//! model's lock.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use lru::LruCache;

use super::backend::{BackendError, ChunkBackend};
use super::crypto::{ChunkSealer, Plaintext};
use super::index::ChunkRef;
use crate::ids::{ChunkId, VerifiedChunk};

/// Read-ahead workers: two keep a window in flight while the previous batch is opened.
const AHEAD_WORKERS: usize = 2;
/// Chunks a worker fetches with one token request.
const AHEAD_BATCH: usize = 32;
/// How long an idle worker waits before checking whether the room is still in use.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// Decrypted chunks, bounded by bytes.
struct ChunkCache {
    lru: LruCache<ChunkId, Arc<Plaintext>>,
    bytes: usize,
    cap: usize,
}

impl ChunkCache {
    fn get(&mut self, id: &ChunkId) -> Option<Arc<Plaintext>> {
        self.lru.get(id).cloned()
    }

    fn put(&mut self, id: ChunkId, data: Arc<Plaintext>) {
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

type Fetched = Result<Arc<Plaintext>, BackendError>;

/// Where a chunk being fetched is.
enum FlightState {
    /// In the read-ahead queue, not started: a reader that needs it now takes it over.
    Queued,
    /// Someone is fetching it.
    Running,
    /// Fetched (or failed); waiters take the outcome.
    Landed(Fetched),
}

/// One chunk on its way, shared by everyone who wants it.
struct Flight {
    state: Mutex<FlightState>,
    landed: Condvar,
}

impl Flight {
    fn new(state: FlightState) -> Arc<Flight> {
        Arc::new(Flight {
            state: Mutex::new(state),
            landed: Condvar::new(),
        })
    }

    /// Claim a queued flight; false if someone already runs it.
    fn claim(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*s, FlightState::Queued) {
            *s = FlightState::Running;
            true
        } else {
            false
        }
    }

    fn wait(&self) -> Fetched {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let FlightState::Landed(r) = &*s {
                return r.clone();
            }
            s = self.landed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Fetching, verifying and opening chunks, shared by reads, restore and the uploader.
pub(crate) struct Chunks {
    backend: Arc<dyn ChunkBackend>,
    sealer: ChunkSealer,
    cache: Mutex<ChunkCache>,
    flights: Mutex<HashMap<ChunkId, Arc<Flight>>>,
    ahead: Mutex<Ahead>,
    ahead_ready: Condvar,
}

/// The read-ahead queue and its workers.
#[derive(Default)]
struct Ahead {
    queue: VecDeque<ChunkRef>,
    workers: usize,
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
            flights: Mutex::new(HashMap::new()),
            ahead: Mutex::new(Ahead::default()),
            ahead_ready: Condvar::new(),
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

    /// Plaintext bytes the cache may hold: read-ahead windows stay well inside it, or
    /// chunks fetched ahead would be evicted before they are read.
    pub(crate) fn cache_capacity(&self) -> usize {
        self.cache.lock().unwrap().cap
    }

    /// A chunk's plaintext if it is in the cache.
    pub(crate) fn cached(&self, id: &ChunkId) -> Option<Arc<Plaintext>> {
        self.cache.lock().unwrap().get(id)
    }

    /// A chunk's plaintext: from the cache, from a fetch already on its way, or fetched,
    /// verified and opened now.
    pub(crate) fn fetch(&self, c: &ChunkRef) -> Result<Arc<Plaintext>, BackendError> {
        if let Some(hit) = self.cache.lock().unwrap().get(&c.id) {
            return Ok(hit);
        }
        let (flight, mine) = {
            let mut flights = self.flights.lock().unwrap();
            match flights.get(&c.id) {
                Some(f) => (f.clone(), f.claim()),
                None => {
                    let f = Flight::new(FlightState::Running);
                    flights.insert(c.id, f.clone());
                    (f, true)
                }
            }
        };
        if mine {
            let res = self.fetch_uncached(c);
            self.land(c.id, &flight, res.clone());
            return res;
        }
        match flight.wait() {
            Ok(plain) => Ok(plain),
            // A read-ahead that failed is tried once more by the reader that needs it.
            Err(_) => self.fetch_uncached(c),
        }
    }

    fn fetch_uncached(&self, c: &ChunkRef) -> Fetched {
        if let Some(hit) = self.cache.lock().unwrap().get(&c.id) {
            return Ok(hit);
        }
        let stored = self.backend.get(c.id, c.stored)?;
        self.open(c, stored)
    }

    /// Open fetched bytes (the backend checked their hash) and cache the plaintext.
    fn open(&self, c: &ChunkRef, stored: VerifiedChunk) -> Fetched {
        // A chunk that does not open, or opens to the wrong length, was sealed under
        // another key or is not this file's.
        if stored.id() != c.id {
            tracing::error!("chunk {} came back as {}", c.id, stored.id());
            return Err(BackendError::Corrupt(c.id));
        }
        let plain = self.sealer.open_verified(stored).map_err(|e| {
            tracing::error!("chunk {}: {e}", c.id);
            BackendError::Corrupt(c.id)
        })?;
        if c.piece(&plain).is_none() {
            tracing::error!("chunk {} has the wrong length", c.id);
            return Err(BackendError::Corrupt(c.id));
        }
        let plain = Arc::new(plain);
        self.cache.lock().unwrap().put(c.id, plain.clone());
        Ok(plain)
    }

    /// Hand a fetch's outcome to its waiters and forget the flight.
    fn land(&self, id: ChunkId, flight: &Arc<Flight>, res: Fetched) {
        {
            let mut flights = self.flights.lock().unwrap();
            if flights.get(&id).is_some_and(|f| Arc::ptr_eq(f, flight)) {
                flights.remove(&id);
            }
        }
        *flight.state.lock().unwrap_or_else(|e| e.into_inner()) = FlightState::Landed(res);
        flight.landed.notify_all();
    }

    /// Fetch `chunks` in the background, in order, unless cached or already on their
    /// way. Readers that need one of them before a worker got to it fetch it themselves.
    pub(crate) fn read_ahead(self: &Arc<Self>, chunks: Vec<ChunkRef>) {
        let mut queued = Vec::new();
        {
            let cache = self.cache.lock().unwrap();
            let mut flights = self.flights.lock().unwrap();
            for c in chunks {
                if cache.lru.contains(&c.id) || flights.contains_key(&c.id) {
                    continue;
                }
                flights.insert(c.id, Flight::new(FlightState::Queued));
                queued.push(c);
            }
        }
        if queued.is_empty() {
            return;
        }
        let mut ahead = self.ahead.lock().unwrap();
        ahead.queue.extend(queued);
        while ahead.workers < AHEAD_WORKERS {
            ahead.workers += 1;
            let me = Arc::downgrade(self);
            std::thread::Builder::new()
                .name("chunk-read-ahead".into())
                .spawn(move || ahead_worker(me))
                .expect("spawning a read-ahead thread");
        }
        self.ahead_ready.notify_all();
    }

    /// The next batch of queued chunks no reader took over, waiting a while for one.
    fn next_batch(&self) -> Vec<(ChunkRef, Arc<Flight>)> {
        let mut ahead = self.ahead.lock().unwrap();
        if ahead.queue.is_empty() {
            ahead = self.ahead_ready.wait_timeout(ahead, IDLE_CHECK).unwrap().0;
        }
        let mut batch = Vec::new();
        let flights = self.flights.lock().unwrap();
        while batch.len() < AHEAD_BATCH {
            let Some(c) = ahead.queue.pop_front() else {
                break;
            };
            if let Some(f) = flights.get(&c.id) {
                if f.claim() {
                    batch.push((c, f.clone()));
                }
            }
        }
        batch
    }

    /// Fetch a batch with one backend call, opening and landing each chunk as it comes.
    fn run_batch(&self, batch: Vec<(ChunkRef, Arc<Flight>)>) {
        let wants: Vec<(ChunkId, u32)> = batch.iter().map(|(c, _)| (c.id, c.stored)).collect();
        let mut landed = vec![false; batch.len()];
        self.backend.get_many(&wants, &mut |i, r| {
            let Some((c, flight)) = batch.get(i) else {
                return;
            };
            if std::mem::replace(&mut landed[i], true) {
                return;
            }
            let res = r.and_then(|stored| self.open(c, stored));
            if let Err(e) = &res {
                tracing::debug!("read-ahead of chunk {}: {e}", c.id);
            }
            self.land(c.id, flight, res);
        });
        // A backend that skipped one must not leave its readers waiting.
        for ((c, flight), done) in batch.iter().zip(landed) {
            if !done {
                self.land(c.id, flight, Err(BackendError::NotFound(c.id)));
            }
        }
    }
}

/// A read-ahead worker: runs batches while the chunk room is alive.
fn ahead_worker(room: Weak<Chunks>) {
    while let Some(me) = room.upgrade() {
        let batch = me.next_batch();
        if !batch.is_empty() {
            me.run_batch(batch);
        }
    }
}
