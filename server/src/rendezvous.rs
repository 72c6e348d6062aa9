//! Peers behind NAT (the server's side of `peerstash::peer::rendezvous`).
//!
//! - A QUIC endpoint on the UDP port of the HTTPS address, and a second one (the *probe*
//!   port) that only answers WHOAMI: a daemon compares the addresses both see to learn
//!   whether its NAT keeps one public port per socket.
//! - Daemons say hello on the main endpoint (signed under their key); the server keeps
//!   that connection, knows each daemon's public address and reachability from it, and
//!   sends orders on it.
//! - A client asking to reach a daemon (signed too) gets either the daemon's public
//!   address, after the daemon was told to punch towards the client's, or a relay session.
//! - The relay: one UDP socket forwarding the QUIC datagrams of each session between the
//!   two proxies that proved the session secret, bounded in sessions and bandwidth.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use peerstash::api::Route;
use peerstash::control::{now_ms, ControlSigner, Direction, MessageKind};
use peerstash::peer::portmap::Method;
use peerstash::peer::rendezvous::{
    self as rv, op, relay_op, Mode, Reach, RelayGrant, Status, BIND_LEN, DATA_HEADER,
    MAX_RELAY_PAYLOAD,
};
use peerstash::peer::{ControlReason, PeerAddr, PeerClient};
use peerstash::PeerId;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::net::UdpSocket;

use crate::State;

/// How long a daemon may take to accept an order.
const ORDER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a request may take to arrive.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most rendezvous connections (hello and client ones together).
const MAX_CONNECTIONS: usize = 10_000;
/// Streams one connection may have open at once.
const STREAMS_PER_CONNECTION: u32 = 16;
/// A session nobody joined within this long is forgotten.
const UNBOUND_TTL: Duration = Duration::from_secs(20);
/// A session quiet for this long is forgotten.
const IDLE_TTL: Duration = Duration::from_secs(60);
/// Most relay sessions one requester may hold.
const SESSIONS_PER_REQUESTER: usize = 64;

/// Relay limits.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Most sessions at once (0: no relay).
    pub sessions: usize,
    /// Bytes per second one session may move (both directions together).
    pub rate: u64,
    /// Bytes per second all sessions together may move (0: no overall cap).
    pub total_rate: u64,
    /// Longest life of a session; the client opens a new one after it.
    pub max_age: Duration,
    /// UDP port of the relay (0: any free one).
    pub port: u16,
    /// UDP port of the probe endpoint (0: any free one).
    pub probe_port: u16,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            sessions: 256,
            rate: 8 << 20,
            total_rate: 32 << 20,
            max_age: Duration::from_secs(3600),
            port: 0,
            probe_port: 0,
        }
    }
}

struct Entry {
    conn: Connection,
    reach: Reach,
    public: SocketAddr,
    /// A port mapping its router made, once the server reached the daemon through it.
    mapped: Option<SocketAddr>,
    /// The protocol the daemon says its router made the mapping with.
    mapped_by: Option<Method>,
}

impl Entry {
    fn reach(&self) -> Reach {
        if self.mapped.is_some() {
            Reach::Mapped
        } else {
            self.reach
        }
    }
}

struct Session {
    grant: RelayGrant,
    requester: PeerId,
    target: PeerId,
    sides: [Option<SocketAddr>; 2],
    created: Instant,
    /// Last datagram either way (idle expiry).
    last: Instant,
    /// Its share of the relay's bandwidth.
    bucket: Bucket,
}

/// A token bucket: bytes that may still pass, refilled at a rate since `refilled`, with
/// at most one second's worth banked (a burst, then the rate).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    allowance: f64,
    refilled: Instant,
}

impl Bucket {
    fn full(rate: u64, now: Instant) -> Bucket {
        Bucket {
            allowance: rate as f64,
            refilled: now,
        }
    }

    /// Refill up to `now`; whether `n` bytes fit (`rate` 0: always).
    fn fits(&mut self, n: usize, rate: u64, now: Instant) -> bool {
        let rate = rate as f64;
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.allowance = (self.allowance + elapsed * rate).min(rate);
        self.refilled = now;
        rate == 0.0 || self.allowance >= n as f64
    }

    fn take(&mut self, n: usize) {
        self.allowance -= n as f64;
    }
}

