//! The local index: one SQLite file (WAL) holding the whole namespace — inodes, directory
//! entries, symlink targets, xattrs — and, for every file, the chunk list of its last
//! uploaded version plus the chunk reference counts. Names and sizes live only here; the
//! backend sees chunk ids and ciphertext.
//!
//! Crash safety comes from one rule: a file's chunk list is replaced, and its old chunks
//! dereferenced, inside one transaction that runs only after the new chunks are stored.
//! Files closed but not yet uploaded are recorded in `inodes.stage` (the "pending uploads"),
//! pointing at an immutable staging file, or for a small file at its content kept right
//! here (`stage_data`), written in the transaction that records the close.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::crypto::SEAL_OVERHEAD;
use crate::ids::ChunkId;

/// How long a writer waits for another connection's lock (a `status` reader can hold the
/// write lock for a moment while it recovers the WAL index) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Begin a transaction that will write: it takes the write lock at once, waiting for it
/// (up to the busy timeout) if another connection holds it. A deferred transaction that
/// reads first would have to upgrade later, and SQLite fails such an upgrade with
/// SQLITE_BUSY immediately, without waiting — so every writer in the drive starts here.
pub fn write_tx(c: &Connection) -> rusqlite::Result<Transaction<'_>> {
    Transaction::new_unchecked(c, TransactionBehavior::Immediate)
}

/// Inode number of the root directory.
pub const ROOT_INO: u64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS inodes (
    ino INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    perm INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    atime_s INTEGER NOT NULL, atime_ns INTEGER NOT NULL,
    mtime_s INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_s INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    rdev INTEGER NOT NULL DEFAULT 0,
    parent INTEGER NOT NULL DEFAULT 0,     -- directories only: their one parent
    target BLOB,                           -- symlinks only
    stage INTEGER,                         -- closed content waiting for upload
    committed_stage INTEGER NOT NULL DEFAULT 0  -- stage whose content file_chunks holds
);
CREATE INDEX IF NOT EXISTS inodes_pending ON inodes(stage) WHERE stage IS NOT NULL;
CREATE TABLE IF NOT EXISTS dentries (
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    ino INTEGER NOT NULL,
    PRIMARY KEY (parent, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dentries_ino ON dentries(ino);
CREATE TABLE IF NOT EXISTS xattrs (
    ino INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ino, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS file_chunks (
    ino INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    chunk BLOB NOT NULL,
    len INTEGER NOT NULL,
    stored INTEGER NOT NULL,
    at INTEGER NOT NULL DEFAULT 0,  -- where the piece starts in the chunk's plaintext (packs)
    PRIMARY KEY (ino, offset)
) WITHOUT ROWID;
-- Pieces of packs (a chunk holding several small files): which files a pack still serves.
CREATE INDEX IF NOT EXISTS file_chunks_packed ON file_chunks(chunk) WHERE len + 28 < stored;
CREATE TABLE IF NOT EXISTS chunks (
    id BLOB PRIMARY KEY,
    stored INTEGER NOT NULL,
    refcount INTEGER NOT NULL,  -- 0: referenced by no file: release when idle
    confirmed INTEGER NOT NULL DEFAULT 0,  -- 1: the backend confirmed it stored
    first_snap INTEGER,         -- oldest snapshot version naming it (NULL: none)
    last_snap INTEGER           -- newest snapshot version naming it (NULL: none)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_free ON chunks(refcount) WHERE refcount = 0;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS stage_data (
    stage INTEGER PRIMARY KEY,    -- a closed small file's content, in place of a staging file
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    version INTEGER PRIMARY KEY,  -- a snapshot the drive retains (its root is on the server)
    created INTEGER NOT NULL      -- seconds since the epoch
);
";

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Regular file.
    File = 1,
    /// Directory.
    Dir = 2,
    /// Symbolic link.
    Symlink = 3,
    /// Named pipe.
    Fifo = 4,
    /// Unix socket.
    Socket = 5,
    /// Character device.
    CharDev = 6,
    /// Block device.
    BlockDev = 7,
}

impl Kind {
    fn from_i64(v: i64) -> Kind {
        match v {
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::Socket,
            6 => Kind::CharDev,
            7 => Kind::BlockDev,
            _ => Kind::File,
        }
    }

    /// The `S_IFMT` bits for this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
        }
    }

    /// The kind encoded in a full `st_mode`, if supported.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return None,
        })
    }
}

/// A timestamp with nanoseconds; seconds may be negative (before 1970).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ts {
    /// Seconds since the epoch.
    pub sec: i64,
    /// Nanoseconds, `0..1e9`.
    pub nsec: u32,
}

impl Ts {
    /// The current time.
    pub fn now() -> Ts {
        SystemTime::now().into()
    }
}

impl From<SystemTime> for Ts {
    fn from(t: SystemTime) -> Ts {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Ts {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Ts { sec, nsec }
            }
        }
    }
}

impl From<Ts> for SystemTime {
    fn from(t: Ts) -> SystemTime {
        if t.sec >= 0 {
            UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs())
                + Duration::from_nanos(t.nsec as u64)
        }
    }
}

/// An inode's attributes as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// File type.
    pub kind: Kind,
    /// Permission bits (`mode & 0o7777`).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes (for files: of the latest closed version).
    pub size: u64,
    /// Last access.
    pub atime: Ts,
    /// Last modification of the content.
    pub mtime: Ts,
    /// Last change of the inode.
    pub ctime: Ts,
    /// Hard links (directories: 2 + subdirectories).
    pub nlink: u32,
    /// Device number for device nodes.
    pub rdev: u32,
    /// Parent directory (directories only).
    pub parent: u64,
    /// Staging file holding closed content not yet uploaded.
    pub stage: Option<u64>,
    /// Stage id whose content the committed chunk list holds.
    pub committed_stage: u64,
}

// The schema's `len + 28 < stored` (a piece of a pack) spells out the seal's overhead.
const _: () = assert!(SEAL_OVERHEAD == 28);

