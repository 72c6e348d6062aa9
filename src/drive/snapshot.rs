//! Snapshots of the index: the local index is a cache, and this is its backup.
//!
//! A snapshot is one consistent state of the index's durable part (directories, names,
//! attributes, symlink targets, xattrs, hard links, and each *uploaded* file version's
//! chunk list — never staging data), serialized in the framing below, cut into chunks by
//! FastCDC, each sealed under the user's data key exactly like file chunks and stored
//! through the [`ChunkBackend`] (same replication). A small *root record* lists those
//! chunks; it is sealed under the data key too and kept by the server ([`RootStore`]) with
//! its version number. Peers see only ciphertext; the server sees a version number and an
//! opaque blob.
//!
//! A file whose new version is still waiting for upload goes in as its last uploaded
//! version (size = the sum of its chunk lengths), or not at all if it was never uploaded:
//! a snapshot never names a chunk that is not stored.
//!
//! # Snapshot framing (plaintext, before chunking)
//!
//! ```text
//! "PSSNAP01"                         8 bytes magic
//! record*                            tag byte + fields, integers big-endian
//!   'I' ino u64, kind u8, perm u16, uid u32, gid u32, size u64,
//!       atime (sec i64, nsec u32), mtime (i64, u32), ctime (i64, u32),
//!       nlink u32, rdev u32, parent u64, target_len u16, target bytes
//!   'D' parent u64, name_len u16 (1..=255), name bytes, ino u64
//!   'X' ino u64, name_len u16 (1..=255), name bytes, value_len u32 (<= 64 KiB), value
//!   'C' ino u64, offset u64, chunk id 32 bytes, len u32, stored u32
//! 'E' records u64                    the number of records before it; nothing follows
//! ```
//!
//! Each stored snapshot chunk is `seal("PSCHUNK1" || piece)`, pieces cut by FastCDC.
//!
//! # Root record (plaintext, before sealing)
//!
//! ```text
//! "PSROOT01"   8 bytes magic
//! version      u64
//! created      i64 seconds since the epoch
//! total_len    u64 bytes of the snapshot framing
//! count        u32 (<= MAX_ROOT_CHUNKS)
//! count × (chunk id 32 bytes, stored size u32, piece length u32)
//! ```
//!
//! Sealed like a chunk: `nonce(12) || AES-256-GCM-SIV ciphertext + tag(16)`. A root that
//! does not decrypt means the data key is not the one that wrote it.
//!
//! Snapshot chunks are not tracked in the index's `chunks` table, so the drive never
//! releases them (first version: they stay on peers for good).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection};

use super::backend::{BackendError, ChunkBackend};
use super::chunker;
use super::crypto::ChunkSealer;
use super::index::{self, ROOT_INO};
use super::model::Shared;
use crate::ids::ChunkId;

const SNAP_MAGIC: &[u8; 8] = b"PSSNAP01";
const ROOT_MAGIC: &[u8; 8] = b"PSROOT01";
const PIECE_MAGIC: &[u8; 8] = b"PSCHUNK1";
/// Most chunks one root record lists (keeps it under the server's 64 KiB bound).
pub const MAX_ROOT_CHUNKS: usize = 1500;
const MAX_NAME: usize = 255;
const MAX_TARGET: usize = 4096;
const MAX_XATTR_VALUE: usize = 64 << 10;

/// Why a root could not be stored or fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RootError {
    /// The server keeps a version at least this new already.
    #[error("the server already keeps a newer root")]
    Stale,
    /// The server could not be reached or refused.
    #[error("root storage unavailable: {0}")]
    Unavailable(String),
}

