//! Storage daemon throughput on loopback for 4 MiB chunks, beside raw quinn streams (no
//! token, no hashing, no disk) measured in the same run as the baseline.
//!
//! `cargo bench --bench peer_throughput` — environment: `PEERSTASH_BENCH_MIB` (total per
//! run, default 256), `PEERSTASH_BENCH_RUNS` (default 3, the median is printed),
//! `PEERSTASH_BENCH_DIR` (where the daemon stores chunks; default a temporary directory).
//!
//! The baseline uses the daemon's QUIC flow-control settings (its default [`Limits`]); a
//! second raw row uses quinn's default (wider) windows, to show what the limits cost. All
//! use the same parallelism: puts go 16 chunks per batch token, spread by `PeerClient::put`
//! over 4 streams; raw puts use 4 streams of 4 chunks. Gets run 4 at a time on both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use peerstash::control::now_secs;
use peerstash::keys::{random_bytes, random_u64};
use peerstash::peer::wire::{ALPN, SERVER_NAME};
use peerstash::peer::{Daemon, DaemonConfig, Limits, NullLink, PeerAddr, PeerClient};
use peerstash::tls::{pinned_client_config, CertKey};
use peerstash::token::{Grant, Token, TokenClaims, TxKind};
use peerstash::{ChunkId, PeerId, TransactionId, TransactionKey};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

const CHUNK: usize = 4 << 20;
const BATCH: usize = 16;
const PARALLEL: usize = 4;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn mib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn random_chunks(n: usize) -> Vec<(ChunkId, Vec<u8>)> {
    (0..n)
        .map(|_| {
            let mut b = vec![0u8; CHUNK];
            random_bytes(&mut b).unwrap();
            (ChunkId::of(&b), b)
        })
        .collect()
}

/// A token sealed with the daemon's key, as the server would.
fn token(key: &TransactionKey, target: PeerId, kind: TxKind, chunks: &[(ChunkId, u32)]) -> Token {
    TokenClaims {
        requester: PeerId(1),
        target,
        kind,
        txid: TransactionId(random_u64().unwrap()),
        issued_at: now_secs(),
        expires_at: now_secs() + 3600,
        grants: chunks.iter().map(|(c, s)| Grant::whole(*c, *s)).collect(),
    }
    .seal(&key.token_keys())
    .unwrap()
}

