//! The uploader: one background thread that turns pending stages into stored chunks.
//!
//! For a batch of closed files it chunks (FastCDC) and seals each staging file (files of
//! at most `PACK_FILE_MAX` are laid end to end into packs instead, one chunk for many
//! files), stores the chunks the backend does not hold yet (recording them first as
//! "intent" rows with refcount 0, so a crash leaves them to be released, never leaked;
//! marked confirmed once stored), and then commits every file's new chunk list in one
//! transaction. Chunks whose
//! refcount fell to zero are released when no upload is pending. Being the only thread
//! that stores, commits and releases chunks is what makes "skip a chunk the backend
//! already holds" safe: nothing can release it between the check and the commit.
//!
//! Failures keep the data staged: an unavailable backend backs off (1 s doubling to 30 s),
//! over quota is reported to fsync (ENOSPC) and retried later.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::backend::BackendError;
use super::chunker;
use super::health::{Publisher, UploadState};
use super::index::{self, ChunkRef};
use super::model::{FsError, Shared, State};
use crate::ids::ChunkId;

/// Most files committed in one transaction.
const BATCH_FILES: usize = 256;
/// Most staged bytes in one batch (bigger files make a batch of their own).
const BATCH_BYTES: u64 = 32 << 20;
/// How long a round far from full waits for more closes (see the uploader loop).
const LINGER: Duration = Duration::from_millis(300);
/// Least time between snapshot-and-release passes while uploads never settle.
const BUSY_HOUSEKEEPING: Duration = Duration::from_secs(60);

#[derive(Debug)]
enum UploadError {
    Stopped,
    Backend(BackendError),
    Local(FsError),
}

impl From<BackendError> for UploadError {
    fn from(e: BackendError) -> Self {
        UploadError::Backend(e)
    }
}
impl From<rusqlite::Error> for UploadError {
    fn from(e: rusqlite::Error) -> Self {
        UploadError::Local(e.into())
    }
}
impl From<std::io::Error> for UploadError {
    fn from(e: std::io::Error) -> Self {
        UploadError::Local(e.into())
    }
}

/// The uploader thread's body; returns when `shared.stop` is set.
pub(crate) fn run(sh: Arc<Shared>) {
    let health = Mutex::new(Publisher::new(&sh.state_dir));
    std::thread::scope(|scope| {
        // The heartbeat says "mounted", so it must not wait for an upload round: one
        // round of a large file can outlast the freshness window (`status --wait` then
        // said the drive was not mounted while it was uploading). This thread alone beats.
        let (done, stopped) = std::sync::mpsc::channel::<()>();
        let health = &health;
        let ticker = std::thread::Builder::new()
            .name("peerstash-health".into())
            .spawn_scoped(scope, move || loop {
                lock_health(health).tick();
                if !matches!(
                    stopped.recv_timeout(Duration::from_secs(1)),
                    Err(RecvTimeoutError::Timeout)
                ) {
                    return;
                }
            });
        if let Err(e) = &ticker {
            tracing::error!("starting the heartbeat thread (status will not see the mount): {e}");
        }
        run_until_stopped(&sh, health);
        drop(done);
        if let Ok(t) = ticker {
            let _ = t.join();
        }
    });
    // Unmounted: `status --wait` must not wait for this drive.
    lock_health(&health).remove();
}

fn lock_health(h: &Mutex<Publisher>) -> std::sync::MutexGuard<'_, Publisher> {
    h.lock().unwrap_or_else(|e| e.into_inner())
}