/// One piece of a file version: `len` bytes at `at` in the plaintext of chunk `id`. A
/// chunk of its own is one whole piece (`at` 0, `len` its plaintext); a pack (several
/// small files sealed as one chunk) has one piece per file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// Offset of the piece's first byte in the file.
    pub offset: u64,
    /// Chunk id.
    pub id: ChunkId,
    /// Length of the piece.
    pub len: u32,
    /// Stored (sealed) size of the whole chunk.
    pub stored: u32,
    /// Offset of the piece in the chunk's plaintext.
    pub at: u32,
}

impl ChunkRef {
    /// The chunk's whole plaintext length.
    pub fn plain_len(&self) -> usize {
        (self.stored as usize).saturating_sub(SEAL_OVERHEAD)
    }

    /// Whether this piece is part of a pack (shorter than its chunk).
    pub fn is_packed(&self) -> bool {
        (self.len as usize) < self.plain_len()
    }

    /// This piece's bytes within its chunk's plaintext, or `None` when they do not fit
    /// (a damaged index or a chunk that is not this one).
    pub fn piece<'a>(&self, plain: &'a [u8]) -> Option<&'a [u8]> {
        if plain.len() != self.plain_len() {
            return None;
        }
        let from = self.at as usize;
        plain.get(from..from.checked_add(self.len as usize)?)
    }
}

/// Run a statement from the connection's cache: the drive runs the same few dozen
/// statements thousands of times, and parsing them each time was a visible part of a
/// small-file copy.
fn exec<P: rusqlite::Params>(c: &Connection, sql: &str, p: P) -> rusqlite::Result<usize> {
    c.prepare_cached(sql)?.execute(p)
}

/// [`exec`] for a statement returning one row.
fn row<T, P: rusqlite::Params>(
    c: &Connection,
    sql: &str,
    p: P,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    c.prepare_cached(sql)?.query_row(p, f)
}

/// Statements kept prepared per connection (rusqlite keeps 16 by default: fewer than
/// the index uses).
const STATEMENT_CACHE: usize = 128;

/// Open the index at `path`, creating the schema and the root directory.
pub fn open(path: &std::path::Path, uid: u32, gid: u32) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL: each commit is atomic and survives a process crash; fsync/fsyncdir force a
    // checkpoint for power-loss durability.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // One transaction: a `status` reader sees no tables or all of them.
    let tx = write_tx(&conn)?;
    migrate(&tx)?;
    tx.execute_batch(SCHEMA)?;
    exec(
        &tx,
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', 3)",
        [],
    )?;
    let now = Ts::now();
    exec(&tx,
        "INSERT OR IGNORE INTO inodes (ino, kind, perm, uid, gid, atime_s, atime_ns, mtime_s, mtime_ns, ctime_s, ctime_ns, nlink, parent)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6, ?7, ?6, ?7, 2, ?1)",
        params![ROOT_INO as i64, Kind::Dir as i64, 0o755, uid, gid, now.sec, now.nsec],
    )?;
    tx.commit()?;
    Ok(conn)
}

/// A second, read-only connection to the index at `path` (the snapshotter reads through
/// it without holding the drive's lock; WAL readers never block the writer).
pub fn open_reader(path: &std::path::Path) -> rusqlite::Result<Connection> {
    let c = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    c.busy_timeout(BUSY_TIMEOUT)?;
    c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(c)
}

/// Bring an index written by an earlier version up to the current schema (schema 1 had
/// no snapshot columns on `chunks`: its chunks are named by no retained snapshot; schema
/// 2 no packs: every piece starts at 0).
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has = |sql: &str| -> rusqlite::Result<bool> { row(conn, sql, [], |r| r.get(0)) };
    if !has("SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'chunks')")?
    {
        return Ok(());
    }
    // Schema 2: snapshot columns on `chunks`; schema 3: pieces of packs.
    let added = [
        ("chunks", "first_snap", "INTEGER"),
        ("chunks", "last_snap", "INTEGER"),
        ("file_chunks", "at", "INTEGER NOT NULL DEFAULT 0"),
    ];
    for (table, col, decl) in added {
        let q = format!(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('{table}') WHERE name = '{col}')"
        );
        let table_there = format!(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '{table}')"
        );
        if has(&table_there)? && !has(&q)? {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {col} {decl}"))?;
        }
    }
    exec(
        conn,
        "UPDATE meta SET value = 3 WHERE key = 'schema' AND value < 3",
        [],
    )?;
    Ok(())
}

const ATTR_COLS: &str = "ino, kind, perm, uid, gid, size, atime_s, atime_ns, mtime_s, mtime_ns, ctime_s, ctime_ns, nlink, rdev, parent, stage, committed_stage";

fn row_attr(r: &rusqlite::Row<'_>) -> rusqlite::Result<Attr> {
    Ok(Attr {
        ino: r.get::<_, i64>(0)? as u64,
        kind: Kind::from_i64(r.get(1)?),
        perm: r.get::<_, i64>(2)? as u16,
        uid: r.get::<_, i64>(3)? as u32,
        gid: r.get::<_, i64>(4)? as u32,
        size: r.get::<_, i64>(5)? as u64,
        atime: Ts {
            sec: r.get(6)?,
            nsec: r.get::<_, i64>(7)? as u32,
        },
        mtime: Ts {
            sec: r.get(8)?,
            nsec: r.get::<_, i64>(9)? as u32,
        },
        ctime: Ts {
            sec: r.get(10)?,
            nsec: r.get::<_, i64>(11)? as u32,
        },
        nlink: r.get::<_, i64>(12)? as u32,
        rdev: r.get::<_, i64>(13)? as u32,
        parent: r.get::<_, i64>(14)? as u64,
        stage: r.get::<_, Option<i64>>(15)?.map(|s| s as u64),
        committed_stage: r.get::<_, i64>(16)? as u64,
    })
}

/// An inode's attributes.
pub fn get_attr(c: &Connection, ino: u64) -> rusqlite::Result<Option<Attr>> {
    row(
        c,
        &format!("SELECT {ATTR_COLS} FROM inodes WHERE ino = ?1"),
        [ino as i64],
        row_attr,
    )
    .optional()
}

