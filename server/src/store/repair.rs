//! Repair bookkeeping: which chunks lost a holder for good, and which live peer copies
//! them back from which live holder.
//!
//! A holder silent for longer than the repair grace is *lost*. For each location it had,
//! if the chunk's online holders, plus copies already under way, fall short of the owner's
//! replica target, a repair is queued (`repairs`: owner, chunk, the lost holder). Queued
//! repairs are handed out in heartbeat responses to peers that can take them: online, not
//! the owner, not holding the chunk, with room. Handing one out records a pending
//! placement that *replaces* the lost holder; when the new holder confirms, the lost
//! holder's location goes, and it is told to drop its copy if it ever comes back. An order
//! that fails simply expires with its token, and the next scan queues the repair again.

use super::db::{self, params, OptionalExtension, Tx};
use peerstash::api::StripeRef;
use peerstash::{ChunkId, Fingerprint, PeerId, TransactionId};

use super::{blob32, peer_row, pid, reserve_txids, to_pid, Planned, Policy, Store, PEER_COLS};

/// Tables of the incremental scan (created with the rest of the schema).
///
/// `repair_cursors` holds one row per lost holder: how far the scan has read its
/// locations, in `(chunk, owner)` order (the `locations_by_holder` index), and the
/// `last_seen_ms` it had when found lost, so a holder that came back and left again
/// (and may hold new locations) is read again from the start. The partial index keeps
/// the locations that failed an audit, on holders that are not lost, cheap to find; the
/// last lets a heartbeat take the oldest repairs without sorting the whole queue.
///
/// `repair_ready` is the part of the queue that had a live copy to read (or is a shard,
/// rebuilt from others) at the last scan, oldest first: what heartbeats hand out. The
/// scan rebuilds it, so each heartbeat reads only repairs it can likely give, instead of
/// walking past every repair whose holders are all offline (under heavy churn, most of
/// the queue) on every heartbeat of every peer.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS repair_cursors (
    holder INTEGER PRIMARY KEY,
    seen_ms INTEGER NOT NULL,
    after_chunk BLOB NOT NULL,
    after_owner INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS locations_audit_failed ON locations (holder)
    WHERE audit_failed != 0;
CREATE INDEX IF NOT EXISTS repairs_by_age ON repairs (queued_ms);
CREATE TABLE IF NOT EXISTS repair_ready (
    owner INTEGER NOT NULL,
    chunk BLOB NOT NULL,
    replaces INTEGER NOT NULL,
    queued_ms INTEGER NOT NULL,
    PRIMARY KEY (owner, chunk, replaces)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS repair_ready_by_age ON repair_ready (queued_ms);
";

/// Most locations of lost holders one scan reads: the scan holds the store's lock, so a
/// holder with a million chunks is read over several scans instead of in one long stall.
pub const SCAN_BATCH: usize = 20_000;

/// Which holders count as lost: silent since `?1`, or suspended or disqualified.
const LOST: &str = "(p.last_seen_ms < ?1 OR p.standing != 0)";

/// A live holder: id, address, certificate fingerprint.
type Source = (i64, String, Vec<u8>);

/// How a repair gets its bytes.
enum Sourcing {
    /// Copied from a live holder.
    Copy(Source),
    /// Recomputed (shard `index` of the stripe) from shards on these live holders.
    Rebuild(StripeRef, u8, Vec<(Source, Vec<(ChunkId, u32)>)>),
}

/// One repair handed to a peer: get the bytes of `chunk` (from `source`, or by
/// rebuilding a shard), store them under `put`.
#[derive(Debug, Clone)]
pub struct RepairPlan {
    /// The chunk.
    pub chunk: ChunkId,
    /// Its stored size.
    pub size: u32,
    /// A live holder; its token is a get token.
    pub source: Option<Planned>,
    /// A shard to recompute: the stripe, the shard's index, and live holders of other
    /// shards (get tokens).
    pub rebuild: Option<(StripeRef, u8, Vec<Planned>)>,
    /// The peer receiving the order; its token is a put token.
    pub put: Planned,
}

/// What one scan found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RepairScan {
    /// Repairs queued by this scan.
    pub queued: usize,
    /// Repairs waiting for a peer to take them (after this scan).
    pub waiting: usize,
    /// Distinct chunks short of a holder with a repair queued or under way.
    pub below_target: usize,
    /// Locations of lost holders this scan read (each is read once per time its holder
    /// is lost).
    pub read: usize,
}

/// The copies a location's chunk wants (`l` a location, `o` its owner's peer row): one
/// for a shard of a stripe, the owner's replica target otherwise.
const WANT: &str = "CASE WHEN EXISTS (SELECT 1 FROM stripe_shards s
                                     WHERE s.owner = l.owner AND s.shard = l.chunk)
                        THEN 1 ELSE o.replicas END";

