//! The filesystem model: every POSIX operation the drive serves, with no FUSE types, so
//! tests can drive it without a kernel. The FUSE adapter (`fuse.rs`) only translates.
//!
//! Concurrency: one mutex guards the index connection and the in-memory tables (open
//! handles, working files). Everything that can be slow — backend fetches (the chunk
//! room, `chunks.rs`), materialising a file for rewriting, waiting for an upload, reading
//! the index for a snapshot (a second, read-only connection, its read transaction pinned
//! under the lock) — runs without it.
//!
//! Permission checks are left to the kernel (`default_permissions`).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::backend::{BackendError, ChunkBackend, Quota};
use super::chunks::Chunks;
use super::crypto::{ChunkSealer, Plaintext};
use super::index::{self, Attr, ChunkRef, Kind, Meta, Ts, ROOT_INO};
use super::staging::Staging;
use crate::keys::DataKey;

/// Longest file name accepted.
pub const NAME_MAX: usize = 255;

/// Largest file size (16 TiB, ext4's with 4 KiB blocks): a write or truncate past it is
/// EFBIG, as on a local filesystem, rather than an ENOSPC for an impossible size.
pub const MAX_FILE_SIZE: u64 = 1 << 44;

/// Why an operation was refused; [`FsError::errno`] gives the errno the kernel sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    /// ENOENT.
    #[error("no such file or directory")]
    NotFound,
    /// EEXIST.
    #[error("file exists")]
    Exists,
    /// ENOTEMPTY.
    #[error("directory not empty")]
    NotEmpty,
    /// EISDIR.
    #[error("is a directory")]
    IsDir,
    /// ENOTDIR.
    #[error("not a directory")]
    NotDir,
    /// EINVAL.
    #[error("invalid argument")]
    Invalid,
    /// ENAMETOOLONG.
    #[error("file name too long")]
    NameTooLong,
    /// ENOSPC: the quota on the network is used up.
    #[error("no space left: quota exhausted")]
    NoSpace,
    /// EPERM.
    #[error("operation not permitted")]
    Perm,
    /// ENODATA: no such xattr.
    #[error("no such attribute")]
    NoData,
    /// EOPNOTSUPP.
    #[error("operation not supported")]
    NotSupported,
    /// EBADF.
    #[error("bad file handle")]
    BadHandle,
    /// EIO: the index (SQLite) failed; the message is SQLite's.
    #[error("index: {0}")]
    Index(String),
    /// EIO: the storage network failed (over quota is [`FsError::NoSpace`] instead); the
    /// cause stays typed so callers decide on it, never on its text.
    #[error(transparent)]
    Backend(BackendError),
    /// EIO: `fsync` waited [`DriveOptions::fsync_timeout`] and the upload is not confirmed
    /// yet (the data stays staged and is uploaded later).
    #[error("upload not confirmed in time; data stays staged")]
    NotConfirmed,
    /// EIO: another local failure; the message says which.
    #[error("I/O error: {0}")]
    Io(String),
    /// The drive's index was created with another data key (EACCES at mount time).
    #[error("this drive's state was created with another data key")]
    WrongKey,
    /// Another errno from the local system (e.g. the staging disk is full).
    #[error("system error {0}")]
    Os(i32),
}

impl FsError {
    /// The errno for the kernel.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::IsDir => libc::EISDIR,
            FsError::NotDir => libc::ENOTDIR,
            FsError::Invalid => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NoSpace => libc::ENOSPC,
            FsError::Perm => libc::EPERM,
            FsError::NoData => libc::ENODATA,
            FsError::NotSupported => libc::EOPNOTSUPP,
            FsError::BadHandle => libc::EBADF,
            FsError::Index(_) | FsError::Backend(_) | FsError::NotConfirmed | FsError::Io(_) => {
                libc::EIO
            }
            FsError::WrongKey => libc::EACCES,
            FsError::Os(e) => *e,
        }
    }
}

impl From<rusqlite::Error> for FsError {
    fn from(e: rusqlite::Error) -> Self {
        tracing::error!("index: {e}");
        FsError::Index(e.to_string())
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(code) => FsError::Os(code),
            None => FsError::Io(e.to_string()),
        }
    }
}

impl From<BackendError> for FsError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::OverQuota { .. } => FsError::NoSpace,
            other => FsError::Backend(other),
        }
    }
}

/// Result of a model operation.
pub type FsResult<T> = Result<T, FsError>;

/// Tunables of a drive.
#[derive(Debug, Clone)]
pub struct DriveOptions {
    /// Byte bound of the in-memory cache of decrypted chunks.
    pub cache_bytes: usize,
    /// How long `fsync` waits for the upload before failing with EIO (data stays staged).
    pub fsync_timeout: Duration,
    /// fsync a staging file when it is closed, so a power cut cannot lose closed content.
    pub sync_on_close: bool,
    /// Owner of the root directory when the index is created.
    pub root_uid: u32,
    /// Group of the root directory when the index is created.
    pub root_gid: u32,
    /// Most bytes of chunks handed to one backend `put`.
    pub put_batch_bytes: usize,
    /// Where snapshot roots go; `None`: no snapshots (tests of the model alone).
    pub roots: Option<std::sync::Arc<dyn super::snapshot::RootStore>>,
    /// Least time between two snapshots (one is taken once uploads settle and the index
    /// changed, and at unmount).
    pub snapshot_interval: Duration,
    /// How long earlier snapshots stay restorable (thinned: see
    /// [`super::snapshot::expired`]).
    pub snapshot_keep: Duration,
}

impl Default for DriveOptions {
    fn default() -> Self {
        DriveOptions {
            cache_bytes: 64 << 20,
            fsync_timeout: Duration::from_secs(60),
            sync_on_close: true,
            root_uid: unsafe { libc::geteuid() },
            root_gid: unsafe { libc::getegid() },
            put_batch_bytes: 16 << 20,
            roots: None,
            snapshot_interval: Duration::from_secs(30),
            snapshot_keep: super::snapshot::DEFAULT_KEEP,
        }
    }
}

/// How `setattr` sets a timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSet {
    /// The current time.
    Now,
    /// A given time.
    At(Ts),
}

/// The attributes `setattr` changes (None: unchanged).
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (truncate or extend with zeros).
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<TimeSet>,
    /// New modification time.
    pub mtime: Option<TimeSet>,
    /// New change time.
    pub ctime: Option<Ts>,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Name.
    pub name: Vec<u8>,
    /// Inode.
    pub ino: u64,
    /// Kind.
    pub kind: Kind,
}

/// Filesystem statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    /// Block size used for the counts below.
    pub bsize: u32,
    /// Total blocks (the quota).
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Inodes in use plus free.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Longest name.
    pub namelen: u32,
}

/// `renameat2` flags understood by [`Model::rename`].
pub const RENAME_NOREPLACE: u32 = 1;
/// Swap the two names.
pub const RENAME_EXCHANGE: u32 = 2;

const XATTR_CREATE: i32 = 1;
const XATTR_REPLACE: i32 = 2;

/// Where a file being written keeps its content: in memory while it is small (most files
/// a tree copy makes never touch the disk before their close seals them into the index),
/// in a staging file named by the working stage once larger. Changed only under the
/// model's lock.
enum Body {
    Mem(Vec<u8>),
    File(Arc<File>),
}

impl Body {
    /// Move the content to the staging file `stage` unless it is there already.
    fn spill(&mut self, staging: &Staging, stage: u64) -> std::io::Result<&File> {
        if let Body::Mem(v) = self {
            let f = staging.create(stage)?;
            f.write_all_at(v, 0)?;
            *self = Body::File(Arc::new(f));
        }
        match self {
            Body::File(f) => Ok(f),
            Body::Mem(_) => unreachable!("spilled above"),
        }
    }

