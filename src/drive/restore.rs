//! Restoring a snapshot, or a path inside it, into a local directory
//! (`peerstash restore`).
//!
//! The snapshot is loaded into an index of its own (see [`super::snapshot::load`]); this
//! module walks that index and writes what it names: regular files byte for byte (their
//! chunks fetched a window at a time across files, many in flight, each hash-checked and
//! opened under the data key), directories, symlinks,
//! named pipes, hard links as hard links, permission bits, `user.*` xattrs (best effort)
//! and access/modification times (set after the content; a directory's after its
//! entries). Ownership is left to the user running it; sockets and device nodes are
//! skipped. Each file is written under a temporary name and renamed once complete, so an
//! interrupted restore never leaves a partial file under its real name.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::backend::{get_in_order, BackendError, ChunkBackend};
use super::crypto::ChunkSealer;
use super::index::{self, Attr, ChunkRef, Kind, ROOT_INO};
use crate::ids::ChunkId;

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The destination exists and is not an empty directory: nothing was written.
    #[error("{0} is not empty: restore into a new or empty directory")]
    NotEmpty(PathBuf),
    /// The destination exists and is not a directory.
    #[error("{0} exists and is not a directory")]
    NotADirectory(PathBuf),
    /// The path asked for is not in the snapshot.
    #[error("{0:?} is not in this snapshot")]
    NotInSnapshot(String),
    /// A chunk did not open, or a file's chunks do not add up to its size.
    #[error("snapshot data is damaged: {0}")]
    Damaged(String),
    /// Fetching a chunk failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Reading the snapshot's index failed.
    #[error("reading the snapshot's index")]
    Index(#[from] rusqlite::Error),
    /// Writing the destination failed.
    #[error("writing {path}")]
    Io {
        /// The path being written.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a restore wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Regular files written.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Directories made.
    pub dirs: u64,
    /// Symlinks made.
    pub symlinks: u64,
    /// Extra names of hard-linked files, made as hard links.
    pub hard_links: u64,
    /// Entries skipped (sockets, device nodes) or metadata not applied (xattrs).
    pub skipped: u64,
}

/// Refuse a destination that exists and is not an empty directory (call before fetching
/// anything, so nothing is written on refusal).
pub fn check_destination(to: &Path) -> Result<(), RestoreError> {
    // A symlink to a directory is a directory to write into.
    match std::fs::metadata(to) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(to)(e)),
        Ok(m) if !m.is_dir() => Err(RestoreError::NotADirectory(to.to_path_buf())),
        Ok(_) => {
            let mut entries = std::fs::read_dir(to).map_err(io(to))?;
            if entries.next().is_some() {
                Err(RestoreError::NotEmpty(to.to_path_buf()))
            } else {
                Ok(())
            }
        }
    }
}

/// The inode at `path` (slash-separated, relative to the drive's root; empty or `/` is
/// the root).
pub fn resolve(db: &Connection, path: &str) -> Result<u64, RestoreError> {
    let mut ino = ROOT_INO;
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return Err(RestoreError::NotInSnapshot(path.to_string()));
        }
        ino = index::lookup(db, ino, part.as_bytes())?
            .ok_or_else(|| RestoreError::NotInSnapshot(path.to_string()))?;
    }
    Ok(ino)
}

/// Restore the entry at `path` inside the snapshot loaded in `db` into `to`: a directory's
/// entries go into `to` (made if missing), anything else goes to `to/NAME`. `progress`
/// sees the counts after every file.
pub fn restore_tree(
    db: &Connection,
    backend: &dyn ChunkBackend,
    sealer: &ChunkSealer,
    path: &str,
    to: &Path,
    mut progress: impl FnMut(&RestoreStats),
) -> Result<RestoreStats, RestoreError> {
    check_destination(to)?;
    let ino = resolve(db, path)?;
    let attr = index::get_attr(db, ino)?.ok_or_else(|| RestoreError::NotInSnapshot(path.into()))?;
    let mut w = Writer {
        db,
        backend,
        sealer,
        links: HashMap::new(),
        stats: RestoreStats::default(),
        progress: &mut progress,
        queue: Vec::new(),
        files: Vec::new(),
        queued_bytes: 0,
        dirs: Vec::new(),
    };
    std::fs::create_dir_all(to).map_err(io(to))?;
    let walked = if attr.kind == Kind::Dir {
        w.fill_dir(ino, &attr, to)
    } else {
        let name = path
            .split('/')
            .rfind(|p| !p.is_empty() && *p != ".")
            .unwrap_or("file");
        w.entry(&attr, &to.join(name))
    };
    walked
        .and_then(|()| w.flush())
        .inspect_err(|_| w.abandon())?;
    // Directories last, deepest first: writing their entries changed their times.
    for (a, dest) in std::mem::take(&mut w.dirs) {
        w.meta(&a, &dest)?;
    }
    let stats = w.stats.clone();
    progress(&stats);
    Ok(stats)
}

