//! The staging area: local files holding content written through the drive and not yet
//! uploaded. A staging file is named by a stage id that only grows. While a file is open
//! for writing its "working" staging file is mutable; once closed it becomes an immutable
//! pending stage that the uploader reads, so the uploader never sees a half-written state.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The staging directory and its id allocator.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    next: AtomicU64,
}

impl Staging {
    /// Open `dir`, creating it; new ids start above `max_known` and above every file there.
    pub fn open(dir: &Path, max_known: u64) -> io::Result<Staging> {
        fs::create_dir_all(dir)?;
        let mut max = max_known;
        for e in fs::read_dir(dir)? {
            if let Some(id) = e?.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) {
                max = max.max(id);
            }
        }
        Ok(Staging {
            dir: dir.to_path_buf(),
            next: AtomicU64::new(max + 1),
        })
    }

    /// A fresh stage id.
    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::SeqCst)
    }

    /// Path of a staging file.
    pub fn path(&self, id: u64) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// Create (truncating) the staging file `id`, open for reading and writing.
    pub fn create(&self, id: u64) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.path(id))
    }

    /// Open a staging file for reading.
    pub fn open_read(&self, id: u64) -> io::Result<File> {
        File::open(self.path(id))
    }

    /// Delete a staging file (absent is fine).
    pub fn remove(&self, id: u64) {
        match fs::remove_file(self.path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("removing staging file {id}: {e}"),
        }
    }

    /// Delete every staging file not in `keep`: working files of a session that crashed
    /// (their content was never closed, so the previous version stands).
    pub fn cleanup(&self, keep: &HashSet<u64>) -> io::Result<usize> {
        let mut n = 0;
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let keep_it = e
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|id| keep.contains(&id));
            if !keep_it {
                fs::remove_file(e.path())?;
                n += 1;
            }
        }
        Ok(n)
    }
}
