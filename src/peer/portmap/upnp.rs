//! UPnP Internet Gateway Device mappings: SSDP discovery on the LAN, the device
//! description over HTTP, then `GetExternalIPAddress`, `AddPortMapping` and
//! `DeletePortMapping` as SOAP calls to its WANIPConnection (or WANPPPConnection)
//! service.
//!
//! Everything the router says is bounded and checked before use: an SSDP answer counts
//! only from the default gateway and only when its `LOCATION` is an `http://` URL on the
//! gateway's own address (no names to resolve, no other host to be sent to); an HTTP
//! answer is read to at most [`MAX_HTTP`] bytes; every field taken from XML is at most
//! [`MAX_FIELD`] bytes of printable ASCII (a control path cannot smuggle a header line).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::{Mapping, Method, PortMapError, Undo, LIFETIME_SECS};

/// SSDP's multicast group and port.
pub const SSDP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 255, 250), 1900);
/// Largest SSDP answer taken (a real one is a few hundred bytes).
pub const MAX_SSDP: usize = 2048;
/// Largest HTTP answer (headers and body) read from the router.
pub const MAX_HTTP: usize = 64 * 1024;
/// Largest URL or XML field value taken.
pub const MAX_FIELD: usize = 256;
/// How long discovery listens for answers.
const DISCOVERY: Duration = Duration::from_secs(2);
/// Bound on one HTTP exchange with the router.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// The WAN connection services that map ports, in the order they are preferred.
const SERVICES: [&str; 3] = [
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
];
/// UPnP error code: the port is mapped to another client already.
const CONFLICT: u16 = 718;
/// UPnP error code: only permanent leases are supported (IGD v1 routers).
const ONLY_PERMANENT: u16 = 725;

/// The router's port-mapping service, as its description names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    /// The router's HTTP address.
    pub host: SocketAddrV4,
    /// The control path (absolute, printable ASCII).
    pub path: String,
    /// The service type (one of the WAN connection services).
    pub service: String,
    /// This host's LAN address, as the router sees it (the mapping's internal client).
    pub client: Ipv4Addr,
}

fn http_err(what: impl std::fmt::Display) -> PortMapError {
    PortMapError::Http(what.to_string())
}

/// A value fit to use: not empty, at most [`MAX_FIELD`] bytes of printable ASCII.
fn field(v: &str) -> Option<&str> {
    let v = v.trim();
    (!v.is_empty() && v.len() <= MAX_FIELD && v.bytes().all(|b| b.is_ascii_graphic())).then_some(v)
}

/// Split `http://a.b.c.d[:port]/path` into address and path. Names are refused: the
/// router's own address is all that is wanted.
pub fn parse_url(url: &str) -> Option<(SocketAddrV4, String)> {
    let rest = field(url)?.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let (host, port) = match authority.split_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (authority, 80),
    };
    let ip: Ipv4Addr = host.parse().ok()?;
    (port != 0).then(|| (SocketAddrV4::new(ip, port), path.to_string()))
}

/// The description URL in an SSDP answer from `from`, when it is a successful answer
/// from the gateway `gw` and the URL is on the gateway itself.
pub fn parse_ssdp(
    datagram: &[u8],
    from: SocketAddr,
    gw: Ipv4Addr,
) -> Option<(SocketAddrV4, String)> {
    if datagram.len() > MAX_SSDP || from.ip() != std::net::IpAddr::V4(gw) {
        return None;
    }
    let text = std::str::from_utf8(datagram).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines.next()?;
    if !status.starts_with("HTTP/1.") || status.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    let location = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("location")
            .then_some(value)
    })?;
    let (host, path) = parse_url(location)?;
    (*host.ip() == gw).then_some((host, path))
}

