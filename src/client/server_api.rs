//! [`ServerClient`]: the typed HTTPS client of the coordination server's API.
//!
//! TLS trusts exactly one certificate, the one whose SHA-256 fingerprint is pinned (the
//! server prints it at start). Authenticated calls carry a control message signed with
//! the peer's transaction key; since one signer is one strictly ordered channel, the
//! client keeps a pool of signers and gives each in-flight request its own.
//!
//! A client knows one or several URLs of the server (instances sharing one TLS identity,
//! so one fingerprint pins them all). A call goes to the instance that last answered; on a
//! connection failure it moves on to the next one ([`Instances`]), and an authenticated
//! call is signed afresh for every attempt, so a retry never carries a counter an
//! instance may already have seen.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
/// Longest the TCP connect and TLS handshake with one instance may take: past it the
/// instance counts as dead and the next is tried (a black-holed address must not stall a
/// mount for the OS's minutes-long connect timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Once a call has spent this long on failed instances, it tries no further one and
/// reports the last failure: with every instance down, callers hear it in seconds (the
/// drive keeps its data staged and retries later).
pub const FAILOVER_BUDGET: Duration = Duration::from_secs(10);

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
    /// Whether (and how far) the request got to an instance: decides whether a call may
    /// move on to the next instance.
    pub fn reach(&self) -> Reach {
        match self {
            ClientError::Transport { source, .. } if source.is_connect() => Reach::Unreached,
            // A timeout or a connection reset after the request went out: the instance may
            // have acted on it.
            ClientError::Transport { .. } => Reach::MaybeReached,
            ClientError::Api { .. }
            | ClientError::Decode(_)
            | ClientError::Setup(_)
            | ClientError::NoIdentity => Reach::Answered,
        }
    }

    /// The server's stable reason, when the server refused.
    pub fn reason(&self) -> Option<&str> {
        match self {
            ClientError::Api { error, .. } => Some(&error.reason),
            _ => None,
        }
    }

    /// Why the server refused, when it did for a reason this build knows.
    pub fn refused(&self) -> Option<crate::api::Reason> {
        self.reason().and_then(crate::api::Reason::parse)
    }

    /// The HTTP status, when the server refused.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How far a failed request got, as far as the client can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// No connection was made (refused, TLS handshake failed, connect timed out): the
    /// instance never saw the request, so sending it anywhere else is safe.
    Unreached,
    /// The connection failed after the request was (perhaps) sent: the instance may have
    /// acted on it. Only a request that is safe to do twice goes to the next instance.
    MaybeReached,
    /// An instance answered (a refusal is the server's word, not a dead instance), or the
    /// failure is local: never retried elsewhere.
    Answered,
}

/// Anything a failover attempt can fail with: it says how far the request got.
pub trait Failure {
    /// How far the failed request got.
    fn reach(&self) -> Reach;
}

impl Failure for ClientError {
    fn reach(&self) -> Reach {
        ClientError::reach(self)
    }
}

/// Whether a request may go to the next instance after the previous one perhaps acted on
/// it (see [`Reach::MaybeReached`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// Doing it twice is harmless (reads, idempotent writes, re-signed control messages
    /// whose duplicate effects expire): fail over on any connection failure.
    Safe,
    /// Only when no instance saw it (registration: a second one would find the name
    /// taken; raw bytes sent as built).
    OnlyUnreached,
}

/// The server's instances and the failover policy: try the one in use; on a connection
/// failure, the next ones in order, each at most once per call and within
/// [`FAILOVER_BUDGET`]; stick to the one that answered, so later calls do not knock on a
/// dead instance first.
#[derive(Debug)]
pub struct Instances {
    urls: Vec<String>,
    current: AtomicUsize,
    budget: Duration,
}

impl Instances {
    /// The instances at `urls`, in the order to try them (at least one).
    pub fn new(urls: Vec<String>, budget: Duration) -> Instances {
        assert!(!urls.is_empty(), "at least one server URL");
        Instances {
            urls,
            current: AtomicUsize::new(0),
            budget,
        }
    }

    /// Every URL, in order.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The URL in use: the one that answered last (the first before any call).
    pub fn current(&self) -> &str {
        &self.urls[self.current.load(Ordering::Relaxed) % self.urls.len()]
    }

