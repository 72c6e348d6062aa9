//! The last counter accepted on each peer's control channels, shared by every instance on
//! the database: a message one instance accepted is a replay to all. On SQLite a small
//! file of its own beside the database (`files::CHANNELS`); on PostgreSQL a table in the
//! same database. Either way on a connection of its own, so that advancing a counter
//! (once per authenticated request) never waits for the store's lock or its write lock.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use crate::store::db::{self, params, Db, OptionalExtension};
use peerstash::PeerId;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS control_channels (
    peer BIGINT NOT NULL,
    channel BIGINT NOT NULL,
    last BIGINT NOT NULL,
    seen_ms BIGINT NOT NULL,
    PRIMARY KEY (peer, channel)
)";

/// The channel counters.
pub struct Channels(Mutex<Db>);

impl Channels {
    /// Open (creating) the counters' SQLite file.
    pub fn open(path: &Path) -> db::Result<Channels> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Durable against a killed process (the log is written); after a power cut every
        // instance restarts and refuses anything stamped before its start anyway.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(&format!("{SCHEMA} WITHOUT ROWID"))?;
        Ok(Channels(Mutex::new(Db::sqlite(conn))))
    }

    /// Connect to the counters' table in the PostgreSQL database at `url` (creating it).
    pub fn open_postgres(url: &str) -> db::Result<Channels> {
        let conn = Db::postgres(url)?;
        // Instances starting together: the store's lock makes the creation one at a time.
        let tx = conn.write_tx()?;
        tx.execute_batch(SCHEMA)?;
        tx.commit()?;
        Ok(Channels(Mutex::new(conn)))
    }

    /// Accept `counter` on `peer`'s `channel` only if it is above the last one accepted
    /// there by any instance; `Ok(Err(last))` when it is not (a replay).
    pub fn advance(
        &self,
        peer: PeerId,
        channel: u64,
        counter: u64,
        now_ms: u64,
    ) -> db::Result<Result<(), u64>> {
        // Counters are microseconds since 1970, far below 2^63; one above is refused.
        let Ok(counter) = i64::try_from(counter) else {
            return Ok(Err(i64::MAX as u64));
        };
        let key = (peer.0 as i64, channel as i64);
        let conn = self.0.lock().expect("not poisoned");
        let n = conn
            .prepare_cached(
                "INSERT INTO control_channels (peer, channel, last, seen_ms)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (peer, channel) DO UPDATE
                   SET last = excluded.last, seen_ms = excluded.seen_ms
                   WHERE control_channels.last < excluded.last",
            )?
            .execute(params![key.0, key.1, counter, now_ms as i64])?;
        if n == 1 {
            return Ok(Ok(()));
        }
        let last: Option<i64> = conn
            .prepare_cached("SELECT last FROM control_channels WHERE peer = ?1 AND channel = ?2")?
            .query_row(params![key.0, key.1], |r| r.get(0))
            .optional()?;
        Ok(Err(last.unwrap_or(i64::MAX) as u64))
    }

    /// Forget channels idle since before `cutoff_ms` (a message that old is refused as
    /// stale before its counter is looked at).
    pub fn sweep(&self, cutoff_ms: u64) -> db::Result<usize> {
        self.0.lock().expect("not poisoned").execute(
            "DELETE FROM control_channels WHERE seen_ms < ?1",
            params![cutoff_ms as i64],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_only_rise_and_are_shared_by_every_opener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("channels.db");
        let (a, b) = (
            Channels::open(&path).unwrap(),
            Channels::open(&path).unwrap(),
        );
        let p = PeerId(7);
        assert_eq!(a.advance(p, 1, 100, 0).unwrap(), Ok(()));
        assert_eq!(
            b.advance(p, 1, 100, 0).unwrap(),
            Err(100),
            "the same message"
        );
        assert_eq!(b.advance(p, 1, 99, 0).unwrap(), Err(100), "an older one");
        assert_eq!(b.advance(p, 1, 101, 0).unwrap(), Ok(()));
        assert_eq!(a.advance(p, 2, 5, 0).unwrap(), Ok(()), "channels are apart");
        assert_eq!(
            a.advance(PeerId(8), 1, 5, 0).unwrap(),
            Ok(()),
            "peers are apart"
        );
        assert!(a.advance(p, 3, u64::MAX, 0).unwrap().is_err());
        // Swept channels start over (their messages are stale by then).
        assert_eq!(a.sweep(1).unwrap(), 3);
        assert_eq!(a.advance(p, 1, 50, 2).unwrap(), Ok(()));
    }
}
