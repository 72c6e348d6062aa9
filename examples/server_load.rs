//! Load benchmark of the coordination server (not a test): many simulated peers on
//! loopback against a real `peerstash-server` process with its real SQLite file, or with
//! `--database postgres://…` on a PostgreSQL database (an existing, empty one).
//!
//! ```sh
//! cargo run --release --example server_load -- [--peers 50] [--workers 16] [--secs 10] \
//!     [--database postgres://postgres@127.0.0.1:5432/load]
//! ```
//!
//! Prints put requests (64-chunk batches, 2 replicas, then the targets' confirms) and get
//! requests (64 chunks) per second with p50/p99 latency, the server's CPU and resident
//! memory, the chunk locations it holds and its database bytes per location — and, as
//! the baseline measured in the same run, the raw rate at which this machine seals
//! 64-chunk tokens in-process (the protocol core's token-issue rate, no HTTP, no SQLite).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use peerstash::api::{
    ChunkRef, ConfirmRequest, GetRequest, HeartbeatRequest, KeyMode, PutRequest, RegisterRequest,
};
use peerstash::client::ServerClient;
use peerstash::token::{Grant, TokenClaims, TxKind};
use peerstash::{ChunkId, Fingerprint, PeerId, TransactionId, TransactionKey};

const BATCH: usize = 64;
const CHUNK_SIZE: u32 = 1 << 20;

struct Args {
    peers: usize,
    workers: usize,
    secs: u64,
    /// `--database` for the server (None: SQLite in its data directory).
    database: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        peers: 50,
        workers: 16,
        secs: 10,
        database: None,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i + 1 < v.len() {
        if v[i] == "--database" {
            a.database = Some(v[i + 1].clone());
            i += 2;
            continue;
        }
        let n: u64 = v[i + 1].parse().expect("a number");
        match v[i].as_str() {
            "--peers" => a.peers = n.max(3) as usize,
            "--workers" => a.workers = n.max(1) as usize,
            "--secs" => a.secs = n.max(1),
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    a
}

/// The server binary next to this example's profile directory, built if missing.
fn server_bin() -> PathBuf {
    let me = std::env::current_exe().unwrap();
    let profile_dir = me.parent().unwrap().parent().unwrap();
    let bin = profile_dir.join("peerstash-server");
    if !bin.exists() {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-p", "peerstash-server"]);
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().unwrap().success(),
            "building peerstash-server failed"
        );
    }
    bin
}

/// Kills the server when the benchmark ends, however it ends.
struct Reaper(Child);
impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn proc_figures(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of the command name: utime is the 12th, stime the 13th.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (rss_kb, ticks as f64 / 100.0)
}

fn dir_bytes(dir: &Path, prefix: &str) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// CPU seconds of every PostgreSQL process on the machine (the server's database work,
/// when it runs on PostgreSQL: its backends are processes of their own).
fn postgres_cpu() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(|pid| proc_figures(pid).1)
        .sum()
}