fn run_until_stopped(sh: &Shared, health: &Mutex<Publisher>) {
    let mut backoff = Duration::ZERO;
    let mut retry_at: HashMap<u64, Instant> = HashMap::new();
    let mut last_quota = Instant::now();
    // The index's change count after the last complete release pass: the next pass can
    // find nothing new until the index changes (a scan of the chunks held for earlier
    // snapshots is not free, and the idle loop runs every second).
    let mut released_at: Option<u64> = None;
    let mut last_housekeeping = Instant::now();
    // The last reclaim under quota pressure: whether it left the drive short, and when.
    let mut last_reclaim: Option<(bool, Instant)> = None;
    // Whether this round already waited for more closes to join it.
    let mut lingered = false;
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        {
            let mut st = sh.lock();
            let wait = if backoff > Duration::ZERO {
                backoff
            } else if st.kick {
                Duration::ZERO
            } else {
                Duration::from_secs(1)
            };
            if wait > Duration::ZERO {
                // Kicks during a backoff are ignored (the backend is down) but stop is not.
                st = wait_for_work(sh, st, wait, |st| backoff.is_zero() && st.kick);
            }
            st.kick = false;
        }
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        if last_quota.elapsed() > Duration::from_secs(2) {
            refresh_quota(sh);
            last_quota = Instant::now();
        }
        if let Err(e) = delete_doomed(sh) {
            tracing::error!("syncing the index: {e}");
        }
        if sh.lock().pressure {
            let (freed, stuck) = reclaim(sh);
            if freed {
                // Space came back: files refused over quota are retried at once.
                retry_at.clear();
            }
            last_reclaim = Some((stuck, Instant::now()));
        }
        // A reclaim that left the drive short is retried only after a while (deletes since
        // may help).
        if last_reclaim.is_some_and(|(_, at)| at.elapsed() > Duration::from_secs(30)) {
            last_reclaim = None;
        }
        let pending = match index::pending(&sh.lock().db, 100_000) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("listing pending uploads: {e}");
                backoff = next_backoff(backoff);
                continue;
            }
        };
        let listed = pending.len();
        let now = Instant::now();
        retry_at.retain(|_, t| *t > now);
        let mut batch = Vec::new();
        let mut bytes = 0u64;
        for (ino, stage, size) in pending {
            if retry_at.contains_key(&ino) {
                continue;
            }
            if !batch.is_empty() && (bytes + size > BATCH_BYTES || batch.len() >= BATCH_FILES) {
                break;
            }
            bytes += size;
            batch.push((ino, stage));
        }
        if batch.is_empty() && retry_at.is_empty() {
            lock_health(health).set(UploadState::Ok, "");
        }
        // Closes come in bursts (a tree being copied): a round that is far from full waits
        // a moment for more files, so one placement, one set of confirms, one index commit
        // and one durable sync carry many files. Nobody waiting (fsync) is held up by it.
        if !batch.is_empty()
            && bytes < BATCH_BYTES / 2
            && batch.len() < BATCH_FILES / 2
            && !lingered
        {
            let mut st = sh.lock();
            st.lingering = true;
            let mut st = wait_for_work(sh, st, LINGER, |st| st.hurry);
            st.lingering = false;
            st.kick = true; // list the pending files again, at once
            lingered = true;
            continue;
        }
        lingered = false;
        sh.lock().hurry = false;
        if batch.is_empty() {
            // Settled (but for files held back for a retry): snapshot if due, and release
            // what no file references.
            let gate = Gate::WhileIdle { waiting: listed };
            match housekeeping(sh, &mut released_at, gate) {
                Ok(()) => backoff = Duration::ZERO,
                Err(e) => {
                    tracing::warn!("releasing chunks: {e}");
                    backoff = next_backoff(backoff);
                }
            }
            last_housekeeping = Instant::now();
            continue;
        }
        // Under a steady stream of closes the drive is never idle: snapshot and release
        // anyway now and then, so deleted and rewritten files give their space back.
        if last_housekeeping.elapsed() >= BUSY_HOUSEKEEPING.max(sh.opts.snapshot_interval) {
            if let Err(e) = housekeeping(sh, &mut released_at, Gate::Always) {
                tracing::warn!("releasing chunks: {e}");
            }
            last_housekeeping = Instant::now();
        }
        match upload(sh, &batch) {
            Ok(()) => {
                backoff = Duration::ZERO;
                lock_health(health).set(UploadState::Ok, "");
                let mut st = sh.lock();
                st.kick = true; // maybe more pending
                st.stalled = false;
                drop(st);
                refresh_quota(sh);
                last_quota = Instant::now();
            }
            Err(UploadError::Stopped) => return,
            Err(UploadError::Backend(BackendError::Unavailable(msg))) => {
                tracing::warn!("upload postponed, storage unavailable: {msg}");
                lock_health(health).set(
                    UploadState::Unavailable,
                    &format!("storage unavailable: {msg}"),
                );
                backoff = next_backoff(backoff);
                stalled(sh);
            }
            Err(first) => {
                // Find which files fail by trying them one by one; the others go through.
                let singles: Vec<_> = if batch.len() > 1 {
                    batch.clone()
                } else {
                    Vec::new()
                };
                let mut failures = Vec::new();
                if singles.is_empty() {
                    failures.push((batch[0].0, first));
                }
                for item in singles {
                    match upload(sh, &[item]) {
                        Ok(()) => {}
                        Err(UploadError::Stopped) => return,
                        Err(e) => failures.push((item.0, e)),
                    }
                }
                let mut st = sh.lock();
                // Over quota while deletes left chunks to give back: reclaim first, and
                // report ENOSPC only if a reclaim since then did not help.
                let reclaim_may_help = last_reclaim.is_none_or(|(stuck, _)| !stuck)
                    && index::unreferenced_bytes(&st.db).unwrap_or(0) > 0;
                for (ino, e) in failures {
                    let err = match e {
                        UploadError::Backend(BackendError::OverQuota { .. })
                            if reclaim_may_help =>
                        {
                            st.pressure = true;
                            st.kick = true;
                            tracing::info!(
                                "upload of inode {ino} waits for space to be given back"
                            );
                            continue;
                        }
                        UploadError::Backend(BackendError::OverQuota { .. }) => FsError::NoSpace,
                        UploadError::Backend(b) => FsError::Backend(b),
                        UploadError::Local(l) => l,
                        UploadError::Stopped => return,
                    };
                    tracing::warn!("upload of inode {ino} failed, kept staged: {err}");
                    let state = match err {
                        FsError::NoSpace => UploadState::OverQuota,
                        _ => UploadState::Failing,
                    };
                    lock_health(health).set(state, &err.to_string());
                    st.upload_error.insert(ino, err);
                    st.stalled = true;
                    retry_at.insert(ino, Instant::now() + Duration::from_secs(5));
                }
                sh.committed.notify_all();
                drop(st);
                refresh_quota(sh);
            }
        }
    }
}

