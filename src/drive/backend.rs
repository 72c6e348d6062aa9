//! Where sealed chunks live. The drive talks only to [`ChunkBackend`]; the network client
//! implements it later, and [`DirBackend`] (a local directory with fault injection) serves
//! the tests. A backend only ever sees chunk ids and ciphertext: never names or sizes of
//! files.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

use crate::ids::{ChunkId, VerifiedChunk};

/// Space the user may use on the network and how much of it is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Bytes the user may store (stored, i.e. sealed, bytes).
    pub total_bytes: u64,
    /// Bytes stored now.
    pub used_bytes: u64,
}

/// Why a backend call failed. The variant decides what the drive does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// Storing would exceed the user's quota: the drive reports ENOSPC.
    #[error("over quota: {needed} more bytes needed, {available} available")]
    OverQuota {
        /// Bytes the failed request wanted to add.
        needed: u64,
        /// Bytes still free.
        available: u64,
    },
    /// Peers or server cannot be reached now: data stays staged and is retried later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A chunk came back with the wrong hash or size (and no holder had a good copy).
    #[error("chunk {0} is corrupt")]
    Corrupt(ChunkId),
    /// No holder has the chunk.
    #[error("chunk {0} not found")]
    NotFound(ChunkId),
}

/// Where [`ChunkBackend::get_many`] hands each chunk: its index in the request and its
/// stored bytes (hash checked) or why it could not be had.
pub type GetDone<'a> = dyn FnMut(usize, Result<VerifiedChunk, BackendError>) + 'a;

/// Blocking chunk storage, shared by the FUSE threads and the uploader.
pub trait ChunkBackend: Send + Sync {
    /// Store every chunk. Returns only when all are durably stored (on the configured
    /// number of peers); storing a chunk that is already there is not an error.
    fn put(&self, chunks: &[(ChunkId, Vec<u8>)]) -> Result<(), BackendError>;
    /// Fetch a chunk's stored bytes, checked against its id where they arrive (a wrong
    /// hash is [`BackendError::Corrupt`]). `size` is its stored size, so a backend can ask
    /// for the right token.
    fn get(&self, id: ChunkId, size: u32) -> Result<VerifiedChunk, BackendError>;
    /// Fetch several chunks, handing each result to `done` (with its index in `wants`)
    /// as it arrives, in any order; every index is handed over exactly once. A network
    /// backend asks for all their tokens at once and keeps several transfers in flight;
    /// the default fetches one after the other.
    fn get_many(&self, wants: &[(ChunkId, u32)], done: &mut GetDone<'_>) {
        for (i, (id, size)) in wants.iter().enumerate() {
            done(i, self.get(*id, *size));
        }
    }
    /// Forget chunks no file references any more. Releasing an absent chunk is not an error.
    fn release(&self, ids: &[ChunkId]) -> Result<(), BackendError>;
    /// The user's quota.
    fn quota(&self) -> Result<Quota, BackendError>;
}

/// Fetch `wants` a window at a time (up to `window_bytes` of stored bytes, at least one
/// chunk), each window with one [`ChunkBackend::get_many`], and hand each chunk's stored
/// bytes to `each` in order. Restore and snapshot loading read this way: many chunks in
/// flight, one token request per window, memory bounded by the window.
pub fn get_in_order<E: From<BackendError>>(
    backend: &dyn ChunkBackend,
    wants: &[(ChunkId, u32)],
    window_bytes: u64,
    mut each: impl FnMut(usize, VerifiedChunk) -> Result<(), E>,
) -> Result<(), E> {
    let mut start = 0;
    while start < wants.len() {
        let mut end = start + 1;
        let mut bytes = u64::from(wants[start].1);
        while end < wants.len() && bytes + u64::from(wants[end].1) <= window_bytes {
            bytes += u64::from(wants[end].1);
            end += 1;
        }
        let mut got: Vec<Option<Result<VerifiedChunk, BackendError>>> = vec![None; end - start];
        backend.get_many(&wants[start..end], &mut |i, r| {
            if let Some(slot) = got.get_mut(i) {
                *slot = Some(r);
            }
        });
        for (k, r) in got.into_iter().enumerate() {
            let id = wants[start + k].0;
            each(start + k, r.unwrap_or(Err(BackendError::NotFound(id)))?)?;
        }
        start = end;
    }
    Ok(())
}

