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

/// Chunk a file of `len` bytes: one read and one chunk when it is at most [`MIN_CHUNK`]
/// (exactly what FastCDC would cut, without its 4 MiB zeroed buffer per file: most files
/// are small), else streamed through [`for_each_chunk`] (which reads in large blocks).
pub fn for_each_chunk_of_file<R: Read, E>(
    mut file: R,
    len: u64,
    mut each: impl FnMut(u64, Vec<u8>) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<std::io::Error>,
{
    if len > MIN_CHUNK as u64 {
        return for_each_chunk(file, each);
    }
    // One more byte than the file should hold: a file that grew is cut as a stream.
    let mut data = Vec::with_capacity(len as usize + 1);
    (&mut file)
        .take(MIN_CHUNK as u64 + 1)
        .read_to_end(&mut data)?;
    if data.len() > MIN_CHUNK {
        return for_each_chunk(std::io::Cursor::new(data).chain(file), each);
    }
    if data.is_empty() {
        return Ok(());
    }
    each(0, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (offset, length) of each chunk.
    type Cuts = Vec<(u64, usize)>;

    fn cuts(data: &[u8], len_hint: u64) -> (Cuts, Cuts) {
        let mut streamed = Vec::new();
        for_each_chunk(data, |o, c| -> Result<(), std::io::Error> {
            streamed.push((o, c.len()));
            Ok(())
        })
        .unwrap();
        let mut direct = Vec::new();
        for_each_chunk_of_file(data, len_hint, |o, c| -> Result<(), std::io::Error> {
            direct.push((o, c.len()));
            Ok(())
        })
        .unwrap();
        (streamed, direct)
    }

    #[test]
    fn small_files_are_cut_exactly_as_fastcdc_would() {
        let data: Vec<u8> = (0..MIN_CHUNK * 3).map(|i| (i * 7919 % 251) as u8).collect();
        for n in [
            0,
            1,
            4096,
            MIN_CHUNK - 1,
            MIN_CHUNK,
            MIN_CHUNK + 1,
            MIN_CHUNK * 3,
        ] {
            let (streamed, direct) = cuts(&data[..n], n as u64);
            assert_eq!(streamed, direct, "{n} bytes");
        }
        // A file that grew past its announced length is still cut whole.
        let (streamed, direct) = cuts(&data, 100);
        assert_eq!(streamed, direct);
        assert_eq!(direct.iter().map(|c| c.1).sum::<usize>(), data.len());
    }

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
