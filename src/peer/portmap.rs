//! Asking the home router for a port mapping: PCP (RFC 6887, [`pcp`]), NAT-PMP
//! (RFC 6886, here) and UPnP-IGD ([`upnp`]), tried in that order; the daemon keeps the
//! first that works and deletes it when it stops. A daemon with a mapped port is reached
//! directly at the router's public address: no punching, no relay. Every router answer
//! is treated as hostile (bounded, checked field by field), and a router that lies about
//! its public address gains nothing: the server reaches the daemon through the mapping
//! before it tells anyone about it.
//!
//! NAT-PMP on the wire:
//!
//! ```text
//! to the gateway's UDP port 5351
//!   external address  version 0 | op 0                                        2 bytes
//!   map UDP           version 0 | op 1 | reserved u16 | internal port u16
//!                     | suggested external port u16 | lifetime u32 (seconds)  12 bytes
//! answers
//!   external address  version 0 | op 128 | result u16 | epoch u32 | ip [4]     12 bytes
//!   map UDP           version 0 | op 129 | result u16 | epoch u32
//!                     | internal port u16 | mapped external port u16 | lifetime u32   16 bytes
//! ```
//!
//! Every answer must have exactly its length, come from the gateway, name our internal
//! port and carry result 0; anything else is no mapping.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use tokio::net::UdpSocket;

pub mod pcp;
pub mod upnp;

/// NAT-PMP's port on the gateway.
pub const NATPMP_PORT: u16 = 5351;
/// Mapping lifetime asked for; the daemon renews at half of what it got.
pub const LIFETIME_SECS: u32 = 3600;

/// Why no mapping was made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortMapError {
    /// No IPv4 default route: no gateway to ask.
    #[error("no default gateway")]
    NoGateway,
    /// The gateway did not answer (it offers no NAT-PMP).
    #[error("the gateway {0} did not answer NAT-PMP")]
    NoAnswer(Ipv4Addr),
    /// It answered with an error code (2 not authorized, 3 network failure, 4 out of
    /// resources, 5 unsupported opcode).
    #[error("the gateway refused the mapping (NAT-PMP result {0})")]
    Refused(u16),
    /// An answer that breaks the format.
    #[error("malformed answer from the router")]
    Malformed,
    /// A PCP request answered by a NAT-PMP-only server.
    #[error("the gateway speaks NAT-PMP, not PCP")]
    UnsupportedVersion,
    /// No UPnP Internet Gateway Device answered on the LAN.
    #[error("no UPnP-IGD on the LAN")]
    NoIgd,
    /// A UPnP answer over its size bound.
    #[error("UPnP answer over {0} bytes")]
    Oversized(usize),
    /// A UPnP HTTP exchange failed (connection, status, or a SOAP fault).
    #[error("UPnP: {0}")]
    Http(String),
    /// A local socket error.
    #[error("NAT-PMP socket: {0}")]
    Io(String),
}

/// The protocol a router made a mapping with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// NAT-PMP (RFC 6886).
    NatPmp = 1,
    /// PCP (RFC 6887).
    Pcp = 2,
    /// UPnP Internet Gateway Device (WANIPConnection over SOAP).
    Upnp = 3,
}

impl Method {
    /// Parse the wire code (a HELLO's byte after the mapping).
    pub fn from_u8(v: u8) -> Option<Method> {
        match v {
            1 => Some(Method::NatPmp),
            2 => Some(Method::Pcp),
            3 => Some(Method::Upnp),
            _ => None,
        }
    }

    /// The name `status` and the API use.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::NatPmp => "NAT-PMP",
            Method::Pcp => "PCP",
            Method::Upnp => "UPnP-IGD",
        }
    }

    /// Parse [`Method::as_str`].
    pub fn parse(name: &str) -> Option<Method> {
        [Method::NatPmp, Method::Pcp, Method::Upnp]
            .into_iter()
            .find(|m| m.as_str() == name)
    }
}

/// What deleting a mapping takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Undo {
    NatPmp {
        gw: SocketAddr,
        internal: u16,
    },
    Pcp {
        gw: SocketAddr,
        nonce: [u8; 12],
        internal: u16,
    },
    Upnp {
        control: upnp::Control,
        internal: u16,
        external: u16,
    },
}

/// A mapping the router made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Where others reach the mapped port.
    pub public: SocketAddrV4,
    /// Seconds it lasts (0: until deleted).
    pub lifetime: u32,
    /// The protocol that made it.
    pub method: Method,
    pub(crate) undo: Undo,
}