/// Why the relay dropped a datagram (the label of `peerstash_relay_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// Not a relay datagram, or no such session.
    Unknown,
    /// A BIND whose MAC is wrong, or that would move a bound side.
    BadBind,
    /// DATA from an address that is not a bound side.
    Unbound,
    /// Over the session's rate.
    SessionRate,
    /// Over the relay's overall rate.
    TotalRate,
}

impl Refusal {
    const ALL: [Refusal; 5] = [
        Refusal::Unknown,
        Refusal::BadBind,
        Refusal::Unbound,
        Refusal::SessionRate,
        Refusal::TotalRate,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Refusal::Unknown => "unknown",
            Refusal::BadBind => "bad_bind",
            Refusal::Unbound => "unbound",
            Refusal::SessionRate => "session_rate",
            Refusal::TotalRate => "total_rate",
        }
    }
}

/// Daemons' hello connections and relay sessions, with their counters.
#[derive(Default)]
pub struct Registry {
    daemons: Mutex<HashMap<PeerId, Entry>>,
    sessions: Mutex<HashMap<u64, Session>>,
    ports: Mutex<(u16, u16)>,
    limits: Mutex<RelayLimits>,
    outcomes: Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>,
    /// Bytes forwarded by the relay.
    pub relay_bytes: AtomicU64,
    /// Datagrams the relay dropped: over the rate, from an unbound address, unknown
    /// session.
    pub relay_dropped: AtomicU64,
    /// The same, by reason (indexed like [`Refusal::ALL`]).
    refused: [AtomicU64; 5],
    /// The relay's overall bandwidth (`None` until the first datagram).
    total: Mutex<Option<Bucket>>,
}

impl Registry {
    /// The route clients should take to `peer`'s daemon.
    pub fn route(&self, peer: PeerId) -> Route {
        self.reach(peer).map_or(Route::Direct, |(r, _)| r.route())
    }

    /// How `peer`'s daemon is reached and the address the server sees it at, while its
    /// hello connection lives.
    pub fn reach(&self, peer: PeerId) -> Option<(Reach, SocketAddr)> {
        let d = self.daemons.lock().expect("not poisoned");
        d.get(&peer)
            .filter(|e| e.conn.close_reason().is_none())
            .map(|e| (e.reach(), e.mapped.unwrap_or(e.public)))
    }

    /// The protocol `peer`'s router mapped its port with, once the mapping is checked.
    pub fn mapped_by(&self, peer: PeerId) -> Option<Method> {
        let d = self.daemons.lock().expect("not poisoned");
        d.get(&peer)
            .filter(|e| e.conn.close_reason().is_none() && e.mapped.is_some())
            .and_then(|e| e.mapped_by)
    }

    /// Where clients connect to `peer`'s daemon when its router mapped a port for it.
    pub fn mapped(&self, peer: PeerId) -> Option<SocketAddr> {
        let d = self.daemons.lock().expect("not poisoned");
        d.get(&peer)
            .filter(|e| e.conn.close_reason().is_none())
            .and_then(|e| e.mapped)
    }

    /// Make `client` reach `peer` (at `addr`) over its daemon's hello connection, when it
    /// has one that is not public: the server's status checks and audits then work behind
    /// NAT too.
    pub fn route_checks(&self, client: &PeerClient, peer: PeerId, addr: PeerAddr) {
        let d = self.daemons.lock().expect("not poisoned");
        if let Some(e) = d.get(&peer) {
            if e.reach() != Reach::Public && e.conn.close_reason().is_none() {
                client.adopt(addr, e.conn.clone());
            }
        }
    }

    fn count(&self, what: &'static str, outcome: &'static str) {
        *self
            .outcomes
            .lock()
            .expect("not poisoned")
            .entry((what, outcome))
            .or_default() += 1;
    }

