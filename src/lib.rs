//! peerstash: a backup drive made of other people's spare disk.
//!
//! This library holds the protocol every part speaks — identifiers, keys, the server's
//! signed tokens, authenticated control messages, the replay store — and, with the
//! default `client` feature, the client, the storage daemon and the FUSE drive.
//! `docs/ARCHITECTURE.md` maps the modules; `docs/PROTOCOL.md` gives the wire formats.

#![warn(missing_docs)]

pub mod api;
pub mod audit;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "client")]
pub mod cluster;
pub mod control;
#[cfg(feature = "client")]
pub mod drive;
#[cfg(feature = "peer")]
pub mod erasure;
pub mod ids;
pub mod keys;
#[cfg(feature = "peer")]
pub mod peer;
#[cfg(feature = "client")]
pub mod remote;
pub mod replay;
pub mod size;
#[cfg(feature = "tls")]
pub mod tls;
pub mod token;

pub use ids::{ChunkId, Fingerprint, PeerId, TransactionId, VerifiedChunk};
pub use keys::{DataKey, MasterSecret, TransactionKey};
pub use token::{Token, TokenClaims, TokenError, TxKind};
