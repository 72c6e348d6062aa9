//! The server keeps every chunk at its replica target. A storage daemon silent for longer
//! than the repair grace is *lost*; a scan, every repair interval, queues a copy of each
//! chunk it held that is now short of online holders (see [`crate::store::Store::scan_repairs`]).
//! Copies go peer to peer: a heartbeat response hands a daemon orders, each with a get
//! token for a live holder and a put token for the daemon itself; the daemon fetches,
//! checks the hash, stores and confirms, and its confirm retires the lost holder's
//! location. A lost peer that returns is told to drop the copies that were replaced.

use std::sync::Arc;
use std::time::Duration;

use crate::State;

/// Start the repair scan on the current runtime.
pub fn spawn_repairer(st: Arc<State>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(st.cfg.repair_interval_secs));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !st.leads() {
                continue;
            }
            let st2 = st.clone();
            let _ = tokio::task::spawn_blocking(move || scan(&st2)).await;
        }
    });
}

/// One repair scan now (also run at once after a failed audit).
pub(crate) fn scan(st: &State) {
    let pol = crate::handlers::policy(st);
    let lost_before = pol.now_ms.saturating_sub(st.cfg.repair_grace_secs * 1000);
    let result = st
        .store
        .lock()
        .expect("not poisoned")
        .scan_repairs(lost_before, &pol);
    match result {
        Ok(s) => {
            if s.queued > 0 {
                tracing::info!(
                    queued = s.queued,
                    waiting = s.waiting,
                    below_target = s.below_target,
                    "chunks lost a holder: repairs queued"
                );
            }
            st.metrics.repairs_waiting.set(s.waiting as i64);
            st.metrics.chunks_below_target.set(s.below_target as i64);
        }
        Err(e) => tracing::warn!("repair scan: {e}"),
    }
}
