//! Audit bookkeeping: which locations are due for an audit, what an audit's outcome does
//! to the location and to its holder's standing.
//!
//! A location is due once its last audit is older than the audit interval (a quarter of
//! it for a *new* holder, one with fewer than [`NEW_PEER_AUDITS`] audits passed), oldest
//! first; a location never audited is due at once.
//!
//! `locations.audit_failed` says what the last audit found: 0 nothing wrong; 1 *bad* (a
//! proof that fails, or the holder says it has no such chunk): the copy is known to be
//! gone, so it counts as lost (the repair scan queues a copy at once, see
//! [`super::Store::scan_repairs`]), is no longer handed out for reads or used as a repair
//! source, and is not audited again; 2 *unanswered*: the copy counts as lost too (its
//! repair is queued at once) but, since nothing shows it is gone, it stays readable, a
//! repair source of last resort, and is audited again — an answer clears it.
//!
//! Each outcome moves the holder's reputation (an exponentially weighted pass rate of the
//! audits it answered) and its uptime (the same over answered versus unanswered audits).
//! Below [`SUSPEND_BELOW`] reputation or [`SUSPEND_UPTIME_BELOW`] uptime it is
//! *suspended* (no new placements, everything it holds repaired elsewhere); back at
//! [`RESTORE_AT`] and [`RESTORE_UPTIME_AT`] it is in good standing again; suspended for
//! longer than the caller's limit it is *disqualified* for good.

use super::db::{self, params, OptionalExtension};
use peerstash::{ChunkId, Fingerprint, PeerId};

use super::{blob32, pid, to_pid, Store};

/// A holder with fewer audits passed than this is audited four times as often.
pub const NEW_PEER_AUDITS: i64 = 32;
/// Weight of the newest outcome in the reputation.
pub const REPUTATION_WEIGHT: f64 = 0.1;
/// Below this reputation a holder is suspended.
pub const SUSPEND_BELOW: f64 = 0.75;
/// A suspended holder whose reputation climbs back to this is in good standing again.
pub const RESTORE_AT: f64 = 0.9;
/// Below this uptime (answered share of audits) a holder is suspended: a restart costs a
/// few unanswered audits, a peer that never answers is out after about seven.
pub const SUSPEND_UPTIME_BELOW: f64 = 0.5;
/// ... and back in good standing at this uptime (and [`RESTORE_AT`] reputation).
pub const RESTORE_UPTIME_AT: f64 = 0.7;

/// What one audit found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The proof checked out.
    Passed,
    /// The copy is known bad: a failing proof, or the holder says it is not there.
    Bad,
    /// No answer in time.
    Unanswered,
}

/// A peer's standing, as stored (`peers.standing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Receives placements.
    Good = 0,
    /// Reputation too low: no placements; what it holds is repaired elsewhere.
    Suspended = 1,
    /// Suspended for too long: never trusted again.
    Disqualified = 2,
}

impl Standing {
    fn from_i64(v: i64) -> Standing {
        match v {
            0 => Standing::Good,
            1 => Standing::Suspended,
            _ => Standing::Disqualified,
        }
    }

    /// Its name, as `peerstash status` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Good => "good",
            Standing::Suspended => "suspended",
            Standing::Disqualified => "disqualified",
        }
    }
}

/// A location due for an audit.
#[derive(Debug, Clone)]
pub struct AuditTarget {
    /// The owner of the chunk.
    pub owner: PeerId,
    /// The chunk or shard.
    pub chunk: ChunkId,
    /// Its stored size.
    pub size: u32,
    /// The holder.
    pub holder: PeerId,
    /// The holder's daemon address.
    pub addr: String,
    /// The holder's certificate fingerprint.
    pub fingerprint: Fingerprint,
}

/// A peer's audit record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuditRecord {
    /// Audits passed.
    pub passed: u64,
    /// Audits failed or unanswered.
    pub failed: u64,
    /// Weighted pass rate, 0..=1.
    pub reputation: f64,
    /// Weighted share of its audits it answered, 0..=1.
    pub uptime: f64,
    /// Its standing.
    pub standing: Standing,
}