/// Record a failed round and wake whoever waits for uploads (a clean exit gives up).
fn stalled(sh: &Shared) {
    sh.lock().stalled = true;
    sh.committed.notify_all();
}

/// Snapshot the index if it changed and a snapshot is due (then apply retention), and
/// release the chunks nothing references once the latest snapshot covers every commit.
/// `released_at` is the index's change count before the last complete release pass.
fn housekeeping(
    sh: &Shared,
    released_at: &mut Option<u64>,
    gate: Gate,
) -> Result<(), BackendError> {
    let mut snapshot_current = true;
    if sh.opts.roots.is_some() {
        let mut snap = sh.snap.lock().unwrap_or_else(|e| e.into_inner());
        let due = snap
            .last
            .is_none_or(|t| t.elapsed() >= sh.opts.snapshot_interval);
        if due {
            if let Err(e) = super::snapshot::take(sh, &mut snap) {
                tracing::warn!("snapshot postponed: {e}");
            }
            if let Err(e) = super::snapshot::expire(sh, &mut snap) {
                tracing::warn!("expiring earlier snapshots postponed: {e}");
            }
            sh.lock().reserve = super::snapshot::reserve(&snap);
        }
        // The latest stored snapshot must never name a released chunk: release only once
        // it covers every commit (it then names no unreferenced chunk).
        snapshot_current = snap.changes == Some(sh.lock().db.total_changes());
    }
    // Counted before the pass: a delete while it runs is not taken as seen (the pass may
    // have listed the free chunks before it), so the next idle pass releases its chunks.
    let changes = sh.lock().db.total_changes();
    if snapshot_current && *released_at != Some(changes) && release_free(sh, gate)? == Released::All
    {
        if let Err(e) = repack(sh) {
            tracing::warn!("packing small files anew postponed: {e}");
        }
        *released_at = Some(changes);
    }
    Ok(())
}