/// Insert a new inode (its `ino` is ignored and assigned); returns the number.
pub fn insert_inode(c: &Connection, a: &Attr, target: Option<&[u8]>) -> rusqlite::Result<u64> {
    exec(c,
        "INSERT INTO inodes (kind, perm, uid, gid, size, atime_s, atime_ns, mtime_s, mtime_ns, ctime_s, ctime_ns, nlink, rdev, parent, target)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        params![
            a.kind as i64, a.perm, a.uid, a.gid, a.size as i64, a.atime.sec, a.atime.nsec,
            a.mtime.sec, a.mtime.nsec, a.ctime.sec, a.ctime.nsec, a.nlink, a.rdev,
            a.parent as i64, target
        ],
    )?;
    Ok(c.last_insert_rowid() as u64)
}

/// Write back every attribute except the stage bookkeeping.
pub fn put_attr(c: &Connection, a: &Attr) -> rusqlite::Result<()> {
    exec(c,
        "UPDATE inodes SET perm=?2, uid=?3, gid=?4, size=?5, atime_s=?6, atime_ns=?7, mtime_s=?8, mtime_ns=?9,
         ctime_s=?10, ctime_ns=?11, nlink=?12, rdev=?13, parent=?14 WHERE ino=?1",
        params![
            a.ino as i64, a.perm, a.uid, a.gid, a.size as i64, a.atime.sec, a.atime.nsec,
            a.mtime.sec, a.mtime.nsec, a.ctime.sec, a.ctime.nsec, a.nlink, a.rdev, a.parent as i64
        ],
    )?;
    Ok(())
}

/// Set the pending stage of a file.
pub fn set_stage(c: &Connection, ino: u64, stage: Option<u64>) -> rusqlite::Result<()> {
    exec(
        c,
        "UPDATE inodes SET stage = ?2 WHERE ino = ?1",
        params![ino as i64, stage.map(|s| s as i64)],
    )?;
    Ok(())
}

/// A directory's entries changed: its mtime and ctime become `now`.
pub fn touch_dir(c: &Connection, ino: u64, now: Ts) -> rusqlite::Result<()> {
    exec(
        c,
        "UPDATE inodes SET mtime_s=?2, mtime_ns=?3, ctime_s=?2, ctime_ns=?3 WHERE ino=?1",
        params![ino as i64, now.sec, now.nsec],
    )?;
    Ok(())
}

/// An inode's attributes changed: its ctime becomes `now`.
pub fn set_ctime(c: &Connection, ino: u64, now: Ts) -> rusqlite::Result<()> {
    exec(
        c,
        "UPDATE inodes SET ctime_s=?2, ctime_ns=?3 WHERE ino=?1",
        params![ino as i64, now.sec, now.nsec],
    )?;
    Ok(())
}

/// Add `delta` to an inode's link count; with `now`, its ctime changes too (a name of a
/// file came or went; a directory's count follows its subdirectories without one).
pub fn add_links(c: &Connection, ino: u64, delta: i64, now: Option<Ts>) -> rusqlite::Result<()> {
    match now {
        Some(t) => exec(
            c,
            "UPDATE inodes SET nlink = nlink + ?2, ctime_s = ?3, ctime_ns = ?4 WHERE ino = ?1",
            params![ino as i64, delta, t.sec, t.nsec],
        )?,
        None => exec(
            c,
            "UPDATE inodes SET nlink = nlink + ?2 WHERE ino = ?1",
            params![ino as i64, delta],
        )?,
    };
    Ok(())
}

/// A directory was removed: it has no links left.
pub fn clear_links(c: &Connection, ino: u64) -> rusqlite::Result<()> {
    exec(
        c,
        "UPDATE inodes SET nlink = 0 WHERE ino = ?1",
        [ino as i64],
    )?;
    Ok(())
}

/// An entry moved under `parent` (rename): its ctime becomes `now`, and a directory's
/// parent changes.
pub fn moved(c: &Connection, ino: u64, parent: u64, now: Ts) -> rusqlite::Result<()> {
    exec(c,
        "UPDATE inodes SET ctime_s=?2, ctime_ns=?3, parent = CASE WHEN kind = 2 THEN ?4 ELSE parent END WHERE ino=?1",
        params![ino as i64, now.sec, now.nsec, parent as i64],
    )?;
    Ok(())
}

/// The close point: `stage` (an immutable staging file) holds the file's content, with
/// its size and times, pending upload.
pub fn seal_stage(
    c: &Connection,
    ino: u64,
    stage: u64,
    size: u64,
    mtime: Ts,
    ctime: Ts,
) -> rusqlite::Result<()> {
    exec(c,
        "UPDATE inodes SET stage=?2, size=?3, mtime_s=?4, mtime_ns=?5, ctime_s=?6, ctime_ns=?7 WHERE ino=?1",
        params![ino as i64, stage as i64, size as i64, mtime.sec, mtime.nsec, ctime.sec, ctime.nsec],
    )?;
    Ok(())
}

/// Set a file's permission bits and atime (kept with a file being written until its seal).
pub fn set_perm_atime(c: &Connection, ino: u64, perm: u16, atime: Ts) -> rusqlite::Result<()> {
    exec(
        c,
        "UPDATE inodes SET perm = ?2, atime_s = ?3, atime_ns = ?4 WHERE ino = ?1",
        params![ino as i64, perm, atime.sec, atime.nsec],
    )?;
    Ok(())
}

/// Keep a small closed file's content as stage `stage`, in the transaction that seals
/// it: the record and the content become durable together, with no fsync of their own.
pub fn put_stage_data(c: &Connection, stage: u64, data: &[u8]) -> rusqlite::Result<()> {
    exec(
        c,
        "INSERT OR REPLACE INTO stage_data (stage, data) VALUES (?1, ?2)",
        params![stage as i64, data],
    )?;
    Ok(())
}

/// The content kept in the index for `stage`, if it is a small file's.
pub fn stage_data(c: &Connection, stage: u64) -> rusqlite::Result<Option<Vec<u8>>> {
    c.prepare_cached("SELECT data FROM stage_data WHERE stage = ?1")?
        .query_row([stage as i64], |r| r.get(0))
        .optional()
}

