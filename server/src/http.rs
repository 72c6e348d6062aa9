//! HTTPS serving: TLS (rustls, ring) in front of hyper (HTTP/1.1 and HTTP/2), requests
//! routed by axum; body limits, control-message authentication, JSON in and out, metrics
//! per request.

use peerstash::api::Reason;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State as With};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::http::request::Parts;
use hyper::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use peerstash::api::{self, path};
use peerstash::control::{now_ms, ControlAuth, ControlError, MessageKind, AUTH_HEADER};
use peerstash::PeerId;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::error::Refusal;
use crate::{handlers, State};

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers (HTTP/1).
const HEADER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a client may take to send a request's body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Accept connections on `listener` forever, serving the API over TLS.
pub async fn serve(state: Arc<State>, listener: TcpListener) -> std::io::Result<()> {
    let tls = state
        .cert
        .server_config(&[b"h2", b"http/1.1"])
        .map_err(std::io::Error::other)?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    crate::lease::hold_jobs_lease(&state, listener.local_addr()?).await;
    spawn_sweeper(state.clone());
    spawn_checkpointer(&state)?;
    crate::probe::spawn_prober(state.clone());
    crate::repair::spawn_repairer(state.clone());
    crate::audit::spawn_auditor(state.clone());
    let app = api_routes(state);
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => return,
            };
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // A client that trickles its headers (slowloris) is cut off.
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            if let Err(e) = builder
                .serve_connection(TokioIo::new(tls), service(app, remote))
                .await
            {
                tracing::debug!(%remote, "connection: {e}");
            }
        });
    }
}

/// Forget expired pending placements now and then, so they stop counting against quotas
/// and free space, and idle control channels.
fn spawn_sweeper(st: Arc<State>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if !st.leads() {
                continue;
            }
            let st2 = st.clone();
            let grace = st.cfg.token_lifetime_secs;
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = st2
                    .store
                    .lock()
                    .expect("not poisoned")
                    .sweep_pending(now_ms() / 1000, grace)
                {
                    tracing::warn!("sweeping pending placements: {e}");
                }
                if let Err(e) = st2.sweep_channels() {
                    tracing::warn!("sweeping control channels: {e}");
                }
            })
            .await;
        }
    });
}

/// How often the write-ahead log is copied into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// Checkpoint the database from a connection of its own, so that confirms and puts do not
/// copy the log into the database file under the store lock.
fn spawn_checkpointer(st: &Arc<State>) -> std::io::Result<()> {
    let ck = st
        .store
        .lock()
        .expect("not poisoned")
        .checkpointer()
        .map_err(std::io::Error::other)?;
    let Some(ck) = ck else {
        return Ok(()); // PostgreSQL checkpoints by itself
    };
    let ck = Arc::new(std::sync::Mutex::new(ck));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let ck = ck.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = ck.lock().expect("not poisoned").run() {
                    tracing::warn!("checkpointing the database: {e}");
                }
            })
            .await;
        }
    });
    Ok(())
}

/// The router as a hyper service for one connection from `remote` (which the
/// register/login rate limit reads as [`ConnectInfo`]).
fn service(
    app: Router,
    remote: SocketAddr,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = Response,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(remote));
        app.clone().oneshot(req.map(Body::new))
    })
}

/// Every endpoint of the public API. An unknown path is 404, a known one asked with the
/// wrong method 405, both with a JSON refusal like every other.
fn api_routes(st: Arc<State>) -> Router {
    use handlers as h;
    Router::new()
        .route(path::HEALTHZ, get(healthz))
        .route(path::METRICS, get(public_metrics))
        .route(path::REGISTER, password(h::register))
        .route(path::LOGIN, password(h::login))
        .route(
            path::HEARTBEAT,
            control(MessageKind::Heartbeat, h::heartbeat),
        )
        .route(path::PUT, control(MessageKind::Put, h::put))
        .route(path::CONFIRM, control(MessageKind::Confirm, h::confirm))
        .route(path::GET, control(MessageKind::Get, h::get))
        .route(path::RELEASE, control(MessageKind::Release, h::release))
        .route(path::REPORT, control(MessageKind::Report, report))
        .route(path::ROOT, control(MessageKind::Root, h::put_root))
        .route(path::ROOT_DROP, control(MessageKind::Root, h::drop_roots))
        .route(path::ROOT_GET, control(MessageKind::Root, h::get_root))
        .route(
            path::INVENTORY,
            control(MessageKind::Inventory, h::inventory),
        )
        .route(path::STATUS, control(MessageKind::Status, h::status))
        .fallback(unknown_path)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(st.clone(), observe))
        .with_state(st)
}