    /// How many requests of `what` (hello, punch, relay) ended with `outcome`.
    pub fn outcomes(&self, what: &str, outcome: &str) -> u64 {
        self.outcomes
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|((w, o), _)| *w == what && *o == outcome)
            .map(|(_, n)| *n)
            .sum()
    }

    /// What `/metrics` shows of the rendezvous and the relay, read now.
    pub fn figures(&self) -> Figures {
        let mut reach: HashMap<&'static str, u64> = HashMap::new();
        for e in self.daemons.lock().expect("not poisoned").values() {
            if e.conn.close_reason().is_none() {
                *reach.entry(e.reach().as_str()).or_default() += 1;
            }
        }
        Figures {
            reach: ["public", "mapped", "punch", "relay"]
                .map(|r| (r, reach.get(r).copied().unwrap_or(0))),
            outcomes: self
                .outcomes
                .lock()
                .expect("not poisoned")
                .iter()
                .map(|(k, n)| (*k, *n))
                .collect(),
            sessions: self.sessions.lock().expect("not poisoned").len() as u64,
            relay_bytes: self.relay_bytes.load(Ordering::Relaxed),
            relay_dropped: self.relay_dropped.load(Ordering::Relaxed),
            refused: std::array::from_fn(|i| {
                (
                    Refusal::ALL[i].as_str(),
                    self.refused[i].load(Ordering::Relaxed),
                )
            }),
        }
    }

    /// Count a dropped datagram.
    fn refuse(&self, why: Refusal) {
        self.relay_dropped.fetch_add(1, Ordering::Relaxed);
        let i = Refusal::ALL.iter().position(|r| *r == why).expect("listed");
        self.refused[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `n` bytes of `s`'s may pass now: within the session's rate and the
    /// relay's overall one (both checked before either is charged, so a datagram the
    /// overall cap refuses costs the session nothing).
    fn admit(
        &self,
        s: &mut Session,
        n: usize,
        now: Instant,
        limits: &RelayLimits,
    ) -> Result<(), Refusal> {
        if !s.bucket.fits(n, limits.rate, now) {
            return Err(Refusal::SessionRate);
        }
        let mut total = self.total.lock().expect("not poisoned");
        let total = total.get_or_insert_with(|| Bucket::full(limits.total_rate, now));
        if !total.fits(n, limits.total_rate, now) {
            return Err(Refusal::TotalRate);
        }
        s.bucket.take(n);
        total.take(n);
        Ok(())
    }

    fn open_session(&self, requester: PeerId, target: PeerId) -> Result<RelayGrant, Status> {
        let (port, limits) = (
            self.ports.lock().expect("not poisoned").1,
            *self.limits.lock().expect("not poisoned"),
        );
        if port == 0 || limits.sessions == 0 {
            return Err(Status::Unavailable);
        }
        let mut s = self.sessions.lock().expect("not poisoned");
        let now = Instant::now();
        s.retain(|_, x| !expired(x, now, &limits));
        let mine = s.values().filter(|x| x.requester == requester).count();
        if s.len() >= limits.sessions || mine >= SESSIONS_PER_REQUESTER {
            return Err(Status::Busy);
        }
        let grant = RelayGrant::random(port).map_err(|_| Status::Unavailable)?;
        s.insert(
            grant.session,
            Session {
                grant: grant.clone(),
                requester,
                target,
                sides: [None, None],
                created: now,
                last: now,
                bucket: Bucket::full(limits.rate, now),
            },
        );
        Ok(grant)
    }
}

fn expired(s: &Session, now: Instant, limits: &RelayLimits) -> bool {
    let bound = s.sides.iter().all(Option::is_some);
    now.duration_since(s.created) > limits.max_age
        || (!bound && now.duration_since(s.created) > UNBOUND_TTL)
        || now.duration_since(s.last) > IDLE_TTL
}

/// Where the rendezvous listens.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// The main endpoint (same port number as HTTPS, over UDP).
    pub main: SocketAddr,
    /// The probe endpoint.
    pub probe: SocketAddr,
    /// The relay socket (None: no relay).
    pub relay: Option<SocketAddr>,
}

/// Bind the rendezvous endpoints and the relay next to the HTTPS address `at`, and serve
/// them on the current runtime.
pub fn start(st: Arc<State>, at: SocketAddr, limits: RelayLimits) -> std::io::Result<Ports> {
    let crypto = st
        .cert
        .server_config(&[rv::ALPN])
        .map_err(std::io::Error::other)?;
    let crypto = QuicServerConfig::try_from(crypto).map_err(std::io::Error::other)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(0u8.into());
    t.max_concurrent_bidi_streams(STREAMS_PER_CONNECTION.into());
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(60)).expect("fits"),
    ));
    server.transport_config(Arc::new(t));
    let main = Endpoint::server(server.clone(), at)?;
    let probe = Endpoint::server(server, SocketAddr::new(at.ip(), limits.probe_port))?;
    let relay = if limits.sessions > 0 {
        let s = std::net::UdpSocket::bind(SocketAddr::new(at.ip(), limits.port))?;
        s.set_nonblocking(true)?;
        Some(UdpSocket::from_std(s)?)
    } else {
        None
    };
    let ports = Ports {
        main: main.local_addr()?,
        probe: probe.local_addr()?,
        relay: relay.as_ref().map(|r| r.local_addr()).transpose()?,
    };
    *st.rendezvous.ports.lock().expect("not poisoned") =
        (ports.probe.port(), ports.relay.map_or(0, |r| r.port()));
    *st.rendezvous.limits.lock().expect("not poisoned") = limits;
    let live = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(accept(st.clone(), main, true, live.clone()));
    tokio::spawn(accept(st.clone(), probe, false, live));
    if let Some(r) = relay {
        tokio::spawn(relay_loop(st, r));
    }
    Ok(ports)
}

