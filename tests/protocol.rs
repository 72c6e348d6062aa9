//! Attacks on the protocol core: every way a token or a control message might be forged,
//! tampered with, replayed, retargeted or mangled, and the rejection each one gets.

use peerstash::control::{
    ControlAuth, ControlError, ControlSigner, ControlVerifier, Direction, MessageKind,
};
use peerstash::replay::ReplayStore;
use peerstash::token::{
    ByteRange, Grant, TokenClaims, TokenError, TokenVerifier, TxKind, MAX_ENTRIES, MAX_TOKEN_LEN,
};
use peerstash::{ChunkId, PeerId, TransactionId, TransactionKey};
use proptest::prelude::*;

const NOW: u64 = 1_800_000_000;
const A: PeerId = PeerId(0xa);
const B: PeerId = PeerId(0xb);
const C: PeerId = PeerId(0xc);

fn chunk(i: u32) -> ChunkId {
    ChunkId::of(&i.to_be_bytes())
}

fn claims(kind: TxKind, n: u32) -> TokenClaims {
    TokenClaims {
        requester: A,
        target: B,
        kind,
        txid: TransactionId(42),
        issued_at: NOW,
        expires_at: NOW + 300,
        grants: (0..n)
            .map(|i| Grant {
                chunk: chunk(i),
                size: 1000 + i,
                range: (kind == TxKind::Stream).then_some(ByteRange {
                    offset: 10,
                    len: 100,
                }),
            })
            .collect(),
    }
}

struct Peer {
    key: TransactionKey,
    verifier: TokenVerifier,
    replay: ReplayStore,
}

fn peer(id: PeerId) -> Peer {
    let key = TransactionKey::generate().unwrap();
    Peer {
        verifier: TokenVerifier::new(id, &key),
        key,
        replay: ReplayStore::in_memory().unwrap(),
    }
}

fn seal(p: &Peer, c: &TokenClaims) -> Vec<u8> {
    c.seal(&p.key.token_keys()).unwrap().into_bytes()
}

#[test]
fn every_kind_round_trips_single_and_batch() {
    let b = peer(B);
    for kind in [
        TxKind::Put,
        TxKind::Get,
        TxKind::Stream,
        TxKind::Universal,
        TxKind::Delete,
    ] {
        for n in [1, 1000] {
            let mut c = claims(kind, n);
            c.txid = TransactionId(kind as u64 * 10_000 + u64::from(n));
            let bytes = seal(&b, &c);
            let auth = b.verifier.open(&bytes, NOW + 1).unwrap();
            assert_eq!(auth.claims(), &c, "{kind:?} x{n}");
            for g in &c.grants {
                let got = auth
                    .permit(
                        if kind == TxKind::Universal {
                            TxKind::Get
                        } else {
                            kind
                        },
                        &g.chunk,
                        g.size.into(),
                        &b.replay,
                    )
                    .unwrap();
                assert_eq!(&got, g);
            }
        }
    }
}

#[test]
fn single_chunk_token_is_small() {
    let b = peer(B);
    let len = seal(&b, &claims(TxKind::Put, 1)).len();
    println!("single-chunk put token: {len} bytes");
    assert!(len <= 150, "{len} bytes");
}

#[test]
fn forged_with_a_random_key_is_bad_mac() {
    let b = peer(B);
    let forger = TransactionKey::generate().unwrap();
    let bytes = claims(TxKind::Put, 1).seal(&forger.token_keys()).unwrap();
    assert_eq!(
        b.verifier.open(bytes.as_bytes(), NOW).unwrap_err(),
        TokenError::BadMac
    );
}

