//! The storage daemon over real QUIC on loopback, with real SQLite and real files: storing
//! and fetching under tokens, every token attack sent to a live daemon (and what it gets),
//! bad bytes, the capacity limit, kill -9 during an upload, many clients at once, status
//! checks, heartbeats and resource limits. Tokens are minted here with the daemon peer's
//! key, exactly as the server mints them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{wait_for, Proc};
use peerstash::api::{Placement, RepairOrder, ReportRequest};
use peerstash::control::{now_ms, now_secs, ControlSigner, Direction, MessageKind};
use peerstash::keys::{random_bytes, random_u64};
use peerstash::peer::wire::{self, Op};
use peerstash::peer::{
    ControlReason, Daemon, DaemonConfig, PeerAddr, PeerClient, PeerError, RecordingLink,
    RunningDaemon, TokenReason,
};
use peerstash::tls::CertKey;
use peerstash::token::{
    ByteRange, Grant, Token, TokenClaims, TxKind, MAX_CHUNK_SIZE, MAX_TOKEN_LEN,
};
use peerstash::{ChunkId, PeerId, TransactionId, TransactionKey};
use tempfile::TempDir;

const REQUESTER: PeerId = PeerId(0xa11ce);
const CHILD_ENV: &str = "PEERSTASH_TEST_CHILD_DAEMON";

/// One storage peer under test: identity, key, certificate and directories.
struct TestPeer {
    id: PeerId,
    key: TransactionKey,
    cert: CertKey,
    storage: TempDir,
    state: TempDir,
}

impl TestPeer {
    fn new() -> TestPeer {
        TestPeer {
            id: PeerId(random_u64().unwrap()),
            key: TransactionKey::generate().unwrap(),
            cert: CertKey::self_signed(&["localhost", "127.0.0.1"]).unwrap(),
            storage: TempDir::new().unwrap(),
            state: TempDir::new().unwrap(),
        }
    }

    fn config(&self, capacity: u64) -> DaemonConfig {
        let mut c = DaemonConfig::new(
            self.id,
            self.key.clone(),
            "127.0.0.1:0".parse().unwrap(),
            self.storage.path().to_owned(),
            capacity,
            self.cert.clone(),
            self.state.path().to_owned(),
        );
        c.limits.read_timeout = Duration::from_secs(5);
        c
    }

    async fn start(&self, capacity: u64, link: Arc<RecordingLink>) -> RunningDaemon {
        Daemon::run(self.config(capacity), link).await.unwrap()
    }

    fn addr(&self, d: &RunningDaemon) -> PeerAddr {
        PeerAddr::direct(d.local_addr(), d.fingerprint())
    }

    /// A token for this peer, sealed with its key as the server would.
    fn token(&self, kind: TxKind, grants: &[(ChunkId, u32)]) -> Token {
        mint(
            &self.key,
            self.id,
            kind,
            grants,
            now_secs() - 5,
            now_secs() + 300,
        )
    }