/// Queue a repair for each lost location in `todo` (owner, chunk, lost holder, size,
/// copies wanted) whose chunk's online holders, copies under way and repairs already
/// queued fall short of what it wants, unless one is queued for that holder already.
/// Returns how many it queued.
fn queue_short(
    tx: &Tx<'_>,
    todo: &[(i64, Vec<u8>, i64, i64, i64)],
    policy: &Policy,
) -> db::Result<usize> {
    let now_s = (policy.now_ms / 1000) as i64;
    let online = policy.online_cutoff_ms as i64;
    let mut live = tx.prepare_cached(
        "SELECT COUNT(*) FROM locations l JOIN peers p ON p.id = l.holder
         WHERE l.owner = ?1 AND l.chunk = ?2 AND p.last_seen_ms >= ?3
           AND l.audit_failed = 0 AND p.standing = 0",
    )?;
    let mut under_way = tx.prepare_cached(
        "SELECT COUNT(*) FROM pending
         WHERE owner = ?1 AND chunk = ?2 AND expires_s > ?3 AND replaces IS NOT NULL",
    )?;
    let mut queued = tx.prepare_cached(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN replaces = ?3 THEN 1 ELSE 0 END), 0) FROM repairs
         WHERE owner = ?1 AND chunk = ?2",
    )?;
    let mut queue = tx.prepare_cached(
        "INSERT INTO repairs (owner, chunk, replaces, size, queued_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut n = 0;
    for (owner, chunk, holder, size, want) in todo {
        let l: i64 = live.query_row(params![owner, chunk, online], |r| r.get(0))?;
        if l >= *want {
            continue;
        }
        let u: i64 = under_way.query_row(params![owner, chunk, now_s], |r| r.get(0))?;
        let (q, mine): (i64, i64) = queued.query_row(params![owner, chunk, holder], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        if mine == 0 && l + u + q < *want {
            queue.execute(params![owner, chunk, holder, size, policy.now_ms as i64])?;
            n += 1;
        }
    }
    Ok(n)
}

impl Store {
    /// Queue a repair for every lost location — on a holder silent since before
    /// `lost_before_ms`, or one that failed an audit, or on a suspended or disqualified
    /// holder — whose chunk has fewer online holders (seen since
    /// `policy.online_cutoff_ms`) plus copies under way than its owner's target; forget
    /// queued repairs that are moot (the holder came back, or the chunk was released).
    ///
    /// Incremental: each lost holder's locations are read once, in batches of at most
    /// [`SCAN_BATCH`] a scan, behind a cursor ([`SCHEMA`]); later scans read only what is
    /// new: holders newly lost, locations that failed an audit, and repair orders whose
    /// token expired unconfirmed (queued again while their location is still lost).
    pub fn scan_repairs(&mut self, lost_before_ms: u64, policy: &Policy) -> db::Result<RepairScan> {
        self.scan_repairs_bounded(lost_before_ms, policy, SCAN_BATCH)
    }

    /// [`Store::scan_repairs`] reading at most `batch` locations of lost holders.
    pub fn scan_repairs_bounded(
        &mut self,
        lost_before_ms: u64,
        policy: &Policy,
        batch: usize,
    ) -> db::Result<RepairScan> {
        let now_s = (policy.now_ms / 1000) as i64;
        let lost_before = lost_before_ms as i64;
        let tx = self.conn.write_tx()?;
        tx.execute(
            // Moot: the replaced location is gone, or no longer lost (its holder is back
            // in good standing and it passed its audits).
            "DELETE FROM repairs WHERE NOT EXISTS
               (SELECT 1 FROM locations l JOIN peers p ON p.id = l.holder
                WHERE l.owner = repairs.owner AND l.chunk = repairs.chunk
                  AND l.holder = repairs.replaces
                  AND (l.audit_failed != 0 OR p.last_seen_ms < ?1 OR p.standing != 0))",
            [lost_before],
        )?;
        // Cursors: gone for holders that are back; (re)started for holders newly lost.
        tx.execute(
            &format!(
                "DELETE FROM repair_cursors WHERE holder NOT IN
                   (SELECT p.id FROM peers p WHERE {LOST})"
            ),
            [lost_before],
        )?;
        tx.execute(
            &format!(
                "INSERT INTO repair_cursors (holder, seen_ms, after_chunk, after_owner)
                 SELECT p.id, p.last_seen_ms, ?2, -9223372036854775808 FROM peers p
                 LEFT JOIN repair_cursors c ON c.holder = p.id
                 WHERE {LOST} AND (c.holder IS NULL OR c.seen_ms != p.last_seen_ms)
                 ON CONFLICT (holder) DO UPDATE SET seen_ms = excluded.seen_ms,
                   after_chunk = excluded.after_chunk, after_owner = excluded.after_owner,
                   done = 0"
            ),
            params![lost_before, [0u8; 0]],
        )?;
        // What to look at: (owner, chunk, lost holder, size, copies wanted).
        let mut todo: Vec<(i64, Vec<u8>, i64, i64, i64)> = Vec::new();
        let mut scan = RepairScan::default();
        {
            let cursors: Vec<(i64, Vec<u8>, i64)> = {
                let mut st = tx.prepare_cached(
                    "SELECT holder, after_chunk, after_owner FROM repair_cursors
                     WHERE done = 0 ORDER BY holder",
                )?;
                let rows = st.query_map(params![], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect::<db::Result<_>>()?
            };
            let mut read = tx.prepare_cached(&format!(
                "SELECT l.owner, l.chunk, l.size, {WANT} FROM locations l
                 JOIN peers o ON o.id = l.owner
                 WHERE l.holder = ?1 AND (l.chunk, l.owner) > (?2, ?3)
                 ORDER BY l.chunk, l.owner LIMIT ?4"
            ))?;
            let mut advance = tx.prepare_cached(
                "UPDATE repair_cursors SET after_chunk = ?2, after_owner = ?3, done = ?4
                 WHERE holder = ?1",
            )?;
            for (holder, after_chunk, after_owner) in cursors {
                let room = batch - scan.read;
                if room == 0 {
                    break;
                }
                let rows: Vec<(i64, Vec<u8>, i64, i64)> = read
                    .query_map(
                        params![holder, after_chunk, after_owner, room as i64],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                    )?
                    .collect::<db::Result<_>>()?;
                scan.read += rows.len();
                let done = rows.len() < room;
                let (last_chunk, last_owner) = match rows.last() {
                    Some((o, c, ..)) => (c.clone(), *o),
                    None => (after_chunk, after_owner),
                };
                advance.execute(params![holder, last_chunk, last_owner, done])?;
                todo.extend(
                    rows.into_iter()
                        .map(|(owner, chunk, size, want)| (owner, chunk, holder, size, want)),
                );
            }
            // Failed audits on holders that are not lost (a lost one's cursor covers it),
            // and expired orders whose location is still lost: both few, read each scan.
            let mut st = tx.prepare_cached(&format!(
                "SELECT l.owner, l.chunk, l.holder, l.size, {WANT} FROM locations l
                 JOIN peers p ON p.id = l.holder JOIN peers o ON o.id = l.owner
                 WHERE l.audit_failed != 0 AND NOT {LOST}
                 UNION
                 SELECT l.owner, l.chunk, l.holder, l.size, {WANT} FROM pending q
                 JOIN locations l ON l.owner = q.owner AND l.chunk = q.chunk
                   AND l.holder = q.replaces
                 JOIN peers p ON p.id = l.holder JOIN peers o ON o.id = l.owner
                 WHERE q.replaces IS NOT NULL AND q.expires_s <= ?2
                   AND (l.audit_failed != 0 OR {LOST})"
            ))?;
            let rows = st.query_map(params![lost_before, now_s], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?;
            for row in rows {
                todo.push(row?);
            }
        }
        scan.queued = queue_short(&tx, &todo, policy)?;
        tx.execute("DELETE FROM repair_ready", params![])?;
        tx.execute(
            "INSERT INTO repair_ready (owner, chunk, replaces, queued_ms)
             SELECT r.owner, r.chunk, r.replaces, r.queued_ms FROM repairs r
             WHERE EXISTS (SELECT 1 FROM locations l JOIN peers p ON p.id = l.holder
                           WHERE l.owner = r.owner AND l.chunk = r.chunk
                             AND p.last_seen_ms >= ?1 AND l.audit_failed != 1
                             AND p.standing < 2)
                OR EXISTS (SELECT 1 FROM stripe_shards s
                           WHERE s.owner = r.owner AND s.shard = r.chunk)",
            [policy.online_cutoff_ms as i64],
        )?;
        scan.waiting = tx.query_row("SELECT COUNT(*) FROM repairs", params![], |r| {
            r.get::<_, i64>(0)
        })? as usize;
        scan.below_target = tx.query_row(
            "SELECT COUNT(*) FROM (SELECT owner, chunk FROM repairs UNION
               SELECT owner, chunk FROM pending WHERE replaces IS NOT NULL AND expires_s > ?1) AS below",
            [now_s],
            |r| r.get::<_, i64>(0),
        )? as usize;
        tx.commit()?;
        Ok(scan)
    }

    /// Hand up to `max` queued repairs to `target` (which just sent a heartbeat): each
    /// gets a live source (or, for a shard of a stripe, live holders of `k` other shards)
    /// and a pending placement on `target` that replaces the lost holder. Tokens are
    /// sealed by the caller.
    pub fn take_repairs(
        &mut self,
        target: PeerId,
        policy: &Policy,
        max: usize,
    ) -> db::Result<Vec<RepairPlan>> {
        let now_s = (policy.now_ms / 1000) as i64;
        let online = policy.online_cutoff_ms as i64;
        let tx = self.conn.write_tx()?;
        let me = tx
            .query_row(
                &format!(
                    "SELECT {PEER_COLS}, (SELECT COALESCE(SUM(size), 0) FROM pending q
                                          WHERE q.holder = peers.id AND q.expires_s > ?2)
                     FROM peers WHERE id = ?1 AND last_seen_ms >= ?3 AND standing = 0"
                ),
                params![pid(target), now_s, online],
                |r| Ok((peer_row(r)?, r.get::<_, i64>(10)? as u64)),
            )
            .optional()?;
        let Some((me, pending_held)) = me else {
            return Ok(Vec::new());
        };
        let mut room = me
            .free_bytes
            .min(me.lend_bytes.saturating_sub(me.held_bytes))
            .saturating_sub(pending_held);
        let candidates: Vec<(i64, Vec<u8>, i64, i64)> = {
            let mut st = tx.prepare_cached(
                "SELECT r.owner, r.chunk, r.replaces, r.size FROM repair_ready rr
                 JOIN repairs r ON r.owner = rr.owner AND r.chunk = rr.chunk
                   AND r.replaces = rr.replaces
                 WHERE r.owner != ?1
                   AND NOT EXISTS (SELECT 1 FROM locations l WHERE l.owner = r.owner
                                   AND l.chunk = r.chunk AND l.holder = ?1)
                   AND NOT EXISTS (SELECT 1 FROM pending q WHERE q.owner = r.owner
                                   AND q.chunk = r.chunk AND q.holder = ?1)
                   AND NOT EXISTS (SELECT 1 FROM universal_grants g WHERE g.chunk = r.chunk
                                   AND g.holder = ?1 AND g.requester != r.owner
                                   AND g.expires_s >= ?3)
                 ORDER BY rr.queued_ms LIMIT ?2",
            )?;
            // Like a put's placements: not where another peer's universal grant could
            // read the copy. From the ready part of the queue (see SCHEMA): the oldest
            // repairs are often those whose every holder is offline, and they must
            // neither fill the window and starve the rest nor be read each heartbeat.
            let live = now_s - super::TOKEN_SKEW_S as i64;
            let rows = st.query_map(params![pid(target), (max * 4) as i64, live], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?;
            rows.collect::<db::Result<_>>()?
        };
        let mut chosen: Vec<(i64, Vec<u8>, i64, i64, Sourcing)> = Vec::new();
        {
            let mut live = tx.prepare_cached(
                "SELECT l.holder, p.quic_addr, p.fingerprint FROM locations l
                 JOIN peers p ON p.id = l.holder
                 WHERE l.owner = ?1 AND l.chunk = ?2 AND l.holder != ?3 AND p.last_seen_ms >= ?4
                   AND l.audit_failed != 1 AND p.standing < 2
                 ORDER BY p.standing, l.audit_failed, p.last_seen_ms DESC",
            )?;
            let mut shard_of = tx.prepare_cached(
                "SELECT chunk, idx FROM stripe_shards WHERE owner = ?1 AND shard = ?2",
            )?;
            let mut holds = tx.prepare_cached(
                "SELECT 1 FROM locations WHERE owner = ?1 AND chunk = ?2 AND holder = ?3",
            )?;
            for (owner, chunk, replaces, size) in candidates {
                if chosen.len() == max {
                    break;
                }
                // Two orders for one chunk in one response would be one copy too many.
                if chosen.iter().any(|(o, c, ..)| *o == owner && *c == chunk) {
                    continue;
                }
                if (size as u64) > room {
                    continue;
                }
                let stripe: Option<(Vec<u8>, i64)> = shard_of
                    .query_row(params![owner, chunk], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let sourcing = match stripe {
                    None => {
                        let src: Option<Source> = live
                            .query_row(params![owner, chunk, pid(target), online], |r| {
                                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                            })
                            .optional()?;
                        match src {
                            Some(src) => Sourcing::Copy(src),
                            None => continue,
                        }
                    }
                    Some((stripe_chunk, index)) => {
                        let Some(stripe) = super::stripe_of(&tx, owner, &stripe_chunk)? else {
                            continue;
                        };
                        // The new shard must not land beside another shard of its stripe.
                        let mut beside = false;
                        for sh in &stripe.shards {
                            beside |=
                                holds.exists(params![owner, sh.id.0.to_vec(), pid(target)])?;
                        }
                        if beside {
                            continue;
                        }
                        // One live holder for each other shard that has one.
                        let mut sources: Vec<(Source, Vec<(ChunkId, u32)>)> = Vec::new();
                        for (j, sh) in stripe.shards.iter().enumerate() {
                            if j as i64 == index {
                                continue;
                            }
                            let src: Option<Source> = live
                                .query_row(
                                    params![owner, sh.id.0.to_vec(), pid(target), online],
                                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                                )
                                .optional()?;
                            let Some(src) = src else { continue };
                            match sources.iter_mut().find(|(s, _)| s.0 == src.0) {
                                Some((_, grants)) => grants.push((sh.id, sh.size)),
                                None => sources.push((src, vec![(sh.id, sh.size)])),
                            }
                        }
                        let shards: usize = sources.iter().map(|(_, g)| g.len()).sum();
                        if shards < stripe.data as usize {
                            continue;
                        }
                        Sourcing::Rebuild(stripe, index as u8, sources)
                    }
                };
                room -= size as u64;
                chosen.push((owner, chunk, replaces, size, sourcing));
            }
        }
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        // One transaction id per get token (one per source holder) and one for the put.
        let ids: u64 = chosen
            .iter()
            .map(|(.., s)| match s {
                Sourcing::Copy(_) => 2,
                Sourcing::Rebuild(_, _, sources) => 1 + sources.len() as u64,
            })
            .sum();
        let r = reserve_txids(&tx, self.next_txid, self.txid_hwm, ids)?;
        let mut next = r.first;
        let mut txid = || {
            next += 1;
            TransactionId(next - 1)
        };
        let planned = |(holder, addr, fp): Source, grants: Vec<(ChunkId, u32)>, txid| Planned {
            target: to_pid(holder),
            addr,
            fingerprint: Fingerprint(blob32(fp)),
            txid,
            grants,
            online: true,
        };
        let mut out = Vec::with_capacity(chosen.len());
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO pending (txid, chunk, holder, owner, size, expires_s, replaces)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut dequeue = tx.prepare_cached(
                "DELETE FROM repairs WHERE owner = ?1 AND chunk = ?2 AND replaces = ?3",
            )?;
            let mut unready = tx.prepare_cached(
                "DELETE FROM repair_ready WHERE owner = ?1 AND chunk = ?2 AND replaces = ?3",
            )?;
            for (owner, chunk, replaces, size, sourcing) in chosen {
                let put_txid = txid();
                ins.execute(params![
                    put_txid.0 as i64,
                    chunk,
                    pid(target),
                    owner,
                    size,
                    policy.expires_s as i64,
                    replaces
                ])?;
                dequeue.execute(params![owner, chunk, replaces])?;
                unready.execute(params![owner, chunk, replaces])?;
                super::expect_on(&tx, pid(target), &chunk)?;
                let id = ChunkId(blob32(chunk));
                let grants = vec![(id, size as u32)];
                let (source, rebuild) = match sourcing {
                    Sourcing::Copy(src) => (Some(planned(src, grants.clone(), txid())), None),
                    Sourcing::Rebuild(stripe, index, sources) => {
                        let sources = sources
                            .into_iter()
                            .map(|(src, g)| planned(src, g, txid()))
                            .collect();
                        (None, Some((stripe, index, sources)))
                    }
                };
                out.push(RepairPlan {
                    chunk: id,
                    size: size as u32,
                    source,
                    rebuild,
                    put: Planned {
                        target,
                        addr: me.quic_addr.clone(),
                        fingerprint: me.fingerprint,
                        txid: put_txid,
                        grants,
                        online: true,
                    },
                });
            }
        }
        tx.commit()?;
        self.next_txid = r.next;
        self.txid_hwm = r.hwm;
        Ok(out)
    }

    /// Committed locations on `holder` (a peer that left for good should have none once
    /// its chunks are repaired; the churn simulation checks this).
    pub fn locations_on(&self, holder: PeerId) -> db::Result<u64> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM locations WHERE holder = ?1",
                [pid(holder)],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
    }

    /// An owner's durability: (chunks stored, chunks below target, its replica target).
    /// A replicated chunk is below target with fewer online holders than the target; a
    /// striped chunk, with any of its shards lacking an online holder.
    pub fn durability(&self, owner: PeerId, online_cutoff_ms: u64) -> db::Result<(u64, u64, u8)> {
        let want: i64 = self
            .conn
            .query_row(
                "SELECT replicas FROM peers WHERE id = ?1",
                [pid(owner)],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let (plain, plain_below): (i64, i64) = self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN live < ?3 THEN 1 ELSE 0 END), 0) FROM
               (SELECT l.chunk,
                  SUM(CASE WHEN p.last_seen_ms >= ?2 AND l.audit_failed = 0 AND p.standing = 0
                      THEN 1 ELSE 0 END) AS live
                FROM locations l JOIN peers p ON p.id = l.holder
                WHERE l.owner = ?1 AND NOT EXISTS
                  (SELECT 1 FROM stripe_shards s WHERE s.owner = l.owner AND s.shard = l.chunk)
                GROUP BY l.chunk) AS per_chunk",
            params![pid(owner), online_cutoff_ms as i64, want],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let (striped, striped_below): (i64, i64) = self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN ok < data + parity THEN 1 ELSE 0 END), 0) FROM
               (SELECT st.data, st.parity,
                  (SELECT COUNT(*) FROM stripe_shards s
                   WHERE s.owner = st.owner AND s.chunk = st.chunk AND EXISTS
                     (SELECT 1 FROM locations l JOIN peers p ON p.id = l.holder
                      WHERE l.owner = s.owner AND l.chunk = s.shard
                        AND p.last_seen_ms >= ?2 AND l.audit_failed = 0
                        AND p.standing = 0)) AS ok
                FROM stripes st WHERE st.owner = ?1) AS per_stripe",
            params![pid(owner), online_cutoff_ms as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((
            (plain + striped) as u64,
            (plain_below + striped_below) as u64,
            want.clamp(0, 255) as u8,
        ))
    }
}