/// The text between `<tag>` (namespace prefix and attributes allowed) and its end tag,
/// from `from` on: the value and where the search may go on.
fn element<'a>(xml: &'a str, tag: &str) -> Option<(&'a str, usize)> {
    let mut at = 0;
    while let Some(i) = xml[at..].find('<') {
        let start = at + i + 1;
        let name_end = xml[start..]
            .find(|c: char| c == '>' || c.is_ascii_whitespace())
            .map(|e| start + e)?;
        let name = &xml[start..name_end];
        let local = name.rsplit(':').next().unwrap_or(name);
        if local == tag {
            let open_end = start + xml[start..].find('>')? + 1;
            let close = format!("</{name}>");
            let len = xml[open_end..].find(&close)?;
            return Some((&xml[open_end..open_end + len], open_end + len + close.len()));
        }
        at = name_end;
    }
    None
}

/// The port-mapping service of a device description: its type and control path (an
/// absolute URL must point at `host` itself).
pub fn find_control(xml: &str, host: SocketAddrV4) -> Result<(String, String), PortMapError> {
    let mut found: Vec<(String, String)> = Vec::new();
    let mut rest = xml;
    while let Some((service, next)) = element(rest, "service") {
        rest = &rest[next..];
        let ty = element(service, "serviceType").and_then(|(v, _)| field(v));
        let url = element(service, "controlURL").and_then(|(v, _)| field(v));
        let (Some(ty), Some(url)) = (ty, url) else {
            continue;
        };
        if !SERVICES.contains(&ty) {
            continue;
        }
        let path = if url.starts_with('/') {
            url.to_string()
        } else {
            match parse_url(url) {
                Some((h, p)) if h == host => p,
                _ => continue,
            }
        };
        found.push((ty.to_string(), path));
    }
    SERVICES
        .iter()
        .find_map(|s| found.iter().find(|(t, _)| t == s).cloned())
        .ok_or(PortMapError::NoIgd)
}

/// Find the gateway's IGD by SSDP: the description URL it answers with.
async fn discover(gw: Ipv4Addr) -> Result<(SocketAddrV4, String), PortMapError> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .await
        .map_err(|e| PortMapError::Io(e.to_string()))?;
    let search = format!(
        "M-SEARCH * HTTP/1.1\r\nHOST: {SSDP}\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\n\
         ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n"
    );
    let send = || async {
        sock.send_to(search.as_bytes(), SSDP)
            .await
            .map_err(|e| PortMapError::Io(e.to_string()))
    };
    let mut buf = vec![0u8; MAX_SSDP + 1];
    let deadline = tokio::time::Instant::now() + DISCOVERY;
    // Twice, half a second apart: a multicast datagram is easily lost.
    let mut resend = Some(tokio::time::Instant::now() + Duration::from_millis(500));
    send().await?;
    loop {
        match tokio::time::timeout_at(resend.unwrap_or(deadline), sock.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) => {
                if let Some(found) = parse_ssdp(&buf[..n], from, gw) {
                    return Ok(found);
                }
                tracing::debug!(%from, "an SSDP answer that is not the gateway's IGD");
            }
            Ok(Err(e)) => return Err(PortMapError::Io(e.to_string())),
            Err(_) if resend.take().is_some() => {
                send().await?;
            }
            Err(_) => return Err(PortMapError::NoIgd),
        }
    }
}

/// Decode a chunked body, bounded by its own length.
fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, PortMapError> {
    let mut out = Vec::new();
    loop {
        let line_end = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| http_err("truncated chunk"))?;
        let size = std::str::from_utf8(&b[..line_end])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
            .ok_or_else(|| http_err("bad chunk size"))?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if size > b.len() {
            return Err(http_err("truncated chunk"));
        }
        out.extend_from_slice(&b[..size]);
        b = b
            .get(size + 2..)
            .ok_or_else(|| http_err("truncated chunk"))?;
    }
}

/// Split an HTTP answer into status code and body.
pub fn parse_http(raw: &[u8]) -> Result<(u16, Vec<u8>), PortMapError> {
    if raw.len() > MAX_HTTP {
        return Err(PortMapError::Oversized(MAX_HTTP));
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| http_err("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| http_err("headers not text"))?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    let code: u16 = match status.split_whitespace().collect::<Vec<_>>()[..] {
        [v, code, ..] if v.starts_with("HTTP/1.") => {
            code.parse().map_err(|_| http_err("bad status line"))?
        }
        _ => return Err(http_err("bad status line")),
    };
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| http_err("bad content-length"))?,
            );
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        body.get(..n)
            .ok_or_else(|| http_err("body shorter than its length"))?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok((code, body))
}

