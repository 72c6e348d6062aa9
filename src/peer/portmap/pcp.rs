//! PCP (RFC 6887) MAP requests: the successor of NAT-PMP on the same UDP port 5351.
//!
//! ```text
//! request   version 2 | opcode 1 (MAP) | reserved u16 | lifetime u32
//!           | client ip [16] (IPv4-mapped)                                  24 bytes
//!           | nonce [12] | protocol u8 (17) | reserved [3]
//!           | internal port u16 | suggested external port u16
//!           | suggested external ip [16] (::ffff:0.0.0.0)                   36 bytes
//! answer    version 2 | 0x81 | reserved u8 | result u8 | lifetime u32 | epoch u32
//!           | reserved [12] | nonce [12] | protocol u8 | reserved [3]
//!           | internal port u16 | assigned external port u16
//!           | assigned external ip [16]              60 bytes (options may follow)
//! ```
//!
//! An answer counts only when it comes from the gateway's port 5351, carries our nonce,
//! protocol and internal port, result 0, and an IPv4-mapped external address; a NAT-PMP
//! server answers a version-2 request with a version-0 "unsupported version", which tells
//! the caller to fall back to NAT-PMP at once.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use super::{ask, Mapping, Method, PortMapError, Undo, LIFETIME_SECS};
use tokio::net::UdpSocket;

/// Length of a MAP request and of an answer without options.
pub const MAP_LEN: usize = 60;
/// Largest PCP message (RFC 6887 §7): longer datagrams are not PCP.
pub const MAX_MESSAGE: usize = 1100;
const VERSION: u8 = 2;
const OP_MAP: u8 = 1;
const UDP: u8 = 17;

fn mapped(ip: Ipv4Addr) -> [u8; 16] {
    ip.to_ipv6_mapped().octets()
}

/// The MAP request asking that UDP port `internal` of `client` be mapped for `lifetime`
/// seconds (0 deletes the mapping the nonce names).
pub fn map_request(client: Ipv4Addr, nonce: [u8; 12], internal: u16, lifetime: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(MAP_LEN);
    r.extend_from_slice(&[VERSION, OP_MAP, 0, 0]);
    r.extend_from_slice(&lifetime.to_be_bytes());
    r.extend_from_slice(&mapped(client));
    r.extend_from_slice(&nonce);
    r.extend_from_slice(&[UDP, 0, 0, 0]);
    r.extend_from_slice(&internal.to_be_bytes());
    // Suggest the same port outside: others then find it where the daemon listens.
    r.extend_from_slice(&internal.to_be_bytes());
    r.extend_from_slice(&mapped(Ipv4Addr::UNSPECIFIED));
    r
}

/// Parse a MAP answer to the request with `nonce` for `internal`: the assigned external
/// address and its lifetime.
pub fn parse_map(
    b: &[u8],
    nonce: &[u8; 12],
    internal: u16,
) -> Result<(SocketAddrV4, u32), PortMapError> {
    // A NAT-PMP server's "unsupported version" (RFC 6887 §9): version 0, result 1.
    if b.len() >= 4 && b[0] == 0 {
        return Err(PortMapError::UnsupportedVersion);
    }
    if b.len() < MAP_LEN || b.len() > MAX_MESSAGE || b.len() % 4 != 0 {
        return Err(PortMapError::Malformed);
    }
    if b[0] != VERSION || b[1] != 0x80 | OP_MAP {
        return Err(PortMapError::Malformed);
    }
    let result = b[3];
    let lifetime = u32::from_be_bytes(b[4..8].try_into().expect("4 bytes"));
    let body = &b[24..MAP_LEN];
    // The nonce ties the answer to our request: anyone on the LAN can send datagrams
    // from a spoofed address, but not guess 96 random bits.
    if body[..12] != nonce[..] || body[12] != UDP {
        return Err(PortMapError::Malformed);
    }
    if result != 0 {
        return Err(PortMapError::Refused(u16::from(result)));
    }
    let port = u16::from_be_bytes([body[16], body[17]]);
    let external = u16::from_be_bytes([body[18], body[19]]);
    let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&body[20..36]).expect("16 bytes"));
    let ip = ip.to_ipv4_mapped().ok_or(PortMapError::Malformed)?;
    if port != internal || external == 0 || lifetime == 0 || !super::plausible(ip) {
        return Err(PortMapError::Malformed);
    }
    Ok((SocketAddrV4::new(ip, external), lifetime))
}