/// The size of the PostgreSQL database at `url`, through `psql`.
fn postgres_bytes(url: &str) -> u64 {
    Command::new("psql")
        .args([url, "-Atc", "SELECT pg_database_size(current_database())"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// The baseline: 64-chunk put tokens sealed per second, in this process.
fn raw_seal_rate() -> f64 {
    let key = TransactionKey::generate().unwrap();
    let keys = key.token_keys();
    let grants: Vec<Grant> = (0..BATCH as u32)
        .map(|i| Grant::whole(ChunkId::of(&i.to_be_bytes()), CHUNK_SIZE))
        .collect();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        let c = TokenClaims {
            requester: PeerId(1),
            target: PeerId(2),
            kind: TxKind::Put,
            txid: TransactionId(n),
            issued_at: 1_800_000_000,
            expires_at: 1_800_000_600,
            grants: grants.clone(),
        };
        std::hint::black_box(c.seal(&keys).unwrap());
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

struct Sim {
    id: PeerId,
    client: ServerClient,
}

#[tokio::main]
async fn main() {
    let a = args();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let mut cmd = Command::new(server_bin());
    if let Some(db) = &a.database {
        cmd.args(["--database", db]);
    }
    let mut child = cmd
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--open-registration"])
        .args(["--auth-burst", "100000", "--auth-per-minute", "100000"])
        // The simulated peers run no daemon to answer audits: the quota follows `--lend`.
        .args(["--audit-interval", "0"])
        // Its figures are read over the simulated peers' own connection.
        .args(["--public-metrics", "--metrics-listen", "off"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start peerstash-server");
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let _reaper = Reaper(child);
    let mut lines = BufReader::new(stdout).lines();
    let (mut fp, mut url) = (None, None);
    while fp.is_none() || url.is_none() {
        let l = lines.next().expect("server output").unwrap();
        if let Some(v) = l.strip_prefix("fingerprint: ") {
            fp = Some(v.parse::<Fingerprint>().unwrap());
        } else if let Some(v) = l.strip_prefix("listening: ") {
            url = Some(v.to_string());
        }
    }
    let (fp, url) = (fp.unwrap(), url.unwrap());
    std::thread::spawn(move || for _ in lines {});

    println!(
        "peerstash-server load: {} peers, {} workers, {} s per phase, database {}",
        a.peers,
        a.workers,
        a.secs,
        a.database.as_deref().map_or("SQLite", |_| "PostgreSQL")
    );
    let t = Instant::now();
    let mut sims = Vec::new();
    for i in 0..a.peers {
        let c = ServerClient::new(&url, fp).unwrap();
        let r = c
            .register(&RegisterRequest {
                name: format!("peer{i}"),
                password: "benchmark password".into(),
                invite: None,
                lend_bytes: 1 << 50,
                quic_addr: format!("127.0.0.1:{}", 10000 + i),
                cert_fingerprint: Fingerprint([i as u8; 32]),
                key_mode: KeyMode::Escrow,
            })
            .await
            .unwrap();
        let key = TransactionKey::from_hex(&r.transaction_key).unwrap();
        let client = c.with_identity(r.peer_id, key);
        client
            .heartbeat(&HeartbeatRequest {
                quic_addr: format!("127.0.0.1:{}", 10000 + i),
                cert_fingerprint: Fingerprint([i as u8; 32]),
                free_bytes: 1 << 50,
                used_bytes: 0,
                dropped: vec![],
            })
            .await
            .unwrap();
        sims.push(Sim {
            id: r.peer_id,
            client,
        });
    }
    println!(
        "registered {} peers in {:.2} s (Argon2id per registration); server RSS now {} MiB",
        a.peers,
        t.elapsed().as_secs_f64(),
        proc_figures(pid).0 / 1024
    );
    let sims = Arc::new(sims);
    let by_id: Arc<HashMap<PeerId, usize>> =
        Arc::new(sims.iter().enumerate().map(|(i, s)| (s.id, i)).collect());
    let owned: Arc<Vec<Mutex<Vec<ChunkId>>>> =
        Arc::new((0..a.peers).map(|_| Mutex::new(Vec::new())).collect());
    let counter = Arc::new(AtomicU64::new(0));

    // Phase 1: puts, each followed by its targets' confirms.
    let (cpu0, wall0) = (proc_figures(pid).1, Instant::now());
    let pg0 = postgres_cpu();
    let deadline = Instant::now() + Duration::from_secs(a.secs);
    let mut tasks = Vec::new();
    for w in 0..a.workers {
        let (sims, by_id, owned, counter) =
            (sims.clone(), by_id.clone(), owned.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let mut put_lat = Vec::new();
            let mut confirm_lat = Vec::new();
            let mut confirms = 0u64;
            let mut i = w;
            while Instant::now() < deadline {
                let me = i % sims.len();
                i += a_prime();
                let chunks: Vec<ChunkRef> = (0..BATCH)
                    .map(|_| ChunkRef {
                        id: ChunkId::of(&counter.fetch_add(1, Ordering::Relaxed).to_be_bytes()),
                        size: CHUNK_SIZE,
                    })
                    .collect();
                let t = Instant::now();
                let resp = sims[me]
                    .client
                    .put(&PutRequest {
                        chunks: chunks.clone(),
                        replicas: 2,
                        exclude: vec![],
                        stripes: vec![],
                    })
                    .await
                    .unwrap();
                put_lat.push(t.elapsed());
                // Targets confirm independently of each other, so in parallel.
                let confirms_of_put = resp.placements.into_iter().map(|pl| {
                    let target = &sims[by_id[&pl.target]];
                    async move {
                        let t = Instant::now();
                        let r = target
                            .client
                            .confirm(&ConfirmRequest {
                                txid: pl.txid,
                                chunks: pl.chunks,
                            })
                            .await
                            .unwrap();
                        (r.committed as u64, t.elapsed())
                    }
                });
                for (n, l) in futures_util::future::join_all(confirms_of_put).await {
                    confirms += n;
                    confirm_lat.push(l);
                }
                owned[me]
                    .lock()
                    .unwrap()
                    .extend(chunks.iter().map(|c| c.id));
            }
            (put_lat, confirm_lat, confirms)
        }));
    }
    let mut put_lat = Vec::new();
    let mut confirm_lat = Vec::new();
    let mut confirmed = 0;
    for t in tasks {
        let (l, cl, c) = t.await.unwrap();
        put_lat.extend(l);
        confirm_lat.extend(cl);
        confirmed += c;
    }
    confirm_lat.sort();
    let put_wall = wall0.elapsed().as_secs_f64();
    let put_cpu = proc_figures(pid).1 - cpu0;
    let put_pg = postgres_cpu() - pg0;
    put_lat.sort();

    // Phase 2: gets of 64 owned chunks.
    let (cpu1, wall1) = (proc_figures(pid).1, Instant::now());
    let pg1 = postgres_cpu();
    let deadline = Instant::now() + Duration::from_secs(a.secs);
    let mut tasks = Vec::new();
    for w in 0..a.workers {
        let (sims, owned) = (sims.clone(), owned.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = w;
            while Instant::now() < deadline {
                let me = i % sims.len();
                i += a_prime();
                let ids: Vec<ChunkId> = {
                    let o = owned[me].lock().unwrap();
                    if o.len() < BATCH {
                        continue;
                    }
                    let start = (i * BATCH) % (o.len() - BATCH + 1);
                    o[start..start + BATCH].to_vec()
                };
                let t = Instant::now();
                let r = sims[me]
                    .client
                    .get(&GetRequest { chunks: ids })
                    .await
                    .unwrap();
                lat.push(t.elapsed());
                assert!(r.missing.is_empty());
            }
            lat
        }));
    }
    let mut get_lat = Vec::new();
    for t in tasks {
        get_lat.extend(t.await.unwrap());
    }
    let get_wall = wall1.elapsed().as_secs_f64();
    let get_cpu = proc_figures(pid).1 - cpu1;
    let get_pg = postgres_cpu() - pg1;
    get_lat.sort();

    let (rss_kb, _) = proc_figures(pid);
    let metrics = sims[0].client.metrics().await.unwrap();
    let locations: u64 = metrics
        .lines()
        .find(|l| l.starts_with("peerstash_chunk_locations "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    let db_bytes = match &a.database {
        Some(url) => postgres_bytes(url),
        None => dir_bytes(&data, "server.db"),
    };
    let seal = raw_seal_rate();

    println!();
    println!(
        "{:<44} {:>12} {:>9} {:>9} {:>10} {:>10}",
        "operation", "per second", "p50 ms", "p99 ms", "server CPU", "PostgreSQL"
    );
    println!(
        "{:<44} {:>12.0} {:>9.2} {:>9.2} {:>9.0}% {:>9.0}%",
        "put, 64 chunks x 2 replicas (+ confirms)",
        put_lat.len() as f64 / put_wall,
        pct(&put_lat, 0.5),
        pct(&put_lat, 0.99),
        100.0 * put_cpu / put_wall,
        100.0 * put_pg / put_wall
    );
    println!(
        "{:<44} {:>12.0} {:>9.2} {:>9.2}",
        "  confirm by each target (same phase)",
        confirm_lat.len() as f64 / put_wall,
        pct(&confirm_lat, 0.5),
        pct(&confirm_lat, 0.99),
    );
    println!(
        "{:<44} {:>12.0} {:>9.2} {:>9.2} {:>9.0}% {:>9.0}%",
        "get, 64 chunks",
        get_lat.len() as f64 / get_wall,
        pct(&get_lat, 0.5),
        pct(&get_lat, 0.99),
        100.0 * get_cpu / get_wall,
        100.0 * get_pg / get_wall
    );
    println!(
        "{:<44} {:>12.0}",
        "baseline: 64-chunk tokens sealed in-process", seal
    );
    println!();
    println!("locations committed: {locations} ({confirmed} by confirms in the put phase)");
    println!(
        "database: {} bytes, {:.0} bytes per location",
        db_bytes,
        db_bytes as f64 / locations.max(1) as f64
    );
    println!("server resident memory: {} MiB", rss_kb / 1024);
}

/// A stride co-prime with small peer counts, so workers visit peers in a scattered order.
fn a_prime() -> usize {
    7919
}