/// Where the sealed root record lives (the coordination server).
pub trait RootStore: Send + Sync + std::fmt::Debug {
    /// Keep `sealed` as root `version` (refused with [`RootError::Stale`] unless newer).
    fn put_root(&self, version: u64, sealed: &[u8]) -> Result<(), RootError>;
    /// The latest root: `(version, sealed)`, `None` if none was ever stored.
    fn get_root(&self) -> Result<Option<(u64, Vec<u8>)>, RootError>;
}

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The root does not decrypt: another data key wrote it.
    #[error("this data key cannot open your snapshots: wrong passphrase?")]
    WrongKey,
    /// Malformed snapshot data (after authentication: a bug or an incompatible version).
    #[error("malformed snapshot: {0}")]
    Malformed(String),
    /// Storage failed.
    #[error("{0}")]
    Backend(#[from] BackendError),
    /// The root store failed.
    #[error("{0}")]
    Root(#[from] RootError),
    /// The local index failed.
    #[error("index: {0}")]
    Index(#[from] rusqlite::Error),
    /// Local I/O failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn bad(what: impl Into<String>) -> SnapshotError {
    SnapshotError::Malformed(what.into())
}

// ---- serialization -------------------------------------------------------------------

/// Serialize the durable part of the index, in one read transaction.
pub fn serialize(c: &Connection) -> rusqlite::Result<Vec<u8>> {
    let tx = c.unchecked_transaction()?;
    let mut out = Vec::with_capacity(1 << 16);
    out.extend_from_slice(SNAP_MAGIC);
    let mut records = 0u64;
    // Inodes in: everything linked, except files never uploaded (pending first version).
    const KEEP: &str = "nlink > 0 AND (kind <> 1 OR committed_stage > 0 OR stage IS NULL)";
    {
        let mut st = tx.prepare(&format!(
            "SELECT ino, kind, perm, uid, gid, size, atime_s, atime_ns, mtime_s, mtime_ns,
                    ctime_s, ctime_ns, nlink, rdev, parent, target,
                    (SELECT COALESCE(SUM(len), 0) FROM file_chunks f WHERE f.ino = inodes.ino)
             FROM inodes WHERE {KEEP} ORDER BY ino"
        ))?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let kind: i64 = r.get(1)?;
            let size: i64 = if kind == 1 { r.get(16)? } else { r.get(5)? };
            let target: Option<Vec<u8>> = r.get(15)?;
            let target = target.unwrap_or_default();
            out.push(b'I');
            out.extend_from_slice(&(r.get::<_, i64>(0)? as u64).to_be_bytes());
            out.push(kind as u8);
            out.extend_from_slice(&(r.get::<_, i64>(2)? as u16).to_be_bytes());
            out.extend_from_slice(&(r.get::<_, i64>(3)? as u32).to_be_bytes());
            out.extend_from_slice(&(r.get::<_, i64>(4)? as u32).to_be_bytes());
            out.extend_from_slice(&(size as u64).to_be_bytes());
            for i in [6, 8, 10] {
                out.extend_from_slice(&r.get::<_, i64>(i)?.to_be_bytes());
                out.extend_from_slice(&(r.get::<_, i64>(i + 1)? as u32).to_be_bytes());
            }
            out.extend_from_slice(&(r.get::<_, i64>(12)? as u32).to_be_bytes());
            out.extend_from_slice(&(r.get::<_, i64>(13)? as u32).to_be_bytes());
            out.extend_from_slice(&(r.get::<_, i64>(14)? as u64).to_be_bytes());
            let t = &target[..target.len().min(MAX_TARGET)];
            out.extend_from_slice(&(t.len() as u16).to_be_bytes());
            out.extend_from_slice(t);
            records += 1;
        }
    }
    {
        let mut st = tx.prepare(&format!(
            "SELECT parent, name, ino FROM dentries
             WHERE ino IN (SELECT ino FROM inodes WHERE {KEEP}) ORDER BY parent, name"
        ))?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let name: Vec<u8> = r.get(1)?;
            if name.is_empty() || name.len() > MAX_NAME {
                continue;
            }
            out.push(b'D');
            out.extend_from_slice(&(r.get::<_, i64>(0)? as u64).to_be_bytes());
            out.extend_from_slice(&(name.len() as u16).to_be_bytes());
            out.extend_from_slice(&name);
            out.extend_from_slice(&(r.get::<_, i64>(2)? as u64).to_be_bytes());
            records += 1;
        }
    }
    {
        let mut st = tx.prepare(&format!(
            "SELECT ino, name, value FROM xattrs
             WHERE ino IN (SELECT ino FROM inodes WHERE {KEEP}) ORDER BY ino, name"
        ))?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let name: Vec<u8> = r.get(1)?;
            let value: Vec<u8> = r.get(2)?;
            if name.is_empty() || name.len() > MAX_NAME || value.len() > MAX_XATTR_VALUE {
                continue;
            }
            out.push(b'X');
            out.extend_from_slice(&(r.get::<_, i64>(0)? as u64).to_be_bytes());
            out.extend_from_slice(&(name.len() as u16).to_be_bytes());
            out.extend_from_slice(&name);
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(&value);
            records += 1;
        }
    }
    {
        let mut st = tx.prepare(&format!(
            "SELECT ino, offset, chunk, len, stored FROM file_chunks
             WHERE ino IN (SELECT ino FROM inodes WHERE {KEEP}) ORDER BY ino, offset"
        ))?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let id: Vec<u8> = r.get(2)?;
            if id.len() != 32 {
                continue;
            }
            out.push(b'C');
            out.extend_from_slice(&(r.get::<_, i64>(0)? as u64).to_be_bytes());
            out.extend_from_slice(&(r.get::<_, i64>(1)? as u64).to_be_bytes());
            out.extend_from_slice(&id);
            out.extend_from_slice(&(r.get::<_, i64>(3)? as u32).to_be_bytes());
            out.extend_from_slice(&(r.get::<_, i64>(4)? as u32).to_be_bytes());
            records += 1;
        }
    }
    out.push(b'E');
    out.extend_from_slice(&records.to_be_bytes());
    drop(tx); // read only: rolls back
    Ok(out)
}