    fn write_at(
        &mut self,
        staging: &Staging,
        stage: u64,
        data: &[u8],
        at: u64,
    ) -> std::io::Result<()> {
        let end = at + data.len() as u64;
        match self {
            Body::Mem(v) if end <= INLINE_MAX => {
                if v.len() < end as usize {
                    v.resize(end as usize, 0);
                }
                v[at as usize..end as usize].copy_from_slice(data);
                Ok(())
            }
            _ => self.spill(staging, stage)?.write_all_at(data, at),
        }
    }

    fn set_len(&mut self, staging: &Staging, stage: u64, size: u64) -> std::io::Result<()> {
        match self {
            Body::Mem(v) if size <= INLINE_MAX => {
                v.resize(size as usize, 0);
                Ok(())
            }
            _ => self.spill(staging, stage)?.set_len(size),
        }
    }

    fn read_at(&self, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
        match self {
            Body::Mem(v) => {
                let from = (at as usize).min(v.len());
                let n = buf.len().min(v.len() - from);
                buf[..n].copy_from_slice(&v[from..from + n]);
                Ok(n)
            }
            Body::File(f) => read_full_at(f, buf, at),
        }
    }
}

/// The content of a file open for writing, with the attributes writes change.
pub(crate) struct Working {
    stage: u64,
    body: Body,
    size: u64,
    mtime: Ts,
    ctime: Ts,
    dirty: bool,
    /// Permission bits and atime set while the file is open for writing: written with
    /// the seal (a copied file's chmod and times cost no transaction of their own).
    meta: Option<(u16, Ts)>,
    /// Times or permissions changed since the last write to the index.
    meta_dirty: bool,
    /// Bumped by every change; `synced` is the value last made durable (fsync of the
    /// staging file), so a close can sync without holding the model's lock.
    gen: u64,
    synced: u64,
}

impl Working {
    /// Drop this working copy: its staging file, if its content ever spilled to one
    /// (content kept in memory never had a file).
    fn discard(self, staging: &Staging) {
        if matches!(self.body, Body::File(_)) {
            staging.remove(self.stage);
        }
    }
}

struct Handle {
    ino: u64,
    write: bool,
    /// Written through since its last flush: its release must seal. (A release that
    /// arrives late — FUSE sends it asynchronously — must not seal what *another* handle
    /// is still writing.)
    unflushed: bool,
    ahead: ReadAhead,
    dir: Option<Vec<DirEntry>>,
    /// The committed chunk list last read through this handle, with the stage it holds:
    /// a sequential read asks the index once, not at every request.
    chunks: Option<(u64, Arc<Vec<ChunkRef>>)>,
}

/// Chunk lists of files up to this size are kept per read handle (~64 K entries).
const LIST_CACHE_MAX_SIZE: u64 = 64 << 30;

/// The pieces of `list` (sorted by offset, contiguous) overlapping `[start, end)`.
fn pieces_in(list: &[ChunkRef], start: u64, end: u64) -> Vec<ChunkRef> {
    let first = list.partition_point(|c| c.offset + u64::from(c.len) <= start);
    list[first..]
        .iter()
        .take_while(|c| c.offset < end)
        .copied()
        .collect()
}

/// How far a handle reads sequentially, and how far ahead of it chunks were asked for.
#[derive(Debug, Default, Clone, Copy)]
struct ReadAhead {
    /// Where the next sequential read starts.
    next: u64,
    /// Bytes read in the current sequential run.
    run: u64,
    /// End of the range already handed to the chunk room's read-ahead.
    asked_to: u64,
}

/// Reads this close to the expected offset still count as sequential: the kernel's own
/// read-ahead sends a file's pages from several threads, slightly out of order.
const SEQUENTIAL_SLACK: u64 = 1 << 20;
/// A run must be this long before chunks are fetched ahead: reading a file's header
/// does not pull in the whole file.
const AHEAD_AFTER: u64 = 256 << 10;
/// The largest read-ahead window, when the cache is large enough for twice it.
const AHEAD_MAX: u64 = 64 << 20;

impl ReadAhead {
    /// Account for a read of `offset..end`; the range to fetch ahead now, if any. The
    /// window is the length of the sequential run so far, up to `max`, and is topped up
    /// once a quarter of it has been read.
    fn on_read(&mut self, offset: u64, end: u64, size: u64, max: u64) -> Option<(u64, u64)> {
        let sequential =
            offset + SEQUENTIAL_SLACK >= self.next && offset <= self.next + SEQUENTIAL_SLACK;
        if sequential {
            self.run += end.saturating_sub(offset);
            self.next = self.next.max(end);
        } else {
            *self = ReadAhead {
                next: end,
                run: end - offset,
                asked_to: 0,
            };
        }
        if self.run < AHEAD_AFTER {
            return None;
        }
        let window = self.run.min(max);
        let target = self.next.saturating_add(window).min(size);
        let from = self.asked_to.max(self.next);
        if target <= from || target - from < window / 4 {
            return None;
        }
        self.asked_to = target;
        Some((from, target))
    }
}

/// Files closed at up to this size keep their content in the index until uploaded: one
/// transaction makes the record and the content durable together, where a staging file
/// needs an fdatasync of its own at every close to be as safe (several ms each here: the
/// bulk of a small-file copy).
const INLINE_MAX: u64 = 64 << 10;

/// A pending stage's content: a staging file, or a small file's bytes from the index.
enum StageContent {
    File(File),
    Inline(Vec<u8>),
}

impl State {
    /// Files closed but not uploaded yet.
    fn pending_count(&self) -> usize {
        index::pending(&self.db, usize::MAX).map_or(0, |p| p.len())
    }

    /// Open the content of pending stage `stage`.
    fn stage_content(&self, staging: &Staging, stage: u64) -> FsResult<StageContent> {
        Ok(match index::stage_data(&self.db, stage)? {
            Some(d) => StageContent::Inline(d),
            None => StageContent::File(staging.open_read(stage)?),
        })
    }
}

/// Everything behind the model's mutex.
pub(crate) struct State {
    pub(crate) db: Connection,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    working: HashMap<u64, Working>,
    open_count: HashMap<u64, u32>,
    /// Last upload failure per inode that fsync must report (over quota, local error).
    pub(crate) upload_error: HashMap<u64, FsError>,
    /// Latest quota known (refreshed by the uploader).
    pub(crate) quota: Option<Quota>,
    /// Set when there is new work for the uploader.
    pub(crate) kick: bool,
    /// Set while someone waits for uploads (fsync, [`Model::wait_idle`]): the uploader
    /// starts at once instead of waiting for more closes to join the round.
    pub(crate) hurry: bool,
    /// Set while the uploader waits for more closes to join its round: a close then only
    /// records that there is work (waking it per close cost a lock round trip each).
    pub(crate) lingering: bool,
    /// Staging files a commit stopped referencing; deleted only once the index is durable,
    /// so a power cut cannot leave the index pointing at a deleted stage.
    pub(crate) doomed: Vec<u64>,
    /// Quota kept free for the next snapshot (set by the uploader from the last one).
    pub(crate) reserve: u64,
    /// Space is short: the uploader should give back what deletes freed now, not when idle.
    pub(crate) pressure: bool,
    /// Bytes deletes can give back, and when that was counted (a scan of the chunk table,
    /// done at most once a second while writes press against the quota).
    pub(crate) reclaimable: Option<(Instant, u64)>,
    /// The last upload round failed (storage unreachable, over quota, a local error):
    /// waiting for the pending files to go out is pointless until a round succeeds.
    pub(crate) stalled: bool,
}

