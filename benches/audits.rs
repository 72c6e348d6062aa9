//! Audit cost: what one audit costs the server (verifying an answer) and the holder
//! (proving it), beside the baselines no audit can avoid (BLAKE3 of the 4 KiB range for
//! the server, of the whole chunk for the holder), and what auditing one TiB costs a day
//! at the default interval. Run with `cargo bench --bench audits`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use peerstash::audit::{Answer, Challenge, RANGE};
use peerstash::ChunkId;

/// Median time per call of `f` over five runs of about `budget / 5` each.
fn per_call(budget: Duration, mut f: impl FnMut(u64)) -> Duration {
    let mut times = Vec::new();
    let mut i = 0u64;
    for _ in 0..5 {
        let start = Instant::now();
        let mut n = 0u32;
        while start.elapsed() < budget / 5 {
            f(i);
            i += 1;
            n += 1;
        }
        times.push(start.elapsed() / n);
    }
    times.sort();
    times[2]
}

fn main() {
    let budget = Duration::from_millis(
        std::env::var("AUDIT_BENCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000),
    );
    println!(
        "{:>9}  {:>12}  {:>14}  {:>12}  {:>16}  {:>7}",
        "chunk", "verify", "hash 4 KiB", "prove", "hash whole chunk", "answer"
    );
    let mut verify_1mib = Duration::ZERO;
    let mut answer_1mib = 0usize;
    for size in [256usize << 10, 1 << 20, 4 << 20, 16 << 20] {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
        let id = ChunkId::of(&data);
        let challenges: Vec<Challenge> = (0..64u64)
            .map(|k| Challenge::at(id, size as u32, k * 2654435761, [k as u8; 16]))
            .collect();
        let answers: Vec<Answer> = challenges
            .iter()
            .map(|c| Answer::prove(c, &data).expect("proves"))
            .collect();
        let verify = per_call(budget, |i| {
            let k = (i % 64) as usize;
            challenges[k]
                .verify(black_box(&answers[k]), 0, 1)
                .expect("verifies");
        });
        let range = &data[..RANGE as usize];
        let hash_range = per_call(budget, |_| {
            black_box(blake3::hash(black_box(range)));
        });
        let prove = per_call(budget, |i| {
            black_box(Answer::prove(&challenges[(i % 64) as usize], &data).expect("proves"));
        });
        let hash_all = per_call(budget, |_| {
            black_box(blake3::hash(black_box(&data)));
        });
        let answer = answers.iter().map(|a| a.encode().len()).max().unwrap_or(0);
        if size == 1 << 20 {
            verify_1mib = verify;
            answer_1mib = answer;
        }
        println!(
            "{:>7}Ki  {:>12.1?}  {:>14.1?}  {:>12.1?}  {:>16.1?}  {:>6}B",
            size >> 10,
            verify,
            hash_range,
            prove,
            hash_all,
            answer
        );
    }
    // One TiB of 1 MiB chunks (the chunker's average) audited once per default interval;
    // a request is op + control auth + challenge, a reply record + length + answer.
    let per_day = 86_400.0 / peerstash_audit_interval() as f64;
    let locations = (1u64 << 40) as f64 / (1u64 << 20) as f64;
    let audits = locations * per_day;
    let wire = (1 + 68 + 60 + 2 + 4 + answer_1mib) as f64;
    println!(
        "per audited TiB (1 MiB chunks) a day, every location every {} h: {:.0} audits, \
         {:.1} GiB on the wire ({:.2} % of the TiB), {:.1} s of server CPU verifying",
        peerstash_audit_interval() / 3600,
        audits,
        audits * wire / (1u64 << 30) as f64,
        audits * wire / (1u64 << 40) as f64 * 100.0,
        audits * verify_1mib.as_secs_f64()
    );
}

/// The server's default `--audit-interval` (kept in step with
/// `peerstash_server::DEFAULT_AUDIT_INTERVAL_SECS`; this crate does not depend on it).
fn peerstash_audit_interval() -> u64 {
    6 * 3600
}
