//! Continuous audits. Every audit interval, every committed location (chunk or erasure
//! shard) on an online holder is checked at least once: the server sends the holder a
//! random challenge (a range of the chunk and a nonce, [`peerstash::audit::Challenge`])
//! signed as a server→peer control message under that holder's key, and checks the answer
//! — the range's bytes and a BLAKE3 proof — against the chunk id it recorded, within
//! [`AUDIT_DEADLINE`]. The server never holds the data; an audit moves a few KiB.
//!
//! Audits are spread over the interval: a round runs every twentieth of it (at most every
//! 10 s) and takes the locations whose last audit is the oldest and past due (holders with few audits passed
//! are due four times as often). A failed or unanswered audit marks the location lost at
//! once and runs a repair scan right away (an unanswered copy stays readable and is
//! audited again; see [`crate::store::Verdict`]); outcomes move the holder's reputation,
//! uptime and standing ([`crate::store::Standing`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerstash::audit::Challenge;
use peerstash::control::{now_ms, ControlSigner, Direction, MessageKind};
use peerstash::peer::{PeerAddr, PeerClient, PeerError};

use crate::store::{AuditTarget, Standing, Verdict};
use crate::State;

/// How long a holder has to answer an audit.
pub const AUDIT_DEADLINE: Duration = Duration::from_secs(10);
/// Audit rounds per interval (rounds are 0.2 to 10 s apart).
const ROUNDS_PER_INTERVAL: u64 = 20;
/// How long the repair scan after a failed audit waits for the rest of a burst.
const SCAN_DEBOUNCE: Duration = Duration::from_millis(250);
/// Audits a round may start beyond its share.
const EXTRA_PER_ROUND: usize = 64;
/// Most audits in flight at once.
const AUDITS_IN_FLIGHT: usize = 16;
/// A peer suspended for this many audit intervals without recovering is disqualified.
const DISQUALIFY_AFTER_INTERVALS: u64 = 3;

/// How one audit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The proof checked out in time.
    Passed,
    /// The holder answered with a proof that does not check out (or answered late).
    Failed,
    /// The holder said it does not have the chunk (or has it at another size).
    Missing,
    /// No answer: unreachable, timed out, or a broken reply.
    Unanswered,
}

impl Outcome {
    /// The label in `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Failed => "failed",
            Outcome::Missing => "missing",
            Outcome::Unanswered => "unanswered",
        }
    }
}

/// Start the auditor on the current runtime (a no-op when audits are off).
pub fn spawn_auditor(st: Arc<State>) {
    if st.cfg.audit_interval_secs == 0 {
        return;
    }
    tokio::spawn(async move {
        let client = match PeerClient::new() {
            Ok(c) => Arc::new(
                c.with_timeout(AUDIT_DEADLINE)
                    .with_connect_timeout(AUDIT_DEADLINE),
            ),
            Err(e) => {
                tracing::error!("cannot start the QUIC client for audits: {e}");
                return;
            }
        };
        let interval_ms = st.cfg.audit_interval_secs * 1000;
        let period_ms = (interval_ms / ROUNDS_PER_INTERVAL).clamp(200, 10_000);
        let rounds = (interval_ms / period_ms).max(1);
        let period = Duration::from_millis(period_ms);
        let slots = Arc::new(tokio::sync::Semaphore::new(AUDITS_IN_FLIGHT));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Credits are recounted a few times per cycle (one pass over the locations).
        let recount_every = Duration::from_millis((interval_ms / 8).clamp(1000, 600_000));
        let mut recounted = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            if !st.leads() {
                continue;
            }
            let st2 = st.clone();
            let recount = recounted.elapsed() >= recount_every;
            if recount {
                recounted = tokio::time::Instant::now();
            }
            let due =
                tokio::task::spawn_blocking(move || round(&st2, interval_ms, rounds, recount))
                    .await;
            let due = match due {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => {
                    tracing::warn!("listing audits due: {e}");
                    continue;
                }
                Err(_) => continue,
            };
            for t in due {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (st, client) = (st.clone(), client.clone());
                tokio::spawn(async move {
                    if let Some(outcome) = audit(&st, &client, &t).await {
                        settle(&st, t, outcome).await;
                    }
                    drop(slot);
                });
            }
        }
    });
}