/// State shared by the model, the uploader thread and read-ahead threads.
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    /// Signalled when the uploader commits (fsync waiters).
    pub(crate) committed: Condvar,
    /// Signalled when there is work for the uploader.
    pub(crate) work: Condvar,
    /// Fetching, verifying, opening and caching chunks (the backend and the sealer).
    pub(crate) chunks: Arc<Chunks>,
    pub(crate) staging: Staging,
    pub(crate) stop: AtomicBool,
    pub(crate) opts: DriveOptions,
    /// Snapshot bookkeeping (the uploader's, and the final snapshot's at stop).
    pub(crate) snap: Mutex<super::snapshot::SnapState>,
    /// The drive's state directory (the uploader publishes its health there).
    pub(crate) state_dir: std::path::PathBuf,
    /// A read-only connection to the index, for snapshots read without `state`'s lock.
    pub(crate) reader: Mutex<Connection>,
    /// The index's write-ahead log, synced without `state`'s lock.
    pub(crate) wal: index::WalSync,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make every index commit made so far durable against power loss (they use
    /// synchronous=NORMAL). The log is synced without the lock, so FUSE requests go on
    /// meanwhile; only if that cannot be done does SQLite sync it, under the lock.
    pub(crate) fn make_durable(&self) -> rusqlite::Result<()> {
        if self.wal.sync() {
            return Ok(());
        }
        index::make_durable(&self.lock().db)
    }
}

/// The drive's filesystem.
pub struct Model {
    shared: Arc<Shared>,
    uploader: Option<JoinHandle<()>>,
}

fn check_name(name: &OsStr) -> FsResult<&[u8]> {
    let b = name.as_bytes();
    if b.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(FsError::Invalid);
    }
    Ok(b)
}

impl State {
    fn attr(&self, ino: u64) -> FsResult<Attr> {
        let mut a = index::get_attr(&self.db, ino)?.ok_or(FsError::NotFound)?;
        if let Some(w) = self.working.get(&ino) {
            a.size = w.size;
            a.mtime = w.mtime;
            a.ctime = w.ctime;
            if let Some((perm, atime)) = w.meta {
                a.perm = perm;
                a.atime = atime;
            }
        }
        Ok(a)
    }

    /// Whether `ino`'s content is on this machine: being written, empty, or still staged.
    fn content_is_local(&self, ino: u64) -> bool {
        self.working.contains_key(&ino)
            || self
                .attr(ino)
                .is_ok_and(|a| a.size == 0 || a.stage.is_some())
    }

    fn dir_attr(&self, ino: u64) -> FsResult<Attr> {
        let a = self.attr(ino)?;
        if a.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(a)
    }

    fn touch_dir(&self, ino: u64, now: Ts) -> FsResult<()> {
        Ok(index::touch_dir(&self.db, ino, now)?)
    }

    fn alloc_fh(&mut self, h: Handle) -> u64 {
        self.next_fh += 1;
        let fh = self.next_fh;
        *self.open_count.entry(h.ino).or_default() += 1;
        self.handles.insert(fh, h);
        fh
    }

    /// Whether `ino` has unsealed writes (a working file).
    pub(crate) fn being_written(&self, ino: u64) -> bool {
        self.working.contains_key(&ino)
    }

    /// Bytes staged but not yet stored (pending stages plus working files).
    pub(crate) fn staged_bytes(&self) -> FsResult<u64> {
        let pending = index::pending_bytes(&self.db)?;
        Ok(pending + self.working.values().map(|w| w.size).sum::<u64>())
    }
}