/// A bounded reader: every read checks what is left.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if self.b.len() < n {
            return Err(bad("truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn i64(&mut self) -> Result<i64, SnapshotError> {
        Ok(self.u64()? as i64)
    }
    fn id(&mut self) -> Result<[u8; 32], SnapshotError> {
        Ok(self.take(32)?.try_into().expect("32"))
    }
    fn ino(&mut self) -> Result<i64, SnapshotError> {
        let v = self.u64()?;
        if v == 0 || v > i64::MAX as u64 {
            return Err(bad("inode number out of range"));
        }
        Ok(v as i64)
    }
}

/// Load a serialized snapshot into a freshly created, empty index (in one transaction);
/// calls `progress(records)` now and then. Returns the number of records.
pub fn load(
    c: &Connection,
    data: &[u8],
    mut progress: impl FnMut(u64),
) -> Result<u64, SnapshotError> {
    let mut r = Reader { b: data };
    if r.take(8)? != SNAP_MAGIC {
        return Err(bad("not a snapshot (bad magic)"));
    }
    let tx = c.unchecked_transaction()?;
    for t in ["inodes", "dentries", "xattrs", "file_chunks", "chunks"] {
        tx.execute(&format!("DELETE FROM {t}"), [])?;
    }
    let mut records = 0u64;
    let mut root_seen = false;
    loop {
        let tag = r.u8()?;
        match tag {
            b'I' => {
                let ino = r.ino()?;
                let kind = r.u8()?;
                if !(1..=7).contains(&kind) {
                    return Err(bad("unknown inode kind"));
                }
                let perm = r.u16()? & 0o7777;
                let (uid, gid) = (r.u32()?, r.u32()?);
                let size = r.u64()?;
                if size > i64::MAX as u64 {
                    return Err(bad("size out of range"));
                }
                let mut ts = [(0i64, 0u32); 3];
                for t in &mut ts {
                    *t = (r.i64()?, r.u32()?);
                    if t.1 >= 1_000_000_000 {
                        return Err(bad("nanoseconds out of range"));
                    }
                }
                let (nlink, rdev) = (r.u32()?, r.u32()?);
                let parent = r.u64()?;
                if parent > i64::MAX as u64 {
                    return Err(bad("parent out of range"));
                }
                let tlen = r.u16()? as usize;
                if tlen > MAX_TARGET {
                    return Err(bad("symlink target too long"));
                }
                let target = r.take(tlen)?;
                root_seen |= ino == ROOT_INO as i64;
                tx.execute(
                    "INSERT INTO inodes (ino, kind, perm, uid, gid, size, atime_s, atime_ns,
                     mtime_s, mtime_ns, ctime_s, ctime_ns, nlink, rdev, parent, target)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
                    params![
                        ino,
                        kind,
                        perm,
                        uid,
                        gid,
                        size as i64,
                        ts[0].0,
                        ts[0].1,
                        ts[1].0,
                        ts[1].1,
                        ts[2].0,
                        ts[2].1,
                        nlink,
                        rdev,
                        parent as i64,
                        if kind == 3 { Some(target) } else { None },
                    ],
                )
                .map_err(|e| bad(format!("inode {ino}: {e}")))?;
            }
            b'D' => {
                let parent = r.ino()?;
                let n = r.u16()? as usize;
                if n == 0 || n > MAX_NAME {
                    return Err(bad("bad name length"));
                }
                let name = r.take(n)?;
                let ino = r.ino()?;
                tx.execute(
                    "INSERT INTO dentries (parent, name, ino) VALUES (?1, ?2, ?3)",
                    params![parent, name, ino],
                )
                .map_err(|e| bad(format!("entry: {e}")))?;
            }
            b'X' => {
                let ino = r.ino()?;
                let n = r.u16()? as usize;
                if n == 0 || n > MAX_NAME {
                    return Err(bad("bad xattr name length"));
                }
                let name = r.take(n)?;
                let vlen = r.u32()? as usize;
                if vlen > MAX_XATTR_VALUE {
                    return Err(bad("xattr value too long"));
                }
                let value = r.take(vlen)?;
                tx.execute(
                    "INSERT INTO xattrs (ino, name, value) VALUES (?1, ?2, ?3)",
                    params![ino, name, value],
                )
                .map_err(|e| bad(format!("xattr: {e}")))?;
            }
            b'C' => {
                let ino = r.ino()?;
                let offset = r.u64()?;
                if offset > i64::MAX as u64 {
                    return Err(bad("offset out of range"));
                }
                let id = r.id()?;
                let (len, stored) = (r.u32()?, r.u32()?);
                tx.execute(
                    "INSERT INTO file_chunks (ino, offset, chunk, len, stored) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![ino, offset as i64, &id[..], len, stored],
                )
                .map_err(|e| bad(format!("chunk list: {e}")))?;
                tx.execute(
                    "INSERT INTO chunks (id, stored, refcount, confirmed) VALUES (?1, ?2, 1, 1)
                     ON CONFLICT(id) DO UPDATE SET refcount = refcount + 1",
                    params![&id[..], stored],
                )?;
            }
            b'E' => {
                let n = r.u64()?;
                if n != records {
                    return Err(bad(format!("{records} records, trailer says {n}")));
                }
                if !r.b.is_empty() {
                    return Err(bad("bytes after the end"));
                }
                break;
            }
            _ => return Err(bad(format!("unknown record tag {tag:#04x}"))),
        }
        records += 1;
        if records % 10_000 == 0 {
            progress(records);
        }
    }
    if !root_seen {
        return Err(bad("no root directory"));
    }
    // Every restored file holds an uploaded version: mark it committed (stage 1), so that
    // a later pending version never hides it from the next snapshot.
    tx.execute("UPDATE inodes SET committed_stage = 1 WHERE kind = 1", [])?;
    tx.commit()?;
    progress(records);
    Ok(records)
}