/// Chunks as files `DIR/ab/<hex id>`, durably written (fsync then rename). Test knobs:
/// [`DirBackend::set_unavailable`], [`DirBackend::fail_next_puts`] and a capacity.
#[derive(Debug)]
pub struct DirBackend {
    dir: PathBuf,
    capacity: Mutex<u64>,
    unavailable: AtomicBool,
    fail_puts: AtomicU32,
    pass_puts: AtomicU32,
    get_delay_ms: AtomicU32,
    /// While set, puts wait (a slow network), counted in `puts_held`.
    hold_puts: AtomicBool,
    puts_held: AtomicU32,
    bytes_put: std::sync::atomic::AtomicU64,
    // Serializes usage accounting with the files it counts.
    used: Mutex<u64>,
}

impl DirBackend {
    /// Open (creating) a backend in `dir` with `capacity` bytes of quota.
    pub fn open(dir: &Path, capacity: u64) -> std::io::Result<DirBackend> {
        fs::create_dir_all(dir)?;
        let mut used = 0;
        for sub in fs::read_dir(dir)? {
            let sub = sub?;
            if sub.file_type()?.is_dir() {
                for f in fs::read_dir(sub.path())? {
                    let f = f?;
                    if !f.file_name().to_string_lossy().ends_with(".tmp") {
                        used += f.metadata()?.len();
                    }
                }
            }
        }
        Ok(DirBackend {
            dir: dir.to_path_buf(),
            capacity: Mutex::new(capacity),
            unavailable: AtomicBool::new(false),
            fail_puts: AtomicU32::new(0),
            pass_puts: AtomicU32::new(0),
            get_delay_ms: AtomicU32::new(0),
            hold_puts: AtomicBool::new(false),
            puts_held: AtomicU32::new(0),
            bytes_put: std::sync::atomic::AtomicU64::new(0),
            used: Mutex::new(used),
        })
    }

    /// Make every call fail with [`BackendError::Unavailable`] (or work again).
    pub fn set_unavailable(&self, down: bool) {
        self.unavailable.store(down, Ordering::SeqCst);
    }

    /// Make the next `n` puts fail with [`BackendError::Unavailable`].
    pub fn fail_next_puts(&self, n: u32) {
        self.fail_puts_after(0, n);
    }

    /// Let the next `ok` puts through, then fail `n` (a crash between two puts).
    pub fn fail_puts_after(&self, ok: u32, n: u32) {
        self.pass_puts.store(ok, Ordering::SeqCst);
        self.fail_puts.store(n, Ordering::SeqCst);
    }

    /// Make every `get` take this long (a slow network), to test that slow fetches do not
    /// hold up other requests.
    pub fn set_get_delay(&self, delay: std::time::Duration) {
        self.get_delay_ms.store(
            delay.as_millis().min(u32::MAX as u128) as u32,
            Ordering::SeqCst,
        );
    }

    /// Make puts wait until released (`false`): an upload round as slow as a large file
    /// on a slow network.
    pub fn hold_puts(&self, hold: bool) {
        self.hold_puts.store(hold, Ordering::SeqCst);
    }

    /// How many puts are waiting under [`DirBackend::hold_puts`].
    pub fn puts_held(&self) -> u32 {
        self.puts_held.load(Ordering::SeqCst)
    }

    /// Change the quota.
    pub fn set_capacity(&self, bytes: u64) {
        *self.capacity.lock().unwrap() = bytes;
    }

    /// Bytes handed to `put` so far (including chunks already stored).
    pub fn bytes_put(&self) -> u64 {
        self.bytes_put.load(Ordering::SeqCst)
    }

    /// Number of chunks stored.
    pub fn chunk_count(&self) -> usize {
        walk(&self.dir).len()
    }

