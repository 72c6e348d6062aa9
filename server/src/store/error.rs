//! Why the store turned an operation down, in the domain's terms. The HTTP layer
//! (`crate::error`) alone turns each into a status code and a reason on the wire.

use peerstash::api::Reason;

use crate::placement::Shortfall;

/// A store operation refused (nothing was written) or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request breaks one of its own bounds or rules (sizes, counts, duplicates).
    #[error("{0}")]
    Invalid(String),
    /// The peer named is not registered.
    #[error("this peer is not registered")]
    UnknownPeer,
    /// The name asked for at registration is taken.
    #[error("the name {0:?} is already registered; pick another, or log in if it is yours")]
    NameTaken(String),
    /// Registration needs an invite, and none or an unknown or spent one was given.
    #[error("{}", if *given {
        "this invite code is unknown or already used; ask the operator for a new one \
         (peerstash-server invite)"
    } else {
        "this server registers by invitation: pass --invite CODE (the operator prints \
         codes with peerstash-server invite)"
    })]
    BadInvite {
        /// Whether a code was given at all.
        given: bool,
    },
    /// Storing this would take the owner past its quota.
    #[error(
        "storing this needs {needed} bytes (every replica counted) but you use {used} of \
         your {quota}-byte quota ({why}), or release data you no longer need"
    )]
    OverQuota {
        /// Bytes the put needs, every replica counted.
        needed: u64,
        /// Bytes the owner uses (committed and pending).
        used: u64,
        /// The owner's quota.
        quota: u64,
        /// What the quota comes from, and how to raise it.
        why: String,
    },
    /// Too few distinct online peers with room for what the put needs.
    #[error("{}", shortfall_message(.0))]
    NotEnoughPeers(Shortfall),
    /// A snapshot root not newer than the one kept.
    #[error("root version {version} is not newer than the kept version {latest}")]
    StaleRoot {
        /// The version offered.
        version: u64,
        /// The latest version kept.
        latest: u64,
    },
    /// A drop that names the latest root, which is always kept.
    #[error("root version {0} is the latest: it cannot be dropped")]
    LatestRoot(u64),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] super::db::Error),
    /// Something outside the database failed (randomness, sealing a key).
    #[error("{0}")]
    Internal(String),
}

impl StoreError {
    /// The refusal's stable name, which clients act on.
    pub fn reason(&self) -> Reason {
        match self {
            StoreError::Invalid(_) => Reason::BadRequest,
            StoreError::UnknownPeer => Reason::UnknownPeer,
            StoreError::NameTaken(_) => Reason::NameTaken,
            StoreError::BadInvite { .. } => Reason::BadInvite,
            StoreError::OverQuota { .. } => Reason::OverQuota,
            StoreError::NotEnoughPeers(_) => Reason::NotEnoughPeers,
            StoreError::StaleRoot { .. } => Reason::StaleRoot,
            StoreError::LatestRoot(_) => Reason::LatestRoot,
            StoreError::Db(_) | StoreError::Internal(_) => Reason::Internal,
        }
    }
}

fn shortfall_message(s: &Shortfall) -> String {
    match s {
        Shortfall::Stripe { others } => format!(
            "an erasure-coded stripe needs each shard on its own peer, but only {others} \
             other peer(s) online have room; use fewer shards or try again when more peers \
             are online"
        ),
        Shortfall::Copies {
            chunk,
            size,
            need,
            got,
            others,
        } => format!(
            "chunk {chunk} needs {need} more replica(s) of {size} bytes but only {got} \
             distinct online peer(s) with room could take it ({others} other peer(s) \
             online); ask for fewer replicas or try again when more peers are online"
        ),
    }
}