/// Packs whose live pieces add up to less than half their plaintext (at most `limit`):
/// worth packing their files again so the mostly dead pack can be released.
pub fn sparse_packs(c: &Connection, limit: usize) -> rusqlite::Result<Vec<ChunkId>> {
    let mut st = c.prepare_cached(
        "SELECT chunk FROM file_chunks WHERE len + 28 < stored
         GROUP BY chunk HAVING SUM(len) * 2 < MAX(stored) - 28 LIMIT ?1",
    )?;
    let rows = st.query_map([limit as i64], |r| id_at(r, 0))?;
    rows.collect()
}

/// The files a pack still serves, each with its piece, for those whose whole committed
/// content is that one piece and that have nothing pending.
pub fn settled_pieces_of(c: &Connection, pack: &ChunkId) -> rusqlite::Result<Vec<(u64, ChunkRef)>> {
    let mut st = c.prepare_cached(
        "SELECT f.offset, f.chunk, f.len, f.stored, f.at, f.ino FROM file_chunks f
         JOIN inodes i ON i.ino = f.ino
         WHERE f.chunk = ?1 AND f.len + 28 < f.stored AND i.stage IS NULL AND i.nlink > 0
           AND f.offset = 0 AND i.size = f.len
           AND (SELECT COUNT(*) FROM file_chunks g WHERE g.ino = f.ino) = 1",
    )?;
    let rows = st.query_map([&pack.0[..]], |r| {
        Ok((r.get::<_, i64>(5)? as u64, row_chunk(r)?))
    })?;
    rows.collect()
}

/// Make a settled file pending again with its unchanged content kept in the index (to
/// be packed anew), unless something else staged it meanwhile. Whether it did.
pub fn restage(tx: &Transaction<'_>, ino: u64, stage: u64, data: &[u8]) -> rusqlite::Result<bool> {
    let n = exec(
        tx,
        "UPDATE inodes SET stage = ?2 WHERE ino = ?1 AND stage IS NULL AND nlink > 0",
        params![ino as i64, stage as i64],
    )?;
    if n == 1 {
        put_stage_data(tx, stage, data)?;
    }
    Ok(n == 1)
}

/// Forget the content of stages nothing references any more (`stages`), or with `None`
/// of every stage no inode names (after a crash).
pub fn drop_stage_data(c: &Connection, stages: Option<&[u64]>) -> rusqlite::Result<()> {
    let tx = write_tx(c)?;
    match stages {
        Some(ids) => {
            for s in ids {
                exec(&tx, "DELETE FROM stage_data WHERE stage = ?1", [*s as i64])?;
            }
        }
        None => {
            exec(
                &tx,
                "DELETE FROM stage_data WHERE stage NOT IN
                     (SELECT stage FROM inodes WHERE stage IS NOT NULL)",
                [],
            )?;
        }
    }
    tx.commit()
}

/// After an upload: `stage` is the committed version, and no longer pending unless a
/// newer close replaced it meanwhile.
pub fn commit_stage(c: &Connection, ino: u64, stage: u64) -> rusqlite::Result<()> {
    exec(c,
        "UPDATE inodes SET committed_stage = ?2, stage = CASE WHEN stage = ?2 THEN NULL ELSE stage END WHERE ino = ?1",
        [ino as i64, stage as i64],
    )?;
    Ok(())
}

/// Bytes of closed files waiting for upload.
pub fn pending_bytes(c: &Connection) -> rusqlite::Result<u64> {
    row(
        c,
        "SELECT COALESCE(SUM(size), 0) FROM inodes WHERE stage IS NOT NULL",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|b| b.max(0) as u64)
}

/// The inode a name points to.
pub fn lookup(c: &Connection, parent: u64, name: &[u8]) -> rusqlite::Result<Option<u64>> {
    row(
        c,
        "SELECT ino FROM dentries WHERE parent = ?1 AND name = ?2",
        params![parent as i64, name],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|o| o.map(|i| i as u64))
}

/// Add a directory entry.
pub fn insert_dentry(c: &Connection, parent: u64, name: &[u8], ino: u64) -> rusqlite::Result<()> {
    exec(
        c,
        "INSERT INTO dentries (parent, name, ino) VALUES (?1, ?2, ?3)",
        params![parent as i64, name, ino as i64],
    )?;
    Ok(())
}

/// Point an existing entry at another inode.
pub fn repoint_dentry(c: &Connection, parent: u64, name: &[u8], ino: u64) -> rusqlite::Result<()> {
    exec(
        c,
        "UPDATE dentries SET ino = ?3 WHERE parent = ?1 AND name = ?2",
        params![parent as i64, name, ino as i64],
    )?;
    Ok(())
}

/// Remove a directory entry.
pub fn remove_dentry(c: &Connection, parent: u64, name: &[u8]) -> rusqlite::Result<()> {
    exec(
        c,
        "DELETE FROM dentries WHERE parent = ?1 AND name = ?2",
        params![parent as i64, name],
    )?;
    Ok(())
}

/// Whether a directory has entries.
pub fn dir_has_entries(c: &Connection, dir: u64) -> rusqlite::Result<bool> {
    row(
        c,
        "SELECT EXISTS (SELECT 1 FROM dentries WHERE parent = ?1)",
        [dir as i64],
        |r| r.get(0),
    )
}

/// A directory's entries with their kinds, sorted by name.
pub fn list_dir(c: &Connection, dir: u64) -> rusqlite::Result<Vec<(Vec<u8>, u64, Kind)>> {
    let mut st = c.prepare_cached(
        "SELECT d.name, d.ino, i.kind FROM dentries d JOIN inodes i ON i.ino = d.ino
         WHERE d.parent = ?1 ORDER BY d.name",
    )?;
    let rows = st.query_map([dir as i64], |r| {
        Ok((
            r.get(0)?,
            r.get::<_, i64>(1)? as u64,
            Kind::from_i64(r.get(2)?),
        ))
    })?;
    rows.collect()
}

