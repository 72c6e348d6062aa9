//! Content-defined chunking (FastCDC, 256 KiB / 1 MiB / 4 MiB): a small edit to a large
//! file changes only the chunks around it, so a re-copied file uploads little.

use std::io::Read;

/// Smallest chunk (except a file's last one).
pub const MIN_CHUNK: usize = 256 * 1024;
/// Target average chunk size.
pub const AVG_CHUNK: usize = 1024 * 1024;
/// Largest chunk.
pub const MAX_CHUNK: usize = 4 * 1024 * 1024;

/// Bytes read ahead of the cut point. fastcdc's own `StreamCDC` keeps exactly
/// [`MAX_CHUNK`] and moves what is left to the front after every chunk (about three bytes
/// moved per byte chunked); with twice that, what is left moves only once at least
/// [`MAX_CHUNK`] bytes were cut (at most one byte per byte, about half on average).
const WINDOW: usize = 2 * MAX_CHUNK;

/// Stream `source` through FastCDC, calling `each(offset, bytes)` for every chunk in order.
/// The cut points are exactly those of fastcdc's `StreamCDC` (a cut looks at most
/// [`MAX_CHUNK`] bytes ahead, and every cut is made with that much in view, or all that
/// is left), so chunks stored before stay deduplicated. Memory stays bounded by
/// [`WINDOW`] whatever the file size. An empty source yields no chunk.
pub fn for_each_chunk<R: Read, E>(
    mut source: R,
    mut each: impl FnMut(u64, Vec<u8>) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<std::io::Error>,
{
    let mut buf: Vec<u8> = Vec::new();
    let (mut pos, mut offset, mut eof) = (0usize, 0u64, false);
    loop {
        if !eof && buf.len() - pos < MAX_CHUNK {
            buf.drain(..pos);
            pos = 0;
            let want = WINDOW - buf.len();
            buf.reserve_exact(want);
            let n = (&mut source).take(want as u64).read_to_end(&mut buf)?;
            eof = n < want;
        }
        let view = &buf[pos..];
        if view.is_empty() {
            return Ok(());
        }
        let (_, cut) =
            fastcdc::v2020::FastCDC::new(view, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK).cut(0, view.len());
        each(offset, view[..cut].to_vec())?;
        pos += cut;
        offset += cut as u64;
    }
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

    /// Pseudo-random bytes, with a long run of one byte in the middle (no cut point: the
    /// chunks there end at MAX_CHUNK).
    fn mixed(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9u32;
        let mut data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let run = len / 3..len / 3 + 3 * MAX_CHUNK + 12345;
        data[run].fill(7);
        data
    }

    #[test]
    fn cuts_are_those_of_fastcdc_streaming() {
        // Sizes around the window's edges, and a reader that returns odd short reads.
        struct Dribble<'a>(&'a [u8], usize);
        impl Read for Dribble<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                self.1 += 1;
                let n = out
                    .len()
                    .min(self.0.len())
                    .min(1 + (self.1 * 7919) % 300_000);
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let data = mixed(3 * WINDOW + 777);
        for len in [
            MIN_CHUNK + 1,
            MAX_CHUNK,
            WINDOW - 1,
            WINDOW,
            WINDOW + MAX_CHUNK / 2,
            data.len(),
        ] {
            let d = &data[..len];
            let theirs: Vec<(u64, Vec<u8>)> =
                fastcdc::v2020::StreamCDC::new(d, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
                    .map(|c| c.map(|c| (c.offset, c.data)).unwrap())
                    .collect();
            for dribble in [false, true] {
                let mut ours = Vec::new();
                let push = |o, c| -> Result<(), std::io::Error> {
                    ours.push((o, c));
                    Ok(())
                };
                if dribble {
                    for_each_chunk(Dribble(d, 0), push).unwrap();
                } else {
                    for_each_chunk(d, push).unwrap();
                }
                assert_eq!(ours.len(), theirs.len(), "{len} bytes, dribble {dribble}");
                assert!(ours == theirs, "{len} bytes, dribble {dribble}");
            }
        }
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
