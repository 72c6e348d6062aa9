//! The server's state in SQLite: peers, invites, chunk locations, pending placements,
//! drop lists, failure reports and the transaction-id high-water mark.
//!
//! Every operation that changes more than one row runs in one transaction, and every
//! refusal is decided before the first write, so a refused request changes nothing.
//! A chunk location is keyed by its owner as well as by its id: chunks are never shared
//! between users, so knowing a chunk id never gives anyone a token for someone else's data.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use db::{params, Db, OptionalExtension, Tx};
use peerstash::api::{self, ChunkRef, HeartbeatRequest, KeyMode, ReportRequest};
use peerstash::keys::random_u64;
use peerstash::token::MAX_CHUNK_SIZE;
use peerstash::{ChunkId, Fingerprint, PeerId, TransactionId};

use crate::placement::{self, Candidate, Want};

mod audit;
pub mod db;
mod error;
mod repair;

pub use audit::{AuditRecord, AuditTarget, Standing, Verdict};
pub use error::StoreError;
pub use repair::{RepairPlan, RepairScan, SCAN_BATCH};

/// Transaction ids are reserved in blocks of this size: the high-water mark on disk is
/// always above every id handed out, so ids never repeat, even across a crash.
const TXID_BLOCK: u64 = 1024;
/// SQLite's page cache for the store's connection, KiB.
const CACHE_KIB: i64 = 32 * 1024;
/// Log size (pages of 4 KiB) past which the store's own connection checkpoints after a
/// commit: normally the [`Checkpointer`] has copied nearly all of it by then, and this
/// checkpoint, between two commits, lets the log start over instead of growing.
const BACKSTOP_CHECKPOINT_PAGES: i64 = 4096;
/// Most drop orders sent in one heartbeat response.
const MAX_DROPS_PER_HEARTBEAT: usize = 1024;
/// The subject of failure reports about a peer id that is not registered (ids are never
/// 0, see [`Store::insert_peer`]).
pub const NO_PEER: PeerId = PeerId(0);
/// How long after its expiry a daemon may still accept a token (its clock-skew allowance).
const TOKEN_SKEW_S: u64 = peerstash::token::DEFAULT_SKEW_SECS;
/// Most replicas a put may ask for.
pub const MAX_REPLICAS: u8 = 16;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS invites (code TEXT PRIMARY KEY, created_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS peers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    key_blob BLOB NOT NULL,
    key_mode TEXT NOT NULL,
    lend_bytes INTEGER NOT NULL,
    quic_addr TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    free_bytes INTEGER NOT NULL,
    used_bytes INTEGER NOT NULL DEFAULT 0,
    last_seen_ms INTEGER NOT NULL DEFAULT 0,
    stored_bytes INTEGER NOT NULL DEFAULT 0,
    held_bytes INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    replicas INTEGER NOT NULL DEFAULT 2,
    audits_passed INTEGER NOT NULL DEFAULT 0,
    audits_failed INTEGER NOT NULL DEFAULT 0,
    reputation REAL NOT NULL DEFAULT 1.0,
    uptime REAL NOT NULL DEFAULT 1.0,
    standing INTEGER NOT NULL DEFAULT 0,
    suspended_ms INTEGER NOT NULL DEFAULT 0,
    audited_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS locations (
    owner INTEGER NOT NULL,
    chunk BLOB NOT NULL,
    holder INTEGER NOT NULL,
    size INTEGER NOT NULL,
    audited_ms INTEGER NOT NULL DEFAULT 0,
    audit_failed INTEGER NOT NULL DEFAULT 0,
    passed_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, chunk, holder)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS locations_by_holder ON locations (holder, chunk);
CREATE TABLE IF NOT EXISTS pending (
    txid INTEGER NOT NULL,
    chunk BLOB NOT NULL,
    holder INTEGER NOT NULL,
    owner INTEGER NOT NULL,
    size INTEGER NOT NULL,
    expires_s INTEGER NOT NULL,
    replaces INTEGER,
    PRIMARY KEY (txid, chunk)
) WITHOUT ROWID;
DROP INDEX IF EXISTS pending_by_holder;
CREATE INDEX IF NOT EXISTS pending_by_holder_chunk ON pending (holder, chunk);
CREATE INDEX IF NOT EXISTS pending_by_owner ON pending (owner, chunk);
CREATE TABLE IF NOT EXISTS drops (
    holder INTEGER NOT NULL,
    chunk BLOB NOT NULL,
    PRIMARY KEY (holder, chunk)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS roots (
    peer INTEGER NOT NULL,
    version INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (peer, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stripes (
    owner INTEGER NOT NULL,
    chunk BLOB NOT NULL,
    chunk_size INTEGER NOT NULL,
    data INTEGER NOT NULL,
    parity INTEGER NOT NULL,
    PRIMARY KEY (owner, chunk)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stripe_shards (
    owner INTEGER NOT NULL,
    chunk BLOB NOT NULL,
    idx INTEGER NOT NULL,
    shard BLOB NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (owner, chunk, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS stripe_shards_by_shard ON stripe_shards (owner, shard);
CREATE TABLE IF NOT EXISTS repairs (
    owner INTEGER NOT NULL,
    chunk BLOB NOT NULL,
    replaces INTEGER NOT NULL,
    size INTEGER NOT NULL,
    queued_ms INTEGER NOT NULL,
    PRIMARY KEY (owner, chunk, replaces)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS universal_grants (
    chunk BLOB NOT NULL,
    holder INTEGER NOT NULL,
    requester INTEGER NOT NULL,
    expires_s INTEGER NOT NULL,
    PRIMARY KEY (chunk, holder, requester)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    subject INTEGER NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (subject, kind, reason)
) WITHOUT ROWID;
";

/// Chunk ids looked up per statement ([`by_chunk`]), and rows written per statement
/// ([`insert_rows`]), on PostgreSQL: one round trip instead of one per chunk, which is
/// what a put, a confirm or a get costs there (a round trip to the database is ~100 µs).
/// On SQLite a statement costs no round trip, and one per row is faster (an `IN` list
/// makes it build an index for each run).
fn rows_per_statement(c: &Db) -> usize {
    match c.dialect() {
        db::Dialect::Sqlite => 1,
        db::Dialect::Postgres => 32,
    }
}

/// `sql` (with `{ids}` where an `IN` list of [`rows_per_statement`] parameters goes,
/// after the `fixed` ones: `?1`… are `fixed`) run over `ids`, [`rows_per_statement`] at a
/// time: its rows, each through `f`, grouped by their first column (the chunk id). A
/// last short batch is padded with its first id (a repeated id in an `IN` list changes
/// nothing), so every statement has the same text and is prepared once.
fn by_chunk<T>(
    c: &Db,
    sql: &str,
    fixed: &[&dyn db::Param],
    ids: &[ChunkId],
    mut f: impl FnMut(&db::Row<'_>) -> db::Result<T>,
) -> db::Result<HashMap<ChunkId, Vec<T>>> {
    let per = rows_per_statement(c);
    let first = fixed.len() + 1;
    let list: Vec<String> = (first..first + per).map(|i| format!("?{i}")).collect();
    let mut st = c.prepare_cached(&sql.replace("{ids}", &list.join(", ")))?;
    let mut out: HashMap<ChunkId, Vec<T>> = HashMap::new();
    for batch in ids.chunks(per) {
        let mut args: Vec<&dyn db::Param> = Vec::with_capacity(fixed.len() + per);
        args.extend_from_slice(fixed);
        for i in 0..per {
            args.push(&batch.get(i).unwrap_or(&batch[0]).0);
        }
        for row in st.query_map(&args[..], |r| Ok((ChunkId(blob32(r.get(0)?)), f(r)?)))? {
            let (id, v) = row?;
            out.entry(id).or_default().push(v);
        }
    }
    Ok(out)
}

/// A pending placement a confirm took: owner, size, the lost holder it replaces.
type Taken = (i64, i64, Option<i64>);

/// A pending placement to record.
struct PendingRow {
    txid: i64,
    chunk: [u8; 32],
    holder: i64,
    owner: i64,
    size: i64,
    expires_s: i64,
}

/// Record pending placements.
fn insert_pending(c: &Db, rows: &[PendingRow]) -> db::Result<()> {
    let values: Vec<Vec<db::Value<'_>>> = rows
        .iter()
        .map(|r| {
            vec![
                db::Value::Int(r.txid),
                db::Value::Blob(&r.chunk),
                db::Value::Int(r.holder),
                db::Value::Int(r.owner),
                db::Value::Int(r.size),
                db::Value::Int(r.expires_s),
            ]
        })
        .collect();
    insert_rows(
        c,
        "INSERT INTO pending (txid, chunk, holder, owner, size, expires_s)",
        "",
        &values,
        |_| Ok(()),
    )?;
    Ok(())
}

/// `{head} VALUES (…), (…) {tail}` for every row of `rows` (all of one length),
/// [`rows_per_statement`] rows per statement and the rest one by one, so that every
/// statement text is one of two, each prepared once: what the statements return (a
/// `RETURNING` tail), each row through `f`.
fn insert_rows<T>(
    c: &Db,
    head: &str,
    tail: &str,
    rows: &[Vec<db::Value<'_>>],
    mut f: impl FnMut(&db::Row<'_>) -> db::Result<T>,
) -> db::Result<Vec<T>> {
    let Some(width) = rows.first().map(Vec::len) else {
        return Ok(Vec::new());
    };
    let sql = |n: usize| -> String {
        let tuples: Vec<String> = (0..n)
            .map(|i| {
                let params: Vec<String> =
                    (1..=width).map(|k| format!("?{}", i * width + k)).collect();
                format!("({})", params.join(", "))
            })
            .collect();
        format!("{head} VALUES {} {tail}", tuples.join(", "))
    };
    let mut out = Vec::new();
    let per = rows_per_statement(c);
    let mut batches = rows.chunks_exact(per);
    if batches.len() > 0 {
        let mut many = c.prepare_cached(&sql(per))?;
        for batch in &mut batches {
            let flat: Vec<db::Value<'_>> = batch.iter().flatten().copied().collect();
            for r in many.query_map(flat, &mut f)? {
                out.push(r?);
            }
        }
    }
    if !batches.remainder().is_empty() {
        let mut one = c.prepare_cached(&sql(1))?;
        for row in batches.remainder() {
            for r in one.query_map(row.clone(), &mut f)? {
                out.push(r?);
            }
        }
    }
    Ok(out)
}

/// A drop order for a holder (once).
const DROP_ORDER: &str = "INSERT INTO drops (holder, chunk) VALUES (?1, ?2) ON CONFLICT DO NOTHING";

/// A schema written for SQLite in PostgreSQL's types: 64-bit integers, byte strings and
/// double-precision floats; `WITHOUT ROWID` (a SQLite storage choice) dropped.
fn postgres_schema(sqlite: &str) -> String {
    let mut out = String::with_capacity(sqlite.len() + 256);
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(match word.as_str() {
            "INTEGER" => "BIGINT",
            "BLOB" => "BYTEA",
            "REAL" => "DOUBLE PRECISION",
            w => w,
        });
        word.clear();
    };
    for c in sqlite.replace(" WITHOUT ROWID", "").chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// A reservation of transaction ids inside a database transaction; applied to the
/// in-memory counter only once that transaction commits, so a rollback can never leave
/// handed-out ids above the mark on disk.
struct TxidReservation {
    first: u64,
    next: u64,
    hwm: u64,
}

fn reserve_txids(tx: &Tx<'_>, next: u64, hwm: u64, n: u64) -> db::Result<TxidReservation> {
    if next + n <= hwm {
        return Ok(TxidReservation {
            first: next,
            next: next + n,
            hwm,
        });
    }
    // This instance's block is used up: claim a fresh one past every block any instance
    // sharing the database has claimed (the write transaction holds the lock).
    let claimed: i64 = tx
        .query_row(
            "SELECT value FROM meta WHERE key = 'txid_hwm'",
            params![],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(1);
    let first = (claimed as u64).max(hwm);
    let new_hwm = first + n + TXID_BLOCK;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('txid_hwm', ?1)
         ON CONFLICT(key) DO UPDATE
           SET value = CASE WHEN excluded.value > meta.value THEN excluded.value ELSE meta.value END",
        params![new_hwm as i64],
    )?;
    Ok(TxidReservation {
        first,
        next: first + n,
        hwm: new_hwm,
    })
}

/// Columns added since the first schema, for databases created before them.
fn migrate(conn: &Db) -> db::Result<()> {
    let has = |table: &str, col: &str| -> db::Result<bool> {
        let mut st = conn.prepare_cached(&format!("PRAGMA table_info({table})"))?;
        let names = st.query_map(params![], |r| r.get::<_, String>(1))?;
        for n in names {
            if n? == col {
                return Ok(true);
            }
        }
        Ok(false)
    };
    if !has("peers", "replicas")? {
        conn.execute_batch("ALTER TABLE peers ADD COLUMN replicas INTEGER NOT NULL DEFAULT 2")?;
    }
    if !has("pending", "replaces")? {
        conn.execute_batch("ALTER TABLE pending ADD COLUMN replaces INTEGER")?;
    }
    // Audits and reputation (see store::audit).
    for (col, def) in [
        ("audits_passed", "INTEGER NOT NULL DEFAULT 0"),
        ("audits_failed", "INTEGER NOT NULL DEFAULT 0"),
        ("reputation", "REAL NOT NULL DEFAULT 1.0"),
        ("uptime", "REAL NOT NULL DEFAULT 1.0"),
        ("standing", "INTEGER NOT NULL DEFAULT 0"),
        ("suspended_ms", "INTEGER NOT NULL DEFAULT 0"),
        ("audited_bytes", "INTEGER NOT NULL DEFAULT 0"),
    ] {
        if !has("peers", col)? {
            conn.execute_batch(&format!("ALTER TABLE peers ADD COLUMN {col} {def}"))?;
        }
    }
    for col in ["audited_ms", "audit_failed", "passed_ms"] {
        if !has("locations", col)? {
            conn.execute_batch(&format!(
                "ALTER TABLE locations ADD COLUMN {col} INTEGER NOT NULL DEFAULT 0"
            ))?;
        }
    }
    conn.execute_batch("CREATE INDEX IF NOT EXISTS locations_by_audit ON locations (audited_ms)")?;
    // Reports counted before reasons and subjects were bounded may name made-up ones.
    let known: Vec<String> = api::REJECTED_REASONS
        .iter()
        .map(|r| format!("'{r}'"))
        .collect();
    conn.execute(
        &format!(
            "DELETE FROM reports WHERE (kind = 'rejected' AND reason NOT IN ({}, 'other'))
                OR (subject != 0 AND subject NOT IN (SELECT id FROM peers))",
            known.join(", ")
        ),
        params![],
    )?;
    Ok(())
}

fn pid(p: PeerId) -> i64 {
    p.0 as i64
}
fn to_pid(v: i64) -> PeerId {
    PeerId(v as u64)
}
fn blob32(v: Vec<u8>) -> [u8; 32] {
    let mut b = [0u8; 32];
    if v.len() == 32 {
        b.copy_from_slice(&v);
    }
    b
}

/// A registered peer as the server knows it.
#[derive(Debug, Clone)]
pub struct PeerRecord {
    /// Its id.
    pub id: PeerId,
    /// Its unique name.
    pub name: String,
    /// How its data key is kept.
    pub key_mode: KeyMode,
    /// Bytes it lends.
    pub lend_bytes: u64,
    /// Where its storage daemon listens.
    pub quic_addr: String,
    /// Its daemon's certificate fingerprint.
    pub fingerprint: Fingerprint,
    /// Free lent bytes at the last heartbeat.
    pub free_bytes: u64,
    /// Unix ms of the last heartbeat (0: never).
    pub last_seen_ms: u64,
    /// Bytes it stores on others, committed, every replica counted.
    pub stored_bytes: u64,
    /// Bytes of others' chunks it holds, committed.
    pub held_bytes: u64,
    /// Bytes of others' chunks it holds that passed an audit (its storage-exchange
    /// credit; recounted by the auditor).
    pub audited_bytes: u64,
}

const PEER_COLS: &str = "id, name, key_mode, lend_bytes, quic_addr, fingerprint, free_bytes, \
                         last_seen_ms, stored_bytes, held_bytes, audited_bytes";

fn peer_row(r: &db::Row<'_>) -> db::Result<PeerRecord> {
    let mode: String = r.get(2)?;
    Ok(PeerRecord {
        id: to_pid(r.get(0)?),
        name: r.get(1)?,
        key_mode: if mode == "passphrase" {
            KeyMode::Passphrase
        } else {
            KeyMode::Escrow
        },
        lend_bytes: r.get::<_, i64>(3)? as u64,
        quic_addr: r.get(4)?,
        fingerprint: Fingerprint(blob32(r.get(5)?)),
        free_bytes: r.get::<_, i64>(6)? as u64,
        last_seen_ms: r.get::<_, i64>(7)? as u64,
        stored_bytes: r.get::<_, i64>(8)? as u64,
        held_bytes: r.get::<_, i64>(9)? as u64,
        audited_bytes: r.get::<_, i64>(10)? as u64,
    })
}

/// What a registration stores.
pub struct NewPeer<'a> {
    /// Unique name.
    pub name: &'a str,
    /// Argon2id PHC string.
    pub password_hash: &'a str,
    /// How the data key is kept.
    pub key_mode: KeyMode,
    /// Bytes lent.
    pub lend_bytes: u64,
    /// Daemon address.
    pub quic_addr: &'a str,
    /// Daemon certificate fingerprint.
    pub fingerprint: Fingerprint,
}

/// One target (or holder) and the chunks a token for it must cover.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The peer.
    pub target: PeerId,
    /// Its address.
    pub addr: String,
    /// Its certificate fingerprint.
    pub fingerprint: Fingerprint,
    /// The transaction id reserved for its token.
    pub txid: TransactionId,
    /// Chunks and sizes.
    pub grants: Vec<(ChunkId, u32)>,
    /// Whether it was online when planned.
    pub online: bool,
}

/// The outcome of a put: targets to send to and chunks already stored.
#[derive(Debug, Default)]
pub struct PutPlan {
    /// One per target.
    pub placements: Vec<Planned>,
    /// Chunks already committed with enough replicas.
    pub already_stored: Vec<ChunkId>,
    /// Some chunk had a location already: the answer rests on committed locations (see
    /// [`Store::barrier`]).
    pub found_locations: bool,
}

/// The server's rules for one request, fixed by its configuration and clock.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Lent bytes divided by this is what a peer may store.
    pub quota_ratio: f64,
    /// With audits on: the quota before any audited holding (None: audits off, the
    /// quota follows the lent figure alone).
    pub quota_grace: Option<u64>,
    /// Now, unix ms.
    pub now_ms: u64,
    /// A peer whose last heartbeat is older than this (unix ms) is offline.
    pub online_cutoff_ms: u64,
    /// Expiry (unix s) of tokens issued now.
    pub expires_s: u64,
}

impl Policy {
    /// What a peer lending `lend` bytes and holding `audited` audited bytes for others
    /// may store.
    pub fn quota(&self, lend: u64, audited: u64) -> u64 {
        quota_for(lend, audited, self.quota_ratio, self.quota_grace)
    }
}

/// Bytes a peer may store: what it lends over `ratio`, and with audits on (`grace` set)
/// at most `grace` plus what it demonstrably holds for others over `ratio` (the storage
/// exchange counted on audited bytes, not on the `--lend` promise).
pub fn quota_for(lend: u64, audited: u64, ratio: f64, grace: Option<u64>) -> u64 {
    let over = |b: u64| (b as f64 / ratio).floor() as u64;
    match grace {
        None => over(lend),
        Some(g) => over(lend).min(g.saturating_add(over(audited))),
    }
}

/// What one confirm did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed {
    /// Locations it committed.
    pub committed: usize,
    /// Chunks with neither a pending placement for this holder nor a location on it: the
    /// daemon must not tell their owner they are stored.
    pub unexpected: Vec<ChunkId>,
}

/// Figures for `/metrics`, read from the database.
#[derive(Debug, Default)]
pub struct DbFigures {
    /// Registered peers.
    pub peers_total: u64,
    /// Peers with a recent heartbeat.
    pub peers_online: u64,
    /// Committed chunk locations (one per replica).
    pub locations: u64,
    /// Distinct (owner, chunk) pairs with a committed location.
    pub chunks: u64,
    /// Committed bytes, every replica counted.
    pub bytes: u64,
    /// Pending placements.
    pub pending: u64,
    /// Unused invite codes.
    pub invites: u64,
    /// Drop orders not yet acknowledged.
    pub drops: u64,
    /// Repair copies confirmed since the server started.
    pub repairs_done: u64,
    /// Failure reports: (subject peer, kind, reason, count).
    pub reports: Vec<(PeerId, String, String, u64)>,
    /// Peers suspended for failing audits.
    pub peers_suspended: u64,
    /// Peers disqualified for failing audits.
    pub peers_disqualified: u64,
}

/// The SQLite-backed state. Not thread-safe by itself: the server keeps it in a mutex.
pub struct Store {
    conn: Db,
    next_txid: u64,
    txid_hwm: u64,
    repairs_done: u64,
    /// The SQLite database file (its write-ahead log is `<path>-wal`); `None` on
    /// PostgreSQL.
    path: Option<PathBuf>,
    /// The write-ahead log, opened once it exists, for syncs made outside the store lock.
    wal: Option<Arc<Wal>>,
}

/// The write-ahead log, and how much of what was committed into it is known durable.
#[derive(Debug)]
struct Wal {
    file: std::fs::File,
    /// Commits made without waiting for the disk ([`Store::confirm_batch_deferred`]).
    committed: AtomicU64,
    /// Every commit up to this count is on disk.
    synced: AtomicU64,
}

/// Copies the write-ahead log into the database file from its own connection, so that
/// the store's commits do not wait for it (see [`Store::checkpointer`]).
pub struct Checkpointer(rusqlite::Connection);

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Checkpointer")
    }
}

impl Checkpointer {
    /// One passive checkpoint: copies what it can without waiting for writers or readers
    /// (a checkpoint never loses anything; the log keeps every frame until copied).
    /// Returns the frames in the log and how many of them are copied now.
    pub fn run(&self) -> rusqlite::Result<(i64, i64)> {
        self.0.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(1)?, r.get(2)?))
        })
    }
}

/// Committed transactions that may not be durable yet: [`WalSync::sync`] makes them so.
/// Nothing they wrote may be acknowledged, or answered from, before.
#[must_use = "a deferred commit is not durable until synced"]
#[derive(Debug, Clone)]
pub struct WalSync {
    wal: Option<Arc<Wal>>,
    upto: u64,
}

impl WalSync {
    /// Flush the write-ahead log to disk, unless a flush that began after these commits
    /// already did. The store lock need not be held: an fsync covers every frame written
    /// to the file before it, whoever wrote them.
    pub fn sync(&self) -> std::io::Result<()> {
        let Some(w) = &self.wal else {
            return Ok(());
        };
        if w.synced.load(Ordering::Acquire) >= self.upto {
            return Ok(());
        }
        // Every commit counted here has written its frames already.
        let covered = w.committed.load(Ordering::Acquire);
        w.file.sync_data()?;
        w.synced.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }
}

impl Store {
    /// Open (creating if needed) the SQLite database at `path`.
    pub fn open(path: &Path) -> db::Result<Store> {
        // The database holds password hashes and encrypted keys: create it 0600 (SQLite
        // gives its -wal and -shm files the same mode).
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
        }
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL for concurrent readers (the invite command); FULL so that a committed
        // location survives even a power cut, not only a killed process.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Placements and locations are keyed by random chunk ids, so a busy server touches
        // pages all over the file: keep more of them than SQLite's default 2 MiB.
        conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
        // Checkpoints run on their own connection ([`Checkpointer`]), outside the store
        // lock; this one checkpoints only when the log grew this large anyway (under a
        // steady stream of commits a checkpoint beside them never finds the whole log
        // copied, and only a checkpoint between two commits lets the log start over).
        conn.pragma_update(None, "wal_autocheckpoint", BACKSTOP_CHECKPOINT_PAGES)?;
        let conn = Db::sqlite(conn);
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        conn.execute_batch(repair::SCHEMA)?;
        Store::with_db(conn, Some(path.to_path_buf()))
    }

    /// Connect to the PostgreSQL database at `url` (it must exist), creating the
    /// store's tables in it if needed.
    pub fn open_postgres(url: &str) -> db::Result<Store> {
        let conn = Db::postgres(url)?;
        // Instances starting together: one creates the tables, the others wait for it.
        let tx = conn.write_tx()?;
        tx.execute_batch(&postgres_schema(SCHEMA))?;
        tx.execute_batch(&postgres_schema(repair::SCHEMA))?;
        tx.commit()?;
        Store::with_db(conn, None)
    }

    fn with_db(conn: Db, path: Option<PathBuf>) -> db::Result<Store> {
        let hwm: i64 = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'txid_hwm'",
                params![],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(1);
        // Every id below the stored mark may have been handed out before a crash: start
        // there, and reserve a fresh block on the first allocation.
        Ok(Store {
            conn,
            next_txid: hwm as u64,
            txid_hwm: hwm as u64,
            repairs_done: 0,
            path,
            wal: None,
        })
    }

    /// Which database the store is in.
    pub fn dialect(&self) -> db::Dialect {
        self.conn.dialect()
    }

    /// A second connection to the same database, for checkpoints made outside the store
    /// lock.
    /// `None` on PostgreSQL, which checkpoints by itself.
    pub fn checkpointer(&self) -> db::Result<Option<Checkpointer>> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // A checkpoint syncs the log before copying it and the database after.
        conn.pragma_update(None, "synchronous", "FULL")?;
        Ok(Some(Checkpointer(conn)))
    }

    /// Take or renew the lease `name` for `holder` until `now_ms + ttl_ms`: true when
    /// `holder` has it now (it was free, expired, or already its own).
    pub fn hold_lease(
        &mut self,
        name: &str,
        holder: u64,
        now_ms: u64,
        ttl_ms: u64,
    ) -> db::Result<bool> {
        let n = self.conn.execute(
            "INSERT INTO leases (name, holder, expires_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE
               SET holder = excluded.holder, expires_ms = excluded.expires_ms
               WHERE leases.holder = excluded.holder OR leases.expires_ms < ?4",
            params![name, holder as i64, (now_ms + ttl_ms) as i64, now_ms as i64],
        )?;
        Ok(n == 1)
    }

    /// The current transaction-id high-water mark (for tests and metrics).
    pub fn txid_high_water(&self) -> u64 {
        self.txid_hwm
    }

    /// Create `n` one-time invite codes.
    pub fn create_invites(&mut self, n: usize, now_ms: u64) -> db::Result<Vec<String>> {
        let tx = self.conn.write_tx()?;
        let mut codes = Vec::with_capacity(n);
        for _ in 0..n {
            let mut b = [0u8; 12];
            peerstash::keys::random_bytes(&mut b).map_err(|e| db::Error::Other(e.to_string()))?;
            let code = hex::encode(b);
            tx.execute(
                "INSERT INTO invites (code, created_ms) VALUES (?1, ?2)",
                params![code, now_ms as i64],
            )?;
            codes.push(code);
        }
        tx.commit()?;
        Ok(codes)
    }

    /// Whether `code` is an unused invite.
    pub fn invite_exists(&self, code: &str) -> db::Result<bool> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM invites WHERE code = ?1", [code], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Whether `name` is registered.
    pub fn name_taken(&self, name: &str) -> db::Result<bool> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM peers WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Register a peer: consume the invite (when one is required), check the name, pick a
    /// fresh id and store the encrypted key made by `seal_key` for that id — atomically.
    pub fn insert_peer(
        &mut self,
        new: &NewPeer<'_>,
        invite: Option<&str>,
        require_invite: bool,
        now_ms: u64,
        seal_key: impl Fn(PeerId) -> Result<Vec<u8>, StoreError>,
    ) -> Result<PeerId, StoreError> {
        let tx = self.conn.write_tx()?;
        let name_taken = tx
            .query_row(
                "SELECT 1 FROM peers WHERE name = ?1",
                [new.name],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if name_taken {
            return Err(StoreError::NameTaken(new.name.to_string()));
        }
        if require_invite {
            let code = invite.unwrap_or("");
            let used = tx.execute("DELETE FROM invites WHERE code = ?1", [code])?;
            if used != 1 {
                return Err(StoreError::BadInvite {
                    given: invite.is_some(),
                });
            }
        }
        let id = loop {
            let candidate = PeerId(random_u64().map_err(|e| StoreError::Internal(e.to_string()))?);
            if candidate.0 == 0 {
                continue;
            }
            let exists = tx
                .query_row(
                    "SELECT 1 FROM peers WHERE id = ?1",
                    [pid(candidate)],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if !exists {
                break candidate;
            }
        };
        let blob = seal_key(id)?;
        tx.execute(
            "INSERT INTO peers (id, name, password_hash, key_blob, key_mode, lend_bytes,
                                quic_addr, fingerprint, free_bytes, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                pid(id),
                new.name,
                new.password_hash,
                blob,
                key_mode_str(new.key_mode),
                new.lend_bytes as i64,
                new.quic_addr,
                new.fingerprint.0.to_vec(),
                new.lend_bytes as i64,
                now_ms as i64
            ],
        )?;
        tx.commit()?;
        Ok(id)
    }

    /// A peer with its password hash and encrypted key, by name.
    pub fn peer_for_login(&self, name: &str) -> db::Result<Option<(PeerRecord, String, Vec<u8>)>> {
        self.conn
            .query_row(
                &format!("SELECT {PEER_COLS}, password_hash, key_blob FROM peers WHERE name = ?1"),
                [name],
                |r| Ok((peer_row(r)?, r.get(11)?, r.get(12)?)),
            )
            .optional()
    }

    /// One peer's encrypted transaction key, if it is registered.
    pub fn key_blob(&self, id: PeerId) -> db::Result<Option<Vec<u8>>> {
        self.conn
            .prepare_cached("SELECT key_blob FROM peers WHERE id = ?1")?
            .query_row([pid(id)], |r| r.get(0))
            .optional()
    }

    /// Every peer's encrypted transaction key (loaded into memory at start).
    pub fn all_key_blobs(&self) -> db::Result<Vec<(PeerId, Vec<u8>)>> {
        let mut st = self.conn.prepare_cached("SELECT id, key_blob FROM peers")?;
        let rows = st.query_map(params![], |r| Ok((to_pid(r.get(0)?), r.get(1)?)))?;
        rows.collect()
    }

    /// One peer by id.
    pub fn peer(&self, id: PeerId) -> db::Result<Option<PeerRecord>> {
        self.conn
            .query_row(
                &format!("SELECT {PEER_COLS} FROM peers WHERE id = ?1"),
                [pid(id)],
                peer_row,
            )
            .optional()
    }

    /// Record a heartbeat; return the chunks the peer may drop.
    pub fn heartbeat(
        &mut self,
        id: PeerId,
        req: &HeartbeatRequest,
        now_ms: u64,
    ) -> db::Result<Vec<ChunkId>> {
        let tx = self.conn.write_tx()?;
        tx.execute(
            "UPDATE peers SET quic_addr = ?2, fingerprint = ?3, free_bytes = ?4, used_bytes = ?5,
                              last_seen_ms = ?6 WHERE id = ?1",
            params![
                pid(id),
                req.quic_addr,
                req.cert_fingerprint.0.to_vec(),
                req.free_bytes.min(i64::MAX as u64) as i64,
                req.used_bytes.min(i64::MAX as u64) as i64,
                now_ms as i64
            ],
        )?;
        {
            let mut del =
                tx.prepare_cached("DELETE FROM drops WHERE holder = ?1 AND chunk = ?2")?;
            for c in &req.dropped {
                del.execute(params![pid(id), c.0.to_vec()])?;
            }
        }
        let drops = {
            let mut st = tx.prepare_cached("SELECT chunk FROM drops WHERE holder = ?1 LIMIT ?2")?;
            let rows = st.query_map(params![pid(id), MAX_DROPS_PER_HEARTBEAT as i64], |r| {
                Ok(ChunkId(blob32(r.get(0)?)))
            })?;
            rows.collect::<db::Result<Vec<_>>>()?
        };
        tx.commit()?;
        Ok(drops)
    }

    /// Plan a put: dedupe, quota, placement; record pending placements. Refusals are
    /// decided before any write.
    pub fn put(
        &mut self,
        owner: PeerId,
        chunks: &[ChunkRef],
        replicas: u8,
        exclude: &[PeerId],
        policy: &Policy,
    ) -> Result<PutPlan, StoreError> {
        self.put_with_stripes(owner, chunks, &[], replicas, exclude, policy)
    }

    /// [`Store::put`] with erasure-coded stripes too: each stripe's shards without a
    /// location go to distinct peers (one copy each), avoiding peers holding the
    /// stripe's other shards.
    pub fn put_with_stripes(
        &mut self,
        owner: PeerId,
        chunks: &[ChunkRef],
        stripes: &[api::StripeRef],
        replicas: u8,
        exclude: &[PeerId],
        policy: &Policy,
    ) -> Result<PutPlan, StoreError> {
        self.without_fsync(|s| s.plan_put(owner, chunks, stripes, replicas, exclude, policy))
    }

    /// Run `f`'s transactions without waiting for the disk (SQLite's `synchronous =
    /// NORMAL`: atomic, and durable against a killed process, not against a power cut;
    /// PostgreSQL's `synchronous_commit = off`, see [`db::Db::wait_for_disk`]). For
    /// puts only: a pending placement lost to a power cut makes its target's confirm come
    /// back `unexpected`, and the client stores that chunk again. A new transaction-id
    /// mark is made durable before returning, so no id is ever handed out twice.
    fn without_fsync<T>(
        &mut self,
        f: impl FnOnce(&mut Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mark = self.txid_hwm;
        self.conn.wait_for_disk(false)?;
        let out = f(self);
        self.conn.wait_for_disk(true)?;
        if self.txid_hwm != mark {
            // A committing write that waits for the disk syncs the log up to it, and the
            // mark with it (on either database the log is written in order).
            self.conn.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'txid_hwm' AND value < ?1",
                params![self.txid_hwm as i64],
            )?;
        }
        out
    }

    fn plan_put(
        &mut self,
        owner: PeerId,
        chunks: &[ChunkRef],
        stripes: &[api::StripeRef],
        replicas: u8,
        exclude: &[PeerId],
        policy: &Policy,
    ) -> Result<PutPlan, StoreError> {
        check_put(chunks, stripes, replicas)?;
        let now_s = policy.now_ms / 1000;
        let tx = self.conn.write_tx()?;
        let me = tx
            .query_row(
                &format!("SELECT {PEER_COLS} FROM peers WHERE id = ?1"),
                [pid(owner)],
                peer_row,
            )
            .optional()?
            .ok_or(StoreError::UnknownPeer)?;
        // The owner's replica target is what repair restores.
        if !chunks.is_empty() {
            tx.execute(
                "UPDATE peers SET replicas = ?2 WHERE id = ?1 AND replicas != ?2",
                params![pid(owner), i64::from(replicas)],
            )?;
        }
        let mut plan = PutPlan::default();
        let wants = missing_copies(&tx, owner, chunks, stripes, replicas, now_s, &mut plan)?;
        if wants.is_empty() {
            return Ok(plan);
        }
        check_quota(&tx, &me, &wants, policy)?;
        let cands = candidates(&tx, owner, exclude, policy)?;
        // With audits on, holding for others is how a peer earns quota: peers that store
        // more than their holdings have earned are offered chunks first.
        let mut pool: Vec<Candidate> = cands
            .iter()
            .map(|(p, room)| Candidate {
                id: p.id,
                room: *room,
                needs_credit: policy.quota_grace.is_some()
                    && p.stored_bytes as f64 > p.audited_bytes as f64 / policy.quota_ratio,
            })
            .collect();
        let mut assign = placement::place(&mut pool, &wants).map_err(StoreError::NotEnoughPeers)?;

        // Record the pending placements under fresh transaction ids.
        let mut targets: Vec<usize> = assign.keys().copied().collect();
        targets.sort_unstable();
        let r = reserve_txids(&tx, self.next_txid, self.txid_hwm, targets.len() as u64)?;
        {
            let mut rows = Vec::new();
            let mut drops = Drops::default();
            for (k, i) in targets.iter().enumerate() {
                let txid = TransactionId(r.first + k as u64);
                let p = &cands[*i].0;
                let grants = assign.remove(i).unwrap_or_default();
                for (c, size) in &grants {
                    rows.push(PendingRow {
                        txid: txid.0 as i64,
                        chunk: c.0,
                        holder: pid(p.id),
                        owner: pid(owner),
                        size: i64::from(*size),
                        expires_s: policy.expires_s as i64,
                    });
                    drops.cancel(&tx, pid(p.id), &c.0)?;
                }
                plan.placements.push(Planned {
                    target: p.id,
                    addr: p.quic_addr.clone(),
                    fingerprint: p.fingerprint,
                    txid,
                    grants,
                    online: true,
                });
            }
            insert_pending(&tx, &rows)?;
        }
        tx.commit()?;
        self.next_txid = r.next;
        self.txid_hwm = r.hwm;
        Ok(plan)
    }

    /// A target confirms what it stored under `txid`: each chunk with a pending placement
    /// for this target becomes a committed location. A chunk without one (released
    /// meanwhile, or never placed there) is not committed, and the target is told to drop
    /// it unless it holds that chunk for someone.
    pub fn confirm(
        &mut self,
        holder: PeerId,
        txid: TransactionId,
        chunks: &[ChunkId],
    ) -> db::Result<usize> {
        Ok(self.confirm_batch(&[(holder, txid, chunks)])?[0].committed)
    }

    /// Several confirms in one database transaction (one fsync instead of one each): how
    /// many locations each committed. A confirm never refuses anything, so sharing the
    /// transaction cannot make one confirm fail because of another.
    pub fn confirm_batch(
        &mut self,
        batch: &[(PeerId, TransactionId, &[ChunkId])],
    ) -> db::Result<Vec<Confirmed>> {
        let (out, wal) = self.confirm_batch_deferred(batch)?;
        wal.sync()
            .map_err(|e| db::Error::Other(format!("syncing the database log: {e}")))?;
        Ok(out)
    }

    /// [`Store::confirm_batch`], committed without waiting for the disk: the caller
    /// syncs the returned [`WalSync`] (after releasing the store lock, so that puts and
    /// gets go on meanwhile) and only then acknowledges the confirms.
    ///
    /// Why this is as durable as `synchronous = FULL`: in WAL mode a commit appends the
    /// transaction's frames to the log, and FULL only adds an fsync of the log before
    /// returning. Here that fsync comes later but still before any acknowledgement.
    /// Frames the fsync should cover cannot have been overwritten meanwhile: SQLite
    /// rewrites the log from its start only after a checkpoint has copied every frame
    /// into the database file and synced it (which it does under NORMAL too). The log is
    /// deleted only when the last connection closes, and the store's stays open.
    pub fn confirm_batch_deferred(
        &mut self,
        batch: &[(PeerId, TransactionId, &[ChunkId])],
    ) -> db::Result<(Vec<Confirmed>, WalSync)> {
        let Some(wal) = self.wal_file() else {
            // No log yet to sync by hand: commit as everything else does.
            let out = self.write_confirms(batch)?;
            return Ok((out, self.barrier()));
        };
        self.conn.wait_for_disk(false)?;
        let out = self.write_confirms(batch);
        self.conn.wait_for_disk(true)?;
        let out = out?;
        let upto = wal.committed.fetch_add(1, Ordering::AcqRel) + 1;
        Ok((
            out,
            WalSync {
                wal: Some(wal),
                upto,
            },
        ))
    }

    /// What must be synced before answering from what the store holds now: deferred
    /// confirms committed and perhaps not durable yet. A no-op to sync when there are
    /// none. A put that found locations, or a get, syncs it before answering, so that no
    /// answer rests on a location a power cut could still take back.
    pub fn barrier(&self) -> WalSync {
        WalSync {
            wal: self.wal.clone(),
            upto: self
                .wal
                .as_ref()
                .map_or(0, |w| w.committed.load(Ordering::Acquire)),
        }
    }

    /// The write-ahead log, opened on first use (it exists once anything was written).
    fn wal_file(&mut self) -> Option<Arc<Wal>> {
        if self.wal.is_none() {
            let mut p = self.path.clone()?.into_os_string();
            p.push("-wal");
            self.wal = std::fs::File::open(p).ok().map(|file| {
                Arc::new(Wal {
                    file,
                    committed: AtomicU64::new(0),
                    synced: AtomicU64::new(0),
                })
            });
        }
        self.wal.clone()
    }

    fn write_confirms(
        &mut self,
        batch: &[(PeerId, TransactionId, &[ChunkId])],
    ) -> db::Result<Vec<Confirmed>> {
        let tx = self.conn.write_tx()?;
        let mut out = Vec::with_capacity(batch.len());
        let mut repaired = 0;
        {
            let mut held = tx.prepare_cached(HELD_OR_COMING)?;
            let mut located =
                tx.prepare_cached("SELECT 1 FROM locations WHERE holder = ?1 AND chunk = ?2")?;
            let mut drop = tx.prepare_cached(DROP_ORDER)?;
            // Byte counts are added up per peer and written once per confirm, not once per
            // chunk; see `Counts`.
            let mut counts = Counts::default();
            let mut drops = Drops::default();
            for (holder, txid, chunks) in batch {
                let (holder, txid) = (*holder, *txid);
                let mut committed = 0;
                let mut unexpected = Vec::new();
                // Every placement this confirm names, found and deleted in one statement
                // per [`rows_per_statement`] chunks; then their locations, written so too.
                let mut taken = by_chunk(
                    &tx,
                    "DELETE FROM pending WHERE txid = ?1 AND holder = ?2 AND chunk IN ({ids})
                     RETURNING chunk, owner, size, replaces",
                    &[&(txid.0 as i64), &pid(holder)],
                    chunks,
                    |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get(3)?)),
                )?;
                // In the confirm's order; a chunk named twice is taken once.
                let rows: Vec<(&ChunkId, Option<Taken>)> = chunks
                    .iter()
                    .map(|c| (c, taken.get_mut(c).and_then(Vec::pop)))
                    .collect();
                let holder_id = pid(holder);
                let new_locations: Vec<Vec<db::Value<'_>>> = rows
                    .iter()
                    .filter_map(|(c, row)| {
                        let (owner, size, _) = (*row)?;
                        Some(vec![
                            db::Value::Int(owner),
                            db::Value::Blob(&c.0),
                            db::Value::Int(holder_id),
                            db::Value::Int(size),
                        ])
                    })
                    .collect();
                let inserted: HashSet<ChunkId> = insert_rows(
                    &tx,
                    "INSERT INTO locations (owner, chunk, holder, size)",
                    "ON CONFLICT DO NOTHING RETURNING chunk",
                    &new_locations,
                    |r| Ok(ChunkId(blob32(r.get(0)?))),
                )?
                .into_iter()
                .collect();
                for (c, row) in rows {
                    let cb = c.0.to_vec();
                    match row {
                        Some((owner, size, replaces)) => {
                            if inserted.contains(c) {
                                counts.add(owner, pid(holder), size);
                                committed += 1;
                                // A repair copy takes the lost holder's place: that
                                // holder drops its copy if it ever comes back.
                                if let Some(lost) = replaces {
                                    counts.write(&tx)?;
                                    remove_location(&tx, owner, &cb, lost)?;
                                    drops.queued(lost);
                                    repaired += 1;
                                }
                            }
                            drops.cancel(&tx, pid(holder), &cb)?;
                        }
                        None => {
                            // No placement (swept after its token expired, or never made)
                            // and no location here: whoever stored it must not count it.
                            if !located.exists(params![pid(holder), cb])? {
                                unexpected.push(*c);
                            }
                            if !held.exists(params![pid(holder), cb])? {
                                drop.execute(params![pid(holder), cb])?;
                                drops.queued(pid(holder));
                            }
                        }
                    }
                }
                counts.write(&tx)?;
                out.push(Confirmed {
                    committed,
                    unexpected,
                });
            }
        }
        tx.commit()?;
        self.repairs_done += repaired;
        Ok(out)
    }

    /// Plan get tokens: for each chunk `owner` owns, its committed holders, grouped by
    /// holder, online holders first; for a chunk stored as a stripe, its shards' holders
    /// (and the stripe, so the client knows what to fetch). Chunks with no holder (or not
    /// owned) are missing.
    #[allow(clippy::type_complexity)]
    pub fn get(
        &mut self,
        owner: PeerId,
        chunks: &[ChunkId],
        online_cutoff_ms: u64,
    ) -> Result<(Vec<Planned>, Vec<ChunkId>, Vec<api::StripeRef>), StoreError> {
        if chunks.is_empty() || chunks.len() > api::MAX_CHUNKS_PER_REQUEST {
            return Err(StoreError::Invalid(format!(
                "a get names 1 to {} chunks, not {}",
                api::MAX_CHUNKS_PER_REQUEST,
                chunks.len()
            )));
        }
        let tx = self.conn.write_tx()?;
        let mut by_holder: HashMap<PeerId, Planned> = HashMap::new();
        let mut missing = Vec::new();
        let mut stripes = Vec::new();
        let mut seen = HashSet::new();
        {
            // Each chunk's holders: (chunk, holder, size, address, fingerprint, last seen).
            type Found = (ChunkId, PeerId, u32, String, Fingerprint, u64);
            let row = |id: ChunkId, r: &db::Row<'_>| -> db::Result<Found> {
                Ok((
                    id,
                    to_pid(r.get(1)?),
                    r.get::<_, i64>(2)? as u32,
                    r.get::<_, String>(3)?,
                    Fingerprint(blob32(r.get(4)?)),
                    r.get::<_, i64>(5)? as u64,
                ))
            };
            const HOLDERS: &str = "SELECT l.chunk, l.holder, l.size, p.quic_addr, p.fingerprint,
                                          p.last_seen_ms
                 FROM locations l JOIN peers p ON p.id = l.holder
                 WHERE l.owner = ?1 AND l.audit_failed != 1 AND l.chunk IN ({ids})";
            let mut found_of = by_chunk(&tx, HOLDERS, &[&pid(owner)], chunks, |r| {
                row(ChunkId(blob32(r.get(0)?)), r)
            })?;
            let mut st = tx.prepare_cached(
                "SELECT l.chunk, l.holder, l.size, p.quic_addr, p.fingerprint, p.last_seen_ms
                 FROM locations l JOIN peers p ON p.id = l.holder
                 WHERE l.owner = ?1 AND l.chunk = ?2 AND l.audit_failed != 1",
            )?;
            // A stripe's shards, one at a time (stripes are rare and few).
            let mut holders_of = |id: &ChunkId| -> db::Result<Vec<_>> {
                st.query_map(params![pid(owner), id.0.to_vec()], |r| row(*id, r))?
                    .collect()
            };
            for c in chunks {
                if !seen.insert(*c) {
                    continue;
                }
                let mut found = found_of.remove(c).unwrap_or_default();
                if found.is_empty() {
                    // A striped chunk: its shards' holders instead.
                    if let Some(stripe) = stripe_of(&tx, pid(owner), &c.0)? {
                        for sh in &stripe.shards {
                            found.extend(holders_of(&sh.id)?);
                        }
                        if !found.is_empty() {
                            stripes.push(stripe);
                        }
                    }
                }
                if found.is_empty() {
                    missing.push(*c);
                }
                for (id, holder, size, addr, fingerprint, seen_ms) in found {
                    by_holder
                        .entry(holder)
                        .or_insert_with(|| Planned {
                            target: holder,
                            addr,
                            fingerprint,
                            txid: TransactionId(0),
                            grants: Vec::new(),
                            online: seen_ms >= online_cutoff_ms,
                        })
                        .grants
                        .push((id, size));
                }
            }
        }
        let mut out: Vec<Planned> = by_holder.into_values().collect();
        // Online holders first, then the ones holding most of the batch.
        out.sort_by(|a, b| {
            b.online
                .cmp(&a.online)
                .then(b.grants.len().cmp(&a.grants.len()))
                .then(a.target.0.cmp(&b.target.0))
        });
        let r = reserve_txids(&tx, self.next_txid, self.txid_hwm, out.len() as u64)?;
        for (k, p) in out.iter_mut().enumerate() {
            p.txid = TransactionId(r.first + k as u64);
        }
        tx.commit()?;
        self.next_txid = r.next;
        self.txid_hwm = r.hwm;
        Ok((out, missing, stripes))
    }

    /// Keep a new sealed root for `peer`: refused ([`StoreError::StaleRoot`]) unless `version` is greater than
    /// every kept one; then only the newest `keep` versions stay. Returns the kept
    /// versions, newest first.
    pub fn put_root(
        &mut self,
        peer: PeerId,
        version: u64,
        sealed: &[u8],
        now_ms: u64,
        keep: usize,
    ) -> Result<Vec<u64>, StoreError> {
        let tx = self.conn.write_tx()?;
        let latest: Option<i64> = tx.query_row(
            "SELECT MAX(version) FROM roots WHERE peer = ?1",
            [pid(peer)],
            |r| r.get(0),
        )?;
        if let Some(latest) = latest {
            if version as i64 <= latest {
                return Err(StoreError::StaleRoot {
                    version,
                    latest: latest as u64,
                });
            }
        }
        tx.execute(
            "INSERT INTO roots (peer, version, created_ms, sealed) VALUES (?1, ?2, ?3, ?4)",
            params![pid(peer), version as i64, now_ms as i64, sealed],
        )?;
        tx.execute(
            "DELETE FROM roots WHERE peer = ?1 AND version NOT IN
             (SELECT version FROM roots WHERE peer = ?1 ORDER BY version DESC LIMIT ?2)",
            params![pid(peer), keep.max(1) as i64],
        )?;
        let kept = Self::root_versions(&tx, peer)?;
        tx.commit()?;
        Ok(kept)
    }

    /// Forget earlier roots of `peer` (versions it does not keep are ignored); refused
    /// ([`StoreError::LatestRoot`]) when `versions` names the latest kept one. Returns the kept versions, newest
    /// first.
    pub fn drop_roots(&mut self, peer: PeerId, versions: &[u64]) -> Result<Vec<u64>, StoreError> {
        let tx = self.conn.write_tx()?;
        let latest = Self::root_versions(&tx, peer)?.first().copied();
        if let Some(l) = latest.filter(|l| versions.contains(l)) {
            return Err(StoreError::LatestRoot(l));
        }
        {
            let mut st = tx.prepare_cached("DELETE FROM roots WHERE peer = ?1 AND version = ?2")?;
            for v in versions.iter().filter(|v| **v <= i64::MAX as u64) {
                st.execute(params![pid(peer), *v as i64])?;
            }
        }
        let kept = Self::root_versions(&tx, peer)?;
        tx.commit()?;
        Ok(kept)
    }

    fn root_versions(c: &Db, peer: PeerId) -> db::Result<Vec<u64>> {
        let mut st =
            c.prepare_cached("SELECT version FROM roots WHERE peer = ?1 ORDER BY version DESC")?;
        let rows = st.query_map([pid(peer)], |r| r.get::<_, i64>(0).map(|v| v as u64))?;
        rows.collect()
    }

    /// A kept sealed root (the latest when `version` is `None`) and the kept versions:
    /// `(version, created_ms, sealed)`.
    #[allow(clippy::type_complexity)]
    pub fn get_root(
        &self,
        peer: PeerId,
        version: Option<u64>,
    ) -> Result<(Option<(u64, u64, Vec<u8>)>, Vec<u64>), StoreError> {
        let kept = Self::root_versions(&self.conn, peer)?;
        let want = match version {
            Some(v) => Some(v),
            None => kept.first().copied(),
        };
        let root = match want {
            None => None,
            Some(v) => self
                .conn
                .query_row(
                    "SELECT created_ms, sealed FROM roots WHERE peer = ?1 AND version = ?2",
                    params![pid(peer), v as i64],
                    |r| Ok((v, r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?)),
                )
                .optional()?,
        };
        Ok((root, kept))
    }

    /// Release chunks `owner` no longer references: drop its locations and pending
    /// placements; holders that keep no other owner's copy learn to drop them.
    pub fn release(&mut self, owner: PeerId, chunks: &[ChunkId]) -> Result<usize, StoreError> {
        if chunks.len() > api::MAX_CHUNKS_PER_REQUEST {
            return Err(StoreError::Invalid(format!(
                "a release names at most {} chunks",
                api::MAX_CHUNKS_PER_REQUEST
            )));
        }
        let tx = self.conn.write_tx()?;
        let mut released = 0;
        {
            let mut locs =
                tx.prepare_cached("SELECT holder FROM locations WHERE owner = ?1 AND chunk = ?2")?;
            let mut del_pending =
                tx.prepare_cached("DELETE FROM pending WHERE owner = ?1 AND chunk = ?2")?;
            let mut del_repairs =
                tx.prepare_cached("DELETE FROM repairs WHERE owner = ?1 AND chunk = ?2")?;
            for c in chunks {
                // A striped chunk goes with all its shards.
                let mut ids = vec![c.0.to_vec()];
                if let Some(stripe) = stripe_of(&tx, pid(owner), &c.0)? {
                    ids.extend(stripe.shards.iter().map(|s| s.id.0.to_vec()));
                    tx.execute(
                        "DELETE FROM stripes WHERE owner = ?1 AND chunk = ?2",
                        params![pid(owner), c.0.to_vec()],
                    )?;
                    tx.execute(
                        "DELETE FROM stripe_shards WHERE owner = ?1 AND chunk = ?2",
                        params![pid(owner), c.0.to_vec()],
                    )?;
                }
                let mut any = false;
                for cb in &ids {
                    let holders: Vec<i64> = locs
                        .query_map(params![pid(owner), cb], |r| r.get(0))?
                        .collect::<db::Result<_>>()?;
                    let pend = del_pending.execute(params![pid(owner), cb])?;
                    del_repairs.execute(params![pid(owner), cb])?;
                    for holder in &holders {
                        remove_location(&tx, pid(owner), cb, *holder)?;
                    }
                    any |= !holders.is_empty() || pend > 0;
                }
                if any {
                    released += 1;
                }
            }
        }
        tx.commit()?;
        Ok(released)
    }

    /// Count a failure report against the peer it is about; a failed transfer also frees
    /// the pending placements it names (they no longer count against the quota).
    ///
    /// Everything counted is bounded: the reason is one of a closed set (anything else is
    /// `other`), and a subject that is not a registered peer is counted as [`NO_PEER`], so
    /// made-up reasons or ids cannot grow the table or `/metrics`. Returns what was
    /// counted: (subject, kind, reason).
    pub fn report(
        &mut self,
        reporter: PeerId,
        req: &ReportRequest,
    ) -> db::Result<(PeerId, &'static str, &'static str)> {
        let tx = self.conn.write_tx()?;
        let (subject, kind, reason) = match req {
            ReportRequest::Rejected {
                requester, reason, ..
            } => (
                requester.unwrap_or(reporter),
                "rejected",
                known_reason(reason),
            ),
            ReportRequest::BadChunk { holder, chunk } => {
                // The owner's word is not proof (it could be settling a score): the
                // location is audited at the next round instead, and repaired if it fails.
                tx.execute(
                    "UPDATE locations SET audited_ms = 0
                     WHERE owner = ?1 AND chunk = ?2 AND holder = ?3 AND audit_failed != 1",
                    params![pid(reporter), chunk.0.to_vec(), pid(*holder)],
                )?;
                (*holder, "bad_chunk", "bad_hash")
            }
            ReportRequest::TransferFailed {
                target,
                txid,
                chunks,
            } => {
                let mut del = tx.prepare_cached(
                    "DELETE FROM pending WHERE txid = ?1 AND chunk = ?2 AND holder = ?3 AND owner = ?4",
                )?;
                for c in chunks {
                    del.execute(params![
                        txid.0 as i64,
                        c.0.to_vec(),
                        pid(*target),
                        pid(reporter)
                    ])?;
                }
                (*target, "transfer_failed", "transfer_failed")
            }
        };
        let registered = tx
            .prepare_cached("SELECT 1 FROM peers WHERE id = ?1")?
            .exists([pid(subject)])?;
        let subject = if registered { subject } else { NO_PEER };
        tx.execute(
            "INSERT INTO reports (subject, kind, reason, count) VALUES (?1, ?2, ?3, 1)
             ON CONFLICT(subject, kind, reason) DO UPDATE SET count = reports.count + 1",
            params![pid(subject), kind, reason],
        )?;
        tx.commit()?;
        Ok((subject, kind, reason))
    }

    /// Of `chunks` on `holder`'s disk, those it keeps for nobody: no location and no
    /// pending placement on it ([`HELD_OR_COMING`]).
    pub fn unknown_on(&self, holder: PeerId, chunks: &[ChunkId]) -> db::Result<Vec<ChunkId>> {
        let mut held = self.conn.prepare_cached(HELD_OR_COMING)?;
        let mut out = Vec::new();
        for c in chunks {
            if !held.exists(params![pid(holder), c.0.to_vec()])? {
                out.push(*c);
            }
        }
        Ok(out)
    }

    /// Figures for a peer's status: (record, pending bytes owned, peers online, total).
    pub fn status(
        &self,
        id: PeerId,
        online_cutoff_ms: u64,
        now_s: u64,
    ) -> db::Result<Option<(PeerRecord, u64, u64, u64)>> {
        let Some(p) = self.peer(id)? else {
            return Ok(None);
        };
        let pending: i64 = self.conn.query_row(
            "SELECT COALESCE(SUM(size), 0) FROM pending
             WHERE owner = ?1 AND expires_s > ?2 AND replaces IS NULL",
            params![pid(id), now_s as i64],
            |r| r.get(0),
        )?;
        let (online, total): (i64, i64) = self.conn.query_row(
            "SELECT COALESCE(SUM(CASE WHEN last_seen_ms >= ?1 THEN 1 ELSE 0 END), 0), COUNT(*) FROM peers",
            [online_cutoff_ms as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(Some((p, pending as u64, online as u64, total as u64)))
    }

    /// Peers still counted online whose last sign of life is older than `seen_before_ms`:
    /// the ones the server checks itself before they time out.
    pub fn peers_to_probe(
        &self,
        seen_before_ms: u64,
        online_cutoff_ms: u64,
    ) -> db::Result<Vec<PeerRecord>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {PEER_COLS} FROM peers WHERE last_seen_ms >= ?1 AND last_seen_ms < ?2"
        ))?;
        let rows = st.query_map(
            params![online_cutoff_ms as i64, seen_before_ms as i64],
            peer_row,
        )?;
        rows.collect()
    }

    /// A peer answered the server's own status check.
    pub fn mark_seen(&mut self, id: PeerId, free_bytes: u64, now_ms: u64) -> db::Result<()> {
        self.conn.execute(
            "UPDATE peers SET free_bytes = ?2, last_seen_ms = ?3 WHERE id = ?1",
            params![
                pid(id),
                free_bytes.min(i64::MAX as u64) as i64,
                now_ms as i64
            ],
        )?;
        Ok(())
    }

    /// Forget pending placements that expired more than `grace_s` ago, and universal
    /// grants no daemon accepts any more.
    pub fn sweep_pending(&mut self, now_s: u64, grace_s: u64) -> db::Result<usize> {
        self.conn.execute(
            "DELETE FROM universal_grants WHERE expires_s < ?1",
            [now_s.saturating_sub(TOKEN_SKEW_S) as i64],
        )?;
        self.conn.execute(
            "DELETE FROM pending WHERE expires_s < ?1",
            [now_s.saturating_sub(grace_s) as i64],
        )
    }

    /// Peak-load mode: which of the planned tokens `requester` may get as universal
    /// tokens. A universal token allows every operation but delete on each chunk it names
    /// (put, get, stream), so it is granted only where each of those chunks is the
    /// requester's alone on that target: no other owner has a location or a pending
    /// placement of it there, and no other requester a live universal grant for it there.
    /// Grants are recorded, so that until they expire no other owner's copy of those
    /// chunks is placed on those targets ([`granted_to_others`]). The others get the
    /// token kind they asked for.
    pub fn grant_universal(
        &mut self,
        requester: PeerId,
        planned: &[Planned],
        expires_s: u64,
        now_s: u64,
    ) -> db::Result<Vec<bool>> {
        let tx = self.conn.write_tx()?;
        let mut out = Vec::with_capacity(planned.len());
        {
            let mut shared = tx.prepare_cached(
                "SELECT 1 FROM locations WHERE holder = ?1 AND chunk = ?2 AND owner != ?3
                 UNION ALL
                 SELECT 1 FROM pending WHERE holder = ?1 AND chunk = ?2 AND owner != ?3
                 UNION ALL
                 SELECT 1 FROM universal_grants
                 WHERE chunk = ?2 AND holder = ?1 AND requester != ?3 AND expires_s >= ?4
                 LIMIT 1",
            )?;
            let mut grant = tx.prepare_cached(
                "INSERT INTO universal_grants (chunk, holder, requester, expires_s)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (chunk, holder, requester)
                 DO UPDATE SET expires_s = CASE WHEN excluded.expires_s > universal_grants.expires_s
                   THEN excluded.expires_s ELSE universal_grants.expires_s END",
            )?;
            let live = now_s.saturating_sub(TOKEN_SKEW_S) as i64;
            for p in planned {
                let mut alone = true;
                for (c, _) in &p.grants {
                    if shared.exists(params![pid(p.target), c.0.to_vec(), pid(requester), live])? {
                        alone = false;
                        break;
                    }
                }
                if alone {
                    for (c, _) in &p.grants {
                        grant.execute(params![
                            c.0.to_vec(),
                            pid(p.target),
                            pid(requester),
                            expires_s as i64
                        ])?;
                    }
                }
                out.push(alone);
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Figures for `/metrics`.
    pub fn figures(&self, online_cutoff_ms: u64) -> db::Result<DbFigures> {
        let one = |sql: &str| -> db::Result<u64> {
            self.conn
                .query_row(sql, params![], |r| r.get::<_, i64>(0))
                .map(|v| v as u64)
        };
        let mut f = DbFigures {
            peers_total: one("SELECT COUNT(*) FROM peers")?,
            peers_online: self.conn.query_row(
                "SELECT COUNT(*) FROM peers WHERE last_seen_ms >= ?1",
                [online_cutoff_ms as i64],
                |r| r.get::<_, i64>(0),
            )? as u64,
            locations: one("SELECT COUNT(*) FROM locations")?,
            chunks: one("SELECT COUNT(*) FROM (SELECT DISTINCT owner, chunk FROM locations) AS c")?,
            bytes: one("SELECT COALESCE(SUM(stored_bytes), 0) FROM peers")?,
            pending: one("SELECT COUNT(*) FROM pending")?,
            invites: one("SELECT COUNT(*) FROM invites")?,
            drops: one("SELECT COUNT(*) FROM drops")?,
            repairs_done: self.repairs_done,
            reports: Vec::new(),
            peers_suspended: one("SELECT COUNT(*) FROM peers WHERE standing = 1")?,
            peers_disqualified: one("SELECT COUNT(*) FROM peers WHERE standing = 2")?,
        };
        let mut st = self.conn.prepare_cached(
            "SELECT subject, kind, reason, count FROM reports ORDER BY subject, kind",
        )?;
        let rows = st.query_map(params![], |r| {
            Ok((
                to_pid(r.get(0)?),
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)? as u64,
            ))
        })?;
        for r in rows {
            f.reports.push(r?);
        }
        Ok(f)
    }
}

/// Whether a holder keeps a chunk for some owner (a location), or is about to (a pending
/// placement, expired or not, until swept: its confirm still commits). Parameters: holder,
/// chunk. A holder is never told to drop, and never reconciles away, such a chunk.
/// Bytes committed in a confirm, added up per peer: the owners' `stored_bytes` and the
/// holder's `held_bytes` are each updated once per confirm instead of once per chunk.
#[derive(Default)]
struct Counts {
    stored: HashMap<i64, i64>,
    held: HashMap<i64, i64>,
}

impl Counts {
    fn add(&mut self, owner: i64, holder: i64, size: i64) {
        *self.stored.entry(owner).or_default() += size;
        *self.held.entry(holder).or_default() += size;
    }

    /// Write what was added up. Also called before any decrement of the same counters
    /// (they clamp at zero), so the order of additions and removals stays as it was.
    fn write(&mut self, c: &Db) -> db::Result<()> {
        let mut st =
            c.prepare_cached("UPDATE peers SET stored_bytes = stored_bytes + ?2 WHERE id = ?1")?;
        for (owner, n) in self.stored.drain() {
            st.execute(params![owner, n])?;
        }
        let mut st =
            c.prepare_cached("UPDATE peers SET held_bytes = held_bytes + ?2 WHERE id = ?1")?;
        for (holder, n) in self.held.drain() {
            st.execute(params![holder, n])?;
        }
        Ok(())
    }
}

/// Which holders have drop orders queued, asked once per holder and transaction: drop
/// orders are rare, and most placements and confirms need not look for one per chunk.
#[derive(Default)]
struct Drops(HashMap<i64, bool>);

impl Drops {
    fn any(&mut self, c: &Db, holder: i64) -> db::Result<bool> {
        if let Some(any) = self.0.get(&holder) {
            return Ok(*any);
        }
        let any = c
            .prepare_cached("SELECT 1 FROM drops WHERE holder = ?1 LIMIT 1")?
            .exists([holder])?;
        self.0.insert(holder, any);
        Ok(any)
    }

    /// A drop order for `holder` was queued in this transaction.
    fn queued(&mut self, holder: i64) {
        self.0.insert(holder, true);
    }

    /// `chunk` is (or is about to be) expected on `holder`: a drop order for it, queued
    /// earlier, would delete a chunk the server counts there.
    fn cancel(&mut self, c: &Db, holder: i64, chunk: &[u8]) -> db::Result<()> {
        if self.any(c, holder)? {
            c.prepare_cached("DELETE FROM drops WHERE holder = ?1 AND chunk = ?2")?
                .execute(params![holder, chunk])?;
        }
        Ok(())
    }
}

const HELD_OR_COMING: &str = "SELECT 1 FROM locations WHERE holder = ?1 AND chunk = ?2
                              UNION ALL
                              SELECT 1 FROM pending WHERE holder = ?1 AND chunk = ?2
                              LIMIT 1";

/// A placement of `chunk` on `holder` was just recorded: a drop order for it, queued
/// earlier, would now delete a chunk the server expects there.
fn expect_on(c: &Db, holder: i64, chunk: &[u8]) -> db::Result<()> {
    c.prepare_cached("DELETE FROM drops WHERE holder = ?1 AND chunk = ?2")?
        .execute(params![holder, chunk])?;
    Ok(())
}

/// Holders on which a peer other than `owner` holds a live universal grant for `chunk`
/// (peak-load mode). A copy of `owner`'s placed there could be read with that grant, so
/// placements avoid them until the grant expires (with the daemons' clock skew).
pub(crate) fn granted_to_others(
    c: &Db,
    owner: PeerId,
    chunk: &ChunkId,
    now_s: u64,
) -> db::Result<HashSet<PeerId>> {
    let mut st = c.prepare_cached(
        "SELECT DISTINCT holder FROM universal_grants
         WHERE chunk = ?1 AND requester != ?2 AND expires_s >= ?3",
    )?;
    let rows = st.query_map(
        params![
            chunk.0.to_vec(),
            pid(owner),
            now_s.saturating_sub(TOKEN_SKEW_S) as i64
        ],
        |r| Ok(to_pid(r.get(0)?)),
    )?;
    rows.collect()
}

/// Delete one location: the owner stops paying for it, the holder stops counting it, and
/// the holder is told to drop its copy unless it keeps that chunk for another owner.
/// Returns whether the location existed.
fn remove_location(c: &Db, owner: i64, chunk: &[u8], holder: i64) -> db::Result<bool> {
    let size: Option<i64> = c
        .prepare_cached(
            "DELETE FROM locations WHERE owner = ?1 AND chunk = ?2 AND holder = ?3 RETURNING size",
        )?
        .query_row(params![owner, chunk, holder], |r| r.get(0))
        .optional()?;
    let Some(size) = size else {
        return Ok(false);
    };
    c.prepare_cached(
        "UPDATE peers SET stored_bytes = CASE WHEN stored_bytes > ?2 THEN stored_bytes - ?2 ELSE 0 END
         WHERE id = ?1",
    )?
        .execute(params![owner, size])?;
    c.prepare_cached(
        "UPDATE peers SET held_bytes = CASE WHEN held_bytes > ?2 THEN held_bytes - ?2 ELSE 0 END
         WHERE id = ?1",
    )?
    .execute(params![holder, size])?;
    let still_held = c
        .prepare_cached(HELD_OR_COMING)?
        .exists(params![holder, chunk])?;
    if !still_held {
        c.prepare_cached(DROP_ORDER)?
            .execute(params![holder, chunk])?;
    }
    Ok(true)
}

/// A put's own bounds: 1 to [`api::MAX_CHUNKS_PER_REQUEST`] chunks and shards, each
/// named once and 1 to [`MAX_CHUNK_SIZE`] bytes, well-formed stripes, 1 to
/// [`MAX_REPLICAS`] replicas.
fn check_put(
    chunks: &[ChunkRef],
    stripes: &[api::StripeRef],
    replicas: u8,
) -> Result<(), StoreError> {
    let shard_count: usize = stripes.iter().map(|s| s.shards.len()).sum();
    let named = chunks.len() + shard_count;
    if named == 0 || named > api::MAX_CHUNKS_PER_REQUEST {
        return Err(StoreError::Invalid(format!(
            "a put names 1 to {} chunks and shards, not {named}",
            api::MAX_CHUNKS_PER_REQUEST,
        )));
    }
    for st in stripes {
        check_stripe(st)?;
    }
    if replicas == 0 || replicas > MAX_REPLICAS {
        return Err(StoreError::Invalid(format!(
            "replicas must be 1 to {MAX_REPLICAS}, not {replicas}"
        )));
    }
    let mut seen = HashSet::with_capacity(named);
    for c in chunks
        .iter()
        .chain(stripes.iter().flat_map(|s| s.shards.iter()))
    {
        // A sealed chunk is never empty (nonce and tag alone are 28 bytes).
        if c.size == 0 || c.size > MAX_CHUNK_SIZE {
            return Err(StoreError::Invalid(format!(
                "chunk {} is {} bytes; chunks are 1 to {MAX_CHUNK_SIZE} bytes",
                c.id, c.size
            )));
        }
        if !seen.insert(c.id) {
            return Err(StoreError::Invalid(format!(
                "chunk {} is named twice",
                c.id
            )));
        }
    }
    Ok(())
}

/// The copies a put still needs: for each chunk, how many more holders it wants and
/// which peers to avoid (its holders, and peers granted it for someone else); for each
/// stripe, its missing shards, grouped so they land on distinct peers. Chunks (and
/// stripes) already at their target go to `plan.already_stored`; the stripes are
/// recorded.
fn missing_copies(
    tx: &Tx<'_>,
    owner: PeerId,
    chunks: &[ChunkRef],
    stripes: &[api::StripeRef],
    replicas: u8,
    now_s: u64,
    plan: &mut PutPlan,
) -> db::Result<Vec<Want>> {
    let mut wants = Vec::new();
    // Universal grants exist only in peak-load mode: without any, no chunk needs
    // looking up.
    let any_grants = tx
        .prepare_cached("SELECT 1 FROM universal_grants LIMIT 1")?
        .exists(params![])?;
    let granted = |id: &ChunkId| -> db::Result<HashSet<PeerId>> {
        if any_grants {
            granted_to_others(tx, owner, id, now_s)
        } else {
            Ok(HashSet::new())
        }
    };
    let want = |c: &ChunkRef, copies, avoid, stripe| Want {
        chunk: c.id,
        size: c.size,
        copies,
        avoid,
        stripe,
    };
    let mut st =
        tx.prepare_cached("SELECT holder FROM locations WHERE owner = ?1 AND chunk = ?2")?;
    let mut holders_of = |id: &ChunkId| -> db::Result<HashSet<PeerId>> {
        st.query_map(params![pid(owner), id.0.to_vec()], |r| {
            Ok(to_pid(r.get(0)?))
        })?
        .collect()
    };
    let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
    let holders_of_chunk = by_chunk(
        tx,
        "SELECT chunk, holder FROM locations WHERE owner = ?1 AND chunk IN ({ids})",
        &[&pid(owner)],
        &ids,
        |r| Ok(to_pid(r.get(1)?)),
    )?;
    for c in chunks {
        let holders: HashSet<PeerId> = holders_of_chunk
            .get(&c.id)
            .map(|h| h.iter().copied().collect())
            .unwrap_or_default();
        plan.found_locations |= !holders.is_empty();
        if holders.len() >= replicas as usize {
            plan.already_stored.push(c.id);
        } else {
            let need = replicas as usize - holders.len();
            let mut avoid = holders;
            avoid.extend(granted(&c.id)?);
            wants.push(want(c, need, avoid, None));
        }
    }
    for (g, stripe) in stripes.iter().enumerate() {
        let mut per_shard = Vec::with_capacity(stripe.shards.len());
        let mut stripe_holders = HashSet::new();
        for sh in &stripe.shards {
            let holders = holders_of(&sh.id)?;
            plan.found_locations |= !holders.is_empty();
            stripe_holders.extend(holders.iter().copied());
            per_shard.push(holders.is_empty());
        }
        record_stripe(tx, pid(owner), stripe)?;
        if per_shard.iter().all(|missing| !missing) {
            plan.already_stored.push(stripe.chunk);
            continue;
        }
        for (sh, missing) in stripe.shards.iter().zip(per_shard) {
            if missing {
                let mut avoid = stripe_holders.clone();
                avoid.extend(granted(&sh.id)?);
                wants.push(want(sh, 1, avoid, Some(g)));
            }
        }
    }
    Ok(wants)
}

/// Refuse a put whose copies would take `me` past its quota: committed plus still
/// pending bytes, every replica counted.
fn check_quota(
    tx: &Tx<'_>,
    me: &PeerRecord,
    wants: &[Want],
    policy: &Policy,
) -> Result<(), StoreError> {
    let pending_owned: i64 = tx.query_row(
        "SELECT COALESCE(SUM(size), 0) FROM pending
         WHERE owner = ?1 AND expires_s > ?2 AND replaces IS NULL",
        params![pid(me.id), (policy.now_ms / 1000) as i64],
        |r| r.get(0),
    )?;
    let used = me.stored_bytes + pending_owned as u64;
    let needed: u64 = wants
        .iter()
        .map(|w| u64::from(w.size) * w.copies as u64)
        .sum();
    let quota = policy.quota(me.lend_bytes, me.audited_bytes);
    if used + needed <= quota {
        return Ok(());
    }
    let why = match policy.quota_grace {
        Some(g) if quota < policy.quota(me.lend_bytes, u64::MAX) => format!(
            "{g} bytes to start with + {} bytes you hold for others, audited, / ratio {};              it grows as your storage daemon holds and keeps others' data",
            me.audited_bytes, policy.quota_ratio
        ),
        _ => format!(
            "{} bytes lent / ratio {}; lend more space",
            me.lend_bytes, policy.quota_ratio
        ),
    };
    Err(StoreError::OverQuota {
        needed,
        used,
        quota,
        why,
    })
}

/// Who may take a put's copies: peers online and in good standing, not the owner, not
/// `exclude`d, each with its room (the smaller of what its daemon reports free and
/// what it lends beyond what it holds, less what is pending on it).
fn candidates(
    tx: &Tx<'_>,
    owner: PeerId,
    exclude: &[PeerId],
    policy: &Policy,
) -> db::Result<Vec<(PeerRecord, u64)>> {
    let mut st = tx.prepare_cached(&format!(
        "SELECT {PEER_COLS}, (SELECT COALESCE(SUM(size), 0) FROM pending q
                              WHERE q.holder = peers.id AND q.expires_s > ?3)
         FROM peers WHERE last_seen_ms >= ?1 AND id != ?2 AND standing = 0"
    ))?;
    let rows = st.query_map(
        params![
            policy.online_cutoff_ms as i64,
            pid(owner),
            (policy.now_ms / 1000) as i64
        ],
        |r| Ok((peer_row(r)?, r.get::<_, i64>(11)? as u64)),
    )?;
    let mut cands = Vec::new();
    for row in rows {
        let (p, pending_held) = row?;
        if exclude.contains(&p.id) {
            continue;
        }
        // The daemon's report may lag a confirm; the server's own count may miss space
        // the daemon uses otherwise: trust the smaller.
        let room = p
            .free_bytes
            .min(p.lend_bytes.saturating_sub(p.held_bytes))
            .saturating_sub(pending_held);
        cands.push((p, room));
    }
    Ok(cands)
}