/// The socket PCP speaks from: connected to the gateway, so its local address is the
/// client address the request must name (a PCP server checks it against the source).
async fn socket(gw: SocketAddr) -> Result<(UdpSocket, Ipv4Addr), PortMapError> {
    let io = |e: std::io::Error| PortMapError::Io(e.to_string());
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .await
        .map_err(io)?;
    sock.connect(gw).await.map_err(io)?;
    match sock.local_addr().map_err(io)? {
        SocketAddr::V4(a) => Ok((sock, *a.ip())),
        SocketAddr::V6(_) => Err(PortMapError::NoGateway),
    }
}

/// Ask the PCP server at `gw` to map UDP port `internal`.
pub async fn map(gw: SocketAddr, internal: u16) -> Result<Mapping, PortMapError> {
    let mut nonce = [0u8; 12];
    getrandom::fill(&mut nonce).map_err(|e| PortMapError::Io(e.to_string()))?;
    map_with(gw, internal, nonce).await
}

/// Make or renew (same nonce) the mapping of UDP port `internal`.
pub(crate) async fn map_with(
    gw: SocketAddr,
    internal: u16,
    nonce: [u8; 12],
) -> Result<Mapping, PortMapError> {
    let (sock, client) = socket(gw).await?;
    let req = map_request(client, nonce, internal, LIFETIME_SECS);
    let (public, lifetime) = ask(&sock, gw, &req, |b| parse_map(b, &nonce, internal)).await?;
    Ok(Mapping {
        public,
        lifetime,
        method: Method::Pcp,
        undo: Undo::Pcp {
            gw,
            nonce,
            internal,
        },
    })
}