#[test]
fn every_flipped_byte_is_refused_with_the_right_reason() {
    let b = peer(B);
    let good = seal(&b, &claims(TxKind::Put, 3));
    for i in 0..good.len() {
        for bit in [0x01u8, 0x80] {
            let mut t = good.clone();
            t[i] ^= bit;
            let err = b.verifier.open(&t, NOW).unwrap_err();
            let expected = match i {
                0 => TokenError::UnsupportedVersion(good[0] ^ bit),
                1 => TokenError::UnsupportedVersion(good[0]),
                2..=9 => TokenError::WrongTarget {
                    expected: B,
                    found: PeerId(u64::from_be_bytes(t[2..10].try_into().unwrap())),
                },
                _ => TokenError::BadMac,
            };
            assert_eq!(err, expected, "byte {i} bit {bit:#x}");
        }
    }
}

#[test]
fn tampering_each_field_then_resigning_with_another_key_fails() {
    // An attacker who rewrites a field cannot re-sign: only B's key (and the server) can.
    let b = peer(B);
    let attacker = TransactionKey::generate().unwrap();
    let mut variants = Vec::new();
    let base = claims(TxKind::Get, 2);
    let mut c = base.clone();
    c.requester = C;
    variants.push(c);
    let mut c = base.clone();
    c.kind = TxKind::Put;
    variants.push(c);
    let mut c = base.clone();
    c.expires_at += 10_000;
    variants.push(c);
    let mut c = base.clone();
    c.txid = TransactionId(43);
    variants.push(c);
    let mut c = base.clone();
    c.grants[0].size += 1;
    variants.push(c);
    let mut c = base.clone();
    c.grants[1].chunk = chunk(999);
    variants.push(c);
    for v in variants {
        let t = v.seal(&attacker.token_keys()).unwrap();
        assert_eq!(
            b.verifier.open(t.as_bytes(), NOW).unwrap_err(),
            TokenError::BadMac
        );
    }
}

#[test]
fn expired_and_not_yet_valid_are_refused() {
    let b = peer(B);
    let t = seal(&b, &claims(TxKind::Get, 1));
    let skew = peerstash::token::DEFAULT_SKEW_SECS;
    assert!(b.verifier.open(&t, NOW + 300 + skew).is_ok());
    assert!(matches!(
        b.verifier.open(&t, NOW + 300 + skew + 1).unwrap_err(),
        TokenError::Expired { .. }
    ));
    assert!(b.verifier.open(&t, NOW - skew).is_ok());
    assert!(matches!(
        b.verifier.open(&t, NOW - skew - 1).unwrap_err(),
        TokenError::NotYetValid { .. }
    ));
    let strict = TokenVerifier::new(B, &b.key).with_skew(0);
    assert!(matches!(
        strict.open(&t, NOW + 301).unwrap_err(),
        TokenError::Expired { .. }
    ));
}

#[test]
fn replayed_token_is_refused_even_after_reopening_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("replay.sqlite");
    let b = peer(B);
    let c = claims(TxKind::Put, 1);
    let t = seal(&b, &c);
    let g = c.grants[0];
    {
        let store = ReplayStore::open(&db).unwrap();
        let auth = b.verifier.open(&t, NOW).unwrap();
        auth.permit(TxKind::Put, &g.chunk, g.size.into(), &store)
            .unwrap();
        assert_eq!(
            auth.permit(TxKind::Put, &g.chunk, g.size.into(), &store)
                .unwrap_err(),
            TokenError::Replayed
        );
    }
    let store = ReplayStore::open(&db).unwrap();
    let auth = b.verifier.open(&t, NOW + 5).unwrap();
    assert_eq!(
        auth.permit(TxKind::Put, &g.chunk, g.size.into(), &store)
            .unwrap_err(),
        TokenError::Replayed
    );
    // Pruning before expiry must not reopen the window.
    store.prune(NOW + 300).unwrap();
    assert_eq!(
        auth.permit(TxKind::Put, &g.chunk, g.size.into(), &store)
            .unwrap_err(),
        TokenError::Replayed
    );
}

