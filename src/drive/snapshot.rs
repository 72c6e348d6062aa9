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
//!   'P' ino u64, offset u64, chunk id 32 bytes, len u32, stored u32, at u32
//!       (a piece of a pack: `len` bytes at `at` in the chunk's plaintext)
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
//! # Retention
//!
//! Earlier snapshots stay restorable for `snapshot_keep` (a drive option, 30 days by
//! default), thinned by [`expired`]: the latest always, every snapshot of the last hour,
//! one per hour for the last day, one per day after that. The drive lists the snapshots it
//! retains in the index's `snapshots` table, and for every chunk the range of snapshot
//! versions that named it (`chunks.first_snap..=last_snap`; snapshot chunks are tracked
//! there too, with refcount 0). A chunk is released only when no file references it and
//! no retained snapshot lies in its range. An expired snapshot is first dropped on the
//! server (its root goes), then locally, so its chunks become releasable; a snapshot the
//! server stopped keeping (its `keep_snapshots` cap) is dropped locally too. An index
//! rebuilt after a reinstall retains the server's earlier snapshots too, but does not know
//! their chunks: it releases nothing until they have expired (`meta.snapshot_base`).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection};

use super::backend::{get_in_order, BackendError, ChunkBackend};
use super::chunker;
use super::crypto::{ChunkSealer, SEAL_OVERHEAD};
use super::index::{self, Meta, ROOT_INO};
use super::model::Shared;
use crate::ids::ChunkId;

const SNAP_MAGIC: &[u8; 8] = b"PSSNAP01";
const ROOT_MAGIC: &[u8; 8] = b"PSROOT01";
const PIECE_MAGIC: &[u8; 8] = b"PSCHUNK1";
/// Stored bytes of snapshot chunks fetched at once when loading one.
const FETCH_WINDOW: u64 = 32 << 20;
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
    /// Returns the versions the store keeps now, newest first.
    fn put_root(&self, version: u64, sealed: &[u8]) -> Result<Vec<u64>, RootError>;
    /// The latest root: `(version, sealed)`, `None` if none was ever stored.
    fn get_root(&self) -> Result<Option<(u64, Vec<u8>)>, RootError>;
    /// Forget earlier roots (never the latest); returns the versions kept, newest first.
    fn drop_roots(&self, versions: &[u64]) -> Result<Vec<u64>, RootError>;
    /// Every kept version with when it was stored (seconds since the epoch), newest first.
    fn kept_roots(&self) -> Result<Vec<(u64, i64)>, RootError>;
}

// ---- retention -----------------------------------------------------------------------

/// Default time earlier snapshots are kept (`snapshot_keep`).
pub const DEFAULT_KEEP: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

/// The retention policy: which of the retained snapshots `(version, created seconds)`
/// to drop at `now`, when earlier snapshots are kept for `keep_secs`. The latest is always
/// kept; of the others, those older than `keep_secs` go; all of the last hour stay; older
/// than an hour, the newest of each clock hour stays; older than a day, the newest of each
/// (UTC) day. At most `3600 / interval + 26 + keep_days` snapshots remain.
pub fn expired(snaps: &[(u64, i64)], now: i64, keep_secs: i64) -> Vec<u64> {
    let mut newest_first: Vec<(u64, i64)> = snaps.to_vec();
    newest_first.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, &(version, created)) in newest_first.iter().enumerate() {
        let age = now.saturating_sub(created).max(0);
        let bucket = if age < DAY {
            (HOUR, created.div_euclid(HOUR))
        } else {
            (DAY, created.div_euclid(DAY))
        };
        let first_of_bucket = seen.insert(bucket);
        let keep = i == 0 || (age < keep_secs && (age < HOUR || first_of_bucket));
        if !keep {
            out.push(version);
        }
    }
    out.sort_unstable();
    out
}

/// Parse a retention time: a number of seconds, or with a suffix `s`, `m`, `h` or `d`
/// (e.g. `30d`, `12h`).
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_lowercase()),
        _ => (s, 's'),
    };
    let n: u64 = num.trim().parse().ok()?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return None,
    };
    Some(std::time::Duration::from_secs(n.checked_mul(mult)?))
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