/// Time every request under its route, and count refusals by reason.
async fn observe(With(st): With<Arc<State>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = route_name(req.uri().path());
    let resp = next.run(req).await;
    if let Some(reason) = resp.extensions().get::<Reason>() {
        st.metrics.reject(reason.as_str());
    }
    st.metrics
        .observe(route, resp.status().as_u16(), start.elapsed());
    resp
}

fn route_name(p: &str) -> &'static str {
    match p {
        path::REGISTER => path::REGISTER,
        path::LOGIN => path::LOGIN,
        path::HEARTBEAT => path::HEARTBEAT,
        path::PUT => path::PUT,
        path::CONFIRM => path::CONFIRM,
        path::GET => path::GET,
        path::RELEASE => path::RELEASE,
        path::REPORT => path::REPORT,
        path::STATUS => path::STATUS,
        path::ROOT => path::ROOT,
        path::ROOT_GET => path::ROOT_GET,
        path::ROOT_DROP => path::ROOT_DROP,
        path::INVENTORY => path::INVENTORY,
        path::HEALTHZ => path::HEALTHZ,
        path::METRICS => path::METRICS,
        _ => "other",
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut r = json(self.status, &self.body());
        if let Some(secs) = self.retry_after {
            r.headers_mut().insert(RETRY_AFTER, secs.into());
        }
        // For `observe`, which counts refusals by reason.
        r.extensions_mut().insert(self.reason);
        r
    }
}

async fn healthz() -> Response {
    text("ok\n".into(), "text/plain")
}

/// `/metrics` on the public address: only when the operator says so (unauthenticated).
async fn public_metrics(With(st): With<Arc<State>>) -> Result<Response, Refusal> {
    if !st.cfg.public_metrics {
        return Err(not_found(path::METRICS));
    }
    metrics(&st).await
}

/// The Prometheus text of `/metrics`.
async fn metrics(st: &Arc<State>) -> Result<Response, Refusal> {
    let s = st.clone();
    let figures = blocking(move || {
        let cutoff = now_ms().saturating_sub(s.cfg.online_timeout_secs * 1000);
        Ok(s.store.lock().expect("not poisoned").figures(cutoff)?)
    })
    .await?;
    let m = st.metrics.render(figures, st.rendezvous.figures());
    Ok(text(m, "text/plain; version=0.0.4"))
}

async fn unknown_path(req: Request) -> Refusal {
    not_found(req.uri().path())
}

async fn wrong_method() -> Refusal {
    Refusal::new(
        405,
        Reason::MethodNotAllowed,
        "use POST (GET for /healthz and /metrics)",
    )
}

/// Serve `GET /metrics` and `GET /healthz`, in plain HTTP, on `listener` (the
/// `--metrics-listen` address: loopback by default, since nothing here is
/// authenticated). Everything else is 404.
pub async fn serve_metrics(state: Arc<State>, listener: TcpListener) {
    let app = Router::new()
        .route(
            path::METRICS,
            get(|With(st): With<Arc<State>>| async move { metrics(&st).await }),
        )
        .route(path::HEALTHZ, get(healthz))
        .fallback(unknown_path)
        .with_state(state);
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept (metrics): {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            if let Err(e) = b
                .serve_connection(TokioIo::new(tcp), service(app, remote))
                .await
            {
                tracing::debug!(%remote, "metrics connection: {e}");
            }
        });
    }
}

/// The route of an unauthenticated endpoint (register, login): rate-limited per
/// address, one Argon2 hash at a time per slot (see [`hash_slot`]), `handle` on the
/// blocking pool.
fn password<R, O>(
    handle: fn(&State, R) -> Result<O, Refusal>,
) -> axum::routing::MethodRouter<Arc<State>>
where
    R: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
{
    post(
        move |With(st): With<Arc<State>>,
              ConnectInfo(remote): ConnectInfo<SocketAddr>,
              req: Request| async move {
            let _slot = hash_slot(&st, remote).await?;
            let r: R = parse(&read_body(req).await?.1)?;
            let s = st.clone();
            let out = blocking(move || handle(&s, r)).await?;
            Ok::<_, Refusal>(json(200, &out))
        },
    )
}