/// Whether a router may have `ip` as its public address: not unspecified, loopback,
/// multicast or broadcast (whether it really is the router's is for the server's check).
pub(crate) fn plausible(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast())
}

/// The IPv4 default gateway, from `/proc/net/route` (Linux).
pub fn default_gateway() -> Option<Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Destination 0.0.0.0 with the gateway flag (0x2).
        let flags = u16::from_str_radix(f.get(3)?, 16).ok()?;
        if *f.get(1)? != "00000000" || flags & 2 == 0 {
            return None;
        }
        // The kernel prints the address in host byte order (little-endian here).
        let g = u32::from_str_radix(f.get(2)?, 16).ok()?;
        Some(Ipv4Addr::from(g.to_le_bytes()))
    })
}

/// Parse an external-address answer.
pub fn parse_external(b: &[u8]) -> Result<Ipv4Addr, PortMapError> {
    if b.len() != 12 || b[0] != 0 || b[1] != 128 {
        return Err(PortMapError::Malformed);
    }
    let result = u16::from_be_bytes([b[2], b[3]]);
    if result != 0 {
        return Err(PortMapError::Refused(result));
    }
    Ok(Ipv4Addr::new(b[8], b[9], b[10], b[11]))
}

/// The map-UDP request for `internal` port.
pub fn map_request(internal: u16, lifetime: u32) -> [u8; 12] {
    let mut r = [0u8; 12];
    r[1] = 1;
    r[4..6].copy_from_slice(&internal.to_be_bytes());
    r[6..8].copy_from_slice(&internal.to_be_bytes());
    r[8..12].copy_from_slice(&lifetime.to_be_bytes());
    r
}

/// Parse a map-UDP answer for `internal`: the mapped external port and its lifetime.
pub fn parse_map(b: &[u8], internal: u16) -> Result<(u16, u32), PortMapError> {
    if b.len() != 16 || b[0] != 0 || b[1] != 129 {
        return Err(PortMapError::Malformed);
    }
    let result = u16::from_be_bytes([b[2], b[3]]);
    if result != 0 {
        return Err(PortMapError::Refused(result));
    }
    let port = u16::from_be_bytes([b[8], b[9]]);
    let mapped = u16::from_be_bytes([b[10], b[11]]);
    let lifetime = u32::from_be_bytes(b[12..16].try_into().expect("4 bytes"));
    if port != internal || mapped == 0 {
        return Err(PortMapError::Malformed);
    }
    Ok((mapped, lifetime))
}

/// Send `req` to the gateway and wait for an answer from it that `check` takes (three
/// tries: 250, 500, 1000 ms). A datagram from elsewhere, or one `check` finds malformed
/// (another request's answer, a wrong nonce), is skipped: a host on the LAN cannot cut
/// a request short with junk.
pub(crate) async fn ask<T>(
    sock: &UdpSocket,
    gw: SocketAddr,
    req: &[u8],
    check: impl Fn(&[u8]) -> Result<T, PortMapError>,
) -> Result<T, PortMapError> {
    let mut wait = Duration::from_millis(250);
    let mut buf = [0u8; pcp::MAX_MESSAGE + 1];
    let mut noise = false;
    for _ in 0..3 {
        sock.send_to(req, gw)
            .await
            .map_err(|e| PortMapError::Io(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
                Ok(Ok((n, from))) if from == gw => match check(&buf[..n]) {
                    Err(PortMapError::Malformed) => noise = true,
                    r => return r,
                },
                // Someone else's datagram: not an answer.
                Ok(Ok(_)) => continue,
                // An ICMP "port unreachable" on a connected socket: nobody listens.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                Ok(Err(e)) => return Err(PortMapError::Io(e.to_string())),
                Err(_) => break,
            }
        }
        wait *= 2;
    }
    match gw {
        _ if noise => Err(PortMapError::Malformed),
        SocketAddr::V4(g) => Err(PortMapError::NoAnswer(*g.ip())),
        SocketAddr::V6(_) => Err(PortMapError::NoGateway),
    }
}

/// Ask the NAT-PMP server at `gw` to map UDP port `internal`.
async fn natpmp_map(gw: SocketAddr, internal: u16) -> Result<Mapping, PortMapError> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .await
        .map_err(|e| PortMapError::Io(e.to_string()))?;
    let ip = ask(&sock, gw, &[0, 0], parse_external).await?;
    if !plausible(ip) {
        return Err(PortMapError::Malformed);
    }
    let req = map_request(internal, LIFETIME_SECS);
    let (port, lifetime) = ask(&sock, gw, &req, |b| parse_map(b, internal)).await?;
    if lifetime == 0 {
        return Err(PortMapError::Malformed);
    }
    Ok(Mapping {
        public: SocketAddrV4::new(ip, port),
        lifetime,
        method: Method::NatPmp,
        undo: Undo::NatPmp { gw, internal },
    })
}

