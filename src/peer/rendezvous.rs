//! Peers behind NAT: the rendezvous protocol spoken with the coordination server over
//! QUIC, and the relay datagrams (see `docs/PROTOCOL.md`, "Peers behind NAT").
//!
//! The server listens for QUIC on the UDP port of its HTTPS address (ALPN [`ALPN`], its
//! own pinned certificate). A storage daemon connects *from its daemon socket*, so the
//! address the server sees is the public side of the very UDP mapping other peers must
//! use; a second connection to the server's probe port tells whether the NAT keeps that
//! mapping for every destination (hole punching works) or picks a new port per
//! destination (only a relay works). The daemon then says hello (signed with its
//! transaction key) and keeps the connection open: the server sends it punch and relay
//! orders on it. A client that must reach a peer behind NAT asks the server on the same
//! kind of connection, from the socket it will connect from.
//!
//! ```text
//! request (client-opened bidirectional stream; reply, then both sides finish)
//!   0x01 WHOAMI                                       -> addr | probe_port u16 | relay_port u16
//!   0x02 HELLO    auth [68] | reach u8 [| addr]       -> (nothing)   (addr: a port
//!                                                        mapping the router made)
//!   0x03 CONNECT  auth [68] | target u64 | mode u8    -> punch: addr   relay: grant
//! order (server-opened stream on a daemon's hello connection)
//!   0x11 PUNCH    auth [68] | addr                    -> (nothing)
//!   0x12 RELAY    auth [68] | grant                   -> (nothing)
//! reply   = status u8 | detail u8 | payload           (status 0: ok)
//! addr    = family u8 (4 | 6) | ip [4 | 16] | port u16
//! grant   = relay_port u16 | session u64 | secret [32]
//! ```
//!
//! Relay datagrams (plain UDP to the server's relay port, from each side's relay proxy):
//!
//! ```text
//!   0x01 BIND   session u64 | role u8 (1 client, 2 daemon) | mac [32]
//!               mac = HMAC-SHA256(secret, "peerstash relay bind v1" | session | role)
//!   0x02 BOUND  session u64 | role u8                 (relay -> proxy)
//!   0x03 DATA   session u64 | payload [1..=MAX_RELAY_PAYLOAD]   (a QUIC datagram)
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, TransportConfig};
use sha2::Sha256;
use tokio::net::UdpSocket;

use crate::api::Route;
use crate::control::{now_ms, ControlAuth, ControlSigner, Direction, MessageKind, AUTH_LEN};
use crate::ids::{Fingerprint, PeerId};
use crate::keys::TransactionKey;
use crate::tls::pinned_client_config;

/// ALPN of the rendezvous protocol.
pub const ALPN: &[u8] = b"peerstash-rendezvous/1";
/// TLS server name used when dialling (the certificate is pinned, the name unused).
pub const SERVER_NAME: &str = "rendezvous.peerstash";

/// Request and order codes.
pub mod op {
    /// Which address does the server see this connection from.
    pub const WHOAMI: u8 = 0x01;
    /// A daemon announces its reachability; the connection becomes its order channel.
    pub const HELLO: u8 = 0x02;
    /// A client asks to reach a peer (punch or relay).
    pub const CONNECT: u8 = 0x03;
    /// Server → daemon: send packets towards this client address now.
    pub const PUNCH: u8 = 0x11;
    /// Server → daemon: join this relay session.
    pub const RELAY: u8 = 0x12;
}

/// Largest request or order on a stream (an IPv6 address order: 1 + 68 + 19).
pub const MAX_REQUEST: usize = 1 + AUTH_LEN + 64;
/// Largest reply.
pub const MAX_REPLY: usize = 64;
/// Largest QUIC datagram a relay carries (a 1500-byte link minus IP, UDP and the 9-byte
/// DATA header, with room for an IPv6 header).
pub const MAX_RELAY_PAYLOAD: usize = 1452;
/// Length of a BIND datagram.
pub const BIND_LEN: usize = 42;
/// Length of the relay DATA header.
pub const DATA_HEADER: usize = 9;
/// Relay datagram kinds.
pub mod relay_op {
    /// A proxy claims its side of a session.
    pub const BIND: u8 = 0x01;
    /// The relay took the claim.
    pub const BOUND: u8 = 0x02;
    /// A QUIC datagram for the other side.
    pub const DATA: u8 = 0x03;
}