    /// Run `attempt` against the instance in use, then the next ones while it fails with a
    /// connection failure that `resend` allows retrying elsewhere.
    pub async fn run<'s, T, E, F, Fut>(&'s self, resend: Resend, mut attempt: F) -> Result<T, E>
    where
        E: Failure + std::fmt::Display,
        F: FnMut(&'s str) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let start = Instant::now();
        let n = self.urls.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut k = 0;
        loop {
            let i = (first + k) % n;
            let err = match attempt(&self.urls[i]).await {
                Ok(v) => {
                    if i != first {
                        tracing::warn!("the server answers at {}: using it", self.urls[i]);
                        self.current.store(i, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Err(e) => e,
            };
            let retry = match err.reach() {
                Reach::Unreached => true,
                Reach::MaybeReached => resend == Resend::Safe,
                Reach::Answered => false,
            };
            k += 1;
            if !retry || k == n || start.elapsed() >= self.budget {
                return Err(err);
            }
            tracing::warn!(
                "the server at {} failed ({err}); trying {}",
                self.urls[i],
                self.urls[(first + k) % n]
            );
        }
    }
}

/// The server URLs as given, trimmed and without a trailing `/`, duplicates dropped; each
/// must be `https://`, and there must be at least one.
pub fn normalize_urls(urls: &[impl AsRef<str>]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for u in urls {
        let base = u.as_ref().trim().trim_end_matches('/').to_string();
        if !base.starts_with("https://") {
            return Err(format!(
                "the server URL must start with https:// (got {base:?})"
            ));
        }
        if !out.contains(&base) {
            out.push(base);
        }
    }
    if out.is_empty() {
        return Err("no server URL given".into());
    }
    Ok(out)
}

struct Identity {
    peer: PeerId,
    key: TransactionKey,
    signers: Mutex<Vec<ControlSigner>>,
}

/// A client of one coordination server (one or several instances of it), optionally
/// acting as one peer.
pub struct ServerClient {
    http: reqwest::Client,
    instances: Instances,
    fingerprint: Fingerprint,
    identity: Option<Identity>,
}

impl std::fmt::Debug for ServerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerClient")
            .field("urls", &self.instances.urls)
            .field("current", &self.instances.current())
            .field("peer", &self.identity.as_ref().map(|i| i.peer))
            .finish()
    }
}

impl ServerClient {
    /// A client of the server at `base_url` (`https://host:port`) whose certificate has
    /// SHA-256 `fingerprint`. Unauthenticated until [`ServerClient::with_identity`].
    pub fn new(base_url: &str, fingerprint: Fingerprint) -> Result<ServerClient, ClientError> {
        ServerClient::with_urls(&[base_url], fingerprint)
    }

