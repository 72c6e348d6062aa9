//! Churn simulation of the coordination server (not a test): simulated peers coming and
//! going under simulated time, driving the real `Store` on a real SQLite file.
//!
//! ```sh
//! cargo run --release -p peerstash-server --example churn -- \
//!     --peers 10000 --days 7 --model harsh --redundancy 4+2
//! ```
//!
//! Options: `--peers N`, `--days D`, `--model desktop|harsh`, `--redundancy R|K+M`
//! (replicas, or stripes of K data and M parity shards), `--seed S`, `--tick SECS`,
//! `--grace SECS` (repair grace), `--bandwidth BYTES_PER_S`, `--initial CHUNKS`,
//! `--writes CHUNKS_PER_DAY`, `--deletes CHUNKS_PER_DAY`, `--lifetime-days D` (the
//! model's mean lifetime), `--dir PATH` (where the
//! database goes; default a temporary directory, under /dev/shm when there is one, so
//! that fsync costs do not dominate).
//! The model's sources are in `peerstash_server::sim::Model`.

use std::path::PathBuf;

use peerstash_server::sim::{self, Model, Params, Redundancy};

fn main() {
    let v: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| -> Option<&str> {
        v.iter()
            .position(|a| a == name)
            .and_then(|i| v.get(i + 1))
            .map(String::as_str)
    };
    let num = |name: &str, d: f64| -> f64 {
        get(name).map_or(d, |s| {
            s.parse().unwrap_or_else(|_| panic!("{name}: a number"))
        })
    };
    let model = Model::named(get("--model").unwrap_or("desktop")).expect("--model desktop|harsh");
    let redundancy = match get("--redundancy").unwrap_or("2") {
        r if r.contains('+') => {
            let (k, m) = r.split_once('+').expect("K+M");
            Redundancy::Stripes {
                data: k.parse().expect("K"),
                parity: m.parse().expect("M"),
            }
        }
        r => Redundancy::Replicas(r.parse().expect("replicas")),
    };
    let mut p = Params::new(
        num("--peers", 1000.0) as usize,
        num("--days", 2.0),
        model,
        redundancy,
    );
    p.seed = num("--seed", p.seed as f64) as u64;
    p.tick_s = num("--tick", p.tick_s as f64) as u64;
    p.repair_grace_s = num("--grace", p.repair_grace_s as f64) as u64;
    p.bandwidth = num("--bandwidth", p.bandwidth as f64) as u64;
    p.initial_chunks = num("--initial", p.initial_chunks as f64) as usize;
    p.writes_per_day = num("--writes", p.writes_per_day);
    p.deletes_per_day = num("--deletes", p.deletes_per_day);
    if let Some(l) = get("--lifetime-days") {
        p.model.lifetime_mean_days = l.parse().expect("--lifetime-days: a number");
    }
    let base = match get("--dir") {
        Some(d) => PathBuf::from(d),
        None if std::path::Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
        None => std::env::temp_dir(),
    };
    let dir = tempfile::tempdir_in(base).expect("a temporary directory");
    println!("{p:?}");
    println!(
        "model availability (long-run): {:.1}%",
        100.0 * model.availability()
    );
    let r = sim::run(&p, dir.path()).expect("the simulation");
    let hours = p.days * 24.0;
    let peers = p.peers as f64;
    let s = &r.server;
    println!(
        "online on average:          {:.1}%",
        100.0 * r.online_fraction
    );
    println!(
        "chunks written / deleted:   {} / {}",
        r.chunks_written, r.chunks_deleted
    );
    println!("chunks at end:              {}", r.chunks_at_end);
    println!("CHUNKS LOST:                {}", r.chunks_lost);
    println!("short of target at end:     {} (parts)", r.short_at_end);
    println!(
        "departed (>1 day) not repaired: {} of {} ({} departures in all)",
        r.departed_not_repaired, r.departed_checked, r.departures
    );
    println!("puts refused:               {:?}", r.refused);
    println!(
        "repairs done / failed:      {} / {}",
        r.repairs_done, r.repairs_failed
    );
    println!(
        "repair bytes per peer-day:  {:.1} MB",
        r.repair_bytes as f64 / peers / p.days / 1e6
    );
    println!("heartbeats:                 {}", r.heartbeats);
    println!(
        "server CPU s / sim hour:    {:.3} (heartbeat {:.3}, put {:.3}, confirm {:.3}, \
         release {:.3}, scan {:.3}, take {:.3}, register {:.3})",
        s.total() / hours,
        s.heartbeat / hours,
        s.put / hours,
        s.confirm / hours,
        s.release / hours,
        s.scan / hours,
        s.take / hours,
        s.register / hours
    );
    let per_beat = s.heartbeat / r.heartbeats.max(1) as f64;
    let per_take = s.take / s.take_calls.max(1) as f64;
    println!(
        "server CPU µs / heartbeat:  {:.1}; / repair hand-out call: {:.1} ({} calls)",
        1e6 * per_beat,
        1e6 * per_take,
        s.take_calls
    );
    // The simulation sends one heartbeat a tick; real daemons send one every 30 s, each
    // with a hand-out call: what that adds, at the same number of online peers.
    let beats_per_hour_real = r.online_fraction * peers * 120.0;
    let beats_per_hour_sim = r.heartbeats as f64 / hours;
    println!(
        "server CPU s / hour at 30 s heartbeats (extrapolated): {:.2}",
        s.total() / hours
            + (beats_per_hour_real - beats_per_hour_sim).max(0.0) * (per_beat + per_take)
    );
    println!(
        "database:                   {:.1} MB, {} locations, {:.0} bytes/location, {:.0} bytes/chunk",
        r.db_bytes as f64 / 1e6,
        r.locations,
        r.db_bytes as f64 / r.locations.max(1) as f64,
        r.db_bytes as f64 / r.chunks_at_end.max(1) as f64
    );
    println!(
        "sqlite heap now / peak:     {:.1} / {:.1} MB",
        r.sqlite_heap.0 as f64 / 1e6,
        r.sqlite_heap.1 as f64 / 1e6
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for l in status
        .lines()
        .filter(|l| l.starts_with("VmHWM") || l.starts_with("VmRSS"))
    {
        println!("process (simulator too) {l}");
    }
    println!("wall:                       {:.0} s", r.wall_s);
}