/// A symlink's target.
pub fn symlink_target(c: &Connection, ino: u64) -> rusqlite::Result<Option<Vec<u8>>> {
    row(
        c,
        "SELECT target FROM inodes WHERE ino = ?1",
        [ino as i64],
        |r| r.get(0),
    )
    .optional()
    .map(Option::flatten)
}

/// The committed chunk list of a file, in offset order.
pub fn chunks_of(c: &Connection, ino: u64) -> rusqlite::Result<Vec<ChunkRef>> {
    let mut st = c.prepare_cached(
        "SELECT offset, chunk, len, stored, at FROM file_chunks WHERE ino = ?1 ORDER BY offset",
    )?;
    let rows = st.query_map([ino as i64], row_chunk)?;
    rows.collect()
}

/// The committed chunks of a file overlapping `[start, end)`.
pub fn chunks_in_range(
    c: &Connection,
    ino: u64,
    start: u64,
    end: u64,
) -> rusqlite::Result<Vec<ChunkRef>> {
    // The chunk containing `start` begins at the greatest offset <= start.
    let mut st = c.prepare_cached(
        "SELECT offset, chunk, len, stored, at FROM file_chunks WHERE ino = ?1 AND offset < ?3 AND offset >= COALESCE(
            (SELECT MAX(offset) FROM file_chunks WHERE ino = ?1 AND offset <= ?2), 0) ORDER BY offset",
    )?;
    let rows = st.query_map(params![ino as i64, start as i64, end as i64], row_chunk)?;
    rows.collect()
}

/// The chunk id in column `i` (a damaged index is an error, not a panic).
fn id_at(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<ChunkId> {
    let v: Vec<u8> = r.get(i)?;
    let b: [u8; 32] = v.as_slice().try_into().map_err(|_| {
        rusqlite::Error::InvalidColumnType(i, "chunk id".into(), rusqlite::types::Type::Blob)
    })?;
    Ok(ChunkId(b))
}

fn row_chunk(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChunkRef> {
    Ok(ChunkRef {
        offset: r.get::<_, i64>(0)? as u64,
        id: id_at(r, 1)?,
        len: r.get::<_, i64>(2)? as u32,
        stored: r.get::<_, i64>(3)? as u32,
        at: r.get::<_, i64>(4)? as u32,
    })
}

/// Drop a file's chunk list, dereferencing its chunks (those reaching zero become
/// candidates for release).
pub fn drop_chunks(tx: &Transaction<'_>, ino: u64) -> rusqlite::Result<()> {
    exec(tx,
        "UPDATE chunks SET refcount = refcount - 1 WHERE id IN (SELECT chunk FROM file_chunks WHERE ino = ?1)",
        [ino as i64],
    )?;
    // A chunk used twice by the same file appears once in `IN (...)`: count it right.
    exec(tx,
        "UPDATE chunks SET refcount = refcount - (SELECT COUNT(*) - 1 FROM file_chunks f WHERE f.ino = ?1 AND f.chunk = chunks.id)
         WHERE id IN (SELECT chunk FROM file_chunks WHERE ino = ?1 GROUP BY chunk HAVING COUNT(*) > 1)",
        [ino as i64],
    )?;
    exec(tx, "DELETE FROM file_chunks WHERE ino = ?1", [ino as i64])?;
    Ok(())
}

/// Replace a file's chunk list (call only once every chunk is stored).
pub fn replace_chunks(tx: &Transaction<'_>, ino: u64, list: &[ChunkRef]) -> rusqlite::Result<()> {
    drop_chunks(tx, ino)?;
    let mut ins = tx.prepare_cached(
        "INSERT INTO file_chunks (ino, offset, chunk, len, stored, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut refc = tx.prepare_cached(
        "INSERT INTO chunks (id, stored, refcount, confirmed) VALUES (?1, ?2, 1, 1)
         ON CONFLICT(id) DO UPDATE SET refcount = refcount + 1, confirmed = 1",
    )?;
    for c in list {
        ins.execute(params![
            ino as i64,
            c.offset as i64,
            &c.id.0[..],
            c.len,
            c.stored,
            c.at
        ])?;
        refc.execute(params![&c.id.0[..], c.stored])?;
    }
    Ok(())
}

/// Whether the backend holds a chunk: referenced by a committed version, or confirmed
/// stored and not released yet (e.g. the old version of a file rsync just replaced).
pub fn chunk_stored(c: &Connection, id: &ChunkId) -> rusqlite::Result<bool> {
    row(
        c,
        "SELECT EXISTS (SELECT 1 FROM chunks WHERE id = ?1 AND (refcount > 0 OR confirmed = 1))",
        [&id.0[..]],
        |r| r.get(0),
    )
}

/// Record that the backend confirmed storing these chunks.
pub fn mark_confirmed(c: &Connection, ids: &[ChunkId]) -> rusqlite::Result<()> {
    let tx = write_tx(c)?;
    {
        let mut st = tx.prepare_cached("UPDATE chunks SET confirmed = 1 WHERE id = ?1")?;
        for id in ids {
            st.execute([&id.0[..]])?;
        }
    }
    tx.commit()
}

/// Record that chunks are about to be stored, so that a crash before they are committed
/// still lets them be released later.
pub fn note_intent(c: &Connection, chunks: &[(ChunkId, u32)]) -> rusqlite::Result<()> {
    let tx = write_tx(c)?;
    {
        let mut st = tx.prepare_cached(
            "INSERT OR IGNORE INTO chunks (id, stored, refcount) VALUES (?1, ?2, 0)",
        )?;
        for (id, stored) in chunks {
            st.execute(params![&id.0[..], stored])?;
        }
    }
    tx.commit()
}

/// `WHERE` condition on `chunks`: no retained snapshot lies in the range of versions that
/// named the chunk (none when it was never named), and no retained snapshot predates the
/// one this index was restored from (`meta.snapshot_base`: those snapshots' chunks are
/// unknown here, so while one is retained nothing is released).
const UNRETAINED: &str = "NOT EXISTS (SELECT 1 FROM snapshots s
     WHERE s.version BETWEEN chunks.first_snap AND chunks.last_snap
        OR s.version < COALESCE((SELECT value FROM meta WHERE key = 'snapshot_base'), 0))";

/// Chunks to release: no file references them and no retained snapshot names them.
pub fn free_chunks(c: &Connection, limit: usize) -> rusqlite::Result<Vec<ChunkId>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT id FROM chunks WHERE refcount <= 0 AND {UNRETAINED} LIMIT ?1"
    ))?;
    let rows = st.query_map([limit as i64], |r| id_at(r, 0))?;
    rows.collect()
}

