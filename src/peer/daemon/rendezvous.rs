//! The daemon's side of the rendezvous (see [`crate::peer::rendezvous`]): from its own
//! QUIC socket it learns the address the server sees, tests whether its NAT keeps that
//! mapping for other destinations, says hello, and then carries out the server's orders:
//! punch towards a client, or join a relay session.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::{Endpoint, RecvStream, SendStream};
use tokio::sync::watch;

use super::Shared;
use crate::control::{now_ms, MessageKind};
use crate::peer::portmap;
use crate::peer::rendezvous::{
    self as rv, op, NatError, Reach, RelayGrant, RendezvousConfig, Status,
};
use crate::peer::wire::{ControlReason, Op};

/// Keep-alive on the hello connection: well inside the 30 s a home router keeps a quiet
/// UDP mapping.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// How long the daemon keeps sending punch packets towards one client.
const PUNCH_FOR: Duration = Duration::from_secs(3);
/// Orders handled at once; more wait (the server times them out).
const ORDERS_AT_ONCE: usize = 16;
/// Longest wait between two attempts to reach the server.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the daemon learnt about itself, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reachability {
    /// How others reach it.
    pub reach: Reach,
    /// The address the server sees it at.
    pub public: SocketAddr,
    /// The port mapping its router made, if any.
    pub mapped: Option<SocketAddr>,
    /// The protocol the router made it with.
    pub mapped_by: Option<portmap::Method>,
}

/// How long the daemon waits for its router to delete a mapping when it stops.
const UNMAP_FOR: Duration = Duration::from_secs(3);

/// What the hello connections to the several server instances share.
struct Hellos {
    /// The router's port mapping, kept across sessions (each renews it) and deleted when
    /// the daemon stops.
    held: tokio::sync::Mutex<Option<portmap::Mapping>>,
    /// Hello connections up now.
    live: AtomicUsize,
    /// The latest reachability an instance saw; None once no hello connection is up.
    published: watch::Sender<Option<Reachability>>,
}

/// Counts one hello connection as up for as long as it lives.
struct Up<'a>(&'a Hellos);

impl<'a> Up<'a> {
    fn new(h: &'a Hellos, r: Reachability) -> Up<'a> {
        h.live.fetch_add(1, Ordering::SeqCst);
        h.published.send_replace(Some(r));
        Up(h)
    }
}

impl Drop for Up<'_> {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.published.send_replace(None);
        }
    }
}

/// Run until `stop`: keep a hello connection up to every server instance, each
/// reconnecting with its own backoff. Each instance's rendezvous knows only the daemons
/// that said hello to it, so a client that asks any live instance, and the instance that
/// runs the status checks and audits, all reach this daemon; when one instance dies, the
/// others already have it.
pub(super) async fn run(
    endpoint: Endpoint,
    shared: Arc<Shared>,
    cfg: RendezvousConfig,
    advertised: Option<SocketAddr>,
    published: watch::Sender<Option<Reachability>>,
    stop: watch::Receiver<bool>,
) {
    let hellos = Hellos {
        held: tokio::sync::Mutex::new(None),
        live: AtomicUsize::new(0),
        published,
    };
    let each = cfg
        .instances()
        .into_iter()
        .map(|one| keep_up(&endpoint, &shared, one, advertised, &hellos, stop.clone()));
    futures_util::future::join_all(each).await;
    let held = hellos.held.lock().await.take();
    if let Some(m) = held {
        let r = tokio::time::timeout(UNMAP_FOR, portmap::unmap(&m)).await;
        tracing::info!(method = m.method.as_str(), public = %m.public, ok = matches!(r, Ok(Ok(()))), "deleted the router's port mapping");
    }
}