/// How a storage daemon can be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reach {
    /// The server sees it at the address it listens on: no NAT in between.
    Public = 1,
    /// Behind a NAT that maps its socket to one public port for every destination: a
    /// simultaneous connect (hole punching) gets through.
    Punch = 2,
    /// Behind a NAT that picks a new public port per destination (symmetric): only a
    /// relay gets through.
    Relay = 3,
    /// Behind a router that mapped a port for it (NAT-PMP), checked by the server: reached
    /// directly at the mapped address. Never sent in a HELLO's reach byte (a HELLO names
    /// the mapping after it).
    Mapped = 4,
}

impl Reach {
    /// Parse the wire code.
    pub fn from_u8(v: u8) -> Option<Reach> {
        match v {
            1 => Some(Reach::Public),
            2 => Some(Reach::Punch),
            3 => Some(Reach::Relay),
            _ => None,
        }
    }

    /// The name `status` and the API use.
    pub fn as_str(self) -> &'static str {
        match self {
            Reach::Public => "public",
            Reach::Punch => "punch",
            Reach::Relay => "relay",
            Reach::Mapped => "mapped",
        }
    }

    /// The route clients are told to take.
    pub fn route(self) -> Route {
        match self {
            Reach::Public => Route::Direct,
            Reach::Punch => Route::Punch,
            Reach::Relay => Route::Relay,
            Reach::Mapped => Route::Direct,
        }
    }

    /// Classify from what the server saw: the daemon's main connection from `observed`,
    /// its probe connection (same socket, another server port) from `probe`; `local` is
    /// the address the daemon is bound to, `advertised` the one it announces, and
    /// `own_ip` whether the observed IP is one of this host's (a daemon bound to
    /// `0.0.0.0` on a public host).
    pub fn classify(
        observed: SocketAddr,
        probe: SocketAddr,
        local: SocketAddr,
        advertised: Option<SocketAddr>,
        own_ip: bool,
    ) -> Reach {
        if observed == local
            || Some(observed) == advertised
            || (own_ip && observed.port() == local.port())
        {
            Reach::Public
        } else if observed == probe {
            Reach::Punch
        } else {
            Reach::Relay
        }
    }
}

/// Why a rendezvous request was refused (the reply's status byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// The request does not parse.
    Malformed = 1,
    /// Its authentication failed (detail: the control reason code of `wire`).
    BadControl = 2,
    /// The sender is not a registered peer.
    UnknownPeer = 3,
    /// The target has no rendezvous connection now.
    NotConnected = 4,
    /// The target did not take the order in time.
    NoAnswer = 5,
    /// The relay is full, or this requester holds too many sessions.
    Busy = 6,
    /// Not offered here (e.g. no relay).
    Unavailable = 7,
}

impl Status {
    /// Parse the wire code.
    pub fn from_u8(v: u8) -> Option<Status> {
        use Status::*;
        Some(match v {
            0 => Ok,
            1 => Malformed,
            2 => BadControl,
            3 => UnknownPeer,
            4 => NotConnected,
            5 => NoAnswer,
            6 => Busy,
            7 => Unavailable,
            _ => return None,
        })
    }

    /// A short stable name.
    pub fn as_str(self) -> &'static str {
        use Status::*;
        match self {
            Ok => "ok",
            Malformed => "malformed",
            BadControl => "bad_control",
            UnknownPeer => "unknown_peer",
            NotConnected => "not_connected",
            NoAnswer => "no_answer",
            Busy => "busy",
            Unavailable => "unavailable",
        }
    }
}

/// Why reaching a peer through the rendezvous failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatError {
    /// The server could not be reached over QUIC.
    #[error("rendezvous server unreachable: {0}")]
    Connect(String),
    /// The connection or stream broke.
    #[error("rendezvous connection broke: {0}")]
    Broken(String),
    /// The server refused (see [`Status`]).
    #[error("rendezvous refused: {} (detail {detail})", status.as_str())]
    Refused {
        /// Why.
        status: Status,
        /// Extra code (the control reason for `BadControl`).
        detail: u8,
    },
    /// A reply that does not parse.
    #[error("malformed rendezvous message: {0}")]
    Malformed(&'static str),
    /// A local socket could not be set up.
    #[error("relay proxy: {0}")]
    Io(String),
}

/// A relay session both sides join: where, which, and the secret that proves it.
#[derive(Clone, PartialEq, Eq)]
pub struct RelayGrant {
    /// The relay's UDP port on the server's host.
    pub port: u16,
    /// The session id.
    pub session: u64,
    /// The session secret (sent only over pinned TLS to the two sides).
    pub secret: [u8; 32],
}