/// One HTTP/1.1 exchange with the router (`Connection: close`, read to the end, at most
/// [`MAX_HTTP`] bytes): the status, the body, and this host's address on that
/// connection.
async fn http(
    host: SocketAddrV4,
    request: &[u8],
) -> Result<(u16, Vec<u8>, Ipv4Addr), PortMapError> {
    let exchange = async {
        let mut s = TcpStream::connect(host).await.map_err(http_err)?;
        let local = match s.local_addr().map_err(http_err)? {
            SocketAddr::V4(a) => *a.ip(),
            SocketAddr::V6(_) => return Err(http_err("not IPv4")),
        };
        s.write_all(request).await.map_err(http_err)?;
        let mut raw = Vec::new();
        // One byte over the bound tells an oversized answer from one that fits.
        (&mut s)
            .take(MAX_HTTP as u64 + 1)
            .read_to_end(&mut raw)
            .await
            .map_err(http_err)?;
        let (code, body) = parse_http(&raw)?;
        Ok((code, body, local))
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| http_err("the router did not answer in time"))?
}

/// The SOAP envelope of `action` with `args`.
fn envelope(service: &str, action: &str, args: &[(&str, String)]) -> String {
    let mut body = String::new();
    for (name, value) in args {
        body.push_str(&format!("<{name}>{value}</{name}>"));
    }
    format!(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
         <u:{action} xmlns:u=\"{service}\">{body}</u:{action}></s:Body></s:Envelope>\r\n"
    )
}

/// Call `action` on the router's service; the answer's body, or the UPnP error code.
async fn soap(c: &Control, action: &str, args: &[(&str, String)]) -> Result<String, PortMapError> {
    let body = envelope(&c.service, action, args);
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\n\
         SOAPAction: \"{}#{action}\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        c.path,
        c.host,
        c.service,
        body.len()
    );
    let (code, answer, _) = http(c.host, req.as_bytes()).await?;
    let answer = String::from_utf8(answer).map_err(|_| http_err("SOAP answer not UTF-8"))?;
    if code == 200 {
        return Ok(answer);
    }
    match element(&answer, "errorCode").and_then(|(v, _)| field(v)?.parse().ok()) {
        Some(upnp) => Err(PortMapError::Refused(upnp)),
        None => Err(http_err(format!("{action}: HTTP {code}"))),
    }
}

/// Parse a `GetExternalIPAddress` answer.
pub fn parse_external(answer: &str) -> Result<Ipv4Addr, PortMapError> {
    element(answer, "NewExternalIPAddress")
        .and_then(|(v, _)| field(v)?.parse::<Ipv4Addr>().ok())
        .filter(|ip| super::plausible(*ip))
        .ok_or(PortMapError::Malformed)
}

/// Map `external` on the router to UDP port `internal` of this host.
async fn add(c: &Control, internal: u16, external: u16, lease: u32) -> Result<(), PortMapError> {
    let args = [
        ("NewRemoteHost", String::new()),
        ("NewExternalPort", external.to_string()),
        ("NewProtocol", "UDP".to_string()),
        ("NewInternalPort", internal.to_string()),
        ("NewInternalClient", c.client.to_string()),
        ("NewEnabled", "1".to_string()),
        ("NewPortMappingDescription", "peerstash".to_string()),
        ("NewLeaseDuration", lease.to_string()),
    ];
    soap(c, "AddPortMapping", &args).await.map(|_| ())
}

/// The router's control service: discovery, then its description.
async fn control(gw: Ipv4Addr) -> Result<Control, PortMapError> {
    let (host, path) = discover(gw).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let (code, xml, client) = http(host, req.as_bytes()).await?;
    if code != 200 {
        return Err(http_err(format!("description: HTTP {code}")));
    }
    let xml = String::from_utf8(xml).map_err(|_| http_err("description not UTF-8"))?;
    let (service, path) = find_control(&xml, host)?;
    Ok(Control {
        host,
        path,
        service,
        client,
    })
}