#[cfg(test)]
pub(super) mod tests_support {
    use peerstash::api::{HeartbeatRequest, KeyMode};

    use super::super::NewPeer;
    use super::*;

    pub const GB: u64 = 1 << 30;

    pub fn policy(now_ms: u64) -> Policy {
        Policy {
            quota_ratio: 1.5,
            quota_grace: None,
            now_ms,
            online_cutoff_ms: now_ms.saturating_sub(90_000),
            expires_s: now_ms / 1000 + 600,
        }
    }

    pub fn beat(s: &mut Store, p: PeerId, now: u64) -> Vec<ChunkId> {
        let req = HeartbeatRequest {
            quic_addr: "127.0.0.1:1".into(),
            cert_fingerprint: Fingerprint([1; 32]),
            free_bytes: GB,
            used_bytes: 0,
            dropped: Vec::new(),
        };
        s.heartbeat(p, &req, now).unwrap()
    }

    pub fn peer(s: &mut Store, name: &str, now: u64) -> PeerId {
        let new = NewPeer {
            name,
            password_hash: "x",
            key_mode: KeyMode::Escrow,
            lend_bytes: GB,
            quic_addr: "127.0.0.1:1",
            fingerprint: Fingerprint([1; 32]),
        };
        s.insert_peer(&new, None, false, now, |_| Ok(vec![0]))
            .unwrap()
    }

