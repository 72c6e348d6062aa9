//! What each endpoint does, once the request is read (and, for all but register and login,
//! authenticated). These run on the blocking pool: they hash passwords and touch SQLite.

use peerstash::api::Reason;
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use peerstash::api::{
    self, ConfirmRequest, ConfirmResponse, GetRequest, GetResponse, HeartbeatRequest,
    HeartbeatResponse, InventoryRequest, InventoryResponse, KeyMode, LoginRequest, LoginResponse,
    Placement, PutRequest, PutResponse, Rebuild, RegisterRequest, RegisterResponse, ReleaseRequest,
    ReleaseResponse, RepairOrder, ReportRequest, StatusResponse,
};
use peerstash::api::{
    DropRootsRequest, DropRootsResponse, GetRootRequest, GetRootResponse, PutRootRequest,
    PutRootResponse, RootRecord,
};
use peerstash::control::now_ms;
use peerstash::token::{Grant, TokenClaims};
use peerstash::{PeerId, TransactionKey, TxKind};

use crate::error::Refusal;
use crate::store::{self, NewPeer, Planned, Policy, StoreError};
use crate::State;

const MIN_PASSWORD: usize = 8;
const MAX_PASSWORD: usize = 1024;
const MAX_ADDR: usize = 255;

/// The rules in force now.
pub(crate) fn policy(st: &State) -> Policy {
    let now = now_ms();
    Policy {
        quota_ratio: st.cfg.quota_ratio,
        quota_grace: (st.cfg.audit_interval_secs > 0).then_some(st.cfg.quota_grace_bytes),
        now_ms: now,
        online_cutoff_ms: now.saturating_sub(st.cfg.online_timeout_secs * 1000),
        expires_s: now / 1000 + st.cfg.token_lifetime_secs,
    }
}

fn valid_name(name: &str) -> Result<(), Refusal> {
    // A leading letter or digit keeps `.`, `..`, hidden-file and option-like names out:
    // names end up in paths and command lines.
    let ok = name.len() <= api::MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Refusal::new(
            400,
            Reason::BadName,
            format!(
                "a name is 1 to {} characters of A-Z, a-z, 0-9, '.', '_' and '-', starting \
                 with a letter or a digit",
                api::MAX_NAME_LEN
            ),
        ))
    }
}

/// Whether `host` is a DNS name: dot-separated labels of 1 to 63 letters, digits and
/// hyphens, not starting or ending with a hyphen, the last one not all digits (that would
/// be a mistyped IPv4 address).
fn dns_name(host: &str) -> bool {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    host.len() <= 253
        && host.split('.').all(label_ok)
        && !host
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

/// A daemon address other peers can dial: `host:port`, the host an IPv4 address, an IPv6
/// address in brackets or a DNS name, the port 1 to 65535.
fn valid_addr(addr: &str) -> Result<(), Refusal> {
    let ok = addr.len() <= MAX_ADDR
        && match addr.parse::<std::net::SocketAddr>() {
            Ok(sa) => sa.port() != 0,
            Err(_) => addr.rsplit_once(':').is_some_and(|(host, port)| {
                dns_name(host)
                    && !port.is_empty()
                    && port.bytes().all(|b| b.is_ascii_digit())
                    && port.parse::<u16>().is_ok_and(|p| p != 0)
            }),
        };
    if ok {
        Ok(())
    } else {
        Err(Refusal::new(
            400,
            Reason::BadAddress,
            "the daemon address must be host:port, where host is an IPv4 address, an IPv6 \
             address in brackets or a DNS name, and port is 1 to 65535 (e.g. \
             203.0.113.5:7420 or [2001:db8::5]:7420)",
        ))
    }
}

fn hash_password(password: &str) -> Result<String, Refusal> {
    let mut salt = [0u8; 16];
    peerstash::keys::random_bytes(&mut salt).map_err(Refusal::internal)?;
    let salt = SaltString::encode_b64(&salt).map_err(Refusal::internal)?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(Refusal::internal)
}

fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// A hash nobody's password matches, verified for unknown names so that a wrong name
/// takes as long as a wrong password and names cannot be probed by timing.
fn dummy_hash() -> &'static str {
    static H: OnceLock<String> = OnceLock::new();
    H.get_or_init(|| hash_password("not anyone's password").unwrap_or_default())
}

