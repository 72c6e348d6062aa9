//! Peer-to-peer storage over QUIC: the storage daemon that lends disk, the client that
//! stores and fetches chunks on other peers, and the wire protocol between them.
//!
//! - [`wire`]: the byte-level protocol (one request per QUIC stream).
//! - [`store`]: the daemon's content-addressed, crash-safe chunk store.
//! - [`daemon`]: the daemon itself ([`Daemon::run`]).
//! - [`link`]: what the daemon needs from the coordination server ([`ServerLink`]).
//! - [`client`]: [`PeerClient`], used by the drive to talk to daemons.
//! - [`portmap`]: asking the home router for a port mapping (PCP, NAT-PMP, UPnP-IGD).
//! - [`rendezvous`]: reaching peers behind NAT (hole punching coordinated by the server,
//!   the server's relay of last resort).
//!
//! Running a daemon (what `peerstash serve` does), with the real server link in place of
//! [`NullLink`]:
//!
//! ```no_run
//! # async fn serve(key: peerstash::TransactionKey, cert: peerstash::tls::CertKey)
//! #     -> Result<(), Box<dyn std::error::Error>> {
//! use peerstash::peer::{Daemon, DaemonConfig, NullLink};
//! let config = DaemonConfig::new(
//!     peerstash::PeerId(7),
//!     key,
//!     "0.0.0.0:4433".parse()?,
//!     "/srv/peerstash/lent".into(),
//!     10 << 30,
//!     cert,
//!     "/var/lib/peerstash".into(),
//! );
//! let daemon = Daemon::run(config, NullLink).await?;
//! tokio::signal::ctrl_c().await?;
//! daemon.shutdown().await;
//! # Ok(()) }
//! ```

pub mod client;
pub mod daemon;
pub mod link;
pub mod portmap;
pub mod rendezvous;
pub mod store;
pub mod wire;

pub use client::{PeerAddr, PeerClient, PeerError, PeerSpace, Via};
pub use daemon::{Daemon, DaemonConfig, DaemonError, Limits, RunningDaemon};
pub use link::{LinkError, NullLink, RecordingLink, ServerLink};
pub use store::{ChunkStore, StoreError};
pub use wire::{ControlReason, Refusal, TokenReason};