/// Most packs looked at per housekeeping pass.
const REPACK_PER_PASS: usize = 8;

/// Deleting or rewriting small files leaves their pack partly dead, and a pack is
/// released only when no file uses it. Once less than half of a pack is alive, its
/// files are staged again (their content unchanged, kept in the index) so the next
/// rounds pack them with others, and the old pack is released like any other chunk.
fn repack(sh: &Shared) -> Result<(), FsError> {
    let packs = index::sparse_packs(&sh.lock().db, REPACK_PER_PASS)?;
    for pack in packs {
        let pieces = index::settled_pieces_of(&sh.lock().db, &pack)?;
        let Some((_, first)) = pieces.first() else {
            continue;
        };
        // Fetched without the drive's lock (usually from the peers).
        let plain = sh.chunks.fetch(first)?;
        let mut st = sh.lock();
        let tx = index::write_tx(&st.db)?;
        let mut moved = 0;
        for (ino, c) in &pieces {
            if st.being_written(*ino) {
                continue; // being written: its close stages it anyway
            }
            let Some(data) = c.piece(&plain) else {
                return Err(FsError::Backend(BackendError::Corrupt(c.id)));
            };
            // Only if the file still has exactly this piece.
            if index::chunks_of(&tx, *ino)? != [*c] {
                continue;
            }
            if index::restage(&tx, *ino, sh.staging.next_id(), data)? {
                moved += 1;
            }
        }
        tx.commit()?;
        tracing::debug!("pack {pack}: {moved} files staged to be packed anew");
        if moved > 0 {
            st.kick = true;
        }
    }
    Ok(())
}

fn next_backoff(b: Duration) -> Duration {
    if b.is_zero() {
        Duration::from_secs(1)
    } else {
        (b * 2).min(Duration::from_secs(30))
    }
}

/// Quota pressure (a write or an upload found the quota full while deletes left chunks
/// unreferenced): give that space back now rather than when idle. Store a snapshot (so
/// the latest no longer names deleted files; the reserve keeps room for it), release what
/// nothing retains, and while still short thin the oldest retained snapshots. Returns
/// whether the quota's used bytes went down, and whether the drive is still short of
/// space with nothing more to give back.
fn reclaim(sh: &Shared) -> (bool, bool) {
    refresh_quota(sh);
    let before = sh.lock().quota.map(|q| q.used_bytes);
    let mut snap = sh.snap.lock().unwrap_or_else(|e| e.into_inner());
    // Stuck only when a full pass found the drive short and nothing left to thin; a pass
    // cut short (the index kept changing, an error) is not: the next pressure retries.
    let mut stuck = false;
    // Snapshots taken since the last thinning: writes going on may change the index while
    // it is read, and thinning itself changes it (each thinning needs one more).
    let mut attempts = 0;
    loop {
        let current = sh.opts.roots.is_none() || snap.changes == Some(sh.lock().db.total_changes());
        if !current {
            attempts += 1;
            if attempts > 3 {
                break;
            }
            let taken = super::snapshot::take(sh, &mut snap);
            sh.lock().reserve = super::snapshot::reserve(&snap);
            if let Err(e) = taken {
                tracing::warn!("snapshot to give space back failed: {e}");
                break;
            }
            continue;
        }
        if let Err(e) = release_free(sh, Gate::Always) {
            tracing::warn!("releasing chunks: {e}");
            break;
        }
        refresh_quota(sh);
        let short = {
            let st = sh.lock();
            match (st.quota, st.staged_bytes()) {
                (Some(q), Ok(staged)) => {
                    q.used_bytes + staged > q.total_bytes.saturating_sub(st.reserve)
                }
                _ => false,
            }
        };
        if !short {
            break;
        }
        // Thin only snapshots that hold something: history is not given up for nothing.
        if index::held_for_earlier_bytes(&sh.lock().db).unwrap_or(0) == 0 {
            stuck = true;
            break;
        }
        match super::snapshot::thin_oldest(sh, &mut snap) {
            Ok(Some(_)) => attempts = 0,
            Ok(None) => {
                stuck = true;
                break;
            }
            Err(e) => {
                tracing::warn!("dropping an earlier snapshot to give space back failed: {e}");
                break;
            }
        }
    }
    drop(snap);
    let mut st = sh.lock();
    st.pressure = false;
    st.reclaimable = None;
    let after = st.quota.map(|q| q.used_bytes);
    sh.committed.notify_all();
    (
        matches!((before, after), (Some(b), Some(a)) if a < b),
        stuck,
    )
}

