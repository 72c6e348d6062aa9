//! Churn simulation: thousands of simulated peers driving the real [`Store`] (placement,
//! confirms, releases, the repair scan and repair orders) on a real SQLite file, under a
//! simulated clock. Not part of the server; shared by `examples/churn.rs` and the smoke
//! test in `tests/churn.rs`.
//!
//! Time moves in ticks. Each tick: peers whose session began or ended, or who left for
//! good, change state (a departure is replaced by a newcomer, so the population stays
//! put); every online peer sends one heartbeat and drops what it is told to drop; the
//! server sweeps expired placements and runs its repair scan; online peers take repair
//! orders (as many as their bandwidth for the tick allows) and carry out those whose
//! sources are really online and hold the bytes; owners write and delete. Simulated
//! peers keep what they hold in memory: a chunk is *lost* when no peer that has not left
//! for good holds a copy of it (for a stripe: fewer than `k` of its shards).
//!
//! Session and downtime lengths are Weibull, lifetimes exponential; see [`Model`].

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use peerstash::api::{self, ChunkRef, HeartbeatRequest, KeyMode, StripeRef};
use peerstash::{ChunkId, Fingerprint, PeerId};

use crate::store::{NewPeer, Policy, RepairPlan, Store};

const DAY_MS: u64 = 86_400_000;
const HOUR_MS: u64 = 3_600_000;
const GIB: u64 = 1 << 30;

/// A churn model: Weibull session and downtime lengths (shape, median) and an
/// exponential lifetime before a peer leaves for good.
#[derive(Debug, Clone, Copy)]
pub struct Model {
    /// Its name on the command line.
    pub name: &'static str,
    /// Weibull shape of online sessions.
    pub session_shape: f64,
    /// Median online session, hours.
    pub session_median_h: f64,
    /// Weibull shape of offline periods.
    pub down_shape: f64,
    /// Median offline period, hours.
    pub down_median_h: f64,
    /// Mean time before a peer leaves for good, days.
    pub lifetime_mean_days: f64,
}

impl Model {
    /// Desktops that are on most of the day: about 80% available, as Bolosky et al.
    /// (SIGMETRICS 2000) measured on 51,663 corporate desktops; sessions of a median
    /// 12 h, downtimes of a median 2 h (nights, reboots), heavy-tailed (shape 0.7); a
    /// machine stays half a year on average.
    pub const DESKTOP: Model = Model {
        name: "desktop",
        session_shape: 0.7,
        session_median_h: 12.0,
        down_shape: 0.7,
        down_median_h: 2.0,
        lifetime_mean_days: 180.0,
    };
    /// File-sharing peers: Weibull sessions of shape 0.5 (Stutzbach & Rejaie, IMC 2006,
    /// fit shapes 0.34–0.59) with a median of 1 h, offline periods of a median 5 h, so
    /// a median peer is online about 4 h a day (Bhagwan, Savage & Voelker, IPTPS 2003,
    /// found Overnet hosts' mean availability under 30%); a peer leaves for good after
    /// 30 days on average (Overnet's daily turnover was far higher still).
    pub const HARSH: Model = Model {
        name: "harsh",
        session_shape: 0.5,
        session_median_h: 1.0,
        down_shape: 0.5,
        down_median_h: 5.0,
        lifetime_mean_days: 30.0,
    };

    /// The model called `name`.
    pub fn named(name: &str) -> Option<Model> {
        [Model::DESKTOP, Model::HARSH]
            .into_iter()
            .find(|m| m.name == name)
    }

    /// The long-run fraction of time a peer is online.
    pub fn availability(&self) -> f64 {
        let mean = |shape: f64, median: f64| {
            median / std::f64::consts::LN_2.powf(1.0 / shape) * gamma(1.0 + 1.0 / shape)
        };
        let on = mean(self.session_shape, self.session_median_h);
        on / (on + mean(self.down_shape, self.down_median_h))
    }
}

/// Γ(x) for x ≥ 1 (Lanczos), enough for a model's mean.
fn gamma(x: f64) -> f64 {
    const G: [f64; 7] = [
        1.000000000190015,
        76.18009172947146,
        -86.50532032941677,
        24.01409824083091,
        -1.231739572450155,
        0.1208650973866179e-2,
        -0.5395239384953e-5,
    ];
    let mut a = G[0];
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    let t = x + 5.5;
    (2.0 * std::f64::consts::PI).sqrt() * a * t.powf(x + 0.5) * (-t).exp() / x
}