async fn accept(st: Arc<State>, ep: Endpoint, main: bool, live: Arc<tokio::sync::Semaphore>) {
    while let Some(incoming) = ep.accept().await {
        let Ok(slot) = live.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let st = st.clone();
        tokio::spawn(async move {
            let Ok(Ok(conn)) = tokio::time::timeout(READ_TIMEOUT, incoming).await else {
                return;
            };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(request(st.clone(), conn.clone(), main, send, recv));
            }
            drop(slot);
        });
    }
}

async fn request(
    st: Arc<State>,
    conn: Connection,
    main: bool,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let msg = match tokio::time::timeout(READ_TIMEOUT, recv.read_to_end(rv::MAX_REQUEST)).await {
        Ok(Ok(m)) => m,
        _ => return,
    };
    let reply = match answer(&st, &conn, main, &msg).await {
        Ok(payload) => rv::reply(Status::Ok, 0, &payload),
        Err((status, detail)) => rv::reply(status, detail, &[]),
    };
    let _ = tokio::time::timeout(READ_TIMEOUT, send.write_all(&reply)).await;
    let _ = send.finish();
}

type Refused = (Status, u8);

/// Check a signed request's authentication: a registered peer, kind Rendezvous, fresh.
/// On the blocking pool: the check reads and advances counters in the database.
async fn authenticate(st: &Arc<State>, rest: &[u8]) -> Result<(PeerId, Vec<u8>), Refused> {
    let (st, rest) = (st.clone(), rest.to_vec());
    tokio::task::spawn_blocking(move || authenticate_now(&st, &rest))
        .await
        .map_err(|_| (Status::Unavailable, 0))?
}

fn authenticate_now(st: &State, rest: &[u8]) -> Result<(PeerId, Vec<u8>), Refused> {
    let (auth, body) = rv::split_signed(rest).map_err(|_| (Status::Malformed, 0))?;
    let checked = st.verify_control(&auth, MessageKind::Rendezvous, body);
    match checked.map_err(|e| {
        tracing::warn!("checking a rendezvous request: {e}");
        (Status::Unavailable, 0)
    })? {
        Ok(()) => {}
        Err(peerstash::control::ControlError::UnknownPeer(_)) => {
            return Err((Status::UnknownPeer, 0))
        }
        Err(e) => return Err((Status::BadControl, ControlReason::from(&e) as u8)),
    }
    Ok((auth.peer, body.to_vec()))
}

