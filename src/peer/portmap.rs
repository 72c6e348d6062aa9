//! Asking the home router for a port mapping with NAT-PMP (RFC 6886), which most routers
//! that offer UPnP also answer (and PCP servers answer in NAT-PMP's place). A daemon with
//! a mapped port is reached directly at the router's public address: no punching, no
//! relay.
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
    #[error("malformed NAT-PMP answer")]
    Malformed,
    /// A local socket error.
    #[error("NAT-PMP socket: {0}")]
    Io(String),
}

/// A mapping the router made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Where others reach the mapped port.
    pub public: SocketAddrV4,
    /// Seconds it lasts.
    pub lifetime: u32,
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
    if port != internal || mapped == 0 || lifetime == 0 {
        return Err(PortMapError::Malformed);
    }
    Ok((mapped, lifetime))
}

/// Send `req` to the gateway and wait for an answer from it (three tries: 250, 500,
/// 1000 ms).
async fn ask(sock: &UdpSocket, gw: SocketAddr, req: &[u8]) -> Result<Vec<u8>, PortMapError> {
    let mut wait = Duration::from_millis(250);
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        sock.send_to(req, gw)
            .await
            .map_err(|e| PortMapError::Io(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
                Ok(Ok((n, from))) if from == gw => return Ok(buf[..n].to_vec()),
                // Someone else's datagram: not an answer.
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Err(PortMapError::Io(e.to_string())),
                Err(_) => break,
            }
        }
        wait *= 2;
    }
    match gw {
        SocketAddr::V4(g) => Err(PortMapError::NoAnswer(*g.ip())),
        SocketAddr::V6(_) => Err(PortMapError::NoGateway),
    }
}

/// Ask the default gateway to map UDP port `internal` (the daemon's) to the outside.
pub async fn map_udp(internal: u16) -> Result<Mapping, PortMapError> {
    let gw = default_gateway().ok_or(PortMapError::NoGateway)?;
    let gw = SocketAddr::from((gw, NATPMP_PORT));
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .await
        .map_err(|e| PortMapError::Io(e.to_string()))?;
    let ip = parse_external(&ask(&sock, gw, &[0, 0]).await?)?;
    let (port, lifetime) = parse_map(
        &ask(&sock, gw, &map_request(internal, LIFETIME_SECS)).await?,
        internal,
    )?;
    Ok(Mapping {
        public: SocketAddrV4::new(ip, port),
        lifetime,
    })
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