/// Ask the default gateway to map UDP port `internal` (the daemon's) to the outside:
/// `prefer` first (the method that worked last time), then PCP, NAT-PMP and UPnP-IGD.
pub async fn map_udp(internal: u16, prefer: Option<Method>) -> Result<Mapping, PortMapError> {
    let gw = default_gateway().ok_or(PortMapError::NoGateway)?;
    let gw5351 = SocketAddr::from((gw, NATPMP_PORT));
    let mut order = vec![Method::Pcp, Method::NatPmp, Method::Upnp];
    if let Some(p) = prefer {
        order.retain(|m| *m != p);
        order.insert(0, p);
    }
    let mut last = PortMapError::NoAnswer(gw);
    for m in order {
        // Each is tried even when nothing answered another on port 5351: a NAT-PMP
        // server should answer a PCP request with "unsupported version", but some stay
        // silent.
        let r = match m {
            Method::Pcp => pcp::map(gw5351, internal).await,
            Method::NatPmp => natpmp_map(gw5351, internal).await,
            Method::Upnp => upnp::map(gw, internal).await,
        };
        match r {
            Ok(mapping) => return Ok(mapping),
            Err(e) => {
                tracing::debug!(method = m.as_str(), error = %e, "no port mapping");
                last = e;
            }
        }
    }
    Err(last)
}

/// Delete a mapping (when the daemon stops). Best effort: a router that does not answer
/// lets it expire at the end of its lifetime.
pub async fn unmap(m: &Mapping) -> Result<(), PortMapError> {
    match &m.undo {
        Undo::NatPmp { gw, internal } => {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                .await
                .map_err(|e| PortMapError::Io(e.to_string()))?;
            // RFC 6886 §3.4: lifetime 0 deletes; the answer names the internal port (and
            // external port 0, which parse_map refuses for a new mapping).
            let req = map_request(*internal, 0);
            let port = internal.to_be_bytes();
            ask(&sock, *gw, &req, |b| match b {
                [0, 129, 0, 0, _, _, _, _, p0, p1, ..] if b.len() == 16 && [*p0, *p1] == port => {
                    Ok(())
                }
                [0, 129, r0, r1, ..] if b.len() == 16 && [*r0, *r1] != [0, 0] => {
                    Err(PortMapError::Refused(u16::from_be_bytes([*r0, *r1])))
                }
                _ => Err(PortMapError::Malformed),
            })
            .await
        }
        Undo::Pcp {
            gw,
            nonce,
            internal,
        } => pcp::unmap(*gw, *nonce, *internal).await,
        Undo::Upnp {
            control, external, ..
        } => upnp::unmap(control, *external).await,
    }
}

/// Renew a mapping before its lifetime ends: the same request again (PCP: the same
/// nonce; UPnP: the same service and external port).
pub async fn renew(m: &Mapping) -> Result<Mapping, PortMapError> {
    match &m.undo {
        Undo::NatPmp { gw, internal } => natpmp_map(*gw, *internal).await,
        Undo::Pcp {
            gw,
            nonce,
            internal,
        } => pcp::map_with(*gw, *internal, *nonce).await,
        Undo::Upnp {
            control,
            internal,
            external,
        } => upnp::renew(control, *internal, *external).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_checked() {
        let ext = [0, 128, 0, 0, 0, 0, 0, 9, 203, 0, 113, 12];
        assert_eq!(parse_external(&ext), Ok(Ipv4Addr::new(203, 0, 113, 12)));
        assert!(parse_external(&ext[..11]).is_err());
        let mut refused = ext;
        refused[3] = 3;
        assert_eq!(parse_external(&refused), Err(PortMapError::Refused(3)));
        let map = [
            0, 129, 0, 0, 0, 0, 0, 9, 0x1c, 0xe9, 0x1c, 0xe9, 0, 0, 0x0e, 0x10,
        ];
        assert_eq!(parse_map(&map, 7401), Ok((7401, 3600)));
        assert!(parse_map(&map, 7402).is_err(), "another port's mapping");
        assert!(parse_map(&map[..15], 7401).is_err());
        let mut wrong_op = map;
        wrong_op[1] = 128;
        assert!(parse_map(&wrong_op, 7401).is_err());
        assert_eq!(
            &map_request(7401, 3600)[..8],
            &[0, 1, 0, 0, 0x1c, 0xe9, 0x1c, 0xe9]
        );
    }
}