struct Writer<'a, P: FnMut(&RestoreStats)> {
    db: &'a Connection,
    backend: &'a dyn ChunkBackend,
    sealer: &'a ChunkSealer,
    /// Hard-linked files already written: inode → its first path.
    links: HashMap<u64, PathBuf>,
    stats: RestoreStats,
    progress: &'a mut P,
    /// Chunks waiting to be fetched, in file order: (index in `files`, chunk).
    queue: Vec<(usize, ChunkRef)>,
    /// Files being written; `None` once finished.
    files: Vec<Option<Pending>>,
    queued_bytes: u64,
    /// Directories whose metadata is set at the end.
    dirs: Vec<(Attr, PathBuf)>,
}

/// A file whose chunks are on their way.
struct Pending {
    attr: Attr,
    dest: PathBuf,
    tmp: PathBuf,
    file: std::fs::File,
    written: u64,
    chunks_left: usize,
}

/// Stored bytes fetched at once: many chunks (or many small files) per token request
/// and in flight together, memory bounded.
const WINDOW_BYTES: u64 = 32 << 20;
/// Files open for writing at once.
const WINDOW_FILES: usize = 256;

impl<P: FnMut(&RestoreStats)> Writer<'_, P> {
    fn entry(&mut self, a: &Attr, dest: &Path) -> Result<(), RestoreError> {
        match a.kind {
            Kind::Dir => {
                std::fs::create_dir(dest).map_err(io(dest))?;
                self.fill_dir(a.ino, a, dest)
            }
            Kind::File => {
                if a.nlink > 1 {
                    if let Some(first) = self.links.get(&a.ino).cloned() {
                        // The first name must be complete before it gets another.
                        self.flush()?;
                        std::fs::hard_link(first, dest).map_err(io(dest))?;
                        self.stats.hard_links += 1;
                        return Ok(());
                    }
                }
                self.file(a, dest)?;
                if a.nlink > 1 {
                    self.links.insert(a.ino, dest.to_path_buf());
                }
                Ok(())
            }
            Kind::Symlink => {
                let target = index::symlink_target(self.db, a.ino)?.unwrap_or_default();
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), dest).map_err(io(dest))?;
                set_times(dest, a, true).map_err(io(dest))?;
                self.stats.symlinks += 1;
                Ok(())
            }
            Kind::Fifo => {
                let c = cstr(dest)?;
                // SAFETY: a valid NUL-terminated path.
                if unsafe { libc::mkfifo(c.as_ptr(), libc::mode_t::from(a.perm)) } != 0 {
                    return Err(io(dest)(std::io::Error::last_os_error()));
                }
                self.meta(a, dest)
            }
            Kind::Socket | Kind::CharDev | Kind::BlockDev => {
                tracing::warn!("{}: skipped (socket or device node)", dest.display());
                self.stats.skipped += 1;
                Ok(())
            }
        }
    }

    /// Write a directory's entries into `dest` (which exists), then its metadata.
    fn fill_dir(&mut self, ino: u64, a: &Attr, dest: &Path) -> Result<(), RestoreError> {
        for (name, child, _) in index::list_dir(self.db, ino)? {
            let ca = index::get_attr(self.db, child)?
                .ok_or_else(|| RestoreError::Damaged(format!("entry {child} has no inode")))?;
            self.entry(&ca, &dest.join(OsStr::from_bytes(&name)))?;
        }
        self.stats.dirs += 1;
        self.dirs.push((a.clone(), dest.to_path_buf()));
        Ok(())
    }

    /// xattrs, permission bits, then times (last: the others change ctime only).
    fn meta(&mut self, a: &Attr, dest: &Path) -> Result<(), RestoreError> {
        self.xattrs(a.ino, dest)?;
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(u32::from(a.perm)))
            .map_err(io(dest))?;
        set_times(dest, a, false).map_err(io(dest))
    }

    fn xattrs(&mut self, ino: u64, dest: &Path) -> Result<(), RestoreError> {
        for name in index::list_xattrs(self.db, ino)? {
            let value = index::get_xattr(self.db, ino, &name)?.unwrap_or_default();
            let (Ok(p), Ok(n)) = (cstr(dest), CString::new(name.clone())) else {
                continue;
            };
            // SAFETY: valid NUL-terminated strings and a buffer of the given length.
            let r = unsafe {
                libc::setxattr(
                    p.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            if r != 0 {
                tracing::warn!(
                    "{}: xattr {} not restored: {}",
                    dest.display(),
                    String::from_utf8_lossy(&name),
                    std::io::Error::last_os_error()
                );
                self.stats.skipped += 1;
            }
        }
        Ok(())
    }

    /// Queue a file: created under a temporary name now, its chunks fetched with the
    /// next window, renamed to `dest` once complete.
    fn file(&mut self, a: &Attr, dest: &Path) -> Result<(), RestoreError> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".peerstash-restore-{}.part", a.ino));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let chunks = index::chunks_of(self.db, a.ino)?;
        let k = self.files.len();
        self.files.push(Some(Pending {
            attr: a.clone(),
            dest: dest.to_path_buf(),
            tmp,
            file,
            written: 0,
            chunks_left: chunks.len(),
        }));
        if chunks.is_empty() {
            return self.finish(k);
        }
        for c in chunks {
            // A pack is fetched once per window for all the files it serves.
            self.queued_bytes += u64::from(if c.is_packed() { c.len } else { c.stored });
            self.queue.push((k, c));
        }
        if self.queued_bytes >= WINDOW_BYTES || self.files.len() >= WINDOW_FILES {
            self.flush()?;
        }
        Ok(())
    }

    /// Fetch every queued chunk and write it into its file, finishing complete files.
    fn flush(&mut self) -> Result<(), RestoreError> {
        let queue = std::mem::take(&mut self.queue);
        self.queued_bytes = 0;
        // Each want with the queue entries it serves: a pack once for all its files (a
        // file's own chunks stay one want each, in file order).
        let mut wants: Vec<(ChunkId, u32)> = Vec::new();
        let mut users: Vec<Vec<usize>> = Vec::new();
        let mut packs: HashMap<ChunkId, usize> = HashMap::new();
        for (q, (_, c)) in queue.iter().enumerate() {
            if c.is_packed() {
                if let Some(&w) = packs.get(&c.id) {
                    users[w].push(q);
                    continue;
                }
                packs.insert(c.id, wants.len());
            }
            wants.push((c.id, c.stored));
            users.push(vec![q]);
        }
        get_in_order(self.backend, &wants, WINDOW_BYTES, |w, stored| {
            let id = wants[w].0;
            if stored.id() != id {
                return Err(RestoreError::Damaged(format!(
                    "chunk {id} came back as another"
                )));
            }
            let plain = self
                .sealer
                .open_verified(stored)
                .map_err(|e| RestoreError::Damaged(format!("chunk {id}: {e}")))?;
            for &q in &users[w] {
                let (k, c) = &queue[q];
                let p = self.files[*k].as_mut().expect("a queued file is pending");
                let piece = c.piece(&plain).filter(|_| c.offset == p.written);
                let Some(piece) = piece else {
                    return Err(RestoreError::Damaged(format!(
                        "chunk {} of {} does not fit",
                        c.id,
                        p.dest.display()
                    )));
                };
                p.file.write_all(piece).map_err(io(&p.tmp))?;
                p.written += piece.len() as u64;
                self.stats.bytes += piece.len() as u64;
                p.chunks_left -= 1;
                if p.chunks_left == 0 {
                    self.finish(*k)?;
                }
            }
            Ok(())
        })?;
        self.files.clear();
        Ok(())
    }

    /// A file with all its bytes: check its size, set its metadata, give it its name.
    fn finish(&mut self, k: usize) -> Result<(), RestoreError> {
        let Some(p) = self.files[k].take() else {
            return Ok(());
        };
        if p.written != p.attr.size {
            let _ = std::fs::remove_file(&p.tmp);
            return Err(RestoreError::Damaged(format!(
                "{}: chunks hold {} bytes, the file {}",
                p.dest.display(),
                p.written,
                p.attr.size
            )));
        }
        drop(p.file);
        self.meta(&p.attr, &p.tmp)?;
        std::fs::rename(&p.tmp, &p.dest).map_err(io(&p.dest))?;
        self.stats.files += 1;
        (self.progress)(&self.stats);
        Ok(())
    }

    /// A restore that failed leaves no temporary file behind.
    fn abandon(&mut self) {
        for p in self.files.drain(..).flatten() {
            let _ = std::fs::remove_file(&p.tmp);
        }
        self.queue.clear();
    }
}

fn cstr(p: &Path) -> Result<CString, RestoreError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        io(p)(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "NUL in path",
        ))
    })
}

/// Set access and modification times (of the link itself when `nofollow`).
fn set_times(p: &Path, a: &Attr, nofollow: bool) -> std::io::Result<()> {
    let ts = |t: index::Ts| libc::timespec {
        tv_sec: t.sec as libc::time_t,
        tv_nsec: t.nsec as libc::c_long,
    };
    let times = [ts(a.atime), ts(a.mtime)];
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    // SAFETY: a valid NUL-terminated path and two timespecs.
    if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
