//! Restoring a snapshot, or a path inside it, into a local directory
//! (`peerstash restore`).
//!
//! The snapshot is loaded into an index of its own (see [`super::snapshot::load`]); this
//! module walks that index and writes what it names: regular files byte for byte (each
//! chunk fetched, hash-checked and opened under the data key), directories, symlinks,
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

use super::backend::{BackendError, ChunkBackend};
use super::crypto::ChunkSealer;
use super::index::{self, Attr, Kind, ROOT_INO};

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
    };
    if attr.kind == Kind::Dir {
        std::fs::create_dir_all(to).map_err(io(to))?;
        w.fill_dir(ino, &attr, to)?;
    } else {
        std::fs::create_dir_all(to).map_err(io(to))?;
        let name = path
            .split('/')
            .rfind(|p| !p.is_empty() && *p != ".")
            .unwrap_or("file");
        w.entry(&attr, &to.join(name))?;
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
}

impl<P: FnMut(&RestoreStats)> Writer<'_, P> {
    fn entry(&mut self, a: &Attr, dest: &Path) -> Result<(), RestoreError> {
        match a.kind {
            Kind::Dir => {
                std::fs::create_dir(dest).map_err(io(dest))?;
                self.fill_dir(a.ino, a, dest)
            }
            Kind::File => {
                if a.nlink > 1 {
                    if let Some(first) = self.links.get(&a.ino) {
                        std::fs::hard_link(first, dest).map_err(io(dest))?;
                        self.stats.hard_links += 1;
                        return Ok(());
                    }
                }
                self.file(a, dest)?;
                if a.nlink > 1 {
                    self.links.insert(a.ino, dest.to_path_buf());
                }
                (self.progress)(&self.stats);
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
        self.meta(a, dest)
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

    fn file(&mut self, a: &Attr, dest: &Path) -> Result<(), RestoreError> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".peerstash-restore-{}.part", a.ino));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let written = (|| {
            let mut total = 0u64;
            for c in index::chunks_of(self.db, a.ino)? {
                let stored = self.backend.get(c.id, c.stored)?;
                let plain = self
                    .sealer
                    .open(c.id, &stored)
                    .map_err(|e| RestoreError::Damaged(format!("chunk {}: {e}", c.id)))?;
                if plain.len() != c.len as usize || c.offset != total {
                    return Err(RestoreError::Damaged(format!(
                        "chunk {} of {} does not fit",
                        c.id,
                        dest.display()
                    )));
                }
                f.write_all(&plain).map_err(io(&tmp))?;
                total += plain.len() as u64;
                self.stats.bytes += plain.len() as u64;
            }
            if total != a.size {
                return Err(RestoreError::Damaged(format!(
                    "{}: chunks hold {total} bytes, the file {}",
                    dest.display(),
                    a.size
                )));
            }
            f.flush().map_err(io(&tmp))?;
            Ok(())
        })();
        if let Err(e) = written {
            drop(f);
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        drop(f);
        self.meta(a, &tmp)?;
        std::fs::rename(&tmp, dest).map_err(io(dest))?;
        self.stats.files += 1;
        Ok(())
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