/// How chunks are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redundancy {
    /// Whole copies.
    Replicas(u8),
    /// Erasure-coded stripes of `data` + `parity` shards, each on its own peer.
    Stripes {
        /// `k`.
        data: u8,
        /// `m`.
        parity: u8,
    },
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Params {
    /// Peers (held constant: each departure is replaced by a newcomer).
    pub peers: usize,
    /// Simulated days.
    pub days: f64,
    /// Churn model.
    pub model: Model,
    /// Replicas or stripes.
    pub redundancy: Redundancy,
    /// Seed of the simulation's own randomness.
    pub seed: u64,
    /// Length of a tick (one heartbeat and one repair scan each), seconds.
    pub tick_s: u64,
    /// Silence after which a holder is lost and its chunks repaired (server default).
    pub repair_grace_s: u64,
    /// Token lifetime (server default).
    pub token_lifetime_s: u64,
    /// Each peer's bandwidth, each way, bytes per second.
    pub bandwidth: u64,
    /// Size of a chunk (a stripe's chunk; its shards are `1/k` of it).
    pub chunk_size: u32,
    /// Chunks each owner stores when it first comes online.
    pub initial_chunks: usize,
    /// Chunks an owner writes a day (in files of 4 chunks).
    pub writes_per_day: f64,
    /// Chunks an owner deletes a day.
    pub deletes_per_day: f64,
    /// Bytes lent: each peer picks one of these.
    pub lend_choices: Vec<u64>,
    /// Hours (since the start) at which one more peer, picked at random, leaves for
    /// good, on top of the model's departures.
    pub leave_at_h: Vec<f64>,
}

impl Params {
    /// Defaults for `peers` peers over `days` days under `model`.
    pub fn new(peers: usize, days: f64, model: Model, redundancy: Redundancy) -> Params {
        Params {
            peers,
            days,
            model,
            redundancy,
            seed: 1,
            tick_s: 600,
            repair_grace_s: 3600,
            token_lifetime_s: 600,
            bandwidth: 1_000_000,
            chunk_size: 4 << 20,
            initial_chunks: 64,
            writes_per_day: 8.0,
            deletes_per_day: 4.0,
            lend_choices: vec![2 * GIB, 4 * GIB, 8 * GIB, 16 * GIB],
            leave_at_h: Vec::new(),
        }
    }
}

/// Server time by kind of call, CPU seconds of the simulating thread spent inside the
/// [`Store`] (the simulator's own bookkeeping is not counted).
#[derive(Debug, Default, Clone)]
pub struct ServerTime {
    /// Heartbeats.
    pub heartbeat: f64,
    /// Puts (placement).
    pub put: f64,
    /// Confirms, of writes and of repairs.
    pub confirm: f64,
    /// Releases.
    pub release: f64,
    /// Repair scans and sweeps.
    pub scan: f64,
    /// Handing out repair orders.
    pub take: f64,
    /// Calls handing out repair orders (one at least per heartbeat, as the server does).
    pub take_calls: u64,
    /// Registrations.
    pub register: f64,
}

impl ServerTime {
    /// All of it.
    pub fn total(&self) -> f64 {
        self.heartbeat
            + self.put
            + self.confirm
            + self.release
            + self.scan
            + self.take
            + self.register
    }
}

/// What a run found.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Chunks (or stripes) lost for good (their owner then releases them).
    pub chunks_lost: u64,
    /// Chunks (or stripes) tracked at the end (owned by peers still there).
    pub chunks_at_end: u64,
    /// Chunks (or stripes) written, the initial ones included.
    pub chunks_written: u64,
    /// Chunks (or stripes) deleted by their owners.
    pub chunks_deleted: u64,
    /// Puts refused, by reason.
    pub refused: Vec<(String, u64)>,
    /// Peers that left for good (each replaced by a newcomer).
    pub departures: u64,
    /// Repair orders carried out.
    pub repairs_done: u64,
    /// Repair orders that failed (a source or the target went offline, or lacked the
    /// bytes or the bandwidth) and were left to expire.
    pub repairs_failed: u64,
    /// Bytes moved by repairs (every source byte counted).
    pub repair_bytes: u64,
    /// Heartbeats sent.
    pub heartbeats: u64,
    /// Mean fraction of peers online.
    pub online_fraction: f64,
    /// Peers that left for good more than a day before the end and still hold
    /// committed locations at the end (their chunks not all re-replicated).
    pub departed_not_repaired: u64,
    /// Peers that left for good more than a day before the end.
    pub departed_checked: u64,
    /// Replicated chunks (or stripe shards) with fewer holders still there than the
    /// target, at the end.
    pub short_at_end: u64,
    /// Server CPU time.
    pub server: ServerTime,
    /// Committed locations at the end.
    pub locations: u64,
    /// Database bytes (main file and write-ahead log) at the end.
    pub db_bytes: u64,
    /// SQLite's heap at the end and at its peak, bytes.
    pub sqlite_heap: (u64, u64),
    /// Wall-clock seconds the run took.
    pub wall_s: f64,
}

