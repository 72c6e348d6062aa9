//! The daemon's content-addressed chunk store.
//!
//! Layout under the storage directory:
//!
//! ```text
//! chunks/ab/abcdef…   one file per chunk, named by the hex BLAKE3 of its bytes
//! tmp/                 uploads in progress; emptied at every start
//! ```
//!
//! A chunk becomes visible only once it is whole: bytes are streamed to a file under
//! `tmp/` while being hashed, and only if the hash and size match is the file fsynced,
//! renamed into `chunks/` and the directory fsynced. A crash at any point leaves either
//! the whole chunk or a temporary file that the next start removes.
//!
//! Capacity is the space the user lends. Used bytes are the sum of stored chunk sizes,
//! rebuilt by scanning `chunks/` at start; an upload reserves its size before its first
//! byte is written, so concurrent uploads cannot together overshoot the capacity.
//!
//! A chunk file's modification time is the last time a put stored it (a put of a chunk
//! already here sets it too). Deletions the server asked for before that time
//! ([`ChunkStore::delete_unless_stored_since`]) leave the chunk alone: it was stored again
//! meanwhile, for someone the server may know about.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::ids::ChunkId;

/// How many bytes a writer buffers before handing them to the disk: bounds the memory
/// one upload can pin, while keeping write calls large.
pub(crate) const WRITE_BUF: usize = 256 << 10;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Over the lent capacity, or the disk itself is full.
    #[error("no space left for this chunk")]
    NoSpace,
    /// No such chunk.
    #[error("chunk not stored here")]
    NotFound,
    /// The bytes do not hash to the chunk id.
    #[error("chunk bytes do not hash to the chunk id")]
    HashMismatch,
    /// More or fewer bytes than announced.
    #[error("chunk has {got} bytes, {expected} announced")]
    SizeMismatch {
        /// Announced size.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// Another daemon already serves this storage directory.
    #[error("the storage directory {0} is in use by another daemon")]
    InUse(PathBuf),
    /// Any other I/O failure.
    #[error("chunk store I/O: {0}")]
    Io(io::Error),
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        // A full disk (or quota) fails the one chunk with a typed error, like the lent
        // capacity does; nothing else about the daemon is affected.
        if e.kind() == io::ErrorKind::StorageFull
            || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        {
            StoreError::NoSpace
        } else {
            StoreError::Io(e)
        }
    }
}

#[derive(Debug, Default)]
struct Accounting {
    used: u64,
    reserved: u64,
    count: u64,
}

/// The chunk store: see the module documentation.
#[derive(Debug)]
pub struct ChunkStore {
    chunks: PathBuf,
    tmp: PathBuf,
    capacity: u64,
    state: Mutex<Accounting>,
    next_tmp: AtomicU64,
    /// Holds an exclusive `flock` on `.lock` for as long as the store is open.
    _lock: fs::File,
}

/// Take an exclusive lock on the storage directory, so two daemons never share one (the
/// second would remove the first's uploads in progress and count its space twice).
fn lock_dir(dir: &Path) -> Result<fs::File, StoreError> {
    use std::os::fd::AsRawFd;
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))?;
    // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Err(StoreError::InUse(dir.to_owned()))
        } else {
            Err(e.into())
        };
    }
    Ok(f)
}

/// Run file-system work off the async threads (fsync can take milliseconds).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io(io::Error::other(e.to_string())))?
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