    /// Every file in the store: stored chunks and temporary files.
    fn files(&self) -> Vec<PathBuf> {
        let mut f = files_under(&self.storage.path().join("chunks"));
        f.extend(files_under(&self.storage.path().join("tmp")));
        f
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

fn mint(
    key: &TransactionKey,
    target: PeerId,
    kind: TxKind,
    grants: &[(ChunkId, u32)],
    issued_at: u64,
    expires_at: u64,
) -> Token {
    TokenClaims {
        requester: REQUESTER,
        target,
        kind,
        txid: TransactionId(random_u64().unwrap()),
        issued_at,
        expires_at,
        grants: grants
            .iter()
            .map(|(c, s)| Grant {
                chunk: *c,
                size: *s,
                range: None,
            })
            .collect(),
    }
    .seal(&key.token_keys())
    .unwrap()
}

fn random_chunk(n: usize) -> (ChunkId, Vec<u8>) {
    let mut b = vec![0u8; n];
    random_bytes(&mut b).unwrap();
    (ChunkId::of(&b), b)
}

fn refs(chunks: &[(ChunkId, Vec<u8>)]) -> Vec<(ChunkId, u32)> {
    chunks.iter().map(|(c, b)| (*c, b.len() as u32)).collect()
}

fn rejected_reasons(link: &RecordingLink) -> Vec<String> {
    link.reports()
        .into_iter()
        .filter_map(|r| match r {
            ReportRequest::Rejected { reason, .. } => Some(reason),
            _ => None,
        })
        .collect()
}

async fn put_one(
    client: &PeerClient,
    peer: &PeerAddr,
    token: &Token,
    chunk: &(ChunkId, Vec<u8>),
) -> Result<(), PeerError> {
    let mut r = client
        .put(peer, token, std::slice::from_ref(chunk))
        .await
        .unwrap();
    assert_eq!(r.len(), 1);
    r.pop().unwrap()
}

/// Send raw request bytes on a fresh stream and read the first reply record.
async fn raw_request(client: &PeerClient, peer: &PeerAddr, bytes: &[u8]) -> Result<(), PeerError> {
    let (mut send, mut recv) = client.open_raw(peer).await.unwrap();
    // The daemon may stop reading as soon as it has refused: ignore write errors.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let mut b = [0u8; 2];
    recv.read_exact(&mut b).await.expect("a reply record");
    wire::decode_record(b).unwrap().map_err(PeerError::from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_and_fetch_single_and_batch() {
    let p = TestPeer::new();
    let link = Arc::new(RecordingLink::new());
    let d = p.start(1 << 30, link.clone()).await;
    let peer = p.addr(&d);
    let client = PeerClient::new().unwrap();

    // Single chunk under a single-chunk token.
    let one = random_chunk(100_000);
    let t = p.token(TxKind::Put, &refs(std::slice::from_ref(&one)));
    put_one(&client, &peer, &t, &one).await.unwrap();
    let got = client
        .get(
            &peer,
            &p.token(TxKind::Get, &refs(std::slice::from_ref(&one))),
            &one.0,
            100_000,
        )
        .await
        .unwrap();
    assert_eq!(got.as_bytes(), &one.1[..]);

    // A batch of 9 chunks (spread over several streams) under one batch token.
    let batch: Vec<_> = (0..9).map(|i| random_chunk(1000 + i * 70_000)).collect();
    let t = p.token(TxKind::Put, &refs(&batch));
    let results = client.put(&peer, &t, &batch).await.unwrap();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let gt = p.token(TxKind::Get, &refs(&batch));
    for (c, b) in &batch {
        assert_eq!(
            client
                .get(&peer, &gt, c, b.len() as u32)
                .await
                .unwrap()
                .as_bytes(),
            &b[..]
        );
    }
    assert_eq!(d.chunk_count(), 10);
    let expected_used: u64 = 100_000 + batch.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
    assert_eq!(d.used_bytes(), expected_used);

    // A stream token sends only its range.
    let (c, b) = &batch[5];
    let range = ByteRange {
        offset: 1234,
        len: 5000,
    };
    let st = TokenClaims {
        requester: REQUESTER,
        target: p.id,
        kind: TxKind::Stream,
        txid: TransactionId(random_u64().unwrap()),
        issued_at: now_secs(),
        expires_at: now_secs() + 60,
        grants: vec![Grant {
            chunk: *c,
            size: b.len() as u32,
            range: Some(range),
        }],
    }
    .seal(&p.key.token_keys())
    .unwrap();
    let part = client
        .stream(&peer, &st, c, b.len() as u32, range)
        .await
        .unwrap();
    assert_eq!(part, b[1234..1234 + 5000]);

    // The server hears what was stored: every chunk, under the right transaction ids.
    wait_for("confirms", Duration::from_secs(5), || {
        let n: usize = link.confirms().iter().map(|c| c.chunks.len()).sum();
        (n == 10).then_some(())
    });
    let batch_txid = TransactionId(u64::from_be_bytes(t.as_bytes()[10..18].try_into().unwrap()));
    let mut confirmed: Vec<ChunkId> = link
        .confirms()
        .iter()
        .filter(|c| c.txid == batch_txid)
        .flat_map(|c| c.chunks.clone())
        .collect();
    confirmed.sort();
    let mut want: Vec<ChunkId> = batch.iter().map(|(c, _)| *c).collect();
    want.sort();
    assert_eq!(confirmed, want);

    // A universal token with no entries (the server's peak-load mode) covers any chunk.
    let any = random_chunk(3000);
    // Like any token, it is good for one operation on each chunk.
    let ut = p.token(TxKind::Universal, &[]);
    put_one(&client, &peer, &ut, &any).await.unwrap();
    assert_eq!(
        client.get(&peer, &ut, &any.0, 3000).await,
        Err(PeerError::BadToken(TokenReason::Replayed))
    );
    let ut = p.token(TxKind::Universal, &[]);
    assert_eq!(
        client
            .get(&peer, &ut, &any.0, 3000)
            .await
            .unwrap()
            .into_bytes(),
        any.1
    );
    // It never deletes: the server would go on listing a chunk that is gone.
    let ut = p.token(TxKind::Universal, &[]);
    let r = client.delete(&peer, &ut, &[(any.0, 3000)]).await.unwrap();
    assert_eq!(r, vec![Err(PeerError::BadToken(TokenReason::WrongType))]);
    assert!(d.store().contains(&any.0));
    let r = client
        .delete(
            &peer,
            &p.token(TxKind::Delete, &[(any.0, 3000)]),
            &[(any.0, 3000)],
        )
        .await
        .unwrap();
    assert_eq!(r, vec![Ok(())]);

    // Delete under a delete token; a second delete of the same chunk is a replay, and a
    // chunk that is not there is NotFound.
    let gone = (batch[0].0, batch[0].1.len() as u32);
    let missing = random_chunk(10);
    let dt = p.token(TxKind::Delete, &[gone, (missing.0, 10)]);
    let r = client
        .delete(&peer, &dt, &[gone, (missing.0, 10)])
        .await
        .unwrap();
    assert_eq!(r, vec![Ok(()), Err(PeerError::NotFound)]);
    let r = client.delete(&peer, &dt, &[gone]).await.unwrap();
    assert_eq!(r, vec![Err(PeerError::BadToken(TokenReason::Replayed))]);
    assert!(!d.store().contains(&gone.0));
    assert_eq!(d.chunk_count(), 9);
    // A get for a deleted chunk: NotFound.
    let e = client
        .get(&peer, &p.token(TxKind::Get, &[gone]), &gone.0, gone.1)
        .await
        .unwrap_err();
    assert_eq!(e, PeerError::NotFound);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attack_is_refused_with_its_code_and_stores_nothing() {
    let p = TestPeer::new();
    let link = Arc::new(RecordingLink::new());
    let d = p.start(1 << 30, link.clone()).await;
    let peer = p.addr(&d);
    let client = PeerClient::new().unwrap();
    let chunk = random_chunk(50_000);
    let grant = refs(std::slice::from_ref(&chunk));
    let now = now_secs();
    let bad_token = |e: TokenReason| Err(PeerError::BadToken(e));

    let mut attacks: Vec<(&str, Token, Result<(), PeerError>)> = Vec::new();
    let forger = TransactionKey::generate().unwrap();
    attacks.push((
        "forged with a random key",
        mint(&forger, p.id, TxKind::Put, &grant, now, now + 300),
        bad_token(TokenReason::BadMac),
    ));
    let mut tampered = p.token(TxKind::Put, &grant).into_bytes();
    tampered[40] ^= 0x01;
    attacks.push((
        "tampered byte",
        Token::from_bytes(tampered),
        bad_token(TokenReason::BadMac),
    ));
    attacks.push((
        "expired",
        mint(&p.key, p.id, TxKind::Put, &grant, now - 1000, now - 500),
        bad_token(TokenReason::Expired),
    ));
    attacks.push((
        "not yet valid",
        mint(&p.key, p.id, TxKind::Put, &grant, now + 1000, now + 1300),
        bad_token(TokenReason::NotYetValid),
    ));
    let other = TransactionKey::generate().unwrap();
    attacks.push((
        "retargeted: a token for another peer",
        mint(
            &other,
            PeerId(p.id.0 ^ 1),
            TxKind::Put,
            &grant,
            now,
            now + 300,
        ),
        bad_token(TokenReason::WrongTarget),
    ));
    attacks.push((
        "wrong type: a get token used to put",
        p.token(TxKind::Get, &grant),
        bad_token(TokenReason::WrongType),
    ));
    attacks.push((
        "chunk not in the token",
        p.token(TxKind::Put, &[(ChunkId::of(b"another chunk"), 50_000)]),
        bad_token(TokenReason::NotInToken),
    ));
    attacks.push((
        "size other than the token's",
        p.token(TxKind::Put, &[(chunk.0, 49_999)]),
        Err(PeerError::SizeMismatch),
    ));
    let truncated = p.token(TxKind::Put, &grant).into_bytes()[..40].to_vec();
    attacks.push((
        "truncated token",
        Token::from_bytes(truncated),
        bad_token(TokenReason::Malformed),
    ));
    let mut garbage = vec![0u8; 300];
    random_bytes(&mut garbage).unwrap();
    garbage[0] = 1;
    garbage[1] = 0;
    garbage[2..10].copy_from_slice(&p.id.to_bytes());
    attacks.push((
        "garbage with a valid header",
        Token::from_bytes(garbage),
        bad_token(TokenReason::BadMac),
    ));
    let mut bad_version = p.token(TxKind::Put, &grant).into_bytes();
    bad_version[0] = 0x77;
    attacks.push((
        "unknown version",
        Token::from_bytes(bad_version),
        bad_token(TokenReason::UnsupportedVersion),
    ));

    for (what, token, want) in attacks {
        let got = put_one(&client, &peer, &token, &chunk).await;
        assert_eq!(got, want, "{what}");
        assert!(
            p.files().is_empty(),
            "{what}: left files behind: {:?}",
            p.files()
        );
    }

    // Oversized: a length prefix above MAX_TOKEN_LEN is refused before any token byte is
    // read (the client library would not even send it, so send raw bytes).
    let mut req = vec![Op::Put as u8];
    req.extend_from_slice(&(MAX_TOKEN_LEN as u32 + 1).to_be_bytes());
    req.extend_from_slice(&[0u8; 64]);
    assert_eq!(
        raw_request(&client, &peer, &req).await,
        bad_token(TokenReason::Oversized)
    );
    // A chunk announced above MAX_CHUNK_SIZE, under a valid token: TooLarge, nothing read.
    let t = p.token(TxKind::Put, &grant);
    let mut req = wire::encode_token_head(Op::Put, t.as_bytes());
    req.extend_from_slice(&1u16.to_be_bytes());
    req.extend_from_slice(&wire::encode_chunk_header(&chunk.0, MAX_CHUNK_SIZE + 1));
    assert_eq!(
        raw_request(&client, &peer, &req).await,
        Err(PeerError::TooLarge)
    );
    // An unknown op, an empty token, a zero chunk count.
    assert_eq!(
        raw_request(&client, &peer, &[0x42]).await,
        Err(PeerError::Malformed)
    );
    assert_eq!(
        raw_request(&client, &peer, &[Op::Put as u8, 0, 0, 0, 0]).await,
        bad_token(TokenReason::Malformed)
    );
    let mut req = wire::encode_token_head(Op::Put, p.token(TxKind::Put, &grant).as_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(
        raw_request(&client, &peer, &req).await,
        Err(PeerError::Malformed)
    );

    // Bytes that do not hash to the token's chunk id: refused after the upload, and the
    // temporary file is gone.
    let mut wrong = chunk.1.clone();
    wrong[777] ^= 0xff;
    let t = p.token(TxKind::Put, &grant);
    assert_eq!(
        put_one(&client, &peer, &t, &(chunk.0, wrong)).await,
        Err(PeerError::HashMismatch)
    );
    assert!(p.files().is_empty(), "{:?}", p.files());

    // Replayed: a token that stored the chunk once cannot be used again for it, and one
    // batch token naming a chunk once cannot carry it twice.
    let t = p.token(TxKind::Put, &grant);
    put_one(&client, &peer, &t, &chunk).await.unwrap();
    assert_eq!(
        put_one(&client, &peer, &t, &chunk).await,
        bad_token(TokenReason::Replayed)
    );
    let twice = random_chunk(20_000);
    let t = p.token(TxKind::Put, &refs(std::slice::from_ref(&twice)));
    let r = client
        .put(&peer, &t, &[twice.clone(), twice.clone()])
        .await
        .unwrap();
    assert_eq!(r.iter().filter(|r| r.is_ok()).count(), 1, "{r:?}");
    assert!(r.contains(&bad_token(TokenReason::Replayed)), "{r:?}");
    // A put token used to read, a get token used to delete.
    assert_eq!(
        client
            .get(&peer, &p.token(TxKind::Put, &grant), &chunk.0, 50_000)
            .await,
        Err(PeerError::BadToken(TokenReason::WrongType))
    );
    assert_eq!(
        client
            .delete(&peer, &p.token(TxKind::Get, &grant), &grant)
            .await
            .unwrap(),
        vec![bad_token(TokenReason::WrongType)]
    );
    assert!(d.store().contains(&chunk.0));
    // A get token replayed for the same chunk.
    let gt = p.token(TxKind::Get, &grant);
    client.get(&peer, &gt, &chunk.0, 50_000).await.unwrap();
    assert_eq!(
        client.get(&peer, &gt, &chunk.0, 50_000).await,
        Err(PeerError::BadToken(TokenReason::Replayed))
    );
    assert_eq!(d.chunk_count(), 2);
    assert!(files_under(&p.storage.path().join("tmp")).is_empty());

    // Every refusal was reported to the server with its reason.
    d.shutdown().await;
    let reasons = rejected_reasons(&link);
    for want in [
        "bad_mac",
        "expired",
        "not_yet_valid",
        "wrong_target",
        "wrong_type",
        "not_in_token",
        "size_mismatch",
        "malformed",
        "oversized",
        "unsupported_version",
        "too_large",
        "hash_mismatch",
        "replayed",
    ] {
        assert!(
            reasons.iter().any(|r| r == want),
            "no {want} report in {reasons:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_replayed_after_a_restart_is_refused() {
    let p = TestPeer::new();
    let link = Arc::new(RecordingLink::new());
    let chunk = random_chunk(10_000);
    let t = p.token(TxKind::Put, &refs(std::slice::from_ref(&chunk)));
    let d = p.start(1 << 20, link.clone()).await;
    let client = PeerClient::new().unwrap();
    put_one(&client, &p.addr(&d), &t, &chunk).await.unwrap();
    // A second daemon on the same storage directory is refused while the first runs.
    let second = Daemon::run(p.config(1 << 20), Arc::new(RecordingLink::new())).await;
    assert!(
        matches!(
            second,
            Err(peerstash::peer::DaemonError::Store(
                peerstash::peer::StoreError::InUse(_)
            ))
        ),
        "{second:?}"
    );
    d.shutdown().await;

    // Same storage and state directories: the chunk and the replay store survive.
    let d = p.start(1 << 20, link.clone()).await;
    assert_eq!(d.chunk_count(), 1);
    assert_eq!(d.used_bytes(), 10_000);
    assert_eq!(
        put_one(&client, &p.addr(&d), &t, &chunk).await,
        Err(PeerError::BadToken(TokenReason::Replayed))
    );
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lent_capacity_is_never_exceeded() {
    let p = TestPeer::new();
    let d = p.start(100_000, Arc::new(RecordingLink::new())).await;
    let peer = p.addr(&d);
    let client = PeerClient::new().unwrap();
    let chunks: Vec<_> = (0..4).map(|_| random_chunk(30_000)).collect();
    let t = p.token(TxKind::Put, &refs(&chunks));
    let r = client.put(&peer, &t, &chunks).await.unwrap();
    assert_eq!(r.iter().filter(|r| r.is_ok()).count(), 3, "{r:?}");
    assert_eq!(
        r.iter().filter(|r| **r == Err(PeerError::NoSpace)).count(),
        1,
        "{r:?}"
    );
    assert_eq!(d.used_bytes(), 90_000);
    assert_eq!(d.free_bytes(), 10_000);
    assert_eq!(p.files().len(), 3, "no partial file for the refused chunk");

    // Re-sending a chunk that is already stored needs no room and is accepted.
    let again = p.token(TxKind::Put, &refs(&chunks[..1]));
    put_one(&client, &peer, &again, &chunks[0]).await.unwrap();
    assert_eq!(d.used_bytes(), 90_000);

    // Deleting makes room again.
    let dt = p.token(TxKind::Delete, &refs(&chunks[..1]));
    assert_eq!(
        client
            .delete(&peer, &dt, &refs(&chunks[..1]))
            .await
            .unwrap(),
        vec![Ok(())]
    );
    let missing: Vec<_> = chunks
        .iter()
        .filter(|(c, _)| !d.store().contains(c))
        .cloned()
        .collect();
    let t = p.token(TxKind::Put, &refs(&missing[..1]));
    put_one(&client, &peer, &t, &missing[0]).await.unwrap();
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_at_once() {
    let p = Arc::new(TestPeer::new());
    let link = Arc::new(RecordingLink::new());
    let d = p.start(1 << 30, link.clone()).await;
    let peer = p.addr(&d);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let client = PeerClient::new().unwrap();
            let chunks: Vec<_> = (0..6).map(|_| random_chunk(200_000)).collect();
            let t = p.token(TxKind::Put, &refs(&chunks));
            let r = client.put(&peer, &t, &chunks).await.unwrap();
            assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
            let gt = p.token(TxKind::Get, &refs(&chunks));
            let gets = chunks
                .iter()
                .map(|(c, b)| client.get(&peer, &gt, c, b.len() as u32));
            for (got, (_, b)) in futures_util::future::join_all(gets)
                .await
                .into_iter()
                .zip(&chunks)
            {
                assert_eq!(got.unwrap().as_bytes(), &b[..]);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(d.chunk_count(), 96);
    assert_eq!(d.used_bytes(), 96 * 200_000);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_checks_are_authenticated() {
    let p = TestPeer::new();
    let d = p.start(1 << 20, Arc::new(RecordingLink::new())).await;
    let peer = p.addr(&d);
    let client = PeerClient::new().unwrap();
    let chunk = random_chunk(1000);
    put_one(
        &client,
        &peer,
        &p.token(TxKind::Put, &refs(std::slice::from_ref(&chunk))),
        &chunk,
    )
    .await
    .unwrap();

    let server = ControlSigner::new(p.id, &p.key, Direction::ServerToPeer);
    let auth = server.sign(MessageKind::StatusCheck, b"", now_ms());
    let space = client.status_check(&peer, &auth).await.unwrap();
    assert_eq!(
        (space.free_bytes, space.used_bytes, space.chunks),
        ((1 << 20) - 1000, 1000, 1)
    );

    let refused = |r| Err(PeerError::BadControl(r));
    assert_eq!(
        client.status_check(&peer, &auth).await,
        refused(ControlReason::Replayed)
    );
    let impostor = ControlSigner::new(
        p.id,
        &TransactionKey::generate().unwrap(),
        Direction::ServerToPeer,
    );
    let forged = impostor.sign(MessageKind::StatusCheck, b"", now_ms());
    assert_eq!(
        client.status_check(&peer, &forged).await,
        refused(ControlReason::BadMac)
    );
    let reflected = ControlSigner::new(p.id, &p.key, Direction::PeerToServer);
    let r = reflected.sign(MessageKind::StatusCheck, b"", now_ms());
    assert_eq!(
        client.status_check(&peer, &r).await,
        refused(ControlReason::WrongDirection)
    );
    let k = server.sign(MessageKind::Heartbeat, b"", now_ms());
    assert_eq!(
        client.status_check(&peer, &k).await,
        refused(ControlReason::WrongKind)
    );
    let old = server.sign(MessageKind::StatusCheck, b"", now_ms() - 3_600_000);
    assert_eq!(
        client.status_check(&peer, &old).await,
        refused(ControlReason::Stale)
    );
    let other = ControlSigner::new(PeerId(p.id.0 ^ 1), &p.key, Direction::ServerToPeer);
    let o = other.sign(MessageKind::StatusCheck, b"", now_ms());
    assert_eq!(
        client.status_check(&peer, &o).await,
        refused(ControlReason::UnknownPeer)
    );
    d.shutdown().await;
}

/// Audits over real QUIC: a challenge the server signed gets a proof that verifies
/// against the chunk id; the same answer does not pass a new challenge; a challenge not
/// signed by the server (wrong key, replayed, reflected, for a status check) is refused
/// before the daemon reads its disk; an unknown chunk or a wrong size is said so; and a
/// chunk corrupted on disk gives a proof that fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audits_are_authenticated_and_prove_the_chunk() {
    use peerstash::audit::{AuditError, Challenge};
    let p = TestPeer::new();
    let d = p.start(1 << 24, Arc::new(RecordingLink::new())).await;
    let peer = p.addr(&d);
    let client = PeerClient::new().unwrap();
    let chunk = random_chunk(300_000);
    put_one(
        &client,
        &peer,
        &p.token(TxKind::Put, &refs(std::slice::from_ref(&chunk))),
        &chunk,
    )
    .await
    .unwrap();
    let (id, size) = (chunk.0, chunk.1.len() as u32);
    let server = ControlSigner::new(p.id, &p.key, Direction::ServerToPeer);
    let sign = |c: &Challenge| server.sign(MessageKind::Audit, &c.encode(), now_ms());

    let c = Challenge::random(id, size).unwrap();
    let auth = sign(&c);
    let answer = client.audit(&peer, &auth, &c).await.unwrap();
    assert_eq!(c.verify(&answer, now_ms(), now_ms() + 1000), Ok(()));
    assert!(answer.encode().len() < 5 * 1024, "a few KiB");
    // An old answer is no answer to a new challenge.
    let fresh = Challenge::random(id, size).unwrap();
    assert_eq!(
        fresh.verify(&answer, now_ms(), now_ms() + 1000),
        Err(AuditError::WrongNonce)
    );

    let refused = |r| Err(PeerError::BadControl(r));
    assert_eq!(
        client.audit(&peer, &auth, &c).await.map(drop),
        refused(ControlReason::Replayed)
    );
    let impostor = ControlSigner::new(
        p.id,
        &TransactionKey::generate().unwrap(),
        Direction::ServerToPeer,
    );
    let forged = impostor.sign(MessageKind::Audit, &c.encode(), now_ms());
    assert_eq!(
        client.audit(&peer, &forged, &c).await.map(drop),
        refused(ControlReason::BadMac)
    );
    // Signed for another challenge: the MAC covers the challenge bytes.
    let other = sign(&fresh);
    assert_eq!(
        client.audit(&peer, &other, &c).await.map(drop),
        refused(ControlReason::BadMac)
    );
    let status = server.sign(MessageKind::StatusCheck, &c.encode(), now_ms());
    assert_eq!(
        client.audit(&peer, &status, &c).await.map(drop),
        refused(ControlReason::WrongKind)
    );
    let reflected = ControlSigner::new(p.id, &p.key, Direction::PeerToServer);
    let r = reflected.sign(MessageKind::Audit, &c.encode(), now_ms());
    assert_eq!(
        client.audit(&peer, &r, &c).await.map(drop),
        refused(ControlReason::WrongDirection)
    );

    let unknown = Challenge::random(ChunkId([3; 32]), size).unwrap();
    assert_eq!(
        client
            .audit(&peer, &sign(&unknown), &unknown)
            .await
            .map(drop),
        Err(PeerError::NotFound)
    );
    let resized = Challenge::random(id, size - 1024).unwrap();
    assert_eq!(
        client
            .audit(&peer, &sign(&resized), &resized)
            .await
            .map(drop),
        Err(PeerError::SizeMismatch)
    );

    // One byte flipped on disk: whatever the range, the proof no longer hashes to the id.
    let path = d.store().path_of(&id);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[size as usize - 1] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let c = Challenge::at(id, size, 0, [9; 16]);
    let answer = client.audit(&peer, &sign(&c), &c).await.unwrap();
    assert_eq!(
        c.verify(&answer, now_ms(), now_ms() + 1000),
        Err(AuditError::BadProof)
    );
    d.shutdown().await;
}

/// A daemon heartbeating every 100 ms over `link`, lending 1 MiB, holding `chunks`.
async fn beating_daemon_holding(
    p: &TestPeer,
    link: &Arc<RecordingLink>,
    chunks: &[(ChunkId, Vec<u8>)],
) -> (RunningDaemon, PeerAddr, PeerClient) {
    let mut cfg = p.config(1 << 20);
    cfg.heartbeat_interval = Duration::from_millis(100);
    let d = Daemon::run(cfg, link.clone()).await.unwrap();
    let peer = p.addr(&d);
    let client = PeerClient::new().unwrap();
    let r = client
        .put(&peer, &p.token(TxKind::Put, &refs(chunks)), chunks)
        .await
        .unwrap();
    assert!(r.iter().all(|r| r.is_ok()));
    (d, peer, client)
}

/// Wait until a heartbeat lists `chunk` as dropped.
fn wait_reported_dropped(link: &RecordingLink, chunk: &ChunkId) {
    wait_for(
        "the chunk reported dropped",
        Duration::from_secs(10),
        || {
            link.heartbeats()
                .iter()
                .any(|h| h.dropped.contains(chunk))
                .then_some(())
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_report_space_and_drop_released_chunks() {
    let p = TestPeer::new();
    let link = Arc::new(RecordingLink::new());
    let chunks: Vec<_> = (0..2).map(|_| random_chunk(4000)).collect();
    let (d, _, _) = beating_daemon_holding(&p, &link, &chunks).await;

    link.drop_next(vec![chunks[0].0]);
    wait_reported_dropped(&link, &chunks[0].0);
    assert!(!d.store().contains(&chunks[0].0));
    assert!(d.store().contains(&chunks[1].0));
    let last = link.heartbeats().last().cloned().unwrap();
    assert_eq!(last.used_bytes, 4000);
    assert_eq!(last.free_bytes, (1 << 20) - 4000);
    assert_eq!(last.cert_fingerprint, d.fingerprint());
    assert_eq!(last.quic_addr, d.local_addr().to_string());
    d.shutdown().await;
}

/// Reconciling with the server: a chunk the server does not expect here is deleted once no
/// put has stored it for the grace period; one stored again meanwhile (a put of the same
/// bytes), one stored recently, and one the server expects all stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciling_deletes_only_old_chunks_the_server_does_not_expect() {
    let p = TestPeer::new();
    let link = Arc::new(RecordingLink::new());
    // orphan, stored again, expected, recent
    let c: Vec<_> = (0..4).map(|_| random_chunk(3000)).collect();
    let (d, peer, client) = beating_daemon_holding(&p, &link, &c).await;
    // Three were last stored an hour ago; then one of them is stored again.
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    for (id, _) in &c[..3] {
        std::fs::File::options()
            .write(true)
            .open(d.store().path_of(id))
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
    }
    let again = &c[1..2];
    let r = client
        .put(&peer, &p.token(TxKind::Put, &refs(again)), again)
        .await
        .unwrap();
    assert_eq!(r, vec![Ok(())]);

    // The server expects only the third.
    link.reconcile(1, 60, vec![c[0].0, c[1].0, c[3].0]);
    wait_for("the orphan deleted", Duration::from_secs(15), || {
        (!d.store().contains(&c[0].0)).then_some(())
    });
    wait_reported_dropped(&link, &c[0].0);
    for (id, bytes) in &c[1..] {
        assert_eq!(&std::fs::read(d.store().path_of(id)).unwrap(), bytes);
    }
    // Only chunks last stored before the grace were asked about.
    let asked: Vec<ChunkId> = link
        .inventories()
        .into_iter()
        .flat_map(|i| i.chunks)
        .collect();
    assert!(asked.contains(&c[0].0) && asked.contains(&c[2].0));
    assert!(!asked.contains(&c[1].0) && !asked.contains(&c[3].0));
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_greedy_clients_are_bounded() {
    let p = TestPeer::new();
    let mut cfg = p.config(16 << 20);
    cfg.limits.read_timeout = Duration::from_millis(300);
    cfg.limits.request_timeout = Duration::from_millis(2000);
    cfg.limits.max_connections_per_ip = 2;
    let d = Daemon::run(cfg, Arc::new(RecordingLink::new()))
        .await
        .unwrap();
    let peer = p.addr(&d);

    // A request that stalls after its first byte is dropped after the read timeout.
    let client = PeerClient::new().unwrap();
    let (mut send, mut recv) = client.open_raw(&peer).await.unwrap();
    send.write_all(&[Op::Put as u8, 0, 0]).await.unwrap();
    let mut b = [0u8; 2];
    let r = tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut b)).await;
    assert!(
        matches!(r, Ok(Err(_))),
        "a stalled request must be cut, got {r:?}"
    );
    // An upload that stalls mid-chunk is dropped and leaves no temporary file.
    let chunk = random_chunk(100_000);
    let t = p.token(TxKind::Put, &refs(std::slice::from_ref(&chunk)));
    let (mut send, mut recv) = client.open_raw(&peer).await.unwrap();
    let mut req = wire::encode_token_head(Op::Put, t.as_bytes());
    req.extend_from_slice(&1u16.to_be_bytes());
    req.extend_from_slice(&wire::encode_chunk_header(&chunk.0, 100_000));
    req.extend_from_slice(&chunk.1[..50_000]);
    send.write_all(&req).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut b)).await;
    assert!(
        matches!(r, Ok(Err(_))),
        "a stalled upload must be cut, got {r:?}"
    );
    wait_for("no partial file", Duration::from_secs(5), || {
        p.files().is_empty().then_some(())
    });

    // An upload that trickles a byte every 100 ms (never idle long enough for the read
    // timeout) is cut by the request timeout, and leaves no temporary file either.
    let t = p.token(TxKind::Put, &refs(std::slice::from_ref(&chunk)));
    let (mut send, mut recv) = client.open_raw(&peer).await.unwrap();
    let mut req = wire::encode_token_head(Op::Put, t.as_bytes());
    req.extend_from_slice(&1u16.to_be_bytes());
    req.extend_from_slice(&wire::encode_chunk_header(&chunk.0, 100_000));
    send.write_all(&req).await.unwrap();
    let trickle = async {
        for byte in &chunk.1 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if send.write_all(std::slice::from_ref(byte)).await.is_err() {
                break;
            }
        }
    };
    let started = std::time::Instant::now();
    let (r, _) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(recv.read_exact(&mut b), trickle)
    })
    .await
    .expect("the daemon cuts a trickling upload");
    assert!(r.is_err(), "a trickling upload must be cut");
    assert!(started.elapsed() < Duration::from_secs(5));
    wait_for("no partial file", Duration::from_secs(5), || {
        p.files().is_empty().then_some(())
    });

    // A client that asks for a chunk and never reads the reply: the daemon gives up on
    // the stream after its read timeout instead of holding it (and the file) forever.
    let big = random_chunk(4 << 20);
    let grant = refs(std::slice::from_ref(&big));
    put_one(&client, &peer, &p.token(TxKind::Put, &grant), &big)
        .await
        .unwrap();
    let (mut send, mut recv) = client.open_raw(&peer).await.unwrap();
    let mut req = wire::encode_token_head(Op::Get, p.token(TxKind::Get, &grant).as_bytes());
    req.extend_from_slice(&wire::encode_chunk_header(&big.0, 4 << 20));
    send.write_all(&req).await.unwrap();
    send.finish().unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let r = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(8 << 20)).await;
    assert!(matches!(r, Ok(Err(_))), "an unread reply must be cut");

    // The defaults bound what every connection together can pin.
    assert!(peerstash::peer::Limits::default().memory_bound() <= 1 << 30);

    // The connection itself is still usable.
    let t2 = p.token(TxKind::Put, &refs(std::slice::from_ref(&chunk)));
    put_one(&client, &peer, &t2, &chunk).await.unwrap();

    // Connections per IP are capped: a third client from 127.0.0.1 is refused.
    let second = PeerClient::new().unwrap();
    let space_auth = ControlSigner::new(p.id, &p.key, Direction::ServerToPeer).sign(
        MessageKind::StatusCheck,
        b"",
        now_ms(),
    );
    second.status_check(&peer, &space_auth).await.unwrap();
    let third = PeerClient::new().unwrap();
    let auth = ControlSigner::new(p.id, &p.key, Direction::ServerToPeer).sign(
        MessageKind::StatusCheck,
        b"",
        now_ms(),
    );
    assert!(matches!(
        third.status_check(&peer, &auth).await,
        Err(PeerError::Connect { .. })
    ));
    // Once a client leaves, its slot is free again.
    second.close();
    drop(second);
    let fourth = PeerClient::new().unwrap();
    wait_for("a free connection slot", Duration::from_secs(5), || {
        let auth = ControlSigner::new(p.id, &p.key, Direction::ServerToPeer).sign(
            MessageKind::StatusCheck,
            b"",
            now_ms(),
        );
        let r = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(fourth.status_check(&peer, &auth))
        });
        r.ok()
    });
    d.shutdown().await;
}

/// Runs a daemon until killed, when started by `kill9_during_an_upload_leaves_no_partial_chunk`
/// (a no-op in a normal test run).
#[test]
fn child_daemon_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let v: Vec<&str> = spec.split('|').collect();
    let cert = CertKey {
        cert_der: hex::decode(v[4]).unwrap(),
        key_der: hex::decode(v[5]).unwrap(),
    };
    let cfg = DaemonConfig::new(
        PeerId(v[0].parse().unwrap()),
        TransactionKey::from_hex(v[1]).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        PathBuf::from(v[2]),
        1 << 30,
        cert,
        PathBuf::from(v[3]),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let d = Daemon::run(cfg, peerstash::peer::NullLink).await.unwrap();
        let addr_file = PathBuf::from(v[3]).join("addr");
        std::fs::write(addr_file.with_extension("tmp"), d.local_addr().to_string()).unwrap();
        std::fs::rename(addr_file.with_extension("tmp"), addr_file).unwrap();
        std::future::pending::<()>().await;
    });
}

fn spawn_child(p: &TestPeer) -> (Proc, PeerAddr) {
    let addr_file = p.state.path().join("addr");
    let _ = std::fs::remove_file(&addr_file);
    let spec = [
        p.id.0.to_string(),
        p.key.expose_hex(),
        p.storage.path().display().to_string(),
        p.state.path().display().to_string(),
        hex::encode(&p.cert.cert_der),
        hex::encode(&p.cert.key_der),
    ]
    .join("|");
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_daemon_process",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, spec);
    let proc = Proc::spawn("child daemon", cmd);
    let addr = wait_for(
        "the child daemon's address",
        Duration::from_secs(20),
        || std::fs::read_to_string(&addr_file).ok()?.parse().ok(),
    );
    (proc, PeerAddr::direct(addr, p.cert.fingerprint()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_an_upload_leaves_no_partial_chunk() {
    let p = TestPeer::new();
    let (mut child, peer) = spawn_child(&p);
    let client = PeerClient::new().unwrap();

    // Start an 8 MiB upload, send 3 MiB of it, and kill the daemon while the temporary
    // file is being written.
    let chunk = random_chunk(8 << 20);
    let t = p.token(TxKind::Put, &refs(std::slice::from_ref(&chunk)));
    let (mut send, _recv) = client.open_raw(&peer).await.unwrap();
    let mut req = wire::encode_token_head(Op::Put, t.as_bytes());
    req.extend_from_slice(&1u16.to_be_bytes());
    req.extend_from_slice(&wire::encode_chunk_header(&chunk.0, 8 << 20));
    send.write_all(&req).await.unwrap();
    send.write_all(&chunk.1[..3 << 20]).await.unwrap();
    let tmp = p.storage.path().join("tmp");
    wait_for("a partial upload on disk", Duration::from_secs(10), || {
        files_under(&tmp)
            .iter()
            .any(|f| f.metadata().map(|m| m.len() > 0).unwrap_or(false))
            .then_some(())
    });
    child.kill9();
    drop((send, _recv));
    client.close();

    // After a restart: no partial file, no chunk, and the token's claim survived.
    let (_child, peer) = spawn_child(&p);
    assert!(p.files().is_empty(), "left behind: {:?}", p.files());
    let client = PeerClient::new().unwrap();
    assert_eq!(
        put_one(&client, &peer, &t, &chunk).await,
        Err(PeerError::BadToken(TokenReason::Replayed))
    );
    // A fresh token stores the chunk whole.
    let t2 = p.token(TxKind::Put, &refs(std::slice::from_ref(&chunk)));
    put_one(&client, &peer, &t2, &chunk).await.unwrap();
    let gt = p.token(TxKind::Get, &refs(std::slice::from_ref(&chunk)));
    assert_eq!(
        client
            .get(&peer, &gt, &chunk.0, 8 << 20)
            .await
            .unwrap()
            .into_bytes(),
        chunk.1
    );
    assert_eq!(p.files().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_typed() {
    let p = TestPeer::new();
    let d = p.start(1 << 20, Arc::new(RecordingLink::new())).await;
    let peer = p.addr(&d);
    let client = PeerClient::new()
        .unwrap()
        .with_connect_timeout(Duration::from_millis(500));
    let chunk = random_chunk(30_000);
    let grant = refs(std::slice::from_ref(&chunk));

    // A daemon presenting another certificate than the pinned one: no connection.
    let impostor_pin = PeerAddr {
        fingerprint: CertKey::self_signed(&["localhost"]).unwrap().fingerprint(),
        ..peer
    };
    let e = client
        .put(
            &impostor_pin,
            &p.token(TxKind::Put, &grant),
            std::slice::from_ref(&chunk),
        )
        .await;
    assert!(matches!(e, Err(PeerError::Connect { .. })), "{e:?}");
    // Nobody listening: a connect error within the connect timeout, and requests queued
    // behind it fail at once rather than each waiting out the timeout.
    let nobody = PeerAddr {
        addr: format!("127.0.0.1:{}", common::free_udp_port())
            .parse()
            .unwrap(),
        ..peer
    };
    let gt = p.token(TxKind::Get, &grant);
    let started = std::time::Instant::now();
    let gets = (0..8).map(|_| client.get(&nobody, &gt, &chunk.0, 30_000));
    for e in futures_util::future::join_all(gets).await {
        assert!(matches!(e, Err(PeerError::Connect { .. })), "{e:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(p.files().is_empty());

    // Addresses as the server hands them out.
    let fp = d.fingerprint();
    assert_eq!(
        PeerAddr::lookup(&d.local_addr().to_string(), fp)
            .await
            .unwrap(),
        peer
    );
    assert!(matches!(
        PeerAddr::lookup("no-such-host.invalid:4433", fp).await,
        Err(PeerError::Connect { .. })
    ));

    // A stored chunk that rotted on the holder's disk: the client refuses the bytes.
    put_one(&client, &peer, &p.token(TxKind::Put, &grant), &chunk)
        .await
        .unwrap();
    let path = d.store().path_of(&chunk.0);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let e = client
        .get(&peer, &p.token(TxKind::Get, &grant), &chunk.0, 30_000)
        .await;
    assert!(
        matches!(e, Err(PeerError::CorruptChunk { expected, .. }) if expected == chunk.0),
        "{e:?}"
    );
    d.shutdown().await;
}

/// Unmounts (lazily, so a failing test cannot leave a busy mount) when dropped.
struct TmpfsMount(PathBuf);

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_only_that_chunk() {
    // A real ENOSPC needs a small file system: a 1 MiB tmpfs, which needs root.
    let p = TestPeer::new();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(p.storage.path())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let _mount = TmpfsMount(p.storage.path().to_owned());
    // Lend far more than the disk has: the disk fills first.
    let d = p.start(1 << 30, Arc::new(RecordingLink::new())).await;
    let peer = p.addr(&d);
    let client = PeerClient::new().unwrap();
    let chunks: Vec<_> = (0..8).map(|_| random_chunk(200_000)).collect();
    let r = client
        .put(&peer, &p.token(TxKind::Put, &refs(&chunks)), &chunks)
        .await
        .unwrap();
    let ok = r.iter().filter(|r| r.is_ok()).count();
    let full = r.iter().filter(|r| **r == Err(PeerError::NoSpace)).count();
    assert!(ok >= 1 && full >= 1 && ok + full == 8, "{r:?}");
    // Nothing partial is left, the accounting matches the disk, and the daemon serves on.
    assert!(files_under(&p.storage.path().join("tmp")).is_empty());
    assert_eq!(p.files().len(), ok);
    assert_eq!(d.used_bytes(), ok as u64 * 200_000);
    let (c, b) = chunks
        .iter()
        .zip(&r)
        .find(|(_, r)| r.is_ok())
        .map(|(c, _)| c)
        .unwrap();
    let got = client
        .get(&peer, &p.token(TxKind::Get, &[(*c, 200_000)]), c, 200_000)
        .await;
    assert_eq!(got.unwrap().as_bytes(), &b[..]);
    d.shutdown().await;
}

/// A confirm the server does not take (it expected the chunk nowhere: the placement was
/// swept after its token expired) makes the daemon answer that chunk with an error, so
/// the uploader places it again instead of counting it stored.
#[tokio::test]
async fn a_chunk_the_server_does_not_confirm_is_not_reported_stored() {
    let p = TestPeer::new();
    let link = Arc::new(RecordingLink::new());
    link.refuse_confirms(true);
    let d = p.start(1 << 30, link.clone()).await;
    let peer = p.addr(&d);
    let client = PeerClient::new().unwrap();
    let c = random_chunk(10_000);
    let token = p.token(TxKind::Put, &refs(std::slice::from_ref(&c)));
    let r = put_one(&client, &peer, &token, &c).await;
    assert!(r.is_err(), "an unconfirmed chunk was reported stored");
    assert!(!link.confirms().is_empty());
    // Once the server takes confirms again, the same kind of put succeeds.
    link.refuse_confirms(false);
    let c = random_chunk(10_000);
    let token = p.token(TxKind::Put, &refs(std::slice::from_ref(&c)));
    assert_eq!(put_one(&client, &peer, &token, &c).await, Ok(()));
    d.shutdown().await;
}

/// A holder daemon, and a target daemon whose heartbeats (every 100 ms) go to a recording
/// link, so a test can hand it repair orders.
async fn holder_and_repairing_target() -> (
    TestPeer,
    RunningDaemon,
    TestPeer,
    RunningDaemon,
    Arc<RecordingLink>,
) {
    let (h, t) = (TestPeer::new(), TestPeer::new());
    let holder = h.start(1 << 24, Arc::new(RecordingLink::new())).await;
    let link = Arc::new(RecordingLink::new());
    let mut cfg = t.config(1 << 24);
    cfg.heartbeat_interval = Duration::from_millis(100);
    let target = Daemon::run(cfg, link.clone()).await.unwrap();
    (h, holder, t, target, link)
}

/// A repair order as the server would send it to `to`: fetch `chunk` from `from`.
fn repair_order(
    from: (&TestPeer, &RunningDaemon),
    to: (&TestPeer, &RunningDaemon),
    chunk: (ChunkId, u32),
    put_key: &TransactionKey,
    put_chunk: ChunkId,
    put_txid: u64,
) -> RepairOrder {
    let place = |p: &TestPeer, d: &RunningDaemon, token: Token, txid: u64, c: ChunkId| Placement {
        target: p.id,
        addr: d.local_addr().to_string(),
        fingerprint: d.fingerprint(),
        txid: TransactionId(txid),
        expires_at: now_secs() + 300,
        token,
        chunks: vec![c],
        online: true,
        route: Default::default(),
    };
    let put_token = TokenClaims {
        requester: to.0.id,
        target: to.0.id,
        kind: TxKind::Put,
        txid: TransactionId(put_txid),
        issued_at: now_secs() - 5,
        expires_at: now_secs() + 300,
        grants: vec![Grant::whole(put_chunk, chunk.1)],
    }
    .seal(&put_key.token_keys())
    .unwrap();
    RepairOrder {
        chunk: chunk.0,
        size: chunk.1,
        source: Some(place(
            from.0,
            from.1,
            from.0.token(TxKind::Get, &[chunk]),
            1,
            chunk.0,
        )),
        rebuild: None,
        put: place(to.0, to.1, put_token, put_txid, chunk.0),
    }
}

/// A repair order is checked like anything from the network: only a put token sealed
/// under the daemon's own key, covering that very chunk, lets it store; bytes from the
/// holder must hash to the chunk id; each order is carried out once; a good order is
/// stored and confirmed under its put token's transaction id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_orders_copy_from_a_holder_and_forged_ones_store_nothing() {
    let (h, holder, t, target, link) = holder_and_repairing_target().await;

    // The holder keeps four chunks; one of them rots on its disk.
    let client = PeerClient::new().unwrap();
    let chunks: Vec<_> = (0..4).map(|_| random_chunk(5000)).collect();
    let r = client
        .put(
            &h.addr(&holder),
            &h.token(TxKind::Put, &refs(&chunks)),
            &chunks,
        )
        .await
        .unwrap();
    assert!(r.iter().all(|r| r.is_ok()));
    let rotten = holder.store().path_of(&chunks[3].0);
    let mut bytes = std::fs::read(&rotten).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&rotten, bytes).unwrap();
    let sized = |i: usize| (chunks[i].0, 5000u32);
    let (hp, tp) = ((&h, &holder), (&t, &target));

    let good = repair_order(hp, tp, sized(0), &t.key, chunks[0].0, 1001);
    // Sealed under another key: a forged put token.
    let forged = repair_order(hp, tp, sized(1), &h.key, chunks[1].0, 1002);
    // A genuine put token, but for another chunk than the one to copy.
    let retargeted = repair_order(hp, tp, sized(2), &t.key, chunks[0].0, 1003);
    // The holder sends bytes that do not hash to the id.
    let corrupt = repair_order(hp, tp, sized(3), &t.key, chunks[3].0, 1004);
    // Addressed to someone else.
    let mut elsewhere = repair_order(hp, tp, sized(2), &t.key, chunks[2].0, 1005);
    elsewhere.put.target = PeerId(12345);
    link.repair_next(vec![good.clone(), forged, retargeted, corrupt, elsewhere]);
    wait_for("the good repair confirmed", Duration::from_secs(20), || {
        link.confirms()
            .iter()
            .any(|c| c.txid == TransactionId(1001))
            .then_some(())
    });
    // The same order again (a replay), then a last good one: once that is confirmed,
    // the worker has been through everything before it.
    link.repair_next(vec![good]);
    wait_for(
        "the replayed order handled",
        Duration::from_secs(20),
        || (link.heartbeats().len() > 3).then_some(()),
    );
    let last = repair_order(hp, tp, sized(2), &t.key, chunks[2].0, 1006);
    link.repair_next(vec![last]);
    wait_for("the last repair confirmed", Duration::from_secs(20), || {
        link.confirms()
            .iter()
            .any(|c| c.txid == TransactionId(1006))
            .then_some(())
    });

    let confirmed: Vec<(TransactionId, Vec<ChunkId>)> = link
        .confirms()
        .into_iter()
        .map(|c| (c.txid, c.chunks))
        .collect();
    assert_eq!(
        confirmed,
        vec![
            (TransactionId(1001), vec![chunks[0].0]),
            (TransactionId(1006), vec![chunks[2].0])
        ],
        "only the genuine orders are confirmed, each once"
    );
    let store = target.store();
    assert!(store.contains(&chunks[0].0) && store.contains(&chunks[2].0));
    assert!(!store.contains(&chunks[1].0), "stored under a forged token");
    assert!(!store.contains(&chunks[3].0), "stored corrupt bytes");
    assert_eq!(t.files().len(), 2, "nothing else on disk: {:?}", t.files());
    assert_eq!(
        std::fs::read(store.path_of(&chunks[0].0)).unwrap(),
        chunks[0].1
    );
    target.shutdown().await;
    holder.shutdown().await;
}

/// A rebuild order recomputes a lost shard of an erasure-coded stripe from `k` others,
/// each fetched under its holder's get token. A shard that rots on its holder is caught
/// by its hash, and with fewer than `k` good shards nothing is stored; an order whose
/// stripe does not name the shard is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_orders_recompute_a_lost_shard_and_never_store_a_wrong_one() {
    use peerstash::api::{ChunkRef, Rebuild, StripeRef};
    let (h, holder, t, target, link) = holder_and_repairing_target().await;
    let client = PeerClient::new().unwrap();

    // Two stripes of 2+1; the holder keeps shards 1 and 2 of each.
    let mut stripes = Vec::new();
    for seed in [1u8, 2] {
        let (_, chunk) = random_chunk(9000 + seed as usize);
        let (g, shards) = peerstash::erasure::encode(&chunk, 2, 1).unwrap();
        let shard_refs: Vec<ChunkRef> = shards
            .iter()
            .map(|s| ChunkRef {
                id: ChunkId::of(s),
                size: g.stored_len(),
            })
            .collect();
        let kept: Vec<(ChunkId, Vec<u8>)> = shards[1..]
            .iter()
            .map(|s| (ChunkId::of(s), s.clone()))
            .collect();
        let r = client
            .put(&h.addr(&holder), &h.token(TxKind::Put, &refs(&kept)), &kept)
            .await
            .unwrap();
        assert!(r.iter().all(|r| r.is_ok()));
        let stripe = StripeRef {
            chunk: ChunkId::of(&chunk),
            chunk_size: chunk.len() as u32,
            data: 2,
            parity: 1,
            shards: shard_refs,
        };
        stripes.push((stripe, shards));
    }
    // The second stripe's parity shard rots on the holder's disk.
    let rotten = holder.store().path_of(&stripes[1].0.shards[2].id);
    let mut b = std::fs::read(&rotten).unwrap();
    b[40] ^= 1;
    std::fs::write(&rotten, b).unwrap();

    let order = |i: usize, txid: u64, index: u8| {
        let (stripe, _) = &stripes[i];
        let wanted = stripe.shards[0];
        let others: Vec<(ChunkId, u32)> =
            stripe.shards[1..].iter().map(|s| (s.id, s.size)).collect();
        let mut o = repair_order(
            (&h, &holder),
            (&t, &target),
            (wanted.id, wanted.size),
            &t.key,
            wanted.id,
            txid,
        );
        let mut source = o.source.take().unwrap();
        source.token = h.token(TxKind::Get, &others);
        source.chunks = others.iter().map(|(c, _)| *c).collect();
        o.rebuild = Some(Rebuild {
            stripe: stripe.clone(),
            index,
            sources: vec![source],
        });
        o
    };
    // Good; rotten source; a stripe that names another shard at that index.
    link.repair_next(vec![order(1, 2002, 0), order(0, 2003, 1)]);
    wait_for("two heartbeats", Duration::from_secs(20), || {
        (link.heartbeats().len() > 2).then_some(())
    });
    link.repair_next(vec![order(0, 2001, 0)]);
    wait_for(
        "the rebuilt shard confirmed",
        Duration::from_secs(20),
        || {
            link.confirms()
                .iter()
                .any(|c| c.txid == TransactionId(2001))
                .then_some(())
        },
    );
    let confirmed: Vec<TransactionId> = link.confirms().iter().map(|c| c.txid).collect();
    assert_eq!(confirmed, vec![TransactionId(2001)]);
    let store = target.store();
    let rebuilt = std::fs::read(store.path_of(&stripes[0].0.shards[0].id)).unwrap();
    assert_eq!(
        rebuilt, stripes[0].1[0],
        "the rebuilt shard is the lost one, byte for byte"
    );
    assert!(
        !store.contains(&stripes[1].0.shards[0].id),
        "built from a rotten shard"
    );
    assert_eq!(t.files().len(), 1, "{:?}", t.files());
    target.shutdown().await;
    holder.shutdown().await;
}