impl std::fmt::Debug for RelayGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RelayGrant(port {}, session {:x})",
            self.port, self.session
        )
    }
}

/// Length of an encoded grant.
pub const GRANT_LEN: usize = 42;

impl RelayGrant {
    /// A fresh session with a random id and secret.
    pub fn random(port: u16) -> Result<RelayGrant, crate::keys::KeyError> {
        let mut secret = [0u8; 32];
        crate::keys::random_bytes(&mut secret)?;
        Ok(RelayGrant {
            port,
            session: crate::keys::random_u64()?,
            secret,
        })
    }

    /// `relay_port u16 | session u64 | secret [32]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(GRANT_LEN);
        b.extend_from_slice(&self.port.to_be_bytes());
        b.extend_from_slice(&self.session.to_be_bytes());
        b.extend_from_slice(&self.secret);
        b
    }

    /// Parse exactly [`GRANT_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Result<RelayGrant, NatError> {
        if b.len() != GRANT_LEN {
            return Err(NatError::Malformed("relay grant length"));
        }
        Ok(RelayGrant {
            port: u16::from_be_bytes([b[0], b[1]]),
            session: u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")),
            secret: b[10..42].try_into().expect("32 bytes"),
        })
    }

    /// The BIND datagram for `role` (1 client, 2 daemon).
    pub fn bind_datagram(&self, role: u8) -> [u8; BIND_LEN] {
        let mut d = [0u8; BIND_LEN];
        d[0] = relay_op::BIND;
        d[1..9].copy_from_slice(&self.session.to_be_bytes());
        d[9] = role;
        d[10..].copy_from_slice(&bind_mac(&self.secret, self.session, role));
        d
    }
}

/// The MAC of a BIND: HMAC-SHA256(secret, "peerstash relay bind v1" | session | role).
pub fn bind_mac(secret: &[u8; 32], session: u64, role: u8) -> [u8; 32] {
    bind_hmac(secret, session, role)
        .finalize()
        .into_bytes()
        .into()
}

fn bind_hmac(secret: &[u8; 32], session: u64, role: u8) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("any key length");
    m.update(b"peerstash relay bind v1");
    m.update(&session.to_be_bytes());
    m.update(&[role]);
    m
}

/// Check a BIND's MAC in constant time.
pub fn bind_mac_ok(secret: &[u8; 32], session: u64, role: u8, mac: &[u8]) -> bool {
    bind_hmac(secret, session, role).verify_slice(mac).is_ok()
}

/// Role byte of the side that connects (the client).
pub const ROLE_CLIENT: u8 = 1;
/// Role byte of the side that accepts (the storage daemon).
pub const ROLE_DAEMON: u8 = 2;

/// `family u8 | ip | port u16`.
pub fn encode_addr(a: SocketAddr, out: &mut Vec<u8>) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

/// Parse an address at the start of `b`; returns it and the bytes used.
pub fn decode_addr(b: &[u8]) -> Result<(SocketAddr, usize), NatError> {
    let bad = NatError::Malformed("address");
    let (ip, n): (IpAddr, usize) = match b.first() {
        Some(4) if b.len() >= 7 => {
            let o: [u8; 4] = b[1..5].try_into().expect("4 bytes");
            (Ipv4Addr::from(o).into(), 5)
        }
        Some(6) if b.len() >= 19 => {
            let o: [u8; 16] = b[1..17].try_into().expect("16 bytes");
            (Ipv6Addr::from(o).into(), 17)
        }
        _ => return Err(bad),
    };
    let port = u16::from_be_bytes([b[n], b[n + 1]]);
    if port == 0 {
        return Err(bad);
    }
    Ok((SocketAddr::new(ip, port), n + 2))
}

/// A reply: `status | detail | payload`.
pub fn reply(status: Status, detail: u8, payload: &[u8]) -> Vec<u8> {
    let mut r = vec![status as u8, detail];
    r.extend_from_slice(payload);
    r
}

/// Split a reply into its payload, or the refusal it carries.
pub fn parse_reply(r: &[u8]) -> Result<&[u8], NatError> {
    if r.len() < 2 {
        return Err(NatError::Malformed("short reply"));
    }
    match Status::from_u8(r[0]) {
        Some(Status::Ok) => Ok(&r[2..]),
        Some(status) => Err(NatError::Refused {
            status,
            detail: r[1],
        }),
        None => Err(NatError::Malformed("reply status")),
    }
}

