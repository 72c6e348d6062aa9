//! The daemon's view of the coordination server: the few calls it makes, behind a trait
//! so the real HTTPS client, a test double or a recording link can be plugged in.

use std::future::Future;
use std::sync::Mutex;

use crate::api::{
    ConfirmRequest, HeartbeatRequest, HeartbeatResponse, InventoryRequest, InventoryResponse,
    RepairOrder, ReportRequest,
};
use crate::ids::ChunkId;

/// A call to the server failed (unreachable, refused, bad reply).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("server link: {0}")]
pub struct LinkError(pub String);

/// What the storage daemon needs from the coordination server. Implementations sign each
/// call as a control message of the matching kind (Confirm, Report, Heartbeat).
pub trait ServerLink: Send + Sync + 'static {
    /// Tell the server which chunks of a put transaction are stored and fsynced, so it
    /// records their location.
    fn confirm(&self, req: ConfirmRequest) -> impl Future<Output = Result<(), LinkError>> + Send;

    /// Report a refusal (bad token, bad bytes) so the server can spot abuse.
    fn report(&self, req: ReportRequest) -> impl Future<Output = Result<(), LinkError>> + Send;

    /// Say the daemon is up, with its address and free space; the answer lists chunks the
    /// daemon may drop and when to call again.
    fn heartbeat(
        &self,
        req: HeartbeatRequest,
    ) -> impl Future<Output = Result<HeartbeatResponse, LinkError>> + Send;

    /// Ask which of these chunks on the daemon's disk the server does not expect there
    /// (stored but never confirmed, or released while the daemon was away).
    fn inventory(
        &self,
        req: InventoryRequest,
    ) -> impl Future<Output = Result<InventoryResponse, LinkError>> + Send;
}

/// A link that accepts everything and asks for nothing (a daemon without a server).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullLink;

impl ServerLink for NullLink {
    async fn confirm(&self, _req: ConfirmRequest) -> Result<(), LinkError> {
        Ok(())
    }
    async fn report(&self, _req: ReportRequest) -> Result<(), LinkError> {
        Ok(())
    }
    async fn heartbeat(&self, _req: HeartbeatRequest) -> Result<HeartbeatResponse, LinkError> {
        Ok(HeartbeatResponse::default())
    }
    async fn inventory(&self, _req: InventoryRequest) -> Result<InventoryResponse, LinkError> {
        Ok(InventoryResponse {
            unknown: Vec::new(),
        })
    }
}

/// A link that records every call, and answers the next heartbeat with chunks to drop
/// (for tests and diagnostics).
#[derive(Debug, Default)]
pub struct RecordingLink {
    inner: Mutex<Recorded>,
}

#[derive(Debug, Default)]
struct Recorded {
    confirms: Vec<ConfirmRequest>,
    reports: Vec<ReportRequest>,
    heartbeats: Vec<HeartbeatRequest>,
    next_drop: Vec<ChunkId>,
    next_repairs: Vec<RepairOrder>,
    inventories: Vec<InventoryRequest>,
    unknown: Vec<ChunkId>,
    reconcile: (u64, u64),
    refuse_confirms: bool,
}

impl RecordingLink {
    /// An empty recording link.
    pub fn new() -> RecordingLink {
        RecordingLink::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Confirms received so far.
    pub fn confirms(&self) -> Vec<ConfirmRequest> {
        self.lock().confirms.clone()
    }

    /// Fail every confirm from now on (as the server's answer naming the chunks
    /// unexpected does), or stop failing them.
    pub fn refuse_confirms(&self, refuse: bool) {
        self.lock().refuse_confirms = refuse;
    }

    /// Reports received so far.
    pub fn reports(&self) -> Vec<ReportRequest> {
        self.lock().reports.clone()
    }

    /// Heartbeats received so far.
    pub fn heartbeats(&self) -> Vec<HeartbeatRequest> {
        self.lock().heartbeats.clone()
    }

    /// Answer the next heartbeat with `chunks` to drop.
    pub fn drop_next(&self, chunks: Vec<ChunkId>) {
        self.lock().next_drop = chunks;
    }

    /// Answer the next heartbeat with these repair orders.
    pub fn repair_next(&self, orders: Vec<RepairOrder>) {
        self.lock().next_repairs = orders;
    }

    /// Inventory checks received so far.
    pub fn inventories(&self) -> Vec<InventoryRequest> {
        self.lock().inventories.clone()
    }

    /// Ask for an inventory reconciliation every `every_secs` with `grace_secs` of grace
    /// (in every heartbeat response), and answer that `unknown` are not expected here.
    pub fn reconcile(&self, every_secs: u64, grace_secs: u64, unknown: Vec<ChunkId>) {
        let mut r = self.lock();
        r.reconcile = (every_secs, grace_secs);
        r.unknown = unknown;
    }
}

impl ServerLink for RecordingLink {
    async fn confirm(&self, req: ConfirmRequest) -> Result<(), LinkError> {
        let mut r = self.lock();
        r.confirms.push(req);
        if r.refuse_confirms {
            return Err(LinkError("the server expected these chunks nowhere".into()));
        }
        Ok(())
    }
    async fn report(&self, req: ReportRequest) -> Result<(), LinkError> {
        self.lock().reports.push(req);
        Ok(())
    }
    async fn heartbeat(&self, req: HeartbeatRequest) -> Result<HeartbeatResponse, LinkError> {
        let mut r = self.lock();
        r.heartbeats.push(req);
        Ok(HeartbeatResponse {
            drop: std::mem::take(&mut r.next_drop),
            interval_secs: 0,
            repairs: std::mem::take(&mut r.next_repairs),
            reconcile_secs: r.reconcile.0,
            orphan_grace_secs: r.reconcile.1,
        })
    }
    async fn inventory(&self, req: InventoryRequest) -> Result<InventoryResponse, LinkError> {
        let mut r = self.lock();
        let unknown = req
            .chunks
            .iter()
            .filter(|c| r.unknown.contains(c))
            .copied()
            .collect();
        r.inventories.push(req);
        Ok(InventoryResponse { unknown })
    }
}

impl<L: ServerLink> ServerLink for std::sync::Arc<L> {
    fn confirm(&self, req: ConfirmRequest) -> impl Future<Output = Result<(), LinkError>> + Send {
        (**self).confirm(req)
    }
    fn report(&self, req: ReportRequest) -> impl Future<Output = Result<(), LinkError>> + Send {
        (**self).report(req)
    }
    fn heartbeat(
        &self,
        req: HeartbeatRequest,
    ) -> impl Future<Output = Result<HeartbeatResponse, LinkError>> + Send {
        (**self).heartbeat(req)
    }
    fn inventory(
        &self,
        req: InventoryRequest,
    ) -> impl Future<Output = Result<InventoryResponse, LinkError>> + Send {
        (**self).inventory(req)
    }
}