impl Store {
    /// Up to `limit` locations due for an audit at `now_ms`, oldest audit first, on
    /// holders online since `online_cutoff_ms` and not disqualified. Each is stamped
    /// audited now, so the next round does not pick it again while its audit runs.
    pub fn audits_due(
        &mut self,
        now_ms: u64,
        interval_ms: u64,
        online_cutoff_ms: u64,
        limit: usize,
    ) -> db::Result<Vec<AuditTarget>> {
        let now = now_ms as i64;
        let tx = self.conn.write_tx()?;
        let due: Vec<AuditTarget> = {
            let mut st = tx.prepare_cached(
                "SELECT l.owner, l.chunk, l.size, l.holder, p.quic_addr, p.fingerprint
                 FROM locations l JOIN peers p ON p.id = l.holder
                 WHERE l.audit_failed != 1 AND p.last_seen_ms >= ?2 AND p.standing < 2
                   AND l.audited_ms + CASE WHEN p.audits_passed < ?4
                                           THEN CAST(?3 AS BIGINT) / 4
                                           ELSE CAST(?3 AS BIGINT) END <= ?1
                 ORDER BY l.audited_ms LIMIT ?5",
            )?;
            let rows = st.query_map(
                params![
                    now,
                    online_cutoff_ms as i64,
                    interval_ms as i64,
                    NEW_PEER_AUDITS,
                    limit as i64
                ],
                |r| {
                    Ok(AuditTarget {
                        owner: to_pid(r.get(0)?),
                        chunk: ChunkId(blob32(r.get(1)?)),
                        size: r.get::<_, i64>(2)? as u32,
                        holder: to_pid(r.get(3)?),
                        addr: r.get(4)?,
                        fingerprint: Fingerprint(blob32(r.get(5)?)),
                    })
                },
            )?;
            rows.collect::<db::Result<_>>()?
        };
        {
            let mut stamp = tx.prepare_cached(
                "UPDATE locations SET audited_ms = ?4
                 WHERE owner = ?1 AND chunk = ?2 AND holder = ?3",
            )?;
            for t in &due {
                stamp.execute(params![
                    pid(t.owner),
                    t.chunk.0.to_vec(),
                    pid(t.holder),
                    now
                ])?;
            }
        }
        tx.commit()?;
        Ok(due)
    }