/// Bounds on a stripe from the network: the geometry `peerstash::erasure` would give.
fn check_stripe(st: &api::StripeRef) -> Result<(), StoreError> {
    let bad = |why: &str| StoreError::Invalid(format!("stripe {}: {why}", st.chunk));
    let total = st.data as usize + st.parity as usize;
    if st.data == 0 || st.parity == 0 || total > api::MAX_STRIPE_SHARDS {
        return Err(bad("bad shard counts"));
    }
    if st.shards.len() != total {
        return Err(bad("wrong number of shards"));
    }
    if st.chunk_size == 0 || st.chunk_size > MAX_CHUNK_SIZE {
        return Err(bad("chunk size out of range"));
    }
    let len = st.shards[0].size;
    if st.shards.iter().any(|s| s.size != len)
        || u64::from(len) * u64::from(st.data) < u64::from(st.chunk_size)
        || len > MAX_CHUNK_SIZE
    {
        return Err(bad("shard sizes do not fit the chunk"));
    }
    Ok(())
}

/// Remember which shards make up a striped chunk (the latest put wins).
fn record_stripe(c: &Db, owner: i64, st: &api::StripeRef) -> db::Result<()> {
    let cb = st.chunk.0.to_vec();
    c.prepare_cached(
        "INSERT INTO stripes (owner, chunk, chunk_size, data, parity)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (owner, chunk) DO UPDATE SET chunk_size = excluded.chunk_size,
           data = excluded.data, parity = excluded.parity",
    )?
    .execute(params![owner, cb, st.chunk_size, st.data, st.parity])?;
    c.prepare_cached("DELETE FROM stripe_shards WHERE owner = ?1 AND chunk = ?2")?
        .execute(params![owner, cb])?;
    let mut ins = c.prepare_cached(
        "INSERT INTO stripe_shards (owner, chunk, idx, shard, size) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for (i, sh) in st.shards.iter().enumerate() {
        ins.execute(params![owner, cb, i as i64, sh.id.0.to_vec(), sh.size])?;
    }
    Ok(())
}