fn bad_credentials() -> Refusal {
    Refusal::new(
        401,
        Reason::BadCredentials,
        "unknown name or wrong password; check both (names are case-sensitive)",
    )
}

/// `POST /v1/register`.
pub(crate) fn register(st: &State, req: RegisterRequest) -> Result<RegisterResponse, Refusal> {
    valid_name(&req.name)?;
    if req.password.len() < MIN_PASSWORD || req.password.len() > MAX_PASSWORD {
        return Err(Refusal::new(
            400,
            Reason::BadPassword,
            format!("a password is {MIN_PASSWORD} to {MAX_PASSWORD} bytes long"),
        ));
    }
    if req.lend_bytes == 0 || req.lend_bytes > i64::MAX as u64 {
        return Err(Refusal::new(
            400,
            Reason::BadLend,
            "lend some space (e.g. --lend 10G): what you may store depends on it",
        ));
    }
    valid_addr(&req.quic_addr)?;
    let require_invite = !st.cfg.open_registration;
    // Cheap checks before the expensive hash (they are repeated atomically on insert).
    {
        let store = st.store.lock().expect("not poisoned");
        if store.name_taken(&req.name)? {
            return Err(StoreError::NameTaken(req.name.clone()).into());
        }
        if require_invite && !store.invite_exists(req.invite.as_deref().unwrap_or(""))? {
            return Err(StoreError::BadInvite {
                given: req.invite.is_some(),
            }
            .into());
        }
    }
    let phc = hash_password(&req.password)?;
    let key = TransactionKey::generate().map_err(Refusal::internal)?;
    let new = NewPeer {
        name: &req.name,
        password_hash: &phc,
        key_mode: req.key_mode,
        lend_bytes: req.lend_bytes,
        quic_addr: &req.quic_addr,
        fingerprint: req.cert_fingerprint,
    };
    let peer = st.store.lock().expect("not poisoned").insert_peer(
        &new,
        req.invite.as_deref(),
        require_invite,
        now_ms(),
        |id| {
            st.at_rest
                .seal(id, &key)
                .map_err(|e| StoreError::Internal(e.to_string()))
        },
    )?;
    st.keys
        .write()
        .expect("not poisoned")
        .insert(peer, key.clone());
    st.metrics.registrations.inc();
    tracing::info!(peer = %peer, name = %req.name, "registered");
    Ok(RegisterResponse {
        peer_id: peer,
        transaction_key: key.expose_hex(),
        data_key: (req.key_mode == KeyMode::Escrow)
            .then(|| st.master.escrow_data_key(peer).expose_hex()),
        quota_bytes: policy(st).quota(req.lend_bytes, 0),
    })
}

/// `POST /v1/login`.
pub(crate) fn login(st: &State, req: LoginRequest) -> Result<LoginResponse, Refusal> {
    if req.name.len() > api::MAX_NAME_LEN || req.password.len() > MAX_PASSWORD {
        return Err(bad_credentials());
    }
    let found = st
        .store
        .lock()
        .expect("not poisoned")
        .peer_for_login(&req.name)?;
    let Some((peer, phc, blob)) = found else {
        verify_password(&req.password, dummy_hash());
        return Err(bad_credentials());
    };
    if !verify_password(&req.password, &phc) {
        return Err(bad_credentials());
    }
    let key = st.at_rest.open(peer.id, &blob).map_err(Refusal::internal)?;
    st.metrics.logins.inc();
    tracing::info!(peer = %peer.id, "login");
    Ok(LoginResponse {
        peer_id: peer.id,
        transaction_key: key.expose_hex(),
        data_key: (peer.key_mode == KeyMode::Escrow)
            .then(|| st.master.escrow_data_key(peer.id).expose_hex()),
        key_mode: peer.key_mode,
        lend_bytes: peer.lend_bytes,
        quic_addr: peer.quic_addr,
        quota_bytes: policy(st).quota(peer.lend_bytes, peer.audited_bytes),
    })
}

