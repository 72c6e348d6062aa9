//! One instance at a time runs the background jobs (repair scans, audits, status checks
//! of quiet peers, sweeps): the one holding the `jobs` lease in the database. It renews
//! the lease every [`RENEW`]; when it dies, another instance takes the lease once it
//! expires ([`TTL`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use peerstash::control::now_ms;

use crate::State;

/// The lease's name.
const JOBS: &str = "jobs";
/// How often the lease is renewed, or asked for.
const RENEW: Duration = Duration::from_secs(5);
/// How long a lease lasts unrenewed.
const TTL: Duration = Duration::from_secs(15);

/// An instance's id among those sharing the database: derived from the address it
/// serves on, so a restarted instance takes its own lease back at once instead of
/// waiting for it to expire (two instances cannot serve on one address).
fn instance_id(addr: SocketAddr) -> u64 {
    // FNV-1a: stable across runs and builds.
    addr.to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// Take the jobs lease now if it is free (so a lone server runs its jobs from the
/// start), then keep renewing or asking for it.
pub(crate) async fn hold_jobs_lease(st: &Arc<State>, addr: SocketAddr) {
    let me = instance_id(addr);
    let take = move |st: Arc<State>| async move {
        let st2 = st.clone();
        let held = tokio::task::spawn_blocking(move || {
            st2.store.lock().expect("not poisoned").hold_lease(
                JOBS,
                me,
                now_ms(),
                TTL.as_millis() as u64,
            )
        })
        .await;
        let held = match held {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::warn!("renewing the jobs lease: {e}");
                false
            }
            Err(_) => false,
        };
        st.metrics.jobs_leader.set(i64::from(held));
        if st.leader.swap(held, Ordering::Relaxed) != held {
            if held {
                tracing::info!("this instance runs the background jobs");
            } else {
                tracing::info!("another instance runs the background jobs");
            }
        }
    };
    take(st.clone()).await;
    let st = st.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RENEW);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            take(st.clone()).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_tell_addresses_apart() {
        let a: SocketAddr = "127.0.0.1:7400".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:7401".parse().unwrap();
        assert_eq!(instance_id(a), instance_id(a));
        assert_ne!(instance_id(a), instance_id(b));
    }
}