/// The rate limit of one address, then one of the few slots for an Argon2 hash: each
/// takes ~19 MiB and a core for a while, so bound how many run at once, whatever the
/// number of addresses asking.
async fn hash_slot(
    st: &State,
    remote: SocketAddr,
) -> Result<tokio::sync::SemaphorePermit<'_>, Refusal> {
    st.limiter.check(remote.ip()).map_err(|secs| {
        Refusal::new(
            429,
            Reason::RateLimited,
            format!("too many registrations or logins from your address; retry in {secs} s"),
        )
        .retry_after(secs)
    })?;
    st.hash_slots.acquire().await.map_err(Refusal::internal)
}

/// The route of an endpoint that takes a control message of `kind`: read the body,
/// authenticate it, parse it, and run `handle` on the blocking pool (SQLite).
fn control<R, O>(
    kind: MessageKind,
    handle: fn(&State, PeerId, R) -> Result<O, Refusal>,
) -> axum::routing::MethodRouter<Arc<State>>
where
    R: Body2Request + Send + 'static,
    O: Serialize + Send + 'static,
{
    post(move |With(st): With<Arc<State>>, req: Request| async move {
        let (parts, body) = read_body(req).await?;
        let out = blocking(move || {
            let peer = authenticate(&st, &parts, kind, &body)?;
            handle(&st, peer, R::from_body(&body)?)
        })
        .await?;
        Ok::<_, Refusal>(json(200, &out))
    })
}

/// How a request type is read from a body.
trait Body2Request: Sized {
    fn from_body(body: &[u8]) -> Result<Self, Refusal>;
}

macro_rules! json_requests {
    ($($t:ty),* $(,)?) => {
        $(impl Body2Request for $t {
            fn from_body(body: &[u8]) -> Result<Self, Refusal> {
                parse(body)
            }
        })*
    };
}

json_requests!(
    api::HeartbeatRequest,
    api::PutRequest,
    api::ConfirmRequest,
    api::GetRequest,
    api::ReleaseRequest,
    api::ReportRequest,
    api::PutRootRequest,
    api::DropRootsRequest,
    api::GetRootRequest,
    api::InventoryRequest,
);

impl Body2Request for api::StatusRequest {
    /// An empty body (older clients) asks for everything.
    fn from_body(body: &[u8]) -> Result<Self, Refusal> {
        if body.is_empty() {
            Ok(api::StatusRequest { figures: true })
        } else {
            parse(body)
        }
    }
}

/// A report is answered with an empty object.
fn report(st: &State, peer: PeerId, r: api::ReportRequest) -> Result<serde_json::Value, Refusal> {
    handlers::report(st, peer, r)?;
    Ok(serde_json::json!({}))
}

fn json<T: Serialize>(status: u16, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from(bytes))
        .expect("valid response")
}

fn text(body: String, content_type: &'static str) -> Response {
    Response::builder()
        .header(CONTENT_TYPE, content_type)
        .body(Body::from(body))
        .expect("valid response")
}

fn too_large() -> Refusal {
    Refusal::new(
        413,
        Reason::TooLarge,
        format!(
            "request bodies are limited to {} bytes; split the request",
            api::MAX_BODY_BYTES
        ),
    )
}

/// Read the whole body, refusing (before reading it) anything over the limit.
async fn read_body(req: Request) -> Result<(Parts, Bytes), Refusal> {
    if let Some(len) = req.headers().get(CONTENT_LENGTH) {
        let len: usize = len
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Refusal::bad_request("bad Content-Length"))?;
        if len > api::MAX_BODY_BYTES {
            return Err(too_large());
        }
    }
    let (parts, body) = req.into_parts();
    let collected = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(body, api::MAX_BODY_BYTES).collect(),
    )
    .await
    .map_err(|_| {
        Refusal::new(
            408,
            Reason::Timeout,
            format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )
    })?
    .map_err(|e| {
        if e.downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            too_large()
        } else {
            Refusal::bad_request(format!("could not read the request body: {e}"))
        }
    })?;
    Ok((parts, collected.to_bytes()))
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| {
        Refusal::new(
            400,
            Reason::BadJson,
            format!("the request body is not valid: {e}"),
        )
    })
}