    /// A fresh store with an owner and four peers that just sent a heartbeat at `t0`.
    pub fn four_peers_and_an_owner() -> (tempfile::TempDir, Store, PeerId, Vec<PeerId>, u64) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = crate::store::test_store(dir.path());
        let t0 = 1_000_000_000u64;
        let owner = peer(&mut s, "owner", t0);
        let ps: Vec<PeerId> = (0..4).map(|i| peer(&mut s, &format!("p{i}"), t0)).collect();
        for p in &ps {
            beat(&mut s, *p, t0);
        }
        (dir, s, owner, ps, t0)
    }

    pub fn holders(s: &Store, owner: PeerId, c: ChunkId) -> Vec<PeerId> {
        let mut st = s
            .conn
            .prepare_cached("SELECT holder FROM locations WHERE owner = ?1 AND chunk = ?2 ")
            .unwrap();
        let mut v: Vec<PeerId> = st
            .query_map(params![pid(owner), c.0.to_vec()], |r| Ok(to_pid(r.get(0)?)))
            .unwrap()
            .collect::<db::Result<_>>()
            .unwrap();
        v.sort_by_key(|p| p.0);
        v
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use peerstash::api::ChunkRef;

    use super::tests_support::*;
    use super::*;

    /// A confirm committed without waiting for the disk leaves a barrier that answers
    /// resting on its locations must sync, and that a put which found the location asks
    /// for; once synced, by whoever, the barrier costs nothing.
    #[test]
    fn deferred_confirms_are_synced_before_anything_answers_from_them() {
        let (_d, mut s, owner, _peers, now) = four_peers_and_an_owner();
        let chunk = |b: u8| ChunkRef {
            id: ChunkId([b; 32]),
            size: 1000,
        };
        // The first commit creates the log; the next confirm can defer its sync.
        let plan = s.put(owner, &[chunk(1)], 1, &[], &policy(now)).unwrap();
        assert!(!plan.found_locations);
        let p = &plan.placements[0];
        let (done, wal) = s
            .confirm_batch_deferred(&[(p.target, p.txid, &[chunk(1).id][..])])
            .unwrap();
        assert_eq!(done[0].committed, 1);
        let barrier = s.barrier();
        if s.dialect() == crate::store::db::Dialect::Sqlite {
            let w = s.wal.clone().expect("the log is open");
            assert!(
                barrier.upto > w.synced.load(Ordering::Acquire),
                "not synced yet"
            );
            wal.sync().unwrap();
            assert!(w.synced.load(Ordering::Acquire) >= barrier.upto);
        } else {
            // PostgreSQL's commits are durable when they return: nothing to sync.
            assert!(s.wal.is_none());
            wal.sync().unwrap();
        }
        // Stored again: the answer rests on that location.
        let again = s.put(owner, &[chunk(1)], 1, &[], &policy(now)).unwrap();
        assert!(again.found_locations);
        assert_eq!(again.already_stored, vec![chunk(1).id]);
        barrier.sync().unwrap();
    }

    /// A confirm names what it cannot record: a chunk with no pending placement and no
    /// location on that holder (its placement swept after the token expired) comes back
    /// `unexpected`, so the daemon tells the uploader it is not stored; a confirm repeated
    /// after it committed does not.
    #[test]
    fn a_confirm_after_its_placement_was_swept_names_the_chunk_unexpected() {
        let (_d, mut s, owner, _peers, now) = four_peers_and_an_owner();
        let c = ChunkRef {
            id: ChunkId([7; 32]),
            size: 1000,
        };
        let plan = s.put(owner, &[c], 1, &[], &policy(now)).unwrap();
        let p = &plan.placements[0];
        let ids = [c.id];
        for round in 0..2 {
            let done = s.confirm_batch(&[(p.target, p.txid, &ids[..])]).unwrap();
            let want = super::super::Confirmed {
                committed: usize::from(round == 0),
                unexpected: Vec::new(),
            };
            assert_eq!(done, vec![want], "round {round}");
        }
        let late = ChunkRef {
            id: ChunkId([8; 32]),
            size: 1000,
        };
        let plan = s.put(owner, &[late], 1, &[], &policy(now)).unwrap();
        let p = &plan.placements[0];
        // Swept: its token expired more than a token lifetime ago.
        s.sweep_pending(now / 1000 + 1_201, 600).unwrap();
        let ids = [late.id];
        let done = s.confirm_batch(&[(p.target, p.txid, &ids[..])]).unwrap();
        assert_eq!(
            done,
            vec![super::super::Confirmed {
                committed: 0,
                unexpected: vec![late.id],
            }]
        );
        assert!(holders(&s, owner, late.id).is_empty());
    }

    /// Two owners with the same chunk id on one holder (an attacker who learnt the id):
    /// one releasing it never has the holder drop what the other's placement is about to
    /// store; a new placement cancels a drop queued earlier; and once nobody expects the
    /// chunk there, the inventory says so (the daemon then deletes it after the grace).
    #[test]
    fn drops_wait_for_pending_placements_and_the_inventory_lists_the_rest() {
        let (_dir, mut s, owner, ps, t0) = four_peers_and_an_owner();
        let other = peer(&mut s, "other", t0);
        let pol = policy(t0);
        let on = |s: &mut Store, who: PeerId, c: ChunkRef, h: PeerId| {
            let avoid: Vec<PeerId> = ps.iter().copied().filter(|p| *p != h).collect();
            let plan = s.put(who, &[c], 1, &avoid, &pol).unwrap();
            assert_eq!(plan.placements[0].target, h);
            plan.placements[0].txid
        };
        let h = ps[0];
        let c = ChunkRef {
            id: ChunkId([9; 32]),
            size: 100,
        };
        let tx = on(&mut s, owner, c, h);
        s.confirm(h, tx, &[c.id]).unwrap();
        let theirs = on(&mut s, other, c, h);
        s.release(owner, &[c.id]).unwrap();
        assert!(!beat(&mut s, h, t0).contains(&c.id));
        assert!(s.unknown_on(h, &[c.id]).unwrap().is_empty());
        // The other owner gives up its placement: nobody expects the chunk on h now.
        let failed = peerstash::api::ReportRequest::TransferFailed {
            target: h,
            txid: theirs,
            chunks: vec![c.id],
        };
        s.report(other, &failed).unwrap();
        assert_eq!(s.unknown_on(h, &[c.id]).unwrap(), vec![c.id]);

        // Released with no one else around: a drop is queued; a placement cancels it.
        let d = ChunkRef {
            id: ChunkId([10; 32]),
            size: 100,
        };
        let tx = on(&mut s, owner, d, h);
        s.confirm(h, tx, &[d.id]).unwrap();
        s.release(owner, &[d.id]).unwrap();
        let queued = |s: &Store| -> i64 {
            s.conn
                .query_row(
                    "SELECT COUNT(*) FROM drops WHERE holder = ?1 AND chunk = ?2",
                    params![pid(h), d.id.0.to_vec()],
                    |r| r.get(0),
                )
                .unwrap()
        };
        assert_eq!(queued(&s), 1);
        on(&mut s, other, d, h);
        assert_eq!(queued(&s), 0);
        assert!(!beat(&mut s, h, t0).contains(&d.id));
        assert!(s.unknown_on(h, &[d.id]).unwrap().is_empty());
    }

    /// The scan is incremental: a lost holder's locations are read once, in bounded
    /// batches, each getting exactly one repair over the passes; a later scan reads none
    /// of them again, yet an order whose token expired unconfirmed is queued again.
    #[test]
    fn a_lost_holder_is_read_once_in_batches_and_nothing_is_skipped() {
        let (_dir, mut s, owner, ps, t0) = four_peers_and_an_owner();
        let chunks: Vec<ChunkRef> = (0..25u8)
            .map(|i| ChunkRef {
                id: ChunkId([i + 1; 32]),
                size: 1000,
            })
            .collect();
        // Two replicas, on ps[0] and ps[1] only.
        let plan = s.put(owner, &chunks, 2, &ps[2..], &policy(t0)).unwrap();
        for p in &plan.placements {
            let ids: Vec<ChunkId> = p.grants.iter().map(|g| g.0).collect();
            s.confirm(p.target, p.txid, &ids).unwrap();
        }
        let lost = ps[0];
        let t1 = t0 + 3_600_000;
        for p in &ps[1..] {
            beat(&mut s, *p, t1);
        }
        let pol = policy(t1);
        let mut passes = Vec::new();
        loop {
            let scan = s.scan_repairs_bounded(t1 - 600_000, &pol, 10).unwrap();
            passes.push((scan.read, scan.queued));
            if scan.read == 0 {
                break;
            }
        }
        assert_eq!(passes, vec![(10, 10), (10, 10), (5, 5), (0, 0)]);
        let queued: Vec<(Vec<u8>, i64)> = {
            let mut st = s
                .conn
                .prepare_cached("SELECT chunk, replaces FROM repairs ORDER BY chunk")
                .unwrap();
            st.query_map(params![], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<db::Result<_>>()
                .unwrap()
        };
        let want: Vec<(Vec<u8>, i64)> = chunks
            .iter()
            .map(|c| (c.id.0.to_vec(), pid(lost)))
            .collect();
        assert_eq!(queued, want, "every chunk of the lost holder, once");

        // An order handed out and never confirmed: once its token expires, the next scan
        // queues it again without reading the lost holder's locations again.
        let orders = s.take_repairs(ps[2], &pol, 1).unwrap();
        assert_eq!(orders.len(), 1);
        let t2 = t1 + 700_000;
        for p in &ps[1..] {
            beat(&mut s, *p, t2);
        }
        let scan = s
            .scan_repairs_bounded(t2 - 600_000, &policy(t2), 10)
            .unwrap();
        assert_eq!((scan.read, scan.queued, scan.waiting), (0, 1, 25));
        assert_eq!(s.scan_repairs(t2 - 600_000, &policy(t2)).unwrap().queued, 0);

        // Back, then lost again: read again from the start (it may hold new chunks), but
        // nothing already queued is queued twice.
        beat(&mut s, lost, t2);
        let back = s.scan_repairs(t2 - 600_000, &policy(t2)).unwrap();
        assert_eq!((back.read, back.waiting), (0, 0));
        let t3 = t2 + 3_600_000;
        for p in &ps[1..] {
            beat(&mut s, *p, t3);
        }
        let scan = s.scan_repairs(t3 - 600_000, &policy(t3)).unwrap();
        assert_eq!(scan.read, 25);
        assert_eq!(
            scan.queued, 25,
            "queued again: the first ones went when it came back"
        );
        assert_eq!(s.scan_repairs(t3 - 600_000, &policy(t3)).unwrap().read, 0);
    }

    /// The whole life of a repair in the database: a holder is lost, the chunk is queued
    /// once, handed to one suitable peer with a live source, the confirm replaces the lost
    /// location (the owner pays for two copies, not three), the lost holder learns to drop
    /// its copy when it returns, and a release cancels what is still queued.
    #[test]
    fn a_lost_holder_is_replaced_once_and_told_to_drop_when_it_returns() {
        let (_dir, mut s, owner, ps, t0) = four_peers_and_an_owner();
        let chunk = ChunkRef {
            id: ChunkId([7; 32]),
            size: 1000,
        };
        let other = ChunkRef {
            id: ChunkId([8; 32]),
            size: 1000,
        };
        let plan = s.put(owner, &[chunk, other], 2, &[], &policy(t0)).unwrap();
        for p in &plan.placements {
            let ids: Vec<ChunkId> = p.grants.iter().map(|g| g.0).collect();
            s.confirm(p.target, p.txid, &ids).unwrap();
        }
        let before = holders(&s, owner, chunk.id);
        assert_eq!(before.len(), 2);
        let stored = s.peer(owner).unwrap().unwrap().stored_bytes;
        assert_eq!(stored, 4000);

        // Everyone but the lost holder keeps beating; an hour later it is lost.
        let lost = before[0];
        let t1 = t0 + 3_600_000;
        for p in ps.iter().filter(|p| **p != lost) {
            beat(&mut s, *p, t1);
        }
        let pol = policy(t1);
        let scan = s.scan_repairs(t1 - 600_000, &pol).unwrap();
        assert!(scan.queued >= 1 && scan.below_target >= 1, "{scan:?}");
        assert_eq!(
            s.durability(owner, pol.online_cutoff_ms).unwrap().1,
            scan.below_target as u64
        );
        // A second scan queues nothing more.
        assert_eq!(s.scan_repairs(t1 - 600_000, &pol).unwrap().queued, 0);
        // The surviving holder cannot take its own chunk; the lost one is offline.
        let survivor = before[1];
        let none = s.take_repairs(survivor, &pol, 64).unwrap();
        assert!(none.iter().all(|r| r.chunk != chunk.id));
        assert!(s.take_repairs(lost, &pol, 64).unwrap().is_empty());
        let fresh = *ps
            .iter()
            .find(|p| !before.contains(p) && **p != owner)
            .unwrap();
        let orders = s.take_repairs(fresh, &pol, 64).unwrap();
        let order = orders
            .iter()
            .find(|r| r.chunk == chunk.id)
            .expect("an order");
        assert_eq!(
            order.source.as_ref().map(|p| p.target),
            Some(survivor),
            "the source is the live holder"
        );
        assert_eq!(order.put.target, fresh);
        // Handed out once: nobody else gets it, and the scan counts it under way.
        for p in &ps {
            let again = s.take_repairs(*p, &pol, 64).unwrap();
            assert!(again.iter().all(|r| r.chunk != chunk.id));
        }
        assert_eq!(s.scan_repairs(t1 - 600_000, &pol).unwrap().queued, 0);

        s.confirm(fresh, order.put.txid, &[chunk.id]).unwrap();
        assert_eq!(holders(&s, owner, chunk.id), {
            let mut v = vec![survivor, fresh];
            v.sort_by_key(|p| p.0);
            v
        });
        // Repair does not make the owner pay for a third copy.
        let after = s.peer(owner).unwrap().unwrap().stored_bytes;
        assert_eq!(after, stored);
        // The lost holder comes back and is told to drop the replaced copy.
        let drops = beat(&mut s, lost, t1 + 1000);
        assert!(drops.contains(&chunk.id), "{drops:?}");

        // A queued repair goes when its chunk is released.
        let t2 = t1 + 3_600_000;
        for p in ps.iter().filter(|p| **p != fresh) {
            beat(&mut s, *p, t2);
        }
        let pol = policy(t2);
        s.scan_repairs(t2 - 600_000, &pol).unwrap();
        s.release(owner, &[chunk.id, other.id]).unwrap();
        let left: i64 = s
            .conn
            .query_row("SELECT COUNT(*) FROM repairs", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
    }
}

#[cfg(test)]
mod stripe_tests {
    use peerstash::api::{ChunkRef, StripeRef};

    use super::tests_support::*;
    use super::*;

    fn stripe(tag: u8, data: u8, parity: u8) -> StripeRef {
        StripeRef {
            chunk: ChunkId([tag; 32]),
            chunk_size: 2000,
            data,
            parity,
            shards: (0..data + parity)
                .map(|i| ChunkRef {
                    id: ChunkId([tag.wrapping_add(100).wrapping_add(i); 32]),
                    size: 1016,
                })
                .collect(),
        }
    }

    /// Shards of a stripe land on distinct peers; a stripe wider than the online peers is
    /// refused whole; a get names the stripe; a lost shard is rebuilt by a peer holding
    /// none of its stripe, from `k` live shards; a release takes every shard.
    #[test]
    fn stripes_are_spread_rebuilt_and_released_whole() {
        let (_dir, mut s, owner, ps, t0) = four_peers_and_an_owner();
        let wide = stripe(1, 3, 2);
        let e = s
            .put_with_stripes(owner, &[], &[wide], 1, &[], &policy(t0))
            .unwrap_err();
        assert_eq!(e.reason(), peerstash::api::Reason::NotEnoughPeers);
        let st = stripe(2, 2, 1);
        let plan = s
            .put_with_stripes(owner, &[], std::slice::from_ref(&st), 1, &[], &policy(t0))
            .unwrap();
        let targets: Vec<PeerId> = plan.placements.iter().map(|p| p.target).collect();
        assert_eq!(plan.placements.len(), 3, "one shard per peer");
        for p in &plan.placements {
            assert_eq!(p.grants.len(), 1);
            let ids: Vec<ChunkId> = p.grants.iter().map(|g| g.0).collect();
            s.confirm(p.target, p.txid, &ids).unwrap();
        }
        // Stored again: nothing to send.
        let again = s
            .put_with_stripes(owner, &[], std::slice::from_ref(&st), 1, &[], &policy(t0))
            .unwrap();
        assert_eq!(again.already_stored, vec![st.chunk]);
        let (planned, missing, stripes) = s.get(owner, &[st.chunk], 0).unwrap();
        assert!(missing.is_empty());
        assert_eq!(stripes, vec![st.clone()]);
        assert_eq!(planned.len(), 3);
        assert_eq!(
            s.durability(owner, 0).unwrap().0,
            1,
            "one stripe, one chunk"
        );

        // The holder of shard 0 is lost.
        let lost = plan
            .placements
            .iter()
            .find(|p| p.grants[0].0 == st.shards[0].id)
            .unwrap()
            .target;
        let t1 = t0 + 3_600_000;
        for p in ps.iter().filter(|p| **p != lost) {
            beat(&mut s, *p, t1);
        }
        let pol = policy(t1);
        assert_eq!(s.scan_repairs(t1 - 600_000, &pol).unwrap().queued, 1);
        assert_eq!(s.durability(owner, pol.online_cutoff_ms).unwrap().1, 1);
        for p in targets.iter().filter(|p| **p != lost) {
            assert!(
                s.take_repairs(*p, &pol, 8).unwrap().is_empty(),
                "a peer holding a shard of the stripe must not get another"
            );
        }
        let fresh = *ps.iter().find(|p| !targets.contains(p)).unwrap();
        let orders = s.take_repairs(fresh, &pol, 8).unwrap();
        assert_eq!(orders.len(), 1);
        let o = &orders[0];
        assert_eq!(o.chunk, st.shards[0].id);
        assert!(o.source.is_none());
        let (stripe, index, sources) = o.rebuild.clone().unwrap();
        assert_eq!((stripe, index), (st.clone(), 0));
        let shards: usize = sources.iter().map(|p| p.grants.len()).sum();
        assert_eq!(shards, 2, "k live shards to rebuild from");
        assert!(sources
            .iter()
            .all(|p| p.target != lost && p.target != fresh));
        s.confirm(fresh, o.put.txid, &[o.chunk]).unwrap();
        assert_eq!(s.durability(owner, pol.online_cutoff_ms).unwrap().1, 0);

        s.release(owner, &[st.chunk]).unwrap();
        let left: i64 = s
            .conn
            .query_row("SELECT COUNT(*) FROM locations", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
        let (_, missing, _) = s.get(owner, &[st.chunk], 0).unwrap();
        assert_eq!(missing, vec![st.chunk]);
    }
}