impl ChunkStore {
    /// Open (or create) the store under `dir`, lending `capacity` bytes. Removes leftover
    /// temporary files and recounts the stored chunks. Blocking: call it at start-up.
    pub fn open(dir: &Path, capacity: u64) -> Result<ChunkStore, StoreError> {
        let chunks = dir.join("chunks");
        let tmp = dir.join("tmp");
        fs::create_dir_all(&chunks)?;
        fs::create_dir_all(&tmp)?;
        let lock = lock_dir(dir)?;
        let mut removed = 0usize;
        for entry in fs::read_dir(&tmp)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                fs::remove_dir_all(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
            removed += 1;
        }
        if removed > 0 {
            fsync_dir(&tmp)?;
            tracing::info!(removed, "removed partial uploads left by a previous run");
        }
        let mut acc = Accounting::default();
        for sub in fs::read_dir(&chunks)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(sub.path())? {
                let f = f?;
                let name = f.file_name();
                let valid = name
                    .to_str()
                    .and_then(|n| n.parse::<ChunkId>().ok())
                    .is_some_and(|id| Some(&*hex::encode(&id.0[..1])) == sub.file_name().to_str());
                if !valid {
                    tracing::warn!(path = %f.path().display(), "ignoring a stray file in the chunk store");
                    continue;
                }
                acc.used += f.metadata()?.len();
                acc.count += 1;
            }
        }
        Ok(ChunkStore {
            chunks,
            tmp,
            capacity,
            state: Mutex::new(acc),
            next_tmp: AtomicU64::new(0),
            _lock: lock,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Accounting> {
        // The accounting stays consistent under every panic point, so a poisoned lock is
        // still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lent bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes of stored chunks.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// Lent bytes neither stored nor reserved by uploads in progress.
    pub fn free(&self) -> u64 {
        let a = self.lock();
        self.capacity.saturating_sub(a.used + a.reserved)
    }

    /// Number of stored chunks.
    pub fn chunk_count(&self) -> u64 {
        self.lock().count
    }

    /// Where a chunk lives.
    pub fn path_of(&self, chunk: &ChunkId) -> PathBuf {
        let hex = chunk.to_string();
        self.chunks.join(&hex[..2]).join(hex)
    }

    /// The temporary directory (uploads in progress).
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Whether a chunk is stored.
    pub fn contains(&self, chunk: &ChunkId) -> bool {
        self.path_of(chunk).is_file()
    }

    /// Reserve room for `size` bytes, or fail with [`StoreError::NoSpace`].
    pub fn reserve(self: &Arc<Self>, size: u64) -> Result<Reservation, StoreError> {
        let mut a = self.lock();
        if a.used + a.reserved + size > self.capacity {
            return Err(StoreError::NoSpace);
        }
        a.reserved += size;
        Ok(Reservation {
            store: self.clone(),
            bytes: size,
        })
    }

    /// Start receiving `chunk` of `size` bytes under `reservation`. If the chunk is
    /// already stored, the writer only checks the bytes' hash and writes nothing.
    pub async fn writer(
        self: &Arc<Self>,
        chunk: ChunkId,
        size: u32,
        mut reservation: Reservation,
    ) -> Result<ChunkWriter, StoreError> {
        let present = self.contains(&chunk);
        if !present && reservation.bytes < u64::from(size) {
            // Reserved nothing because the chunk was stored, but it has been deleted
            // since: reserve the difference now, so the capacity still holds.
            let mut extra = self.reserve(u64::from(size) - reservation.bytes)?;
            reservation.bytes += std::mem::take(&mut extra.bytes);
        }
        let mut w = ChunkWriter {
            store: self.clone(),
            chunk,
            size: u64::from(size),
            written: 0,
            hasher: blake3::Hasher::new(),
            buf: Vec::new(),
            file: None,
            tmp_path: None,
            reservation: Some(reservation),
        };
        if present {
            return Ok(w);
        }
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp.join(format!(
            "{}-{n}-{}.part",
            std::process::id(),
            &chunk.to_string()[..16]
        ));
        let p = path.clone();
        let file = blocking(move || {
            Ok(fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)?)
        })
        .await?;
        w.file = Some(file);
        w.tmp_path = Some(path);
        w.buf.reserve(WRITE_BUF);
        Ok(w)
    }

    /// Delete a stored chunk; returns its size.
    pub async fn delete(self: &Arc<Self>, chunk: &ChunkId) -> Result<u64, StoreError> {
        // With no time bound the chunk is always deleted.
        Ok(self.remove(chunk, None).await?.unwrap_or_default())
    }

    /// Delete a stored chunk unless a put stored it at `since` or later (the chunk file's
    /// modification time; see the module documentation): `Some(size)` when deleted, `None`
    /// when kept. The check and the unlink happen under the store's lock, which a put of
    /// an already stored chunk also takes to set the time, so one never misses the other.
    pub async fn delete_unless_stored_since(
        self: &Arc<Self>,
        chunk: &ChunkId,
        since: SystemTime,
    ) -> Result<Option<u64>, StoreError> {
        self.remove(chunk, Some(since)).await
    }

    async fn remove(
        self: &Arc<Self>,
        chunk: &ChunkId,
        since: Option<SystemTime>,
    ) -> Result<Option<u64>, StoreError> {
        let this = self.clone();
        let path = self.path_of(chunk);
        blocking(move || {
            let size = {
                let mut a = this.lock();
                let meta = match fs::metadata(&path) {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(StoreError::NotFound)
                    }
                    Err(e) => return Err(e.into()),
                };
                if let Some(since) = since {
                    if meta.modified()? >= since {
                        return Ok(None);
                    }
                }
                fs::remove_file(&path)?;
                a.used = a.used.saturating_sub(meta.len());
                a.count = a.count.saturating_sub(1);
                meta.len()
            };
            if let Some(dir) = path.parent() {
                fsync_dir(dir)?;
            }
            Ok(Some(size))
        })
        .await
    }

    /// The chunks under `chunks/xx/` (`xx` the hex of `prefix`, the first byte of their
    /// ids) that no put has stored since `before`. Blocking: one directory read.
    pub fn stored_before(
        &self,
        prefix: u8,
        before: SystemTime,
    ) -> Result<Vec<ChunkId>, StoreError> {
        let dir = self.chunks.join(hex::encode([prefix]));
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e?;
            let Some(id) = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<ChunkId>().ok())
            else {
                continue;
            };
            if id.0[0] != prefix {
                continue;
            }
            // Gone meanwhile (dropped, deleted): nothing to reconcile.
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_file() && meta.modified()? < before {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Read `len` bytes at `offset` of a stored chunk that must be `size` bytes long, in
    /// one blocking call (one thread hand-off per chunk, not one per piece).
    pub async fn read_chunk(
        &self,
        chunk: &ChunkId,
        size: u64,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, StoreError> {
        use std::io::{Read, Seek};
        let path = self.path_of(chunk);
        blocking(move || {
            let mut f = match fs::File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotFound),
                Err(e) => return Err(e.into()),
            };
            let got = f.metadata()?.len();
            if got != size || offset.saturating_add(len as u64) > size {
                return Err(StoreError::SizeMismatch {
                    expected: size,
                    got,
                });
            }
            f.seek(io::SeekFrom::Start(offset))?;
            let mut buf = Vec::with_capacity(len);
            f.take(len as u64).read_to_end(&mut buf)?;
            if buf.len() != len {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            Ok(buf)
        })
        .await
    }
}

/// Room reserved for one upload; given back when dropped (unless the chunk was stored,
/// when it turns into used space).
#[derive(Debug)]
pub struct Reservation {
    store: Arc<ChunkStore>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut a = self.store.lock();
            a.reserved = a.reserved.saturating_sub(self.bytes);
        }
    }
}

