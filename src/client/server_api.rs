//! [`ServerClient`]: the typed HTTPS client of the coordination server's API.
//!
//! TLS trusts exactly one certificate, the one whose SHA-256 fingerprint is pinned (the
//! server prints it at start). Authenticated calls carry a control message signed with
//! the peer's transaction key; since one signer is one strictly ordered channel, the
//! client keeps a pool of signers and gives each in-flight request its own.

use std::sync::Mutex;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{
    self, ApiError, ConfirmRequest, ConfirmResponse, GetRequest, GetResponse, HeartbeatRequest,
    HeartbeatResponse, LoginRequest, LoginResponse, PutRequest, PutResponse, RegisterRequest,
    RegisterResponse, ReleaseRequest, ReleaseResponse, ReportRequest, StatusResponse,
};
use crate::control::{now_ms, ControlSigner, Direction, AUTH_HEADER};
use crate::ids::{Fingerprint, PeerId};
use crate::keys::TransactionKey;

/// Most idle signers kept for reuse.
const MAX_POOLED_SIGNERS: usize = 64;

/// Why a call to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("the server refused the request ({status}, {}): {}", .error.reason, .error.message)]
    Api {
        /// HTTP status.
        status: u16,
        /// The server's reason and message.
        error: ApiError,
    },
    /// The server could not be reached, or TLS failed (e.g. a fingerprint mismatch).
    #[error("talking to the server at {url} failed")]
    Transport {
        /// The URL called.
        url: String,
        /// The cause (its chain names a fingerprint mismatch, a refused connection, ...).
        #[source]
        source: reqwest::Error,
    },
    /// The answer was not what the API says.
    #[error("unexpected answer from the server: {0}")]
    Decode(String),
    /// The client could not be set up.
    #[error("setting up the HTTPS client: {0}")]
    Setup(String),
    /// An authenticated call on a client without a peer identity.
    #[error("no peer identity: register or log in first")]
    NoIdentity,
}

impl ClientError {
    /// The server's stable reason, when the server refused.
    pub fn reason(&self) -> Option<&str> {
        match self {
            ClientError::Api { error, .. } => Some(&error.reason),
            _ => None,
        }
    }

    /// The HTTP status, when the server refused.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

struct Identity {
    peer: PeerId,
    key: TransactionKey,
    signers: Mutex<Vec<ControlSigner>>,
}

/// A client of one coordination server, optionally acting as one peer.
pub struct ServerClient {
    http: reqwest::Client,
    base: String,
    fingerprint: Fingerprint,
    identity: Option<Identity>,
}

impl std::fmt::Debug for ServerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerClient")
            .field("base", &self.base)
            .field("peer", &self.identity.as_ref().map(|i| i.peer))
            .finish()
    }
}

impl ServerClient {
    /// A client of the server at `base_url` (`https://host:port`) whose certificate has
    /// SHA-256 `fingerprint`. Unauthenticated until [`ServerClient::with_identity`].
    pub fn new(base_url: &str, fingerprint: Fingerprint) -> Result<ServerClient, ClientError> {
        let base = base_url.trim().trim_end_matches('/').to_string();
        if !base.starts_with("https://") {
            return Err(ClientError::Setup(format!(
                "the server URL must start with https:// (got {base:?})"
            )));
        }
        let tls = crate::tls::pinned_client_config(fingerprint, &[b"h2", b"http/1.1"])
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        Ok(ServerClient {
            http,
            base,
            fingerprint,
            identity: None,
        })
    }

    /// Act as `peer`, authenticating with its transaction key.
    pub fn with_identity(mut self, peer: PeerId, key: TransactionKey) -> ServerClient {
        self.identity = Some(Identity {
            peer,
            key,
            signers: Mutex::new(Vec::new()),
        });
        self
    }

