//! Storage audits without the data: the server checks that a peer still holds a chunk,
//! knowing only the chunk's id (the BLAKE3 hash of its stored bytes) and size.
//!
//! The server picks a random, chunk-aligned byte range of the chunk and a random nonce
//! ([`Challenge`]); the holder answers with the bytes of that range and the chaining
//! values of every BLAKE3 subtree that lies wholly outside it ([`Answer`]). That is a
//! BLAKE3 verified-streaming proof (what Bao calls a slice): the verifier hashes the range
//! itself, merges the given chaining values along the tree's path, and must arrive at the
//! chunk id. Nobody can forge it without the range's bytes (that would be a BLAKE3
//! second preimage), so a peer that deleted a chunk, kept only its hashes, corrupted it or
//! answers with another chunk's bytes fails; the nonce ties an answer to one challenge.
//!
//! The tree is BLAKE3's own: 1024-byte leaves, each left subtree the largest power of two
//! of leaves smaller than its parent ([`blake3::hazmat::left_subtree_len`]). A range starts
//! on a leaf boundary and ends on one or at the end of the chunk, so every subtree is
//! either wholly inside the range (the verifier hashes it), wholly outside (one chaining
//! value), or split. The chaining values are listed in the order a depth-first, left-first
//! walk meets the outside subtrees; a chunk of `n` leaves needs at most `2·log2(n)` of them.
//!
//! Wire forms (all integers big-endian, every length bounded before use):
//!
//! ```text
//! challenge = chunk_id [32] | size u32 | offset u32 | len u32 | nonce [16]      (60 bytes)
//! answer    = nonce [16] | len u32 (≤ MAX_RANGE) | bytes [len]
//!             | count u16 (≤ MAX_PROOF_CVS) | count × chaining_value [32]
//! ```

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use subtle::ConstantTimeEq;

use crate::ids::ChunkId;
use crate::token::MAX_CHUNK_SIZE;

/// BLAKE3's leaf size: ranges start (and end, but for the last leaf) on these boundaries.
pub const LEAF: u32 = 1024;
/// Bytes of chunk data one audit asks for (fewer for a smaller chunk).
pub const RANGE: u32 = 4 * LEAF;
/// The largest range an answer may carry.
pub const MAX_RANGE: u32 = 16 * LEAF;
/// The most chaining values a proof may carry: two per tree level, and a chunk of at most
/// [`MAX_CHUNK_SIZE`] bytes has at most 15 levels above its leaves.
pub const MAX_PROOF_CVS: usize = 64;
/// Encoded length of a [`Challenge`].
pub const CHALLENGE_LEN: usize = 60;
/// Length of the nonce that ties an answer to its challenge.
pub const NONCE_LEN: usize = 16;
/// Encoded length of the largest possible [`Answer`].
pub const MAX_ANSWER_LEN: usize = NONCE_LEN + 4 + MAX_RANGE as usize + 2 + 32 * MAX_PROOF_CVS;

/// Why an audit failed (or a challenge or answer was refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// A challenge or answer does not parse or breaks a bound.
    #[error("malformed audit message: {0}")]
    Malformed(&'static str),
    /// The answer is for another challenge (an old answer replayed).
    #[error("the answer's nonce is not the challenge's")]
    WrongNonce,
    /// The answer carries another number of bytes than the range asked for.
    #[error("the answer's range is not the one asked for")]
    WrongRange,
    /// The bytes and chaining values do not hash to the chunk id.
    #[error("the proof does not hash to the chunk id")]
    BadProof,
    /// The answer came after the deadline.
    #[error("the answer came after the deadline")]
    Late,
}

impl AuditError {
    /// A short stable name, for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            AuditError::Malformed(_) => "malformed",
            AuditError::WrongNonce => "wrong_nonce",
            AuditError::WrongRange => "wrong_range",
            AuditError::BadProof => "bad_proof",
            AuditError::Late => "late",
        }
    }
}

/// What the server asks a holder to prove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// The chunk (or erasure shard).
    pub chunk: ChunkId,
    /// Its stored size, as the server recorded it.
    pub size: u32,
    /// First byte of the range (a multiple of [`LEAF`]).
    pub offset: u32,
    /// Bytes in the range.
    pub len: u32,
    /// Random per challenge, echoed by the answer.
    pub nonce: [u8; NONCE_LEN],
}