/// Serialize the durable part of the index, in one read transaction: the caller's, if one
/// is open on `c` (the drive pins it under its lock), else its own.
pub fn serialize(c: &Connection) -> rusqlite::Result<Vec<u8>> {
    let own = if c.is_autocommit() {
        Some(c.unchecked_transaction()?)
    } else {
        None
    };
    let mut out = Vec::with_capacity(1 << 16);
    out.extend_from_slice(SNAP_MAGIC);
    let mut records = 0u64;
    // Inodes in: everything linked, except files never uploaded (pending first version).
    const KEEP: &str = "nlink > 0 AND (kind <> 1 OR committed_stage > 0 OR stage IS NULL)";
    {
        let mut st = c.prepare(&format!(
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
        let mut st = c.prepare(&format!(
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
        let mut st = c.prepare(&format!(
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
        let mut st = c.prepare(&format!(
            "SELECT ino, offset, chunk, len, stored, at FROM file_chunks
             WHERE ino IN (SELECT ino FROM inodes WHERE {KEEP}) ORDER BY ino, offset"
        ))?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let id: Vec<u8> = r.get(2)?;
            if id.len() != 32 {
                continue;
            }
            let at = r.get::<_, i64>(5)? as u32;
            // 'C': a chunk of the file's own; 'P': a piece of a pack (one more field).
            out.push(if at == 0 { b'C' } else { b'P' });
            out.extend_from_slice(&(r.get::<_, i64>(0)? as u64).to_be_bytes());
            out.extend_from_slice(&(r.get::<_, i64>(1)? as u64).to_be_bytes());
            out.extend_from_slice(&id);
            out.extend_from_slice(&(r.get::<_, i64>(3)? as u32).to_be_bytes());
            out.extend_from_slice(&(r.get::<_, i64>(4)? as u32).to_be_bytes());
            if at != 0 {
                out.extend_from_slice(&at.to_be_bytes());
            }
            records += 1;
        }
    }
    out.push(b'E');
    out.extend_from_slice(&records.to_be_bytes());
    drop(own); // read only: rolls back
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
    let tx = index::write_tx(c)?;
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
            kind @ (b'C' | b'P') => {
                let ino = r.ino()?;
                let offset = r.u64()?;
                if offset > i64::MAX as u64 {
                    return Err(bad("offset out of range"));
                }
                let id = r.id()?;
                let (len, stored) = (r.u32()?, r.u32()?);
                let at = if kind == b'P' { r.u32()? } else { 0 };
                if u64::from(at) + u64::from(len) + SEAL_OVERHEAD as u64 > u64::from(stored) {
                    return Err(bad("a piece past the end of its chunk"));
                }
                tx.execute(
                    "INSERT INTO file_chunks (ino, offset, chunk, len, stored, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![ino, offset as i64, &id[..], len, stored, at],
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
    let wants: Vec<(ChunkId, u32)> = root.chunks.iter().map(|c| (c.id, c.stored)).collect();
    get_in_order(backend, &wants, FETCH_WINDOW, |i, stored| {
        let c = &root.chunks[i];
        if stored.id() != c.id {
            return Err(bad(format!("snapshot chunk {} came back as another", c.id)));
        }
        let plain = sealer
            .open_verified(stored)
            .map_err(|e| bad(e.to_string()))?;
        if plain.len() != 8 + c.len as usize || &plain[..8] != PIECE_MAGIC {
            return Err(bad(format!("snapshot chunk {} has the wrong form", c.id)));
        }
        data.extend_from_slice(&plain[8..]);
        Ok(())
    })?;
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
    /// Sealed bytes of the last snapshot stored: the room kept free for the next one.
    pub(crate) stored_bytes: u64,
}

/// Quota kept free so that the snapshot recording a delete can always be stored (twice
/// the last snapshot, at least 256 KiB): file uploads and writes stop short of it.
pub(crate) fn reserve(snap: &SnapState) -> u64 {
    (2 * snap.stored_bytes).max(256 << 10)
}

/// Take a snapshot if the index changed since the last one. Returns the version stored,
/// if any.
pub(crate) fn take(sh: &Shared, snap: &mut SnapState) -> Result<Option<u64>, SnapshotError> {
    let Some(roots) = sh.opts.roots.clone() else {
        return Ok(None);
    };
    snap.last = Some(std::time::Instant::now());
    let (data, mut named, changes, last_version, last_digest) = {
        let st = sh.lock();
        let changes = st.db.total_changes();
        if snap.changes == Some(changes) {
            return Ok(None);
        }
        // Every write to the index happens under the model's lock: a read transaction
        // pinned now (its first read) holds exactly the commits `changes` counts. Then the
        // index is read without the lock, so FUSE requests go on meanwhile.
        let reader = sh.reader.lock().unwrap_or_else(|e| e.into_inner());
        let tx = reader.unchecked_transaction()?;
        let v = index::get_meta(&tx, Meta::SnapshotVersion)?.unwrap_or(0);
        let d = index::get_meta(&tx, Meta::SnapshotDigest)?;
        drop(st);
        // In one read transaction: the chunks marked below are exactly those the data names.
        let data = serialize(&tx)?;
        let named = index::named_chunks(&tx)?;
        drop(tx);
        (data, named, changes, v as u64, d)
    };
    let digest = short_digest(&data);
    if last_digest == Some(digest) {
        snap.changes = Some(changes);
        return Ok(None);
    }
    let (chunks, list) = seal_snapshot(sh.chunks.sealer(), &data);
    if list.len() > MAX_ROOT_CHUNKS {
        return Err(bad("the index is too large for one root record"));
    }
    // Pieces an earlier snapshot stored are still there (only this thread releases);
    // new ones are noted first, so a crash before the root is stored leaves them to be
    // released rather than leaked.
    let fresh: Vec<(ChunkId, Vec<u8>)> = {
        let st = sh.lock();
        let mut fresh = Vec::new();
        for (id, b) in chunks {
            if !index::chunk_stored(&st.db, &id)? {
                fresh.push((id, b));
            }
        }
        let intent: Vec<(ChunkId, u32)> =
            fresh.iter().map(|(id, b)| (*id, b.len() as u32)).collect();
        index::note_intent(&st.db, &intent)?;
        fresh
    };
    for batch in fresh.chunks(16) {
        sh.chunks.backend().put(batch)?;
    }
    snap.stored_bytes = list.iter().map(|c| c.stored as u64).sum();
    named.extend(list.iter().map(|c| (c.id, c.stored)));
    let mut version = last_version.max(now_secs().max(0) as u64 * 1000) + 1;
    let mut stale = 0;
    let created = now_secs();
    let kept = loop {
        let root = Root {
            version,
            created,
            total_len: data.len() as u64,
            chunks: list.clone(),
        };
        match roots.put_root(version, &root.seal(sh.chunks.sealer())) {
            Ok(kept) => break kept,
            Err(RootError::Stale) if stale < 3 => {
                stale += 1;
                let latest = roots.get_root()?.map_or(0, |(v, _)| v);
                version = version.max(latest) + 1;
            }
            Err(e) => return Err(e.into()),
        }
    };
    {
        let st = sh.lock();
        let before = st.db.total_changes();
        index::mark_named(&st.db, version, &named)?;
        index::retain_snapshot(&st.db, version, created)?;
        // Snapshots the server no longer keeps (its cap) cannot be restored: let them go.
        let pruned: Vec<u64> = index::retained_snapshots(&st.db)?
            .into_iter()
            .map(|(v, _)| v)
            .filter(|v| *v != version && !kept.contains(v))
            .collect();
        if !pruned.is_empty() {
            tracing::info!("the server no longer keeps snapshots {pruned:?}: dropped");
            index::forget_snapshots(&st.db, &pruned)?;
        }
        index::set_meta(&st.db, Meta::SnapshotVersion, version as i64)?;
        index::set_meta(&st.db, Meta::SnapshotDigest, digest)?;
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

/// Drop the retained snapshots the policy expires (on the server first, then locally, so
/// their chunks become releasable). Returns the versions dropped.
pub(crate) fn expire(sh: &Shared, snap: &mut SnapState) -> Result<Vec<u64>, SnapshotError> {
    let Some(roots) = sh.opts.roots.clone() else {
        return Ok(Vec::new());
    };
    let retained = index::retained_snapshots(&sh.lock().db)?;
    let keep = sh.opts.snapshot_keep.as_secs().min(i64::MAX as u64) as i64;
    let gone = expired(&retained, now_secs(), keep);
    if gone.is_empty() {
        return Ok(gone);
    }
    drop_retained(sh, &*roots, snap, &gone, |_| Ok(()))?;
    tracing::info!("expired snapshots {gone:?}");
    Ok(gone)
}

/// Stop retaining `versions`: drop them on the server first (the drive never forgets a
/// snapshot the server still offers for restore), then locally, with `also` in the same
/// locked section, so the chunks only they name become releasable. Not a change of the
/// drive's content: the latest snapshot stays current.
fn drop_retained(
    sh: &Shared,
    roots: &dyn RootStore,
    snap: &mut SnapState,
    versions: &[u64],
    also: impl FnOnce(&Connection) -> rusqlite::Result<()>,
) -> Result<(), SnapshotError> {
    let kept = roots.drop_roots(versions)?;
    if let Some(v) = versions.iter().find(|v| kept.contains(v)) {
        return Err(RootError::Unavailable(format!("the server still keeps snapshot {v}")).into());
    }
    let st = sh.lock();
    let before = st.db.total_changes();
    index::forget_snapshots(&st.db, versions)?;
    also(&st.db)?;
    if snap.changes == Some(before) {
        snap.changes = Some(st.db.total_changes());
    }
    Ok(())
}

/// Under quota pressure: drop the oldest retained snapshot other than the latest (on the
/// server first), so the chunks only it names become releasable. Logged as a warning and
/// counted in `meta.snapshots_thinned` for `peerstash status`. Returns the version dropped.
pub(crate) fn thin_oldest(sh: &Shared, snap: &mut SnapState) -> Result<Option<u64>, SnapshotError> {
    let Some(roots) = sh.opts.roots.clone() else {
        return Ok(None);
    };
    let retained = index::retained_snapshots(&sh.lock().db)?;
    if retained.len() < 2 {
        return Ok(None);
    }
    let (oldest, created) = retained[0];
    drop_retained(sh, &*roots, snap, &[oldest], |db| {
        let n = index::get_meta(db, Meta::SnapshotsThinned)?.unwrap_or(0);
        index::set_meta(db, Meta::SnapshotsThinned, n + 1)?;
        index::set_meta(db, Meta::SnapshotThinnedAt, now_secs())
    })?;
    tracing::warn!(
        "quota nearly full: dropped snapshot {oldest} (taken {}s ago) early to give its space back",
        now_secs() - created
    );
    Ok(Some(oldest))
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
        // The restored snapshot is the one retained: it names its chunks and its pieces.
        let mut named = index::named_chunks(&c)?;
        named.extend(root.chunks.iter().map(|ch| (ch.id, ch.stored)));
        index::mark_named(&c, version, &named)?;
        index::retain_snapshot(&c, version, root.created)?;
        // Earlier snapshots stay restorable under the same policy; this index does not know
        // their chunks, so none is released until they have expired.
        let earlier: Vec<(u64, i64)> = roots
            .kept_roots()?
            .into_iter()
            .filter(|(v, _)| *v < version)
            .collect();
        if !earlier.is_empty() {
            for (v, created) in &earlier {
                index::retain_snapshot(&c, *v, *created)?;
            }
            index::set_meta(&c, Meta::SnapshotBase, version as i64)?;
        }
        index::set_meta(&c, Meta::SnapshotVersion, version as i64)?;
        index::set_meta(&c, Meta::SnapshotDigest, short_digest(&data))?;
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

    const NOW: i64 = 1_700_000_000 - 1_700_000_000 % DAY + 12 * HOUR; // noon UTC

    fn at(ages: &[i64]) -> Vec<(u64, i64)> {
        // Version = position (older ages first get lower versions).
        let mut v: Vec<i64> = ages.to_vec();
        v.sort_unstable_by_key(|a| std::cmp::Reverse(*a));
        v.iter()
            .enumerate()
            .map(|(i, age)| (i as u64 + 1, NOW - age))
            .collect()
    }

    fn kept(snaps: &[(u64, i64)], keep: i64) -> Vec<i64> {
        let gone = expired(snaps, NOW, keep);
        snaps
            .iter()
            .filter(|(v, _)| !gone.contains(v))
            .map(|(_, c)| NOW - c)
            .collect()
    }

    #[test]
    fn policy_keeps_the_last_hour_then_hourly_then_daily() {
        let keep = 30 * DAY;
        // Every 30 s over the last hour: all stay.
        let recent: Vec<i64> = (0..120).map(|i| i * 30).collect();
        assert!(expired(&at(&recent), NOW, keep).is_empty());
        // Every 10 minutes over 2 hours: the first hour all, then one per clock hour
        // (the newest of each).
        let two_hours: Vec<i64> = (0..12).map(|i| i * 600).collect();
        let k = kept(&at(&two_hours), keep);
        assert_eq!(k.len(), 6 + 1, "{k:?}");
        // Every 30 minutes over 3 days: hours within the day, days beyond.
        let days: Vec<i64> = (0..144).map(|i| i * 1800).collect();
        let k = kept(&at(&days), keep);
        let (hour_tier, day_tier): (Vec<i64>, Vec<i64>) =
            k.iter().filter(|a| **a >= HOUR).partition(|a| **a < DAY);
        assert!(hour_tier.len() <= 24, "{hour_tier:?}");
        assert!(day_tier.len() <= 3, "{day_tier:?}");
        let mut hours: Vec<i64> = hour_tier
            .iter()
            .map(|a| (NOW - a).div_euclid(HOUR))
            .collect();
        hours.dedup();
        assert_eq!(hours.len(), hour_tier.len(), "one per clock hour");
        // Older than snapshot_keep: gone.
        let old: Vec<i64> = vec![0, 40 * DAY, 31 * DAY, 29 * DAY];
        assert_eq!(kept(&at(&old), keep), vec![29 * DAY, 0]);
    }

    #[test]
    fn policy_never_drops_the_latest_and_is_stable() {
        // A drive idle for longer than snapshot_keep keeps its one latest snapshot.
        let lone = at(&[90 * DAY]);
        assert!(expired(&lone, NOW, 30 * DAY).is_empty());
        let two = at(&[90 * DAY, 91 * DAY]);
        assert_eq!(expired(&two, NOW, 30 * DAY), vec![1]);
        // keep 0: only the latest stays.
        let some = at(&[0, 10, 20]);
        assert_eq!(expired(&some, NOW, 0), vec![1, 2]);
        // Applying the policy to what it kept drops nothing more.
        let many: Vec<i64> = (0..500).map(|i| i * 997).collect();
        let snaps = at(&many);
        let gone = expired(&snaps, NOW, 30 * DAY);
        let rest: Vec<(u64, i64)> = snaps
            .into_iter()
            .filter(|(v, _)| !gone.contains(v))
            .collect();
        assert!(expired(&rest, NOW, 30 * DAY).is_empty());
        // The bound documented for the server's cap: 3600/30 + 26 + 30 for the defaults.
        let every_30s: Vec<i64> = (0..(40 * DAY / 30)).map(|i| i * 30).collect();
        let k = kept(&at(&every_30s), 30 * DAY);
        assert!(k.len() <= 120 + 26 + 30, "{}", k.len());
    }

    #[test]
    fn durations_parse() {
        use std::time::Duration;
        assert_eq!(
            parse_duration("30d"),
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(parse_duration("12h"), Some(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        for bad in ["", "d", "3w", "-1d", "1.5d", "x"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn chunks_of_retained_snapshots_stay_and_of_dropped_ones_go() {
        let c = index::open(Path::new(":memory:"), 0, 0).unwrap();
        let id = |b: u8| ChunkId([b; 32]);
        // Chunk 1 named by snapshots 10 and 20, chunk 2 by 20 and 30, chunk 3 by none
        // (refcount 0), chunk 4 referenced by a file (refcount 1).
        index::note_intent(&c, &[(id(3), 9)]).unwrap();
        index::mark_named(&c, 10, &[(id(1), 9)]).unwrap();
        index::mark_named(&c, 20, &[(id(1), 9), (id(2), 9)]).unwrap();
        index::mark_named(&c, 30, &[(id(2), 9)]).unwrap();
        c.execute(
            "INSERT INTO chunks (id, stored, refcount, confirmed) VALUES (?1, 9, 1, 1)",
            [&id(4).0[..]],
        )
        .unwrap();
        for v in [10, 20, 30] {
            index::retain_snapshot(&c, v, v as i64).unwrap();
        }
        let free = |c: &Connection| {
            let mut f = index::free_chunks(c, 100).unwrap();
            f.sort();
            f
        };
        assert_eq!(free(&c), vec![id(3)]);
        index::forget_snapshots(&c, &[20]).unwrap();
        // 1's range 10..=20 still holds retained 10; 2's range 20..=30 holds 30.
        assert_eq!(free(&c), vec![id(3)]);
        index::forget_snapshots(&c, &[10]).unwrap();
        assert_eq!(free(&c), vec![id(1), id(3)]);
        index::forget_snapshots(&c, &[30]).unwrap();
        assert_eq!(free(&c), vec![id(1), id(2), id(3)]);
        // Restored from 30 while 25 (unknown chunks) is retained: nothing is released.
        index::set_meta(&c, Meta::SnapshotBase, 30).unwrap();
        index::retain_snapshot(&c, 25, 25).unwrap();
        assert!(free(&c).is_empty());
        index::retain_snapshot(&c, 30, 30).unwrap();
        index::forget_snapshots(&c, &[25]).unwrap();
        assert_eq!(free(&c), vec![id(1), id(3)], "2 is named by 30 again");
        index::forget_chunks(&c, &[id(1), id(2), id(3), id(4)]).unwrap();
        assert_eq!(free(&c), vec![], "only unretained chunks are forgotten");
        index::forget_snapshots(&c, &[30]).unwrap();
        index::forget_chunks(&c, &[id(2)]).unwrap();
        assert!(free(&c).is_empty());
        assert!(
            index::chunk_stored(&c, &id(4)).unwrap(),
            "a referenced chunk stays"
        );
    }

    #[test]
    fn an_old_index_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("old.sqlite");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(
                "CREATE TABLE chunks (id BLOB PRIMARY KEY, stored INTEGER NOT NULL,
                    refcount INTEGER NOT NULL, confirmed INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
                 CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 INSERT INTO meta VALUES ('schema', 1);
                 INSERT INTO chunks VALUES (zeroblob(32), 5, 0, 1);",
            )
            .unwrap();
        }
        let c = index::open(&p, 0, 0).unwrap();
        assert_eq!(index::get_meta(&c, Meta::Schema).unwrap(), Some(3));
        assert_eq!(index::free_chunks(&c, 10).unwrap(), vec![ChunkId([0; 32])]);
        index::mark_named(&c, 5, &[(ChunkId([0; 32]), 5)]).unwrap();
        index::retain_snapshot(&c, 5, 1).unwrap();
        assert!(index::free_chunks(&c, 10).unwrap().is_empty());
        drop(c);
        let c = index::open(&p, 0, 0).unwrap(); // idempotent
        let s = index::summary(&c).unwrap();
        assert_eq!(
            (s.snapshots_kept, s.held_chunks, s.releasable_chunks),
            (1, 0, 0)
        );
    }

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
             INSERT INTO inodes (ino, kind, perm, uid, gid, size, atime_s, atime_ns, mtime_s, mtime_ns, ctime_s, ctime_ns, nlink, parent, committed_stage)
               VALUES (5, 1, 420, 1, 2, 7, 1, 2, 3, 4, 5, 6, 1, 0, 9);
             INSERT INTO dentries VALUES (1, X'61', 2), (1, X'62', 2), (1, X'63', 3), (1, X'64', 4), (1, X'65', 5);
             INSERT INTO xattrs VALUES (2, X'757365722E78', X'01');
             INSERT INTO file_chunks VALUES (2, 0, zeroblob(32), 5, 33, 0);
             INSERT INTO file_chunks VALUES (5, 0, randomblob(32), 7, 60, 20);
             INSERT INTO chunks (id, stored, refcount, confirmed) VALUES (zeroblob(32), 33, 1, 1);
             INSERT INTO chunks (id, stored, refcount, confirmed) SELECT chunk, 60, 1, 1 FROM file_chunks WHERE ino = 5;",
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
        // A piece of a pack keeps where it starts.
        let piece = index::chunks_of(&b, 5).unwrap();
        assert_eq!((piece[0].at, piece[0].len, piece[0].stored), (20, 7, 60));
        assert!(piece[0].is_packed());
        // A piece past the end of its pack is refused.
        let mut bad = data.clone();
        let at = bad.len() - 9 - 4;
        bad[at..at + 4].copy_from_slice(&26u32.to_be_bytes());
        let c = index::open(Path::new(":memory:"), 0, 0).unwrap();
        assert!(load(&c, &bad, |_| {}).is_err(), "a piece past its pack");
    }
}