/// A simulation that could not go on.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The store failed.
    #[error("store: {0}")]
    Db(#[from] crate::store::db::Error),
    /// The store refused something the simulation needs (a registration).
    #[error("refused: {0}")]
    Refused(#[from] crate::store::StoreError),
}

/// splitmix64: the simulation's own reproducible randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// Weibull with `shape` and `median` (hours), in ms.
    fn weibull_ms(&mut self, shape: f64, median_h: f64) -> u64 {
        let scale = median_h / std::f64::consts::LN_2.powf(1.0 / shape);
        let h = scale * (-self.unit().ln()).powf(1.0 / shape);
        ((h * HOUR_MS as f64) as u64).max(1000)
    }
    /// Exponential with mean `days`, in ms.
    fn exp_ms(&mut self, days: f64) -> u64 {
        (-self.unit().ln() * days * DAY_MS as f64) as u64
    }
    /// How many of a Poisson process with `mean` events.
    fn poisson(&mut self, mean: f64) -> usize {
        let l = (-mean).exp();
        let (mut k, mut p) = (0, self.unit());
        while p > l && k < 1000 {
            k += 1;
            p *= self.unit();
        }
        k
    }
}

/// One simulated peer.
struct Peer {
    id: PeerId,
    online: bool,
    departed: bool,
    departed_ms: u64,
    next_change_ms: u64,
    leaves_ms: u64,
    lend: u64,
    held: u64,
    holds: HashSet<ChunkId>,
    dropped: Vec<ChunkId>,
    owns: Vec<ChunkId>,
    filled: bool,
    up: u64,
    down: u64,
}

/// A chunk or a stripe an owner stored: its parts (the chunk, or the shards) and how
/// many parts must survive.
struct Obj {
    owner: usize,
    parts: Vec<ChunkId>,
    need: usize,
}

/// Thread CPU time, seconds.
fn cpu_now() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Run `f` on the store, adding its CPU time to `slot`.
fn timed<T>(store: &mut Store, slot: &mut f64, f: impl FnOnce(&mut Store) -> T) -> T {
    let t = cpu_now();
    let out = f(store);
    *slot += cpu_now() - t;
    out
}

struct Sim<'a> {
    p: &'a Params,
    rng: Rng,
    store: Store,
    now: u64,
    peers: Vec<Peer>,
    by_id: HashMap<PeerId, usize>,
    objs: HashMap<ChunkId, Obj>,
    part_of: HashMap<ChunkId, ChunkId>,
    holders: HashMap<ChunkId, Vec<usize>>,
    next_chunk: u64,
    report: Report,
    refused: HashMap<String, u64>,
    /// Lost objects their owners have yet to release.
    lost: Vec<(usize, ChunkId)>,
    start: u64,
}

/// Run the simulation with its database in `dir`.
pub fn run(p: &Params, dir: &Path) -> Result<Report, SimError> {
    let wall = Instant::now();
    let store = Store::open(&dir.join("sim.db"))?;
    let mut sim = Sim {
        p,
        rng: Rng(p.seed),
        store,
        now: 1_000_000_000_000,
        peers: Vec::new(),
        by_id: HashMap::new(),
        objs: HashMap::new(),
        part_of: HashMap::new(),
        holders: HashMap::new(),
        next_chunk: 1,
        report: Report::default(),
        refused: HashMap::new(),
        lost: Vec::new(),
        start: 1_000_000_000_000,
    };
    let start = sim.now;
    let a = p.model.availability();
    for _ in 0..p.peers {
        let online = sim.rng.unit() < a;
        sim.join(online)?;
    }
    let end = start + (p.days * DAY_MS as f64) as u64;
    let (mut ticks, mut online_sum) = (0u64, 0f64);
    while sim.now < end {
        sim.now += p.tick_s * 1000;
        sim.churn()?;
        sim.heartbeats()?;
        sim.server_pass()?;
        sim.repairs()?;
        sim.owners()?;
        ticks += 1;
        online_sum += sim.peers.iter().filter(|x| x.online).count() as f64 / p.peers as f64;
    }
    sim.finish(ticks, online_sum, dir)?;
    let mut report = sim.report;
    report.wall_s = wall.elapsed().as_secs_f64();
    Ok(report)
}