impl Challenge {
    /// A challenge for a random range of `chunk` (`size` bytes) with a fresh nonce.
    pub fn random(chunk: ChunkId, size: u32) -> Result<Challenge, getrandom::Error> {
        let mut r = [0u8; NONCE_LEN + 8];
        getrandom::fill(&mut r)?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&r[..NONCE_LEN]);
        let pick = u64::from_be_bytes(r[NONCE_LEN..].try_into().expect("8 bytes"));
        Ok(Challenge::at(chunk, size, pick, nonce))
    }

    /// The challenge whose range is leaf `pick` modulo the chunk's leaves.
    pub fn at(chunk: ChunkId, size: u32, pick: u64, nonce: [u8; NONCE_LEN]) -> Challenge {
        let leaves = u64::from(size.div_ceil(LEAF).max(1));
        let offset = (pick % leaves) as u32 * LEAF;
        let len = RANGE.min(size.saturating_sub(offset));
        Challenge {
            chunk,
            size,
            offset,
            len,
            nonce,
        }
    }

    /// The 60-byte wire form.
    pub fn encode(&self) -> [u8; CHALLENGE_LEN] {
        let mut b = [0u8; CHALLENGE_LEN];
        b[..32].copy_from_slice(self.chunk.as_bytes());
        b[32..36].copy_from_slice(&self.size.to_be_bytes());
        b[36..40].copy_from_slice(&self.offset.to_be_bytes());
        b[40..44].copy_from_slice(&self.len.to_be_bytes());
        b[44..].copy_from_slice(&self.nonce);
        b
    }

    /// Parse and bound-check the wire form.
    pub fn decode(b: &[u8; CHALLENGE_LEN]) -> Result<Challenge, AuditError> {
        let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let c = Challenge {
            chunk: ChunkId(b[..32].try_into().expect("32 bytes")),
            size: u32_at(32),
            offset: u32_at(36),
            len: u32_at(40),
            nonce: b[44..].try_into().expect("16 bytes"),
        };
        c.check()?;
        Ok(c)
    }

    /// The bounds every challenge keeps: a chunk of 1..=MAX_CHUNK_SIZE bytes, a non-empty
    /// range of at most [`MAX_RANGE`] bytes inside it, starting on a leaf boundary and
    /// ending on one or at the end.
    pub fn check(&self) -> Result<(), AuditError> {
        let end = u64::from(self.offset) + u64::from(self.len);
        if self.size == 0 || self.size > MAX_CHUNK_SIZE {
            return Err(AuditError::Malformed("chunk size"));
        }
        if self.len == 0 || self.len > MAX_RANGE || end > u64::from(self.size) {
            return Err(AuditError::Malformed("range length"));
        }
        if self.offset % LEAF != 0 || (end % u64::from(LEAF) != 0 && end != u64::from(self.size)) {
            return Err(AuditError::Malformed("range alignment"));
        }
        Ok(())
    }

    fn range(&self) -> (u64, u64) {
        let a = u64::from(self.offset);
        (a, a + u64::from(self.len))
    }

    /// Check `answer`, received at `received_ms`, against this challenge and its
    /// `deadline_ms`: in time, for this nonce, for this range, and hashing to the chunk id.
    pub fn verify(
        &self,
        answer: &Answer,
        received_ms: u64,
        deadline_ms: u64,
    ) -> Result<(), AuditError> {
        if received_ms > deadline_ms {
            return Err(AuditError::Late);
        }
        if !bool::from(answer.nonce.ct_eq(&self.nonce)) {
            return Err(AuditError::WrongNonce);
        }
        if answer.data.len() != self.len as usize {
            return Err(AuditError::WrongRange);
        }
        self.check()?;
        let (a, b) = self.range();
        let mut cvs = answer.proof.iter();
        let mut src = Verifying {
            a,
            data: &answer.data,
            cvs: &mut cvs,
        };
        let root = walk(&mut src, 0, u64::from(self.size), true, a, b)?;
        if cvs.next().is_some() {
            return Err(AuditError::BadProof);
        }
        match root {
            Node::Root(h) if bool::from(h.ct_eq(self.chunk.as_bytes())) => Ok(()),
            _ => Err(AuditError::BadProof),
        }
    }
}

