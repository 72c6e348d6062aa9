//! Sizes as people write them on a command line (`500M`, `1.5G`), for the client and
//! the server alike.

/// Why a size did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a size: write bytes or a number with K, M, G or T (e.g. 500M, 10G, 1.5G)")]
pub struct SizeError(pub String);

/// Parse `500M`, `10G`, `1.5G`, `512K`, `2T`, `123` (bytes); binary units (1K = 1024),
/// an optional `B`/`iB` suffix and any case.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let err = || SizeError(s.to_string());
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, mult): (&str, u64) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1 << 10),
        Some('m') => (&body[..body.len() - 1], 1 << 20),
        Some('g') => (&body[..body.len() - 1], 1 << 30),
        Some('t') => (&body[..body.len() - 1], 1 << 40),
        Some(c) if c.is_ascii_digit() => (body, 1),
        _ => return Err(err()),
    };
    let num = num.trim();
    if num.is_empty() || num.starts_with('-') || num.starts_with('+') {
        return Err(err());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(err);
    }
    let f: f64 = num.parse().map_err(|_| err())?;
    let v = f * mult as f64;
    if !v.is_finite() || v < 0.0 || v >= u64::MAX as f64 {
        return Err(err());
    }
    Ok(v.round() as u64)
}