/// One chunk being received. Dropping it before [`commit`](Self::commit) removes the
/// temporary file: a refused or interrupted upload leaves nothing behind.
#[derive(Debug)]
pub struct ChunkWriter {
    store: Arc<ChunkStore>,
    chunk: ChunkId,
    size: u64,
    written: u64,
    hasher: blake3::Hasher,
    buf: Vec<u8>,
    file: Option<fs::File>,
    tmp_path: Option<PathBuf>,
    reservation: Option<Reservation>,
}

impl ChunkWriter {
    /// Append bytes. Refuses more bytes than announced.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        let got = self.written + data.len() as u64;
        if got > self.size {
            return Err(StoreError::SizeMismatch {
                expected: self.size,
                got,
            });
        }
        self.written = got;
        // Hashed (and written) a buffer at a time: BLAKE3 fed the ~1 KB pieces QUIC
        // delivers runs several times slower than on whole buffers, and it was the
        // largest cost of receiving a chunk.
        self.buf.extend_from_slice(data);
        if self.buf.len() >= WRITE_BUF {
            self.flush().await?;
        }
        Ok(())
    }

    /// Hash the buffered bytes and append them to the file (if the chunk is new).
    async fn flush(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut file = self.file.take();
        let mut hasher = std::mem::take(&mut self.hasher);
        let buf = std::mem::take(&mut self.buf);
        let (file, hasher, mut buf) = blocking(move || {
            hasher.update(&buf);
            if let Some(f) = file.as_mut() {
                f.write_all(&buf)?;
            }
            Ok((file, hasher, buf))
        })
        .await?;
        buf.clear();
        self.buf = buf;
        self.file = file;
        self.hasher = hasher;
        Ok(())
    }

    /// Check size and hash; if they match, make the chunk durable and visible. Returns
    /// whether the chunk is new (false when it was already stored).
    pub async fn commit(mut self) -> Result<bool, StoreError> {
        if self.written != self.size {
            return Err(StoreError::SizeMismatch {
                expected: self.size,
                got: self.written,
            });
        }
        self.flush().await?;
        if ChunkId(*self.hasher.finalize().as_bytes()) != self.chunk {
            return Err(StoreError::HashMismatch);
        }
        let final_path = self.store.path_of(&self.chunk);
        if self.file.is_none() {
            let store = self.store.clone();
            return blocking(move || {
                let _a = store.lock();
                // Stored again: stamp the time, so a deletion decided before this put
                // leaves the chunk alone (see `delete_unless_stored_since`).
                match fs::OpenOptions::new().write(true).open(&final_path) {
                    Ok(f) => {
                        f.set_modified(SystemTime::now())?;
                        Ok(false)
                    }
                    // Deleted while the duplicate was being verified: the client must retry.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NotFound),
                    Err(e) => Err(e.into()),
                }
            })
            .await;
        }
        self.flush().await?;
        let file = self.file.take().expect("flush puts the file back");
        let tmp = self.tmp_path.take().expect("a file has a temporary path");
        let reservation = self.reservation.take();
        let store = self.store.clone();
        let size = self.size;
        let tmp_for_cleanup = tmp.clone();
        let res = blocking(move || {
            // Explicitly, at full precision: the time a put stored the chunk.
            file.set_modified(SystemTime::now())?;
            file.sync_all()?;
            drop(file);
            let dir = final_path
                .parent()
                .expect("chunk paths have a parent")
                .to_owned();
            let new_dir = !dir.exists();
            if new_dir {
                fs::create_dir_all(&dir)?;
            }
            let is_new = {
                let mut a = store.lock();
                // The reservation turns into used space (or was not needed) under the
                // same lock, so no concurrent reserve sees both at once.
                if let Some(mut r) = reservation {
                    a.reserved = a.reserved.saturating_sub(r.bytes);
                    r.bytes = 0;
                }
                if final_path.exists() {
                    // Another upload of the same bytes won the race; this one stored it
                    // again all the same.
                    fs::remove_file(&tmp)?;
                    fs::OpenOptions::new()
                        .write(true)
                        .open(&final_path)?
                        .set_modified(SystemTime::now())?;
                    false
                } else {
                    fs::rename(&tmp, &final_path)?;
                    a.used += size;
                    a.count += 1;
                    true
                }
            };
            fsync_dir(&dir)?;
            if new_dir {
                fsync_dir(dir.parent().expect("chunks/ab has a parent"))?;
            }
            Ok(is_new)
        })
        .await;
        if res.is_err() {
            let _ = fs::remove_file(&tmp_for_cleanup);
        }
        res
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        if let Some(p) = self.tmp_path.take() {
            self.file = None;
            let _ = fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn start_removes_partial_uploads_and_recounts_chunks() {
        let dir = tempfile::TempDir::new().unwrap();
        let rt = rt();
        let store = Arc::new(ChunkStore::open(dir.path(), 1000).unwrap());
        let data = b"some ciphertext".to_vec();
        let id = ChunkId::of(&data);
        rt.block_on(async {
            let mut w = store
                .writer(id, data.len() as u32, store.reserve(15).unwrap())
                .await
                .unwrap();
            w.write(&data).await.unwrap();
            assert!(w.commit().await.unwrap());
        });
        std::fs::write(dir.path().join("tmp/leftover.part"), b"half a chunk").unwrap();
        assert!(matches!(
            ChunkStore::open(dir.path(), 1000),
            Err(StoreError::InUse(_))
        ));
        drop(store);
        let store = ChunkStore::open(dir.path(), 1000).unwrap();
        assert_eq!(
            (store.used(), store.chunk_count(), store.free()),
            (15, 1, 985)
        );
        assert!(std::fs::read_dir(store.tmp_dir()).unwrap().next().is_none());
        assert!(store.contains(&id));
    }

    #[test]
    fn a_chunk_stored_again_after_a_deletion_was_decided_is_kept() {
        let dir = tempfile::TempDir::new().unwrap();
        let rt = rt();
        let store = Arc::new(ChunkStore::open(dir.path(), 1000).unwrap());
        let data = b"stored twice".to_vec();
        let id = ChunkId::of(&data);
        let put = |need: u64| {
            let store = store.clone();
            let data = data.clone();
            async move {
                let mut w = store
                    .writer(id, data.len() as u32, store.reserve(need).unwrap())
                    .await
                    .unwrap();
                w.write(&data).await.unwrap();
                w.commit().await.unwrap()
            }
        };
        rt.block_on(async {
            assert!(put(12).await);
            let decided = SystemTime::now();
            // Another put of the same bytes (it writes nothing) after the decision.
            assert!(!put(0).await);
            assert_eq!(
                store
                    .delete_unless_stored_since(&id, decided)
                    .await
                    .unwrap(),
                None
            );
            assert!(store.contains(&id));
            assert_eq!(store.stored_before(id.0[0], decided).unwrap(), vec![]);
            let later = SystemTime::now();
            assert_eq!(store.stored_before(id.0[0], later).unwrap(), vec![id]);
            assert_eq!(
                store.delete_unless_stored_since(&id, later).await.unwrap(),
                Some(12)
            );
            assert!(!store.contains(&id));
            assert_eq!((store.used(), store.chunk_count()), (0, 0));
            assert!(matches!(
                store.delete_unless_stored_since(&id, later).await,
                Err(StoreError::NotFound)
            ));
        });
    }

    #[test]
    fn reservations_bound_concurrent_uploads_and_refused_bytes_leave_nothing() {
        let dir = tempfile::TempDir::new().unwrap();
        let store = Arc::new(ChunkStore::open(dir.path(), 100).unwrap());
        let a = store.reserve(60).unwrap();
        assert!(matches!(store.reserve(41), Err(StoreError::NoSpace)));
        drop(a);
        let b = store.reserve(100).unwrap();
        rt().block_on(async {
            let id = ChunkId::of(b"right bytes");
            let mut w = store.writer(id, 11, b).await.unwrap();
            w.write(b"wrong bytes").await.unwrap();
            assert!(matches!(w.commit().await, Err(StoreError::HashMismatch)));
            let mut w = store
                .writer(id, 11, store.reserve(11).unwrap())
                .await
                .unwrap();
            assert!(matches!(
                w.write(b"right bytes!").await,
                Err(StoreError::SizeMismatch { .. })
            ));
        });
        assert_eq!((store.used(), store.free()), (0, 100));
        assert!(std::fs::read_dir(store.tmp_dir()).unwrap().next().is_none());
    }
}