fn refresh_quota(sh: &Shared) {
    if let Ok(q) = sh.chunks.backend().quota() {
        sh.lock().quota = Some(q);
    }
}

/// Delete the staging files (and small files' content kept in the index) that committed
/// transactions stopped referencing, once those commits are durable.
fn delete_doomed(sh: &Shared) -> rusqlite::Result<()> {
    // Taken before the sync: every id here was let go by a commit the sync covers.
    let doomed = std::mem::take(&mut sh.lock().doomed);
    if doomed.is_empty() {
        return Ok(());
    }
    // Synced without the lock (a disk flush held it for milliseconds, every close and
    // create waiting behind it).
    let dropped = sh
        .make_durable()
        .and_then(|()| index::drop_stage_data(&sh.lock().db, Some(&doomed)));
    if let Err(e) = dropped {
        sh.lock().doomed.extend(doomed);
        return Err(e);
    }
    for s in doomed {
        sh.staging.remove(s);
    }
    Ok(())
}

/// When a release pass may run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Only while no more files wait for upload than the `waiting` ones held back for a
    /// retry: a file closed meanwhile, such as a new version about to replace an old one
    /// (rsync's temp file + rename), keeps the old version's chunks to reuse.
    WhileIdle { waiting: usize },
    /// Regardless (quota pressure, or a steady stream of closes).
    Always,
}

/// How a release pass ended.
#[derive(Debug, PartialEq, Eq)]
enum Released {
    /// Every free chunk was released.
    All,
    /// A file was closed meanwhile (with [`Gate::WhileIdle`]): the rest waits for idle.
    GaveWay,
}

/// Release chunks no committed file version and no retained snapshot references.
fn release_free(sh: &Shared, gate: Gate) -> Result<Released, BackendError> {
    let index_err = |e: rusqlite::Error| BackendError::Unavailable(format!("index: {e}"));
    let mut synced = false;
    loop {
        // Checked under the lock that lists the chunks: closes and renames take it too.
        let ids = {
            let st = sh.lock();
            if let Gate::WhileIdle { waiting } = gate {
                if index::pending(&st.db, waiting + 1)
                    .map_err(index_err)?
                    .len()
                    > waiting
                {
                    return Ok(Released::GaveWay);
                }
            }
            index::free_chunks(&st.db, 1000).map_err(index_err)?
        };
        if ids.is_empty() {
            return Ok(Released::All);
        }
        if !synced {
            // The commits that dropped these references must survive a power cut before
            // the chunks are gone.
            sh.make_durable().map_err(index_err)?;
            synced = true;
        }
        sh.chunks.backend().release(&ids)?;
        index::forget_chunks(&sh.lock().db, &ids).map_err(index_err)?;
    }
}

/// Sealed chunks on their way to the backend, at most `put_batch_bytes` at a time.
struct PutBuffer {
    chunks: Vec<(ChunkId, Vec<u8>)>,
    bytes: usize,
    seen: HashSet<ChunkId>,
    /// Pieces of packs sealed this round: ((result index, at, len), (pack id, stored)).
    #[allow(clippy::type_complexity)]
    pieces: Vec<((usize, u32, u32), (ChunkId, u32))>,
    /// To the putter thread.
    out: std::sync::mpsc::SyncSender<PutBatch>,
}