/// A raw quinn server: a stream starting with `P` is a put (read to the end, answer one
/// byte); one starting with `G` is a get (answer 4 MiB from memory).
/// With `daemon_windows`, the daemon's flow-control limits; otherwise quinn's defaults.
async fn raw_server(cert: &CertKey, daemon_windows: bool) -> (quinn::Endpoint, PeerAddr) {
    let crypto = QuicServerConfig::try_from(cert.server_config(&[ALPN]).unwrap()).unwrap();
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    if daemon_windows {
        cfg.transport_config(Arc::new(Limits::default().transport_config().unwrap()));
    }
    let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = PeerAddr::direct(ep.local_addr().unwrap(), cert.fingerprint());
    let payload = Arc::new(vec![7u8; CHUNK]);
    let server = ep.clone();
    tokio::spawn(async move {
        while let Some(inc) = server.accept().await {
            let payload = payload.clone();
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let payload = payload.clone();
                    tokio::spawn(async move {
                        let mut op = [0u8; 1];
                        if recv.read_exact(&mut op).await.is_err() {
                            return;
                        }
                        if op[0] == b'P' {
                            while let Ok(Some(_)) = recv.read_chunk(256 << 10, true).await {}
                            let _ = send.write_all(b"k").await;
                        } else {
                            let _ = send.write_all(&payload).await;
                        }
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    (ep, addr)
}

async fn raw_connect(peer: &PeerAddr) -> quinn::Connection {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let tls = pinned_client_config(peer.fingerprint, &[ALPN]).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    )));
    ep.connect(peer.addr, SERVER_NAME).unwrap().await.unwrap()
}

async fn raw_put(conn: &quinn::Connection, chunks: &[(ChunkId, Vec<u8>)]) {
    let per = chunks.len().div_ceil(PARALLEL);
    join_all(chunks.chunks(per).map(|group| async move {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"P").await.unwrap();
        for (_, b) in group {
            send.write_all(b).await.unwrap();
        }
        send.finish().unwrap();
        recv.read_to_end(16).await.unwrap();
    }))
    .await;
}

async fn raw_get(conn: &quinn::Connection, n: usize) {
    for _ in 0..n.div_ceil(PARALLEL) {
        join_all((0..PARALLEL).map(|_| async {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(b"G").await.unwrap();
            send.finish().unwrap();
            // Preallocated like PeerClient::get, so the baseline pays no reallocations.
            let mut got = vec![0u8; CHUNK];
            recv.read_exact(&mut got).await.unwrap();
        }))
        .await;
    }
}

fn main() {
    let total_mib = env_usize("PEERSTASH_BENCH_MIB", 256);
    let runs = env_usize("PEERSTASH_BENCH_RUNS", 3).max(1);
    let n_chunks = (total_mib / 4).max(BATCH) / BATCH * BATCH;
    let bytes = n_chunks * CHUNK;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let cert = CertKey::self_signed(&["localhost"]).unwrap();
        let (raw_ep, raw_addr) = raw_server(&cert, true).await;
        let conn = raw_connect(&raw_addr).await;
        let (wide_ep, wide_addr) = raw_server(&cert, false).await;
        let wide = raw_connect(&wide_addr).await;

        let dir = match std::env::var("PEERSTASH_BENCH_DIR") {
            Ok(d) => tempfile::TempDir::new_in(d).unwrap(),
            Err(_) => tempfile::TempDir::new().unwrap(),
        };
        let me = PeerId(42);
        let key = TransactionKey::generate().unwrap();
        let cfg = DaemonConfig::new(
            me,
            key.clone(),
            "127.0.0.1:0".parse().unwrap(),
            dir.path().join("storage"),
            u64::MAX / 2,
            cert.clone(),
            dir.path().join("state"),
        );
        let daemon = Daemon::run(cfg, NullLink).await.unwrap();
        let peer = PeerAddr::direct(daemon.local_addr(), daemon.fingerprint());
        let client = PeerClient::new().unwrap();

        let mut rows: [Vec<f64>; 6] = Default::default();
        for run in 0..runs {
            // Fresh random chunks per run (generated outside the timed sections), so the
            // daemon really writes them rather than recognizing duplicates.
            let mut put_time = Duration::ZERO;
            let mut stored = Vec::new();
            for _ in 0..n_chunks / BATCH {
                let batch = random_chunks(BATCH);
                let refs: Vec<_> = batch.iter().map(|(c, b)| (*c, b.len() as u32)).collect();
                let t = token(&key, me, TxKind::Put, &refs);
                let start = Instant::now();
                let r = client.put(&peer, &t, &batch).await.unwrap();
                put_time += start.elapsed();
                assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
                stored.extend(batch.into_iter().map(|(c, b)| (c, b.len() as u32)));
            }
            let mut raw_put_time = Duration::ZERO;
            for _ in 0..n_chunks / BATCH {
                let batch = random_chunks(BATCH);
                let start = Instant::now();
                raw_put(&conn, &batch).await;
                raw_put_time += start.elapsed();
            }

            let gets: Vec<_> = stored
                .chunks(BATCH)
                .map(|b| (token(&key, me, TxKind::Get, b), b))
                .collect();
            let start = Instant::now();
            for (t, b) in &gets {
                let b: &[(ChunkId, u32)] = b;
                for group in b.chunks(PARALLEL) {
                    let r = join_all(group.iter().map(|(c, s)| client.get(&peer, t, c, *s))).await;
                    assert!(r.iter().all(|r| r.is_ok()));
                }
            }
            let get_time = start.elapsed();
            let start = Instant::now();
            raw_get(&conn, n_chunks).await;
            let raw_get_time = start.elapsed();
            let mut wide_put_time = Duration::ZERO;
            for _ in 0..n_chunks / BATCH {
                let batch = random_chunks(BATCH);
                let start = Instant::now();
                raw_put(&wide, &batch).await;
                wide_put_time += start.elapsed();
            }
            let start = Instant::now();
            raw_get(&wide, n_chunks).await;
            let wide_get_time = start.elapsed();
            rows[4].push(mib_per_s(bytes, wide_put_time));
            rows[5].push(mib_per_s(bytes, wide_get_time));

            rows[0].push(mib_per_s(bytes, raw_put_time));
            rows[1].push(mib_per_s(bytes, put_time));
            rows[2].push(mib_per_s(bytes, raw_get_time));
            rows[3].push(mib_per_s(bytes, get_time));
            eprintln!(
                "run {}: raw put {:.0}, daemon put {:.0}, raw get {:.0}, daemon get {:.0}, \
                 wide raw put {:.0}, wide raw get {:.0} MiB/s",
                run + 1,
                rows[0][run],
                rows[1][run],
                rows[2][run],
                rows[3][run],
                rows[4][run],
                rows[5][run]
            );
            // Empty the store between runs so every run writes to a store of the same size.
            for chunk in stored.chunks(BATCH) {
                let t = token(&key, me, TxKind::Delete, chunk);
                client.delete(&peer, &t, chunk).await.unwrap();
            }
        }
        let [raw_put, put, raw_get, get, wide_put, wide_get] = rows.map(median);
        println!();
        println!(
            "peer throughput: 4 MiB chunks, {} MiB per run, median of {runs} run(s), loopback",
            bytes >> 20
        );
        println!("{:<36} {:>12} {:>12}", "", "put MiB/s", "get MiB/s");
        println!(
            "{:<36} {:>12.0} {:>12.0}",
            "raw quinn streams (baseline)", raw_put, raw_get
        );
        println!(
            "{:<36} {:>12.0} {:>12.0}",
            "raw quinn, quinn's default windows", wide_put, wide_get
        );
        println!(
            "{:<36} {:>12.0} {:>12.0}",
            "daemon (token, BLAKE3, fsync)", put, get
        );
        println!(
            "{:<36} {:>12.2} {:>12.2}",
            "daemon / baseline",
            put / raw_put,
            get / raw_get
        );
        client.close();
        daemon.shutdown().await;
        raw_ep.close(0u8.into(), b"done");
        wide_ep.close(0u8.into(), b"done");
    });
}