    /// Recount every peer's storage-exchange credit: the bytes it holds for others whose
    /// copy passed an audit and has not failed one since. One pass over the locations.
    pub fn recount_audited(&mut self) -> db::Result<()> {
        self.conn.execute(
            "UPDATE peers SET audited_bytes = COALESCE(
                 (SELECT SUM(size) FROM locations
                  WHERE holder = peers.id AND passed_ms > 0 AND audit_failed = 0), 0)",
            params![],
        )?;
        Ok(())
    }

    /// Record one audit's outcome: a bad or unanswered copy counts as lost from now on
    /// (repair follows at the next scan), a pass clears an earlier unanswered one; the
    /// holder's counts, reputation, uptime and standing move. Returns its standing.
    pub fn record_audit(
        &mut self,
        t: &AuditTarget,
        verdict: Verdict,
        now_ms: u64,
    ) -> db::Result<Standing> {
        let tx = self.conn.write_tx()?;
        let mark = match verdict {
            Verdict::Passed => 0,
            Verdict::Bad => 1,
            Verdict::Unanswered => 2,
        };
        if verdict == Verdict::Passed {
            // A first pass earns the holder its credit at once; every other change
            // (a copy lost, released or failing) waits for `recount_audited`.
            tx.execute(
                "UPDATE peers SET audited_bytes = audited_bytes + COALESCE(
                     (SELECT size FROM locations WHERE owner = ?1 AND chunk = ?2
                          AND holder = ?3 AND passed_ms = 0 AND audit_failed != 1), 0)
                 WHERE id = ?3",
                params![pid(t.owner), t.chunk.0.to_vec(), pid(t.holder)],
            )?;
            tx.execute(
                "UPDATE locations SET passed_ms = ?4
                 WHERE owner = ?1 AND chunk = ?2 AND holder = ?3 AND audit_failed != 1",
                params![
                    pid(t.owner),
                    t.chunk.0.to_vec(),
                    pid(t.holder),
                    now_ms as i64
                ],
            )?;
        }
        tx.execute(
            "UPDATE locations SET audit_failed = ?4
             WHERE owner = ?1 AND chunk = ?2 AND holder = ?3 AND audit_failed != 1",
            params![pid(t.owner), t.chunk.0.to_vec(), pid(t.holder), mark],
        )?;
        let w = REPUTATION_WEIGHT;
        match verdict {
            Verdict::Unanswered => tx.execute(
                "UPDATE peers SET audits_failed = audits_failed + 1, uptime = uptime * (1 - CAST(?2 AS DOUBLE PRECISION))
                 WHERE id = ?1",
                params![pid(t.holder), w],
            )?,
            answered => tx.execute(
                // (Casts: PostgreSQL gives each parameter one type.)
                "UPDATE peers SET audits_passed = audits_passed + CAST(?2 AS BIGINT),
                     audits_failed = audits_failed + 1 - CAST(?2 AS BIGINT),
                     reputation = reputation * (1 - CAST(?3 AS DOUBLE PRECISION))
                         + CAST(?3 AS DOUBLE PRECISION) * CAST(?2 AS BIGINT),
                     uptime = uptime * (1 - CAST(?3 AS DOUBLE PRECISION))
                         + CAST(?3 AS DOUBLE PRECISION)
                 WHERE id = ?1",
                params![pid(t.holder), i64::from(answered == Verdict::Passed), w],
            )?,
        };
        // Good → suspended below a threshold; suspended → good again once recovered.
        tx.execute(
            "UPDATE peers SET standing = 1, suspended_ms = ?2
             WHERE id = ?1 AND standing = 0 AND (reputation < ?3 OR uptime < ?4)",
            params![
                pid(t.holder),
                now_ms as i64,
                SUSPEND_BELOW,
                SUSPEND_UPTIME_BELOW
            ],
        )?;
        tx.execute(
            "UPDATE peers SET standing = 0
             WHERE id = ?1 AND standing = 1 AND reputation >= ?2 AND uptime >= ?3",
            params![pid(t.holder), RESTORE_AT, RESTORE_UPTIME_AT],
        )?;
        let s: i64 = tx.query_row(
            "SELECT standing FROM peers WHERE id = ?1",
            [pid(t.holder)],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(Standing::from_i64(s))
    }

    /// Disqualify peers suspended before `suspended_before_ms`; returns them.
    pub fn disqualify_suspended(&mut self, suspended_before_ms: u64) -> db::Result<Vec<PeerId>> {
        let mut st = self.conn.prepare_cached(
            "UPDATE peers SET standing = 2 WHERE standing = 1 AND suspended_ms < ?1
             RETURNING id",
        )?;
        let rows = st.query_map([suspended_before_ms as i64], |r| Ok(to_pid(r.get(0)?)))?;
        rows.collect()
    }

    /// Committed locations, every replica counted.
    pub fn location_count(&self) -> db::Result<u64> {
        self.conn
            .query_row("SELECT COUNT(*) FROM locations", params![], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
    }

    /// A peer's audit record.
    pub fn audit_record(&self, id: PeerId) -> db::Result<Option<AuditRecord>> {
        self.conn
            .query_row(
                "SELECT audits_passed, audits_failed, reputation, uptime, standing
                 FROM peers WHERE id = ?1",
                [pid(id)],
                |r| {
                    Ok(AuditRecord {
                        passed: r.get::<_, i64>(0)? as u64,
                        failed: r.get::<_, i64>(1)? as u64,
                        reputation: r.get(2)?,
                        uptime: r.get(3)?,
                        standing: Standing::from_i64(r.get(4)?),
                    })
                },
            )
            .optional()
    }
}