/// A signed request or order: `op | auth | body`.
pub fn signed(op: u8, signer: &ControlSigner, kind: MessageKind, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(1 + AUTH_LEN + body.len());
    m.push(op);
    m.extend_from_slice(&signer.sign(kind, body, now_ms()).encode());
    m.extend_from_slice(body);
    m
}

/// Split a signed message (after its op byte) into its authentication and body.
pub fn split_signed(b: &[u8]) -> Result<(ControlAuth, &[u8]), NatError> {
    if b.len() < AUTH_LEN {
        return Err(NatError::Malformed("short signed message"));
    }
    let auth = ControlAuth::decode(&b[..AUTH_LEN])
        .map_err(|_| NatError::Malformed("authentication block"))?;
    Ok((auth, &b[AUTH_LEN..]))
}

/// The QUIC client configuration for a rendezvous server pinned to `fingerprint`.
pub fn client_config(
    fingerprint: Fingerprint,
    keep_alive: Duration,
) -> Result<quinn::ClientConfig, NatError> {
    let tls =
        pinned_client_config(fingerprint, &[ALPN]).map_err(|e| NatError::Connect(e.to_string()))?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| NatError::Connect(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = TransportConfig::default();
    t.max_concurrent_uni_streams(0u8.into());
    // Keep-alives hold the NAT mapping open between orders (home routers forget a quiet
    // UDP mapping after 30 s or so).
    t.keep_alive_interval(Some(keep_alive));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(keep_alive * 4).expect("a small timeout fits"),
    ));
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

/// Connect `endpoint` to the rendezvous server at `addr`.
pub async fn dial(
    endpoint: &Endpoint,
    addr: SocketAddr,
    fingerprint: Fingerprint,
    keep_alive: Duration,
) -> Result<Connection, NatError> {
    let cfg = client_config(fingerprint, keep_alive)?;
    let connecting = endpoint
        .connect_with(cfg, addr, SERVER_NAME)
        .map_err(|e| NatError::Connect(e.to_string()))?;
    match tokio::time::timeout(Duration::from_secs(10), connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(NatError::Connect(e.to_string())),
        Err(_) => Err(NatError::Connect(format!("{addr}: timed out"))),
    }
}

/// Send one request on its own stream and read the reply's payload (bounded).
pub async fn request(conn: &Connection, req: &[u8], t: Duration) -> Result<Vec<u8>, NatError> {
    let work = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| NatError::Broken(e.to_string()))?;
        send.write_all(req)
            .await
            .map_err(|e| NatError::Broken(e.to_string()))?;
        let _ = send.finish();
        recv.read_to_end(MAX_REPLY)
            .await
            .map_err(|e| NatError::Broken(e.to_string()))
    };
    let r = tokio::time::timeout(t, work)
        .await
        .map_err(|_| NatError::Broken("no reply in time".into()))??;
    parse_reply(&r).map(|p| p.to_vec())
}

/// What WHOAMI answers: the address the server sees, and its probe and relay ports
/// (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// This connection's source as the server sees it.
    pub addr: SocketAddr,
    /// The server's second rendezvous port (mapping test).
    pub probe_port: u16,
    /// The server's relay port.
    pub relay_port: u16,
}

/// Ask the server which address it sees this connection from.
pub async fn whoami(conn: &Connection) -> Result<Seen, NatError> {
    let p = request(conn, &[op::WHOAMI], Duration::from_secs(10)).await?;
    let (addr, n) = decode_addr(&p)?;
    if p.len() != n + 4 {
        return Err(NatError::Malformed("whoami reply length"));
    }
    Ok(Seen {
        addr,
        probe_port: u16::from_be_bytes([p[n], p[n + 1]]),
        relay_port: u16::from_be_bytes([p[n + 2], p[n + 3]]),
    })
}

/// Where the rendezvous server is, and who is asking.
#[derive(Clone)]
pub struct RendezvousConfig {
    /// The server's `host:port` (that of its HTTPS URL; QUIC uses the same UDP port).
    pub server: String,
    /// The other server instances' `host:port`, in the order to try them when `server`
    /// cannot be reached ([`RendezvousConfig::next_instance`]).
    pub others: Vec<String>,
    /// Its certificate fingerprint, pinned.
    pub fingerprint: Fingerprint,
    /// This peer.
    pub peer: PeerId,
    /// This peer's transaction key (signs hello and connect requests).
    pub key: TransactionKey,
}

