//! The replay store: which (transaction, chunk) pairs a peer has already served.
//!
//! Entries live until their token expires (plus the skew allowance) and are then pruned;
//! nothing is ever evicted early, so a token cannot be replayed while it is still valid —
//! not even after the daemon restarts, since the store is an SQLite file.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, ErrorCode};

use crate::ids::{ChunkId, TransactionId};

/// Why a claim failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// Already used.
    #[error("already used")]
    Replayed,
    /// The database failed; callers must refuse the operation.
    #[error("replay database: {0}")]
    Db(String),
}

impl From<rusqlite::Error> for ReplayError {
    fn from(e: rusqlite::Error) -> Self {
        ReplayError::Db(e.to_string())
    }
}

/// Persistent set of used (transaction id, chunk id) pairs.
pub struct ReplayStore {
    conn: Mutex<Connection>,
    grace_secs: u64,
}

impl std::fmt::Debug for ReplayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplayStore")
    }
}

impl ReplayStore {
    /// Open (or create) the store at `path`.
    pub fn open(path: &Path) -> Result<ReplayStore, ReplayError> {
        Self::init(Connection::open(path)?)
    }

    /// A store that lives only in memory (tests, benchmarks).
    pub fn in_memory() -> Result<ReplayStore, ReplayError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<ReplayStore, ReplayError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS used (
                txid INTEGER NOT NULL,
                chunk BLOB NOT NULL,
                expires_at INTEGER NOT NULL,
                PRIMARY KEY (txid, chunk)
            ) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS used_expiry ON used(expires_at);",
        )?;
        Ok(ReplayStore {
            conn: Mutex::new(conn),
            grace_secs: crate::token::DEFAULT_SKEW_SECS,
        })
    }

    /// Record a use; fails with [`ReplayError::Replayed`] if it was recorded before.
    pub fn claim(
        &self,
        txid: TransactionId,
        chunk: &ChunkId,
        expires_at: u64,
    ) -> Result<(), ReplayError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| ReplayError::Db("poisoned".into()))?;
        let keep_until = expires_at.saturating_add(self.grace_secs);
        match conn.execute(
            "INSERT INTO used (txid, chunk, expires_at) VALUES (?1, ?2, ?3)",
            params![txid.0 as i64, &chunk.0[..], keep_until as i64],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == ErrorCode::ConstraintViolation =>
            {
                Err(ReplayError::Replayed)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Drop entries whose tokens can no longer be valid at `now` (unix seconds).
    /// Returns how many were removed.
    pub fn prune(&self, now: u64) -> Result<usize, ReplayError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| ReplayError::Db("poisoned".into()))?;
        Ok(conn.execute(
            "DELETE FROM used WHERE expires_at < ?1",
            params![now as i64],
        )?)
    }

    /// Number of remembered uses.
    pub fn len(&self) -> Result<usize, ReplayError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| ReplayError::Db("poisoned".into()))?;
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM used", [], |r| r.get(0))?;
        Ok(n as usize)
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> Result<bool, ReplayError> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_is_a_replay_and_pruning_waits_for_expiry() {
        let s = ReplayStore::in_memory().unwrap();
        let c = ChunkId::of(b"x");
        s.claim(TransactionId(7), &c, 1000).unwrap();
        assert_eq!(
            s.claim(TransactionId(7), &c, 1000),
            Err(ReplayError::Replayed)
        );
        s.claim(TransactionId(8), &c, 1000).unwrap();
        assert_eq!(s.prune(1000).unwrap(), 0, "still within validity + grace");
        assert_eq!(
            s.prune(1000 + crate::token::DEFAULT_SKEW_SECS + 1).unwrap(),
            2
        );
        assert!(s.is_empty().unwrap());
    }
}