    /// The directory holding the chunks.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: ChunkId) -> PathBuf {
        let hex = id.to_string();
        self.dir.join(&hex[..2]).join(hex)
    }

    fn syncfs(&self) -> Result<(), BackendError> {
        use std::os::fd::AsRawFd;
        let dir = fs::File::open(&self.dir).map_err(io_unavailable)?;
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(io_unavailable(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn check_up(&self) -> Result<(), BackendError> {
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(BackendError::Unavailable("DirBackend switched off".into()));
        }
        Ok(())
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for sub in rd.flatten() {
            if let Ok(inner) = fs::read_dir(sub.path()) {
                out.extend(
                    inner
                        .flatten()
                        .map(|f| f.path())
                        .filter(|p| p.extension().is_none_or(|e| e != "tmp")),
                );
            }
        }
    }
    out
}

fn io_unavailable(e: std::io::Error) -> BackendError {
    BackendError::Unavailable(e.to_string())
}

impl ChunkBackend for DirBackend {
    fn put(&self, chunks: &[(ChunkId, Vec<u8>)]) -> Result<(), BackendError> {
        self.check_up()?;
        if self.hold_puts.load(Ordering::SeqCst) {
            self.puts_held.fetch_add(1, Ordering::SeqCst);
            while self.hold_puts.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            self.puts_held.fetch_sub(1, Ordering::SeqCst);
        }
        let dec = |a: &AtomicU32| {
            a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        };
        if !dec(&self.pass_puts) && dec(&self.fail_puts) {
            return Err(BackendError::Unavailable("injected put failure".into()));
        }
        let offered: u64 = chunks.iter().map(|(_, b)| b.len() as u64).sum();
        self.bytes_put.fetch_add(offered, Ordering::SeqCst);
        let mut used = self.used.lock().unwrap();
        let capacity = *self.capacity.lock().unwrap();
        let new: Vec<&(ChunkId, Vec<u8>)> = chunks
            .iter()
            .filter(|(id, _)| !self.path(*id).exists())
            .collect();
        let needed: u64 = new.iter().map(|(_, b)| b.len() as u64).sum();
        if *used + needed > capacity {
            return Err(BackendError::OverQuota {
                needed,
                available: capacity.saturating_sub(*used),
            });
        }
        // Write every chunk to a temporary name, sync the filesystem once, then rename
        // and sync again: one syncfs per batch instead of an fsync per chunk, and a chunk
        // file never exists under its final name before its bytes are durable.
        let mut renames = Vec::new();
        for (id, bytes) in new {
            let path = self.path(*id);
            let tmp = path.with_extension("tmp");
            if renames.iter().any(|(_, p)| p == &path) {
                continue; // the same chunk twice in one batch
            }
            fs::create_dir_all(path.parent().unwrap()).map_err(io_unavailable)?;
            let mut f = fs::File::create(&tmp).map_err(io_unavailable)?;
            f.write_all(bytes).map_err(io_unavailable)?;
            renames.push((tmp, path));
            *used += bytes.len() as u64;
        }
        if renames.is_empty() {
            return Ok(());
        }
        self.syncfs()?;
        for (tmp, path) in &renames {
            fs::rename(tmp, path).map_err(io_unavailable)?;
        }
        self.syncfs()
    }

    fn get(&self, id: ChunkId, size: u32) -> Result<VerifiedChunk, BackendError> {
        self.check_up()?;
        let delay = self.get_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay as u64));
        }
        let bytes = match fs::read(self.path(id)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BackendError::NotFound(id))
            }
            Err(e) => return Err(io_unavailable(e)),
        };
        if bytes.len() != size as usize {
            return Err(BackendError::Corrupt(id));
        }
        VerifiedChunk::check(id, bytes).map_err(|_| BackendError::Corrupt(id))
    }

    fn release(&self, ids: &[ChunkId]) -> Result<(), BackendError> {
        self.check_up()?;
        let mut used = self.used.lock().unwrap();
        for id in ids {
            let path = self.path(*id);
            if let Ok(md) = fs::metadata(&path) {
                fs::remove_file(&path).map_err(io_unavailable)?;
                *used = used.saturating_sub(md.len());
            }
        }
        Ok(())
    }

    fn quota(&self) -> Result<Quota, BackendError> {
        self.check_up()?;
        Ok(Quota {
            total_bytes: *self.capacity.lock().unwrap(),
            used_bytes: *self.used.lock().unwrap(),
        })
    }
}