/// A holder's answer to a [`Challenge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The challenge's nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The range's bytes.
    pub data: Vec<u8>,
    /// Chaining values of the subtrees outside the range, in walk order.
    pub proof: Vec<ChainingValue>,
}

impl Answer {
    /// Prove `challenge` from the whole stored chunk `chunk`. The chaining values come
    /// from these bytes, so bytes that are not the chunk's produce a proof that fails.
    pub fn prove(challenge: &Challenge, chunk: &[u8]) -> Result<Answer, AuditError> {
        challenge.check()?;
        if chunk.len() != challenge.size as usize {
            return Err(AuditError::WrongRange);
        }
        let (a, b) = challenge.range();
        let mut src = Proving {
            chunk,
            proof: Vec::new(),
        };
        walk(&mut src, 0, u64::from(challenge.size), true, a, b)?;
        Ok(Answer {
            nonce: challenge.nonce,
            data: chunk[a as usize..b as usize].to_vec(),
            proof: src.proof,
        })
    }

    /// Length of the wire form.
    pub fn encoded_len(&self) -> usize {
        NONCE_LEN + 6 + self.data.len() + 32 * self.proof.len()
    }

    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.encoded_len());
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&(self.data.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.data);
        b.extend_from_slice(&(self.proof.len() as u16).to_be_bytes());
        for cv in &self.proof {
            b.extend_from_slice(cv);
        }
        b
    }

    /// Parse the wire form: exactly one answer, every length within its bound.
    pub fn decode(b: &[u8]) -> Result<Answer, AuditError> {
        if b.len() > MAX_ANSWER_LEN {
            return Err(AuditError::Malformed("answer too long"));
        }
        let mut r = Reader(b);
        let nonce = r.take(NONCE_LEN)?.try_into().expect("16 bytes");
        let len = u32::from_be_bytes(r.take(4)?.try_into().expect("4 bytes"));
        if len > MAX_RANGE {
            return Err(AuditError::Malformed("range too long"));
        }
        let data = r.take(len as usize)?.to_vec();
        let count = u16::from_be_bytes(r.take(2)?.try_into().expect("2 bytes")) as usize;
        if count > MAX_PROOF_CVS {
            return Err(AuditError::Malformed("proof too long"));
        }
        let proof = (0..count)
            .map(|_| Ok(r.take(32)?.try_into().expect("32 bytes")))
            .collect::<Result<_, AuditError>>()?;
        if !r.0.is_empty() {
            return Err(AuditError::Malformed("trailing bytes"));
        }
        Ok(Answer { nonce, data, proof })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], AuditError> {
        if self.0.len() < n {
            return Err(AuditError::Malformed("truncated"));
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
}

/// A subtree's hash: the chunk's root hash, or a chaining value below it.
enum Node {
    Root([u8; 32]),
    Cv(ChainingValue),
}

/// Where the walk gets subtree hashes: from the whole chunk (proving) or from the answer
/// (verifying).
trait Subtrees {
    /// The chaining value of the subtree `[start, start + len)`, wholly outside the range.
    fn outside(&mut self, start: u64, len: u64) -> Result<ChainingValue, AuditError>;
    /// The range's bytes `[start, start + len)`, wholly inside it.
    fn inside(&self, start: u64, len: u64) -> &[u8];
}

struct Proving<'a> {
    chunk: &'a [u8],
    proof: Vec<ChainingValue>,
}

impl Subtrees for Proving<'_> {
    fn outside(&mut self, start: u64, len: u64) -> Result<ChainingValue, AuditError> {
        let cv = subtree_cv(start, self.inside(start, len));
        self.proof.push(cv);
        Ok(cv)
    }
    fn inside(&self, start: u64, len: u64) -> &[u8] {
        &self.chunk[start as usize..(start + len) as usize]
    }
}

struct Verifying<'a, 'b> {
    a: u64,
    data: &'a [u8],
    cvs: &'b mut std::slice::Iter<'a, ChainingValue>,
}