/// Keep a hello connection to one instance up until `stop`.
async fn keep_up(
    endpoint: &Endpoint,
    shared: &Arc<Shared>,
    cfg: RendezvousConfig,
    advertised: Option<SocketAddr>,
    hellos: &Hellos,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let outcome = {
            let session = session(endpoint, shared, &cfg, advertised, hellos);
            tokio::select! {
                r = session => Some(r),
                _ = stop.changed() => None,
            }
        };
        let Some(outcome) = outcome else { return };
        match outcome {
            // A session that lived a while was a good one: start over quickly.
            Ok(()) => backoff = Duration::from_secs(1),
            Err(e) => {
                tracing::info!(server = %cfg.server, error = %e, "rendezvous with the server failed");
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One hello connection, from dial to loss.
async fn session(
    endpoint: &Endpoint,
    shared: &Arc<Shared>,
    cfg: &RendezvousConfig,
    advertised: Option<SocketAddr>,
    hellos: &Hellos,
) -> Result<(), NatError> {
    let server = cfg.resolve().await?;
    let conn = rv::dial(endpoint, server, cfg.fingerprint, KEEP_ALIVE).await?;
    let seen = rv::whoami(&conn).await?;
    let local = endpoint
        .local_addr()
        .map_err(|e| NatError::Io(e.to_string()))?;
    // The same socket towards another port of the server: a NAT that keeps one public
    // port per socket shows the same address again; a symmetric one shows another.
    let probe = if seen.probe_port != 0 {
        let c = rv::dial(
            endpoint,
            SocketAddr::new(server.ip(), seen.probe_port),
            cfg.fingerprint,
            KEEP_ALIVE,
        )
        .await?;
        let again = rv::whoami(&c).await;
        c.close(0u32.into(), b"done");
        again?.addr
    } else {
        seen.addr
    };
    // An address this host can bind is its own: no NAT in between.
    let own_ip = std::net::UdpSocket::bind(SocketAddr::new(seen.addr.ip(), 0)).is_ok();
    let reach = Reach::classify(seen.addr, probe, local, advertised, own_ip);
    // Behind NAT, ask the router for a port mapping first: when it makes one, others
    // connect straight to it (the server checks it works before it says so).
    let mut body = vec![reach as u8];
    let mut renew = Duration::from_secs(24 * 3600);
    // One session at a time renews or makes the mapping (all share it).
    let mut held = hellos.held.lock().await;
    let mapped = if reach == Reach::Public {
        None
    } else {
        // Renew the mapping held (same protocol, same request), else try them all,
        // starting with the one that worked last.
        let renewed = match held.as_ref() {
            Some(m) => portmap::renew(m).await.map_err(|e| (e, Some(m.method))),
            None => Err((portmap::PortMapError::NoGateway, None)),
        };
        let r = match renewed {
            Ok(m) => Ok(m),
            Err((_, prefer)) => {
                // The router lost it or refuses to renew it: delete what may be left
                // before asking anew, so no stale mapping outlives the daemon.
                if let Some(old) = held.take() {
                    let _ = tokio::time::timeout(UNMAP_FOR, portmap::unmap(&old)).await;
                }
                portmap::map_udp(local.port(), prefer).await
            }
        };
        match r {
            Ok(m) => {
                rv::encode_addr(m.public.into(), &mut body);
                body.push(m.method as u8);
                // Renew at half the lifetime (a permanent UPnP mapping: once a day).
                if m.lifetime > 0 {
                    renew = Duration::from_secs(u64::from(m.lifetime / 2).max(30));
                }
                let seen = (SocketAddr::from(m.public), m.method);
                *held = Some(m);
                Some(seen)
            }
            Err(e) => {
                tracing::debug!(error = %e, "no port mapping from the router");
                None
            }
        }
    };
    drop(held);
    let hello = rv::signed(op::HELLO, &cfg.signer(), MessageKind::Rendezvous, &body);
    rv::request(&conn, &hello, Duration::from_secs(10)).await?;
    tracing::info!(reach = reach.as_str(), public = %seen.addr, mapped = ?mapped.map(|m| m.0), by = mapped.map(|m| m.1.as_str()), "reachable through the server's rendezvous");
    let _up = Up::new(
        hellos,
        Reachability {
            reach,
            public: seen.addr,
            mapped: mapped.map(|m| m.0),
            mapped_by: mapped.map(|m| m.1),
        },
    );
    // A mapping is renewed by starting over (a new hello with what the router says then).
    let renewal = tokio::time::sleep(renew);
    tokio::pin!(renewal);
    let relay = SocketAddr::new(server.ip(), seen.relay_port);
    let slots = Arc::new(tokio::sync::Semaphore::new(ORDERS_AT_ONCE));
    loop {
        let accepted = tokio::select! {
            a = conn.accept_bi() => a,
            _ = &mut renewal => {
                conn.close(0u32.into(), b"renewing");
                return Ok(());
            }
        };
        let (send, recv) = match accepted {
            Ok(s) => s,
            Err(e) => return Err(NatError::Broken(e.to_string())),
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (endpoint, shared) = (endpoint.clone(), shared.clone());
        tokio::spawn(async move {
            order(&endpoint, shared, relay, send, recv).await;
            drop(permit);
        });
    }
}

/// Read, check and carry out one order; answer with a status. The server's status
/// checks and audits of this daemon come on the same connection (a daemon behind NAT
/// cannot be dialled): they are served exactly as on a direct connection.
async fn order(
    endpoint: &Endpoint,
    shared: Arc<Shared>,
    relay: SocketAddr,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let t = shared.limits.read_timeout;
    let mut code = [0u8; 1];
    if !matches!(
        tokio::time::timeout(t, recv.read_exact(&mut code)).await,
        Ok(Ok(()))
    ) {
        return;
    }
    if let Some(op @ (Op::StatusCheck | Op::Audit)) = Op::from_u8(code[0]) {
        return super::serve_op(shared, Some(op), send, recv).await;
    }
    let mut msg = code.to_vec();
    match tokio::time::timeout(t, recv.read_to_end(rv::MAX_REQUEST - 1)).await {
        Ok(Ok(m)) => msg.extend_from_slice(&m),
        _ => return,
    }
    let (status, detail) = match carry_out(endpoint, &shared, relay, &msg).await {
        Ok(()) => (Status::Ok, 0),
        Err(e) => {
            tracing::info!(status = e.0.as_str(), "refused a rendezvous order");
            e
        }
    };
    let _ = tokio::time::timeout(t, send.write_all(&rv::reply(status, detail, &[]))).await;
    let _ = send.finish();
}

async fn carry_out(
    endpoint: &Endpoint,
    shared: &Shared,
    relay: SocketAddr,
    msg: &[u8],
) -> Result<(), (Status, u8)> {
    let malformed = |_| (Status::Malformed, 0);
    let (&code, rest) = msg.split_first().ok_or((Status::Malformed, 0))?;
    let (auth, body) = rv::split_signed(rest).map_err(malformed)?;
    // Orders come on a connection to the pinned server, and are signed under this peer's
    // key besides (server→peer, counter checked): nobody else can make the daemon send
    // packets somewhere, and a captured order cannot be played again.
    let checked = if auth.peer != shared.me {
        Err(crate::control::ControlError::UnknownPeer(auth.peer))
    } else {
        shared.control.verify(
            &auth,
            &shared.key,
            MessageKind::RendezvousOrder,
            body,
            now_ms(),
        )
    };
    if let Err(e) = checked {
        return Err((Status::BadControl, ControlReason::from(&e) as u8));
    }
    match code {
        op::PUNCH => {
            let (client, n) = rv::decode_addr(body).map_err(malformed)?;
            if n != body.len() {
                return Err((Status::Malformed, 0));
            }
            punch(endpoint, client).map_err(|_| (Status::Unavailable, 0))
        }
        op::RELAY => {
            let grant = RelayGrant::decode(body).map_err(malformed)?;
            let relay = SocketAddr::new(relay.ip(), grant.port);
            let daemon = endpoint
                .local_addr()
                .map_err(|_| (Status::Unavailable, 0))?;
            // The proxy hands relayed datagrams to this daemon's own socket: an
            // unspecified bind address is reached on loopback.
            let daemon = if daemon.ip().is_unspecified() {
                let lo: IpAddr = if daemon.is_ipv4() {
                    Ipv4Addr::LOCALHOST.into()
                } else {
                    Ipv6Addr::LOCALHOST.into()
                };
                SocketAddr::new(lo, daemon.port())
            } else {
                daemon
            };
            rv::start_proxy(relay, &grant, rv::ROLE_DAEMON, daemon.ip(), Some(daemon))
                .await
                .map_err(|_| (Status::Unavailable, 0))?;
            Ok(())
        }
        _ => Err((Status::Malformed, 0)),
    }
}

/// Open this daemon's NAT towards `client`: a connection attempt from the daemon socket
/// sends QUIC packets there for a few seconds (they are never answered; what matters is
/// that the router now lets the client's packets in).
fn punch(endpoint: &Endpoint, client: SocketAddr) -> Result<(), NatError> {
    let connecting = endpoint
        .connect_with(rv::punch_config()?, client, rv::SERVER_NAME)
        .map_err(|e| NatError::Connect(e.to_string()))?;
    tracing::debug!(%client, "punching");
    tokio::spawn(async move {
        let _ = tokio::time::timeout(PUNCH_FOR, connecting).await;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_reasons_fit_a_byte() {
        // The detail byte of a BadControl reply is the wire's control reason code.
        let e = crate::control::ControlError::BadMac;
        assert_eq!(ControlReason::from(&e) as u8, 5);
    }
}