#[cfg(test)]
mod tests {
    use super::super::repair::tests_support::*;
    use super::*;

    /// Six chunks, two replicas each, confirmed.
    fn stored(s: &mut Store, owner: PeerId, now: u64) {
        let chunks: Vec<peerstash::api::ChunkRef> = (0..6u8)
            .map(|i| peerstash::api::ChunkRef {
                id: ChunkId([i + 1; 32]),
                size: 1000,
            })
            .collect();
        let plan = s.put(owner, &chunks, 2, &[], &policy(now)).unwrap();
        for p in &plan.placements {
            let ids: Vec<ChunkId> = p.grants.iter().map(|g| g.0).collect();
            s.confirm(p.target, p.txid, &ids).unwrap();
        }
    }

    /// With audits on, a peer that stores more than its holdings have earned gets new
    /// placements first, even with less room than the others; without audits the most
    /// room wins.
    #[test]
    fn with_audits_on_placement_prefers_peers_that_need_credit() {
        let (_d, mut s, owner, peers, now) = four_peers_and_an_owner();
        let needy = peers[2];
        stored(&mut s, needy, now);
        let less_room = peerstash::api::HeartbeatRequest {
            quic_addr: "127.0.0.1:1".into(),
            cert_fingerprint: peerstash::Fingerprint([1; 32]),
            free_bytes: GB / 2,
            used_bytes: 0,
            dropped: Vec::new(),
        };
        s.heartbeat(needy, &less_room, now).unwrap();
        let chunks = |seed: u8| -> Vec<peerstash::api::ChunkRef> {
            (0..4u8)
                .map(|i| peerstash::api::ChunkRef {
                    id: ChunkId([seed + i; 32]),
                    size: 1000,
                })
                .collect()
        };
        let targets = |plan: &super::super::PutPlan| -> Vec<PeerId> {
            plan.placements.iter().map(|p| p.target).collect()
        };
        let by_room = s.put(owner, &chunks(60), 1, &[], &policy(now)).unwrap();
        assert!(
            !targets(&by_room).contains(&needy),
            "{:?}",
            targets(&by_room)
        );
        let mut audited = policy(now);
        audited.quota_grace = Some(GB);
        let by_need = s.put(owner, &chunks(20), 1, &[], &audited).unwrap();
        assert_eq!(targets(&by_need), vec![needy]);
        // Replicas still go to distinct peers.
        let two = s.put(owner, &chunks(40), 2, &[], &audited).unwrap();
        for c in chunks(40) {
            let on: Vec<PeerId> = two
                .placements
                .iter()
                .filter(|p| p.grants.iter().any(|g| g.0 == c.id))
                .map(|p| p.target)
                .collect();
            assert_eq!(on.len(), 2);
            assert!(on.contains(&needy) && on[0] != on[1], "{on:?}");
        }
    }

