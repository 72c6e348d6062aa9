//! HTTPS serving: TLS (rustls, ring) in front of hyper (HTTP/1.1 and HTTP/2), routing,
//! body limits, control-message authentication, JSON in and out, metrics per request.

use peerstash::api::Reason;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use peerstash::api::{self, path};
use peerstash::control::{now_ms, ControlAuth, ControlError, MessageKind, AUTH_HEADER};
use peerstash::PeerId;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::error::Refusal;
use crate::{handlers, State};

type Resp = Response<Full<Bytes>>;

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
    spawn_sweeper(state.clone());
    spawn_checkpointer(&state)?;
    crate::probe::spawn_prober(state.clone());
    crate::repair::spawn_repairer(state.clone());
    crate::audit::spawn_auditor(state.clone());
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
        let st = state.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => return,
            };
            let svc = hyper::service::service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(handle(st, remote, req).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // A client that trickles its headers (slowloris) is cut off.
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), svc).await {
                tracing::debug!(%remote, "connection: {e}");
            }
        });
    }
}

/// Forget expired pending placements now and then, so they stop counting against quotas
/// and free space.
fn spawn_sweeper(st: Arc<State>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
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

/// The Prometheus text of `/metrics`.
async fn metrics(st: &Arc<State>) -> Result<Resp, Refusal> {
    let s = st.clone();
    let figures = blocking(move || {
        let cutoff = now_ms().saturating_sub(s.cfg.online_timeout_secs * 1000);
        Ok(s.store.lock().expect("not poisoned").figures(cutoff)?)
    })
    .await?;
    let mut m = st.metrics.render(&figures);
    st.rendezvous.render(&mut m);
    Ok(text(m, "text/plain; version=0.0.4"))
}

/// Serve `GET /metrics` and `GET /healthz`, in plain HTTP, on `listener` (the
/// `--metrics-listen` address: loopback by default, since nothing here is
/// authenticated). Everything else is 404.
pub async fn serve_metrics(state: Arc<State>, listener: TcpListener) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept (metrics): {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let st = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let st = st.clone();
                async move {
                    let p = req.uri().path().to_string();
                    let r = match (req.method() == Method::GET, p.as_str()) {
                        (true, path::METRICS) => metrics(&st).await,
                        (true, path::HEALTHZ) => Ok(text("ok\n".into(), "text/plain")),
                        _ => Err(not_found(&p)),
                    };
                    Ok::<_, Infallible>(r.unwrap_or_else(|e| json(e.status, &e.body())))
                }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            if let Err(e) = b.serve_connection(TokioIo::new(tcp), svc).await {
                tracing::debug!(%remote, "metrics connection: {e}");
            }
        });
    }
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

async fn handle(st: Arc<State>, remote: SocketAddr, req: Request<Incoming>) -> Resp {
    let start = Instant::now();
    let route = route_name(req.uri().path());
    let resp = match dispatch(&st, remote.ip(), req).await {
        Ok(r) => r,
        Err(refusal) => {
            st.metrics.reject(refusal.reason.as_str());
            let mut r = json(refusal.status, &refusal.body());
            if let Some(secs) = refusal.retry_after {
                r.headers_mut().insert(RETRY_AFTER, secs.into());
            }
            r
        }
    };
    st.metrics
        .observe(route, resp.status().as_u16(), start.elapsed());
    resp
}

fn json<T: Serialize>(status: u16, body: &T) -> Resp {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("valid response")
}