    /// A client of the server's instances at `urls` (tried in this order on connection
    /// failures), all with the certificate of SHA-256 `fingerprint`.
    pub fn with_urls(
        urls: &[impl AsRef<str>],
        fingerprint: Fingerprint,
    ) -> Result<ServerClient, ClientError> {
        let urls = normalize_urls(urls).map_err(ClientError::Setup)?;
        let tls = crate::tls::pinned_client_config(fingerprint, &[b"h2", b"http/1.1"])
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        Ok(ServerClient {
            http,
            instances: Instances::new(urls, FAILOVER_BUDGET),
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

    /// The base URL in use: the instance that answered last.
    pub fn base_url(&self) -> &str {
        self.instances.current()
    }

    /// Every instance's base URL, in the order they are tried.
    pub fn urls(&self) -> &[String] {
        self.instances.urls()
    }

    /// The server's rendezvous (QUIC on the same port as the instance in use, then the
    /// others'), acting as this client's peer: what a [`crate::peer::PeerClient`] needs to
    /// reach peers behind NAT.
    pub fn rendezvous(&self) -> Option<crate::peer::rendezvous::RendezvousConfig> {
        let id = self.identity.as_ref()?;
        let cfg = crate::peer::rendezvous::RendezvousConfig::from_url(
            self.base_url(),
            self.fingerprint,
            id.peer,
            id.key.clone(),
        )?;
        // The others in the order the HTTP calls try them, after the one in use.
        let urls = self.urls();
        let at = urls.iter().position(|u| u == self.base_url()).unwrap_or(0);
        let others = urls.iter().cycle().skip(at + 1).take(urls.len());
        Some(cfg.with_others(others.map(String::as_str)))
    }

    /// One POST to the instance at `base`: the status and body, whatever they are.
    async fn post_once(
        &self,
        base: &str,
        path: &str,
        body: Vec<u8>,
        auth_header: Option<&str>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let url = format!("{base}{path}");
        let transport = |source| ClientError::Transport {
            url: url.clone(),
            source,
        };
        let mut req = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(h) = auth_header {
            req = req.header(AUTH_HEADER, h);
        }
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(transport)?;
        Ok((status, bytes.to_vec()))
    }

    /// POST raw bytes with an optional auth header; returns the status and body, whatever
    /// they are. For tests and tools that need to send exactly what they built: these
    /// bytes go to another instance only when no instance saw them.
    pub async fn post_raw(
        &self,
        path: &str,
        body: Vec<u8>,
        auth_header: Option<&str>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        self.instances
            .run(Resend::OnlyUnreached, |base| {
                self.post_once(base, path, body.clone(), auth_header)
            })
            .await
    }

    /// One GET to each instance in turn until one answers.
    async fn get_any(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        self.instances
            .run(Resend::Safe, |base| {
                let url = format!("{base}{path}");
                async move {
                    self.http
                        .get(&url)
                        .send()
                        .await
                        .map_err(|source| ClientError::Transport { url, source })
                }
            })
            .await
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
        resend: Resend,
    ) -> Result<R, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Decode(e.to_string()))?;
        let (status, bytes) = self
            .instances
            .run(resend, |base| {
                self.post_once(base, path, body.clone(), None)
            })
            .await?;
        Self::decode(status, &bytes)
    }

    /// Call an authenticated endpoint: sign `req` with a signer from the pool, send it, and
    /// return the signer to the pool when the answer is in.
    ///
    /// Each attempt (one per instance tried) is signed afresh: the same bytes resent to
    /// another instance would carry a counter the server may already have recorded (a
    /// shared store refuses it as a replay); a new signature on the same channel carries a
    /// higher one.
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
        let result = self
            .instances
            .run(Resend::Safe, |base| {
                let auth = signer.sign(kind, &body, now_ms()).to_header();
                let body = body.clone();
                async move { self.post_once(base, path, body, Some(&auth)).await }
            })
            .await;
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
        let resp = self.get_any(api::path::HEALTHZ).await?;
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
        let resp = self.get_any(api::path::METRICS).await?;
        let url = resp.url().to_string();
        resp.text()
            .await
            .map_err(|source| ClientError::Transport { url, source })
    }

    /// Register a new peer (unauthenticated; invite-gated unless the server is open).
    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ClientError> {
        // A registration that reached an instance may have taken the name and the invite:
        // sent again, it would be refused as `name_taken`.
        self.unauthenticated(api::path::REGISTER, req, Resend::OnlyUnreached)
            .await
    }