/// One batch for the putter thread.
struct PutBatch {
    chunks: Vec<(ChunkId, Vec<u8>)>,
    bytes: usize,
}

impl PutBuffer {
    /// Hand the buffered chunks to the putter (waiting while it still has one queued).
    fn flush(&mut self) -> Result<(), UploadError> {
        if self.chunks.is_empty() {
            return Ok(());
        }
        let batch = PutBatch {
            chunks: std::mem::take(&mut self.chunks),
            bytes: std::mem::replace(&mut self.bytes, 0),
        };
        // A putter that stopped failed: its own error is the one reported.
        self.out
            .send(batch)
            .map_err(|_| UploadError::Local(FsError::Io("the putter stopped".into())))
    }
}

impl PutBatch {
    /// Store the batch, noting the intent first (a crash mid-put leaves chunks to
    /// release, not to leak) and the confirmation after.
    fn put(self, sh: &Shared) -> Result<(), UploadError> {
        let intent: Vec<(ChunkId, u32)> = self
            .chunks
            .iter()
            .map(|(id, b)| (*id, b.len() as u32))
            .collect();
        {
            let st = sh.lock();
            // File chunks stop short of the reserve: the snapshot recording a delete must
            // always fit, or a full drive could never give space back.
            if let Some(q) = st.quota {
                let limit = q.total_bytes.saturating_sub(st.reserve);
                if q.used_bytes + self.bytes as u64 > limit {
                    return Err(UploadError::Backend(BackendError::OverQuota {
                        needed: self.bytes as u64,
                        available: limit.saturating_sub(q.used_bytes),
                    }));
                }
            }
            index::note_intent(&st.db, &intent)?;
        }
        sh.chunks.backend().put(&self.chunks)?;
        if let Some(q) = sh.lock().quota.as_mut() {
            q.used_bytes += self.bytes as u64; // until the next refresh says exactly
        }
        let ids: Vec<ChunkId> = self.chunks.iter().map(|(id, _)| *id).collect();
        index::mark_confirmed(&sh.lock().db, &ids)?;
        Ok(())
    }
}

/// Wait on the work condition up to `wait`, until `done` holds or the drive stops.
fn wait_for_work<'a>(
    sh: &'a Shared,
    mut st: std::sync::MutexGuard<'a, State>,
    wait: Duration,
    done: impl Fn(&State) -> bool,
) -> std::sync::MutexGuard<'a, State> {
    let deadline = Instant::now() + wait;
    while !sh.stop.load(Ordering::SeqCst) && !done(&st) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        st = sh
            .work
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    st
}

/// Put batches stored at once: while one waits on its holders' fsyncs and the server's
/// answers, the other keeps the network busy.
const PUTTERS: usize = 2;

