//! The drive: a folder whose content is chunked (FastCDC), sealed (AES-256-GCM-SIV with a
//! content-derived nonce), addressed by BLAKE3 of the ciphertext and stored through a
//! [`ChunkBackend`]. One module per job:
//!
//! - [`crypto`]: sealing and opening chunks;
//! - [`chunker`]: content-defined chunking (256 KiB / 1 MiB / 4 MiB);
//! - `chunks`: fetch, verify and open chunks, with the plaintext cache, single-flight
//!   fetches and read-ahead;
//! - [`backend`]: the storage trait the network implements, and [`DirBackend`] (a local
//!   directory with fault injection) for tests;
//! - [`index`]: the SQLite index (namespace, chunk lists, refcounts, pending uploads);
//! - [`staging`]: local files holding content not yet uploaded;
//! - [`model`]: the POSIX operations, without FUSE — tests drive it directly;
//! - [`snapshot`]: encrypted snapshots of the index on peers, their root on the server,
//!   and the restore of an empty drive from them; their retention;
//! - [`restore`]: writing a snapshot (or a path in it) into a local directory;
//! - `uploader`: the background thread that stores chunks and commits chunk lists;
//! - [`health`]: what the uploader publishes for `peerstash status --wait`;
//! - [`verify`]: `peerstash verify`, reading every copy of the chunks back;
//! - [`fuse`]: the fuser adapter, [`mount`], [`run_foreground`], [`run_foreground_until`].
//!
//! # Life of a file
//!
//! 1. Writes (and truncates) go to a *working* copy, created empty or from the current
//!    content (copied from a pending stage, or fetched chunk by chunk): in memory while it
//!    is at most 64 KiB, a staging file once larger. Size and mtime of unclosed content
//!    live in memory only.
//! 2. At close (flush/release), `fsync`, or a path truncate, the working file is synced
//!    and becomes the inode's immutable *pending stage* (`inodes.stage`), with its size and
//!    mtime, in one transaction. A file of at most 64 KiB is not synced: its content is
//!    copied into that transaction (`stage_data`) and the working file deleted. A crash
//!    before this point leaves the previous version.
//! 3. The uploader chunks and seals the stage, stores the chunks no committed version
//!    already references, and in one transaction replaces the file's chunk list, adjusts
//!    refcounts, sets `committed_stage` and clears `stage`. Uploading never touches mtime.
//! 4. Chunks whose refcount reaches zero are released from the backend between batches,
//!    unless a retained snapshot names them (see [`snapshot`]: retention).
//!
//! Reads come from the working file, else the pending stage, else chunks (LRU cache of
//! decrypted chunks, single-flight fetches, read-ahead of the next chunk on sequential
//! reads). After a restart, pending stages are uploaded again and unclosed working files
//! are discarded.
//!
//! # Index schema (`STATE/index.sqlite`, WAL)
//!
//! ```text
//! inodes(ino PK AUTOINCREMENT, kind, perm, uid, gid, size, atime_s/ns, mtime_s/ns,
//!        ctime_s/ns, nlink, rdev, parent /*dirs*/, target /*symlinks*/,
//!        stage /*pending upload or NULL*/, committed_stage)
//! stage_data(stage PK, data BLOB)   -- a pending small file's content (≤ 64 KiB, or a
//!                                     -- settled file staged again to be repacked)
//! dentries(parent, name BLOB, ino, PK(parent, name))
//! xattrs(ino, name BLOB, value BLOB, PK(ino, name))          -- user.* only
//! file_chunks(ino, offset, chunk BLOB, len, stored, at, PK(ino, offset))
//!                                     -- a piece: len bytes at `at` of the chunk's
//!                                     -- plaintext; a pack's pieces have len + 28 < stored
//! chunks(id BLOB PK, stored, refcount, confirmed,
//!        first_snap, last_snap)       -- versions of the snapshots naming it
//!                                     -- release: refcount 0, no retained snapshot in range
//! snapshots(version PK, created)      -- snapshots retained (their roots on the server)
//! meta(key PK, value)
//! ```
//!
//! Names, sizes and the namespace never leave this file; the backend sees chunk ids and
//! ciphertext only. Chunk *locations* (which peers hold a chunk) belong to the network
//! backend and are not kept here.
//!
//! # Known limits
//!
//! - Rewriting part of an uploaded file first fetches the whole file into staging.
//! - Small files deduplicate by content only within a pack (identical files closed in
//!   the same round); a second copy of a tree copied in later is stored again, in new
//!   packs.
//! - The ENOSPC check at write time counts staged bytes in full (it does not know about
//!   deduplication), so a rewrite of a large file needs that much free quota.
//! - Permission checks are the kernel's (`default_permissions`); the model checks none.
//! - Debug builds seal at only ~7 MiB/s (the AEAD's generic code is instantiated in this
//!   crate, built at opt-level 0); release builds are limited by disk and FUSE.

pub mod backend;
pub mod chunker;
mod chunks;
pub mod crypto;
pub mod fuse;
pub mod health;
pub mod index;
pub mod model;
pub mod restore;
pub mod snapshot;
pub mod staging;
mod uploader;
pub mod verify;

pub use backend::{BackendError, ChunkBackend, DirBackend, Quota};
pub use fuse::{mount, run_foreground, run_foreground_until, DriveConfig, MountError, MountHandle};
pub use index::{summary_of, Summary};
pub use model::{DriveOptions, FsError, Model};
pub use snapshot::{RootError, RootStore, SnapshotError};
