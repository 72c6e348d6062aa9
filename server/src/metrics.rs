//! The server's `/metrics`, through prometheus-client: counters kept in memory by the
//! running server, and figures read at scrape time (the database's, the rendezvous's),
//! written in Prometheus's text format.

use std::fmt;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::store::DbFigures;

/// Upper bounds (seconds) of the request-latency histogram buckets.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// One label.
type Label = [(&'static str, &'static str); 1];
/// A request's route and status.
type RouteStatus = [(&'static str, String); 2];
/// A refusal's reason.
type ReasonLabel = [(&'static str, String); 1];

/// Counters kept by the running server. Cloning a counter shares it.
pub struct Metrics {
    /// Locations committed by confirms.
    pub confirmed: Counter,
    /// Registrations accepted.
    pub registrations: Counter,
    /// Logins accepted.
    pub logins: Counter,
    /// Repair orders handed to peers.
    pub repair_orders: Counter,
    /// From the last repair scan: repairs waiting for a peer to take them.
    pub repairs_waiting: Gauge,
    /// From the last repair scan: chunks on a lost holder with fewer online holders than
    /// their target.
    pub chunks_below_target: Gauge,
    /// 1 while this instance holds the lease on the background jobs, else 0.
    pub jobs_leader: Gauge,
    tokens: Family<Label, Counter>,
    probes: Family<Label, Counter>,
    audits: Family<Label, Counter>,
    audit_verify_seconds: Counter<f64>,
    audit_answer_bytes: Counter,
    rejections: Family<ReasonLabel, Counter>,
    latency: Family<RouteStatus, Histogram, fn() -> Histogram>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every counter at zero, registered under `peerstash_`.
    pub fn new() -> Metrics {
        let m = Metrics {
            confirmed: Counter::default(),
            registrations: Counter::default(),
            logins: Counter::default(),
            repair_orders: Counter::default(),
            repairs_waiting: Gauge::default(),
            chunks_below_target: Gauge::default(),
            jobs_leader: Gauge::default(),
            tokens: Family::default(),
            probes: Family::default(),
            audits: Family::default(),
            audit_verify_seconds: Counter::default(),
            audit_answer_bytes: Counter::default(),
            rejections: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(BUCKETS)),
            registry: Registry::with_prefix("peerstash"),
        };
        // The series every scrape should show, even at zero.
        for kind in ["put", "get", "universal"] {
            let _ = m.tokens.get_or_create(&[("kind", kind)]);
        }
        for outcome in ["ok", "failed"] {
            let _ = m.probes.get_or_create(&[("outcome", outcome)]);
        }
        for outcome in ["passed", "failed", "missing", "unanswered"] {
            let _ = m.audits.get_or_create(&[("outcome", outcome)]);
        }
        let mut m = m;
        let r = &mut m.registry;
        r.register("tokens_issued", "Tokens issued, by kind", m.tokens.clone());
        r.register(
            "locations_confirmed",
            "Locations committed by confirms",
            m.confirmed.clone(),
        );
        r.register(
            "registrations",
            "Registrations accepted",
            m.registrations.clone(),
        );
        r.register("logins", "Logins accepted", m.logins.clone());
        r.register(
            "status_checks",
            "The server's own status checks of quiet peers, by outcome",
            m.probes.clone(),
        );
        r.register(
            "repairs_waiting",
            "Repairs queued by the last scan and not yet handed to a peer",
            m.repairs_waiting.clone(),
        );
        r.register(
            "chunks_below_target",
            "Chunks on a lost holder with fewer online holders than their target (last scan)",
            m.chunks_below_target.clone(),
        );
        r.register(
            "jobs_leader",
            "Whether this instance runs the background jobs (1) or another instance on the database does (0)",
            m.jobs_leader.clone(),
        );
        r.register("audits", "Storage audits, by outcome", m.audits.clone());
        r.register(
            "audit_verify_seconds",
            "Server CPU time spent verifying audit answers",
            m.audit_verify_seconds.clone(),
        );
        r.register(
            "audit_answer_bytes",
            "Bytes of audit answers received",
            m.audit_answer_bytes.clone(),
        );
        r.register(
            "rejections",
            "Refused requests, by reason",
            m.rejections.clone(),
        );
        r.register(
            "request_seconds",
            "Request handling time",
            m.latency.clone(),
        );
        m
    }

    /// Count one token sealed, by kind.
    pub fn count_token(&self, kind: peerstash::TxKind) {
        let kind = match kind {
            peerstash::TxKind::Put => "put",
            peerstash::TxKind::Get | peerstash::TxKind::Stream => "get",
            peerstash::TxKind::Universal => "universal",
            // The server issues no delete tokens.
            peerstash::TxKind::Delete => return,
        };
        self.tokens.get_or_create(&[("kind", kind)]).inc();
    }

    /// Count a refused request by reason.
    pub fn reject(&self, reason: &str) {
        self.rejections
            .get_or_create(&[("reason", reason.to_string())])
            .inc();
    }

    /// Record one request's handling time under its route and status.
    pub fn observe(&self, route: &'static str, status: u16, took: Duration) {
        self.latency
            .get_or_create(&[("route", route.to_string()), ("status", status.to_string())])
            .observe(took.as_secs_f64());
    }

    /// Count one status check of a peer by the server (`ok` or `failed`).
    pub fn probe(&self, outcome: &'static str) {
        self.probes.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// Count one audit by outcome.
    pub fn audit(&self, outcome: &'static str) {
        self.audits.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// Count the time spent verifying one audit answer of `bytes` bytes.
    pub fn audit_cpu(&self, took: Duration, bytes: usize) {
        self.audit_verify_seconds.inc_by(took.as_secs_f64());
        self.audit_answer_bytes.inc_by(bytes as u64);
    }

    /// The Prometheus text exposition: these counters, the database figures `db`, and
    /// whatever `more` reads at scrape time.
    pub fn render(&self, db: DbFigures, more: impl Collector) -> String {
        let mut scraped = Registry::default();
        scraped.register_collector(Box::new(Scraped {
            db,
            repair_orders: self.repair_orders.get(),
        }));
        scraped.register_collector(Box::new(more));
        let mut o = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut o, &self.registry);
        let _ = prometheus_text::encode(&mut o, &scraped);
        o
    }
}

/// One gauge without labels, named in full.
pub fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let g = ConstGauge::new(v as i64);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One counter without labels, named in full without its `_total`.
pub fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

/// A labelled family of gauges or counters (`kind`), one series per item of `series`.
pub fn series<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in series {
        let s = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(v).encode(s)?,
            _ => ConstGauge::new(v as i64).encode(s)?,
        }
    }
    Ok(())
}

/// What `/metrics` reads from the database at scrape time.
#[derive(Debug)]
struct Scraped {
    db: DbFigures,
    repair_orders: u64,
}

impl Collector for Scraped {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let db = &self.db;
        let e = &mut e;
        gauge(
            e,
            "peerstash_peers_online",
            "Peers with a recent heartbeat.",
            db.peers_online,
        )?;
        gauge(
            e,
            "peerstash_peers_registered",
            "Registered peers.",
            db.peers_total,
        )?;
        gauge(
            e,
            "peerstash_chunks",
            "Distinct stored chunks (per owner).",
            db.chunks,
        )?;
        gauge(
            e,
            "peerstash_chunk_locations",
            "Committed chunk locations (one per replica).",
            db.locations,
        )?;
        gauge(
            e,
            "peerstash_stored_bytes",
            "Committed bytes, every replica counted.",
            db.bytes,
        )?;
        gauge(
            e,
            "peerstash_pending_placements",
            "Placements awaiting a confirm.",
            db.pending,
        )?;
        gauge(
            e,
            "peerstash_invites_unused",
            "Unused invite codes.",
            db.invites,
        )?;
        gauge(
            e,
            "peerstash_drop_orders",
            "Chunks holders were told to drop, not yet acknowledged.",
            db.drops,
        )?;
        gauge(
            e,
            "peerstash_peers_suspended",
            "Peers whose audit reputation fell below the threshold (no placements).",
            db.peers_suspended,
        )?;
        gauge(
            e,
            "peerstash_peers_disqualified",
            "Peers disqualified for failing audits.",
            db.peers_disqualified,
        )?;
        series(
            e,
            "peerstash_repairs",
            "Repair copies, by stage.",
            MetricType::Counter,
            [
                ([("stage", "ordered")], self.repair_orders),
                ([("stage", "done")], db.repairs_done),
            ],
        )?;
        series(
            e,
            "peerstash_reports",
            "Failure reports, by the registered peer they are about (unknown: an id nobody registered).",
            MetricType::Counter,
            db.reports.iter().map(|(peer, kind, reason, n)| {
                let peer = if *peer == crate::store::NO_PEER {
                    "unknown".to_string()
                } else {
                    peer.to_string()
                };
                (
                    [("peer", peer), ("kind", kind.clone()), ("reason", reason.clone())],
                    *n,
                )
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Nothing;
    impl Collector for Nothing {
        fn encode(&self, _: DescriptorEncoder) -> fmt::Result {
            Ok(())
        }
    }

    /// The names and labels operators' dashboards and our tests read.
    #[test]
    fn renders_the_documented_series() {
        let m = Metrics::new();
        m.count_token(peerstash::TxKind::Put);
        m.count_token(peerstash::TxKind::Put);
        m.reject("rate_limited");
        m.observe("/v1/put", 200, Duration::from_millis(3));
        m.registrations.inc();
        m.repair_orders.inc_by(4);
        let db = DbFigures {
            peers_online: 7,
            repairs_done: 2,
            ..Default::default()
        };
        let text = m.render(db, Nothing);
        for line in [
            "peerstash_tokens_issued_total{kind=\"put\"} 2",
            "peerstash_tokens_issued_total{kind=\"get\"} 0",
            "peerstash_rejections_total{reason=\"rate_limited\"} 1",
            "peerstash_registrations_total 1",
            "peerstash_audits_total{outcome=\"missing\"} 0",
            "peerstash_request_seconds_bucket{route=\"/v1/put\",status=\"200\",le=\"0.005\"} 1",
            "peerstash_request_seconds_count{route=\"/v1/put\",status=\"200\"} 1",
            "peerstash_peers_online 7",
            "peerstash_repairs_total{stage=\"ordered\"} 4",
            "peerstash_repairs_total{stage=\"done\"} 2",
            "# TYPE peerstash_request_seconds histogram",
            "# HELP peerstash_audits_total Storage audits, by outcome.",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }
}