impl std::fmt::Debug for RendezvousConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RendezvousConfig({} as {})", self.server, self.peer)
    }
}

/// The `host:port` of an `https://host[:port][/...]` URL (port 443 when none is given).
fn host_port(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let hostport = rest.split('/').next()?;
    if hostport.is_empty() {
        return None;
    }
    Some(
        if hostport.rsplit_once(':').is_some_and(|(h, p)| {
            !h.ends_with(':') && p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty()
        }) {
            hostport.to_string()
        } else {
            format!("{hostport}:443")
        },
    )
}

impl RendezvousConfig {
    /// From the server's URL (`https://host:port[/...]`).
    pub fn from_url(
        url: &str,
        fingerprint: Fingerprint,
        peer: PeerId,
        key: TransactionKey,
    ) -> Option<RendezvousConfig> {
        Some(RendezvousConfig {
            server: host_port(url)?,
            others: Vec::new(),
            fingerprint,
            peer,
            key,
        })
    }

    /// The same, with the other instances' URLs to move to when this one's rendezvous
    /// cannot be reached (ones that do not parse, or name the same `host:port`, are left
    /// out).
    pub fn with_others<'a>(mut self, urls: impl IntoIterator<Item = &'a str>) -> RendezvousConfig {
        for hp in urls.into_iter().filter_map(host_port) {
            if hp != self.server && !self.others.contains(&hp) {
                self.others.push(hp);
            }
        }
        self
    }

    /// One configuration per instance (this one first), each without others: a daemon
    /// keeps a hello connection to every instance, and a client asks the others in turn.
    pub fn instances(&self) -> Vec<RendezvousConfig> {
        std::iter::once(&self.server)
            .chain(&self.others)
            .map(|server| RendezvousConfig {
                server: server.clone(),
                others: Vec::new(),
                ..self.clone()
            })
            .collect()
    }

    /// Move to the next instance (round the list): after a failure to reach this one.
    /// False when there is no other.
    pub fn next_instance(&mut self) -> bool {
        if self.others.is_empty() {
            return false;
        }
        let next = self.others.remove(0);
        let failed = std::mem::replace(&mut self.server, next);
        self.others.push(failed);
        true
    }

    /// Resolve the server's address.
    pub async fn resolve(&self) -> Result<SocketAddr, NatError> {
        if let Ok(a) = self.server.parse() {
            return Ok(a);
        }
        tokio::net::lookup_host(&self.server)
            .await
            .map_err(|e| NatError::Connect(format!("{}: {e}", self.server)))?
            .next()
            .ok_or_else(|| NatError::Connect(format!("{}: no address", self.server)))
    }

    /// Resolve the server and dial its rendezvous from `endpoint`, within `limit`.
    async fn dial_within(
        &self,
        endpoint: &Endpoint,
        limit: Duration,
    ) -> Result<(SocketAddr, Connection), NatError> {
        let addr = self.resolve().await?;
        let dialing = dial(endpoint, addr, self.fingerprint, Duration::from_secs(5));
        match tokio::time::timeout(limit, dialing).await {
            Ok(r) => r.map(|c| (addr, c)),
            Err(_) => Err(NatError::Connect(format!("{addr}: timed out"))),
        }
    }

    /// A signer for one request (a fresh channel each: requests may run concurrently).
    pub fn signer(&self) -> ControlSigner {
        ControlSigner::new(self.peer, &self.key, Direction::PeerToServer)
    }
}

/// How a client asks to reach a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Have the peer punch towards us; answer its public address.
    Punch = 1,
    /// Open a relay session.
    Relay = 2,
}

/// The client side: asks the server to arrange a connection to a peer behind NAT, from
/// the socket of the client's own QUIC endpoint.
pub struct RendezvousClient {
    cfg: std::sync::Mutex<RendezvousConfig>,
    conn: tokio::sync::Mutex<Option<(SocketAddr, Connection)>>,
    /// Other instances that could not be reached lately, and when: not asked again for
    /// [`UNREACHABLE_FOR`] (a dead one would cost every `not_connected` a dial timeout).
    unreachable: std::sync::Mutex<HashMap<String, Instant>>,
}

/// How long an instance that could not be reached is left out of the retries.
const UNREACHABLE_FOR: Duration = Duration::from_secs(30);
/// How long a retry waits for another instance's rendezvous to answer the dial.
const OTHER_DIAL_TIMEOUT: Duration = Duration::from_secs(3);