// ---- root record ---------------------------------------------------------------------

/// One snapshot chunk as listed in the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapChunk {
    /// Chunk id.
    pub id: ChunkId,
    /// Stored (sealed) size.
    pub stored: u32,
    /// Plaintext piece length (without the piece magic).
    pub len: u32,
}

/// A root record: which chunks hold snapshot `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    /// Snapshot version (strictly increasing).
    pub version: u64,
    /// Seconds since the epoch.
    pub created: i64,
    /// Bytes of the serialized snapshot.
    pub total_len: u64,
    /// Its chunks, in order.
    pub chunks: Vec<SnapChunk>,
}

impl Root {
    /// The plaintext encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + 40 * self.chunks.len());
        out.extend_from_slice(ROOT_MAGIC);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.created.to_be_bytes());
        out.extend_from_slice(&self.total_len.to_be_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_be_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.id.0);
            out.extend_from_slice(&c.stored.to_be_bytes());
            out.extend_from_slice(&c.len.to_be_bytes());
        }
        out
    }

    /// Parse the plaintext encoding (bounded).
    pub fn decode(b: &[u8]) -> Result<Root, SnapshotError> {
        let mut r = Reader { b };
        if r.take(8)? != ROOT_MAGIC {
            return Err(bad("not a root record"));
        }
        let version = r.u64()?;
        let created = r.i64()?;
        let total_len = r.u64()?;
        let n = r.u32()? as usize;
        if n > MAX_ROOT_CHUNKS {
            return Err(bad("too many chunks in the root"));
        }
        let mut chunks = Vec::with_capacity(n);
        let mut sum = 0u64;
        for _ in 0..n {
            let id = ChunkId(r.id()?);
            let (stored, len) = (r.u32()?, r.u32()?);
            sum += len as u64;
            chunks.push(SnapChunk { id, stored, len });
        }
        if !r.b.is_empty() {
            return Err(bad("bytes after the root record"));
        }
        if sum != total_len {
            return Err(bad("root chunk lengths do not add up"));
        }
        Ok(Root {
            version,
            created,
            total_len,
            chunks,
        })
    }

    /// Seal under the data key.
    pub fn seal(&self, sealer: &ChunkSealer) -> Vec<u8> {
        sealer.seal(&self.encode()).stored
    }

    /// Open a sealed root; another data key gives [`SnapshotError::WrongKey`].
    pub fn open(sealer: &ChunkSealer, sealed: &[u8]) -> Result<Root, SnapshotError> {
        let plain = sealer
            .open(ChunkId::of(sealed), sealed)
            .map_err(|_| SnapshotError::WrongKey)?;
        Root::decode(&plain)
    }
}