fn control_refusal(e: ControlError) -> Refusal {
    let hint = match e {
        ControlError::BadMac => {
            "; this home's transaction.key does not match the server's (peerstash login restores it)"
        }
        ControlError::Stale { .. } => "; check that this machine's clock is right (NTP)",
        ControlError::Replayed { .. } => "; a request is accepted once: send a fresh one",
        ControlError::UnknownPeer(_) => "; register first (peerstash register)",
        _ => "",
    };
    Refusal::new(401, e.reason(), format!("{e}{hint}"))
}

/// Check the control-message authentication of a request to an endpoint of `kind`, and
/// advance its channel's counter. Blocking (the store).
fn authenticate(
    st: &State,
    parts: &Parts,
    kind: MessageKind,
    body: &[u8],
) -> Result<PeerId, Refusal> {
    let header = parts
        .headers
        .get(AUTH_HEADER)
        .ok_or_else(|| {
            Refusal::new(
                401,
                Reason::Malformed,
                format!("this endpoint needs a control message in the {AUTH_HEADER} header"),
            )
        })?
        .to_str()
        .map_err(|_| control_refusal(ControlError::Malformed("header")))?;
    let auth = ControlAuth::from_header(header).map_err(control_refusal)?;
    st.verify_control(&auth, kind, body)?
        .map_err(control_refusal)?;
    Ok(auth.peer)
}

/// Run a handler on the blocking pool (Argon2, SQLite).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Refusal> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(Refusal::internal)?
}

fn not_found(p: &str) -> Refusal {
    Refusal::new(404, Reason::NotFound, format!("no endpoint {p}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The router alone (no TLS, no socket), as one connection from `REMOTE` sees it.
    async fn call(app: &Router, method: &str, uri: &str, body: &str) -> (u16, String) {
        const REMOTE: ([u8; 4], u16) = ([192, 0, 2, 7], 40000);
        let req = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .extension(ConnectInfo(SocketAddr::from(REMOTE)))
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let retry = resp.headers().get(RETRY_AFTER).is_some();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&body).to_string();
        assert_eq!(retry, status == 429, "Retry-After only on 429: {text}");
        (status, text)
    }

    fn reason(text: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|_| panic!("{text}"));
        v["reason"].as_str().unwrap_or_default().to_string()
    }

    #[tokio::test]
    async fn every_refusal_is_json_counted_and_rate_limited_per_address() {
        let dir = tempfile::tempdir().unwrap();
        let st = Arc::new(
            crate::init(crate::Config {
                auth_burst: 3.0,
                auth_per_minute: 1.0,
                ..crate::Config::new(dir.path().into())
            })
            .unwrap(),
        );
        let app = api_routes(st.clone());
        assert_eq!(
            call(&app, "GET", "/healthz", "").await,
            (200, "ok\n".into())
        );

        let (s, t) = call(&app, "GET", path::PUT, "").await;
        assert_eq!((s, reason(&t).as_str()), (405, "method_not_allowed"), "{t}");
        let (s, t) = call(&app, "POST", "/v1/nope", "{}").await;
        assert_eq!((s, reason(&t).as_str()), (404, "not_found"), "{t}");
        // Unauthenticated /metrics is off on the public address by default.
        let (s, t) = call(&app, "GET", path::METRICS, "").await;
        assert_eq!((s, reason(&t).as_str()), (404, "not_found"), "{t}");
        let (s, t) = call(&app, "POST", path::PUT, "{}").await;
        assert_eq!((s, reason(&t).as_str()), (401, "malformed"), "{t}");

        // Three logins from one address get as far as their (bad) body; the fourth is
        // refused before it, with a Retry-After.
        for _ in 0..3 {
            let (s, t) = call(&app, "POST", path::LOGIN, "{").await;
            assert_eq!((s, reason(&t).as_str()), (400, "bad_json"), "{t}");
        }
        let (s, t) = call(&app, "POST", path::REGISTER, "{").await;
        assert_eq!((s, reason(&t).as_str()), (429, "rate_limited"), "{t}");

        let m = st
            .metrics
            .render(Default::default(), st.rendezvous.figures());
        for line in [
            "peerstash_rejections_total{reason=\"rate_limited\"} 1",
            "peerstash_rejections_total{reason=\"bad_json\"} 3",
            "peerstash_rejections_total{reason=\"not_found\"} 2",
            "peerstash_request_seconds_count{route=\"/v1/login\",status=\"400\"} 3",
            "peerstash_request_seconds_count{route=\"other\",status=\"404\"} 1",
        ] {
            assert!(m.lines().any(|l| l == line), "no `{line}` in\n{m}");
        }
    }
}