/// One round's bookkeeping (disqualifications; the storage-exchange credits when
/// `recount`), then the locations to audit now, oldest first: up to four times the
/// round's share of all locations (new holders are due four times per interval) plus a
/// few, which bounds the burst after a large upload.
fn round(
    st: &State,
    interval_ms: u64,
    rounds: u64,
    recount: bool,
) -> crate::store::db::Result<Vec<AuditTarget>> {
    let pol = crate::handlers::policy(st);
    let mut store = st.store.lock().expect("not poisoned");
    if recount {
        store.recount_audited()?;
    }
    let disqualified = store.disqualify_suspended(
        pol.now_ms
            .saturating_sub(DISQUALIFY_AFTER_INTERVALS * interval_ms),
    )?;
    for p in disqualified {
        tracing::warn!(peer = %p, "peer disqualified: suspended too long without recovering");
    }
    let locations = store.location_count()?;
    let limit = (locations * 4).div_ceil(rounds) as usize + EXTRA_PER_ROUND;
    store.audits_due(pol.now_ms, interval_ms, pol.online_cutoff_ms, limit)
}

/// Audit one location: challenge, answer, verification. The time spent verifying is
/// counted in `/metrics` (the server's CPU cost of audits). `None`: the server could not
/// audit (no key for the holder, no randomness), which says nothing about the holder.
pub async fn audit(st: &State, client: &PeerClient, t: &AuditTarget) -> Option<Outcome> {
    let key = st.key_of(t.holder)?;
    let challenge = Challenge::random(t.chunk, t.size)
        .ok()
        .filter(|c| c.check().is_ok())?;
    let auth = ControlSigner::new(t.holder, &key, Direction::ServerToPeer).sign(
        MessageKind::Audit,
        &challenge.encode(),
        now_ms(),
    );
    let deadline = now_ms() + AUDIT_DEADLINE.as_millis() as u64;
    let answer = match PeerAddr::lookup(&t.addr, t.fingerprint).await {
        Ok(addr) => {
            st.rendezvous.route_checks(client, t.holder, addr);
            client.audit(&addr, &auth, &challenge).await
        }
        Err(e) => Err(e),
    };
    let received = now_ms();
    Some(match answer {
        Ok(a) => {
            let started = Instant::now();
            let verdict = challenge.verify(&a, received, deadline);
            st.metrics.audit_cpu(started.elapsed(), a.encoded_len());
            match verdict {
                Ok(()) => Outcome::Passed,
                Err(e) => {
                    tracing::warn!(holder = %t.holder, chunk = ?t.chunk, reason = e.reason(), "audit failed");
                    Outcome::Failed
                }
            }
        }
        Err(PeerError::NotFound | PeerError::SizeMismatch) => {
            tracing::warn!(holder = %t.holder, chunk = ?t.chunk, "audit: the holder does not have the chunk");
            Outcome::Missing
        }
        Err(e) => {
            tracing::warn!(holder = %t.holder, chunk = ?t.chunk, error = %e, "audit unanswered");
            Outcome::Unanswered
        }
    })
}

/// Record an outcome; anything but a pass queues the location's repair at once.
async fn settle(st: &Arc<State>, t: AuditTarget, outcome: Outcome) {
    st.metrics.audit(outcome.as_str());
    let passed = outcome == Outcome::Passed;
    let verdict = match outcome {
        Outcome::Passed => Verdict::Passed,
        Outcome::Failed | Outcome::Missing => Verdict::Bad,
        Outcome::Unanswered => Verdict::Unanswered,
    };
    let st2 = st.clone();
    let _ = tokio::task::spawn_blocking(move || {
        let standing = st2
            .store
            .lock()
            .expect("not poisoned")
            .record_audit(&t, verdict, now_ms());
        match standing {
            Ok(Standing::Good) => {}
            Ok(s) => tracing::warn!(holder = %t.holder, standing = s.as_str(), "holder not in good standing"),
            Err(e) => tracing::warn!("recording an audit: {e}"),
        }
    })
    .await;
    // Failures come in bursts (a peer that lost everything): the first asks for a scan,
    // which waits a moment so that it serves every failure of the burst.
    if !passed && !st.scan_after_audits.swap(true, Ordering::AcqRel) {
        let st = st.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SCAN_DEBOUNCE).await;
            st.scan_after_audits.store(false, Ordering::Release);
            let _ = tokio::task::spawn_blocking(move || crate::repair::scan(&st)).await;
        });
    }
}
