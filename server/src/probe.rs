//! The server checks peers itself. A storage daemon whose heartbeats have gone quiet is
//! asked for its status over QUIC, with a control message the server signs under that
//! peer's key (direction server→peer, so it cannot be forged or reflected by anyone
//! else). A peer that answers stays online, with its reported free space; one that does
//! not falls offline when its online timeout runs out, and gets no more placements.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use peerstash::control::{now_ms, ControlSigner, Direction, MessageKind};
use peerstash::peer::{PeerAddr, PeerClient};
use peerstash::PeerId;

use crate::store::PeerRecord;
use crate::State;

/// How long one status check may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most peers checked at once.
const PROBES_IN_FLIGHT: usize = 32;

/// Start the prober on the current runtime.
pub fn spawn_prober(st: Arc<State>) {
    tokio::spawn(async move {
        let client = match PeerClient::new() {
            Ok(c) => Arc::new(
                c.with_timeout(PROBE_TIMEOUT)
                    .with_connect_timeout(PROBE_TIMEOUT),
            ),
            Err(e) => {
                tracing::error!("cannot start the QUIC client for status checks: {e}");
                return;
            }
        };
        let in_flight: Arc<Mutex<HashSet<PeerId>>> = Arc::default();
        let timeout_ms = st.cfg.online_timeout_secs * 1000;
        // Check a peer once half its timeout has passed without a heartbeat, so an answer
        // arrives before it would be counted offline.
        let period = Duration::from_millis((timeout_ms / 4).clamp(250, 30_000));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !st.leads() {
                continue;
            }
            let now = now_ms();
            let st2 = st.clone();
            let late = tokio::task::spawn_blocking(move || {
                st2.store.lock().expect("not poisoned").peers_to_probe(
                    now.saturating_sub(timeout_ms / 2),
                    now.saturating_sub(timeout_ms),
                )
            })
            .await;
            let late = match late {
                Ok(Ok(l)) => l,
                Ok(Err(e)) => {
                    tracing::warn!("listing peers to check: {e}");
                    continue;
                }
                Err(_) => continue,
            };
            // Each check runs on its own: a dead peer's timeout must not delay the others.
            for p in late {
                let mut busy = in_flight.lock().expect("not poisoned");
                if busy.len() >= PROBES_IN_FLIGHT || !busy.insert(p.id) {
                    continue;
                }
                drop(busy);
                let (st, client, in_flight) = (st.clone(), client.clone(), in_flight.clone());
                tokio::spawn(async move {
                    probe(&st, &client, &p).await;
                    in_flight.lock().expect("not poisoned").remove(&p.id);
                });
            }
        }
    });
}

async fn probe(st: &Arc<State>, client: &PeerClient, p: &PeerRecord) {
    let Some(key) = st.key_of(p.id) else { return };
    tracing::debug!(peer = %p.id, addr = %p.quic_addr, "checking a quiet peer");
    let auth = ControlSigner::new(p.id, &key, Direction::ServerToPeer).sign(
        MessageKind::StatusCheck,
        b"",
        now_ms(),
    );
    let result = match PeerAddr::lookup(&p.quic_addr, p.fingerprint).await {
        Ok(addr) => {
            st.rendezvous.route_checks(client, p.id, addr);
            client.status_check(&addr, &auth).await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(space) => {
            tracing::debug!(peer = %p.id, free = space.free_bytes, "status check answered");
            st.metrics.probe("ok");
            let st = st.clone();
            let id = p.id;
            let _ = tokio::task::spawn_blocking(move || {
                st.store
                    .lock()
                    .expect("not poisoned")
                    .mark_seen(id, space.free_bytes, now_ms())
            })
            .await;
        }
        Err(e) => {
            tracing::info!(peer = %p.id, error = %e, "status check failed");
            st.metrics.probe("failed");
        }
    }
}