    /// The peer this client acts as.
    pub fn peer(&self) -> Option<PeerId> {
        self.identity.as_ref().map(|i| i.peer)
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The server's rendezvous (QUIC on the same port), acting as this client's peer:
    /// what a [`crate::peer::PeerClient`] needs to reach peers behind NAT.
    pub fn rendezvous(&self) -> Option<crate::peer::rendezvous::RendezvousConfig> {
        let id = self.identity.as_ref()?;
        crate::peer::rendezvous::RendezvousConfig::from_url(
            &self.base,
            self.fingerprint,
            id.peer,
            id.key.clone(),
        )
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn transport(&self, path: &str, source: reqwest::Error) -> ClientError {
        ClientError::Transport {
            url: self.url(path),
            source,
        }
    }

    /// POST raw bytes with an optional auth header; returns the status and body, whatever
    /// they are. For tests and tools that need to send exactly what they built.
    pub async fn post_raw(
        &self,
        path: &str,
        body: Vec<u8>,
        auth_header: Option<&str>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let mut req = self
            .http
            .post(self.url(path))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(h) = auth_header {
            req = req.header(AUTH_HEADER, h);
        }
        let resp = req.send().await.map_err(|e| self.transport(path, e))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| self.transport(path, e))?;
        Ok((status, bytes.to_vec()))
    }

    fn decode<T: DeserializeOwned>(status: u16, body: &[u8]) -> Result<T, ClientError> {
        if (200..300).contains(&status) {
            return serde_json::from_slice(body)
                .map_err(|e| ClientError::Decode(format!("{e} (status {status})")));
        }
        match serde_json::from_slice::<ApiError>(body) {
            Ok(error) => Err(ClientError::Api { status, error }),
            Err(_) => Err(ClientError::Api {
                status,
                error: ApiError {
                    reason: "http_error".into(),
                    message: format!(
                        "HTTP {status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(200)])
                    ),
                },
            }),
        }
    }

    async fn unauthenticated<Q: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        req: &Q,
    ) -> Result<R, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Decode(e.to_string()))?;
        let (status, bytes) = self.post_raw(path, body, None).await?;
        Self::decode(status, &bytes)
    }

    /// Call an authenticated endpoint: sign `req` with a signer from the pool, send it, and
    /// return the signer to the pool when the answer is in.
    pub async fn call<Q: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        req: &Q,
    ) -> Result<R, ClientError> {
        let id = self.identity.as_ref().ok_or(ClientError::NoIdentity)?;
        let kind = api::kind_for_path(path).ok_or_else(|| {
            ClientError::Setup(format!("{path} is not an authenticated endpoint"))
        })?;
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Decode(e.to_string()))?;
        let signer = id
            .signers
            .lock()
            .expect("not poisoned")
            .pop()
            .unwrap_or_else(|| ControlSigner::new(id.peer, &id.key, Direction::PeerToServer));
        let auth = signer.sign(kind, &body, now_ms()).to_header();
        let result = self.post_raw(path, body, Some(&auth)).await;
        {
            let mut pool = id.signers.lock().expect("not poisoned");
            if pool.len() < MAX_POOLED_SIGNERS {
                pool.push(signer);
            }
        }
        let (status, bytes) = result?;
        Self::decode(status, &bytes)
    }

    /// `GET /healthz`.
    pub async fn healthz(&self) -> Result<(), ClientError> {
        let resp = self
            .http
            .get(self.url(api::path::HEALTHZ))
            .send()
            .await
            .map_err(|e| self.transport(api::path::HEALTHZ, e))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(ClientError::Decode(format!(
                "healthz answered {}",
                resp.status()
            )))
        }
    }

    /// `GET /metrics` (Prometheus text).
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let resp = self
            .http
            .get(self.url(api::path::METRICS))
            .send()
            .await
            .map_err(|e| self.transport(api::path::METRICS, e))?;
        resp.text()
            .await
            .map_err(|e| self.transport(api::path::METRICS, e))
    }

    /// Register a new peer (unauthenticated; invite-gated unless the server is open).
    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ClientError> {
        self.unauthenticated(api::path::REGISTER, req).await
    }

    /// Log in again: the peer id and keys.
    pub async fn login(&self, req: &LoginRequest) -> Result<LoginResponse, ClientError> {
        self.unauthenticated(api::path::LOGIN, req).await
    }

    /// Report online, free space, address; learn which chunks to drop.
    pub async fn heartbeat(
        &self,
        req: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ClientError> {
        self.call(api::path::HEARTBEAT, req).await
    }

    /// Ask where to store chunks: one batch put token per target.
    pub async fn put(&self, req: &PutRequest) -> Result<PutResponse, ClientError> {
        self.call(api::path::PUT, req).await
    }

    /// (As a target) confirm chunks stored under a put token.
    pub async fn confirm(&self, req: &ConfirmRequest) -> Result<ConfirmResponse, ClientError> {
        self.call(api::path::CONFIRM, req).await
    }

    /// Ask for holders of own chunks: one batch get token per holder.
    pub async fn get(&self, req: &GetRequest) -> Result<GetResponse, ClientError> {
        self.call(api::path::GET, req).await
    }

    /// Release chunks no longer referenced.
    pub async fn release(&self, req: &ReleaseRequest) -> Result<ReleaseResponse, ClientError> {
        self.call(api::path::RELEASE, req).await
    }

    /// Report a failure (rejected token, bad chunk, failed transfer).
    pub async fn report(&self, req: &ReportRequest) -> Result<(), ClientError> {
        let _: serde_json::Value = self.call(api::path::REPORT, req).await?;
        Ok(())
    }

    /// This peer's account: quota, usage, peers online.
    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        self.call(api::path::STATUS, &api::StatusRequest { figures: true })
            .await
    }

    /// The account without the figures that scan every stored chunk: what the drive
    /// polls for its quota.
    pub async fn quota(&self) -> Result<StatusResponse, ClientError> {
        self.call(api::path::STATUS, &api::StatusRequest { figures: false })
            .await
    }

    /// Keep a new sealed root record (409 `stale_root` unless the version is newer).
    pub async fn put_root(
        &self,
        req: &api::PutRootRequest,
    ) -> Result<api::PutRootResponse, ClientError> {
        self.call(api::path::ROOT, req).await
    }

    /// The latest (or a given) sealed root record.
    pub async fn get_root(
        &self,
        req: &api::GetRootRequest,
    ) -> Result<api::GetRootResponse, ClientError> {
        self.call(api::path::ROOT_GET, req).await
    }

    /// Forget earlier sealed root records (409 `latest_root` for the latest kept one).
    pub async fn drop_roots(
        &self,
        req: &api::DropRootsRequest,
    ) -> Result<api::DropRootsResponse, ClientError> {
        self.call(api::path::ROOT_DROP, req).await
    }
}