/// `POST /v1/heartbeat`.
pub(crate) fn heartbeat(
    st: &State,
    peer: PeerId,
    req: HeartbeatRequest,
) -> Result<HeartbeatResponse, Refusal> {
    valid_addr(&req.quic_addr)?;
    if req.dropped.len() > api::MAX_CHUNKS_PER_REQUEST {
        return Err(Refusal::bad_request(
            "too many dropped chunks in one heartbeat",
        ));
    }
    let pol = policy(st);
    let (drop, planned) = {
        let mut store = st.store.lock().expect("not poisoned");
        let drop = store.heartbeat(peer, &req, pol.now_ms)?;
        let planned = store.take_repairs(peer, &pol, api::MAX_REPAIRS_PER_HEARTBEAT)?;
        (drop, planned)
    };
    let mut repairs = Vec::with_capacity(planned.len());
    let one = |p: Planned, kind| -> Result<Placement, Refusal> {
        seal_all(st, peer, kind, vec![p], pol.expires_s)?
            .pop()
            .ok_or_else(|| Refusal::internal("a repair order lost its token"))
    };
    for p in planned {
        let source = p.source.map(|s| one(s, TxKind::Get)).transpose()?;
        let rebuild = match p.rebuild {
            Some((stripe, index, sources)) => Some(Rebuild {
                stripe,
                index,
                sources: seal_all(st, peer, TxKind::Get, sources, pol.expires_s)?,
            }),
            None => None,
        };
        repairs.push(RepairOrder {
            chunk: p.chunk,
            size: p.size,
            source,
            rebuild,
            put: one(p.put, TxKind::Put)?,
        });
    }
    if !repairs.is_empty() {
        tracing::info!(peer = %peer, orders = repairs.len(), "repair orders sent");
        st.metrics.repair_orders.inc_by(repairs.len() as u64);
    }
    Ok(HeartbeatResponse {
        drop,
        interval_secs: st.cfg.heartbeat_interval_secs,
        repairs,
        reconcile_secs: st.cfg.reconcile_interval_secs,
        orphan_grace_secs: st.cfg.orphan_grace_secs,
    })
}

/// Seal one token of `kind` per planned target, under that target's key.
fn seal_all(
    st: &State,
    requester: PeerId,
    kind: TxKind,
    planned: Vec<Planned>,
    expires_at: u64,
) -> Result<Vec<Placement>, Refusal> {
    let kinds = vec![kind; planned.len()];
    seal_kinds(st, requester, &kinds, planned, expires_at)
}

/// Tokens for the owner of the chunks (put, get): of `kind`, or in peak-load mode
/// universal wherever the store grants it ([`store::Store::grant_universal`]: never on a
/// target that keeps one of the chunks for someone else). Repair orders never come here:
/// their requester is not the owner.
fn seal_for_owner(
    st: &State,
    owner: PeerId,
    kind: TxKind,
    planned: Vec<Planned>,
    pol: &Policy,
) -> Result<Vec<Placement>, Refusal> {
    let kinds: Vec<TxKind> = if st.cfg.peak_load {
        st.store
            .lock()
            .expect("not poisoned")
            .grant_universal(owner, &planned, pol.expires_s, pol.now_ms / 1000)?
            .into_iter()
            .map(|u| if u { TxKind::Universal } else { kind })
            .collect()
    } else {
        vec![kind; planned.len()]
    };
    seal_kinds(st, owner, &kinds, planned, pol.expires_s)
}

fn seal_kinds(
    st: &State,
    requester: PeerId,
    kinds: &[TxKind],
    planned: Vec<Planned>,
    expires_at: u64,
) -> Result<Vec<Placement>, Refusal> {
    let issued_at = now_ms() / 1000;
    planned
        .into_iter()
        .zip(kinds)
        .map(|(p, &kind)| {
            let key = st
                .key_of(p.target)
                .ok_or_else(|| Refusal::internal(format!("no key for peer {}", p.target)))?;
            let claims = TokenClaims {
                requester,
                target: p.target,
                kind,
                txid: p.txid,
                issued_at,
                expires_at,
                grants: p.grants.iter().map(|(c, s)| Grant::whole(*c, *s)).collect(),
            };
            let token = claims.seal(&key.token_keys()).map_err(Refusal::internal)?;
            st.metrics.count_token(kind);
            // A daemon behind a router that mapped a port is reached at the mapping.
            let addr = st
                .rendezvous
                .mapped(p.target)
                .map_or(p.addr, |a| a.to_string());
            Ok(Placement {
                target: p.target,
                addr,
                fingerprint: p.fingerprint,
                txid: p.txid,
                expires_at,
                token,
                chunks: p.grants.into_iter().map(|(c, _)| c).collect(),
                online: p.online,
                route: st.rendezvous.route(p.target),
            })
        })
        .collect()
}