    #[test]
    fn failures_mark_the_location_lost_suspend_then_disqualify_the_holder() {
        let (_d, mut s, owner, peers, now) = four_peers_and_an_owner();
        stored(&mut s, owner, now);
        let pol = policy(now);
        // Never audited: every location is due at once, and then not again this cycle.
        let due = s
            .audits_due(now, 60_000, pol.online_cutoff_ms, 100)
            .unwrap();
        assert!(!due.is_empty());
        assert!(s
            .audits_due(now, 60_000, pol.online_cutoff_ms, 100)
            .unwrap()
            .is_empty());
        let bad = due[0].holder;
        let on_bad: Vec<&AuditTarget> = due.iter().filter(|t| t.holder == bad).collect();
        // One failure: the location is lost and queued for repair; still good standing.
        assert_eq!(
            s.record_audit(on_bad[0], Verdict::Bad, now).unwrap(),
            Standing::Good
        );
        let scan = s.scan_repairs(0, &pol).unwrap();
        assert_eq!(scan.queued, 1, "{scan:?}");
        assert!(!holders_for_reads(&mut s, owner, on_bad[0].chunk, now).contains(&bad));
        // Failures pile up: suspended, and everything it holds is queued for repair.
        let mut standing = Standing::Good;
        for _ in 0..3 {
            standing = s.record_audit(on_bad[0], Verdict::Bad, now).unwrap();
        }
        assert_eq!(standing, Standing::Suspended);
        let rec = s.audit_record(bad).unwrap().unwrap();
        assert_eq!((rec.passed, rec.failed), (0, 4));
        assert!(rec.reputation < SUSPEND_BELOW);
        s.scan_repairs(0, &pol).unwrap();
        let queued: i64 = s
            .conn
            .query_row(
                "SELECT COUNT(*) FROM repairs WHERE replaces = ?1",
                [pid(bad)],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(queued as usize, on_bad.len());
        // Not yet past the limit: still suspended; past it, disqualified.
        assert!(s.disqualify_suspended(now).unwrap().is_empty());
        assert_eq!(s.disqualify_suspended(now + 1).unwrap(), vec![bad]);
        let f = s.figures(0).unwrap();
        assert_eq!((f.peers_suspended, f.peers_disqualified), (0, 1));
        // The others were never touched.
        for p in peers.iter().filter(|p| **p != bad) {
            assert_eq!(
                s.audit_record(*p).unwrap().unwrap().standing,
                Standing::Good
            );
        }
    }

    #[test]
    fn a_suspended_peer_that_passes_again_recovers() {
        let (_d, mut s, owner, _peers, now) = four_peers_and_an_owner();
        stored(&mut s, owner, now);
        let due = s.audits_due(now, 60_000, 0, 100).unwrap();
        let t = &due[0];
        for _ in 0..4 {
            s.record_audit(t, Verdict::Bad, now).unwrap();
        }
        assert_eq!(
            s.audit_record(t.holder).unwrap().unwrap().standing,
            Standing::Suspended
        );
        let mut standing = Standing::Suspended;
        for _ in 0..30 {
            standing = s.record_audit(t, Verdict::Passed, now).unwrap();
        }
        assert_eq!(standing, Standing::Good);
    }

    #[test]
    fn an_unanswered_copy_is_repaired_but_stays_readable_until_it_answers() {
        let (_d, mut s, owner, _peers, now) = four_peers_and_an_owner();
        stored(&mut s, owner, now);
        let pol = policy(now);
        let due = s.audits_due(now, 60_000, 0, 100).unwrap();
        let t = &due[0];
        assert_eq!(
            s.record_audit(t, Verdict::Unanswered, now).unwrap(),
            Standing::Good
        );
        assert_eq!(s.scan_repairs(0, &pol).unwrap().queued, 1);
        assert!(holders_for_reads(&mut s, owner, t.chunk, now).contains(&t.holder));
        // Audited again, not only once the interval is over.
        let again = s.audits_due(now + 60_000, 60_000, 0, 100).unwrap();
        assert!(again
            .iter()
            .any(|a| a.holder == t.holder && a.chunk == t.chunk));
        // It answers: the copy counts again and the queued repair is moot.
        s.record_audit(t, Verdict::Passed, now).unwrap();
        assert_eq!(s.scan_repairs(0, &pol).unwrap().waiting, 0);
        // Seven unanswered in a row: suspended.
        let mut standing = Standing::Good;
        for _ in 0..7 {
            standing = s.record_audit(t, Verdict::Unanswered, now).unwrap();
        }
        assert_eq!(standing, Standing::Suspended);
        let rec = s.audit_record(t.holder).unwrap().unwrap();
        assert!(rec.uptime < SUSPEND_UPTIME_BELOW && rec.reputation > RESTORE_AT);
    }

    fn holders_for_reads(s: &mut Store, owner: PeerId, c: ChunkId, now: u64) -> Vec<PeerId> {
        let (planned, _, _) = s.get(owner, &[c], policy(now).online_cutoff_ms).unwrap();
        planned.iter().map(|p| p.target).collect()
    }
}