#[test]
fn batch_token_authorizes_each_chunk_once() {
    let b = peer(B);
    let c = claims(TxKind::Put, 5);
    let auth = b.verifier.open(&seal(&b, &c), NOW).unwrap();
    let (g0, g1) = (c.grants[0], c.grants[1]);
    auth.permit(TxKind::Put, &g0.chunk, g0.size.into(), &b.replay)
        .unwrap();
    assert_eq!(
        auth.permit(TxKind::Put, &g0.chunk, g0.size.into(), &b.replay)
            .unwrap_err(),
        TokenError::Replayed
    );
    auth.permit(TxKind::Put, &g1.chunk, g1.size.into(), &b.replay)
        .unwrap();
}

#[test]
fn token_for_b_shown_to_c_is_wrong_target() {
    let b = peer(B);
    let c = peer(C);
    let t = seal(&b, &claims(TxKind::Put, 1));
    assert_eq!(
        c.verifier.open(&t, NOW).unwrap_err(),
        TokenError::WrongTarget {
            expected: C,
            found: B
        }
    );
    // Rewriting the target field to C does not help: the MAC is under B's key.
    let mut moved = t.clone();
    moved[2..10].copy_from_slice(&C.to_bytes());
    assert_eq!(
        c.verifier.open(&moved, NOW).unwrap_err(),
        TokenError::BadMac
    );
}

#[test]
fn wrong_type_unknown_chunk_and_wrong_size_are_refused() {
    let b = peer(B);
    let c = claims(TxKind::Get, 1);
    let auth = b.verifier.open(&seal(&b, &c), NOW).unwrap();
    let g = c.grants[0];
    assert_eq!(
        auth.permit(TxKind::Put, &g.chunk, g.size.into(), &b.replay)
            .unwrap_err(),
        TokenError::WrongType {
            token: TxKind::Get,
            wanted: TxKind::Put
        }
    );
    assert_eq!(
        auth.permit(TxKind::Get, &chunk(77), g.size.into(), &b.replay)
            .unwrap_err(),
        TokenError::NotInToken(chunk(77))
    );
    assert!(matches!(
        auth.permit(TxKind::Get, &g.chunk, u64::from(g.size) + 1, &b.replay)
            .unwrap_err(),
        TokenError::SizeMismatch { .. }
    ));
    // None of the refusals used up the grant.
    auth.permit(TxKind::Get, &g.chunk, g.size.into(), &b.replay)
        .unwrap();

    // A universal token puts, gets and streams, but never deletes.
    let mut u = claims(TxKind::Universal, 1);
    u.txid = TransactionId(u.txid.0 + 1);
    let auth = b.verifier.open(&seal(&b, &u), NOW).unwrap();
    let g = u.grants[0];
    assert_eq!(
        auth.check(TxKind::Delete, &g.chunk, g.size.into())
            .unwrap_err(),
        TokenError::WrongType {
            token: TxKind::Universal,
            wanted: TxKind::Delete
        }
    );
    for op in [TxKind::Put, TxKind::Get, TxKind::Stream] {
        auth.check(op, &g.chunk, g.size.into()).unwrap();
    }
}

#[test]
fn truncated_oversized_and_garbage_are_refused() {
    let b = peer(B);
    let t = seal(&b, &claims(TxKind::Put, 2));
    for n in 0..t.len() {
        assert!(
            b.verifier.open(&t[..n], NOW).is_err(),
            "prefix of {n} bytes"
        );
    }
    let mut long = t.clone();
    long.push(0);
    assert_eq!(b.verifier.open(&long, NOW).unwrap_err(), TokenError::BadMac);
    let huge = vec![1u8; MAX_TOKEN_LEN + 1];
    assert_eq!(
        b.verifier.open(&huge, NOW).unwrap_err(),
        TokenError::Oversized(MAX_TOKEN_LEN + 1)
    );
    let mut too_many = claims(TxKind::Put, 1);
    too_many.grants = vec![too_many.grants[0]; MAX_ENTRIES + 1];
    assert!(matches!(
        too_many.seal(&b.key.token_keys()).unwrap_err(),
        TokenError::Malformed(_)
    ));
    let mut garbage = vec![0u8; 200];
    garbage[0] = 1;
    garbage[2..10].copy_from_slice(&B.to_bytes());
    assert_eq!(
        b.verifier.open(&garbage, NOW).unwrap_err(),
        TokenError::BadMac
    );
}