/// The stripe a chunk is stored as, if any.
pub(crate) fn stripe_of(c: &Db, owner: i64, chunk: &[u8]) -> db::Result<Option<api::StripeRef>> {
    let head: Option<(u32, u8, u8)> = c
        .prepare_cached(
            "SELECT chunk_size, data, parity FROM stripes WHERE owner = ?1 AND chunk = ?2",
        )?
        .query_row(params![owner, chunk], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let Some((chunk_size, data, parity)) = head else {
        return Ok(None);
    };
    let mut st = c.prepare_cached(
        "SELECT shard, size FROM stripe_shards WHERE owner = ?1 AND chunk = ?2 ORDER BY idx",
    )?;
    let shards = st
        .query_map(params![owner, chunk], |r| {
            Ok(ChunkRef {
                id: ChunkId(blob32(r.get(0)?)),
                size: r.get(1)?,
            })
        })?
        .collect::<db::Result<Vec<_>>>()?;
    Ok(Some(api::StripeRef {
        chunk: ChunkId(blob32(chunk.to_vec())),
        chunk_size,
        data,
        parity,
        shards,
    }))
}

fn key_mode_str(m: KeyMode) -> &'static str {
    match m {
        KeyMode::Escrow => "escrow",
        KeyMode::Passphrase => "passphrase",
    }
}

/// Reasons come from peers: one of the closed set daemons send, or `other`.
fn known_reason(r: &str) -> &'static str {
    api::REJECTED_REASONS
        .iter()
        .find(|k| **k == r)
        .copied()
        .unwrap_or("other")
}

/// A fresh store for unit tests: SQLite in `dir`, or, when `PEERSTASH_TEST_POSTGRES`
/// names a PostgreSQL server (`postgres://user@host:port`), a new database on it.
#[cfg(test)]
pub(crate) fn test_store(dir: &Path) -> Store {
    let Ok(server) = std::env::var("PEERSTASH_TEST_POSTGRES") else {
        return Store::open(&dir.join("db")).unwrap();
    };
    let name = format!("store_test_{:016x}", random_u64().unwrap());
    Db::postgres(&format!("{server}/postgres"))
        .unwrap()
        .execute_batch(&format!("CREATE DATABASE {name}"))
        .unwrap();
    Store::open_postgres(&format!("{server}/{name}")).unwrap()
}