impl Sim<'_> {
    fn policy(&self) -> Policy {
        Policy {
            quota_ratio: 1.5,
            quota_grace: None,
            now_ms: self.now,
            // Online: sent this tick's heartbeat.
            online_cutoff_ms: self.now.saturating_sub(self.p.tick_s * 1000 / 2),
            expires_s: self.now / 1000 + self.p.token_lifetime_s,
        }
    }

    fn new_chunk(&mut self) -> ChunkId {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&self.next_chunk.to_le_bytes());
        id[8..16].copy_from_slice(&self.p.seed.to_le_bytes());
        self.next_chunk += 1;
        ChunkId(id)
    }

    /// A new peer registers.
    fn join(&mut self, online: bool) -> Result<(), SimError> {
        let n = self.peers.len();
        let lend = self.p.lend_choices[self.rng.below(self.p.lend_choices.len())];
        let name = format!("p{n}");
        let new = NewPeer {
            name: &name,
            password_hash: "x",
            key_mode: KeyMode::Escrow,
            lend_bytes: lend,
            quic_addr: "127.0.0.1:1",
            fingerprint: Fingerprint([1; 32]),
        };
        let now = self.now;
        let id = timed(&mut self.store, &mut self.report.server.register, |s| {
            s.insert_peer(&new, None, false, now, |_| Ok(vec![0]))
        })?;
        let m = self.p.model;
        let stay = if online {
            self.rng.weibull_ms(m.session_shape, m.session_median_h)
        } else {
            self.rng.weibull_ms(m.down_shape, m.down_median_h)
        };
        let leaves = now + self.rng.exp_ms(m.lifetime_mean_days);
        self.peers.push(Peer {
            id,
            online,
            departed: false,
            departed_ms: 0,
            next_change_ms: now + stay,
            leaves_ms: leaves,
            lend,
            held: 0,
            holds: HashSet::new(),
            dropped: Vec::new(),
            owns: Vec::new(),
            filled: false,
            up: 0,
            down: 0,
        });
        self.by_id.insert(id, n);
        Ok(())
    }

    /// Sessions begin and end; peers leave for good and newcomers take their place.
    fn churn(&mut self) -> Result<(), SimError> {
        let m = self.p.model;
        let mut left = 0;
        let (from, to) = (self.now - self.p.tick_s * 1000, self.now);
        for h in &self.p.leave_at_h {
            let at = self.start + (h * HOUR_MS as f64) as u64;
            if at > from && at <= to {
                let present: Vec<usize> = (0..self.peers.len())
                    .filter(|i| !self.peers[*i].departed)
                    .collect();
                let i = present[self.rng.below(present.len())];
                self.depart(i);
                left += 1;
            }
        }
        for i in 0..self.peers.len() {
            if self.peers[i].departed {
                continue;
            }
            if self.peers[i].leaves_ms <= self.now {
                self.depart(i);
                left += 1;
                continue;
            }
            while self.peers[i].next_change_ms <= self.now {
                let on = !self.peers[i].online;
                let d = if on {
                    self.rng.weibull_ms(m.session_shape, m.session_median_h)
                } else {
                    self.rng.weibull_ms(m.down_shape, m.down_median_h)
                };
                let p = &mut self.peers[i];
                p.online = on;
                p.next_change_ms += d;
            }
        }
        for _ in 0..left {
            self.join(true)?;
        }
        self.release_lost()
    }

    /// Owners release what they lost (they find out when they read it): the server
    /// stops trying to repair it.
    fn release_lost(&mut self) -> Result<(), SimError> {
        for (owner, o) in std::mem::take(&mut self.lost) {
            let id = self.peers[owner].id;
            timed(&mut self.store, &mut self.report.server.release, |s| {
                s.release(id, &[o])
            })?;
        }
        Ok(())
    }

    /// Peer `i` leaves for good with everything it holds; its own data stops counting.
    fn depart(&mut self, i: usize) {
        self.report.departures += 1;
        let p = &mut self.peers[i];
        p.departed = true;
        p.online = false;
        p.departed_ms = self.now;
        let holds: Vec<ChunkId> = p.holds.drain().collect();
        let owns = std::mem::take(&mut p.owns);
        for o in owns {
            self.forget(o);
        }
        for c in holds {
            self.unhold(i, c);
        }
    }

    /// Stop tracking object `o` (deleted, or its owner left).
    fn forget(&mut self, o: ChunkId) {
        if let Some(obj) = self.objs.remove(&o) {
            for part in obj.parts {
                self.part_of.remove(&part);
            }
        }
    }

    /// Peer `i` no longer holds `c`: count a loss if that was the last copy that mattered.
    fn unhold(&mut self, i: usize, c: ChunkId) {
        if let Some(h) = self.holders.get_mut(&c) {
            h.retain(|x| *x != i);
            if h.is_empty() {
                self.holders.remove(&c);
            }
        }
        let Some(o) = self.part_of.get(&c).copied() else {
            return;
        };
        let Some(obj) = self.objs.get(&o) else {
            return;
        };
        let alive = obj
            .parts
            .iter()
            .filter(|p| self.holders.contains_key(p))
            .count();
        if alive < obj.need {
            self.report.chunks_lost += 1;
            let owner = obj.owner;
            self.peers[owner].owns.retain(|x| *x != o);
            self.forget(o);
            self.lost.push((owner, o));
        }
    }

    fn hold(&mut self, i: usize, c: ChunkId, size: u32) {
        if self.peers[i].holds.insert(c) {
            self.peers[i].held += u64::from(size);
            self.holders.entry(c).or_default().push(i);
        }
    }

    /// Every online peer sends a heartbeat and drops what it is told to drop.
    fn heartbeats(&mut self) -> Result<(), SimError> {
        let now = self.now;
        for i in 0..self.peers.len() {
            if !self.peers[i].online {
                continue;
            }
            let p = &mut self.peers[i];
            p.up = self.p.bandwidth * self.p.tick_s;
            p.down = p.up;
            let req = HeartbeatRequest {
                quic_addr: "127.0.0.1:1".into(),
                cert_fingerprint: Fingerprint([1; 32]),
                free_bytes: p.lend.saturating_sub(p.held),
                used_bytes: p.held,
                dropped: std::mem::take(&mut p.dropped),
            };
            let id = p.id;
            let drops = timed(&mut self.store, &mut self.report.server.heartbeat, |s| {
                s.heartbeat(id, &req, now)
            })?;
            self.report.heartbeats += 1;
            for c in drops {
                if self.peers[i].holds.remove(&c) {
                    // Sizes are uniform per kind; the exact figure only feeds free_bytes.
                    let size = self.part_size();
                    self.peers[i].held = self.peers[i].held.saturating_sub(u64::from(size));
                    self.unhold(i, c);
                }
                self.peers[i].dropped.push(c);
            }
        }
        self.release_lost()
    }

    fn part_size(&self) -> u32 {
        match self.p.redundancy {
            Redundancy::Replicas(_) => self.p.chunk_size,
            Redundancy::Stripes { data, .. } => self.p.chunk_size.div_ceil(u32::from(data)),
        }
    }

    /// The server's periodic work: sweep expired placements, scan for repairs.
    fn server_pass(&mut self) -> Result<(), SimError> {
        let pol = self.policy();
        let lost_before = self.now.saturating_sub(self.p.repair_grace_s * 1000);
        let lifetime = self.p.token_lifetime_s;
        timed(&mut self.store, &mut self.report.server.scan, |s| {
            s.sweep_pending(pol.now_ms / 1000, lifetime)?;
            s.scan_repairs(lost_before, &pol)
        })?;
        Ok(())
    }

    /// Online peers take repair orders as their bandwidth allows, and carry them out.
    fn repairs(&mut self) -> Result<(), SimError> {
        let pol = self.policy();
        let part = u64::from(self.part_size());
        let need_down = match self.p.redundancy {
            Redundancy::Replicas(_) => part,
            Redundancy::Stripes { data, .. } => part * u64::from(data),
        };
        let mut order: Vec<usize> = (0..self.peers.len())
            .filter(|i| self.peers[*i].online)
            .collect();
        for k in (1..order.len()).rev() {
            order.swap(k, self.rng.below(k + 1));
        }
        // The real daemon sends a heartbeat, and may get orders, every 30 s.
        let beats = (self.p.tick_s / 30).max(1);
        for i in order {
            for _ in 0..beats {
                let can = (self.peers[i].down / need_down) as usize;
                if can == 0 {
                    break;
                }
                let id = self.peers[i].id;
                let max = can.min(api::MAX_REPAIRS_PER_HEARTBEAT);
                let plans = timed(&mut self.store, &mut self.report.server.take, |s| {
                    s.take_repairs(id, &pol, max)
                })?;
                self.report.server.take_calls += 1;
                if plans.is_empty() {
                    break;
                }
                let n = plans.len();
                for plan in plans {
                    self.carry_out(i, plan)?;
                }
                if n < max {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Peer `i` carries out one repair order: the sources must really be online, hold
    /// the bytes and have upload left this tick.
    fn carry_out(&mut self, i: usize, plan: RepairPlan) -> Result<(), SimError> {
        let mut uses: Vec<(usize, u64)> = Vec::new();
        let ok = if let Some(src) = &plan.source {
            match self.by_id.get(&src.target) {
                Some(&j) if self.peers[j].online && self.peers[j].holds.contains(&plan.chunk) => {
                    uses.push((j, u64::from(plan.size)));
                    true
                }
                _ => false,
            }
        } else if let Some((stripe, _, sources)) = &plan.rebuild {
            let mut got = 0;
            for s in sources {
                let Some(&j) = self.by_id.get(&s.target) else {
                    continue;
                };
                if !self.peers[j].online {
                    continue;
                }
                for (c, size) in &s.grants {
                    if got < stripe.data as usize && self.peers[j].holds.contains(c) {
                        got += 1;
                        uses.push((j, u64::from(*size)));
                    }
                }
            }
            got == stripe.data as usize
        } else {
            false
        };
        let total: u64 = uses.iter().map(|(_, b)| b).sum();
        let mut up: HashMap<usize, u64> = HashMap::new();
        for (j, b) in &uses {
            *up.entry(*j).or_default() += b;
        }
        let fits = self.peers[i].down >= total && up.iter().all(|(j, b)| self.peers[*j].up >= *b);
        if !ok || !fits {
            self.report.repairs_failed += 1;
            return Ok(());
        }
        self.peers[i].down -= total;
        for (j, b) in up {
            self.peers[j].up -= b;
        }
        self.report.repair_bytes += total;
        self.hold(i, plan.chunk, plan.size);
        let ids = [plan.chunk];
        timed(&mut self.store, &mut self.report.server.confirm, |s| {
            s.confirm_batch(&[(plan.put.target, plan.put.txid, &ids[..])])
        })?;
        self.report.repairs_done += 1;
        Ok(())
    }

    /// Online owners store their first data, write files and delete old chunks.
    fn owners(&mut self) -> Result<(), SimError> {
        let per_tick = self.p.tick_s as f64 / 86_400.0;
        for i in 0..self.peers.len() {
            if !self.peers[i].online {
                continue;
            }
            let n = if self.peers[i].filled {
                self.rng.poisson(self.p.writes_per_day * per_tick)
            } else {
                self.peers[i].filled = true;
                self.p.initial_chunks
            };
            if n > 0 {
                self.write(i, n)?;
            }
            let d = self.rng.poisson(self.p.deletes_per_day * per_tick);
            let mut gone = Vec::new();
            for _ in 0..d.min(self.peers[i].owns.len()) {
                let k = self.rng.below(self.peers[i].owns.len());
                gone.push(self.peers[i].owns.swap_remove(k));
            }
            if !gone.is_empty() {
                let id = self.peers[i].id;
                timed(&mut self.store, &mut self.report.server.release, |s| {
                    s.release(id, &gone)
                })?;
                self.report.chunks_deleted += gone.len() as u64;
                for o in gone {
                    self.forget(o);
                }
            }
        }
        Ok(())
    }

    /// Owner `i` stores `n` new chunks (or stripes), in puts of at most 256.
    fn write(&mut self, i: usize, n: usize) -> Result<(), SimError> {
        let pol = self.policy();
        let owner = self.peers[i].id;
        let mut left = n;
        while left > 0 {
            let batch = left.min(256);
            left -= batch;
            let mut chunks = Vec::new();
            let mut stripes = Vec::new();
            let replicas = match self.p.redundancy {
                Redundancy::Replicas(r) => {
                    for _ in 0..batch {
                        let id = self.new_chunk();
                        chunks.push(ChunkRef {
                            id,
                            size: self.p.chunk_size,
                        });
                    }
                    r
                }
                Redundancy::Stripes { data, parity } => {
                    let size = self.part_size();
                    for _ in 0..batch {
                        let chunk = self.new_chunk();
                        let shards = (0..data + parity)
                            .map(|_| ChunkRef {
                                id: self.new_chunk(),
                                size,
                            })
                            .collect();
                        stripes.push(StripeRef {
                            chunk,
                            chunk_size: self.p.chunk_size,
                            data,
                            parity,
                            shards,
                        });
                    }
                    1
                }
            };
            let plan = timed(&mut self.store, &mut self.report.server.put, |s| {
                s.put_with_stripes(owner, &chunks, &stripes, replicas, &[], &pol)
            });
            let plan = match plan {
                Ok(plan) => plan,
                Err(e) => {
                    *self.refused.entry(e.reason().to_string()).or_default() += 1;
                    continue;
                }
            };
            // The owner uploads at once to targets that were online at the put.
            let mut confirms = Vec::new();
            for pl in &plan.placements {
                let Some(&j) = self.by_id.get(&pl.target) else {
                    continue;
                };
                let ids: Vec<ChunkId> = pl.grants.iter().map(|g| g.0).collect();
                for (c, size) in &pl.grants {
                    self.hold(j, *c, *size);
                }
                confirms.push((pl.target, pl.txid, ids));
            }
            let batch_ref: Vec<(PeerId, peerstash::TransactionId, &[ChunkId])> = confirms
                .iter()
                .map(|(t, x, ids)| (*t, *x, &ids[..]))
                .collect();
            timed(&mut self.store, &mut self.report.server.confirm, |s| {
                s.confirm_batch(&batch_ref)
            })?;
            for c in chunks {
                self.track(i, c.id, vec![c.id], 1);
            }
            for st in stripes {
                let parts = st.shards.iter().map(|s| s.id).collect();
                self.track(i, st.chunk, parts, st.data as usize);
            }
        }
        Ok(())
    }

    fn track(&mut self, owner: usize, id: ChunkId, parts: Vec<ChunkId>, need: usize) {
        for p in &parts {
            self.part_of.insert(*p, id);
        }
        self.objs.insert(id, Obj { owner, parts, need });
        self.peers[owner].owns.push(id);
        self.report.chunks_written += 1;
    }

    fn finish(&mut self, ticks: u64, online_sum: f64, dir: &Path) -> Result<(), SimError> {
        let r = &mut self.report;
        r.online_fraction = online_sum / ticks.max(1) as f64;
        r.chunks_at_end = self.objs.len() as u64;
        let mut refused: Vec<(String, u64)> = self.refused.drain().collect();
        refused.sort();
        r.refused = refused;
        let want = match self.p.redundancy {
            Redundancy::Replicas(n) => n as usize,
            Redundancy::Stripes { .. } => 1,
        };
        r.short_at_end = self
            .objs
            .values()
            .flat_map(|o| o.parts.iter())
            .filter(|c| self.holders.get(c).map_or(0, |h| h.len()) < want)
            .count() as u64;
        for p in &self.peers {
            if p.departed && p.departed_ms + DAY_MS <= self.now {
                r.departed_checked += 1;
                if self.store.locations_on(p.id)? > 0 {
                    r.departed_not_repaired += 1;
                }
            }
        }
        r.locations = self.store.figures(0)?.locations;
        let size = |f: &str| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len());
        r.db_bytes = size("sim.db") + size("sim.db-wal");
        // SAFETY: plain reads of SQLite's global memory counters.
        r.sqlite_heap = unsafe {
            (
                rusqlite::ffi::sqlite3_memory_used() as u64,
                rusqlite::ffi::sqlite3_memory_highwater(0) as u64,
            )
        };
        Ok(())
    }
}