async fn answer(
    st: &Arc<State>,
    conn: &Connection,
    main: bool,
    msg: &[u8],
) -> Result<Vec<u8>, Refused> {
    let (&code, rest) = msg.split_first().ok_or((Status::Malformed, 0))?;
    let reg = &st.rendezvous;
    match code {
        op::WHOAMI if rest.is_empty() => {
            let mut p = Vec::new();
            rv::encode_addr(conn.remote_address(), &mut p);
            let (probe, relay) = *reg.ports.lock().expect("not poisoned");
            p.extend_from_slice(&probe.to_be_bytes());
            p.extend_from_slice(&relay.to_be_bytes());
            Ok(p)
        }
        op::HELLO if main => {
            let r = authenticate(st, rest).await;
            let (peer, body) = r.inspect_err(|e| reg.count("hello", e.0.as_str()))?;
            let (&b, rest) = body.split_first().ok_or((Status::Malformed, 0))?;
            let reach = Reach::from_u8(b)
                .filter(|r| *r != Reach::Mapped)
                .ok_or((Status::Malformed, 0))?;
            // The mapping, then (from newer daemons) the protocol that made it.
            let mapping = match rest {
                [] => None,
                r => match rv::decode_addr(r) {
                    Ok((a, n)) if n == r.len() => Some((a, None)),
                    Ok((a, n)) if n + 1 == r.len() => match Method::from_u8(r[n]) {
                        Some(m) => Some((a, Some(m))),
                        None => return Err((Status::Malformed, 0)),
                    },
                    _ => return Err((Status::Malformed, 0)),
                },
            };
            let public = conn.remote_address();
            let old = reg.daemons.lock().expect("not poisoned").insert(
                peer,
                Entry {
                    conn: conn.clone(),
                    reach,
                    public,
                    mapped: None,
                    mapped_by: mapping.and_then(|m| m.1),
                },
            );
            if let Some((m, _)) = mapping {
                tokio::spawn(check_mapping(st.clone(), peer, conn.stable_id(), m));
            }
            if let Some(old) = old {
                if old.conn.stable_id() != conn.stable_id() {
                    old.conn.close(0u32.into(), b"replaced");
                }
            }
            tracing::info!(peer = %peer, reach = reach.as_str(), %public, "daemon reachable through the rendezvous");
            reg.count("hello", "ok");
            Ok(Vec::new())
        }
        op::CONNECT if main => {
            let (requester, body) = authenticate(st, rest).await?;
            if body.len() != 9 {
                return Err((Status::Malformed, 0));
            }
            let target = PeerId(u64::from_be_bytes(body[..8].try_into().expect("8 bytes")));
            let mode = match body[8] {
                1 => Mode::Punch,
                2 => Mode::Relay,
                _ => return Err((Status::Malformed, 0)),
            };
            let what = if mode == Mode::Punch {
                "punch"
            } else {
                "relay"
            };
            let r = connect(st, conn, requester, target, mode).await;
            reg.count(what, r.as_ref().map_or_else(|e| e.0.as_str(), |_| "ok"));
            r
        }
        _ => Err((Status::Malformed, 0)),
    }
}

/// Arrange a connection from `requester` (at `conn`'s remote address) to `target`.
async fn connect(
    st: &Arc<State>,
    conn: &Connection,
    requester: PeerId,
    target: PeerId,
    mode: Mode,
) -> Result<Vec<u8>, Refused> {
    let reg = &st.rendezvous;
    let (daemon, public) = {
        let d = reg.daemons.lock().expect("not poisoned");
        let e = d
            .get(&target)
            .filter(|e| e.conn.close_reason().is_none())
            .ok_or((Status::NotConnected, 0))?;
        (e.conn.clone(), e.public)
    };
    let key = st.key_of(target).ok_or((Status::UnknownPeer, 0))?;
    let signer = ControlSigner::new(target, &key, Direction::ServerToPeer);
    let (order, payload) = match mode {
        Mode::Punch => {
            let mut body = Vec::new();
            rv::encode_addr(conn.remote_address(), &mut body);
            let mut payload = Vec::new();
            rv::encode_addr(public, &mut payload);
            (
                rv::signed(op::PUNCH, &signer, MessageKind::RendezvousOrder, &body),
                payload,
            )
        }
        Mode::Relay => {
            let grant = reg.open_session(requester, target).map_err(|s| (s, 0))?;
            let body = grant.encode();
            (
                rv::signed(op::RELAY, &signer, MessageKind::RendezvousOrder, &body),
                body,
            )
        }
    };
    // Answer only once the daemon has acted: its punch packets are on their way (or its
    // relay proxy has sent its BIND) before the client sends its first packet.
    match rv::request(&daemon, &order, ORDER_TIMEOUT).await {
        Ok(_) => Ok(payload),
        Err(e) => {
            tracing::info!(%target, error = %e, "a daemon did not take a rendezvous order");
            Err((Status::NoAnswer, 0))
        }
    }
}