/// `POST /v1/put`.
pub(crate) fn put(st: &State, peer: PeerId, req: PutRequest) -> Result<PutResponse, Refusal> {
    let pol = policy(st);
    let (plan, barrier) = {
        let mut store = st.store.lock().expect("not poisoned");
        let plan = store.put_with_stripes(
            peer,
            &req.chunks,
            &req.stripes,
            req.replicas,
            &req.exclude,
            &pol,
        )?;
        let barrier = plan.found_locations.then(|| store.barrier());
        (plan, barrier)
    };
    if let Some(b) = barrier {
        durable(&b);
    }
    let placements = seal_for_owner(st, peer, TxKind::Put, plan.placements, &pol)?;
    Ok(PutResponse {
        placements,
        already_stored: plan.already_stored,
    })
}

/// A confirm waiting to be written, and where to send its result.
pub(crate) type QueuedConfirm = (
    PeerId,
    ConfirmRequest,
    std::sync::mpsc::Sender<Result<store::Confirmed, Refusal>>,
);

/// Wait until deferred commits are on disk (outside the store lock). If that fails, stop
/// the server: after a failed fsync the kernel may have dropped the dirty pages, and a
/// later fsync can succeed without them, so what is durable is unknown and only a restart
/// reads back what the disk really holds. Nothing resting on them has been answered.
fn durable(wal: &store::WalSync) {
    if let Err(e) = wal.sync() {
        tracing::error!("syncing the database log failed: {e}; stopping");
        std::process::abort();
    }
}