impl Subtrees for Verifying<'_, '_> {
    fn outside(&mut self, _: u64, _: u64) -> Result<ChainingValue, AuditError> {
        self.cvs.next().copied().ok_or(AuditError::BadProof)
    }
    fn inside(&self, start: u64, len: u64) -> &[u8] {
        let s = (start - self.a) as usize;
        &self.data[s..s + len as usize]
    }
}

fn subtree_cv(start: u64, bytes: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(start);
    h.update(bytes);
    h.finalize_non_root()
}

/// Hash the subtree `[start, start + len)` of the tree over the whole chunk, taking the
/// range `[a, b)`'s bytes as they are and every subtree outside the range as one chaining
/// value.
fn walk(
    src: &mut dyn Subtrees,
    start: u64,
    len: u64,
    root: bool,
    a: u64,
    b: u64,
) -> Result<Node, AuditError> {
    let end = start + len;
    if a <= start && end <= b {
        let bytes = src.inside(start, len);
        return Ok(if root {
            Node::Root(*blake3::hash(bytes).as_bytes())
        } else {
            Node::Cv(subtree_cv(start, bytes))
        });
    }
    if end <= a || b <= start {
        // The root always overlaps a non-empty range inside the chunk.
        return src.outside(start, len).map(Node::Cv);
    }
    if len <= u64::from(LEAF) {
        // A leaf cut by the range: the range is not leaf-aligned.
        return Err(AuditError::Malformed("range alignment"));
    }
    let left = left_subtree_len(len);
    let cv = |n: Node| match n {
        Node::Cv(cv) => cv,
        Node::Root(h) => h,
    };
    let l = cv(walk(src, start, left, false, a, b)?);
    let r = cv(walk(src, start + left, len - left, false, a, b)?);
    Ok(if root {
        Node::Root(*merge_subtrees_root(&l, &r, Mode::Hash).as_bytes())
    } else {
        Node::Cv(merge_subtrees_non_root(&l, &r, Mode::Hash))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    const NONCE: [u8; NONCE_LEN] = [7; NONCE_LEN];

    #[test]
    fn every_range_of_every_shape_proves_and_verifies() {
        for size in [1, 1000, 1024, 1025, 3000, 4096, 5000, 8192, 65_537, 1 << 20] {
            let data = chunk(size, 1);
            let id = ChunkId::of(&data);
            let leaves = (size as u64).div_ceil(1024);
            for pick in [0, 1, 2, leaves / 2, leaves - 1, leaves + 3] {
                let c = Challenge::at(id, size as u32, pick, NONCE);
                let ans = Answer::prove(&c, &data).unwrap();
                assert!(ans.proof.len() <= MAX_PROOF_CVS);
                assert_eq!(ans.encode().len(), ans.encoded_len());
                let wire = Answer::decode(&ans.encode()).unwrap();
                assert_eq!(wire, ans);
                assert_eq!(c.verify(&wire, 1, 2), Ok(()), "size {size} pick {pick}");
                assert!(ans.encode().len() <= 4096 + 64 * 32 + 22, "a few KiB");
            }
        }
    }

    #[test]
    fn the_largest_chunk_needs_a_bounded_proof() {
        let size = MAX_CHUNK_SIZE as usize;
        let data = vec![9u8; size];
        let c = Challenge::at(ChunkId::of(&data), size as u32, 5555, NONCE);
        let ans = Answer::prove(&c, &data).unwrap();
        assert!(
            ans.proof.len() <= 2 * 15,
            "{} chaining values",
            ans.proof.len()
        );
        assert_eq!(c.verify(&ans, 0, 0), Ok(()));
    }

    fn setup() -> (Vec<u8>, Challenge, Answer) {
        let data = chunk(50_000, 3);
        let c = Challenge::at(ChunkId::of(&data), 50_000, 17, NONCE);
        let ans = Answer::prove(&c, &data).unwrap();
        (data, c, ans)
    }

    #[test]
    fn a_tampered_byte_fails() {
        let (_, c, mut ans) = setup();
        ans.data[100] ^= 1;
        assert_eq!(c.verify(&ans, 0, 1), Err(AuditError::BadProof));
        let (_, c, mut ans) = setup();
        ans.proof[0][0] ^= 1;
        assert_eq!(c.verify(&ans, 0, 1), Err(AuditError::BadProof));
    }

    #[test]
    fn a_corrupt_byte_outside_the_range_fails_too() {
        // A holder proving from corrupt bytes gets wrong chaining values.
        let (mut data, c, _) = setup();
        data[0] ^= 0x80;
        let ans = Answer::prove(&c, &data).unwrap();
        assert_eq!(c.verify(&ans, 0, 1), Err(AuditError::BadProof));
    }

    #[test]
    fn the_wrong_range_fails() {
        let (data, c, _) = setup();
        // Proven for another range, sent against this challenge.
        let other = Challenge { offset: 0, ..c };
        let ans = Answer::prove(&other, &data).unwrap();
        assert_eq!(c.verify(&ans, 0, 1), Err(AuditError::BadProof));
        // A shorter range.
        let short = Challenge { len: 1024, ..c };
        let ans = Answer::prove(&short, &data).unwrap();
        assert_eq!(c.verify(&ans, 0, 1), Err(AuditError::WrongRange));
    }

    #[test]
    fn another_chunks_data_fails() {
        let (_, c, _) = setup();
        let other = chunk(50_000, 99);
        let ans = Answer::prove(&c, &other).unwrap();
        assert_eq!(c.verify(&ans, 0, 1), Err(AuditError::BadProof));
    }

    #[test]
    fn hashes_alone_fail() {
        // A holder that kept the chunk's tree (every chaining value) but not its bytes
        // can send an honest-looking proof, but not the range's bytes.
        let (_, c, mut ans) = setup();
        ans.data.iter_mut().for_each(|b| *b = 0);
        assert_eq!(c.verify(&ans, 0, 1), Err(AuditError::BadProof));
    }

    #[test]
    fn a_replayed_answer_to_a_new_challenge_fails() {
        let (data, c, old) = setup();
        // Same range, new nonce: the nonce gives it away.
        let again = Challenge {
            nonce: [8; 16],
            ..c
        };
        assert_eq!(again.verify(&old, 0, 1), Err(AuditError::WrongNonce));
        // With the nonce rewritten, a new range still fails.
        let fresh = Challenge::at(c.chunk, c.size, 3, [8; 16]);
        let forged = Answer {
            nonce: fresh.nonce,
            ..old
        };
        assert_eq!(fresh.verify(&forged, 0, 1), Err(AuditError::BadProof));
        assert!(Answer::prove(&fresh, &data).is_ok());
    }

    #[test]
    fn a_late_answer_fails() {
        let (_, c, ans) = setup();
        assert_eq!(c.verify(&ans, 1001, 1000), Err(AuditError::Late));
        assert_eq!(c.verify(&ans, 1000, 1000), Ok(()));
    }

    #[test]
    fn extra_or_missing_chaining_values_fail() {
        let (_, c, mut ans) = setup();
        ans.proof.push([0; 32]);
        assert_eq!(c.verify(&ans, 0, 1), Err(AuditError::BadProof));
        let (_, c, mut ans) = setup();
        ans.proof.pop();
        assert_eq!(c.verify(&ans, 0, 1), Err(AuditError::BadProof));
    }

    #[test]
    fn bounds_are_enforced() {
        let (_, c, ans) = setup();
        let wire = ans.encode();
        for cut in 0..wire.len() {
            assert!(Answer::decode(&wire[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = wire.clone();
        long.push(0);
        assert!(Answer::decode(&long).is_err());
        let mut huge = wire.clone();
        huge[16..20].copy_from_slice(&(MAX_RANGE + 1).to_be_bytes());
        assert!(Answer::decode(&huge).is_err());
        assert_eq!(Challenge::decode(&c.encode()), Ok(c));
        for bad in [
            Challenge { offset: 1, ..c },
            Challenge { len: 0, ..c },
            Challenge { len: 1000, ..c },
            Challenge {
                len: MAX_RANGE + LEAF,
                ..c
            },
            Challenge { size: 0, ..c },
            Challenge {
                offset: c.size,
                ..c
            },
        ] {
            assert!(Challenge::decode(&bad.encode()).is_err(), "{bad:?}");
        }
    }
}