impl Model {
    /// Open the drive whose state lives in `state_dir` (index `index.sqlite`, staging files
    /// under `staging/`), and start the uploader, which resumes pending uploads.
    pub fn new(
        state_dir: &Path,
        key: &DataKey,
        backend: Arc<dyn ChunkBackend>,
        opts: DriveOptions,
    ) -> FsResult<Model> {
        std::fs::create_dir_all(state_dir)?;
        let db = index::open(
            &state_dir.join("index.sqlite"),
            opts.root_uid,
            opts.root_gid,
        )?;
        // A drive opened with another data key would fail every read: refuse up front.
        let check = blake3::derive_key("peerstash 2026-11 drive key check v1", key.expose_secret());
        let check = i64::from_be_bytes(check[..8].try_into().expect("8 bytes"));
        match index::get_meta(&db, Meta::KeyCheck)? {
            Some(v) if v != check => return Err(FsError::WrongKey),
            Some(_) => {}
            None => index::set_meta(&db, Meta::KeyCheck, check)?,
        }
        let staging = Staging::open(&state_dir.join("staging"), index::max_stage(&db)?)?;
        // Inodes unlinked while open when we stopped: nobody can reach them any more.
        for (ino, stage) in index::orphans(&db)? {
            let tx = index::write_tx(&db)?;
            index::delete_inode(&tx, ino)?;
            tx.commit()?;
            if let Some(s) = stage {
                staging.remove(s);
            }
        }
        // Working files of a crashed session: never closed, so the old version stands.
        let keep: HashSet<u64> = index::all_stages(&db)?.into_iter().collect();
        let dropped = staging.cleanup(&keep)?;
        index::drop_stage_data(&db, None)?;
        if dropped > 0 {
            tracing::info!("discarded {dropped} unclosed staging files from an earlier run");
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                db,
                handles: HashMap::new(),
                next_fh: 0,
                working: HashMap::new(),
                open_count: HashMap::new(),
                upload_error: HashMap::new(),
                quota: backend.quota().ok(),
                kick: true,
                hurry: false,
                lingering: false,
                doomed: Vec::new(),
                // Without snapshots there is nothing to keep room for.
                reserve: if opts.roots.is_some() {
                    super::snapshot::reserve(&Default::default())
                } else {
                    0
                },
                pressure: false,
                reclaimable: None,
                stalled: false,
            }),
            committed: Condvar::new(),
            work: Condvar::new(),
            chunks: Arc::new(Chunks::new(
                backend,
                ChunkSealer::new(key),
                opts.cache_bytes,
            )),
            staging,
            stop: AtomicBool::new(false),
            opts,
            snap: Mutex::new(Default::default()),
            state_dir: state_dir.to_path_buf(),
            reader: Mutex::new(index::open_reader(&state_dir.join("index.sqlite"))?),
            wal: index::WalSync::new(&state_dir.join("index.sqlite")),
        });
        let s2 = shared.clone();
        let uploader = std::thread::Builder::new()
            .name("peerstash-upload".into())
            .spawn(move || super::uploader::run(s2))?;
        Ok(Model {
            shared,
            uploader: Some(uploader),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    fn kick(&self, st: &mut State) {
        st.kick = true;
        if !st.lingering || st.hurry {
            self.shared.work.notify_all();
        }
    }

    /// Stop the uploader (an upload in progress is abandoned, as in a crash; it resumes at
    /// the next open) and close the index.
    pub fn shutdown(mut self) {
        self.stop_uploader();
    }

    fn stop_uploader(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.lock();
            self.shared.work.notify_all();
        }
        if let Some(h) = self.uploader.take() {
            let _ = h.join();
            // Clean stop: one last snapshot of what is uploaded, if anything changed.
            if self.shared.opts.roots.is_some() {
                let mut snap = self.shared.snap.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = super::snapshot::take(&self.shared, &mut snap) {
                    tracing::warn!("final snapshot failed: {e}");
                }
            }
        }
    }

    /// Seal every file still open for writing (as if closed), then wait until nothing is
    /// waiting for upload. Returns false on timeout.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        let dirty: Vec<u64> = st
            .working
            .iter()
            .filter(|(_, w)| w.dirty)
            .map(|(i, _)| *i)
            .collect();
        for ino in dirty {
            let _ = self.seal(&mut st, ino);
        }
        loop {
            match index::pending(&st.db, 1) {
                Ok(p) if p.is_empty() => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st.hurry = true;
            self.kick(&mut st);
            st = self
                .shared
                .committed
                .wait_timeout(st, (deadline - now).min(Duration::from_millis(200)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Before a clean exit (unmounted): upload what is still pending, as long as the
    /// uploader makes progress. Gives up when the last round failed and none succeeded
    /// since (the files stay staged and go out at the next mount, as after a crash) or
    /// when no file went out for `quiet`.
    /// Returns how many files are left pending.
    pub fn finish_uploads(&self, quiet: Duration) -> usize {
        let mut st = self.lock();
        let mut left = st.pending_count();
        if left == 0 {
            return 0;
        }
        tracing::info!("uploading {left} pending files before exit");
        let mut progress_at = Instant::now();
        loop {
            st.hurry = true;
            self.kick(&mut st);
            st = self
                .shared
                .committed
                .wait_timeout(st, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            let now_left = st.pending_count();
            if now_left == 0 {
                tracing::info!("every pending file is uploaded");
                return 0;
            }
            if now_left < left {
                left = now_left;
                progress_at = Instant::now();
            }
            if st.stalled || progress_at.elapsed() >= quiet {
                tracing::warn!("{left} files not uploaded yet; they upload at the next mount");
                return left;
            }
        }
    }

    /// Files closed but not uploaded yet.
    pub fn pending_uploads(&self) -> usize {
        self.lock().pending_count()
    }

    // ---- names and attributes ------------------------------------------------------

    /// Find `name` in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let st = self.lock();
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        st.dir_attr(parent)?;
        let ino = index::lookup(&st.db, parent, name.as_bytes())?.ok_or(FsError::NotFound)?;
        st.attr(ino)
    }

    /// An inode's attributes.
    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.lock().attr(ino)
    }

    /// chmod, chown, truncate and utimens.
    pub fn setattr(&self, ino: u64, set: SetAttr) -> FsResult<Attr> {
        if let Some(size) = set.size {
            let kind = self.lock().attr(ino)?.kind;
            if kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            if kind != Kind::File {
                return Err(FsError::Invalid);
            }
            if size > MAX_FILE_SIZE {
                return Err(FsError::Os(libc::EFBIG));
            }
            self.truncate(ino, size)?;
        }
        let mut st = self.lock();
        let mut a = st.attr(ino)?;
        let now = Ts::now();
        if let Some(m) = set.mode {
            a.perm = (m & 0o7777) as u16;
        }
        if let Some(u) = set.uid {
            a.uid = u;
        }
        if let Some(g) = set.gid {
            a.gid = g;
        }
        if set.uid.is_some() || set.gid.is_some() {
            // chown clears set-user/group-id on executables, as on local filesystems.
            if a.kind == Kind::File && set.mode.is_none() {
                a.perm &= !0o6000;
            }
        }
        match set.atime {
            Some(TimeSet::Now) => a.atime = now,
            Some(TimeSet::At(t)) => a.atime = t,
            None => {}
        }
        match set.mtime {
            Some(TimeSet::Now) => a.mtime = now,
            Some(TimeSet::At(t)) => a.mtime = t,
            None => {}
        }
        a.ctime = set.ctime.unwrap_or(now);
        let owner_kept = set.uid.is_none() && set.gid.is_none();
        if let Some(w) = st.working.get_mut(&ino) {
            // Keep size/mtime with the unclosed content: if we crash before close, the
            // old content keeps its old mtime (rsync compares size and mtime).
            w.mtime = a.mtime;
            w.ctime = a.ctime;
            w.meta_dirty = true;
            if owner_kept {
                // Written at the close, with the content (as a crash would lose both).
                w.meta = Some((a.perm, a.atime));
                return Ok(a);
            }
            w.meta = None;
            let committed = index::get_attr(&st.db, ino)?.ok_or(FsError::NotFound)?;
            let mut b = a.clone();
            b.size = committed.size;
            b.mtime = committed.mtime;
            index::put_attr(&st.db, &b)?;
        } else {
            index::put_attr(&st.db, &a)?;
        }
        Ok(a)
    }

    fn truncate(&self, ino: u64, size: u64) -> FsResult<()> {
        let mut st = self.locked_working(ino, size == 0, "truncate")?;
        let cur = st.working.get(&ino).map(|w| w.size).unwrap_or(0);
        if size > cur {
            self.check_quota(&mut st, size - cur)?;
        }
        if let Some(w) = st.working.get_mut(&ino) {
            w.body.set_len(&self.shared.staging, w.stage, size)?;
            let now = Ts::now();
            w.size = size;
            w.mtime = now;
            w.ctime = now;
            w.dirty = true;
            w.gen += 1;
        }
        if st.open_count.get(&ino).copied().unwrap_or(0) == 0 {
            // truncate(2) by path: no close will follow, so this is the close point.
            self.seal(&mut st, ino)?;
            if let Some(w) = st.working.remove(&ino) {
                w.discard(&self.shared.staging);
            }
        }
        Ok(())
    }

    /// Refuse growth the quota cannot take (ENOSPC). Chunks of deleted files still count
    /// on the server until a snapshot covers the delete and they are released: they count
    /// as free here, and the uploader is told to give them back now.
    fn check_quota(&self, st: &mut State, growth: u64) -> FsResult<()> {
        let Some(q) = st.quota else {
            return Ok(());
        };
        let limit = q.total_bytes.saturating_sub(st.reserve);
        let need = q.used_bytes + st.staged_bytes()? + growth;
        if need <= limit {
            return Ok(());
        }
        let reclaimable = match st.reclaimable {
            Some((at, b)) if at.elapsed() < Duration::from_secs(1) => b,
            _ => {
                let b = index::unreferenced_bytes(&st.db)?;
                st.reclaimable = Some((Instant::now(), b));
                b
            }
        };
        if need.saturating_sub(reclaimable) <= limit {
            if !st.pressure {
                st.pressure = true;
                self.kick(st);
            }
            return Ok(());
        }
        tracing::debug!(
            used = q.used_bytes,
            staged = st.staged_bytes()?,
            growth,
            reclaimable,
            total = q.total_bytes,
            reserve = st.reserve,
            "a write does not fit the quota"
        );
        Err(FsError::NoSpace)
    }

    /// Resolve a path relative to the root (for tests and tools).
    pub fn resolve(&self, path: &Path) -> FsResult<Attr> {
        let mut ino = ROOT_INO;
        for comp in path.components() {
            match comp {
                std::path::Component::Normal(n) => ino = self.lookup(ino, n)?.ino,
                std::path::Component::RootDir | std::path::Component::CurDir => {}
                _ => return Err(FsError::Invalid),
            }
        }
        self.getattr(ino)
    }

    // ---- creating and removing -----------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn make_node(
        &self,
        parent: u64,
        name: &OsStr,
        kind: Kind,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> FsResult<Attr> {
        let name = check_name(name)?;
        let st = self.lock();
        let p = st.dir_attr(parent)?;
        if p.nlink == 0 {
            return Err(FsError::NotFound);
        }
        if index::lookup(&st.db, parent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let now = Ts::now();
        let mut perm = (mode & 0o7777) as u16;
        let mut gid = gid;
        if p.perm & 0o2000 != 0 {
            // setgid directory: new entries take its group, new directories its bit.
            gid = p.gid;
            if kind == Kind::Dir {
                perm |= 0o2000;
            }
        }
        let mut a = Attr {
            ino: 0,
            kind,
            perm,
            uid,
            gid,
            size: target.map_or(0, |t| t.len() as u64),
            atime: now,
            mtime: now,
            ctime: now,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            rdev,
            parent: if kind == Kind::Dir { parent } else { 0 },
            stage: None,
            committed_stage: 0,
        };
        let tx = index::write_tx(&st.db)?;
        a.ino = index::insert_inode(&tx, &a, target)?;
        index::insert_dentry(&tx, parent, name, a.ino)?;
        if kind == Kind::Dir {
            index::add_links(&tx, parent, 1, None)?;
        }
        st.touch_dir(parent, now)?;
        tx.commit()?;
        Ok(a)
    }

    /// mkdir (`mode` without the umask applied; `umask` is applied here).
    pub fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        self.make_node(parent, name, Kind::Dir, mode & !umask, uid, gid, 0, None)
    }

    /// mknod for regular files, fifos, sockets and device nodes.
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        let kind = Kind::from_mode(mode).ok_or(FsError::Invalid)?;
        if kind == Kind::Dir || kind == Kind::Symlink {
            return Err(FsError::Invalid);
        }
        self.make_node(parent, name, kind, mode & !umask, uid, gid, rdev, None)
    }

    /// symlink.
    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &Path,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        let t = target.as_os_str().as_bytes();
        if t.is_empty() {
            return Err(FsError::NotFound);
        }
        if t.len() > 4095 {
            return Err(FsError::NameTooLong);
        }
        self.make_node(parent, name, Kind::Symlink, 0o777, uid, gid, 0, Some(t))
    }

    /// readlink.
    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let st = self.lock();
        if st.attr(ino)?.kind != Kind::Symlink {
            return Err(FsError::Invalid);
        }
        Ok(index::symlink_target(&st.db, ino)?.unwrap_or_default())
    }

    /// Create a regular file and open it.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        uid: u32,
        gid: u32,
    ) -> FsResult<(Attr, u64)> {
        let a = self.make_node(parent, name, Kind::File, mode & !umask, uid, gid, 0, None)?;
        let fh = self.open(a.ino, flags & !libc::O_TRUNC)?;
        Ok((a, fh))
    }

    /// link: a new name for a non-directory.
    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<Attr> {
        let name = check_name(newname)?;
        let mut st = self.lock();
        let a = st.attr(ino)?;
        if a.kind == Kind::Dir {
            return Err(FsError::Perm);
        }
        if a.nlink == 0 {
            return Err(FsError::NotFound);
        }
        st.dir_attr(newparent)?;
        if index::lookup(&st.db, newparent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let now = Ts::now();
        let tx = index::write_tx(&st.db)?;
        index::insert_dentry(&tx, newparent, name, ino)?;
        index::add_links(&tx, ino, 1, Some(now))?;
        st.touch_dir(newparent, now)?;
        tx.commit()?;
        if let Some(w) = st.working.get_mut(&ino) {
            w.ctime = now;
        }
        st.attr(ino)
    }

    /// Drop one link of `ino` inside `tx`; returns true if the inode must be purged once
    /// the transaction commits.
    fn drop_link(st: &State, tx: &rusqlite::Transaction<'_>, a: &Attr, now: Ts) -> FsResult<bool> {
        if a.kind == Kind::Dir {
            index::clear_links(tx, a.ino)?;
            index::add_links(tx, a.parent, -1, None)?;
        } else {
            index::add_links(tx, a.ino, -1, Some(now))?;
        }
        let last = a.kind == Kind::Dir || a.nlink <= 1;
        let open = st.open_count.get(&a.ino).copied().unwrap_or(0) > 0;
        if last && !open {
            index::delete_inode(tx, a.ino)?;
            return Ok(true);
        }
        Ok(false)
    }

    fn purge_files(&self, st: &mut State, ino: u64, stage: Option<u64>) {
        if let Some(s) = stage {
            st.doomed.push(s);
        }
        if let Some(w) = st.working.remove(&ino) {
            w.discard(&self.shared.staging);
        }
        st.upload_error.remove(&ino);
        // Chunks this file alone used are now free: let the uploader release them.
        self.kick(st);
    }

    /// unlink a non-directory.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let mut st = self.lock();
        st.dir_attr(parent)?;
        let ino = index::lookup(&st.db, parent, name.as_bytes())?.ok_or(FsError::NotFound)?;
        let a = st.attr(ino)?;
        if a.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        let now = Ts::now();
        let tx = index::write_tx(&st.db)?;
        index::remove_dentry(&tx, parent, name.as_bytes())?;
        let purge = Self::drop_link(&st, &tx, &a, now)?;
        st.touch_dir(parent, now)?;
        tx.commit()?;
        if purge {
            self.purge_files(&mut st, ino, a.stage);
        }
        Ok(())
    }

    /// rmdir.
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        if name.as_bytes() == b"." {
            return Err(FsError::Invalid);
        }
        if name.as_bytes() == b".." {
            return Err(FsError::NotEmpty);
        }
        let mut st = self.lock();
        st.dir_attr(parent)?;
        let ino = index::lookup(&st.db, parent, name.as_bytes())?.ok_or(FsError::NotFound)?;
        let a = st.attr(ino)?;
        if a.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if index::dir_has_entries(&st.db, ino)? {
            return Err(FsError::NotEmpty);
        }
        let now = Ts::now();
        let tx = index::write_tx(&st.db)?;
        index::remove_dentry(&tx, parent, name.as_bytes())?;
        let purge = Self::drop_link(&st, &tx, &a, now)?;
        st.touch_dir(parent, now)?;
        tx.commit()?;
        if purge {
            self.purge_files(&mut st, ino, None);
        }
        Ok(())
    }

    fn is_ancestor(st: &State, anc: u64, mut dir: u64) -> FsResult<bool> {
        loop {
            if dir == anc {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            dir = st.attr(dir)?.parent;
        }
    }

    /// rename, atomically replacing the target; `flags` takes [`RENAME_NOREPLACE`] and
    /// [`RENAME_EXCHANGE`].
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
            || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
        {
            return Err(FsError::Invalid);
        }
        let newname_b = check_name(newname)?;
        let name_b = name.as_bytes();
        let mut st = self.lock();
        st.dir_attr(parent)?;
        st.dir_attr(newparent)?;
        let src = index::lookup(&st.db, parent, name_b)?.ok_or(FsError::NotFound)?;
        let sa = st.attr(src)?;
        let dst = index::lookup(&st.db, newparent, newname_b)?;
        let now = Ts::now();
        if flags & RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or(FsError::NotFound)?;
            let da = st.attr(dst)?;
            if (sa.kind == Kind::Dir && Self::is_ancestor(&st, src, newparent)?)
                || (da.kind == Kind::Dir && Self::is_ancestor(&st, dst, parent)?)
            {
                return Err(FsError::Invalid);
            }
            let tx = index::write_tx(&st.db)?;
            index::repoint_dentry(&tx, parent, name_b, dst)?;
            index::repoint_dentry(&tx, newparent, newname_b, src)?;
            for (a, p) in [(&sa, newparent), (&da, parent)] {
                index::moved(&tx, a.ino, p, now)?;
            }
            if parent != newparent && (sa.kind == Kind::Dir) != (da.kind == Kind::Dir) {
                let (gain, lose) = if sa.kind == Kind::Dir {
                    (newparent, parent)
                } else {
                    (parent, newparent)
                };
                index::add_links(&tx, gain, 1, None)?;
                index::add_links(&tx, lose, -1, None)?;
            }
            st.touch_dir(parent, now)?;
            st.touch_dir(newparent, now)?;
            tx.commit()?;
            return Ok(());
        }
        if dst == Some(src) {
            return Ok(()); // two names of one inode: POSIX says do nothing
        }
        if sa.kind == Kind::Dir && Self::is_ancestor(&st, src, newparent)? {
            return Err(FsError::Invalid);
        }
        let mut purge = None;
        let tx = index::write_tx(&st.db)?;
        if let Some(d) = dst {
            if flags & RENAME_NOREPLACE != 0 {
                return Err(FsError::Exists);
            }
            let da = st.attr(d)?;
            if sa.kind == Kind::Dir {
                if da.kind != Kind::Dir {
                    return Err(FsError::NotDir);
                }
                if index::dir_has_entries(&tx, d)? {
                    return Err(FsError::NotEmpty);
                }
            } else if da.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            if Self::drop_link(&st, &tx, &da, now)? {
                purge = Some((d, da.stage));
            }
            index::repoint_dentry(&tx, newparent, newname_b, src)?;
        } else {
            index::insert_dentry(&tx, newparent, newname_b, src)?;
        }
        index::remove_dentry(&tx, parent, name_b)?;
        if sa.kind == Kind::Dir && parent != newparent {
            index::add_links(&tx, parent, -1, None)?;
            index::add_links(&tx, newparent, 1, None)?;
        }
        index::moved(&tx, src, newparent, now)?;
        st.touch_dir(parent, now)?;
        st.touch_dir(newparent, now)?;
        tx.commit()?;
        if let Some(w) = st.working.get_mut(&src) {
            w.ctime = now;
        }
        if let Some((d, stage)) = purge {
            self.purge_files(&mut st, d, stage);
        }
        Ok(())
    }

    // ---- directories ---------------------------------------------------------------

    /// Open a directory: its entries are snapshotted so that concurrent changes cannot
    /// make readdir skip or repeat entries.
    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let mut st = self.lock();
        let a = st.dir_attr(ino)?;
        let mut entries = vec![
            DirEntry {
                name: b".".to_vec(),
                ino,
                kind: Kind::Dir,
            },
            DirEntry {
                name: b"..".to_vec(),
                ino: a.parent.max(ROOT_INO),
                kind: Kind::Dir,
            },
        ];
        entries.extend(
            index::list_dir(&st.db, ino)?
                .into_iter()
                .map(|(name, ino, kind)| DirEntry { name, ino, kind }),
        );
        Ok(st.alloc_fh(Handle {
            ino,
            write: false,
            unflushed: false,
            ahead: ReadAhead::default(),
            chunks: None,
            dir: Some(entries),
        }))
    }

    /// Entries of an open directory from position `offset` on; each comes with the
    /// offset of the entry after it.
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<Vec<(u64, DirEntry)>> {
        let st = self.lock();
        let h = st.handles.get(&fh).ok_or(FsError::BadHandle)?;
        let entries = h.dir.as_ref().ok_or(FsError::NotDir)?;
        Ok(entries
            .iter()
            .enumerate()
            .skip(offset as usize)
            .map(|(i, e)| (i as u64 + 1, e.clone()))
            .collect())
    }

    /// Close a directory handle.
    pub fn releasedir(&self, fh: u64) -> FsResult<()> {
        self.release(fh)
    }

    // ---- file content ---------------------------------------------------------------

    /// Open a file. With `O_TRUNC` and write access it is truncated.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        let acc = flags & libc::O_ACCMODE;
        let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        let a = self.lock().attr(ino)?;
        match a.kind {
            Kind::Dir if write => return Err(FsError::IsDir),
            Kind::Dir | Kind::File => {}
            _ => return Err(FsError::Invalid),
        }
        let fh = self.lock().alloc_fh(Handle {
            ino,
            write,
            unflushed: write && flags & libc::O_TRUNC != 0,
            ahead: ReadAhead::default(),
            chunks: None,
            dir: None,
        });
        if write && flags & libc::O_TRUNC != 0 && a.kind == Kind::File {
            if let Err(e) = self.truncate(ino, 0) {
                let _ = self.release(fh);
                return Err(e);
            }
        }
        Ok(fh)
    }

    /// The working copy of `ino` (its stage id), made from the current content (or empty
    /// when `empty`) if the file is not being written yet.
    /// The lock, with `ino`'s working file in place. Another handle's close may seal the
    /// working file between making it and taking the lock: then make the next one (it
    /// starts from what was sealed).
    fn locked_working(&self, ino: u64, empty: bool, what: &str) -> FsResult<MutexGuard<'_, State>> {
        for _attempt in 0..20 {
            let id = self.working_file(ino, empty)?;
            let st = self.lock();
            if st.working.get(&ino).is_some_and(|w| w.stage == id) {
                return Ok(st);
            }
        }
        Err(FsError::Io(format!("file sealed during {what}")))
    }

    fn working_file(&self, ino: u64, empty: bool) -> FsResult<u64> {
        for _attempt in 0..20 {
            // Phase 1 (locked): decide what the new working file starts from.
            let (src_stage, chunks, a, id) = {
                let st = self.lock();
                if let Some(w) = st.working.get(&ino) {
                    return Ok(w.stage);
                }
                let a = st.attr(ino)?;
                if a.kind != Kind::File {
                    return Err(FsError::Invalid);
                }
                let chunks = if empty || a.stage.is_some() || a.size == 0 {
                    Vec::new()
                } else {
                    index::chunks_of(&st.db, ino)?
                };
                let src = match a.stage {
                    Some(s) if !empty => Some(st.stage_content(&self.shared.staging, s)?),
                    _ => None,
                };
                (src, chunks, a.clone(), self.shared.staging.next_id())
            };
            // Phase 2 (unlocked): build it — may copy a large stage or fetch chunks. Small
            // content stays in memory.
            let built: FsResult<Body> = (|| {
                if empty {
                    return Ok(Body::Mem(Vec::new()));
                }
                match src_stage {
                    Some(StageContent::Inline(d)) if d.len() as u64 <= INLINE_MAX => {
                        Ok(Body::Mem(d))
                    }
                    Some(StageContent::Inline(d)) => {
                        let f = self.shared.staging.create(id)?;
                        f.write_all_at(&d, 0)?;
                        Ok(Body::File(Arc::new(f)))
                    }
                    Some(StageContent::File(mut src)) => {
                        let f = self.shared.staging.create(id)?;
                        std::io::copy(&mut src, &mut &f)?;
                        Ok(Body::File(Arc::new(f)))
                    }
                    None => {
                        let mut body = Body::Mem(Vec::new());
                        for c in &chunks {
                            let plain = self.shared.chunks.fetch(c)?;
                            body.write_at(
                                &self.shared.staging,
                                id,
                                piece_of(c, &plain)?,
                                c.offset,
                            )?;
                        }
                        body.set_len(&self.shared.staging, id, a.size)?;
                        Ok(body)
                    }
                }
            })();
            // Phase 3 (locked): install unless someone else did or the source changed.
            let mut st = self.lock();
            let body = match built {
                Ok(b) => b,
                Err(e) => {
                    self.shared.staging.remove(id);
                    match st.attr(ino) {
                        Ok(now)
                            if now.stage != a.stage || now.committed_stage != a.committed_stage =>
                        {
                            continue
                        }
                        _ => return Err(e),
                    }
                }
            };
            if let Some(w) = st.working.get(&ino) {
                self.shared.staging.remove(id);
                return Ok(w.stage);
            }
            let now = st.attr(ino)?;
            if now.stage != a.stage || now.committed_stage != a.committed_stage {
                self.shared.staging.remove(id);
                continue;
            }
            st.working.insert(
                ino,
                Working {
                    stage: id,
                    body,
                    size: if empty { 0 } else { a.size },
                    mtime: a.mtime,
                    ctime: a.ctime,
                    dirty: empty && a.size != 0,
                    meta: None,
                    meta_dirty: false,
                    gen: 1,
                    synced: 0,
                },
            );
            return Ok(id);
        }
        Err(FsError::Io(
            "file kept changing while being opened for writing".into(),
        ))
    }

    /// Write `data` at `offset`; returns the bytes written.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let ino = {
            let st = self.lock();
            let h = st.handles.get(&fh).ok_or(FsError::BadHandle)?;
            if !h.write {
                return Err(FsError::BadHandle);
            }
            h.ino
        };
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(FsError::Invalid)?;
        if end > MAX_FILE_SIZE {
            return Err(FsError::Os(libc::EFBIG));
        }
        let mut st = self.locked_working(ino, false, "write")?;
        let w = st.working.get(&ino).expect("checked above");
        if end > w.size {
            let grow = end - w.size;
            self.check_quota(&mut st, grow)?;
        }
        // Written under the lock: a close that seals this file cannot interleave.
        let w = st.working.get_mut(&ino).expect("checked above");
        w.body
            .write_at(&self.shared.staging, w.stage, data, offset)?;
        let now = Ts::now();
        w.size = w.size.max(end);
        w.mtime = now;
        w.ctime = now;
        w.dirty = true;
        w.gen += 1;
        if let Some(h) = st.handles.get_mut(&fh) {
            h.unflushed = true;
        }
        Ok(data.len() as u32)
    }

    /// Read up to `size` bytes at `offset`.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        self.read_data(fh, offset, size).map(ReadData::into_vec)
    }

    /// [`Model::read`], answering a read inside one cached chunk with that chunk's
    /// plaintext itself (no copy): what the FUSE layer replies from.
    pub fn read_data(&self, fh: u64, offset: u64, size: u32) -> FsResult<ReadData> {
        for attempt in 0..3 {
            match self
                .read_once(fh, offset, size, true)
                .map(|r| r.unwrap_or(ReadData::Owned(Vec::new())))
            {
                // A newer version may have been committed and the old chunks released
                // between listing and fetching them: look again.
                Err(FsError::Backend(BackendError::NotFound(_))) if attempt < 2 => continue,
                other => return other,
            }
        }
        unreachable!()
    }

    /// [`Model::read`] if it needs nothing from the network (local content, or chunks in
    /// the cache, as a read-ahead leaves them); `None` if it would have to wait for a
    /// fetch. The FUSE layer answers such reads on its own thread.
    pub fn read_cached(&self, fh: u64, offset: u64, size: u32) -> Option<FsResult<ReadData>> {
        self.read_once(fh, offset, size, false).transpose()
    }

    /// Whether a write through `fh` touches local files only: the file is being written
    /// already, is empty, or its content is still staged (otherwise the first write
    /// fetches the current content to start from).
    pub fn writes_locally(&self, fh: u64) -> bool {
        let st = self.lock();
        let Some(h) = st.handles.get(&fh) else {
            return true; // answered at once: a bad handle
        };
        st.content_is_local(h.ino)
    }

    /// Whether a `setattr` on `ino` touches local files only: it changes no size, cuts
    /// the file to nothing, or the content is local already (otherwise a truncate
    /// fetches the content it keeps).
    pub fn setattr_is_local(&self, ino: u64, size: Option<u64>) -> bool {
        match size {
            None | Some(0) => true,
            Some(_) => self.lock().content_is_local(ino),
        }
    }

    /// A read; `Ok(None)` when `fetch` is false and a chunk is not in the cache.
    fn read_once(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        fetch: bool,
    ) -> FsResult<Option<ReadData>> {
        let (chunks, end, ahead) = {
            let mut st = self.lock();
            let ino = st.handles.get(&fh).ok_or(FsError::BadHandle)?.ino;
            let a = st.attr(ino)?;
            if a.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            let end = a.size.min(offset.saturating_add(size as u64));
            if end <= offset {
                return Ok(Some(ReadData::Owned(Vec::new())));
            }
            let local = |f: &File| -> FsResult<Option<ReadData>> {
                let mut buf = vec![0u8; (end - offset) as usize];
                let n = read_full_at(f, &mut buf, offset)?;
                buf.truncate(n);
                Ok(Some(ReadData::Owned(buf)))
            };
            if let Some(w) = st.working.get(&ino) {
                let mut buf = vec![0u8; (end - offset) as usize];
                let n = w.body.read_at(&mut buf, offset)?;
                buf.truncate(n);
                return Ok(Some(ReadData::Owned(buf)));
            }
            if let Some(s) = a.stage {
                return match st.stage_content(&self.shared.staging, s)? {
                    StageContent::File(f) => local(&f),
                    StageContent::Inline(d) => {
                        let from = (offset as usize).min(d.len());
                        let to = (end as usize).min(d.len());
                        Ok(Some(ReadData::Owned(d[from..to].to_vec())))
                    }
                };
            }
            let max_window = AHEAD_MAX.min(self.shared.chunks.cache_capacity() as u64 / 2);
            let window = match st.handles.get_mut(&fh) {
                Some(h) => h.ahead.on_read(offset, end, a.size, max_window),
                None => None,
            };
            let cached = st
                .handles
                .get(&fh)
                .and_then(|h| h.chunks.clone())
                .filter(|(stage, _)| *stage == a.committed_stage)
                .map(|(_, l)| l);
            let list = match cached {
                Some(l) => Some(l),
                None if a.size <= LIST_CACHE_MAX_SIZE => {
                    let l = Arc::new(index::chunks_of(&st.db, ino)?);
                    if let Some(h) = st.handles.get_mut(&fh) {
                        h.chunks = Some((a.committed_stage, l.clone()));
                    }
                    Some(l)
                }
                None => None,
            };
            let range = |from, to| match &list {
                Some(l) => Ok(pieces_in(l, from, to)),
                None => index::chunks_in_range(&st.db, ino, from, to),
            };
            let chunks = range(offset, end)?;
            let ahead = match window {
                Some((from, to)) => range(from, to)?,
                None => Vec::new(),
            };
            (chunks, end, ahead)
        };
        if !ahead.is_empty() {
            self.shared.chunks.read_ahead(ahead);
        }
        // Pieces come in order: each extends the buffer (no zero-filling first).
        let mut buf = Vec::with_capacity((end - offset) as usize);
        for c in &chunks {
            let plain = if fetch {
                self.shared.chunks.fetch(c)?
            } else {
                match self.shared.chunks.cached(&c.id) {
                    Some(p) => p,
                    None => return Ok(None),
                }
            };
            let piece = piece_of(c, &plain)?;
            let c_end = c.offset + c.len as u64;
            let from = offset.max(c.offset);
            let to = end.min(c_end);
            if from >= to {
                continue;
            }
            if chunks.len() == 1 && from == offset && to == end {
                // The whole read lies in this chunk: answer from the cached plaintext.
                let at = c.at as usize;
                let range = at + (from - c.offset) as usize..at + (to - c.offset) as usize;
                return Ok(Some(ReadData::Shared(plain, range)));
            }
            buf.resize((from - offset) as usize, 0);
            buf.extend_from_slice(&piece[(from - c.offset) as usize..(to - c.offset) as usize]);
        }
        buf.resize((end - offset) as usize, 0);
        Ok(Some(ReadData::Owned(buf)))
    }

    /// Turn the working file of `ino` into a pending stage (the "close" point).
    fn seal(&self, st: &mut State, ino: u64) -> FsResult<()> {
        let Some(w) = st.working.get(&ino) else {
            return Ok(());
        };
        if !w.dirty && !w.meta_dirty {
            return Ok(());
        }
        let a = index::get_attr(&st.db, ino)?.ok_or(FsError::NotFound)?;
        if a.nlink == 0 {
            return Ok(()); // unlinked: nobody will ever read this content
        }
        if !w.dirty {
            // Only times or permissions changed: no new content to stage.
            let now = st.attr(ino)?;
            index::put_attr(
                &st.db,
                &Attr {
                    size: a.size,
                    ..now
                },
            )?;
            if let Some(w) = st.working.get_mut(&ino) {
                w.meta = None;
                w.meta_dirty = false;
            }
            return Ok(());
        }
        let inline = if w.size <= INLINE_MAX {
            let mut data = vec![0u8; w.size as usize];
            let n = w.body.read_at(&mut data, 0)?;
            data.truncate(n);
            Some(data)
        } else {
            if let Body::File(f) = &w.body {
                if self.shared.opts.sync_on_close && w.synced != w.gen {
                    f.sync_data()?;
                }
            }
            None
        };
        let (stage, size, mtime, ctime, meta) = (w.stage, w.size, w.mtime, w.ctime, w.meta);
        let tx = index::write_tx(&st.db)?;
        index::seal_stage(&tx, ino, stage, size, mtime, ctime)?;
        if let Some((perm, atime)) = meta {
            index::set_perm_atime(&tx, ino, perm, atime)?;
        }
        if let Some(data) = &inline {
            index::put_stage_data(&tx, stage, data)?;
        }
        tx.commit()?;
        if let Some(w) = st.working.remove(&ino) {
            if inline.is_some() {
                // The index holds the content now.
                w.discard(&self.shared.staging);
            }
        }
        if let Some(old) = a.stage {
            st.doomed.push(old);
        }
        st.upload_error.remove(&ino);
        self.kick(st);
        Ok(())
    }

    /// fsync the working file of the inode behind `fh` without holding the lock, so
    /// that sealing it afterwards is quick and other requests are not held up.
    fn presync(&self, fh: u64) {
        if !self.shared.opts.sync_on_close {
            return;
        }
        let (ino, file, gen) = {
            let st = self.lock();
            let Some(h) = st.handles.get(&fh) else { return };
            let Some(w) = st.working.get(&h.ino) else {
                return;
            };
            if !w.dirty || w.synced == w.gen || w.size <= INLINE_MAX {
                return; // small files are sealed into the index, not synced
            }
            let Body::File(f) = &w.body else {
                return; // (never: a body past INLINE_MAX is a file)
            };
            (h.ino, f.clone(), w.gen)
        };
        if file.sync_data().is_ok() {
            let mut st = self.lock();
            if let Some(w) = st.working.get_mut(&ino) {
                if matches!(&w.body, Body::File(f) if Arc::ptr_eq(f, &file)) {
                    w.synced = w.synced.max(gen);
                }
            }
        }
    }

    /// Called at every close of a descriptor: closed content becomes pending upload.
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        self.presync(fh);
        let mut st = self.lock();
        let h = st.handles.get(&fh).ok_or(FsError::BadHandle)?;
        if !h.write {
            return Ok(());
        }
        let ino = h.ino;
        self.seal(&mut st, ino)?;
        if let Some(h) = st.handles.get_mut(&fh) {
            h.unflushed = false;
        }
        Ok(())
    }

    /// Last close of a handle.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        self.presync(fh);
        let mut st = self.lock();
        let h = st.handles.remove(&fh).ok_or(FsError::BadHandle)?;
        let ino = h.ino;
        let left = {
            let n = st.open_count.entry(ino).or_default();
            *n = n.saturating_sub(1);
            *n
        };
        let res = if (h.write && h.unflushed) || left == 0 {
            self.seal(&mut st, ino)
        } else {
            Ok(())
        };
        if left == 0 {
            st.open_count.remove(&ino);
            if let Some(w) = st.working.remove(&ino) {
                // Not dirty (or unlinked): nothing to keep.
                w.discard(&self.shared.staging);
            }
            if let Some(a) = index::get_attr(&st.db, ino)? {
                if a.nlink == 0 {
                    let tx = index::write_tx(&st.db)?;
                    index::delete_inode(&tx, ino)?;
                    tx.commit()?;
                    self.purge_files(&mut st, ino, a.stage);
                }
            }
        }
        res
    }

    /// Make a file durable: seal it and wait until its chunks are confirmed stored (EIO
    /// after [`DriveOptions::fsync_timeout`], ENOSPC over quota; data stays staged).
    pub fn fsync(&self, fh: u64) -> FsResult<()> {
        let deadline = Instant::now() + self.shared.opts.fsync_timeout;
        self.presync(fh);
        let mut st = self.lock();
        let h = st.handles.get(&fh).ok_or(FsError::BadHandle)?;
        let ino = h.ino;
        self.seal(&mut st, ino)?;
        if let Some(h) = st.handles.get_mut(&fh) {
            h.unflushed = false;
        }
        let Some(stage) = st.attr(ino)?.stage else {
            drop(st);
            return self.checkpoint();
        };
        loop {
            let a = match index::get_attr(&st.db, ino)? {
                Some(a) => a,
                None => return Ok(()),
            };
            if a.committed_stage >= stage {
                drop(st);
                return self.checkpoint();
            }
            if let Some(e) = st.upload_error.get(&ino) {
                return Err(e.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FsError::NotConfirmed);
            }
            st.hurry = true;
            self.kick(&mut st);
            st = self
                .shared
                .committed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Make the index durable against power loss (the WAL is not synced per commit).
    fn checkpoint(&self) -> FsResult<()> {
        self.shared.make_durable().map_err(FsError::from)
    }

    /// fsyncdir: metadata lives in the index.
    pub fn fsyncdir(&self) -> FsResult<()> {
        self.checkpoint()
    }

    /// Quota as filesystem size and free space.
    pub fn statfs(&self) -> FsResult<StatFs> {
        let st = self.lock();
        let bsize = 4096u64;
        let (total, used) = match st.quota {
            Some(q) => (q.total_bytes, q.used_bytes + st.staged_bytes()?),
            None => (0, 0),
        };
        let files = index::inode_count(&st.db)?;
        Ok(StatFs {
            bsize: bsize as u32,
            blocks: total / bsize,
            bfree: total.saturating_sub(used) / bsize,
            files: files + 1_000_000,
            ffree: 1_000_000,
            namelen: NAME_MAX as u32,
        })
    }

    // ---- xattrs ---------------------------------------------------------------------

    fn check_xattr_name(name: &OsStr) -> FsResult<&[u8]> {
        let n = name.as_bytes();
        if n.len() > 255 {
            return Err(FsError::Os(libc::ERANGE));
        }
        if !n.starts_with(b"user.") || n.len() == 5 {
            return Err(FsError::NotSupported);
        }
        Ok(n)
    }

    /// setxattr (`user.*` only). `flags`: XATTR_CREATE / XATTR_REPLACE.
    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        let n = Self::check_xattr_name(name)?;
        if value.len() > 65536 {
            return Err(FsError::Os(libc::E2BIG));
        }
        let st = self.lock();
        st.attr(ino)?;
        let exists = index::get_xattr(&st.db, ino, n)?.is_some();
        if flags & XATTR_CREATE != 0 && exists {
            return Err(FsError::Exists);
        }
        if flags & XATTR_REPLACE != 0 && !exists {
            return Err(FsError::NoData);
        }
        let tx = index::write_tx(&st.db)?;
        index::set_xattr(&tx, ino, n, value)?;
        index::set_ctime(&tx, ino, Ts::now())?;
        tx.commit()?;
        Ok(())
    }

    /// getxattr.
    pub fn getxattr(&self, ino: u64, name: &OsStr) -> FsResult<Vec<u8>> {
        let st = self.lock();
        st.attr(ino)?;
        if !name.as_bytes().starts_with(b"user.") {
            return Err(FsError::NoData);
        }
        index::get_xattr(&st.db, ino, name.as_bytes())?.ok_or(FsError::NoData)
    }

    /// listxattr: names, each followed by a NUL.
    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let st = self.lock();
        st.attr(ino)?;
        let mut out = Vec::new();
        for n in index::list_xattrs(&st.db, ino)? {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    /// removexattr.
    pub fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        let st = self.lock();
        st.attr(ino)?;
        if !name.as_bytes().starts_with(b"user.") {
            return Err(FsError::NoData);
        }
        if !index::remove_xattr(&st.db, ino, name.as_bytes())? {
            return Err(FsError::NoData);
        }
        Ok(())
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        self.stop_uploader();
    }
}

/// A file's piece of a fetched chunk (the chunk room checked it fits; a cached chunk
/// named by a damaged index may not).
/// What a read returns: bytes of its own, or a range of a cached chunk's plaintext (a
/// read inside one chunk, the common case, is answered without copying it).
pub enum ReadData {
    /// Assembled for this read.
    Owned(Vec<u8>),
    /// `range` of a chunk's plaintext, kept alive by the cache's `Arc`.
    Shared(Arc<Plaintext>, std::ops::Range<usize>),
}

impl ReadData {
    /// The bytes as a vector of their own.
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            ReadData::Owned(v) => v,
            ReadData::Shared(p, r) => p[r].to_vec(),
        }
    }
}

impl std::ops::Deref for ReadData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadData::Owned(v) => v,
            ReadData::Shared(p, r) => &p[r.clone()],
        }
    }
}

fn piece_of<'a>(c: &ChunkRef, plain: &'a [u8]) -> FsResult<&'a [u8]> {
    c.piece(plain)
        .ok_or(FsError::Backend(BackendError::Corrupt(c.id)))
}

fn read_full_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