/// Cut a serialized snapshot into sealed chunks; returns the chunks and the root list.
pub fn seal_snapshot(
    sealer: &ChunkSealer,
    data: &[u8],
) -> (Vec<(ChunkId, Vec<u8>)>, Vec<SnapChunk>) {
    let mut out = Vec::new();
    let mut list = Vec::new();
    let _ = chunker::for_each_chunk(data, |_, piece: Vec<u8>| -> Result<(), std::io::Error> {
        let mut plain = Vec::with_capacity(8 + piece.len());
        plain.extend_from_slice(PIECE_MAGIC);
        plain.extend_from_slice(&piece);
        let s = sealer.seal(&plain);
        list.push(SnapChunk {
            id: s.id,
            stored: s.stored.len() as u32,
            len: piece.len() as u32,
        });
        out.push((s.id, s.stored));
        Ok(())
    });
    (out, list)
}

/// Fetch, verify and open the chunks a root lists, and concatenate them.
pub fn fetch_snapshot(
    sealer: &ChunkSealer,
    backend: &dyn ChunkBackend,
    root: &Root,
) -> Result<Vec<u8>, SnapshotError> {
    let mut data = Vec::with_capacity(root.total_len.min(1 << 30) as usize);
    for c in &root.chunks {
        let stored = backend.get(c.id, c.stored)?;
        let plain = sealer.open(c.id, &stored).map_err(|e| bad(e.to_string()))?;
        if plain.len() != 8 + c.len as usize || &plain[..8] != PIECE_MAGIC {
            return Err(bad(format!("snapshot chunk {} has the wrong form", c.id)));
        }
        data.extend_from_slice(&plain[8..]);
    }
    Ok(data)
}