/// Upload a batch of `(ino, stage)` and commit it in one transaction. Files are cut and
/// sealed on this thread while putter threads store the previous batches: the network
/// and the CPU work overlap (one batch queued, [`PUTTERS`] in flight).
fn upload(sh: &Shared, batch: &[(u64, u64)]) -> Result<(), UploadError> {
    let (out, batches) = std::sync::mpsc::sync_channel::<PutBatch>(1);
    // Dropped by the first putter that fails: the sealer's next hand-over fails at once
    // and the other putters stop.
    let batches = Mutex::new(Some(batches));
    let batches = &batches;
    let done = std::thread::scope(|scope| {
        let mut putters = Vec::with_capacity(PUTTERS);
        for _ in 0..PUTTERS {
            let putter = std::thread::Builder::new()
                .name("peerstash-putter".into())
                .spawn_scoped(scope, move || -> Result<(), UploadError> {
                    let lock = || batches.lock().unwrap_or_else(|e| e.into_inner());
                    loop {
                        // The lock is held only to take the next batch, not while storing it.
                        let next = lock().as_ref().and_then(|rx| rx.recv().ok());
                        let Some(b) = next else {
                            return Ok(());
                        };
                        if let Err(e) = b.put(sh) {
                            lock().take();
                            return Err(e);
                        }
                    }
                })
                .map_err(|e| UploadError::Local(FsError::Io(format!("starting a putter: {e}"))))?;
            putters.push(putter);
        }
        let mut buf = PutBuffer {
            chunks: Vec::new(),
            bytes: 0,
            seen: HashSet::new(),
            pieces: Vec::new(),
            out,
        };
        let sealed = seal_files(sh, batch, &mut buf).and_then(|d| buf.flush().map(|()| d));
        drop(buf);
        let mut put = Ok(());
        for p in putters {
            let r = p.join().expect("a putter thread panicked");
            if put.is_ok() {
                put = r;
            }
        }
        match (sealed, put) {
            (_, Err(e)) | (Err(e), Ok(())) => Err(e),
            (Ok(d), Ok(())) => Ok(d),
        }
    })?;
    if sh.stop.load(Ordering::SeqCst) {
        return Err(UploadError::Stopped);
    }
    let mut st = sh.lock();
    let mut finished = Vec::new();
    let tx = index::write_tx(&st.db)?;
    for (ino, stage, list) in &done {
        let Some(a) = index::get_attr(&tx, *ino)? else {
            continue;
        };
        if a.nlink == 0 {
            continue; // unlinked while open: purged at its last close
        }
        if a.committed_stage >= *stage {
            // Already superseded by a newer commit; never leave the stage dangling.
            if a.stage == Some(*stage) {
                index::set_stage(&tx, *ino, None)?;
                finished.push(*stage);
            }
            continue;
        }
        index::replace_chunks(&tx, *ino, list)?;
        index::commit_stage(&tx, *ino, *stage)?;
        if a.stage == Some(*stage) {
            finished.push(*stage);
        }
    }
    tx.commit()?;
    for (ino, _, _) in &done {
        st.upload_error.remove(ino);
    }
    // Finished stages are deleted by the next `delete_doomed`, after a durable sync.
    st.doomed.extend(finished);
    drop(st);
    if let Err(e) = delete_doomed(sh) {
        tracing::error!("syncing the index: {e}");
    }
    sh.committed.notify_all();
    Ok(())
}

/// Files this small are packed: sealed together with others of their round as one chunk
/// (one placement, one stored file per holder, one fsync), each file a piece of it.
pub(crate) const PACK_FILE_MAX: u64 = 128 << 10;
/// A pack is sealed once it holds this much.
const PACK_TARGET: usize = 1 << 20;

/// The pack being filled during a round.
#[derive(Default)]
struct OpenPack {
    plain: Vec<u8>,
    /// (index in the round's results, where the piece starts, its length)
    members: Vec<(usize, u32, u32)>,
    /// Identical small files in one pack share one piece.
    same: HashMap<blake3::Hash, u32>,
}