fn ctl_pair() -> (TransactionKey, ControlSigner, ControlVerifier) {
    let key = TransactionKey::generate().unwrap();
    let signer = ControlSigner::new(A, &key, Direction::PeerToServer);
    let verifier = ControlVerifier::new(Direction::PeerToServer, NOW * 1000 - 60_000);
    (key, signer, verifier)
}

#[test]
fn control_message_accepted_once_then_replay_refused() {
    let (key, signer, verifier) = ctl_pair();
    let now = NOW * 1000;
    let body = br#"{"chunks":[]}"#;
    let auth = signer.sign(MessageKind::Put, body, now);
    let wire = ControlAuth::from_header(&auth.to_header()).unwrap();
    verifier
        .verify(&wire, &key, MessageKind::Put, body, now)
        .unwrap();
    assert!(matches!(
        verifier
            .verify(&wire, &key, MessageKind::Put, body, now + 5)
            .unwrap_err(),
        ControlError::Replayed { .. }
    ));
    // The next message on the channel goes through; an older one does not.
    let next = signer.sign(MessageKind::Put, body, now + 1);
    let later = signer.sign(MessageKind::Put, body, now + 2);
    verifier
        .verify(&later, &key, MessageKind::Put, body, now + 2)
        .unwrap();
    assert!(matches!(
        verifier
            .verify(&next, &key, MessageKind::Put, body, now + 3)
            .unwrap_err(),
        ControlError::Replayed { .. }
    ));
}

#[test]
fn control_message_with_old_or_future_timestamp_is_stale() {
    let (key, signer, verifier) = ctl_pair();
    let now = NOW * 1000;
    let window = peerstash::control::DEFAULT_WINDOW_MS;
    let old = signer.sign(MessageKind::Get, b"", now - window - 1);
    assert!(matches!(
        verifier
            .verify(&old, &key, MessageKind::Get, b"", now)
            .unwrap_err(),
        ControlError::Stale { .. }
    ));
    let future = signer.sign(MessageKind::Get, b"", now + window + 1);
    assert!(matches!(
        verifier
            .verify(&future, &key, MessageKind::Get, b"", now)
            .unwrap_err(),
        ControlError::Stale { .. }
    ));
    // A message from before the receiver restarted is refused even inside the window.
    let restarted = ControlVerifier::new(Direction::PeerToServer, now);
    let before = signer.sign(MessageKind::Get, b"", now - 10);
    assert!(matches!(
        restarted
            .verify(&before, &key, MessageKind::Get, b"", now)
            .unwrap_err(),
        ControlError::Stale { .. }
    ));
}

#[test]
fn control_message_with_wrong_key_tampered_body_or_kind_is_refused() {
    let (key, signer, verifier) = ctl_pair();
    let now = NOW * 1000;
    let other = TransactionKey::generate().unwrap();
    let auth = signer.sign(MessageKind::Release, b"body", now);
    assert_eq!(
        verifier
            .verify(&auth, &other, MessageKind::Release, b"body", now)
            .unwrap_err(),
        ControlError::BadMac
    );
    assert_eq!(
        verifier
            .verify(&auth, &key, MessageKind::Release, b"bodY", now)
            .unwrap_err(),
        ControlError::BadMac
    );
    assert!(matches!(
        verifier
            .verify(&auth, &key, MessageKind::Put, b"body", now)
            .unwrap_err(),
        ControlError::WrongKind { .. }
    ));
    let mut encoded = auth.encode();
    encoded[20] ^= 1; // counter
    let bumped = ControlAuth::decode(&encoded).unwrap();
    assert_eq!(
        verifier
            .verify(&bumped, &key, MessageKind::Release, b"body", now)
            .unwrap_err(),
        ControlError::BadMac
    );
    // Refusals did not advance the channel: the genuine message still goes through.
    verifier
        .verify(&auth, &key, MessageKind::Release, b"body", now)
        .unwrap();
}