/// Forward relay datagrams between the two bound sides of each session.
async fn relay_loop(st: Arc<State>, sock: UdpSocket) {
    let reg = &st.rendezvous;
    let mut buf = vec![0u8; DATA_HEADER + MAX_RELAY_PAYLOAD + 1];
    let mut last_prune = Instant::now();
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors from a vanished side surface here on Linux: keep going.
                tracing::debug!(error = %e, "relay receive");
                continue;
            }
        };
        let now = Instant::now();
        let limits = *reg.limits.lock().expect("not poisoned");
        if now.duration_since(last_prune) > Duration::from_secs(1) {
            last_prune = now;
            reg.sessions
                .lock()
                .expect("not poisoned")
                .retain(|_, s| !expired(s, now, &limits));
        }
        let d = &buf[..n];
        if n < DATA_HEADER {
            reg.refuse(Refusal::Unknown);
            continue;
        }
        let id = u64::from_be_bytes(d[1..9].try_into().expect("8 bytes"));
        let send_to = {
            let mut sessions = reg.sessions.lock().expect("not poisoned");
            let Some(s) = sessions.get_mut(&id) else {
                reg.refuse(Refusal::Unknown);
                continue;
            };
            match d[0] {
                relay_op::BIND if n == BIND_LEN => {
                    let role = d[9];
                    if !(role == rv::ROLE_CLIENT || role == rv::ROLE_DAEMON)
                        || !rv::bind_mac_ok(&s.grant.secret, id, role, &d[10..])
                    {
                        reg.refuse(Refusal::BadBind);
                        continue;
                    }
                    let side = &mut s.sides[role as usize - 1];
                    // The first proof binds a side; a replayed BIND from elsewhere
                    // cannot move it.
                    if side.is_some_and(|a| a != src) {
                        reg.refuse(Refusal::BadBind);
                        continue;
                    }
                    *side = Some(src);
                    s.last = now;
                    if s.sides.iter().all(Option::is_some) {
                        tracing::debug!(requester = %s.requester, target = %s.target, "relay session joined");
                    }
                    let mut bound = [0u8; 10];
                    bound[0] = relay_op::BOUND;
                    bound[1..9].copy_from_slice(&id.to_be_bytes());
                    bound[9] = role;
                    let _ = sock.try_send_to(&bound, src);
                    continue;
                }
                relay_op::DATA if n > DATA_HEADER && n <= DATA_HEADER + MAX_RELAY_PAYLOAD => {
                    let other = match s.sides {
                        [Some(c), Some(t)] if c == src => t,
                        [Some(c), Some(t)] if t == src => c,
                        _ => {
                            reg.refuse(Refusal::Unbound);
                            continue;
                        }
                    };
                    s.last = now;
                    if let Err(why) = reg.admit(s, n, now, &limits) {
                        reg.refuse(why);
                        continue;
                    }
                    other
                }
                _ => {
                    reg.refuse(Refusal::Unknown);
                    continue;
                }
            }
        };
        match sock.send_to(d, send_to).await {
            Ok(_) => {
                reg.relay_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(error = %e, "relay send"),
        }
    }
}

/// Reach a daemon at the port mapping it announced, over a fresh connection pinned to
/// its certificate, with a signed status check: only a mapping that works (and leads to
/// that daemon, not to whatever address it named) makes clients connect there.
async fn check_mapping(st: Arc<State>, peer: PeerId, conn_id: usize, at: SocketAddr) {
    let st2 = st.clone();
    let record =
        tokio::task::spawn_blocking(move || st2.store.lock().expect("not poisoned").peer(peer))
            .await;
    let (Ok(Ok(Some(record))), Some(key)) = (record, st.key_of(peer)) else {
        return;
    };
    let auth = ControlSigner::new(peer, &key, Direction::ServerToPeer).sign(
        MessageKind::StatusCheck,
        b"",
        now_ms(),
    );
    let checked = match PeerClient::new() {
        Ok(c) => {
            let c = c
                .with_connect_timeout(MAPPING_CHECK_TIMEOUT)
                .with_timeout(MAPPING_CHECK_TIMEOUT);
            let r = c
                .status_check(&PeerAddr::direct(at, record.fingerprint), &auth)
                .await;
            c.close();
            r
        }
        Err(e) => Err(e),
    };
    let reg = &st.rendezvous;
    match checked {
        Ok(_) => {
            let mut d = reg.daemons.lock().expect("not poisoned");
            if let Some(e) = d.get_mut(&peer).filter(|e| e.conn.stable_id() == conn_id) {
                e.mapped = Some(at);
                tracing::info!(peer = %peer, %at, "daemon reachable at its router's port mapping");
            }
            reg.count("mapping", "ok");
        }
        Err(e) => {
            tracing::info!(peer = %peer, %at, error = %e, "a port mapping did not lead to the daemon");
            reg.count("mapping", "unreachable");
        }
    }
}