/// Stored bytes of chunks no file references (held for retained snapshots, or waiting
/// for release): what deletes can give back once a snapshot covers them and, under quota
/// pressure, earlier snapshots are thinned. A slight overestimate: the latest snapshot's
/// own pieces count too (a few KiB per thousand files).
pub fn unreferenced_bytes(c: &Connection) -> rusqlite::Result<u64> {
    row(
        c,
        "SELECT COALESCE(SUM(stored), 0) FROM chunks WHERE refcount <= 0 AND confirmed = 1",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|b| b.max(0) as u64)
}

/// Not named by the latest snapshot: kept only for earlier ones.
const EARLIER: &str = "COALESCE(chunks.last_snap < (SELECT MAX(version) FROM snapshots), 1)";

/// Stored bytes of chunks no file references that only earlier retained snapshots keep:
/// what thinning those snapshots can give back.
pub fn held_for_earlier_bytes(c: &Connection) -> rusqlite::Result<u64> {
    row(
        c,
        &format!(
            "SELECT COALESCE(SUM(stored), 0) FROM chunks
             WHERE refcount <= 0 AND NOT ({UNRETAINED}) AND {EARLIER}"
        ),
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|b| b.max(0) as u64)
}

/// Forget released chunks (unless a commit referenced them meanwhile).
pub fn forget_chunks(c: &Connection, ids: &[ChunkId]) -> rusqlite::Result<()> {
    let tx = write_tx(c)?;
    {
        let mut st = tx.prepare_cached(&format!(
            "DELETE FROM chunks WHERE id = ?1 AND refcount <= 0 AND {UNRETAINED}"
        ))?;
        for id in ids {
            st.execute([&id.0[..]])?;
        }
    }
    tx.commit()
}

/// Record that snapshot `version` names these chunks (`(id, stored size)`): widen each
/// chunk's range of naming versions, adding a row (refcount 0) for a chunk the index does
/// not track yet (the snapshot's own chunks).
pub fn mark_named(c: &Connection, version: u64, chunks: &[(ChunkId, u32)]) -> rusqlite::Result<()> {
    let tx = write_tx(c)?;
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO chunks (id, stored, refcount, confirmed, first_snap, last_snap)
             VALUES (?1, ?2, 0, 1, ?3, ?3)
             ON CONFLICT(id) DO UPDATE SET confirmed = 1,
                first_snap = MIN(COALESCE(first_snap, excluded.first_snap), excluded.first_snap),
                last_snap = MAX(COALESCE(last_snap, 0), excluded.last_snap)",
        )?;
        for (id, stored) in chunks {
            st.execute(params![&id.0[..], stored, version as i64])?;
        }
    }
    tx.commit()
}

/// The chunks the durable part of the index names now (what a snapshot taken now names),
/// with their stored sizes.
pub fn named_chunks(c: &Connection) -> rusqlite::Result<Vec<(ChunkId, u32)>> {
    let mut st = c.prepare(
        "SELECT DISTINCT chunk, stored FROM file_chunks WHERE ino IN
            (SELECT ino FROM inodes WHERE nlink > 0 AND (kind <> 1 OR committed_stage > 0 OR stage IS NULL))",
    )?;
    let rows = st.query_map([], |r| Ok((id_at(r, 0)?, r.get::<_, i64>(1)? as u32)))?;
    rows.collect()
}

/// Start retaining snapshot `version`.
pub fn retain_snapshot(c: &Connection, version: u64, created: i64) -> rusqlite::Result<()> {
    exec(
        c,
        "INSERT OR REPLACE INTO snapshots (version, created) VALUES (?1, ?2)",
        params![version as i64, created],
    )?;
    Ok(())
}

/// The retained snapshots `(version, created)`, oldest first.
pub fn retained_snapshots(c: &Connection) -> rusqlite::Result<Vec<(u64, i64)>> {
    let mut st = c.prepare_cached("SELECT version, created FROM snapshots ORDER BY version")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?;
    rows.collect()
}

/// Stop retaining snapshots: chunks only they named become releasable.
pub fn forget_snapshots(c: &Connection, versions: &[u64]) -> rusqlite::Result<()> {
    let tx = write_tx(c)?;
    {
        let mut st = tx.prepare_cached("DELETE FROM snapshots WHERE version = ?1")?;
        for v in versions {
            st.execute([*v as i64])?;
        }
    }
    tx.commit()
}

/// Files with closed content waiting for upload: `(ino, stage, size)`, oldest first.
pub fn pending(c: &Connection, limit: usize) -> rusqlite::Result<Vec<(u64, u64, u64)>> {
    let mut st = c.prepare_cached(
        "SELECT ino, stage, size FROM inodes WHERE stage IS NOT NULL AND nlink > 0
         ORDER BY stage LIMIT ?1",
    )?;
    let rows = st.query_map([limit as i64], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            r.get::<_, i64>(1)? as u64,
            r.get::<_, i64>(2)? as u64,
        ))
    })?;
    rows.collect()
}

/// Delete an inode with everything hanging off it.
pub fn delete_inode(tx: &Transaction<'_>, ino: u64) -> rusqlite::Result<()> {
    drop_chunks(tx, ino)?;
    exec(tx, "DELETE FROM xattrs WHERE ino = ?1", [ino as i64])?;
    exec(tx, "DELETE FROM inodes WHERE ino = ?1", [ino as i64])?;
    Ok(())
}