    /// Log in again: the peer id and keys.
    pub async fn login(&self, req: &LoginRequest) -> Result<LoginResponse, ClientError> {
        // Logging in twice changes nothing: it only hands the keys out.
        self.unauthenticated(api::path::LOGIN, req, Resend::Safe)
            .await
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[derive(Debug)]
    struct Fail(Reach);

    impl std::fmt::Display for Fail {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }

    impl Failure for Fail {
        fn reach(&self) -> Reach {
            self.0
        }
    }

    fn instances(budget: Duration) -> Instances {
        let urls = ["https://a", "https://b", "https://c"].map(String::from);
        Instances::new(urls.to_vec(), budget)
    }

    /// Run one call where each URL answers as `outcome` says, and return the result and
    /// the URLs tried, in order.
    async fn call(
        inst: &Instances,
        resend: Resend,
        outcome: impl Fn(&str) -> Result<(), Reach>,
    ) -> (Result<String, Reach>, Vec<String>) {
        let tried = StdMutex::new(Vec::new());
        let r = inst
            .run(resend, |url| {
                tried.lock().unwrap().push(url.to_string());
                let r = outcome(url).map(|()| url.to_string()).map_err(Fail);
                async move { r }
            })
            .await
            .map_err(|f| f.0);
        (r, tried.into_inner().unwrap())
    }

    fn dead(dead: &'static [&'static str], how: Reach) -> impl Fn(&str) -> Result<(), Reach> {
        move |u| {
            if dead.iter().any(|d| u.ends_with(d)) {
                Err(how)
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn moves_on_in_order_and_sticks_to_the_one_that_answered() {
        let inst = instances(FAILOVER_BUDGET);
        assert_eq!(inst.current(), "https://a");
        let (r, tried) = call(&inst, Resend::Safe, dead(&["a"], Reach::Unreached)).await;
        assert_eq!(r.unwrap(), "https://b");
        assert_eq!(tried, ["https://a", "https://b"]);
        assert_eq!(inst.current(), "https://b");
        // Sticky: the dead one is not asked first again.
        let (r, tried) = call(&inst, Resend::Safe, dead(&["a"], Reach::Unreached)).await;
        assert_eq!(r.unwrap(), "https://b");
        assert_eq!(tried, ["https://b"]);
        // When b dies too, the order wraps around: c, then a.
        let (r, tried) = call(&inst, Resend::Safe, dead(&["b", "c"], Reach::Unreached)).await;
        assert_eq!(r.unwrap(), "https://a");
        assert_eq!(tried, ["https://b", "https://c", "https://a"]);
        assert_eq!(inst.current(), "https://a");
    }

    #[tokio::test]
    async fn every_instance_dead_tries_each_once_and_keeps_the_current() {
        let inst = instances(FAILOVER_BUDGET);
        let (r, tried) = call(
            &inst,
            Resend::Safe,
            dead(&["a", "b", "c"], Reach::Unreached),
        )
        .await;
        assert_eq!(r.unwrap_err(), Reach::Unreached);
        assert_eq!(tried, ["https://a", "https://b", "https://c"]);
        assert_eq!(inst.current(), "https://a");
    }

    #[tokio::test]
    async fn an_http_refusal_is_never_retried_elsewhere() {
        let inst = instances(FAILOVER_BUDGET);
        let (r, tried) = call(&inst, Resend::Safe, dead(&["a"], Reach::Answered)).await;
        assert_eq!(r.unwrap_err(), Reach::Answered);
        assert_eq!(tried, ["https://a"]);
        assert_eq!(inst.current(), "https://a");
    }

    #[tokio::test]
    async fn a_request_that_may_have_arrived_is_resent_only_when_safe() {
        let inst = instances(FAILOVER_BUDGET);
        let (r, tried) = call(
            &inst,
            Resend::OnlyUnreached,
            dead(&["a"], Reach::MaybeReached),
        )
        .await;
        assert_eq!(r.unwrap_err(), Reach::MaybeReached);
        assert_eq!(tried, ["https://a"]);
        let (r, tried) = call(&inst, Resend::Safe, dead(&["a"], Reach::MaybeReached)).await;
        assert_eq!(r.unwrap(), "https://b");
        assert_eq!(tried, ["https://a", "https://b"]);
        // Never reached: even a registration moves on.
        let inst = instances(FAILOVER_BUDGET);
        let (r, _) = call(&inst, Resend::OnlyUnreached, dead(&["a"], Reach::Unreached)).await;
        assert_eq!(r.unwrap(), "https://b");
    }

    #[tokio::test]
    async fn no_instance_is_tried_once_the_budget_is_spent() {
        // The first instance takes longer than the whole budget to fail: the call ends
        // with its failure rather than starting on the others.
        let inst = instances(Duration::from_millis(1));
        let tried = StdMutex::new(Vec::new());
        let r: Result<(), Fail> = inst
            .run(Resend::Safe, |url| {
                tried.lock().unwrap().push(url.to_string());
                async {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Err(Fail(Reach::Unreached))
                }
            })
            .await;
        assert_eq!(r.unwrap_err().0, Reach::Unreached);
        assert_eq!(tried.into_inner().unwrap(), ["https://a"]);
    }

    #[test]
    fn urls_are_normalized_and_checked() {
        assert_eq!(
            normalize_urls(&["https://a:1/", " https://b:2 ", "https://a:1"]).unwrap(),
            ["https://a:1", "https://b:2"]
        );
        assert!(normalize_urls(&["http://a:1"]).is_err());
        assert!(normalize_urls(&[] as &[&str]).is_err());
    }

    /// A port with nothing listening, and one that accepts and hangs up at once (a TLS
    /// handshake that fails): both are connection failures the client moves past, and the
    /// error names the last instance tried.
    #[tokio::test]
    async fn real_connection_failures_count_as_unreached() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_url = format!("https://{}", closed.local_addr().unwrap());
        drop(closed);
        let hangup = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hangup_url = format!("https://{}", hangup.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((s, _)) = hangup.accept().await {
                drop(s);
            }
        });
        let c = ServerClient::with_urls(&[&closed_url, &hangup_url], Fingerprint([1; 32])).unwrap();
        let e = c.healthz().await.unwrap_err();
        assert_eq!(e.reach(), Reach::Unreached, "{e:?}");
        match e {
            ClientError::Transport { url, .. } => assert!(url.starts_with(&hangup_url), "{url}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c.base_url(),
            closed_url,
            "nothing answered: still the first"
        );
    }
}