/// Delete the mapping `nonce` names (a MAP request with lifetime 0).
pub async fn unmap(gw: SocketAddr, nonce: [u8; 12], internal: u16) -> Result<(), PortMapError> {
    let (sock, client) = socket(gw).await?;
    let req = map_request(client, nonce, internal, 0);
    // A deletion's answer carries lifetime 0 (which parse_map refuses for a new
    // mapping): check the nonce and the result only.
    ask(&sock, gw, &req, |b| match b {
        [2, 0x81, _, r, ..] if b.len() >= MAP_LEN && b[24..36] == nonce[..] => match r {
            0 => Ok(()),
            r => Err(PortMapError::Refused(u16::from(*r))),
        },
        _ => Err(PortMapError::Malformed),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(nonce: [u8; 12], result: u8, ip: Ipv4Addr, port: u16) -> Vec<u8> {
        let mut a = vec![2, 0x81, 0, result, 0, 0, 0x0e, 0x10, 0, 0, 0, 7];
        a.extend_from_slice(&[0; 12]);
        a.extend_from_slice(&nonce);
        a.extend_from_slice(&[17, 0, 0, 0]);
        a.extend_from_slice(&7401u16.to_be_bytes());
        a.extend_from_slice(&port.to_be_bytes());
        a.extend_from_slice(&mapped(ip));
        a
    }

    #[test]
    fn requests_and_answers() {
        let n = [7; 12];
        let req = map_request(Ipv4Addr::new(198, 51, 100, 2), n, 7401, 3600);
        assert_eq!(req.len(), MAP_LEN);
        assert_eq!(&req[..8], &[2, 1, 0, 0, 0, 0, 0x0e, 0x10]);
        assert_eq!(&req[8..24], &mapped(Ipv4Addr::new(198, 51, 100, 2)));
        let ext = Ipv4Addr::new(192, 0, 1, 14);
        let ok = answer(n, 0, ext, 7401);
        assert_eq!(
            parse_map(&ok, &n, 7401),
            Ok((SocketAddrV4::new(ext, 7401), 3600))
        );
        // Options after the fixed part are skipped; a wrong nonce, another port, a
        // refusal, a NAT-PMP server, truncated or oversized answers are not a mapping.
        let mut with_option = ok.clone();
        with_option.extend_from_slice(&[1, 0, 0, 0]);
        assert!(parse_map(&with_option, &n, 7401).is_ok());
        assert_eq!(
            parse_map(&answer([8; 12], 0, ext, 7401), &n, 7401),
            Err(PortMapError::Malformed)
        );
        assert!(parse_map(&ok, &n, 7402).is_err());
        assert_eq!(
            parse_map(&answer(n, 2, ext, 7401), &n, 7401),
            Err(PortMapError::Refused(2))
        );
        assert_eq!(
            parse_map(&[0, 0x81, 0, 1, 0, 0, 0, 9], &n, 7401),
            Err(PortMapError::UnsupportedVersion)
        );
        assert!(parse_map(&ok[..59], &n, 7401).is_err());
        let mut huge = ok.clone();
        huge.resize(MAX_MESSAGE + 4, 0);
        assert!(parse_map(&huge, &n, 7401).is_err());
        // An external address no router can have.
        assert!(parse_map(&answer(n, 0, Ipv4Addr::UNSPECIFIED, 7401), &n, 7401).is_err());
        assert!(parse_map(&answer(n, 0, Ipv4Addr::BROADCAST, 7401), &n, 7401).is_err());
        let mut v6 = ok;
        v6[44] = 0x20;
        assert!(parse_map(&v6, &n, 7401).is_err(), "not IPv4-mapped");
    }

    /// A forged answer from another address of the LAN, then a genuine-looking answer
    /// with the wrong nonce from the gateway itself: neither becomes a mapping; the
    /// gateway's real answer does.
    #[tokio::test]
    async fn answers_from_elsewhere_or_with_another_nonce_are_ignored() {
        let gw = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let liar = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let at = gw.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut buf = [0u8; 128];
            let (n, from) = gw.recv_from(&mut buf).unwrap();
            assert_eq!(n, MAP_LEN);
            let nonce: [u8; 12] = buf[24..36].try_into().unwrap();
            let good = answer(nonce, 0, Ipv4Addr::new(192, 0, 1, 14), 7401);
            let spoofed = answer(nonce, 0, Ipv4Addr::new(192, 0, 1, 66), 7401);
            liar.send_to(&spoofed, from).unwrap();
            gw.send_to(
                &answer([0; 12], 0, Ipv4Addr::new(192, 0, 1, 66), 7401),
                from,
            )
            .unwrap();
            gw.send_to(&good, from).unwrap();
        });
        let m = map(at, 7401).await.unwrap();
        server.join().unwrap();
        assert_eq!(m.public, "192.0.1.14:7401".parse().unwrap());
        assert_eq!(m.method, Method::Pcp);
    }

    /// A renewal repeats the request with the same nonce (RFC 6887 §11.2.1: a server
    /// ties the mapping to it), and the deletion at shutdown is that request with
    /// lifetime 0.
    #[tokio::test]
    async fn renewals_and_the_deletion_reuse_the_nonce() {
        let gw = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let at = gw.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..3 {
                let mut buf = [0u8; 128];
                let (n, from) = gw.recv_from(&mut buf).unwrap();
                assert_eq!(n, MAP_LEN);
                let nonce: [u8; 12] = buf[24..36].try_into().unwrap();
                let lifetime = u32::from_be_bytes(buf[4..8].try_into().unwrap());
                let mut a = answer(nonce, 0, Ipv4Addr::new(192, 0, 1, 14), 7401);
                a[4..8].copy_from_slice(&lifetime.to_be_bytes());
                gw.send_to(&a, from).unwrap();
                seen.push((nonce, lifetime));
            }
            seen
        });
        let m = map(at, 7401).await.unwrap();
        let renewed = super::super::renew(&m).await.unwrap();
        assert_eq!(renewed, m);
        super::super::unmap(&renewed).await.unwrap();
        let seen = server.join().unwrap();
        assert_eq!(seen[0].0, seen[1].0);
        assert_eq!(seen[1].0, seen[2].0);
        assert_eq!(
            seen.iter().map(|s| s.1).collect::<Vec<_>>(),
            [LIFETIME_SECS, LIFETIME_SECS, 0]
        );
    }
}
