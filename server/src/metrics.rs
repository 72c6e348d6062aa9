//! In-memory counters for `/metrics` (Prometheus text format); gauges that live in the
//! database are read at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::store::DbFigures;

/// Upper bounds (seconds) of the request-latency histogram buckets.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Counters kept by the running server.
#[derive(Default)]
pub struct Metrics {
    /// Put tokens issued.
    pub put_tokens: AtomicU64,
    /// Get tokens issued.
    pub get_tokens: AtomicU64,
    /// Universal tokens issued (peak-load mode).
    pub universal_tokens: AtomicU64,
    /// Locations committed by confirms.
    pub confirmed: AtomicU64,
    /// Registrations accepted.
    pub registrations: AtomicU64,
    /// Logins accepted.
    pub logins: AtomicU64,
    /// The server's own status checks of peers that answered.
    pub probes_ok: AtomicU64,
    /// The server's own status checks that got no valid answer.
    pub probes_failed: AtomicU64,
    /// Repair orders handed to peers.
    pub repair_orders: AtomicU64,
    /// From the last repair scan: repairs waiting for a peer to take them.
    pub repairs_waiting: AtomicU64,
    /// From the last repair scan: chunks on a lost holder with fewer online holders than
    /// their target.
    pub chunks_below_target: AtomicU64,
    /// Nanoseconds the server spent verifying audit answers.
    pub audit_verify_ns: AtomicU64,
    /// Bytes of audit answers received.
    pub audit_answer_bytes: AtomicU64,
    audits: Mutex<BTreeMap<&'static str, u64>>,
    rejections: Mutex<BTreeMap<String, u64>>,
    latency: Mutex<BTreeMap<(&'static str, u16), Histogram>>,
}

impl Metrics {
    /// Count one token sealed, by kind.
    pub fn count_token(&self, kind: peerstash::TxKind) {
        let c = match kind {
            peerstash::TxKind::Put => &self.put_tokens,
            peerstash::TxKind::Get | peerstash::TxKind::Stream => &self.get_tokens,
            peerstash::TxKind::Universal => &self.universal_tokens,
            // The server issues no delete tokens.
            peerstash::TxKind::Delete => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a refused request by reason.
    pub fn reject(&self, reason: &str) {
        *self
            .rejections
            .lock()
            .expect("not poisoned")
            .entry(reason.to_string())
            .or_default() += 1;
    }

    /// Record one request's handling time under its route and status.
    pub fn observe(&self, route: &'static str, status: u16, took: Duration) {
        let secs = took.as_secs_f64();
        let mut l = self.latency.lock().expect("not poisoned");
        let h = l.entry((route, status)).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// Count one status check of a peer by the server (`ok` or `failed`).
    pub fn probe(&self, outcome: &str) {
        let c = if outcome == "ok" {
            &self.probes_ok
        } else {
            &self.probes_failed
        };
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Count one audit by outcome.
    pub fn audit(&self, outcome: &'static str) {
        *self
            .audits
            .lock()
            .expect("not poisoned")
            .entry(outcome)
            .or_default() += 1;
    }

    /// Count the time spent verifying one audit answer of `bytes` bytes.
    pub fn audit_cpu(&self, took: Duration, bytes: usize) {
        self.audit_verify_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        self.audit_answer_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// How many audits ended with `outcome`.
    pub fn audits(&self, outcome: &str) -> u64 {
        self.audits
            .lock()
            .expect("not poisoned")
            .get(outcome)
            .copied()
            .unwrap_or(0)
    }

    /// How many requests were refused with `reason`.
    pub fn rejections(&self, reason: &str) -> u64 {
        self.rejections
            .lock()
            .expect("not poisoned")
            .get(reason)
            .copied()
            .unwrap_or(0)
    }

    /// The Prometheus text exposition, with the database figures `db`.
    pub fn render(&self, db: &DbFigures) -> String {
        let mut o = String::new();
        let gauge = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut o,
            "peerstash_peers_online",
            "Peers with a recent heartbeat.",
            db.peers_online,
        );
        gauge(
            &mut o,
            "peerstash_peers_registered",
            "Registered peers.",
            db.peers_total,
        );
        gauge(
            &mut o,
            "peerstash_chunks",
            "Distinct stored chunks (per owner).",
            db.chunks,
        );
        gauge(
            &mut o,
            "peerstash_chunk_locations",
            "Committed chunk locations (one per replica).",
            db.locations,
        );
        gauge(
            &mut o,
            "peerstash_stored_bytes",
            "Committed bytes, every replica counted.",
            db.bytes,
        );
        gauge(
            &mut o,
            "peerstash_pending_placements",
            "Placements awaiting a confirm.",
            db.pending,
        );
        gauge(
            &mut o,
            "peerstash_invites_unused",
            "Unused invite codes.",
            db.invites,
        );
        gauge(
            &mut o,
            "peerstash_drop_orders",
            "Chunks holders were told to drop, not yet acknowledged.",
            db.drops,
        );

        let _ = writeln!(o, "# HELP peerstash_tokens_issued_total Tokens issued, by kind.\n# TYPE peerstash_tokens_issued_total counter");
        let _ = writeln!(
            o,
            "peerstash_tokens_issued_total{{kind=\"put\"}} {}",
            self.put_tokens.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "peerstash_tokens_issued_total{{kind=\"get\"}} {}",
            self.get_tokens.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "peerstash_tokens_issued_total{{kind=\"universal\"}} {}",
            self.universal_tokens.load(Ordering::Relaxed)
        );
        let _ = writeln!(o, "# HELP peerstash_locations_confirmed_total Locations committed by confirms.\n# TYPE peerstash_locations_confirmed_total counter\npeerstash_locations_confirmed_total {}", self.confirmed.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP peerstash_registrations_total Registrations accepted.\n# TYPE peerstash_registrations_total counter\npeerstash_registrations_total {}", self.registrations.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP peerstash_logins_total Logins accepted.\n# TYPE peerstash_logins_total counter\npeerstash_logins_total {}", self.logins.load(Ordering::Relaxed));

        let _ = writeln!(o, "# HELP peerstash_status_checks_total The server's own status checks of quiet peers, by outcome.\n# TYPE peerstash_status_checks_total counter");
        for (outcome, c) in [("ok", &self.probes_ok), ("failed", &self.probes_failed)] {
            let _ = writeln!(
                o,
                "peerstash_status_checks_total{{outcome=\"{outcome}\"}} {}",
                c.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        gauge(
            &mut o,
            "peerstash_repairs_waiting",
            "Repairs queued by the last scan and not yet handed to a peer.",
            self.repairs_waiting.load(Ordering::Relaxed),
        );
        gauge(
            &mut o,
            "peerstash_chunks_below_target",
            "Chunks on a lost holder with fewer online holders than their target (last scan).",
            self.chunks_below_target.load(Ordering::Relaxed),
        );
        let _ = writeln!(o, "# HELP peerstash_repairs_total Repair copies, by stage.\n# TYPE peerstash_repairs_total counter");
        let ordered = self.repair_orders.load(Ordering::Relaxed);
        for (stage, n) in [("ordered", ordered), ("done", db.repairs_done)] {
            let _ = writeln!(o, "peerstash_repairs_total{{stage=\"{stage}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP peerstash_audits_total Storage audits, by outcome.\n# TYPE peerstash_audits_total counter");
        {
            let audits = self.audits.lock().expect("not poisoned");
            for outcome in ["passed", "failed", "missing", "unanswered"] {
                let n = audits.get(outcome).copied().unwrap_or(0);
                let _ = writeln!(o, "peerstash_audits_total{{outcome=\"{outcome}\"}} {n}");
            }
        }
        let _ = writeln!(o, "# HELP peerstash_audit_verify_seconds_total Server CPU time spent verifying audit answers.\n# TYPE peerstash_audit_verify_seconds_total counter\npeerstash_audit_verify_seconds_total {}", self.audit_verify_ns.load(Ordering::Relaxed) as f64 / 1e9);
        let _ = writeln!(o, "# HELP peerstash_audit_answer_bytes_total Bytes of audit answers received.\n# TYPE peerstash_audit_answer_bytes_total counter\npeerstash_audit_answer_bytes_total {}", self.audit_answer_bytes.load(Ordering::Relaxed));
        gauge(
            &mut o,
            "peerstash_peers_suspended",
            "Peers whose audit reputation fell below the threshold (no placements).",
            db.peers_suspended,
        );
        gauge(
            &mut o,
            "peerstash_peers_disqualified",
            "Peers disqualified for failing audits.",
            db.peers_disqualified,
        );
        let _ = writeln!(o, "# HELP peerstash_rejections_total Refused requests, by reason.\n# TYPE peerstash_rejections_total counter");
        for (reason, n) in self.rejections.lock().expect("not poisoned").iter() {
            let _ = writeln!(o, "peerstash_rejections_total{{reason=\"{reason}\"}} {n}");
        }

        let _ = writeln!(o, "# HELP peerstash_reports_total Failure reports, by the registered peer they are about (unknown: an id nobody registered).\n# TYPE peerstash_reports_total counter");
        for (peer, kind, reason, n) in &db.reports {
            let peer = if *peer == crate::store::NO_PEER {
                "unknown".to_string()
            } else {
                peer.to_string()
            };
            let _ = writeln!(
                o,
                "peerstash_reports_total{{peer=\"{peer}\",kind=\"{kind}\",reason=\"{reason}\"}} {n}"
            );
        }

        let _ = writeln!(o, "# HELP peerstash_request_seconds Request handling time.\n# TYPE peerstash_request_seconds histogram");
        for ((route, status), h) in self.latency.lock().expect("not poisoned").iter() {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "peerstash_request_seconds_bucket{{route=\"{route}\",status=\"{status}\",le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(o, "peerstash_request_seconds_bucket{{route=\"{route}\",status=\"{status}\",le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(
                o,
                "peerstash_request_seconds_sum{{route=\"{route}\",status=\"{status}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                o,
                "peerstash_request_seconds_count{{route=\"{route}\",status=\"{status}\"}} {}",
                h.count
            );
        }
        o
    }
}