/// An xattr's value.
pub fn get_xattr(c: &Connection, ino: u64, name: &[u8]) -> rusqlite::Result<Option<Vec<u8>>> {
    row(
        c,
        "SELECT value FROM xattrs WHERE ino = ?1 AND name = ?2",
        params![ino as i64, name],
        |r| r.get(0),
    )
    .optional()
}

/// Set an xattr.
pub fn set_xattr(c: &Connection, ino: u64, name: &[u8], value: &[u8]) -> rusqlite::Result<()> {
    exec(
        c,
        "INSERT INTO xattrs (ino, name, value) VALUES (?1, ?2, ?3)
         ON CONFLICT(ino, name) DO UPDATE SET value = excluded.value",
        params![ino as i64, name, value],
    )?;
    Ok(())
}

/// Remove an xattr; whether it existed.
pub fn remove_xattr(c: &Connection, ino: u64, name: &[u8]) -> rusqlite::Result<bool> {
    Ok(exec(
        c,
        "DELETE FROM xattrs WHERE ino = ?1 AND name = ?2",
        params![ino as i64, name],
    )? > 0)
}

/// The xattr names of an inode.
pub fn list_xattrs(c: &Connection, ino: u64) -> rusqlite::Result<Vec<Vec<u8>>> {
    let mut st = c.prepare_cached("SELECT name FROM xattrs WHERE ino = ?1 ORDER BY name")?;
    let rows = st.query_map([ino as i64], |r| r.get(0))?;
    rows.collect()
}

/// Number of inodes (for statfs).
pub fn inode_count(c: &Connection) -> rusqlite::Result<u64> {
    row(c, "SELECT COUNT(*) FROM inodes", [], |r| r.get::<_, i64>(0)).map(|n| n as u64)
}

/// Largest stage id mentioned anywhere, so new ids never collide after a restart.
pub fn max_stage(c: &Connection) -> rusqlite::Result<u64> {
    row(
        c,
        "SELECT MAX(COALESCE(MAX(stage), 0), COALESCE(MAX(committed_stage), 0)) FROM inodes",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
}

/// Inodes no name points to (left by a crash while they were open): `(ino, stage)`.
pub fn orphans(c: &Connection) -> rusqlite::Result<Vec<(u64, Option<u64>)>> {
    let mut st = c.prepare("SELECT ino, stage FROM inodes WHERE nlink = 0")?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            r.get::<_, Option<i64>>(1)?.map(|s| s as u64),
        ))
    })?;
    rows.collect()
}

/// All pending stage ids (to delete unreferenced staging files at start-up).
pub fn all_stages(c: &Connection) -> rusqlite::Result<Vec<u64>> {
    let mut st = c.prepare("SELECT stage FROM inodes WHERE stage IS NOT NULL")?;
    let rows = st.query_map([], |r| r.get::<_, i64>(0).map(|s| s as u64))?;
    rows.collect()
}

/// Counts for `peerstash status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Inodes (files, directories, links…).
    pub inodes: u64,
    /// Files closed but not yet uploaded.
    pub pending_files: u64,
    /// Their bytes.
    pub pending_bytes: u64,
    /// Distinct chunks referenced by uploaded file versions.
    pub chunks: u64,
    /// Their stored (sealed) bytes.
    pub stored_bytes: u64,
    /// Version of the last snapshot stored (0: none yet).
    pub snapshot_version: u64,
    /// Whether that snapshot holds the index as it is now (every uploaded change).
    pub snapshot_current: bool,
    /// Snapshots the drive retains (the latest and earlier ones).
    pub snapshots_kept: u64,
    /// Chunks no file references any more, kept because a retained snapshot names them.
    pub held_chunks: u64,
    /// Their stored bytes.
    pub held_bytes: u64,
    /// Chunks no file and no retained snapshot needs: released when the drive is idle.
    pub releasable_chunks: u64,
    /// Earlier snapshots dropped before their time to give space back (quota pressure).
    pub snapshots_thinned: u64,
    /// When the last of those was dropped (Unix seconds).
    pub snapshot_thinned_at: i64,
}

/// Counts for `peerstash status`.
pub fn summary(c: &Connection) -> rusqlite::Result<Summary> {
    let (pending_files, pending_bytes) = row(
        c,
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM inodes WHERE stage IS NOT NULL",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )?;
    let (chunks, stored_bytes) = row(
        c,
        "SELECT COUNT(*), COALESCE(SUM(stored), 0) FROM chunks WHERE refcount > 0",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )?;
    // An index not yet opened by this version (read-only here) has no snapshot columns.
    let retention = get_meta(c, Meta::Schema)?.unwrap_or(0) >= 2;
    let (held_chunks, held_bytes, releasable_chunks) = if !retention {
        (0, 0, 0)
    } else {
        row(c,
            &format!(
                "SELECT COALESCE(SUM(NOT ({UNRETAINED}) AND {EARLIER}), 0),
                    COALESCE(SUM(CASE WHEN NOT ({UNRETAINED}) AND {EARLIER} THEN stored ELSE 0 END), 0),
                    COALESCE(SUM({UNRETAINED}), 0)
             FROM chunks WHERE refcount <= 0"
            ),
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                ))
            },
        )?
    };
    let snapshots_kept = if retention {
        row(c, "SELECT COUNT(*) FROM snapshots", [], |r| {
            r.get::<_, i64>(0)
        })? as u64
    } else {
        0
    };
    Ok(Summary {
        snapshots_kept,
        held_chunks,
        held_bytes,
        releasable_chunks,
        inodes: inode_count(c)?,
        pending_files,
        pending_bytes,
        chunks,
        stored_bytes,
        snapshot_version: get_meta(c, Meta::SnapshotVersion)?.unwrap_or(0) as u64,
        snapshots_thinned: get_meta(c, Meta::SnapshotsThinned)?.unwrap_or(0) as u64,
        snapshot_thinned_at: get_meta(c, Meta::SnapshotThinnedAt)?.unwrap_or(0),
        snapshot_current: match get_meta(c, Meta::SnapshotDigest)? {
            Some(d) => super::snapshot::short_digest(&super::snapshot::serialize(c)?) == d,
            None => false,
        },
    })
}

