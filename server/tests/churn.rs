//! Smoke test of the churn simulation (`examples/churn.rs` runs it at scale): a small
//! population of desktop-like peers over two simulated days keeps every chunk at two
//! replicas, and every peer that left for good (more than a day before the end) has had
//! all its chunks copied elsewhere.

use peerstash_server::sim::{self, Model, Params, Redundancy};

#[test]
fn desktops_at_two_replicas_lose_nothing_and_repair_every_departure() {
    // On tmpfs where there is one: the figures are the server's, not the disk's fsyncs.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let mut p = Params::new(200, 2.0, Model::DESKTOP, Redundancy::Replicas(2));
    // Less data than the defaults, to keep it quick; two peers leave for good at set
    // times on top of the model's (rare) departures, so that repair of a departure is
    // exercised every run.
    p.initial_chunks = 8;
    p.chunk_size = 1 << 20;
    p.leave_at_h = vec![4.0, 20.0];
    let r = sim::run(&p, dir.path()).unwrap();
    assert!(r.chunks_written > 1000, "{r:?}");
    assert!(r.departures > 0 && r.repairs_done > 0, "{r:?}");
    assert_eq!(r.chunks_lost, 0, "{r:?}");
    assert!(r.departed_checked >= 2, "{r:?}");
    assert_eq!(r.departed_not_repaired, 0, "{r:?}");
    assert!(r.refused.is_empty(), "{r:?}");
}