/// `POST /v1/confirm` (from the target).
///
/// Group commit: every confirm joins a queue, and whoever next holds the database lock
/// writes the whole queue in one transaction. Confirms arrive in bursts (every target of
/// a put confirms at once), and each transaction costs an fsync.
pub(crate) fn confirm(
    st: &State,
    peer: PeerId,
    req: ConfirmRequest,
) -> Result<ConfirmResponse, Refusal> {
    if req.chunks.len() > api::MAX_CHUNKS_PER_REQUEST {
        return Err(Refusal::bad_request("too many chunks in one confirm"));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    st.confirm_queue
        .lock()
        .expect("not poisoned")
        .push((peer, req, tx));
    let written = {
        let mut store = st.store.lock().expect("not poisoned");
        let batch = std::mem::take(&mut *st.confirm_queue.lock().expect("not poisoned"));
        // Empty when an earlier lock holder already wrote ours.
        if batch.is_empty() {
            None
        } else {
            let items: Vec<(PeerId, peerstash::TransactionId, &[peerstash::ChunkId])> = batch
                .iter()
                .map(|(p, r, _)| (*p, r.txid, r.chunks.as_slice()))
                .collect();
            match store.confirm_batch_deferred(&items) {
                Ok((counts, wal)) => Some((batch, counts, wal)),
                Err(e) => {
                    let refusal = Refusal::from(e);
                    for (_, _, reply) in &batch {
                        let _ = reply.send(Err(refusal.clone()));
                    }
                    None
                }
            }
        }
    };
    // The fsync, outside the store lock: puts and gets go on while the disk works, and
    // confirms arriving meanwhile form the next group.
    if let Some((batch, counts, wal)) = written {
        durable(&wal);
        for ((_, _, reply), n) in batch.iter().zip(counts) {
            let _ = reply.send(Ok(n));
        }
    }
    // Our item was queued before we took the lock, so whoever drained the queue — us or
    // an earlier holder — has answered by now.
    let done = rx
        .recv()
        .map_err(|_| Refusal::internal("a queued confirm got no answer"))??;
    st.metrics.confirmed.inc_by(done.committed as u64);
    Ok(ConfirmResponse {
        committed: done.committed,
        unexpected: done.unexpected,
    })
}

/// `POST /v1/get`.
pub(crate) fn get(st: &State, peer: PeerId, req: GetRequest) -> Result<GetResponse, Refusal> {
    let pol = policy(st);
    let (planned, missing, stripes, barrier) = {
        let mut store = st.store.lock().expect("not poisoned");
        let (planned, missing, stripes) = store.get(peer, &req.chunks, pol.online_cutoff_ms)?;
        (planned, missing, stripes, store.barrier())
    };
    durable(&barrier);
    let placements = seal_for_owner(st, peer, TxKind::Get, planned, &pol)?;
    Ok(GetResponse {
        placements,
        missing,
        stripes,
    })
}

/// `POST /v1/release`.
pub(crate) fn release(
    st: &State,
    peer: PeerId,
    req: ReleaseRequest,
) -> Result<ReleaseResponse, Refusal> {
    let released = st
        .store
        .lock()
        .expect("not poisoned")
        .release(peer, &req.chunks)?;
    Ok(ReleaseResponse { released })
}

/// `POST /v1/report`.
pub(crate) fn report(st: &State, peer: PeerId, req: ReportRequest) -> Result<(), Refusal> {
    if let ReportRequest::TransferFailed { chunks, .. } = &req {
        if chunks.len() > api::MAX_CHUNKS_PER_REQUEST {
            return Err(Refusal::bad_request("too many chunks in one report"));
        }
    }
    // Logged as counted: the request's own strings may be anything, of any length.
    let (subject, kind, reason) = st.store.lock().expect("not poisoned").report(peer, &req)?;
    tracing::warn!(reporter = %peer, %subject, kind, reason, "failure report");
    Ok(())
}

/// `POST /v1/inventory` (from a storage daemon): which of the chunks on its disk it holds
/// for nobody.
pub(crate) fn inventory(
    st: &State,
    peer: PeerId,
    req: InventoryRequest,
) -> Result<InventoryResponse, Refusal> {
    if req.chunks.is_empty() || req.chunks.len() > api::MAX_CHUNKS_PER_REQUEST {
        return Err(Refusal::bad_request(format!(
            "an inventory names 1 to {} chunks",
            api::MAX_CHUNKS_PER_REQUEST
        )));
    }
    let unknown = st
        .store
        .lock()
        .expect("not poisoned")
        .unknown_on(peer, &req.chunks)?;
    Ok(InventoryResponse { unknown })
}

/// `POST /v1/status`.
pub(crate) fn status(
    st: &State,
    peer: PeerId,
    req: api::StatusRequest,
) -> Result<StatusResponse, Refusal> {
    let pol = policy(st);
    let (found, figures, audits) = {
        let store = st.store.lock().expect("not poisoned");
        (
            store.status(peer, pol.online_cutoff_ms, pol.now_ms / 1000)?,
            if req.figures {
                Some(store.durability(peer, pol.online_cutoff_ms)?)
            } else {
                None
            },
            // One row: cheap enough for the drive's quota polls too.
            store.audit_record(peer)?,
        )
    };
    let (rec, pending, online, total) = found
        .ok_or_else(|| Refusal::new(401, Reason::UnknownPeer, "this peer is not registered"))?;
    let reach = st.rendezvous.reach(peer);
    Ok(StatusResponse {
        peer_id: rec.id,
        name: rec.name,
        peers_online: online as usize,
        peers_total: total as usize,
        quota_bytes: pol.quota(rec.lend_bytes, rec.audited_bytes),
        audited_bytes: pol.quota_grace.map(|_| rec.audited_bytes),
        used_bytes: rec.stored_bytes + pending,
        lend_bytes: rec.lend_bytes,
        holding_bytes: rec.held_bytes,
        chunks: figures.map(|f| f.0),
        chunks_below_target: figures.map(|f| f.1),
        replicas: figures.map(|f| f.2),
        standing: audits.map(|a| api::PeerStanding {
            audits_passed: a.passed,
            audits_failed: a.failed,
            reputation: a.reputation,
            uptime: a.uptime,
            standing: a.standing.as_str().into(),
            receiving_placements: a.standing == store::Standing::Good,
        }),
        reach: reach.map(|(r, _)| r.as_str().to_string()),
        reach_addr: reach.map(|(_, a)| a.to_string()),
        mapped_by: st
            .rendezvous
            .mapped_by(peer)
            .map(|m| m.as_str().to_string()),
    })
}

/// `POST /v1/root`: keep a new sealed root record.
pub(crate) fn put_root(
    st: &State,
    peer: PeerId,
    req: PutRootRequest,
) -> Result<PutRootResponse, Refusal> {
    if req.sealed.len() > 2 * api::MAX_ROOT_BYTES {
        return Err(Refusal::new(
            413,
            Reason::RootTooLarge,
            format!("a sealed root is at most {} bytes", api::MAX_ROOT_BYTES),
        ));
    }
    let sealed =
        hex::decode(&req.sealed).map_err(|_| Refusal::bad_request("the sealed root is not hex"))?;
    if sealed.is_empty() {
        return Err(Refusal::bad_request("the sealed root is empty"));
    }
    if req.version == 0 || req.version > i64::MAX as u64 {
        return Err(Refusal::bad_request("root versions are 1 to 2^63-1"));
    }
    let kept = st.store.lock().expect("not poisoned").put_root(
        peer,
        req.version,
        &sealed,
        now_ms(),
        st.cfg.keep_snapshots,
    )?;
    Ok(PutRootResponse { kept })
}

/// `POST /v1/root/get`: the latest (or a given) sealed root record.
pub(crate) fn get_root(
    st: &State,
    peer: PeerId,
    req: GetRootRequest,
) -> Result<GetRootResponse, Refusal> {
    let (root, kept) = st
        .store
        .lock()
        .expect("not poisoned")
        .get_root(peer, req.version)?;
    Ok(GetRootResponse {
        root: root.map(|(version, created_ms, sealed)| RootRecord {
            version,
            created_ms,
            sealed: hex::encode(sealed),
        }),
        kept,
    })
}

/// `POST /v1/root/drop`: forget earlier sealed root records.
pub(crate) fn drop_roots(
    st: &State,
    peer: PeerId,
    req: DropRootsRequest,
) -> Result<DropRootsResponse, Refusal> {
    if req.versions.len() > api::MAX_ROOT_DROP {
        return Err(Refusal::bad_request(format!(
            "at most {} versions per drop",
            api::MAX_ROOT_DROP
        )));
    }
    let kept = st
        .store
        .lock()
        .expect("not poisoned")
        .drop_roots(peer, &req.versions)?;
    Ok(DropRootsResponse { kept })
}

#[cfg(test)]
mod tests {
    use super::{valid_addr, valid_name, Reason};

    #[test]
    fn addresses_are_host_and_a_real_port() {
        for ok in [
            "127.0.0.1:7420",
            "203.0.113.5:1",
            "[::1]:7420",
            "[2001:db8::5]:65535",
            "localhost:7420",
            "peer-3.example.org:7420",
            "example.org.:80",
        ] {
            assert!(valid_addr(ok).is_ok(), "{ok}");
        }
        let long = format!("{}.org:80", "a".repeat(300));
        for bad in [
            "127.0.0.1:0",
            "127.0.0.1:99999",
            ":1",
            "[::1]:1:2",
            "::1:7420",
            "[::1]",
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:+80",
            "127.0.0.1:080x",
            "999.1.1.1:80",
            "-a.example:80",
            "a-.example:80",
            "a..example:80",
            "a b:80",
            "ü.example:80",
            "",
            long.as_str(),
        ] {
            assert_eq!(
                valid_addr(bad).unwrap_err().reason,
                Reason::BadAddress,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn names_start_with_a_letter_or_digit() {
        for ok in ["alice", "7up", "a.b_c-d", "A"] {
            assert!(valid_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".x",
            "-rf",
            "_x",
            "a/b",
            "a b",
            &"a".repeat(65),
        ] {
            assert_eq!(
                valid_name(bad).unwrap_err().reason,
                Reason::BadName,
                "{bad:?}"
            );
        }
    }
}