/// Read the summary of the drive whose state is in `state_dir`, without mounting it (safe
/// while it is mounted: WAL readers do not block the writer).
pub fn summary_of(state_dir: &std::path::Path) -> rusqlite::Result<Summary> {
    let path = state_dir.join("index.sqlite");
    if !path.exists() {
        return Ok(Summary::default());
    }
    let c = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    c.busy_timeout(Duration::from_secs(5))?;
    // A drive mounting for the first time may not have created its tables yet.
    let created: bool = row(
        &c,
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')",
        [],
        |r| r.get(0),
    )?;
    if !created {
        return Ok(Summary::default());
    }
    summary(&c)
}

/// The values kept in the index's `meta` table (integers; names fixed on disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meta {
    /// Schema version of the index file.
    Schema,
    /// A digest of the data key the index was made with (a drive opened with another key
    /// is refused).
    KeyCheck,
    /// Version of the latest snapshot stored.
    SnapshotVersion,
    /// Short digest of that snapshot's serialized index (unchanged: not stored again).
    SnapshotDigest,
    /// The snapshot an index was restored from: earlier ones' chunks are unknown to it.
    SnapshotBase,
    /// Earlier snapshots dropped before their time under quota pressure.
    SnapshotsThinned,
    /// When the last of those was dropped (Unix seconds).
    SnapshotThinnedAt,
}

impl Meta {
    fn key(self) -> &'static str {
        match self {
            Meta::Schema => "schema",
            Meta::KeyCheck => "key_check",
            Meta::SnapshotVersion => "snapshot_version",
            Meta::SnapshotDigest => "snapshot_digest",
            Meta::SnapshotBase => "snapshot_base",
            Meta::SnapshotsThinned => "snapshots_thinned",
            Meta::SnapshotThinnedAt => "snapshot_thinned_at",
        }
    }
}

/// A value kept in `meta`.
pub fn get_meta(c: &Connection, key: Meta) -> rusqlite::Result<Option<i64>> {
    row(
        c,
        "SELECT value FROM meta WHERE key = ?1",
        [key.key()],
        |r| r.get(0),
    )
    .optional()
}

/// Set a value in `meta`.
pub fn set_meta(c: &Connection, key: Meta, value: i64) -> rusqlite::Result<()> {
    exec(c,
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        rusqlite::params![key.key(), value],
    )?;
    Ok(())
}

/// Make every commit so far durable against power loss. Commits use synchronous=NORMAL
/// (atomic, but the WAL is not fsynced per commit); one FULL commit syncs the WAL with all
/// earlier frames. Call it before acting outside the index on something a commit decided
/// (releasing chunks, deleting staging files), and in fsync.
pub fn make_durable(c: &Connection) -> rusqlite::Result<()> {
    c.pragma_update(None, "synchronous", "FULL")?;
    let r = exec(
        c,
        "INSERT INTO meta (key, value) VALUES ('durable_syncs', 1)
         ON CONFLICT(key) DO UPDATE SET value = value + 1",
        [],
    );
    c.pragma_update(None, "synchronous", "NORMAL")?;
    r.map(|_| ())
}

/// The index's write-ahead log, synced from outside the model's lock. Commits write their
/// frames into the log as they commit (synchronous=NORMAL only skips the fsync), so one
/// fsync of the log makes every commit before it durable; frames a checkpoint already
/// moved into the database file are durable too (in WAL mode SQLite syncs the database
/// file before it reuses the log). A request that syncs this way holds up no other.
#[derive(Debug)]
pub struct WalSync {
    path: std::path::PathBuf,
    file: std::sync::Mutex<Option<std::fs::File>>,
}

impl WalSync {
    /// The log of the index at `index_path` (opened at the first sync: it exists once
    /// anything was committed).
    pub fn new(index_path: &std::path::Path) -> WalSync {
        let mut p = index_path.as_os_str().to_owned();
        p.push("-wal");
        WalSync {
            path: p.into(),
            file: std::sync::Mutex::new(None),
        }
    }

    /// fsync the log. `false` when there is no log file to sync, or it failed: then
    /// sync through SQLite ([`make_durable`]), which reports the error.
    pub fn sync(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        // The log file stays while the index is open; should SQLite ever have made a
        // new one, the descriptor held would sync the old one: check it is the same file.
        let Ok(now) = std::fs::metadata(&self.path) else {
            return false;
        };
        let held = file.as_ref().and_then(|f| f.metadata().ok());
        if held.is_none_or(|m| (m.dev(), m.ino()) != (now.dev(), now.ino())) {
            *file = std::fs::File::open(&self.path).ok();
        }
        file.as_ref().is_some_and(|f| f.sync_data().is_ok())
    }
}

/// Every chunk the backend confirmed it stored, with its stored size (for `peerstash
/// verify`, which reads them back from their holders).
pub fn confirmed_chunks(c: &Connection) -> rusqlite::Result<Vec<(ChunkId, u32)>> {
    let mut st = c.prepare("SELECT id, stored FROM chunks WHERE confirmed = 1 ORDER BY id")?;
    let rows = st.query_map([], |r| {
        let id: Vec<u8> = r.get(0)?;
        let mut b = [0u8; 32];
        if id.len() == 32 {
            b.copy_from_slice(&id);
        }
        Ok((
            ChunkId(b),
            r.get::<_, i64>(1)?.clamp(0, i64::from(u32::MAX)) as u32,
        ))
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_synced_from_its_own_descriptor_once_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let wal = WalSync::new(&dir.path().join("absent.sqlite"));
        assert!(
            !wal.sync(),
            "no log file: the caller must sync through SQLite"
        );
        let c = open(&path, 0, 0).unwrap();
        set_meta(&c, Meta::KeyCheck, 7).unwrap();
        let wal = WalSync::new(&path);
        assert!(wal.sync());
        // The descriptor is kept and still names the log after more commits.
        set_meta(&c, Meta::KeyCheck, 8).unwrap();
        assert!(wal.sync());
        let held = wal
            .file
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .metadata()
            .unwrap();
        let now = std::fs::metadata(dir.path().join("index.sqlite-wal")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(held.ino(), now.ino());
    }
}