/// Map UDP port `internal` through the gateway `gw`'s IGD, at the same port outside if
/// it is free, else at one of a few random ones.
pub async fn map(gw: Ipv4Addr, internal: u16) -> Result<Mapping, PortMapError> {
    let c = control(gw).await?;
    renew(&c, internal, internal).await
}

/// (Re)make the mapping of `external` to `internal` through `c`.
pub(crate) async fn renew(
    c: &Control,
    internal: u16,
    external: u16,
) -> Result<Mapping, PortMapError> {
    let ip = parse_external(&soap(c, "GetExternalIPAddress", &[]).await?)?;
    let mut candidates = vec![external];
    for _ in 0..3 {
        let mut r = [0u8; 2];
        getrandom::fill(&mut r).map_err(|e| PortMapError::Io(e.to_string()))?;
        candidates.push(1024 + u16::from_be_bytes(r) % (65535 - 1024));
    }
    let mut last = PortMapError::Refused(CONFLICT);
    for port in candidates {
        let mut lease = LIFETIME_SECS;
        let mut r = add(c, internal, port, lease).await;
        if r == Err(PortMapError::Refused(ONLY_PERMANENT)) {
            // An old router: a permanent mapping, deleted when the daemon stops.
            lease = 0;
            r = add(c, internal, port, lease).await;
        }
        match r {
            Ok(()) => {
                return Ok(Mapping {
                    public: SocketAddrV4::new(ip, port),
                    lifetime: lease,
                    method: Method::Upnp,
                    undo: Undo::Upnp {
                        control: c.clone(),
                        internal,
                        external: port,
                    },
                })
            }
            Err(PortMapError::Refused(CONFLICT)) => last = PortMapError::Refused(CONFLICT),
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Delete the mapping of `external`.
pub async fn unmap(c: &Control, external: u16) -> Result<(), PortMapError> {
    let args = [
        ("NewRemoteHost", String::new()),
        ("NewExternalPort", external.to_string()),
        ("NewProtocol", "UDP".to_string()),
    ];
    soap(c, "DeletePortMapping", &args).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

    #[test]
    fn ssdp_answers_count_only_from_the_gateway_about_itself() {
        let from = SocketAddr::from((GW, 1900));
        let ok = b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nLocation: http://198.51.100.1:41234/rootDesc.xml\r\n\r\n";
        assert_eq!(
            parse_ssdp(ok, from, GW),
            Some((SocketAddrV4::new(GW, 41234), "/rootDesc.xml".into()))
        );
        // Another host of the LAN answering, or the gateway sending us elsewhere.
        assert_eq!(
            parse_ssdp(ok, "198.51.100.7:1900".parse().unwrap(), GW),
            None
        );
        let elsewhere = String::from_utf8_lossy(ok).replace("198.51.100.1:41234", "192.0.2.9:80");
        assert_eq!(parse_ssdp(elsewhere.as_bytes(), from, GW), None);
        let named = String::from_utf8_lossy(ok).replace("198.51.100.1", "router.lan");
        assert_eq!(parse_ssdp(named.as_bytes(), from, GW), None);
        // Oversized, garbled, not a success, a header line smuggled into the path.
        let mut huge = ok.to_vec();
        huge.resize(MAX_SSDP + 1, b' ');
        assert_eq!(parse_ssdp(&huge, from, GW), None);
        assert_eq!(parse_ssdp(&[0xff, 0xfe, 0, 1, 2], from, GW), None);
        let refused = String::from_utf8_lossy(ok).replace("200 OK", "404 Not Found");
        assert_eq!(parse_ssdp(refused.as_bytes(), from, GW), None);
        let long = String::from_utf8_lossy(ok).replace("rootDesc", &"a".repeat(MAX_FIELD));
        assert_eq!(parse_ssdp(long.as_bytes(), from, GW), None);
        assert_eq!(parse_url("http://198.51.100.1:0/x"), None);
        assert_eq!(parse_url("http://198.51.100.1:99999/x"), None);
        assert_eq!(parse_url("https://198.51.100.1/x"), None);
        assert_eq!(parse_url("http://198.51.100.1/a b"), None);
    }

    #[test]
    fn descriptions_yield_a_wan_connection_service_on_the_router() {
        let host = SocketAddrV4::new(GW, 41234);
        let xml = r#"<?xml version="1.0"?><root><device><serviceList>
            <service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
              <controlURL>/ctl/L3F</controlURL></service>
            </serviceList><deviceList><device><serviceList>
            <service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
              <controlURL>/ctl/IPConn</controlURL></service>
            </serviceList></device></deviceList></device></root>"#;
        assert_eq!(
            find_control(xml, host),
            Ok((
                "urn:schemas-upnp-org:service:WANIPConnection:1".into(),
                "/ctl/IPConn".into()
            ))
        );
        let absolute = xml.replace("/ctl/IPConn", "http://198.51.100.1:41234/ctl/IPConn");
        assert_eq!(find_control(&absolute, host).unwrap().1, "/ctl/IPConn");
        // A control URL on another host, one that smuggles a line, or none at all.
        let away = xml.replace("/ctl/IPConn", "http://192.0.2.9:80/ctl");
        assert_eq!(find_control(&away, host), Err(PortMapError::NoIgd));
        let smuggled = xml.replace("/ctl/IPConn", "/ctl\r\nX-Evil: 1");
        assert_eq!(find_control(&smuggled, host), Err(PortMapError::NoIgd));
        assert_eq!(find_control("<root>", host), Err(PortMapError::NoIgd));
        let unclosed = xml.replace(
            "</controlURL></service>\n            </serviceList></device>",
            "",
        );
        assert!(find_control(&unclosed, host).is_err());
    }

    #[test]
    fn http_and_soap_answers_are_bounded_and_checked() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello and more";
        assert_eq!(parse_http(ok), Ok((200, b"hello".to_vec())));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n";
        assert_eq!(parse_http(chunked), Ok((200, b"hello!".to_vec())));
        let lying = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffff\r\nhello\r\n";
        assert!(parse_http(lying).is_err());
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\nhello";
        assert!(parse_http(short).is_err());
        let mut huge = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        huge.resize(MAX_HTTP + 1, b'a');
        assert_eq!(parse_http(&huge), Err(PortMapError::Oversized(MAX_HTTP)));
        assert!(parse_http(b"garbage").is_err());
        assert!(parse_http(b"SSH-2.0-x\r\n\r\n").is_err());

        let answer = r#"<s:Envelope><s:Body><u:GetExternalIPAddressResponse xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1">
            <NewExternalIPAddress>192.0.1.14</NewExternalIPAddress></u:GetExternalIPAddressResponse></s:Body></s:Envelope>"#;
        assert_eq!(parse_external(answer), Ok(Ipv4Addr::new(192, 0, 1, 14)));
        for bad in [
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "not an address",
            "",
        ] {
            let a = answer.replace("192.0.1.14", bad);
            assert_eq!(parse_external(&a), Err(PortMapError::Malformed), "{bad}");
        }
        let long = answer.replace("192.0.1.14", &"1".repeat(MAX_FIELD + 1));
        assert_eq!(parse_external(&long), Err(PortMapError::Malformed));
        let env = envelope(
            SERVICES[1],
            "DeletePortMapping",
            &[("NewProtocol", "UDP".into())],
        );
        assert!(env.contains("<u:DeletePortMapping xmlns:u=\"urn:schemas-upnp-org:service:WANIPConnection:1\"><NewProtocol>UDP</NewProtocol></u:DeletePortMapping>"));
    }

    /// A router whose description is larger than the bound, served over real TCP: the
    /// read stops at the bound and nothing is parsed.
    #[tokio::test]
    async fn an_oversized_description_is_refused() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(at) = l.local_addr().unwrap() else {
            unreachable!()
        };
        let router = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = [0u8; 512];
            let _ = s.read(&mut req).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
            let junk = vec![b'<'; 16 * 1024];
            // Four times the bound; the client hangs up once it has read past it.
            for _ in 0..16 {
                if s.write_all(&junk).await.is_err() {
                    break;
                }
            }
        });
        let r = http(at, b"GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(r.unwrap_err(), PortMapError::Oversized(MAX_HTTP));
        router.await.unwrap();
    }
}