#[test]
fn server_cannot_be_impersonated_to_a_peer() {
    let key = TransactionKey::generate().unwrap();
    let peer_side = ControlVerifier::new(Direction::ServerToPeer, NOW * 1000 - 1000);
    let now = NOW * 1000;
    // The real server knows the key.
    let server = ControlSigner::new(B, &key, Direction::ServerToPeer);
    let ok = server.sign(MessageKind::StatusCheck, b"", now);
    peer_side
        .verify(&ok, &key, MessageKind::StatusCheck, b"", now)
        .unwrap();
    // An impostor does not.
    let impostor = ControlSigner::new(
        B,
        &TransactionKey::generate().unwrap(),
        Direction::ServerToPeer,
    );
    let fake = impostor.sign(MessageKind::StatusCheck, b"", now + 1);
    assert_eq!(
        peer_side
            .verify(&fake, &key, MessageKind::StatusCheck, b"", now + 1)
            .unwrap_err(),
        ControlError::BadMac
    );
    // A message the peer itself sent to the server cannot be reflected back at it.
    let peer_msg = ControlSigner::new(B, &key, Direction::PeerToServer).sign(
        MessageKind::StatusCheck,
        b"",
        now + 2,
    );
    assert_eq!(
        peer_side
            .verify(&peer_msg, &key, MessageKind::StatusCheck, b"", now + 2)
            .unwrap_err(),
        ControlError::WrongDirection
    );
    let mut bytes = peer_msg.encode();
    bytes[1] = Direction::ServerToPeer as u8;
    let flipped = ControlAuth::decode(&bytes).unwrap();
    assert_eq!(
        peer_side
            .verify(&flipped, &key, MessageKind::StatusCheck, b"", now + 2)
            .unwrap_err(),
        ControlError::BadMac
    );
}

#[test]
fn malformed_control_headers_are_refused() {
    assert!(ControlAuth::from_header("").is_err());
    assert!(ControlAuth::from_header(&"zz".repeat(68)).is_err());
    assert!(ControlAuth::decode(&[0u8; 67]).is_err());
    let mut b = [0u8; 68];
    b[0] = 1;
    b[1] = 1;
    b[11] = 200; // unknown kind
    assert_eq!(
        ControlAuth::decode(&b).unwrap_err(),
        ControlError::Malformed("kind")
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Fuzz: arbitrary bytes never panic the token decoder and never open.
    #[test]
    fn fuzz_token_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let key = TransactionKey::from_bytes([7; 32]);
        let v = TokenVerifier::new(B, &key);
        prop_assert!(v.open(&bytes, NOW).is_err());
    }

    /// Fuzz: a genuine token with arbitrary edits never opens as something else.
    #[test]
    fn fuzz_mutated_token(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), cut in any::<prop::sample::Index>(), truncate in any::<bool>()) {
        let key = TransactionKey::from_bytes([9; 32]);
        let v = TokenVerifier::new(B, &key);
        let c = claims(TxKind::Put, 2);
        let good = c.seal(&key.token_keys()).unwrap().into_bytes();
        let mut t = good.clone();
        for (i, x) in &edits {
            let at = i.index(t.len());
            t[at] ^= x;
        }
        if truncate {
            t.truncate(cut.index(t.len()));
        }
        match v.open(&t, NOW) {
            Ok(auth) => {
                prop_assert_eq!(&t, &good);
                prop_assert_eq!(auth.claims(), &c);
            }
            Err(_) => prop_assert_ne!(&t, &good),
        }
    }

    /// Fuzz: arbitrary control headers never panic the decoder.
    #[test]
    fn fuzz_control_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..140), text in ".{0,200}") {
        let _ = ControlAuth::decode(&bytes);
        let _ = ControlAuth::from_header(&text);
        let _ = ControlAuth::from_header(&hex::encode(&bytes));
    }
}