impl std::fmt::Debug for RendezvousClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RendezvousClient({:?})", self.config())
    }
}

/// How long the server may take to arrange a punch or a relay.
const CONNECT_REQUEST_TIMEOUT: Duration = Duration::from_secs(8);

impl RendezvousClient {
    /// A client for `cfg`.
    pub fn new(cfg: RendezvousConfig) -> RendezvousClient {
        RendezvousClient {
            cfg: std::sync::Mutex::new(cfg),
            conn: tokio::sync::Mutex::new(None),
            unreachable: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn config(&self) -> RendezvousConfig {
        self.cfg.lock().expect("not poisoned").clone()
    }

    /// The connection to the rendezvous in use; one that cannot be reached makes the
    /// client move on to the next instance, each tried once.
    async fn connection(&self, endpoint: &Endpoint) -> Result<(SocketAddr, Connection), NatError> {
        let mut slot = self.conn.lock().await;
        if let Some((a, c)) = &*slot {
            if c.close_reason().is_none() {
                return Ok((*a, c.clone()));
            }
        }
        let mut cfg = self.config();
        let mut failed = None;
        for _ in 0..=cfg.others.len() {
            match cfg.dial_within(endpoint, Duration::from_secs(10)).await {
                Ok((addr, c)) => {
                    *self.cfg.lock().expect("not poisoned") = cfg;
                    *slot = Some((addr, c.clone()));
                    return Ok((addr, c));
                }
                Err(e) => {
                    tracing::info!(server = %cfg.server, error = %e, "rendezvous unreachable");
                    failed = Some(e);
                    cfg.next_instance();
                }
            }
        }
        Err(failed.expect("at least one instance was tried"))
    }

    async fn ask(
        &self,
        endpoint: &Endpoint,
        target: PeerId,
        mode: Mode,
    ) -> Result<(SocketAddr, Vec<u8>), NatError> {
        let (server, conn) = self.connection(endpoint).await?;
        let first = self.ask_at(&conn, target, mode).await;
        if !matches!(
            first,
            Err(NatError::Refused {
                status: Status::NotConnected,
                ..
            })
        ) {
            return first.map(|p| (server, p));
        }
        // Each instance's rendezvous knows only the daemons that said hello to it: one
        // that knows fewer instances than we do (or is reconnecting) may be at another.
        // Ask the others once each, from the same endpoint (a punch needs our address).
        // The instance asked first leads the list; the others follow.
        for one in self.config().instances().into_iter().skip(1) {
            let other = &one.server;
            let recently_down = |t: &Instant| t.elapsed() < UNREACHABLE_FOR;
            if self.down().get(other).is_some_and(recently_down) {
                continue;
            }
            // A live instance answers within a few round trips; a dead one is given up on
            // sooner than the usual 10 s dial.
            let Ok((addr, c)) = one.dial_within(endpoint, OTHER_DIAL_TIMEOUT).await else {
                self.down().insert(other.clone(), Instant::now());
                continue;
            };
            self.down().remove(other);
            let r = self.ask_at(&c, target, mode).await;
            c.close(0u32.into(), b"done");
            if let Ok(p) = r {
                tracing::debug!(peer = %target, server = %other, "reached through another instance's rendezvous");
                return Ok((addr, p));
            }
        }
        first.map(|p| (server, p))
    }

    fn down(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.unreachable.lock().expect("not poisoned")
    }

    /// Send a CONNECT for `target` on `conn`; the reply's payload.
    async fn ask_at(
        &self,
        conn: &Connection,
        target: PeerId,
        mode: Mode,
    ) -> Result<Vec<u8>, NatError> {
        let mut body = target.0.to_be_bytes().to_vec();
        body.push(mode as u8);
        let req = signed(
            op::CONNECT,
            &self.config().signer(),
            MessageKind::Rendezvous,
            &body,
        );
        request(conn, &req, CONNECT_REQUEST_TIMEOUT).await
    }

    /// Have `target` punch towards this endpoint; returns the address to connect to.
    pub async fn punch(&self, endpoint: &Endpoint, target: PeerId) -> Result<SocketAddr, NatError> {
        let (_, p) = self.ask(endpoint, target, Mode::Punch).await?;
        let (addr, n) = decode_addr(&p)?;
        if n != p.len() {
            return Err(NatError::Malformed("punch reply length"));
        }
        Ok(addr)
    }

    /// Open a relay session to `target`; returns the relay's address and the grant.
    pub async fn relay(
        &self,
        endpoint: &Endpoint,
        target: PeerId,
    ) -> Result<(SocketAddr, RelayGrant), NatError> {
        let (server, p) = self.ask(endpoint, target, Mode::Relay).await?;
        let grant = RelayGrant::decode(&p)?;
        Ok((SocketAddr::new(server.ip(), grant.port), grant))
    }
}

/// A proxy stops after this long without a datagram either way.
const PROXY_IDLE: Duration = Duration::from_secs(30);
/// How often an unanswered BIND is sent again.
const BIND_RETRY: Duration = Duration::from_millis(250);

/// Start a relay proxy: a socket on `inner_ip` that the local QUIC endpoint talks to as if
/// it were the other side, and one towards the relay. Datagrams from the local side are
/// wrapped in DATA and sent to the relay; DATA from the relay is unwrapped and handed to
/// the local side. `inner_peer` is the local QUIC endpoint's address when known (the
/// daemon's); otherwise the first local sender is taken (the client's endpoint). Returns
/// the inner socket's address. The proxy ends after 30 s of silence.
pub async fn start_proxy(
    relay: SocketAddr,
    grant: &RelayGrant,
    role: u8,
    inner_ip: IpAddr,
    inner_peer: Option<SocketAddr>,
) -> Result<SocketAddr, NatError> {
    let io = |e: std::io::Error| NatError::Io(e.to_string());
    let unspecified: IpAddr = if relay.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let outer = UdpSocket::bind(SocketAddr::new(unspecified, 0))
        .await
        .map_err(io)?;
    let inner = UdpSocket::bind(SocketAddr::new(inner_ip, 0))
        .await
        .map_err(io)?;
    let inner_addr = inner.local_addr().map_err(io)?;
    let bind = grant.bind_datagram(role);
    outer.send_to(&bind, relay).await.map_err(io)?;
    let session = grant.session;
    tokio::spawn(async move {
        let mut peer = inner_peer;
        let mut bound = false;
        let mut from_relay = vec![0u8; MAX_RELAY_PAYLOAD + DATA_HEADER + 64];
        let mut from_local = vec![0u8; MAX_RELAY_PAYLOAD + DATA_HEADER + 64];
        let mut last = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(BIND_RETRY);
        loop {
            tokio::select! {
                r = outer.recv_from(&mut from_relay) => {
                    let Ok((n, src)) = r else { break };
                    // Only the relay speaks on this socket.
                    if src != relay || n < DATA_HEADER {
                        continue;
                    }
                    let d = &from_relay[..n];
                    if u64::from_be_bytes(d[1..9].try_into().expect("8 bytes")) != session {
                        continue;
                    }
                    match d[0] {
                        relay_op::BOUND => bound = true,
                        relay_op::DATA if n > DATA_HEADER => {
                            last = tokio::time::Instant::now();
                            if let Some(p) = peer {
                                let _ = inner.send_to(&d[DATA_HEADER..], p).await;
                            }
                        }
                        _ => {}
                    }
                }
                r = inner.recv_from(&mut from_local[DATA_HEADER..]) => {
                    let Ok((n, src)) = r else { break };
                    // One local endpoint per proxy: the first sender (or the daemon).
                    if *peer.get_or_insert(src) != src || n > MAX_RELAY_PAYLOAD {
                        continue;
                    }
                    last = tokio::time::Instant::now();
                    from_local[0] = relay_op::DATA;
                    from_local[1..DATA_HEADER].copy_from_slice(&session.to_be_bytes());
                    let _ = outer.send_to(&from_local[..DATA_HEADER + n], relay).await;
                }
                _ = tick.tick() => {
                    if last.elapsed() > PROXY_IDLE {
                        break;
                    }
                    if !bound {
                        let _ = outer.send_to(&bind, relay).await;
                    }
                }
            }
        }
        tracing::debug!(session = format!("{session:x}"), "relay proxy closed");
    });
    Ok(inner_addr)
}

/// The QUIC connections a daemon opens to punch: they only need to send packets, so
/// they retry fast and never complete (the client side does not answer them).
pub fn punch_config() -> Result<quinn::ClientConfig, NatError> {
    // Pinned to a fingerprint nobody has: the handshake can never succeed by accident.
    let tls = pinned_client_config(Fingerprint([0u8; 32]), &[ALPN])
        .map_err(|e| NatError::Connect(e.to_string()))?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| NatError::Connect(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = TransportConfig::default();
    t.initial_rtt(Duration::from_millis(100));
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_and_bounds_hold() {
        for a in ["203.0.113.7:7401", "[2001:db8::1]:443"] {
            let a: SocketAddr = a.parse().unwrap();
            let mut b = Vec::new();
            encode_addr(a, &mut b);
            assert_eq!(decode_addr(&b).unwrap(), (a, b.len()));
            for cut in 0..b.len() {
                assert!(decode_addr(&b[..cut]).is_err(), "{a} cut at {cut}");
            }
        }
        assert!(decode_addr(&[5, 1, 2, 3, 4, 0, 1]).is_err());
        assert!(decode_addr(&[4, 1, 2, 3, 4, 0, 0]).is_err(), "port 0");
    }

    #[test]
    fn grants_and_bind_macs() {
        let g = RelayGrant::random(7000).unwrap();
        assert_eq!(RelayGrant::decode(&g.encode()).unwrap(), g);
        assert!(RelayGrant::decode(&g.encode()[1..]).is_err());
        let d = g.bind_datagram(ROLE_CLIENT);
        assert!(bind_mac_ok(&g.secret, g.session, ROLE_CLIENT, &d[10..]));
        // The MAC binds the role and the session: neither can be changed.
        assert!(!bind_mac_ok(&g.secret, g.session, ROLE_DAEMON, &d[10..]));
        assert!(!bind_mac_ok(
            &g.secret,
            g.session ^ 1,
            ROLE_CLIENT,
            &d[10..]
        ));
        let other = RelayGrant::random(7000).unwrap();
        assert!(!bind_mac_ok(
            &other.secret,
            g.session,
            ROLE_CLIENT,
            &d[10..]
        ));
    }

    #[test]
    fn classification() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let local = a("198.51.100.2:7401");
        assert_eq!(
            Reach::classify(
                a("198.51.100.2:7401"),
                a("198.51.100.2:7401"),
                local,
                None,
                true
            ),
            Reach::Public
        );
        assert_eq!(
            Reach::classify(
                a("203.0.113.11:7401"),
                a("203.0.113.11:7401"),
                local,
                None,
                false
            ),
            Reach::Punch
        );
        assert_eq!(
            Reach::classify(
                a("203.0.113.11:40001"),
                a("203.0.113.11:51234"),
                local,
                None,
                false
            ),
            Reach::Relay
        );
        // Bound to 0.0.0.0 on a host that owns the address the server sees: public.
        let any = a("0.0.0.0:7401");
        let seen = a("203.0.113.2:7401");
        assert_eq!(Reach::classify(seen, seen, any, None, true), Reach::Public);
        assert_eq!(Reach::classify(seen, seen, any, None, false), Reach::Punch);
    }

    #[test]
    fn server_urls() {
        let k = TransactionKey::from_bytes([1; 32]);
        let c = |u| {
            RendezvousConfig::from_url(u, Fingerprint([0; 32]), PeerId(1), k.clone())
                .map(|c| c.server)
        };
        assert_eq!(
            c("https://203.0.113.1:7400").as_deref(),
            Some("203.0.113.1:7400")
        );
        assert_eq!(
            c("https://example.org/").as_deref(),
            Some("example.org:443")
        );
        assert_eq!(
            c("https://[2001:db8::1]:7400/x").as_deref(),
            Some("[2001:db8::1]:7400")
        );
        assert_eq!(c("http://example.org"), None);
    }

    #[test]
    fn other_instances_are_tried_in_turn() {
        let k = TransactionKey::from_bytes([1; 32]);
        let cfg = RendezvousConfig::from_url("https://a:1", Fingerprint([0; 32]), PeerId(1), k);
        let mut cfg = cfg.unwrap().with_others([
            "https://b:2",
            "https://a:1/",
            "nonsense",
            "https://c:3",
            "https://b:2",
        ]);
        assert_eq!(
            cfg.others,
            ["b:2", "c:3"],
            "the one in use, duplicates and junk left out"
        );
        let mut seen = vec![cfg.server.clone()];
        for _ in 0..3 {
            assert!(cfg.next_instance());
            seen.push(cfg.server.clone());
        }
        assert_eq!(seen, ["a:1", "b:2", "c:3", "a:1"]);
        let mut alone = RendezvousConfig::from_url(
            "https://a:1",
            Fingerprint([0; 32]),
            PeerId(1),
            TransactionKey::from_bytes([1; 32]),
        )
        .unwrap();
        assert!(!alone.next_instance());
        assert_eq!(alone.server, "a:1");
    }
}
