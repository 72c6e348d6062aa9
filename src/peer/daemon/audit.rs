//! Audits: the server asks for a random range of a chunk this daemon holds, with a BLAKE3
//! proof that it belongs to the chunk id ([`crate::audit`]). The request is a control
//! message the server signs under this peer's key (direction server→peer, kind Audit,
//! counter and timestamp checked), so nobody else can make the daemon read its disk.
//!
//! Answering costs one read of the chunk and one BLAKE3 pass over it; at most
//! [`AUDITS_AT_ONCE`] run together, so audits hold at most that many chunks in memory.

use quinn::{RecvStream, SendStream};
use tokio::io::AsyncReadExt;

use super::{read_exact, write, ReadFail, Shared};
use crate::audit::{Answer, Challenge, CHALLENGE_LEN};
use crate::control::{now_ms, ControlAuth, ControlError, MessageKind, AUTH_LEN};
use crate::peer::wire::{self, Refusal};

/// Audits answered at once.
pub(super) const AUDITS_AT_ONCE: usize = 2;

/// A misbehaviour for tests, set by the `PEERSTASH_TEST_CHEAT` environment variable and
/// honoured only by debug builds: a release daemon never cheats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cheat {
    /// `hashes-only`: behave as a peer that kept each chunk's BLAKE3 tree but threw the
    /// bytes away: audits are answered with the right chaining values and zeroed bytes,
    /// and reads find nothing.
    HashesOnly,
}

impl Cheat {
    /// The misbehaviour the environment asks for, if this is a debug build.
    pub(super) fn from_env() -> Option<Cheat> {
        if !cfg!(debug_assertions) {
            return None;
        }
        match std::env::var("PEERSTASH_TEST_CHEAT").ok()?.as_str() {
            "hashes-only" => {
                tracing::warn!("test-only misbehaviour: answering audits from hashes only");
                Some(Cheat::HashesOnly)
            }
            _ => None,
        }
    }
}

/// Serve one audit: check the server's signature, read the chunk, prove the range.
pub(super) async fn serve(
    shared: &Shared,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), ReadFail> {
    let t = shared.limits.read_timeout;
    let mut b = [0u8; AUTH_LEN + CHALLENGE_LEN];
    read_exact(recv, &mut b, t).await?;
    let (auth, body) = b.split_at(AUTH_LEN);
    let checked = ControlAuth::decode(auth).and_then(|auth| {
        if auth.peer != shared.me {
            return Err(ControlError::UnknownPeer(auth.peer));
        }
        shared
            .control
            .verify(&auth, &shared.key, MessageKind::Audit, body, now_ms())
    });
    if let Err(e) = checked {
        return Err(ReadFail::Refuse(Refusal::BadControl((&e).into())));
    }
    let challenge = Challenge::decode(body.try_into().expect("60 bytes"))
        .map_err(|_| ReadFail::Refuse(Refusal::Malformed))?;
    let _slot = shared.audits.acquire().await.map_err(|_| ReadFail::Gone)?;
    let file = match tokio::fs::File::open(shared.store.path_of(&challenge.chunk)).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return write(send, t, &Refusal::NotFound.encode()).await
        }
        Err(e) => {
            tracing::error!(chunk = ?challenge.chunk, error = %e, "opening a chunk to audit");
            return write(send, t, &Refusal::Internal.encode()).await;
        }
    };
    // One byte more than the size tells a longer file without reading all of it.
    let mut bytes = Vec::with_capacity(challenge.size as usize + 1);
    if let Err(e) = file
        .take(u64::from(challenge.size) + 1)
        .read_to_end(&mut bytes)
        .await
    {
        tracing::error!(chunk = ?challenge.chunk, error = %e, "reading a chunk to audit");
        return write(send, t, &Refusal::Internal.encode()).await;
    }
    if bytes.len() != challenge.size as usize {
        return write(send, t, &Refusal::SizeMismatch.encode()).await;
    }
    let cheat = shared.cheat;
    let answer = tokio::task::spawn_blocking(move || {
        let mut a = Answer::prove(&challenge, &bytes)?;
        if cheat == Some(Cheat::HashesOnly) {
            a.data.iter_mut().for_each(|b| *b = 0);
        }
        Ok::<_, crate::audit::AuditError>(a)
    })
    .await;
    let Ok(Ok(answer)) = answer else {
        return write(send, t, &Refusal::Internal.encode()).await;
    };
    let answer = answer.encode();
    let mut reply = wire::encode_record(Ok(())).to_vec();
    reply.extend_from_slice(&(answer.len() as u32).to_be_bytes());
    reply.extend_from_slice(&answer);
    write(send, t, &reply).await
}
