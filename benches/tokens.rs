//! Token throughput: tokens sealed and opened per second for 1-chunk and 64-chunk batch
//! tokens, beside the raw HMAC-SHA256 rate over a token-sized message (the baseline: the
//! one operation no token can avoid). Run with `cargo bench --bench tokens`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use peerstash::replay::ReplayStore;
use peerstash::token::{Grant, TokenClaims, TokenVerifier, TxKind};
use peerstash::{ChunkId, PeerId, TransactionId, TransactionKey};
use sha2::Sha256;

const NOW: u64 = 1_800_000_000;

/// Runs `f` repeatedly for about `budget` and returns operations per second (median of 5).
fn rate(budget: Duration, mut f: impl FnMut(u64)) -> f64 {
    let mut rates = Vec::new();
    let mut i = 0u64;
    for _ in 0..5 {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < budget / 5 {
            for _ in 0..64 {
                f(i);
                i += 1;
                n += 1;
            }
        }
        rates.push(n as f64 / start.elapsed().as_secs_f64());
    }
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rates[2]
}

fn claims(n: u32, txid: u64) -> TokenClaims {
    TokenClaims {
        requester: PeerId(1),
        target: PeerId(2),
        kind: TxKind::Put,
        txid: TransactionId(txid),
        issued_at: NOW,
        expires_at: NOW + 600,
        grants: (0..n)
            .map(|i| Grant::whole(ChunkId::of(&i.to_be_bytes()), 1 << 20))
            .collect(),
    }
}

fn main() {
    let budget = Duration::from_millis(
        std::env::var("BENCH_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2000),
    );
    let key = TransactionKey::generate().unwrap();
    let keys = key.token_keys();
    let verifier = TokenVerifier::new(PeerId(2), &key);

    let sample = claims(1, 0).seal(&keys).unwrap().into_bytes();
    let hmac_key = [3u8; 32];
    let hmac_rate = rate(budget, |_| {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&hmac_key).unwrap();
        m.update(black_box(&sample));
        black_box(m.finalize());
    });
    println!("{:<42} {:>12}", "operation", "per second");
    println!(
        "{:<42} {:>12.0}",
        format!("baseline: HMAC-SHA256 of {} bytes", sample.len()),
        hmac_rate
    );

    for n in [1u32, 64] {
        let c = claims(n, 0);
        let token = c.seal(&keys).unwrap().into_bytes();
        let mut cl = c.clone();
        let issue = rate(budget, |i| {
            cl.txid = TransactionId(i);
            black_box(cl.seal(&keys).unwrap());
        });
        let open = rate(budget, |_| {
            black_box(verifier.open(black_box(&token), NOW).unwrap());
        });
        println!(
            "{:<42} {:>12.0}",
            format!("issue {n}-chunk token ({} bytes)", token.len()),
            issue
        );
        println!("{:<42} {:>12.0}", format!("verify {n}-chunk token"), open);
    }

    // Full acceptance of one chunk: open + permit, recording the use in SQLite.
    let store = ReplayStore::in_memory().unwrap();
    let chunk = ChunkId::of(&0u32.to_be_bytes());
    let accept = rate(budget, |i| {
        let t = claims(1, i).seal(&keys).unwrap().into_bytes();
        let auth = verifier.open(&t, NOW).unwrap();
        auth.permit(TxKind::Put, &chunk, 1 << 20, &store).unwrap();
    });
    println!(
        "{:<42} {:>12.0}",
        "issue + verify + replay-record (SQLite)", accept
    );
}