fn text(body: String, content_type: &'static str) -> Resp {
    Response::builder()
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
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
async fn read_body(req: Request<Incoming>) -> Result<(Parts, Bytes), Refusal> {
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

/// Check the control-message authentication of a request to an endpoint of `kind`.
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
    let key = st
        .key_of(auth.peer)
        .ok_or_else(|| control_refusal(ControlError::UnknownPeer(auth.peer)))?;
    st.verifier
        .verify(&auth, &key, kind, body, now_ms())
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

async fn dispatch(st: &Arc<State>, ip: IpAddr, req: Request<Incoming>) -> Result<Resp, Refusal> {
    let p = req.uri().path().to_string();
    let method = req.method().clone();
    if method == Method::GET {
        return match p.as_str() {
            path::HEALTHZ => Ok(text("ok\n".into(), "text/plain")),
            // Unauthenticated: on the public address only when the operator says so.
            path::METRICS if st.cfg.public_metrics => metrics(st).await,
            _ => Err(not_found(&p)),
        };
    }
    if method != Method::POST {
        return Err(Refusal::new(
            405,
            Reason::MethodNotAllowed,
            "use POST (GET for /healthz and /metrics)",
        ));
    }
    match p.as_str() {
        path::REGISTER | path::LOGIN => {
            st.limiter.check(ip).map_err(|secs| {
                Refusal::new(
                    429,
                    Reason::RateLimited,
                    format!(
                        "too many registrations or logins from your address; retry in {secs} s"
                    ),
                )
                .retry_after(secs)
            })?;
            // Each Argon2 hash takes ~19 MiB and a core for a while: bound how many run at
            // once, whatever the number of addresses asking.
            let _slot = st.hash_slots.acquire().await.map_err(Refusal::internal)?;
            let (_, body) = read_body(req).await?;
            let s = st.clone();
            if p == path::REGISTER {
                let r: api::RegisterRequest = parse(&body)?;
                let out = blocking(move || handlers::register(&s, r)).await?;
                Ok(json(200, &out))
            } else {
                let r: api::LoginRequest = parse(&body)?;
                let out = blocking(move || handlers::login(&s, r)).await?;
                Ok(json(200, &out))
            }
        }
        _ => {
            let Some(kind) = api::kind_for_path(&p) else {
                return Err(not_found(&p));
            };
            let (parts, body) = read_body(req).await?;
            let peer = authenticate(st, &parts, kind, &body)?;
            let s = st.clone();
            match kind {
                MessageKind::Heartbeat => {
                    let r = parse(&body)?;
                    Ok(json(
                        200,
                        &blocking(move || handlers::heartbeat(&s, peer, r)).await?,
                    ))
                }
                MessageKind::Put => {
                    let r = parse(&body)?;
                    Ok(json(
                        200,
                        &blocking(move || handlers::put(&s, peer, r)).await?,
                    ))
                }
                MessageKind::Confirm => {
                    let r = parse(&body)?;
                    Ok(json(
                        200,
                        &blocking(move || handlers::confirm(&s, peer, r)).await?,
                    ))
                }
                MessageKind::Get => {
                    let r = parse(&body)?;
                    Ok(json(
                        200,
                        &blocking(move || handlers::get(&s, peer, r)).await?,
                    ))
                }
                MessageKind::Release => {
                    let r = parse(&body)?;
                    Ok(json(
                        200,
                        &blocking(move || handlers::release(&s, peer, r)).await?,
                    ))
                }
                MessageKind::Report => {
                    let r = parse(&body)?;
                    blocking(move || handlers::report(&s, peer, r)).await?;
                    Ok(json(200, &serde_json::json!({})))
                }
                MessageKind::Root if p == path::ROOT => {
                    let r = parse(&body)?;
                    Ok(json(
                        200,
                        &blocking(move || handlers::put_root(&s, peer, r)).await?,
                    ))
                }
                MessageKind::Root if p == path::ROOT_DROP => {
                    let r = parse(&body)?;
                    Ok(json(
                        200,
                        &blocking(move || handlers::drop_roots(&s, peer, r)).await?,
                    ))
                }
                MessageKind::Root => {
                    let r = parse(&body)?;
                    Ok(json(
                        200,
                        &blocking(move || handlers::get_root(&s, peer, r)).await?,
                    ))
                }
                MessageKind::Inventory => {
                    let r = parse(&body)?;
                    Ok(json(
                        200,
                        &blocking(move || handlers::inventory(&s, peer, r)).await?,
                    ))
                }
                MessageKind::Status => {
                    // An empty body (older clients) asks for everything.
                    let r = if body.is_empty() {
                        api::StatusRequest { figures: true }
                    } else {
                        parse(&body)?
                    };
                    Ok(json(
                        200,
                        &blocking(move || handlers::status(&s, peer, r)).await?,
                    ))
                }
                _ => Err(not_found(&p)),
            }
        }
    }
}

fn not_found(p: &str) -> Refusal {
    Refusal::new(404, Reason::NotFound, format!("no endpoint {p}"))
}