/// Cut and seal every file of the batch, handing new chunks to `buf`; each file's chunk
/// list in order. Small files go into packs.
#[allow(clippy::type_complexity)]
fn seal_files(
    sh: &Shared,
    batch: &[(u64, u64)],
    buf: &mut PutBuffer,
) -> Result<Vec<(u64, u64, Vec<ChunkRef>)>, UploadError> {
    let mut done = Vec::new();
    let mut pack = OpenPack::default();
    for &(ino, stage) in batch {
        let inline = index::stage_data(&sh.lock().db, stage)?;
        let (content, len): (Box<dyn std::io::Read>, u64) = match inline {
            Some(d) if !d.is_empty() && d.len() as u64 <= PACK_FILE_MAX => {
                add_to_pack(sh, buf, &mut pack, done.len(), &d)?;
                done.push((ino, stage, Vec::new()));
                continue;
            }
            Some(d) => {
                let len = d.len() as u64;
                (Box::new(std::io::Cursor::new(d)), len)
            }
            None => match sh.staging.open_read(stage) {
                Ok(f) => {
                    let len = f.metadata()?.len();
                    if len > 0 && len <= PACK_FILE_MAX {
                        let mut d = Vec::with_capacity(len as usize);
                        std::io::Read::read_to_end(
                            &mut std::io::Read::take(&f, PACK_FILE_MAX + 1),
                            &mut d,
                        )?;
                        if d.len() as u64 == len {
                            add_to_pack(sh, buf, &mut pack, done.len(), &d)?;
                            done.push((ino, stage, Vec::new()));
                            continue;
                        }
                        std::io::Seek::rewind(&mut &f)?;
                    }
                    (Box::new(f), len)
                }
                // Superseded by a newer close, or the file was deleted: nothing to do.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            },
        };
        let mut list = Vec::new();
        chunker::for_each_chunk_of_file(content, len, |offset, data| {
            if sh.stop.load(Ordering::SeqCst) {
                return Err(UploadError::Stopped);
            }
            let (id, stored) = seal_chunk(sh, buf, &data)?;
            list.push(ChunkRef {
                offset,
                id,
                len: data.len() as u32,
                stored,
                at: 0,
            });
            Ok(())
        })?;
        done.push((ino, stage, list));
    }
    seal_pack(sh, buf, &mut pack, &mut done)?;
    Ok(done)
}

/// Add a small file's content to the open pack as the piece of result `slot`, sealing
/// the pack first if it is full.
fn add_to_pack(
    sh: &Shared,
    buf: &mut PutBuffer,
    pack: &mut OpenPack,
    slot: usize,
    data: &[u8],
) -> Result<(), UploadError> {
    if sh.stop.load(Ordering::SeqCst) {
        return Err(UploadError::Stopped);
    }
    let hash = blake3::hash(data);
    let at = match pack.same.get(&hash) {
        Some(&at) => at,
        None => {
            let at = pack.plain.len() as u32;
            pack.plain.extend_from_slice(data);
            pack.same.insert(hash, at);
            at
        }
    };
    pack.members.push((slot, at, data.len() as u32));
    if pack.plain.len() >= PACK_TARGET {
        // The results are filled in at once: the slot's list is the pack's only piece.
        let mut early = Vec::new();
        std::mem::swap(&mut early, &mut pack.members);
        let id_stored = seal_chunk(sh, buf, &pack.plain)?;
        pack.plain.clear();
        pack.same.clear();
        buf.pieces.extend(early.into_iter().map(|m| (m, id_stored)));
    }
    Ok(())
}

/// Seal what the open pack holds and give every file of the round its piece.
#[allow(clippy::type_complexity)]
fn seal_pack(
    sh: &Shared,
    buf: &mut PutBuffer,
    pack: &mut OpenPack,
    done: &mut [(u64, u64, Vec<ChunkRef>)],
) -> Result<(), UploadError> {
    if !pack.members.is_empty() {
        let id_stored = seal_chunk(sh, buf, &pack.plain)?;
        buf.pieces
            .extend(pack.members.drain(..).map(|m| (m, id_stored)));
    }
    for ((slot, at, len), (id, stored)) in buf.pieces.drain(..) {
        done[slot].2 = vec![ChunkRef {
            offset: 0,
            id,
            len,
            stored,
            at,
        }];
    }
    Ok(())
}

/// Seal one chunk and queue it for the backend unless it is stored already.
fn seal_chunk(
    sh: &Shared,
    buf: &mut PutBuffer,
    data: &[u8],
) -> Result<(ChunkId, u32), UploadError> {
    let sealed = sh.chunks.sealer().seal(data);
    let (id, stored) = (sealed.id, sealed.stored.len() as u32);
    if buf.seen.insert(id) && !index::chunk_stored(&sh.lock().db, &id)? {
        buf.bytes += sealed.stored.len();
        buf.chunks.push((id, sealed.stored));
        if buf.bytes >= sh.opts.put_batch_bytes {
            buf.flush()?;
        }
    }
    Ok((id, stored))
}
