//! Content-defined chunking (FastCDC, 256 KiB / 1 MiB / 4 MiB): a small edit to a large
//! file changes only the chunks around it, so a re-copied file uploads little.

use std::io::Read;

/// Smallest chunk (except a file's last one).
pub const MIN_CHUNK: usize = 256 * 1024;
/// Target average chunk size.
pub const AVG_CHUNK: usize = 1024 * 1024;
/// Largest chunk.
pub const MAX_CHUNK: usize = 4 * 1024 * 1024;

/// Stream `source` through FastCDC, calling `each(offset, bytes)` for every chunk in order.
/// Memory stays bounded by [`MAX_CHUNK`] whatever the file size. An empty source yields
/// no chunk.
pub fn for_each_chunk<R: Read, E>(
    source: R,
    mut each: impl FnMut(u64, Vec<u8>) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<std::io::Error>,
{
    let cdc = fastcdc::v2020::StreamCDC::new(source, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK);
    for chunk in cdc {
        let chunk = chunk.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(io) => io,
            other => std::io::Error::other(other.to_string()),
        })?;
        each(chunk.offset, chunk.data)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_edit_keeps_most_chunks() {
        let mut data = vec![0u8; 12 * 1024 * 1024];
        let mut x = 0x1234_5678u32;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let ids = |d: &[u8]| {
            let mut v = Vec::new();
            for_each_chunk::<_, std::io::Error>(d, |off, c| {
                assert!(c.len() <= MAX_CHUNK);
                v.push((off, blake3::hash(&c)));
                Ok(())
            })
            .unwrap();
            v
        };
        let a = ids(&data);
        assert_eq!(a[0].0, 0);
        data[6 * 1024 * 1024] ^= 0xff;
        let b = ids(&data);
        let same = a.iter().filter(|x| b.contains(x)).count();
        assert!(same + 2 >= a.len(), "{same} of {}", a.len());
        assert!(ids(&[]).is_empty());
    }
}