/// How long the server tries to reach a daemon through its port mapping.
const MAPPING_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The rendezvous's and the relay's figures at one scrape of `/metrics`.
#[derive(Debug)]
pub struct Figures {
    reach: [(&'static str, u64); 4],
    outcomes: Vec<((&'static str, &'static str), u64)>,
    sessions: u64,
    relay_bytes: u64,
    relay_dropped: u64,
    refused: [(&'static str, u64); 5],
}

impl prometheus_client::collector::Collector for Figures {
    fn encode(
        &self,
        mut e: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use crate::metrics::{counter, gauge, series};
        use prometheus_client::metrics::MetricType::{Counter, Gauge};
        let e = &mut e;
        series(
            e,
            "peerstash_peers_reachable",
            "Daemons with a live rendezvous connection, by how they are reached.",
            Gauge,
            self.reach.map(|(r, n)| ([("reach", r)], n)),
        )?;
        series(
            e,
            "peerstash_rendezvous",
            "Rendezvous requests, by kind and outcome.",
            Counter,
            self.outcomes
                .iter()
                .map(|((what, outcome), n)| ([("kind", *what), ("outcome", *outcome)], *n)),
        )?;
        gauge(
            e,
            "peerstash_relay_sessions",
            "Relay sessions open.",
            self.sessions,
        )?;
        counter(
            e,
            "peerstash_relay_bytes",
            "Bytes the relay forwarded (end-to-end encrypted QUIC datagrams).",
            self.relay_bytes,
        )?;
        counter(
            e,
            "peerstash_relay_dropped",
            "Datagrams the relay dropped (over the rate, unbound sender, unknown session).",
            self.relay_dropped,
        )?;
        series(
            e,
            "peerstash_relay_refused",
            "Datagrams the relay dropped, by reason.",
            Counter,
            self.refused.map(|(r, n)| ([("reason", r)], n)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(now: Instant, limits: &RelayLimits) -> Session {
        Session {
            grant: RelayGrant::random(1).unwrap(),
            requester: PeerId(1),
            target: PeerId(2),
            sides: [None, None],
            created: now,
            last: now,
            bucket: Bucket::full(limits.rate, now),
        }
    }

    /// Ten sessions each offering their full rate for ten simulated seconds: together
    /// they pass no more than the overall cap allows (one second's burst plus the rate
    /// over the time), the cap is used, and what it refuses is counted by reason.
    #[test]
    fn the_overall_relay_rate_holds_across_sessions() {
        let limits = RelayLimits {
            rate: 100_000,
            total_rate: 300_000,
            ..Default::default()
        };
        let reg = Registry::default();
        let start = Instant::now();
        let mut sessions: Vec<Session> = (0..10).map(|_| session(start, &limits)).collect();
        let (mut passed, mut refused) = (0u64, 0u64);
        // 1000-byte datagrams every millisecond from each session: 1 MB/s each.
        for ms in 0..10_000u64 {
            let now = start + Duration::from_millis(ms);
            for s in &mut sessions {
                match reg.admit(s, 1000, now, &limits) {
                    Ok(()) => passed += 1000,
                    Err(why) => {
                        reg.refuse(why);
                        refused += 1
                    }
                }
            }
        }
        let cap = limits.total_rate * 11;
        assert!(passed <= cap, "{passed} bytes passed, cap {cap}");
        assert!(
            passed >= limits.total_rate * 9,
            "the cap starved the relay: {passed}"
        );
        let m = crate::metrics::Metrics::new().render(Default::default(), reg.figures());
        assert!(
            m.contains(&format!("peerstash_relay_dropped_total {refused}")),
            "{m}"
        );
        let total_refusals = m
            .lines()
            .find_map(|l| l.strip_prefix("peerstash_relay_refused_total{reason=\"total_rate\"} "))
            .unwrap();
        assert!(total_refusals.parse::<u64>().unwrap() > 0, "{m}");

        // With no overall cap, the sessions' own rates are the limit.
        let unlimited = RelayLimits {
            total_rate: 0,
            ..limits
        };
        let reg = Registry::default();
        let mut sessions: Vec<Session> = (0..10).map(|_| session(start, &unlimited)).collect();
        let mut passed = 0u64;
        for ms in 0..10_000u64 {
            let now = start + Duration::from_millis(ms);
            for s in &mut sessions {
                if reg.admit(s, 1000, now, &unlimited).is_ok() {
                    passed += 1000;
                }
            }
        }
        assert!(passed > cap, "{passed}");
        assert!(passed <= 10 * unlimited.rate * 11, "{passed}");
    }
}
