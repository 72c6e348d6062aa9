//! The drive: a folder whose content is chunked (FastCDC), sealed (AES-256-GCM-SIV with a
//! content-derived nonce), addressed by BLAKE3 of the ciphertext and stored through a
//! [`ChunkBackend`]. One module per job:
//!
//! - [`crypto`]: sealing and opening chunks;
//! - [`chunker`]: content-defined chunking;
//! - [`backend`]: the storage trait and a local-directory implementation for tests;
//! - [`index`]: the SQLite index (namespace, chunk lists, refcounts, pending uploads);
//! - [`staging`]: local files holding content not yet uploaded;
//! - [`model`]: the POSIX operations, without FUSE;
//! - `uploader`: the background thread that stores and commits;
//! - [`fuse`]: the fuser adapter, [`mount`] and [`run_foreground`].

pub mod backend;
pub mod chunker;
pub mod crypto;
pub mod fuse;
pub mod index;
pub mod model;
pub mod staging;
mod uploader;

pub use backend::{BackendError, ChunkBackend, DirBackend, Quota};
pub use fuse::{mount, run_foreground, run_foreground_until, DriveConfig, MountError, MountHandle};
pub use model::{DriveOptions, FsError, Model};