/// The first 8 bytes of BLAKE3 of a serialized snapshot (kept in `meta` to skip storing
/// an unchanged snapshot again).
pub(crate) fn short_digest(data: &[u8]) -> i64 {
    i64::from_be_bytes(blake3::hash(data).as_bytes()[..8].try_into().expect("8"))
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

// ---- taking and restoring ------------------------------------------------------------

/// The drive's snapshot bookkeeping (kept by the uploader thread).
#[derive(Debug, Default)]
pub(crate) struct SnapState {
    /// `total_changes()` of the index connection when the last snapshot was read.
    pub(crate) changes: Option<u64>,
    /// When the last attempt was made.
    pub(crate) last: Option<std::time::Instant>,
}

/// Take a snapshot if the index changed since the last one. Returns the version stored,
/// if any.
pub(crate) fn take(sh: &Shared, snap: &mut SnapState) -> Result<Option<u64>, SnapshotError> {
    let Some(roots) = sh.opts.roots.clone() else {
        return Ok(None);
    };
    snap.last = Some(std::time::Instant::now());
    let (data, changes, last_version, last_digest) = {
        let st = sh.lock();
        let changes = st.db.total_changes();
        if snap.changes == Some(changes) {
            return Ok(None);
        }
        let data = serialize(&st.db)?;
        let v = index::get_meta(&st.db, "snapshot_version")?.unwrap_or(0);
        let d = index::get_meta(&st.db, "snapshot_digest")?;
        (data, changes, v as u64, d)
    };
    let digest = short_digest(&data);
    if last_digest == Some(digest) {
        snap.changes = Some(changes);
        return Ok(None);
    }
    let (chunks, list) = seal_snapshot(&sh.sealer, &data);
    if list.len() > MAX_ROOT_CHUNKS {
        return Err(bad("the index is too large for one root record"));
    }
    for batch in chunks.chunks(16) {
        sh.backend.put(batch)?;
    }
    let mut version = last_version.max(now_secs().max(0) as u64 * 1000) + 1;
    let mut stale = 0;
    loop {
        let root = Root {
            version,
            created: now_secs(),
            total_len: data.len() as u64,
            chunks: list.clone(),
        };
        match roots.put_root(version, &root.seal(&sh.sealer)) {
            Ok(()) => break,
            Err(RootError::Stale) if stale < 3 => {
                stale += 1;
                let latest = roots.get_root()?.map_or(0, |(v, _)| v);
                version = version.max(latest) + 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    {
        let st = sh.lock();
        let before = st.db.total_changes();
        index::set_meta(&st.db, "snapshot_version", version as i64)?;
        index::set_meta(&st.db, "snapshot_digest", digest)?;
        // Our own writes are not changes worth a snapshot; others since the read are.
        snap.changes = Some(if before == changes {
            st.db.total_changes()
        } else {
            changes
        });
    }
    tracing::info!(
        "snapshot {version} stored ({} bytes in {} chunks)",
        data.len(),
        list.len()
    );
    Ok(Some(version))
}

/// Rebuild a drive's index from the latest snapshot, when `state_dir` has no index yet.
/// Returns the restored version, or `None` when there is nothing to restore (an index
/// exists, or the server keeps no root: a new user). `progress` gets human lines.
pub fn restore_if_empty(
    state_dir: &Path,
    key: &crate::keys::DataKey,
    backend: &dyn ChunkBackend,
    roots: &dyn RootStore,
    mut progress: impl FnMut(&str),
) -> Result<Option<u64>, SnapshotError> {
    let path = state_dir.join("index.sqlite");
    if path.exists() {
        return Ok(None);
    }
    let Some((version, sealed)) = roots.get_root()? else {
        return Ok(None);
    };
    let sealer = ChunkSealer::new(key);
    let root = Root::open(&sealer, &sealed)?;
    if root.version != version {
        return Err(bad("the root record's version differs from the server's"));
    }
    progress(&format!(
        "restoring snapshot {version} ({} bytes in {} chunks)",
        root.total_len,
        root.chunks.len()
    ));
    let data = fetch_snapshot(&sealer, backend, &root)?;
    std::fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join("index.sqlite.restore");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", tmp.display()));
    }
    let n = {
        let c = index::open(&tmp, 0, 0)?;
        let n = load(&c, &data, |n| progress(&format!("restored {n} entries")))?;
        index::set_meta(&c, "snapshot_version", version as i64)?;
        index::set_meta(&c, "snapshot_digest", short_digest(&data))?;
        c.pragma_update(None, "journal_mode", "DELETE")?;
        n
    };
    std::fs::rename(&tmp, &path)?;
    progress(&format!("restored {n} entries from snapshot {version}"));
    Ok(Some(version))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::DataKey;

    #[test]
    fn root_round_trip_and_wrong_key() {
        let k = DataKey::generate().unwrap();
        let s = ChunkSealer::new(&k);
        let (chunks, list) = seal_snapshot(&s, b"PSSNAP01hello");
        assert_eq!(chunks.len(), 1);
        let root = Root {
            version: 7,
            created: 1,
            total_len: 13,
            chunks: list,
        };
        let sealed = root.seal(&s);
        assert_eq!(Root::open(&s, &sealed).unwrap(), root);
        let other = ChunkSealer::new(&DataKey::generate().unwrap());
        assert!(matches!(
            Root::open(&other, &sealed),
            Err(SnapshotError::WrongKey)
        ));
        let enc = root.encode();
        for n in 0..enc.len() {
            assert!(Root::decode(&enc[..n]).is_err());
        }
    }

    #[test]
    fn index_round_trip_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let a = index::open(&dir.path().join("a.sqlite"), 1, 2).unwrap();
        a.execute_batch(
            "INSERT INTO inodes (ino, kind, perm, uid, gid, size, atime_s, atime_ns, mtime_s, mtime_ns, ctime_s, ctime_ns, nlink, parent, committed_stage)
               VALUES (2, 1, 420, 1, 2, 5, 1, 2, 3, 4, 5, 6, 2, 0, 3);
             INSERT INTO inodes (ino, kind, perm, uid, gid, atime_s, atime_ns, mtime_s, mtime_ns, ctime_s, ctime_ns, nlink, parent, target)
               VALUES (3, 3, 511, 1, 2, 1, 2, 3, 4, 5, 6, 1, 0, X'6162');
             INSERT INTO inodes (ino, kind, perm, uid, gid, size, atime_s, atime_ns, mtime_s, mtime_ns, ctime_s, ctime_ns, nlink, parent, stage)
               VALUES (4, 1, 420, 1, 2, 9, 1, 2, 3, 4, 5, 6, 1, 0, 8);
             INSERT INTO dentries VALUES (1, X'61', 2), (1, X'62', 2), (1, X'63', 3), (1, X'64', 4);
             INSERT INTO xattrs VALUES (2, X'757365722E78', X'01');
             INSERT INTO file_chunks VALUES (2, 0, zeroblob(32), 5, 33);
             INSERT INTO chunks VALUES (zeroblob(32), 33, 1, 1);",
        )
        .unwrap();
        let data = serialize(&a).unwrap();
        let c = index::open(Path::new(":memory:"), 0, 0).unwrap();
        for n in 0..data.len() {
            assert!(load(&c, &data[..n], |_| {}).is_err(), "truncated at {n}");
        }
        let mut extra = data.clone();
        extra.push(0);
        assert!(load(&c, &extra, |_| {}).is_err(), "bytes after the end");
        let b = index::open(&dir.path().join("b.sqlite"), 0, 0).unwrap();
        load(&b, &data, |_| {}).unwrap();
        assert_eq!(serialize(&b).unwrap(), data);
        assert_eq!(index::lookup(&b, 1, b"d").unwrap(), None, "never uploaded");
        assert_eq!(index::lookup(&b, 1, b"b").unwrap(), Some(2));
        assert_eq!(index::symlink_target(&b, 3).unwrap().unwrap(), b"ab");
        assert_eq!(index::chunks_of(&b, 2).unwrap().len(), 1);
    }
}
